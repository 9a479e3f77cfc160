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
from typing import Any, Callable

import cv2
import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import serialize_message
from sage_ros_msgs.msg import BudgetStatus, CloudResult, OffloadResult, PatchSet
from sensor_msgs.msg import CompressedImage, Image

from sage_ros.core import Budget, SageError
from sage_ros.core.codec import ENCODINGS
from sage_ros.core.gate import GATE_METRICS
from sage_ros.core.labels import class_name
from sage_ros.core.models import RUNTIMES, edge_runtime, load_edge_model
from sage_ros.core.link import LinkSnapshot
from sage_ros.core.offload import OffloadPlan, check_byte_budget
from sage_ros.core.pipeline import EdgePipeline, FrameDecision
from sage_ros.core.preprocess import MAX_PIXELS, MIN_SIDE, CropMap
from sage_ros.core.rounds import SECOND_ROUND_MODES
from sage_ros.core.selection import METHODS
from sage_ros.nodes.diagnostics import CounterDiagnostics, Counters
from sage_ros.nodes.parameters import Spec, declare, validator
from sage_ros.nodes.runner import run_node
from sage_ros.params import FASTDDS_PROFILE, config_path, gate_config, selection_config, uplink_monitor
from sage_ros.core.preflight import check_device, check_weights
from sage_ros.ros.ros_image import decode_compressed, decode_short_side, image_to_rgb, rgb_to_image_fields
from sage_ros.transport.uplink_watch import (NO_ROUTER, UNANSWERED, RouteContext, UplinkWatch, problem_line,
                                            unresolved_line)
from sage_ros.transport.wire import peek_request_id
from sage_ros.transport.typestore import typestore

SPECS = {
    'image_topic': Spec('camera sensor_msgs/Image topic, relative to the namespace ("" = off)', read_only=True),
    'compressed_image_topic': Spec('optional sensor_msgs/CompressedImage topic ("" = off)', read_only=True),
    'result_topic': Spec('OffloadResult output topic', read_only=True),
    'patch_set_topic': Spec('PatchSet request topic / Zenoh key', read_only=True),
    'cloud_result_topic': Spec('CloudResult answer topic / Zenoh key', read_only=True),
    'debug_image_topic': Spec('debug overlay image topic', read_only=True),
    'transport': Spec('zenoh or ros', read_only=True, choices=('zenoh', 'ros')),
    'zenoh_config': Spec('Zenoh json5 config file', read_only=True),
    'zenoh_connect': Spec('Zenoh connect endpoints overriding the file (comma-separated)', read_only=True),
    'robot_id': Spec('robot id in requests ("" = namespace)', read_only=True),
    'deadline_ms': Spec('per-frame deadline from arrival, ms', float_range=(1.0, 600000.0)),
    'max_in_flight': Spec('offloaded requests in flight at once', int_range=(1, 64)),
    'provisional_topic': Spec('edge label of offloaded frames at once ("" = off)', read_only=True),
    'max_frame_age_s': Spec('skip frames stamped longer ago than this (0 = off)', float_range=(0.0, 1e9)),
    'max_frame_pixels': Spec('largest camera frame accepted, width x height (what the camera can send)',
                             read_only=True, int_range=(MIN_SIDE * MIN_SIDE, MAX_PIXELS)),
    'model': Spec('timm edge model', read_only=True),
    'weights': Spec('checkpoint path, hub, hf-hub:..., random[:SEED], or an exported .onnx', read_only=True),
    'runtime': Spec('edge runtime: auto (.onnx weights: onnxruntime, else torch), torch or onnxruntime',
                    read_only=True, choices=RUNTIMES),
    'int8': Spec('ONNX Runtime only: quantise the weights to int8 at load (changes the outputs)', read_only=True),
    'device': Spec('torch device (the ONNX Runtime edge runs on the CPU)', read_only=True),
    'num_threads': Spec('CPU threads of the edge runtime (0 = its default)', read_only=True, int_range=(0, 256)),
    'crop_pct': Spec('eval centre-crop ratio (0 = the model\'s)', read_only=True, float_range=(0.0, 1.0)),
    'embedding_source': Spec('final or input patch embeddings', choices=('final', 'input')),
    'gate_metric': Spec('uncertainty metric of the gate', choices=tuple(GATE_METRICS)),
    'eta': Spec('offload when uncertainty >= eta', float_range=(0.0, 1000.0)),
    'method': Spec('patch selection method', choices=METHODS),
    'budget_topic': Spec('BudgetStatus output topic', read_only=True),
    'budget_mode': Spec('auto (bandwidth monitor) or fixed (the budget parameter)', choices=('auto', 'fixed')),
    'budget': Spec('hard budget B, patches per request; setting it switches budget_mode to fixed',
                   int_range=(1, 196)),
    'budget_min': Spec('smallest budget in auto mode', int_range=(1, 196)),
    'budget_max': Spec('largest budget in auto mode', int_range=(1, 196)),
    'budget_safety': Spec('share of the deadline a request may plan to use', float_range=(0.1, 1.0)),
    'probe_interval_s': Spec('probe the link after this long without an answer', float_range=(0.1, 3600.0)),
    'probe_bytes': Spec('payload of the throughput probe', int_range=(64, 1_000_000)),
    'byte_budget': Spec('hard budget, payload bytes per request (0 = off)', int_range=(0, 10_000_000)),
    'prefilter_ratio': Spec('SAGE prefilter ratio k', float_range=(1.0, 196.0)),
    'seed': Spec('seed of the random method', int_range=(0, 2**31 - 1)),
    'delta': Spec('attention_threshold delta', float_range=(0.0, 1.0)),
    'delta_sum': Spec('attention_sum share', float_range=(1e-6, 1.0)),
    'bat_attentive_share': Spec('bat: share of B taken by attention', float_range=(0.0, 1.0)),
    'bat_k': Spec('bat: nearest neighbours of the density estimate', int_range=(1, 195)),
    'codec': Spec('patch codec', choices=ENCODINGS),
    'jpeg_quality': Spec('JPEG quality', int_range=(1, 100)),
    'topk': Spec('edge top-k classes sent with a request', int_range=(1, 1000)),
    'second_round': Spec('patches a second round adds: continue (SAGE), roi (around the cloud\'s attention), off',
                         choices=SECOND_ROUND_MODES),
}


