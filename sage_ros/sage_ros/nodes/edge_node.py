# SPDX-License-Identifier: Apache-2.0
"""sage_edge: classify camera frames on the robot, offload the uncertain ones within budget.

The node never waits on the network. A worker classifies the newest frame (frames arriving
while it works replace each other and are counted as dropped); a confident frame gets its
edge label at once; an uncertain one is sent to the cloud and the worker goes on with the
next frame while up to ``max_in_flight`` requests are out. Every handled frame gets exactly
one OffloadResult, as soon as it is known: the edge label, the cloud's answer when it comes,
or the edge label as a fallback at the frame's deadline (or at once when the uplink is down,
the window is full or the link is too slow). Results may therefore leave out of frame order;
header stamp and sequence identify the frame.

The Zenoh session opens in the background: the node is ready, and answers from the edge,
whether or not a router is reachable; offloading starts by itself when one is.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sage_ros_msgs.msg import BudgetStatus, CloudResult, OffloadResult, PatchSet
from sensor_msgs.msg import CompressedImage, Image

from sage_ros.core import SageError
from sage_ros.core.answers import AnswerBook, Final, Refused, Request, answer_times
from sage_ros.core.labels import class_name
from sage_ros.core.link import LinkSnapshot
from sage_ros.core.models import edge_runtime, load_edge_model
from sage_ros.core.pipeline import EdgePipeline
from sage_ros.core.preflight import check_device, check_weights
from sage_ros.core.preprocess import CropMap
from sage_ros.nodes import edge_messages
from sage_ros.nodes.diagnostics import CounterDiagnostics, Counters
from sage_ros.nodes.edge_params import SPECS, config_problem
from sage_ros.nodes.parameters import declare, validator
from sage_ros.nodes.runner import run_node
from sage_ros.params import FASTDDS_PROFILE, config_path, gate_config, offload_settings, uplink_monitor
from sage_ros.ros.publisher_gaps import PublisherGaps
from sage_ros.ros.ros_image import (decode_compressed, decode_short_side, draw_boxes, image_to_rgb,
                                   rgb_to_image_fields)
from sage_ros.transport.typestore import typestore
from sage_ros.transport.uplink import Uplink, edge_zenoh_config
from sage_ros.transport.wire import peek_request_id


@dataclass
class _Frame:
    rgb_source: Any
    header: Any
    received: float
    """Edge monotonic clock at arrival: every deadline counts from here."""
    source_size: tuple[int, int] | None = None
    """(width, height) of a compressed frame as sent, once decoded: a JPEG is decoded smaller."""
    result: Any = None
    """Its OffloadResult once processed (filled in as the frame's answer takes shape)."""


def _stamp_s(t: Any) -> float:
    return t.sec + t.nanosec * 1e-9


class EdgeNode(Node):
    """The robot side of sage_ros."""

    _unknown_answer_logged = -float('inf')
    """Monotonic clock: when an answer for an id not in flight was last logged."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sage_edge', **kwargs)
        self._running = True
        self._params = declare(self, 'sage_edge', SPECS)
        why = config_problem(self._params)
        if why:
            raise ValueError(why)
        self.add_pre_set_parameters_callback(self._budget_means_fixed)
        self.add_on_set_parameters_callback(validator(SPECS))
        self.add_on_set_parameters_callback(self._check_budget_bounds)
        self.add_post_set_parameters_callback(self._on_params_set)
        p = self._params
        # Before the model loads: a missing file or an unreachable hub is one line, at once.
        check_weights('sage_edge weights', p['weights'])
        if edge_runtime(p['weights'], p['runtime']) == 'torch':  # ONNX Runtime's device: its loader says
            check_device('sage_edge device', p['device'])
        zenoh_config = edge_zenoh_config(p)  # read now: a bad one is one line naming it, before the model loads
        model = load_edge_model(p['model'], p['weights'], runtime=p['runtime'], device=p['device'],
                                num_threads=p['num_threads'], int8=p['int8'])
        card = model.card
        if card.random_weights:
            self.get_logger().warning(f'edge model {p["model"]} runs with RANDOM weights ({card.weights}): '
                                      'labels are meaningless')
        self._pipeline = EdgePipeline(model)
        # A JPEG frame is decoded at 1/2, 1/4 or 1/8 when that still leaves twice the side the
        # model's resize scales to: a 12 MP frame costs a fraction of a full decode.
        self._decode_side = decode_short_side(card.input_size, p['crop_pct'] or card.crop_pct)
        # Load the class table and run one forward now, not inside the first frame's deadline
        # (the first pass of either runtime is several times slower than the next ones).
        class_name(0)
        self._pipeline.forward(np.zeros((card.input_size, card.input_size, 3), np.uint8))
        self._robot_id = p['robot_id'] or self.get_namespace().strip('/')
        self._seq = itertools.count()
        # dropped: replaced by a newer frame while busy; lost: never reached the node (gaps in
        # the publishers' sequence numbers: the shallow camera queue overflowed, or the network).
        # no_uplink / window_full / uplink_busy / suspended: offload wanted, edge label given.
        self.stats = Counters(('received', 'dropped', 'lost', 'rejected', 'stale', 'processed', 'edge', 'cloud',
                               'fallback', 'timeouts', 'no_uplink', 'window_full', 'uplink_busy', 'suspended',
                               'late_answers', 'bad_answers', 'truncated'))
        self._misses_reported = 0
        self._gaps = PublisherGaps()
        self._lost_warned = False

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._result_pub = self.create_publisher(OffloadResult, p['result_topic'], reliable)
        self._provisional_pub = (self.create_publisher(OffloadResult, p['provisional_topic'], reliable)
                                 if p['provisional_topic'] else None)
        self._debug_pub = self.create_publisher(Image, p['debug_image_topic'], 1)
        # Camera: best effort and shallow, like image_pipeline: a late frame is worth nothing.
        camera_qos = QoSProfile(depth=2, reliability=qos_profile_sensor_data.reliability,
                                durability=qos_profile_sensor_data.durability,
                                history=qos_profile_sensor_data.history)
        self._image_topic = self._compressed_topic = ''
        if p['image_topic']:
            self._image_topic = self.create_subscription(Image, p['image_topic'], self._on_image,
                                                         camera_qos).topic_name
        if p['compressed_image_topic']:
            self._compressed_topic = self.create_subscription(CompressedImage, p['compressed_image_topic'],
                                                              self._on_compressed, camera_qos).topic_name

        self._monitor = uplink_monitor(p, connected=False)
        self._book = AnswerBook(self._monitor, offload_settings(p))
        self._uplink = Uplink(self, p, reliable, self._on_answer, zenoh_config)
        self._budget_pub = self.create_publisher(BudgetStatus, p['budget_topic'], reliable)
        self._last_budget_state: tuple = ()
        self.create_timer(0.25, self._tick_link)
        CounterDiagnostics(self, self.stats.snapshot, hardware_id=self._robot_id or 'robot',
                           warn_on=('dropped', 'lost', 'rejected', 'stale', 'fallback', 'bad_answers'),
                           extra=self._link_status)
        self._slot: _Frame | None = None
        self._slot_cv = threading.Condition()
        self._deadline_wake = threading.Event()
        self._worker = threading.Thread(target=self._work, name='sage_edge_worker', daemon=True)
        self._deadlines = threading.Thread(target=self._watch_deadlines, name='sage_edge_deadlines', daemon=True)
        self._worker.start()
        self._deadlines.start()
        self._uplink.start()
        self.get_logger().info(
            f'ready: {p["model"]} ({card.weights}) on {model.runtime}{" int8" if model.int8 else ""}, '
            f'gate {p["gate_metric"]} >= {p["eta"]}, '
            f'{p["method"]} B={p["budget"] if p["budget_mode"] == "fixed" else "auto"}, codec {p["codec"]}, '
            f'transport {p["transport"]}, up to {p["max_in_flight"]} requests in flight')

    # --- parameters -------------------------------------------------------------------------
    def _budget_means_fixed(self, params: list[Parameter]) -> list[Parameter]:
        """Setting budget means the user wants that B: budget_mode becomes fixed with it (in
        the same atomic set, so a refused budget changes nothing), unless set alongside."""
        names = {q.name for q in params}
        if 'budget' in names and 'budget_mode' not in names and self._params['budget_mode'] != 'fixed':
            self.get_logger().info('budget set: budget_mode is now fixed '
                                   '(`ros2 param set ... budget_mode auto` gives B back to the bandwidth monitor)')
            return [*params, Parameter('budget_mode', Parameter.Type.STRING, 'fixed')]
        return params

    def _check_budget_bounds(self, params: list[Parameter]) -> SetParametersResult:
        why = config_problem({**self._params, **{q.name: q.value for q in params}})
        return SetParametersResult(successful=why is None, reason=why or '')

    def _on_params_set(self, params: list[Parameter]) -> None:
        # One new dict, swapped in whole: the worker reads a consistent snapshot per frame.
        self._params = p = {**self._params, **{q.name: q.value for q in params}}
        self._monitor.configure(deadline_s=p['deadline_ms'] / 1e3, budget_min=p['budget_min'],
                                budget_max=p['budget_max'], safety=p['budget_safety'],
                                probe_interval_s=p['probe_interval_s'], probe_bytes=p['probe_bytes'],
                                max_in_flight=p['max_in_flight'])
        self._book.settings = offload_settings(p)

    # --- link -------------------------------------------------------------------------------
    def _budget_now(self, p: dict[str, Any], snap: LinkSnapshot) -> int:
        """Budget in force: the monitor's in auto mode (0 = suspended), else the parameter."""
        return snap.budget if p['budget_mode'] == 'auto' else p['budget']

    def _tick_link(self) -> None:
        p = self._params
        self._monitor.set_connected(self._uplink.connected())
        # A fixed budget needs no link estimate, except the base RTT that second rounds are
        # planned with (one tiny probe).
        size = self._monitor.probe_due(rtt_only=p['budget_mode'] != 'auto')
        if size:
            self._send_probe(size)
        snap = self._monitor.snapshot()
        state = (self._budget_now(p, snap), p['budget_mode'], snap.suspended, snap.connected,
                 round(snap.throughput_bps, -2), snap.deadline_misses)
        if state != self._last_budget_state:
            self._last_budget_state = state
            self._budget_pub.publish(edge_messages.budget_status(p, snap, self._budget_now(p, snap),
                                                                self.get_clock().now().to_msg()))

    def _send_probe(self, size: int) -> None:
        rid = f'{self._robot_id or "robot"}/probe-{secrets.token_hex(8)}'
        probe = PatchSet(request_id=rid, robot_id=self._robot_id, method=PatchSet.METHOD_PROBE, encoding='raw',
                         payload=bytes(size))
        data = serialize_message(probe)
        self._monitor.sent(rid, request_bytes=len(data), patches=0, payload_bytes=size)
        try:
            self._uplink.send(data)
        except Exception as exc:
            self._monitor.cancel(rid)
            self.get_logger().warning(f'probe not sent: {exc}', throttle_duration_sec=5.0)

    def _link_status(self) -> DiagnosticStatus:
        p, snap = self._params, self._monitor.snapshot()
        status = edge_messages.link_status(p, snap, self._budget_now(p, snap), self._uplink.state,
                                           self._uplink.problem, new_misses=snap.deadline_misses > self._misses_reported,
                                           name=f'{self.get_fully_qualified_name()}: link',
                                           hardware_id=self._robot_id or 'robot')
        self._misses_reported = snap.deadline_misses
        return status

    # --- input --------------------------------------------------------------------------
    def _offer(self, frame: _Frame, info: Any, size: int, topic: str) -> None:
        lost = self._gaps.missed(info)
        self.stats.add('lost', lost)
        if lost and not self._lost_warned:  # once: the counter on /diagnostics keeps the count
            self._lost_warned = True
            self.get_logger().warning(edge_messages.lost_frames_line(lost, size, topic, config_path(FASTDDS_PROFILE)))
        self.stats.add('received')
        with self._slot_cv:
            if self._slot is not None:
                self.stats.add('dropped')
            self._slot = frame
            self._slot_cv.notify()

    def _on_image(self, msg: Image, info: Any) -> None:
        self._offer(_Frame(msg, msg.header, time.monotonic()), info, len(msg.data), self._image_topic)

    def _on_compressed(self, msg: CompressedImage, info: Any) -> None:
        self._offer(_Frame(msg, msg.header, time.monotonic()), info, len(msg.data), self._compressed_topic)

    def _on_answer(self, data: bytes) -> None:
        data = bytes(data)
        # Before anything costly, the id alone: only an answer to a request we sent and still
        # know is parsed. A burst of forged answers costs a lookup each (and no log line each:
        # rclpy's logger is slow even when throttled), so the real ones keep their latency.
        rid = peek_request_id(data)
        if rid is None or not self._monitor.expects(rid):
            self.stats.add('bad_answers' if rid is None else 'late_answers')
            now = time.monotonic()
            if now >= self._unknown_answer_logged + 5.0:
                self._unknown_answer_logged = now
                self.get_logger().info(f'cloud answer for an id not in flight ({rid!r}) dropped')
            return
        try:
            # Network bytes go through rosbags' pure-Python CDR reader: rclpy's C type support
            # can crash on hostile input (found by fuzzing the cloud's side).
            answer = typestore().deserialize_cdr(data, 'sage_ros_msgs/msg/CloudResult')
        except Exception as exc:  # rosbags raises several types on bad CDR
            self.stats.add('bad_answers')
            self.get_logger().warning(f'malformed cloud answer ({len(data)} B): {exc}', throttle_duration_sec=5.0)
            return
        step = self._book.answered(answer, *answer_times(
            *(_stamp_s(t) for t in (answer.received_stamp, answer.started_stamp, answer.sent_stamp))))
        if step is None:  # no frame waits for it (it still measured the link)
            if answer.status != CloudResult.STATUS_PROBE:
                self.stats.add('late_answers')
                self.get_logger().info(f'late or unknown cloud answer for {answer.request_id!r} dropped',
                                       throttle_duration_sec=5.0)
        elif isinstance(step, Final):
            self._finish(step)
        else:
            self._send(step)

    def _finish(self, final: Final) -> None:
        """The frame's one final result: a cloud answer's label, or its edge label."""
        frame: _Frame = final.job.owner
        result, answer = frame.result, final.answer
        if answer is None:
            self._fallback(result, frame, final.detail)
            return
        result.source = OffloadResult.SOURCE_CLOUD
        result.label = int(answer.labels[0])
        result.confidence = float(answer.scores[0]) if len(answer.scores) else 0.0
        result.random_weights = result.random_weights or str(answer.server_weights).startswith('random')
        result.rounds = 2 if int(answer.round) == 2 else 1
        result.cloud_uncertainty = float(answer.uncertainty)
        result.detail = final.detail
        self._publish(result, frame)

    def _send(self, request: Request) -> None:
        """Send a round-1 or round-2 request; its frame's result says what it carried."""
        p, job, plan = self._params, request.job, request.plan
        frame: _Frame = job.owner
        result, n = frame.result, int(plan.indices.size)
        msg = edge_messages.patch_set(
            result, job.decision, plan, self._pipeline.card, p, header=frame.header, robot_id=self._robot_id,
            source_size=frame.source_size, sent_stamp=self.get_clock().now().to_msg(),
            deadline_left_s=self._book.deadline(job) - time.monotonic())
        msg.round = request.round
        if request.round == 1:
            result.patches_sent, result.bytes_sent = n, plan.num_bytes
            msg.second_round_max, msg.second_round_ms = request.second_round_max, request.second_round_s * 1e3
        else:
            msg.budget_patches = request.budget
            result.patches_sent += n
            result.bytes_sent += plan.num_bytes
            result.second_round_patches, result.second_round_bytes = n, plan.num_bytes
        data = serialize_message(msg)
        self._book.sending(request, len(data))
        self._deadline_wake.set()
        if request.round == 1 and self._provisional_pub and self._provisional_pub.get_subscription_count():
            self._provisional_pub.publish(edge_messages.provisional(result))
        try:
            self._uplink.send(data)
        except Exception as exc:  # the frame still gets its answer: round 1's, or the edge's
            final = self._book.send_failed(request, exc)
            if final is not None:
                self._finish(final)

    # --- work ---------------------------------------------------------------------------
    def _work(self) -> None:
        while self._running:
            with self._slot_cv:
                if self._slot is None:
                    self._slot_cv.wait(timeout=0.2)
                frame, self._slot = self._slot, None
            if frame is not None and self._running:
                try:
                    self._process(frame)
                except Exception as exc:  # a frame must never take the node down
                    self.stats.add('rejected')
                    self.get_logger().error(f'frame failed: {exc}', throttle_duration_sec=5.0)

    def _watch_deadlines(self) -> None:
        """Fall back, at its deadline, every frame whose answer has not come."""
        while self._running:
            for final in self._book.expired():
                self.stats.add('timeouts')
                self._finish(final)
            wait = self._monitor.next_deadline() - time.monotonic()
            self._deadline_wake.wait(min(0.1, max(0.001, wait)))
            self._deadline_wake.clear()

    def _process(self, frame: _Frame) -> None:
        p = self._params
        if p['max_frame_age_s'] > 0:
            age = self.get_clock().now().nanoseconds * 1e-9 - _stamp_s(frame.header.stamp)
            if age > p['max_frame_age_s']:
                self.stats.add('stale')
                self.get_logger().warning(f'frame skipped: stamped {age:.1f} s ago', throttle_duration_sec=5.0)
                return
        try:
            src = frame.rgb_source
            if isinstance(src, CompressedImage):
                rgb, frame.source_size = decode_compressed(src, max_pixels=p['max_frame_pixels'],
                                                           min_short_side=self._decode_side)
            else:
                rgb = image_to_rgb(src, max_pixels=p['max_frame_pixels'])
            decision = self._pipeline.analyze(rgb, gate_config(p))
        except (SageError, ValueError) as exc:
            self.stats.add('rejected')
            self.get_logger().warning(f'frame skipped: {exc}', throttle_duration_sec=5.0)
            return
        self._monitor.note_frame(time.monotonic() - frame.received)
        self.stats.add('processed')
        seq = next(self._seq)
        # A 64-bit random nonce per request: an answer cannot be forged by guessing its id, and
        # only an id in flight is acted on (UplinkMonitor.answered).
        rid = f'{self._robot_id or "robot"}/{seq}-{secrets.token_hex(8)}'
        frame.result = result = OffloadResult(header=frame.header, request_id=rid,
                               sequence=seq, method=p['method'], random_weights=self._pipeline.card.random_weights,
                               label=decision.label, edge_label=decision.label,
                               confidence=decision.confidence, min_entropy=decision.min_entropy)
        auto = p['budget_mode'] == 'auto'
        result.budget_patches = self._monitor.budget if auto else p['budget']
        if not decision.offload:
            result.source = OffloadResult.SOURCE_EDGE
            self._publish(result, frame)
            return
        step = self._book.offload(rid, decision, arrival=frame.received, fixed_budget=0 if auto else p['budget'],
                                  owner=frame)
        if isinstance(step, Refused):
            if step.cause:
                self.stats.add(step.cause)
            self.stats.add('truncated', step.truncated)
            result.budget_patches = step.budget or result.budget_patches
            self._fallback(result, frame, step.reason)
            return
        result.budget_patches = step.budget
        self.stats.add('truncated', step.plan.truncated_by_method)
        self._publish_debug(rgb, decision.crop_map, step.plan.indices, frame.header)
        self._send(step)

    # --- output -------------------------------------------------------------------------
    def _fallback(self, result: OffloadResult, frame: _Frame, why: str) -> None:
        result.source = OffloadResult.SOURCE_EDGE_FALLBACK
        result.detail = why
        self._publish(result, frame)

    def _publish(self, result: OffloadResult, frame: _Frame) -> None:
        result.label_name = class_name(result.label)
        result.latency_ms = (time.monotonic() - frame.received) * 1e3
        key = {OffloadResult.SOURCE_EDGE: 'edge', OffloadResult.SOURCE_CLOUD: 'cloud'}.get(result.source, 'fallback')
        self.stats.add(key)
        self._result_pub.publish(result)

    def _publish_debug(self, rgb: np.ndarray, cmap: CropMap, indices: np.ndarray, header: Any) -> None:
        # Drawing costs a copy of the frame: only while someone looks.
        if self._debug_pub.get_subscription_count():
            boxes = (cmap.patch_box(i, self._pipeline.card.patch_size) for i in indices.tolist())
            self._debug_pub.publish(Image(header=header, **rgb_to_image_fields(draw_boxes(rgb, boxes), 'bgr8')))

    def destroy_node(self) -> None:
        # Also called on a node whose __init__ failed part way: tear down what exists.
        self._running = False
        if hasattr(self, '_slot_cv'):
            with self._slot_cv:
                self._slot_cv.notify_all()
            self._deadline_wake.set()
            self._worker.join(timeout=1.0)
            self._deadlines.join(timeout=0.5)
        if hasattr(self, '_monitor'):
            # Frames still waiting for the cloud get their edge label, while ROS still runs
            # (after a signal, rclpy may already have shut the context down: then nobody can
            # receive them anyway).
            for final in self._book.drain('shutdown'):
                try:
                    self._finish(final)
                except Exception:  # noqa: BLE001 - rclpy's RCLError: context already shut down
                    break
        if hasattr(self, '_uplink'):
            self._uplink.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(EdgeNode, args)


if __name__ == '__main__':
    main()
