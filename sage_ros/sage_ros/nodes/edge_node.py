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
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rclpy.serialization import deserialize_message, serialize_message
from sage_ros_msgs.msg import CloudResult, OffloadResult, PatchSet
from sensor_msgs.msg import CompressedImage, Image

from sage_ros.core import (
    Budget,
    SageError,
    edge_forward,
    gate_score,
    load_vit,
    normalize,
    plan_offload,
    resize_crop,
    should_offload,
)
from sage_ros.core.codec import ENCODINGS
from sage_ros.core.gate import GATE_METRICS
from sage_ros.core.labels import class_name
from sage_ros.core.preprocess import CropMap
from sage_ros.core.selection import METHODS
from sage_ros.nodes.diagnostics import CounterDiagnostics
from sage_ros.nodes.parameters import Spec, declare, validator
from sage_ros.nodes.runner import run_node
from sage_ros.params import config_path, selection_config
from sage_ros.ros_image import compressed_to_rgb, image_to_rgb, rgb_to_image_fields

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
    'model': Spec('timm edge model', read_only=True),
    'weights': Spec('checkpoint path, hub, hf-hub:..., or random[:SEED]', read_only=True),
    'device': Spec('torch device', read_only=True),
    'num_threads': Spec('torch CPU threads (0 = default)', read_only=True, int_range=(0, 256)),
    'crop_pct': Spec('eval centre-crop ratio (0 = the model\'s)', read_only=True, float_range=(0.0, 1.0)),
    'embedding_source': Spec('final or input patch embeddings', choices=('final', 'input')),
    'gate_metric': Spec('uncertainty metric of the gate', choices=tuple(GATE_METRICS)),
    'eta': Spec('offload when uncertainty >= eta', float_range=(0.0, 1000.0)),
    'method': Spec('patch selection method', choices=METHODS),
    'budget': Spec('hard budget B, patches per request', int_range=(1, 196)),
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
        self.add_post_set_parameters_callback(self._on_params_set)
        p = self._params
        self._vit = load_vit(p['model'], p['weights'], device=p['device'], num_threads=p['num_threads'])
        self._crop_pct = p['crop_pct'] or self._vit.crop_pct
        if self._vit.random_weights:
            self.get_logger().warning(f'edge model {p["model"]} runs with RANDOM weights ({self._vit.weights}): '
                                      'labels are meaningless')
        self._robot_id = p['robot_id'] or self.get_namespace().strip('/')
        self._boot = secrets.token_hex(2)
        self._seq = itertools.count()
        # dropped: replaced by a newer frame while busy; lost: never reached the node (gaps in
        # the publishers' sequence numbers: the shallow camera queue overflowed, or the network).
        self.stats = dict.fromkeys(('received', 'dropped', 'lost', 'rejected', 'processed', 'edge', 'cloud',
                                    'fallback', 'late_answers', 'bad_answers', 'truncated'), 0)
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

        CounterDiagnostics(self, lambda: self.stats, hardware_id=self._robot_id or 'robot',
                           warn_on=('dropped', 'lost', 'rejected', 'fallback', 'bad_answers'))
        self._slot: _Frame | None = None
        self._slot_cv = threading.Condition()
        self._running = True
        self._worker = threading.Thread(target=self._work, name='sage_edge_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(
            f'ready: {p["model"]} ({self._vit.weights}), gate {p["gate_metric"]} >= {p["eta"]}, '
            f'{p["method"]} B={p["budget"]}, codec {p["codec"]}, transport {p["transport"]}')

    # --- parameters -------------------------------------------------------------------------
    def _on_params_set(self, params: list[Parameter]) -> None:
        # One new dict, swapped in whole: the worker reads a consistent snapshot per frame.
        self._params = {**self._params, **{q.name: q.value for q in params}}

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
            answer = deserialize_message(data, CloudResult)
        except Exception as exc:  # rclpy raises several types on bad CDR
            self.stats['bad_answers'] += 1
            self.get_logger().warning(f'malformed cloud answer ({len(data)} B): {exc}', throttle_duration_sec=5.0)
            return
        with self._lock:
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
        result = OffloadResult(header=frame.header, request_id=request_id, sequence=seq,
                               method=p['method'], budget_patches=p['budget'],
                               random_weights=self._vit.random_weights)
        try:
            crop, cmap = resize_crop(rgb, input_size=self._vit.input_size, crop_pct=self._crop_pct,
                                     interpolation=self._vit.interpolation)
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
        try:
            plan = plan_offload(crop, edge, Budget(p['budget'], p['byte_budget']), selection_config(p))
        except SageError as exc:
            self._fallback(result, frame, f'selection failed: {exc}')
            return
        self.stats['truncated'] += plan.truncated_by_method
        self._publish_debug(rgb, cmap, plan.indices, frame.header)
        request = self._request(result, frame, cmap, plan, edge, top, conf, p)
        result.patches_sent, result.bytes_sent = int(plan.indices.size), plan.num_bytes
        pending = _Pending(threading.Event())
        with self._lock:
            self._pending[request_id] = pending
        try:
            self._send(serialize_message(request))
            remaining = p['deadline_ms'] / 1e3 - (time.monotonic() - frame.received)
            pending.event.wait(max(0.0, remaining))
        except Exception as exc:  # transport errors fall back; the frame still gets its answer
            self.get_logger().warning(f'send failed for {request_id}: {exc}', throttle_duration_sec=5.0)
        finally:
            with self._lock:
                self._pending.pop(request_id, None)
        answer = pending.answer
        if answer is None:
            self._fallback(result, frame, 'timeout')
        elif answer.status != CloudResult.STATUS_OK or not len(answer.labels):
            status = {CloudResult.STATUS_BUSY: 'busy', CloudResult.STATUS_REJECTED: 'rejected'}.get(
                answer.status, 'error')
            self._fallback(result, frame, f'cloud {status}: {answer.detail}'.rstrip(': '))
        else:
            result.source = OffloadResult.SOURCE_CLOUD
            result.label = int(answer.labels[0])
            result.confidence = float(answer.scores[0]) if len(answer.scores) else 0.0
            result.random_weights = result.random_weights or answer.server_weights.startswith('random')
            self._publish(result, frame)

    def _request(self, result, frame, cmap: CropMap, plan, edge, top, conf, p) -> PatchSet:
        now = self.get_clock().now().to_msg()
        return PatchSet(
            header=frame.header, request_id=result.request_id, robot_id=self._robot_id,
            sequence=result.sequence, sent_stamp=now,
            source_width=cmap.source_width, source_height=cmap.source_height,
            resized_width=cmap.resized_width, resized_height=cmap.resized_height,
            crop_x=cmap.crop_x, crop_y=cmap.crop_y, input_size=cmap.input_size,
            patch_size=self._vit.patch_size, grid_rows=self._vit.grid[0], grid_cols=self._vit.grid[1],
            budget_patches=p['budget'], budget_bytes=p['byte_budget'], method=p['method'],
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
