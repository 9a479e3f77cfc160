# SPDX-License-Identifier: Apache-2.0
"""sage_cloud: classify the patches robots send, with the server model on those tokens only.

Over Zenoh one cloud node serves every robot: it subscribes ``**/<patch_set_topic>`` and
answers each request on the same robot prefix + ``<cloud_result_topic>``. Every request is
validated before its payload is touched; anything malformed is rejected, counted and logged
(rate-limited), and the node keeps serving. Requests wait in a bounded queue: when it is
full the oldest is answered BUSY so its robot falls back at once.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sage_ros_msgs.msg import CloudResult, PatchSet

from sage_ros.core import decode_patches, load_vit
from sage_ros.core.offload import classify_decoded
from sage_ros.core.labels import class_name
from sage_ros.core.request import RequestError, RequestLimits, check_request
from sage_ros.nodes.diagnostics import CounterDiagnostics
from sage_ros.nodes.parameters import Spec, declare, validator
from sage_ros.nodes.runner import run_node
from sage_ros.params import config_path
from sage_ros.typestore import typestore

PATCH_SET_TYPE = 'sage_ros_msgs/msg/PatchSet'

SPECS = {
    'transport': Spec('zenoh or ros', read_only=True, choices=('zenoh', 'ros')),
    'patch_set_topic': Spec('PatchSet request topic / Zenoh key suffix', read_only=True),
    'cloud_result_topic': Spec('CloudResult answer topic / Zenoh key suffix', read_only=True),
    'zenoh_config': Spec('Zenoh json5 config file', read_only=True),
    'zenoh_connect': Spec('Zenoh connect endpoints overriding the file (comma-separated)', read_only=True),
    'max_queue': Spec('requests waiting at most; the oldest is shed BUSY', int_range=(1, 10_000)),
    'model': Spec('timm server model', read_only=True),
    'weights': Spec('checkpoint path, hub, hf-hub:..., or random[:SEED]', read_only=True),
    'device': Spec('torch device', read_only=True),
    'num_threads': Spec('torch CPU threads (0 = default)', read_only=True, int_range=(0, 256)),
    'max_budget': Spec('largest request accepted, patches', int_range=(1, 196)),
    'max_payload_bytes': Spec('largest payload accepted, bytes', int_range=(1, 100_000_000)),
    'topk': Spec('classes in each answer', int_range=(1, 1000)),
}
# CDR framing and the non-payload fields of a PatchSet stay well under this.
_ENVELOPE_BYTES = 64 * 1024


class RejectedRequest(RequestError):
    """A request refused by :func:`decode_request`; ``request`` is the parsed message when the
    failure came after parsing (so the robot can be told), else None."""

    def __init__(self, why: str, request: Any = None) -> None:
        super().__init__(why)
        self.request = request


def decode_request(data: bytes, limits: RequestLimits) -> tuple[Any, np.ndarray, np.ndarray]:
    """Bytes off the wire to (message, indices, decoded patches), or :class:`RejectedRequest`.

    Order matters for hostile input: the size is checked before parsing, the CDR parser checks
    every length against the buffer before allocating, and the request is validated before
    its payload is decoded, whose image header is checked before its pixels.
    """
    if len(data) > limits.max_payload_bytes + _ENVELOPE_BYTES:
        raise RejectedRequest(f'message of {len(data)} B exceeds the limit')
    # Untrusted bytes are parsed by rosbags' pure-Python CDR reader, not rclpy's C type
    # support: fuzzing found inputs (e.g. invalid UTF-8 in a string) that crash the latter.
    try:
        msg = typestore().deserialize_cdr(data, PATCH_SET_TYPE)
    except Exception as exc:  # rosbags raises several types on bad CDR; all mean malformed
        raise RejectedRequest(f'malformed CDR: {type(exc).__name__}: {exc}') from None
    if msg.method == PatchSet.METHOD_PROBE:
        return msg, np.empty(0, np.int64), np.empty((0, 16, 16, 3), np.uint8)
    indices = np.asarray(msg.indices, dtype=np.int64).reshape(-1)
    try:
        check_request(indices=indices.tolist(), budget_patches=msg.budget_patches, encoding=msg.encoding,
                      payload_len=len(msg.payload), patch_size=msg.patch_size, grid_rows=msg.grid_rows,
                      grid_cols=msg.grid_cols, input_size=msg.input_size, limits=limits)
        payload = np.asarray(msg.payload, np.uint8).tobytes()
        patches = decode_patches(payload, msg.encoding, int(indices.size), patch=limits.patch_size)
    except (RequestError, ValueError) as exc:  # CodecError is a ValueError
        raise RejectedRequest(str(exc), msg) from None
    return msg, indices, patches


@dataclass
class _Request:
    data: bytes
    reply: Callable[[bytes], None]
    received_ns: int
    started_ns: int = 0
    """When the worker took it off the queue (0 while queued)."""


class CloudNode(Node):
    """The cloud side of sage_ros."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sage_cloud', **kwargs)
        self._params = declare(self, 'sage_cloud', SPECS)
        self.add_on_set_parameters_callback(validator(SPECS))
        self.add_post_set_parameters_callback(
            lambda ps: setattr(self, '_params', {**self._params, **{q.name: q.value for q in ps}}))
        p = self._params
        self._vit = load_vit(p['model'], p['weights'], device=p['device'], num_threads=p['num_threads'])
        if self._vit.random_weights:
            self.get_logger().warning(f'server model {p["model"]} runs with RANDOM weights ({self._vit.weights}): '
                                      'labels are meaningless')
        # Class table and one forward now, not inside the first request's deadline.
        class_name(0)
        classify_decoded(self._vit, np.zeros((64, self._vit.patch_size, self._vit.patch_size, 3), np.uint8),
                         np.arange(64))
        self.stats = dict.fromkeys(('received', 'answered', 'rejected', 'shed', 'errors', 'probes'), 0)
        self._queue: collections.deque[_Request] = collections.deque()
        self._cv = threading.Condition()
        self._zenoh = None
        if p['transport'] == 'zenoh':
            from sage_ros.transport.zenoh_link import open_session, reply_key

            self._zenoh = open_session(config_path(p['zenoh_config']), connect=p['zenoh_connect'])
            req_suffix, res_suffix = p['patch_set_topic'].strip('/'), p['cloud_result_topic'].strip('/')
            session = self._zenoh

            def on_sample(sample: Any) -> None:
                key = str(sample.key_expr)
                try:
                    answer_key = reply_key(key, req_suffix, res_suffix)
                except ValueError:
                    return
                self._enqueue(sample.payload.to_bytes(), lambda data: session.put(answer_key, data))

            self._sub = session.declare_subscriber(f'**/{req_suffix}', on_sample)
            self.get_logger().info(f'Zenoh: serving **/{req_suffix}, answering on <robot>/{res_suffix}')
        else:
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            pub = self.create_publisher(CloudResult, p['cloud_result_topic'], reliable)
            self.create_subscription(PatchSet, p['patch_set_topic'],
                                     lambda data: self._enqueue(data, pub.publish), reliable, raw=True)
        CounterDiagnostics(self, lambda: {**self.stats, 'queued': len(self._queue)}, hardware_id='cloud',
                           warn_on=('rejected', 'shed', 'errors'))
        self._running = True
        self._worker = threading.Thread(target=self._work, name='sage_cloud_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(f'ready: {p["model"]} ({self._vit.weights}), max budget {p["max_budget"]}')

    def _limits(self) -> RequestLimits:
        p = self._params
        rows, cols = self._vit.grid
        return RequestLimits(rows, cols, self._vit.patch_size, self._vit.input_size,
                             p['max_budget'], p['max_payload_bytes'])

    # --- intake ---------------------------------------------------------------------------
    def _enqueue(self, data: bytes, reply: Callable[[bytes], None]) -> None:
        shed = None
        with self._cv:
            self.stats['received'] += 1
            self._queue.append(_Request(bytes(data), reply, time.time_ns()))
            if len(self._queue) > self._params['max_queue']:
                shed = self._queue.popleft()
            self._cv.notify()
        if shed is not None:
            self.stats['shed'] += 1
            self._answer_status(shed, CloudResult.STATUS_BUSY, 'overloaded')

    def _work(self) -> None:
        while self._running:
            with self._cv:
                if not self._queue:
                    self._cv.wait(timeout=0.2)
                    continue
                req = self._queue.popleft()
            req.started_ns = time.time_ns()
            try:
                self._handle(req)
            except Exception as exc:  # the node outlives any single request
                self.stats['errors'] += 1
                self.get_logger().error(f'request failed: {exc}', throttle_duration_sec=5.0)

    # --- one request ------------------------------------------------------------------------
    def _reject(self, req: _Request, why: str, msg: Any = None) -> None:
        self.stats['rejected'] += 1
        rid = msg.request_id if msg is not None else '?'
        self.get_logger().warning(f'rejected request {rid} ({len(req.data)} B): {why}', throttle_duration_sec=2.0)
        if msg is not None:
            self._answer_status(req, CloudResult.STATUS_REJECTED, why, msg)

    def _handle(self, req: _Request) -> None:
        p = self._params
        try:
            msg, indices, patches = decode_request(req.data, self._limits())
        except RejectedRequest as exc:
            self._reject(req, str(exc), exc.request)
            return
        if msg.method == PatchSet.METHOD_PROBE:
            # Link probes measure the robot's uplink: answer at once, no model.
            self.stats['probes'] += 1
            self._send(req, self._answer(req, msg, CloudResult.STATUS_PROBE, 'probe'))
            return
        t0 = time.perf_counter()
        probs = classify_decoded(self._vit, patches, indices)
        server_ms = (time.perf_counter() - t0) * 1e3
        top = np.argsort(-probs, kind='stable')[: p['topk']]
        answer = self._answer(req, msg, CloudResult.STATUS_OK, '')
        answer.labels = top.astype(np.int32)
        answer.label_names = [class_name(int(i)) for i in top]
        answer.scores = probs[top].astype(np.float32)
        answer.patches_received = int(indices.size)
        answer.bytes_received = len(msg.payload)
        self._send(req, answer)
        self.stats['answered'] += 1
        self.get_logger().debug(f'{msg.request_id}: {indices.size} patches, {server_ms:.0f} ms')

    def _answer(self, req: _Request, msg: Any, status: int, detail: str) -> CloudResult:
        answer = CloudResult(status=status, detail=detail, server_model=self._vit.name,
                             server_weights=self._vit.weights)
        if msg is not None:
            # msg is rosbags' parse of untrusted bytes: copy its fields, typed, into our answer.
            answer.header.stamp.sec = int(msg.header.stamp.sec)
            answer.header.stamp.nanosec = int(msg.header.stamp.nanosec)
            answer.header.frame_id = str(msg.header.frame_id)
            answer.request_id, answer.robot_id = str(msg.request_id), str(msg.robot_id)
        answer.received_stamp.sec, answer.received_stamp.nanosec = divmod(req.received_ns, 10**9)
        answer.started_stamp.sec, answer.started_stamp.nanosec = divmod(req.started_ns or req.received_ns, 10**9)
        return answer

    def _answer_status(self, req: _Request, status: int, detail: str, msg: Any = None) -> None:
        if msg is None:
            try:
                msg = typestore().deserialize_cdr(req.data, PATCH_SET_TYPE)
            except Exception:
                return  # no request id to answer to
        self._send(req, self._answer(req, msg, status, detail))

    def _send(self, req: _Request, answer: CloudResult) -> None:
        answer.sent_stamp.sec, answer.sent_stamp.nanosec = divmod(time.time_ns(), 10**9)
        try:
            req.reply(serialize_message(answer))
        except Exception as exc:
            self.stats['errors'] += 1
            self.get_logger().warning(f'answer to {answer.request_id} not sent: {exc}', throttle_duration_sec=5.0)

    def destroy_node(self) -> None:
        # Also called on a node whose __init__ failed part way: tear down what exists.
        self._running = False
        if hasattr(self, '_cv'):
            with self._cv:
                self._cv.notify_all()
        if hasattr(self, '_worker'):
            self._worker.join(timeout=1.5)
        if getattr(self, '_zenoh', None) is not None:
            if hasattr(self, '_sub'):
                self._sub.undeclare()
            self._zenoh.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(CloudNode, args)


if __name__ == '__main__':
    main()
