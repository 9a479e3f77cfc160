# SPDX-License-Identifier: Apache-2.0
"""sage_cloud: classify the patches robots send, with the server model on those tokens only.

Over Zenoh one cloud node serves every robot: it subscribes ``**/<patch_set_topic>`` and
answers each request on the same robot prefix + ``<cloud_result_topic>``. The robot is the
key's prefix (what the router's ACL vouches for), never a field of the untrusted payload.

A request the server is unsure about (its own uncertainty at or above ``eta_cloud``) may
take a second round: the answer asks for more patches (STATUS_MORE, with the round-1 answer)
and the round-1 tokens wait, bounded, for the robot's round 2; the union is classified.

Intake only reads a request's head (its id, size and deadline) and queues it: each robot has a
bounded queue of its own, and the server's time is shared between robots by tokens
(:mod:`sage_ros.core.scheduler`), so a robot that floods sheds its own requests (answered BUSY)
and the others keep their share. A request whose answer could not come before the deadline its
robot stated is answered BUSY at once, never computed. A worker takes batches of up to
``max_batch`` requests, validates and decodes each, runs the server model on the batch, and
answers every request exactly once.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from rclpy.serialization import serialize_message
from sage_ros_msgs.msg import CloudResult, PatchSet

from sage_ros.core.gate import GATE_METRICS, gate_score
from sage_ros.core.labels import class_name
from sage_ros.core.offload import size_groups
from sage_ros.core.request import RequestLimits
from sage_ros.core.rounds import RoundOneStore, cloud_roi
from sage_ros.core.scheduler import LATE, Dropped, FairScheduler
from sage_ros.nodes.diagnostics import CounterDiagnostics, Counters
from sage_ros.nodes.parameters import Spec, declare, validator
from sage_ros.nodes.runner import run_node
from sage_ros.params import config_path
from sage_ros.core.preflight import check_device, check_weights
from sage_ros.serving import LocalBackend, ServerBackend
from sage_ros.transport.wire import PATCH_SET_TYPE, RejectedRequest, decode_request
from sage_ros.transport.typestore import typestore

__all__ = ['CloudNode', 'RejectedRequest', 'decode_request', 'main']

SPECS = {
    'transport': Spec('zenoh or ros', read_only=True, choices=('zenoh', 'ros')),
    'patch_set_topic': Spec('PatchSet request topic / Zenoh key suffix', read_only=True),
    'cloud_result_topic': Spec('CloudResult answer topic / Zenoh key suffix', read_only=True),
    'zenoh_config': Spec('Zenoh json5 config file', read_only=True),
    'zenoh_connect': Spec('Zenoh connect endpoints overriding the file (comma-separated)', read_only=True),
    'max_queue': Spec('requests waiting at most, all robots; the longest queue sheds BUSY', int_range=(1, 10_000)),
    'max_queue_per_robot': Spec('requests one robot may have waiting; its oldest is shed BUSY',
                                int_range=(1, 10_000)),
    'robot_idle_s': Spec('a robot\'s share state is forgotten after this long with nothing queued, s',
                         float_range=(0.1, 86_400.0)),
    'max_robots': Spec('robots whose share state is kept at most; the longest idle is forgotten first',
                       int_range=(1, 1_000_000)),
    'max_batch': Spec('requests per server forward at most', int_range=(1, 1024)),
    'precision': Spec('server model arithmetic: fp32, or fp16/bf16 autocast (GPUs)', read_only=True,
                      choices=('fp32', 'fp16', 'bf16')),
    'backend': Spec('where the server model runs: local (this process) or ray (Ray Serve)', read_only=True,
                    choices=('local', 'ray')),
    'ray_address': Spec('Ray cluster ("" = start one here, "auto" = the local head)', read_only=True),
    'ray_replicas': Spec('Serve replicas of the server model', read_only=True, int_range=(1, 1024)),
    'ray_autoscaling': Spec('Serve autoscaling_config as JSON ("" = fixed ray_replicas)', read_only=True),
    'ray_replica_cpus': Spec('CPUs Ray reserves per replica', read_only=True, float_range=(0.0, 1024.0)),
    'batch_wait_ms': Spec('wait for a fuller batch at most, ms', float_range=(0.0, 1000.0)),
    'model': Spec('timm server model', read_only=True),
    'weights': Spec('checkpoint path, hub, hf-hub:..., or random[:SEED]', read_only=True),
    'device': Spec('torch device', read_only=True),
    'num_threads': Spec('torch CPU threads (0 = default)', read_only=True, int_range=(0, 256)),
    'max_budget': Spec('largest request accepted, patches', int_range=(1, 196)),
    'max_payload_bytes': Spec('largest payload accepted, bytes', int_range=(1, 100_000_000)),
    'topk': Spec('classes in each answer', int_range=(1, 1000)),
    'gate_metric': Spec('uncertainty metric of the cloud\'s own answer', choices=tuple(GATE_METRICS)),
    'eta_cloud': Spec('ask for a second round when the uncertainty >= eta_cloud', float_range=(0.0, 1000.0)),
    'second_round_k': Spec('patches a second round asks for (0 = never ask)', int_range=(0, 196)),
    'roi_count': Spec('most attended patches named in a request for more', int_range=(1, 196)),
    'round_one_max': Spec('requests whose round-1 tokens are kept at most', int_range=(1, 100_000)),
    'round_one_ttl_s': Spec('round-1 tokens kept at most this long, s', float_range=(0.01, 600.0)),
}


@dataclass
class _Request:
    robot: str
    """The sender, from the key the router vouches for (never from the payload)."""
    data: bytes
    reply: Callable[[bytes], None]
    received_ns: int
    head: Any = None
    """The parsed message, for its id, size and deadline (None: unparseable, the worker rejects it)."""
    tokens: int = 1
    """Tokens the server model classifies for it (its patches, round 1's for a round 2, and CLS)."""
    deadline: float = math.inf
    """Monotonic clock: when its answer is of no more use to its robot (inf: none stated)."""
    started_ns: int = 0
    """When the worker took it off the queue (0 while queued)."""


def _zenoh_config(p: dict[str, Any]) -> Any:
    """The cloud's Zenoh config; ValueError when a connect endpoint's host resolves to nothing:
    zenoh.open would wait for it for ever without a word, and the cloud would never be ready."""
    from sage_ros.transport.zenoh_link import connect_endpoints, load_config, unresolvable

    conf = load_config(config_path(p['zenoh_config']), connect=p['zenoh_connect'])
    for endpoint in connect_endpoints(conf):
        host = unresolvable(endpoint)
        if host is not None:
            raise ValueError(f'cannot resolve {host!r} of Zenoh endpoint {endpoint} (Zenoh config '
                             f'{p["zenoh_config"]}, or zenoh_connect)')
    return conf


class CloudNode(Node):
    """The cloud side of sage_ros."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sage_cloud', **kwargs)
        self._params = declare(self, 'sage_cloud', SPECS)
        self.add_on_set_parameters_callback(validator(SPECS))
        self.add_post_set_parameters_callback(self._on_params_set)
        p = self._params
        # Before the model loads: a config that cannot work is refused in one line, not after 20 s.
        zenoh_conf = _zenoh_config(p) if p['transport'] == 'zenoh' else None
        self._backend: ServerBackend = self._new_backend(p)
        if self._backend.random_weights:
            self.get_logger().warning(f'server model {p["model"]} runs with RANDOM weights '
                                      f'({self._backend.weights}): labels are meaningless')
        self._limits = self._request_limits()
        class_name(0)  # the class table now, not inside the first request's deadline
        # shed: answered BUSY for room; late: answered BUSY because the answer would come after
        # the deadline its robot stated (never computed). more_asked: round-1 answers asking for a
        # second round; second_rounds: unions answered; second_round_rejected: round-2 requests
        # refused (unknown or expired for that robot, bad indices), also counted in rejected.
        self.stats = Counters(('received', 'answered', 'rejected', 'shed', 'late', 'errors', 'probes', 'batches',
                               'more_asked', 'second_rounds', 'second_round_rejected'))
        self._round_one = RoundOneStore(p['round_one_max'], p['round_one_ttl_s'])
        self._scheduler: FairScheduler[_Request] = FairScheduler(
            max_queue=p['max_queue'], per_robot=p['max_queue_per_robot'], idle_s=p['robot_idle_s'],
            max_robots=p['max_robots'])
        self._running = True
        self._zenoh = None
        if p['transport'] == 'zenoh':
            import zenoh

            from sage_ros.transport.zenoh_link import reply_key, robot_of

            self._zenoh = zenoh.open(zenoh_conf)
            req_suffix, res_suffix = p['patch_set_topic'].strip('/'), p['cloud_result_topic'].strip('/')
            session = self._zenoh

            def on_sample(sample: Any) -> None:
                key = str(sample.key_expr)
                try:
                    answer_key = reply_key(key, req_suffix, res_suffix)
                except ValueError:
                    return
                self._enqueue(robot_of(key, req_suffix), sample.payload.to_bytes(),
                              lambda data: session.put(answer_key, data))

            self._sub = session.declare_subscriber(f'**/{req_suffix}', on_sample)
            self.get_logger().info(f'Zenoh: serving **/{req_suffix}, answering on <robot>/{res_suffix}')
        else:
            reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            pub = self.create_publisher(CloudResult, p['cloud_result_topic'], reliable)
            robot = self.get_namespace().strip('/')
            self.create_subscription(PatchSet, p['patch_set_topic'],
                                     lambda data: self._enqueue(robot, data, pub.publish), reliable, raw=True)
        CounterDiagnostics(self, lambda: {**self.stats.snapshot(), 'queued': len(self._scheduler),
                                          'round_one_kept': len(self._round_one),
                                          'round_one_evicted': self._round_one.evicted},
                           hardware_id='cloud', warn_on=('rejected', 'shed', 'late', 'errors'),
                           extra=self._robots_status)
        self._worker = threading.Thread(target=self._work, name='sage_cloud_worker', daemon=True)
        self._worker.start()
        self.get_logger().info(f'ready: {p["model"]} ({self._backend.weights}), max budget {p["max_budget"]}, '
                               f'batches of up to {p["max_batch"]}')

    @staticmethod
    def _new_backend(p: dict[str, Any]) -> ServerBackend:
        if p['backend'] == 'ray':
            from sage_ros.serving.ray_backend import RayBackend

            return RayBackend(p['model'], p['weights'], address=p['ray_address'], replicas=p['ray_replicas'],
                              autoscaling=p['ray_autoscaling'], replica_cpus=p['ray_replica_cpus'],
                              device=p['device'], num_threads=p['num_threads'], precision=p['precision'],
                              max_batch=p['max_batch'],
                              batch_wait_ms=p['batch_wait_ms'])
        # Before the model loads: a GPU that is not there is one line, not torch's traceback.
        # (Ray replicas run on other hosts, which check their own device.)
        check_device('sage_cloud device', p['device'])
        check_weights('sage_cloud weights', p['weights'])
        return LocalBackend(p['model'], p['weights'], device=p['device'], num_threads=p['num_threads'],
                            precision=p['precision'])

    def _on_params_set(self, params: list[Any]) -> None:
        self._params = p = {**self._params, **{q.name: q.value for q in params}}
        self._limits = self._request_limits()
        self._scheduler.configure(max_queue=p['max_queue'], per_robot=p['max_queue_per_robot'],
                                  idle_s=p['robot_idle_s'], max_robots=p['max_robots'])
        self._round_one.configure(max_entries=p['round_one_max'], ttl_s=p['round_one_ttl_s'])

    def _request_limits(self) -> RequestLimits:
        p = self._params
        # The model's own geometry, also when it runs in Ray replicas (they report it).
        rows, cols, patch, size = self._backend.geometry
        return RequestLimits(rows, cols, patch, size, p['max_budget'], p['max_payload_bytes'])

    def _robots_status(self) -> DiagnosticStatus:
        """The fleet in a few lines, whatever its size: totals, and the robots most shed and
        busiest since the last report (a snapshot: intake goes on meanwhile)."""
        f = self._scheduler.summary()

        def top(robots: list[tuple[str, int]]) -> str:
            return ', '.join(f'{robot or "(none)"} {n}' for robot, n in robots) or '-'

        values = {'robots': f.tracked, 'robots_waiting': f.active, 'robots_seen': f.seen,
                  'robots_forgotten': f.forgotten, 'queued': f.queued, 'served': f.served, 'shed': f.shed,
                  'late': f.late, 'server_ms_per_token': f'{f.s_per_token * 1e3:.3f}',
                  'most_shed': top(f.most_shed), 'busiest': top(f.busiest)}
        return DiagnosticStatus(level=DiagnosticStatus.OK, name=f'{self.get_fully_qualified_name()}: robots',
                                message='some robots over their share' if f.most_shed else 'ok',
                                hardware_id='cloud', values=[KeyValue(key=k, value=str(v)) for k, v in values.items()])

    # --- intake ---------------------------------------------------------------------------
    def _enqueue(self, robot: str, data: bytes, reply: Callable[[bytes], None]) -> None:
        self.stats.add('received')
        req = _Request(robot, bytes(data), reply, time.time_ns())
        self._read_head(req)
        for dropped in self._scheduler.offer(robot, req, cost=req.tokens, deadline=req.deadline):
            self._answer_dropped(dropped)

    def _read_head(self, req: _Request) -> None:
        """What scheduling needs: the message parsed (not validated, the payload not decoded;
        rosbags checks every length against the buffer), its tokens and its deadline."""
        try:
            msg = typestore().deserialize_cdr(req.data, PATCH_SET_TYPE)
        except Exception:  # noqa: BLE001 - malformed: queued as it is, and the worker says why
            return
        req.head = msg
        if msg.method == PatchSet.METHOD_PROBE:
            return
        cap = self._params['max_budget']
        kept = self._round_one.kept_tokens(str(msg.request_id), req.robot) if int(msg.round) == 2 else 0
        req.tokens = min(len(msg.indices), cap) + min(kept, cap) + 1
        left_ms = float(msg.deadline_left_ms)
        # 0: no deadline stated (an edge that predates it); negative: already past.
        if math.isfinite(left_ms) and left_ms != 0.0:
            req.deadline = time.monotonic() + left_ms / 1e3

    def _answer_dropped(self, dropped: Dropped[_Request]) -> None:
        req = dropped.item
        late = dropped.reason == LATE
        self.stats.add('late' if late else 'shed')
        if req.head is not None:  # unparseable: there is nobody to answer
            self._send(req, self._answer(req, req.head, CloudResult.STATUS_BUSY,
                                         'late: the answer would come after the deadline' if late else 'overloaded'))

    def _work(self) -> None:
        while self._running:
            p = self._params
            taken = self._scheduler.take(p['max_batch'], wait_s=p['batch_wait_ms'] / 1e3)
            for dropped in taken.dropped:
                self._answer_dropped(dropped)
            if not taken.items:
                continue
            t0 = time.monotonic()
            tokens = 0
            try:
                tokens = self._handle([req for _, req in taken.items])
            except Exception as exc:  # the node outlives any batch; every request still gets its answer
                self.stats.add('errors', len(taken.items))
                self.get_logger().error(f'batch failed: {exc}', throttle_duration_sec=5.0)
                for _, req in taken.items:
                    if req.head is not None:
                        self._send(req, self._answer(req, req.head, CloudResult.STATUS_ERROR, f'server error: {exc}'))
            # The server's seconds per token: how the scheduler tells which requests can still
            # be answered in time.
            self._scheduler.served(tokens, time.monotonic() - t0)

    # --- one batch --------------------------------------------------------------------------
    def _reject(self, req: _Request, why: str, msg: Any = None) -> None:
        self.stats.add('rejected')
        if msg is not None and int(msg.round) == 2:
            self.stats.add('second_round_rejected')
        rid = msg.request_id if msg is not None else '?'
        self.get_logger().warning(f'rejected request {rid} ({len(req.data)} B): {why}', throttle_duration_sec=2.0)
        if msg is not None:
            self._send(req, self._answer(req, msg, CloudResult.STATUS_REJECTED, why))

    def _handle(self, reqs: list[_Request]) -> int:
        """Answer each of ``reqs``; returns the tokens the server model classified."""
        now = time.time_ns()
        valid: list[tuple[_Request, Any, np.ndarray, np.ndarray]] = []
        for req in reqs:
            req.started_ns = now
            try:
                msg, indices, patches = decode_request(req.data, self._limits)
            except RejectedRequest as exc:
                self._reject(req, str(exc), exc.request)
                continue
            if msg.method == PatchSet.METHOD_PROBE:
                # Link probes measure the robot's uplink: answer at once, no model.
                self.stats.add('probes')
                self._send(req, self._answer(req, msg, CloudResult.STATUS_PROBE, 'probe'))
                continue
            if int(msg.round) == 2:
                # The union with round 1's tokens, kept for the robot that sent round 1 only.
                state, why = self._round_one.take(str(msg.request_id), req.robot, indices)
                if state is None:
                    self._reject(req, why, msg)
                    continue
                indices = np.concatenate([state.indices, indices])
                patches = np.concatenate([state.patches, patches])
            elif int(msg.round) > 2:
                self._reject(req, f'round {msg.round}: only rounds 1 and 2 exist', msg)
                continue
            valid.append((req, msg, indices, patches))
        # One forward per group of similar sizes, smallest first, each answered at once: a
        # small request never waits for, or pays the padding of, a big one in its batch.
        tokens = 0
        for group in size_groups([int(v[2].size) for v in valid]):
            # Each group's turn is known now: a request it would answer after its deadline is
            # answered BUSY instead, and not computed.
            done = time.monotonic() + self._scheduler.predict_s(sum(int(valid[i][2].size) + 1 for i in group))
            ready = []
            for i in group:
                if valid[i][0].deadline < done:
                    self._answer_dropped(Dropped(valid[i][0].robot, valid[i][0], LATE))
                else:
                    ready.append(valid[i])
            if ready:
                self._serve(ready)
                tokens += sum(int(v[2].size) + 1 for v in ready)
        return tokens

    def _serve(self, valid: list[tuple[_Request, Any, np.ndarray, np.ndarray]]) -> None:
        p = self._params
        probs, attention = self._backend.classify_attended([(patches, indices) for _, _, indices, patches in valid])
        self.stats.add('batches')
        for (req, msg, indices, patches), row, att in zip(valid, probs, attention):
            if not np.isfinite(row).all():  # the backend lost it (a Ray replica died twice)
                self.stats.add('errors')
                self._send(req, self._answer(req, msg, CloudResult.STATUS_ERROR, 'server model unavailable'))
                continue
            top = np.argsort(-row, kind='stable')[: p['topk']]
            uncertainty = gate_score(row, p['gate_metric'])
            more, keep_s = self._more_patches(req, msg, indices, uncertainty)
            answer = self._answer(req, msg, CloudResult.STATUS_MORE if more else CloudResult.STATUS_OK, '')
            answer.labels = top.astype(np.int32)
            answer.label_names = [class_name(int(i)) for i in top]
            answer.scores = row[top].astype(np.float32)
            answer.patches_received = int(indices.size)
            answer.bytes_received = len(msg.payload)
            answer.round = 2 if int(msg.round) == 2 else 1
            answer.uncertainty = float(uncertainty)
            if more:
                answer.more_patches = more
                answer.roi_indices = cloud_roi(att, indices, p['roi_count']).astype(np.uint16)
                self._round_one.put(str(msg.request_id), req.robot, patches, indices, more, ttl_s=keep_s)
                self.stats.add('more_asked')
            elif answer.round == 2:
                self.stats.add('second_rounds')
            self._send(req, answer)
            self.stats.add('answered')

    def _more_patches(self, req: _Request, msg: Any, indices: np.ndarray, uncertainty: float) -> tuple[int, float]:
        """(patches to ask for in a second round, seconds to keep round 1's tokens); (0, 0.0) =
        answer now. Only round 1 of a request that offers one, when unsure, and when the
        deadline the robot stated leaves time."""
        p = self._params
        if int(msg.round) == 2 or p['second_round_k'] == 0 or uncertainty < p['eta_cloud']:
            return 0, 0.0
        more = min(p['second_round_k'], int(msg.second_round_max), p['max_budget'] - int(indices.size))
        left_ms = float(msg.deadline_left_ms) - (time.time_ns() - req.received_ns) / 1e6
        # Round 2 arrives about second_round_ms from now: within the robot's deadline, and
        # while its round-1 tokens are still kept.
        took_ms = float(msg.second_round_ms)
        if more <= 0 or took_ms > left_ms or took_ms > p['round_one_ttl_s'] * 1e3:
            return 0, 0.0
        # Kept until round 2 comes or the robot's deadline passes, whichever is first.
        return more, max(0.01, left_ms / 1e3)

    def _answer(self, req: _Request, msg: Any, status: int, detail: str) -> CloudResult:
        answer = CloudResult(status=status, detail=detail, server_model=self._backend.name,
                             server_weights=self._backend.weights)
        # msg is rosbags' parse of untrusted bytes: copy its fields, typed, into our answer.
        answer.header.stamp.sec = int(msg.header.stamp.sec)
        answer.header.stamp.nanosec = int(msg.header.stamp.nanosec)
        answer.header.frame_id = str(msg.header.frame_id)
        answer.request_id, answer.robot_id = str(msg.request_id), str(msg.robot_id)
        answer.received_stamp.sec, answer.received_stamp.nanosec = divmod(req.received_ns, 10**9)
        answer.started_stamp.sec, answer.started_stamp.nanosec = divmod(req.started_ns or req.received_ns, 10**9)
        return answer

    def _send(self, req: _Request, answer: CloudResult) -> None:
        answer.sent_stamp.sec, answer.sent_stamp.nanosec = divmod(time.time_ns(), 10**9)
        try:
            req.reply(serialize_message(answer))
        except Exception as exc:
            self.stats.add('errors')
            self.get_logger().warning(f'answer to {answer.request_id} not sent: {exc}', throttle_duration_sec=5.0)

    def destroy_node(self) -> None:
        # Also called on a node whose __init__ failed part way: tear down what exists.
        self._running = False
        if hasattr(self, '_scheduler'):
            self._scheduler.close()
        if hasattr(self, '_worker'):
            self._worker.join(timeout=1.5)
        if getattr(self, '_zenoh', None) is not None:
            if hasattr(self, '_sub'):
                self._sub.undeclare()
            self._zenoh.close()
        if hasattr(self, '_backend'):
            self._backend.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    run_node(CloudNode, args)


if __name__ == '__main__':
    main()
