# SPDX-License-Identifier: Apache-2.0
"""sage_edge: classify camera frames on the robot, offload the uncertain ones within budget.

Every processed frame gets exactly one OffloadResult: from the edge (confident), from the
cloud, or the edge's own label as a fallback when no usable answer arrives by the deadline.
Frames that arrive while a frame is being processed replace each other: only the newest
waits, the others are counted as dropped, so the node never works on stale frames.
"""

from __future__ import annotations

import itertools
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import serialize_message
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from sage_ros_msgs.msg import BudgetStatus, CloudResult, OffloadResult, PatchSet
from sensor_msgs.msg import CompressedImage, Image

from sage_ros.core import (
    Budget,
    SageError,
    edge_forward,
    gate_score,
    load_vit,
    normalize,
    plan_offload,
    should_offload,
)
from sage_ros.core.codec import ENCODINGS
from sage_ros.core.gate import GATE_METRICS
from sage_ros.core.link import BudgetController, UplinkMonitor
from sage_ros.core.labels import class_name
from sage_ros.core.preprocess import CropMap
from sage_ros.core.selection import METHODS
from sage_ros.nodes.diagnostics import CounterDiagnostics
from sage_ros.nodes.parameters import Spec, declare, validator
from sage_ros.nodes.runner import run_node
from sage_ros.params import config_path, selection_config
from sage_ros.ros_image import compressed_to_rgb, image_to_rgb, rgb_to_image_fields
from sage_ros.typestore import typestore

SPECS = {
    'image_topic': Spec('camera sensor_msgs/Image topic', read_only=True),
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
    'max_frame_age_s': Spec('skip frames stamped longer ago than this (0 = off)', float_range=(0.0, 1e9)),
    'model': Spec('timm edge model', read_only=True),
    'weights': Spec('checkpoint path, hub, hf-hub:..., or random[:SEED]', read_only=True),
    'device': Spec('torch device', read_only=True),
    'num_threads': Spec('torch CPU threads (0 = default)', read_only=True, int_range=(0, 256)),
    'crop_pct': Spec('eval centre-crop ratio (0 = the model\'s)', read_only=True, float_range=(0.0, 1.0)),
    'embedding_source': Spec('final or input patch embeddings', choices=('final', 'input')),
    'gate_metric': Spec('uncertainty metric of the gate', choices=tuple(GATE_METRICS)),
    'eta': Spec('offload when uncertainty >= eta', float_range=(0.0, 1000.0)),
    'method': Spec('patch selection method', choices=METHODS),
    'budget_topic': Spec('BudgetStatus output topic', read_only=True),
    'budget_mode': Spec('auto (bandwidth monitor) or fixed (the budget parameter)', choices=('auto', 'fixed')),
    'budget': Spec('hard budget B, patches per request (fixed mode)', int_range=(1, 196)),
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
    'codec': Spec('patch codec', choices=ENCODINGS),
    'jpeg_quality': Spec('JPEG quality', int_range=(1, 100)),
    'topk': Spec('edge top-k classes sent with a request', int_range=(1, 1000)),
}


@dataclass
class _Frame:
    rgb_source: Any
    header: Any
    received: float


@dataclass
class _Pending:
    event: threading.Event
    answer: Any = None