@dataclass
class _Frame:
    rgb_source: Any
    header: Any
    received: float
    """Edge monotonic clock at arrival: every deadline counts from here."""
    source_size: tuple[int, int] | None = None
    """(width, height) of a compressed frame as sent, once decoded: a JPEG is decoded smaller."""


@dataclass
class _Offload:
    """What an offloaded frame needs to get its final result (kept in the link monitor)."""

    result: OffloadResult
    frame: _Frame
    decision: FrameDecision | None = None
    """The edge's view of the frame, for picking a second round's patches."""
    sent: np.ndarray | None = None
    """Patch indices of round 1."""
    first: Any = None
    """The cloud's round-1 answer once it asked for more (STATUS_MORE): the final answer if
    round 2 does not come through."""


def _stamp_s(t: Any) -> float:
    return t.sec + t.nanosec * 1e-9


def _config_problem(p: dict[str, Any]) -> str | None:
    """Why these sage_edge parameters cannot work together, or None."""
    if p['budget_min'] > p['budget_max']:
        return 'budget_min must be <= budget_max'
    if 0 < p['crop_pct'] < 0.5:
        # The frame is resized to input_size / crop_pct before the crop: gigabytes near 0.
        return f'crop_pct {p["crop_pct"]} must be 0 (the model\'s own) or in 0.5..1.0'
    if p['byte_budget']:
        try:
            check_byte_budget(p['byte_budget'], p['codec'], quality=p['jpeg_quality'])
        except SageError as exc:
            return f'byte_budget: {exc}'
    return None