class EdgeNode(Node):
    """The robot side of sage_ros."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sage_edge', **kwargs)
        self._params = declare(self, 'sage_edge', SPECS)
        self.add_on_set_parameters_callback(validator(SPECS))
        self.add_on_set_parameters_callback(self._check_budget_bounds)
        self.add_post_set_parameters_callback(self._on_params_set)
        p = self._params
        self._vit = load_vit(p['model'], p['weights'], device=p['device'], num_threads=p['num_threads'])
        if self._vit.random_weights:
            self.get_logger().warning(f'edge model {p["model"]} runs with RANDOM weights ({self._vit.weights}): '
                                      'labels are meaningless')
        # Load the class table and run one forward now, not inside the first frame's deadline
        # (the first pass through torch is several times slower than the next ones).
        class_name(0)
        edge_forward(self._vit, torch.zeros(1, 3, self._vit.input_size, self._vit.input_size))
        self._robot_id = p['robot_id'] or self.get_namespace().strip('/')
        self._boot = secrets.token_hex(2)
        self._seq = itertools.count()
        # dropped: replaced by a newer frame while busy; lost: never reached the node (gaps in
        # the publishers' sequence numbers: the shallow camera queue overflowed, or the network).
        self.stats = dict.fromkeys(('received', 'dropped', 'lost', 'rejected', 'stale', 'processed', 'edge', 'cloud',
                                    'fallback', 'suspended', 'late_answers', 'bad_answers', 'truncated'), 0)
        self._misses_reported = 0
        self._last_seq: dict[bytes, int] = {}

        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._result_pub = self.create_publisher(OffloadResult, p['result_topic'], reliable)
        self._debug_pub = self.create_publisher(Image, p['debug_image_topic'], 1)
        camera_qos = QoSProfile(depth=2, reliability=qos_profile_sensor_data.reliability,
                                durability=qos_profile_sensor_data.durability,
                                history=qos_profile_sensor_data.history)
        self.create_subscription(Image, p['image_topic'], self._on_image, camera_qos)
        if p['compressed_image_topic']:
            self.create_subscription(CompressedImage, p['compressed_image_topic'], self._on_compressed, camera_qos)

        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._zenoh = None
        if p['transport'] == 'zenoh':
            from sage_ros.transport.zenoh_link import ZenohChannel, open_session, topic_to_key

            self._zenoh = open_session(config_path(p['zenoh_config']), connect=p['zenoh_connect'])
            put_key = topic_to_key(self.resolve_topic_name(p['patch_set_topic']))
            sub_key = topic_to_key(self.resolve_topic_name(p['cloud_result_topic']))
            self._channel = ZenohChannel(self._zenoh, put_key, sub_key, lambda _k, data: self._on_answer(data))
            self._send = self._channel.put
            self.get_logger().info(f'Zenoh: requests on {put_key!r}, answers from {sub_key!r}')
        else:
            req_pub = self.create_publisher(PatchSet, p['patch_set_topic'], reliable)
            self._send = req_pub.publish  # serialized bytes are published as they are
            self.create_subscription(CloudResult, p['cloud_result_topic'], self._on_answer, reliable, raw=True)

        self._monitor = self._new_monitor(p)
        self._budget_pub = self.create_publisher(BudgetStatus, p['budget_topic'], reliable)
        self._last_budget_state: tuple = ()
        self.create_timer(0.25, self._tick_link)
        CounterDiagnostics(self, lambda: self.stats, hardware_id=self._robot_id or 'robot',
                           warn_on=('dropped', 'lost', 'rejected', 'stale', 'fallback', 'bad_answers'),
                           extra=self._link_status)
        self._slot: _Frame | None = None
        self._slot_cv = threading.Condition()
        self._running = True
        self._worker = threading.Thread(target=self._work, name='sage_edge_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'ready: {p["model"]} ({self._vit.weights}), gate {p["gate_metric"]} >= {p["eta"]}, '
            f'{p["method"]} B={p["budget"] if p["budget_mode"] == "fixed" else "auto"}, codec {p["codec"]}, '
            f'transport {p["transport"]}')

    # --- parameters -------------------------------------------------------------------------
    def _check_budget_bounds(self, params: list[Parameter]) -> SetParametersResult:
        new = {**self._params, **{q.name: q.value for q in params}}
        if new['budget_min'] > new['budget_max']:
            return SetParametersResult(successful=False, reason='budget_min must be <= budget_max')
        return SetParametersResult(successful=True)

    def _on_params_set(self, params: list[Parameter]) -> None:
        # One new dict, swapped in whole: the worker reads a consistent snapshot per frame.
        self._params = {**self._params, **{q.name: q.value for q in params}}
        link_params = {'deadline_ms', 'budget_min', 'budget_max', 'budget_safety', 'probe_interval_s', 'probe_bytes'}
        if link_params & {q.name for q in params}:
            c, p = self._monitor.controller, self._params
            c.deadline_s, c.budget_min, c.budget_max = p['deadline_ms'] / 1e3, p['budget_min'], p['budget_max']
            c.safety = p['budget_safety']
            c.budget = min(max(c.budget, c.budget_min), c.budget_max)
            self._monitor.probe_interval_s, self._monitor.probe_bytes = p['probe_interval_s'], p['probe_bytes']

    @staticmethod
    def _new_monitor(p: dict[str, Any]) -> UplinkMonitor:
        controller = BudgetController(deadline_s=p['deadline_ms'] / 1e3, budget_min=p['budget_min'],
                                      budget_max=p['budget_max'], safety=p['budget_safety'])
        return UplinkMonitor(controller, probe_interval_s=p['probe_interval_s'], probe_bytes=p['probe_bytes'])

    # --- link -------------------------------------------------------------------------------
    def _budget_now(self, p: dict[str, Any]) -> int:
        """Budget for this frame: the monitor's in auto mode (0 = suspended), else the parameter."""
        return self._monitor.budget if p['budget_mode'] == 'auto' else p['budget']

    def _tick_link(self) -> None:
        p = self._params
        if p['budget_mode'] == 'auto':
            size = self._monitor.probe_due()
            if size:
                self._send_probe(size)
        m, c = self._monitor, self._monitor.controller
        state = (self._budget_now(p), p['budget_mode'], c.suspended, round(m.link.throughput_bps, -2),
                 m.deadline_misses)
        if state != self._last_budget_state:
            self._last_budget_state = state
            self._budget_pub.publish(self._budget_status(p))

    def _budget_status(self, p: dict[str, Any]) -> BudgetStatus:
        m, c = self._monitor, self._monitor.controller
        msg = BudgetStatus(budget=self._budget_now(p), mode=p['budget_mode'],
                           suspended=p['budget_mode'] == 'auto' and c.suspended,
                           throughput_bps=float(m.link.throughput_bps), base_rtt_ms=m.link.base_rtt_s * 1e3,
                           bytes_per_patch=float(c.bytes_per_patch), deadline_ms=float(p['deadline_ms']),
                           budget_min=c.budget_min, budget_max=c.budget_max, answered=m.answered_count,
                           deadline_misses=m.deadline_misses, probes=m.probes)
        msg.header.stamp = self.get_clock().now().to_msg()
        return msg

    def _send_probe(self, size: int) -> None:
        rid = f'{self._robot_id or "robot"}/{self._boot}-probe{self._monitor.probes}'
        probe = PatchSet(request_id=rid, robot_id=self._robot_id, method=PatchSet.METHOD_PROBE, encoding='raw',
                         payload=bytes(size))
        data = serialize_message(probe)
        self._monitor.sent(rid, request_bytes=len(data), patches=0, payload_bytes=size)
        try:
            self._send(data)
        except Exception as exc:
            self.get_logger().warning(f'probe not sent: {exc}', throttle_duration_sec=5.0)

    def _link_status(self) -> DiagnosticStatus:
        p = self._params
        m, c = self._monitor, self._monitor.controller
        if p['budget_mode'] == 'auto' and c.suspended:
            level, text = DiagnosticStatus.ERROR, 'offloading suspended: even budget_min misses the deadline'
        elif m.deadline_misses > self._misses_reported or (p['budget_mode'] == 'auto' and c.budget <= c.budget_min):
            level, text = DiagnosticStatus.WARN, 'deadline misses' if m.deadline_misses > self._misses_reported \
                else 'budget at its minimum'
        else:
            level, text = DiagnosticStatus.OK, 'ok'
        self._misses_reported = m.deadline_misses
        values = {'budget': self._budget_now(p), 'mode': p['budget_mode'], 'throughput_kbit_s':
                  f'{m.link.throughput_bps * 8 / 1e3:.1f}', 'base_rtt_ms': f'{m.link.base_rtt_s * 1e3:.1f}',
                  'bytes_per_patch': f'{c.bytes_per_patch:.0f}', 'answered': m.answered_count,
                  'deadline_misses': m.deadline_misses, 'probes': m.probes, 'suspended': c.suspended}
        return DiagnosticStatus(level=level, name=f'{self.get_fully_qualified_name()}: link', message=text,
                                hardware_id=self._robot_id or 'robot',
                                values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    # --- input --------------------------------------------------------------------------
    def _count_gaps(self, info: Any) -> None:
        seq = info.get('publication_sequence_number') if isinstance(info, dict) else None
        gid = (info.get('publisher_gid') or {}).get('data') if isinstance(info, dict) else None
        if seq is None or gid is None:
            return
        key = bytes(gid)
        last = self._last_seq.get(key)
        if last is not None and seq > last + 1:
            self.stats['lost'] += seq - last - 1
        self._last_seq[key] = seq

    def _offer(self, frame: _Frame, info: Any) -> None:
        self._count_gaps(info)
        with self._slot_cv:
            self.stats['received'] += 1
            if self._slot is not None:
                self.stats['dropped'] += 1
            self._slot = frame
            self._slot_cv.notify()

    def _on_image(self, msg: Image, info: Any) -> None:
        self._offer(_Frame(msg, msg.header, time.monotonic()), info)

    def _on_compressed(self, msg: CompressedImage, info: Any) -> None:
        self._offer(_Frame(msg, msg.header, time.monotonic()), info)

    def _on_answer(self, data: bytes) -> None:
        try:
            # Network bytes go through rosbags' pure-Python CDR reader: rclpy's C type support
            # can crash on hostile input (found by fuzzing the cloud's side).
            answer = typestore().deserialize_cdr(bytes(data), 'sage_ros_msgs/msg/CloudResult')
        except Exception as exc:  # rosbags raises several types on bad CDR
            self.stats['bad_answers'] += 1
            self.get_logger().warning(f'malformed cloud answer ({len(data)} B): {exc}', throttle_duration_sec=5.0)
            return
        server_s = max(0.0, (answer.sent_stamp.sec - answer.received_stamp.sec)
                       + (answer.sent_stamp.nanosec - answer.received_stamp.nanosec) / 1e9)
        with self._lock:
            self._monitor.answered(answer.request_id, server_s)
            if answer.status == CloudResult.STATUS_PROBE:
                return
            pending = self._pending.get(answer.request_id)
            if pending is not None:
                pending.answer = answer
                pending.event.set()
                return
            self.stats['late_answers'] += 1
        self.get_logger().info(f'late or unknown cloud answer for {answer.request_id!r} dropped',
                               throttle_duration_sec=5.0)

    # --- work ---------------------------------------------------------------------------
    def _work(self) -> None:
        while self._running:
            with self._slot_cv:
                if self._slot is None:
                    self._slot_cv.wait(timeout=0.2)
                frame, self._slot = self._slot, None
            if frame is not None:
                self._process(frame)

    def _process(self, frame: _Frame) -> None:
        p = self._params
        if p['max_frame_age_s'] > 0:
            stamp = frame.header.stamp.sec + frame.header.stamp.nanosec * 1e-9
            age = self.get_clock().now().nanoseconds * 1e-9 - stamp
            if age > p['max_frame_age_s']:
                self.stats['stale'] += 1
                self.get_logger().warning(f'frame skipped: stamped {age:.1f} s ago', throttle_duration_sec=5.0)
                return
        try:
            src = frame.rgb_source
            rgb = compressed_to_rgb(src) if isinstance(src, CompressedImage) else image_to_rgb(src)
        except (SageError, ValueError) as exc:
            self.stats['rejected'] += 1
            self.get_logger().warning(f'frame skipped: {exc}', throttle_duration_sec=5.0)
            return
        self.stats['processed'] += 1
        seq = next(self._seq)
        request_id = f'{self._robot_id or "robot"}/{self._boot}-{seq}'
        budget = self._budget_now(p)
        result = OffloadResult(header=frame.header, request_id=request_id, sequence=seq,
                               method=p['method'], budget_patches=budget,
                               random_weights=self._vit.random_weights)
        try:
            crop, cmap = self._vit.crop(rgb, p['crop_pct'])
            edge = edge_forward(self._vit, normalize(crop, self._vit.mean, self._vit.std),
                                embedding_source=p['embedding_source'])[0]
        except Exception as exc:  # a frame must never take the node down
            self.stats['rejected'] += 1
            self.get_logger().error(f'edge model failed on frame {request_id}: {exc}')
            return
        top, conf = edge.topk(p['topk'])
        score = gate_score(edge.probs, p['gate_metric'])
        result.label = result.edge_label = int(top[0])
        result.confidence = float(conf[0])
        result.min_entropy = float(gate_score(edge.probs, 'min_entropy'))
        if not should_offload(score, p['eta']):
            result.source = OffloadResult.SOURCE_EDGE
            self._publish(result, frame)
            return
        if budget == 0:
            self.stats['suspended'] += 1
            self._fallback(result, frame, 'link too slow: offloading suspended')
            return
        try:
            plan = plan_offload(crop, edge, Budget(budget, p['byte_budget']), selection_config(p))
        except SageError as exc:
            self._fallback(result, frame, f'selection failed: {exc}')
            return
        self.stats['truncated'] += plan.truncated_by_method
        self._publish_debug(rgb, cmap, plan.indices, frame.header)
        request = self._request(result, frame, cmap, plan, edge, top, conf, p, budget)
        result.patches_sent, result.bytes_sent = int(plan.indices.size), plan.num_bytes
        pending = _Pending(threading.Event())
        with self._lock:
            self._pending[request_id] = pending
        try:
            data = serialize_message(request)
            with self._lock:
                self._monitor.sent(request_id, request_bytes=len(data), patches=int(plan.indices.size),
                                   payload_bytes=plan.num_bytes, edge_s=time.monotonic() - frame.received)
            self._send(data)
            remaining = p['deadline_ms'] / 1e3 - (time.monotonic() - frame.received)
            pending.event.wait(max(0.0, remaining))
        except Exception as exc:  # transport errors fall back; the frame still gets its answer
            self.get_logger().warning(f'send failed for {request_id}: {exc}', throttle_duration_sec=5.0)
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        answer = pending.answer
        if answer is None:
            with self._lock:
                self._monitor.missed(request_id)
            self._fallback(result, frame, 'timeout')
        elif answer.status != CloudResult.STATUS_OK or not len(answer.labels):
            status = {CloudResult.STATUS_BUSY: 'busy', CloudResult.STATUS_REJECTED: 'rejected'}.get(
                answer.status, 'error')
            self._fallback(result, frame, f'cloud {status}: {answer.detail}'.rstrip(': '))
        else:
            result.source = OffloadResult.SOURCE_CLOUD
            result.label = int(answer.labels[0])
            result.confidence = float(answer.scores[0]) if len(answer.scores) else 0.0
            result.random_weights = result.random_weights or str(answer.server_weights).startswith('random')
            self._publish(result, frame)

    def _request(self, result, frame, cmap: CropMap, plan, edge, top, conf, p, budget: int) -> PatchSet:
        now = self.get_clock().now().to_msg()
        return PatchSet(
            header=frame.header, request_id=result.request_id, robot_id=self._robot_id,
            sequence=result.sequence, sent_stamp=now,
            source_width=cmap.source_width, source_height=cmap.source_height,
            resized_width=cmap.resized_width, resized_height=cmap.resized_height,
            crop_x=cmap.crop_x, crop_y=cmap.crop_y, input_size=cmap.input_size,
            patch_size=self._vit.patch_size, grid_rows=self._vit.grid[0], grid_cols=self._vit.grid[1],
            budget_patches=budget, budget_bytes=p['byte_budget'], method=p['method'],
            prefilter_ratio=float(p['prefilter_ratio']), indices=plan.indices.astype(np.uint16),
            encoding=plan.encoding, quality=plan.quality, payload=plan.payload,
            edge_model=self._vit.name, edge_weights=self._vit.weights,
            edge_topk_labels=top.astype(np.int32), edge_topk_scores=conf.astype(np.float32),
            edge_min_entropy=result.min_entropy, eta=float(p['eta']),
        )

    def _fallback(self, result: OffloadResult, frame: _Frame, why: str) -> None:
        result.source = OffloadResult.SOURCE_EDGE_FALLBACK
        result.detail = why
        self._publish(result, frame)

    def _publish(self, result: OffloadResult, frame: _Frame) -> None:
        result.label_name = class_name(result.label)
        result.latency_ms = (time.monotonic() - frame.received) * 1e3
        key = {OffloadResult.SOURCE_EDGE: 'edge', OffloadResult.SOURCE_CLOUD: 'cloud'}.get(result.source, 'fallback')
        self.stats[key] += 1
        self._result_pub.publish(result)

    def _publish_debug(self, rgb: np.ndarray, cmap: CropMap, indices: np.ndarray, header: Any) -> None:
        # Drawing costs a copy of the frame: only while someone looks.
        if self._debug_pub.get_subscription_count() == 0:
            return
        canvas = np.ascontiguousarray(rgb[:, :, ::-1])
        for i in indices.tolist():
            x0, y0, x1, y1 = (int(round(v)) for v in cmap.patch_box(i, self._vit.patch_size))
            cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (0, 255, 255), 1)
        msg = Image(header=header, **rgb_to_image_fields(canvas[:, :, ::-1], 'bgr8'))
        self._debug_pub.publish(msg)

    def destroy_node(self) -> None:
        self._running = False
        with self._slot_cv:
            self._slot_cv.notify_all()
        self._worker.join(timeout=5.0)
        if self._zenoh is not None:
            self._channel.close()
            self._zenoh.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(EdgeNode, args)


if __name__ == '__main__':
    main()