class EdgeNode(Node):
    """The robot side of sage_ros."""

    _unknown_answer_logged = -float('inf')
    """Monotonic clock: when an answer for an id not in flight was last logged."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sage_edge', **kwargs)
        self._running = True
        self._params = declare(self, 'sage_edge', SPECS)
        why = _config_problem(self._params)
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
        zenoh_config = _zenoh_config(p)  # read now: a bad one is one line naming it, before the model loads
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
        self._last_seq: dict[bytes, int] = {}
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
        self._uplink = _Uplink(self, p, reliable, self._on_answer, zenoh_config)
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
        why = _config_problem({**self._params, **{q.name: q.value for q in params}})
        return SetParametersResult(successful=why is None, reason=why or '')

    def _on_params_set(self, params: list[Parameter]) -> None:
        # One new dict, swapped in whole: the worker reads a consistent snapshot per frame.
        self._params = p = {**self._params, **{q.name: q.value for q in params}}
        self._monitor.configure(deadline_s=p['deadline_ms'] / 1e3, budget_min=p['budget_min'],
                                budget_max=p['budget_max'], safety=p['budget_safety'],
                                probe_interval_s=p['probe_interval_s'], probe_bytes=p['probe_bytes'],
                                max_in_flight=p['max_in_flight'])

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
            self._budget_pub.publish(self._budget_status(p, snap))

    def _budget_status(self, p: dict[str, Any], snap: LinkSnapshot) -> BudgetStatus:
        msg = BudgetStatus(budget=self._budget_now(p, snap), mode=p['budget_mode'],
                           suspended=p['budget_mode'] == 'auto' and snap.suspended,
                           throughput_bps=float(snap.throughput_bps), base_rtt_ms=snap.base_rtt_s * 1e3,
                           bytes_per_patch=float(snap.bytes_per_patch), deadline_ms=float(p['deadline_ms']),
                           budget_min=snap.budget_min, budget_max=snap.budget_max, answered=snap.answered,
                           deadline_misses=snap.deadline_misses, probes=snap.probes)
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

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
        auto = p['budget_mode'] == 'auto'
        # The line the uplink logged when it stays useless: the cause, and what to check.
        problem = self._uplink.problem
        if self._uplink.state == 'unanswered':  # "connected", yet nothing ever answered
            level, text = DiagnosticStatus.ERROR, problem or 'requests unanswered'
        elif auto and snap.suspended:
            level, text = DiagnosticStatus.ERROR, 'offloading suspended: even budget_min misses the deadline'
        elif not snap.connected:
            level, text = DiagnosticStatus.WARN, f'no uplink: {self._uplink.state}; frames keep edge labels'
        elif snap.deadline_misses > self._misses_reported:
            level, text = DiagnosticStatus.WARN, 'deadline misses'
        elif auto and snap.budget <= snap.budget_min:
            level, text = DiagnosticStatus.WARN, 'budget at its minimum'
        else:
            level, text = DiagnosticStatus.OK, 'ok'
        self._misses_reported = snap.deadline_misses
        values = {'uplink': self._uplink.state, 'problem': problem, 'budget': self._budget_now(p, snap), 'mode': p['budget_mode'],
                  'in_flight': snap.in_flight, 'max_in_flight': snap.max_in_flight,
                  'queued_bytes': f'{snap.queued_bytes:.0f}',
                  'throughput_kbit_s': f'{snap.throughput_bps * 8 / 1e3:.1f}',
                  'base_rtt_ms': f'{snap.base_rtt_s * 1e3:.1f}', 'edge_ms': f'{snap.edge_s * 1e3:.1f}',
                  'bytes_per_patch': f'{snap.bytes_per_patch:.0f}', 'answered': snap.answered,
                  'deadline_misses': snap.deadline_misses, 'probes': snap.probes, 'suspended': snap.suspended,
                  'second_rounds': snap.second_rounds}
        return DiagnosticStatus(level=level, name=f'{self.get_fully_qualified_name()}: link', message=text,
                                hardware_id=self._robot_id or 'robot',
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    # --- input --------------------------------------------------------------------------
    def _count_gaps(self, info: Any) -> int:
        """Frames of this frame's publisher that never reached us since its previous one."""
        seq = info.get('publication_sequence_number') if isinstance(info, dict) else None
        gid = (info.get('publisher_gid') or {}).get('data') if isinstance(info, dict) else None
        if seq is None or gid is None:
            return 0
        key = bytes(gid)
        last = self._last_seq.get(key)
        self._last_seq[key] = seq
        if last is not None and seq > last + 1:
            self.stats.add('lost', seq - last - 1)
            return seq - last - 1
        return 0

    def _warn_lost_once(self, lost: int, frame_bytes: int, topic: str) -> None:
        """The first time a publisher's frames go missing, say why that usually happens and
        what to do (once: the counter on /diagnostics keeps the count)."""
        if self._lost_warned:
            return
        self._lost_warned = True
        profile = config_path(FASTDDS_PROFILE)
        self.get_logger().warning(
            f'{lost} camera frame(s) from a publisher on {topic} never arrived (this one is '
            f'{frame_bytes / 1e6:.1f} MB; "lost" on /diagnostics counts them). Frames over 512 kB need '
            f'Fast DDS\'s larger shared-memory segment in the camera\'s process too: export '
            f'FASTDDS_DEFAULT_PROFILES_FILE={profile} before starting the camera driver. Frames over 32 MB '
            f'do not fit even then. Or subscribe to the compressed topic instead '
            f'(launch argument camera_transport:=compressed, or compressed_image_topic). Warned once.')

    def _offer(self, frame: _Frame, info: Any, size: int, topic: str) -> None:
        lost = self._count_gaps(info)
        if lost:
            self._warn_lost_once(lost, size, topic)
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
        sent, received, started = (_stamp_s(t) for t in (answer.sent_stamp, answer.received_stamp,
                                                           answer.started_stamp))
        server_s = max(0.0, sent - received)
        compute_s = max(0.0, sent - started) if started > 0 else 0.0
        # Only an answer to a request of ours whose frame still waits is acted on: late ones
        # and ids we never sent only count (a forged answer cannot set a label). Any answer
        # frees its request's window slot at once: a BUSY one (shed, or too late for its
        # deadline, never computed) measures the link but not the server.
        computed = answer.status in (CloudResult.STATUS_OK, CloudResult.STATUS_MORE)
        request = self._monitor.answered(str(answer.request_id), server_s, compute_s, computed=computed)
        if request is None:
            if answer.status != CloudResult.STATUS_PROBE:
                self.stats.add('late_answers')
                self.get_logger().info(f'late or unknown cloud answer for {answer.request_id!r} dropped',
                                       throttle_duration_sec=5.0)
            return
        job: _Offload = request.context
        if answer.status == CloudResult.STATUS_MORE and len(answer.labels) and job.first is None:
            job.first = answer
            why = self._second_round(job, answer)
            if why:
                self._finish_cloud(job, answer, f'no second round: {why}')
            return
        if answer.status != CloudResult.STATUS_OK or not len(answer.labels):
            status = {CloudResult.STATUS_BUSY: 'busy', CloudResult.STATUS_REJECTED: 'rejected'}.get(
                answer.status, 'error')
            self._give_up(job, f'cloud {status}: {answer.detail}'.rstrip(': '))
            return
        self._finish_cloud(job, answer, '')

    def _finish_cloud(self, job: _Offload, answer: Any, detail: str) -> None:
        """The frame's final result from a cloud answer (round 1's or the union's)."""
        result = job.result
        result.source = OffloadResult.SOURCE_CLOUD
        result.label = int(answer.labels[0])
        result.confidence = float(answer.scores[0]) if len(answer.scores) else 0.0
        result.random_weights = result.random_weights or str(answer.server_weights).startswith('random')
        result.rounds = 2 if int(answer.round) == 2 else 1
        result.cloud_uncertainty = float(answer.uncertainty)
        result.detail = detail
        self._publish(result, job.frame)

    def _give_up(self, job: _Offload, why: str) -> None:
        """No usable answer came: round 1's cloud answer if the cloud gave one, else the edge's."""
        if job.first is not None:
            self._finish_cloud(job, job.first, f'second round failed ({why}): round-1 answer')
        else:
            self._fallback(job.result, job.frame, why)

    def _second_round(self, job: _Offload, ask: Any) -> str:
        """Send the patches the cloud asked for; returns why not ('' when sent)."""
        p = self._params
        if p['second_round'] == 'off':
            return 'second_round is off'
        if not self._monitor.connected:
            return 'no uplink'
        decision, sent = job.decision, job.sent
        k = min(int(ask.more_patches), p['budget_max'] - int(sent.size))
        if k <= 0:
            return 'budget_max reached'
        try:
            plan = self._pipeline.plan_second_round(decision, sent, p['second_round'], Budget(k, p['byte_budget']),
                                                    selection_config(p), roi=np.asarray(ask.roi_indices, np.int64))
        except SageError as exc:
            return f'selection failed: {exc}'
        new = plan.indices
        if new.size == 0:
            return 'no patch left to add'
        # Asked for now, so planned now: behind whatever we have sent since round 1.
        if not self._monitor.second_round_fits(arrival=job.frame.received, patches=int(new.size),
                                               tokens=int(sent.size + new.size)):
            return 'it would miss the deadline'
        result = job.result
        msg = self._patch_set(result, job.frame, decision, plan, p)
        msg.round, msg.budget_patches = 2, int(sent.size + new.size)
        data = serialize_message(msg)
        result.patches_sent += int(new.size)
        result.bytes_sent += plan.num_bytes
        result.second_round_patches, result.second_round_bytes = int(new.size), plan.num_bytes
        self._monitor.sent(result.request_id, request_bytes=len(data), patches=int(new.size),
                           payload_bytes=plan.num_bytes, deadline=job.frame.received + p['deadline_ms'] / 1e3,
                           context=job, tokens=int(sent.size + new.size))
        self._deadline_wake.set()
        try:
            self._uplink.send(data)
        except Exception as exc:  # the frame still gets its answer: round 1's
            if self._monitor.cancel(result.request_id) is not None:
                self._give_up(job, f'send failed: {exc}')
        return ''

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
            for request in self._monitor.expire():
                self.stats.add('timeouts')
                self._give_up(request.context, 'timeout')
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
        result = OffloadResult(header=frame.header, request_id=rid,
                               sequence=seq, method=p['method'], random_weights=self._pipeline.card.random_weights,
                               label=decision.label, edge_label=decision.label,
                               confidence=decision.confidence, min_entropy=decision.min_entropy)
        auto = p['budget_mode'] == 'auto'
        result.budget_patches = self._monitor.budget if auto else p['budget']
        if not decision.offload:
            result.source = OffloadResult.SOURCE_EDGE
            self._publish(result, frame)
            return
        admission = self._monitor.admit(arrival=frame.received, fixed_budget=0 if auto else p['budget'])
        if not admission.budget:
            self.stats.add(admission.cause)
            self._fallback(result, frame, admission.reason)
            return
        result.budget_patches = admission.budget
        try:
            plan = self._pipeline.plan(decision, Budget(admission.budget, p['byte_budget']), selection_config(p))
        except SageError as exc:
            self._fallback(result, frame, f'selection failed: {exc}')
            return
        self.stats.add('truncated', plan.truncated_by_method)
        if plan.indices.size == 0:  # a threshold method found no patch worth sending
            self._fallback(result, frame, f'{p["method"]} selected no patch')
            return
        self._publish_debug(rgb, decision.crop_map, plan.indices, frame.header)
        result.patches_sent, result.bytes_sent = int(plan.indices.size), plan.num_bytes
        msg = self._patch_set(result, frame, decision, plan, p)
        msg.round = 1
        if p['second_round'] != 'off':
            # What a second round could add and still meet this frame's deadline: the cloud
            # asks only within it.
            more, took_s = self._monitor.second_round_offer(arrival=frame.received, patches=int(plan.indices.size),
                                                            total_max=p['budget_max'])
            msg.second_round_max, msg.second_round_ms = more, took_s * 1e3
        data = serialize_message(msg)
        self._monitor.sent(result.request_id, request_bytes=len(data), patches=int(plan.indices.size),
                           payload_bytes=plan.num_bytes, deadline=frame.received + p['deadline_ms'] / 1e3,
                           context=_Offload(result, frame, decision, plan.indices))
        self._deadline_wake.set()
        self._publish_provisional(result)
        try:
            self._uplink.send(data)
        except Exception as exc:  # the frame still gets its answer, from the edge
            if self._monitor.cancel(result.request_id) is not None:
                self._fallback(result, frame, f'send failed: {exc}')

    def _patch_set(self, result: OffloadResult, frame: _Frame, decision: FrameDecision, plan: OffloadPlan,
                   p: dict[str, Any]) -> PatchSet:
        cmap: CropMap = decision.crop_map
        card = self._pipeline.card
        # The geometry in the frame the camera sent: a reduced decode keeps its aspect ratio
        # exactly, so only the source size differs (and to_source scales by it).
        source_width, source_height = frame.source_size or (cmap.source_width, cmap.source_height)
        return PatchSet(
            header=frame.header, request_id=result.request_id, robot_id=self._robot_id,
            sequence=result.sequence, sent_stamp=self.get_clock().now().to_msg(),
            source_width=source_width, source_height=source_height,
            resized_width=cmap.resized_width, resized_height=cmap.resized_height,
            crop_x=cmap.crop_x, crop_y=cmap.crop_y, input_size=cmap.input_size,
            patch_size=card.patch_size, grid_rows=card.grid[0], grid_cols=card.grid[1],
            budget_patches=result.budget_patches, budget_bytes=p['byte_budget'], method=p['method'],
            prefilter_ratio=float(p['prefilter_ratio']), indices=plan.indices.astype(np.uint16),
            encoding=plan.encoding, quality=plan.quality, payload=plan.payload,
            edge_model=card.name, edge_weights=card.weights,
            edge_topk_labels=decision.top_labels.astype(np.int32),
            edge_topk_scores=decision.top_scores.astype(np.float32),
            edge_min_entropy=result.min_entropy, eta=float(p['eta']),
            # Both rounds state the frame's deadline: the cloud answers BUSY at once, without
            # computing, a request it could not answer in time.
            deadline_left_ms=(frame.received + p['deadline_ms'] / 1e3 - time.monotonic()) * 1e3,
        )

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

    def _publish_provisional(self, result: OffloadResult) -> None:
        # The edge label while the cloud works, for consumers that act on every frame at once
        # (a controller at camera rate); sage/result keeps exactly one final result per frame.
        if self._provisional_pub is None or self._provisional_pub.get_subscription_count() == 0:
            return
        msg = OffloadResult(header=result.header, request_id=result.request_id, sequence=result.sequence,
                            source=OffloadResult.SOURCE_EDGE, label=result.edge_label,
                            label_name=class_name(result.edge_label), confidence=result.confidence,
                            min_entropy=result.min_entropy, edge_label=result.edge_label,
                            patches_sent=result.patches_sent, bytes_sent=result.bytes_sent,
                            budget_patches=result.budget_patches, method=result.method, detail='provisional',
                            random_weights=result.random_weights)
        self._provisional_pub.publish(msg)

    def _publish_debug(self, rgb: np.ndarray, cmap: CropMap, indices: np.ndarray, header: Any) -> None:
        # Drawing costs a copy of the frame: only while someone looks.
        if self._debug_pub.get_subscription_count() == 0:
            return
        canvas = np.ascontiguousarray(rgb[:, :, ::-1])
        for i in indices.tolist():
            x0, y0, x1, y1 = (int(round(v)) for v in cmap.patch_box(i, self._pipeline.card.patch_size))
            cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 255), 1)
        msg = Image(header=header, **rgb_to_image_fields(canvas[:, :, ::-1], 'bgr8'))
        self._debug_pub.publish(msg)

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
            for request in self._monitor.drain():
                try:
                    self._give_up(request.context, 'shutdown')
                except Exception:  # noqa: BLE001 - rclpy's RCLError: context already shut down
                    break
        if hasattr(self, '_uplink'):
            self._uplink.close()
        super().destroy_node()


def _zenoh_config(p: dict[str, Any]) -> Any:
    """The edge's Zenoh config (zenoh.Config), None for the ros transport; a file that cannot be
    read is a configuration error, said at start in one line naming it."""
    if p['transport'] != 'zenoh':
        return None
    from sage_ros.transport.zenoh_link import load_config

    return load_config(config_path(p['zenoh_config']), connect=p['zenoh_connect'])


class _Uplink:
    """The edge's side of the transport: sending requests, receiving answers, and whether the
    cloud is reachable. Zenoh: the session opens (and reopens) in a background thread, so the
    node never waits on the network. ros: plain topics, reachable while something subscribes."""

    def __init__(self, node: Node, p: dict[str, Any], qos: QoSProfile, on_answer: Callable[[bytes], None],
                 zenoh_config: Any = None) -> None:
        self._node = node
        self._p = p
        self._on_answer = on_answer
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._session: Any = None
        self._channel: Any = None
        self._publisher: Any = None
        self._thread: threading.Thread | None = None
        self.state = 'connecting'
        self.problem = ''
        """While the uplink stays useless for a known cause: the line that said why (/diagnostics)."""
        self._watch: Any = None
        if p['transport'] == 'zenoh':
            from sage_ros.transport.zenoh_link import connect_endpoints, session_identity, topic_to_key

            self._config = zenoh_config
            self._put_key = topic_to_key(node.resolve_topic_name(p['patch_set_topic']))
            self._sub_key = topic_to_key(node.resolve_topic_name(p['cloud_result_topic']))
            self._route = RouteContext(self._put_key, self._sub_key, node.get_namespace().strip('/'),
                                       config_path(p['zenoh_config']), session_identity(zenoh_config),
                                       tuple(connect_endpoints(zenoh_config)))
            # As long as the link monitor keeps an unanswered request in flight.
            self._watch = UplinkWatch(silence_s=max(10.0, 10 * p['deadline_ms'] / 1e3))
        else:
            self._publisher = node.create_publisher(PatchSet, p['patch_set_topic'], qos)
            node.create_subscription(CloudResult, p['cloud_result_topic'], on_answer, qos, raw=True)

    def start(self) -> None:
        if self._publisher is None:
            self._thread = threading.Thread(target=self._open, name='sage_edge_uplink', daemon=True)
            self._thread.start()

    def _open(self) -> None:
        import zenoh

        from sage_ros.transport.zenoh_link import ZenohChannel

        log = self._node.get_logger()
        self._say_unresolvable()
        while not self._closed.is_set():
            try:
                # Blocks until a router answers (the shipped config retries for ever).
                session = zenoh.open(self._config)
            except Exception as exc:  # zenoh.ZError: no router within the config's timeout
                self.state = 'no router'
                log.warning(f'uplink: {exc}; retrying', throttle_duration_sec=30.0)
                self._closed.wait(1.0)
                continue
            channel = ZenohChannel(session, self._put_key, self._sub_key, lambda _k, data: self._heard(data))
            with self._lock:
                if self._closed.is_set():
                    channel.close()
                    session.close()
                    return
                self._session, self._channel = session, channel
            log.info(f'Zenoh: requests on {self._put_key!r}, answers from {self._sub_key!r}')
            return

    def _say_unresolvable(self) -> None:
        """An endpoint whose host does not resolve: zenoh.open would retry it for ever in silence."""
        from sage_ros.transport.zenoh_link import unresolvable

        for endpoint in self._route.endpoints:
            host = unresolvable(endpoint)
            if host is not None:
                self.problem = unresolved_line(host, endpoint, self._route)
                self._node.get_logger().warning(self.problem)
                self._watch.said(NO_ROUTER)  # and not again as 'no router reached'

    def _heard(self, data: bytes) -> None:
        """Anything on our answer key: the route works (whatever the answer turns out to be)."""
        if self._watch.answered():
            self.problem = ''
            self._node.get_logger().info('uplink: answers from the cloud arrive now')
        self._on_answer(data)

    def _watch_state(self, state: str) -> None:
        """Say once, in one line, why the uplink stays useless (uplink_watch.UplinkWatch)."""
        trouble = self._watch.update(state)
        if trouble is not None:
            self.problem = problem_line(trouble, self._route)
            log = self._node.get_logger()
            (log.error if trouble.cause == UNANSWERED else log.warning)(self.problem)
        elif not self._watch.cause:
            self.problem = ''
        if self._watch.cause == UNANSWERED:
            self.state = 'unanswered'

    def connected(self) -> bool:
        """Is the cloud reachable now? Zenoh: the session has a router (it reconnects by itself
        after a router restart) and a cloud subscribes to our requests. ros: something
        subscribes to the requests."""
        if self._publisher is not None:
            ok = self._publisher.get_subscription_count() > 0
            self.state = 'connected' if ok else 'no subscriber'
            return ok
        with self._lock:
            session, channel = self._session, self._channel
        if session is None:
            self._watch_state(self.state)
            return False
        try:
            routed = bool(list(session.info.routers_zid()) or list(session.info.peers_zid()))
            served = routed and channel.has_subscribers()
        except Exception:  # noqa: BLE001 - a session closing under us: not connected
            routed = served = False
        # A router without a cloud behind it would swallow our requests: the same as no uplink.
        self.state = 'connected' if served else ('no cloud' if routed else 'router lost')
        self._watch_state(self.state)
        return served

    def send(self, data: bytes) -> None:
        if self._publisher is not None:
            self._publisher.publish(data)  # serialized bytes are published as they are
            return
        with self._lock:
            channel = self._channel
        if channel is None:
            raise RuntimeError('no uplink')
        channel.put(data)
        self._watch.sent()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._session.close()
            self._session = self._channel = None


def main(args: list[str] | None = None) -> None:
    run_node(EdgeNode, args)


if __name__ == '__main__':
    main()
