# SPDX-License-Identifier: Apache-2.0
"""The cloud serving a fleet: fairness under a flood, many robots, many robot keys, batching.

``sage-ros bench --fleet`` runs these on this machine with real processes (router and cloud
from ``sage-ros up``'s plan) and prints the figures; nothing here is asserted (the mechanisms
are tested deterministically in test_fleet.py and test_scheduler.py):

- **fairness** (:func:`flood_fairness`): the cloud's capacity for maximum-size requests (196
  raw patches) is measured first; then one robot floods such requests at ``flood_factor``
  times that capacity while a real edge node at ``calm_fps`` offloads every frame; the share of
  the calm robot's frames the cloud answered, and their latency;
- **scale** (:func:`fleet_scale`): ``N`` virtual robots x 1 request/s each (real B=32 requests
  that state a deadline): each robot's share answered in time (minimum against median),
  answers per second and the cloud's CPU, for each ``N``;
- **prefixes** (:func:`many_prefixes`): a load of 50 robots, then bursts of 10,000 robot keys
  with one request each, then the same load: its share before and after, the cloud's memory
  (RSS) and whether it survived;
- **batching** (:func:`batching`): ``robots`` virtual robots each keep one request of
  ``budget`` patches in flight, for each ``max_batch``; answers per second.
"""

from __future__ import annotations

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from sage_ros.commands.bringup import isolate_dds
from sage_ros.commands.images import list_images, read_rgb

FLEET_SERVER = 'deit_tiny_patch16_224'
"""The server model of the scale and prefixes runs unless overridden (as in the issue's figures)."""


def real_requests(images: list[np.ndarray], robot: str, budget: int, *, codec: str = 'jpeg') -> list[Any]:
    """PatchSets of real frames as an edge would send them (SAGE, ``budget`` patches)."""
    from sage_ros_msgs.msg import PatchSet

    from sage_ros.core import Budget, SelectionConfig, load_vit
    from sage_ros.core.pipeline import EdgePipeline, GateConfig

    pipeline = EdgePipeline(load_vit('deit_tiny_patch16_224', 'random:0'))
    out = []
    for rgb in images:
        d = pipeline.analyze(rgb, GateConfig())
        plan = pipeline.plan(d, Budget(budget), SelectionConfig(encoding=codec, quality=90))
        out.append(PatchSet(robot_id=robot, input_size=224, patch_size=16, grid_rows=14, grid_cols=14,
                            budget_patches=budget, method='sage', indices=plan.indices.astype(np.uint16),
                            encoding=plan.encoding, quality=plan.quality, payload=plan.payload))
    return out


def _zenoh(endpoint: str) -> Any:
    import zenoh

    return zenoh.open(zenoh.Config.from_json5(
        f'{{mode: "client", connect: {{endpoints: ["{endpoint}"]}}, scouting: {{multicast: {{enabled: false}}}}, '
        'transport: {shared_memory: {enabled: false}}}'))


def _images(images_dir: Path, n: int) -> list[np.ndarray]:
    items = list_images(images_dir)
    return [read_rgb(i.path) for i in items[:: max(1, len(items) // n)][:n]]


def _rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (0 if it is gone)."""
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cloud_pid(bring: Any) -> int:
    return next(p.popen.pid for p in bring.procs if p.name == 'cloud')


def _with_fleet_server(overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``overrides``, with the fleet runs' server model unless the caller chose one."""
    ov = dict(overrides or {})
    if 'model' not in ov and 'sage_cloud.model' not in ov:
        ov['sage_cloud.model'] = FLEET_SERVER
    return ov


def flood_fairness(images_dir: Path, *, seconds: float = 20.0, flood_factor: float = 5.0, calibrate_s: float = 6.0,
                   calm_fps: float = 2.0, calm_budget: int = 32, overrides: dict[str, Any] | None = None,
                   log: TextIO | None = None, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Robot 'flood' puts maximum-size requests (196 raw patches) at ``flood_factor`` times the
    cloud's capacity for them, measured first in the same run; robot 'calm', a real edge node
    at ``calm_fps``, offloads every frame at B=``calm_budget``. Returns the figures."""
    isolate_dds()
    import rclpy
    from rclpy.serialization import deserialize_message, serialize_message
    from sage_ros_msgs.msg import CloudResult, OffloadResult

    from sage_ros.commands.bringup import Bringup, plan
    from sage_ros.ros.live_client import LiveClient
    from sage_ros.commands.system_demo import free_port

    endpoint = f'tcp/127.0.0.1:{free_port()}'
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'budget_mode': 'fixed',
          'budget': calm_budget, 'eta': 0.0, **(overrides or {})}
    images = _images(images_dir, 8)
    flood = real_requests(images[:2], 'flood', 196, codec='raw')
    bring = Bringup(plan('cloud', overrides=ov) + plan('edge', namespace='calm', overrides=ov), log=log)
    context = rclpy.Context()
    rclpy.init(context=context)
    stop = threading.Event()
    counts = {'put': 0, 'ok': 0, 'busy': 0}
    answered = threading.Semaphore(0)
    server = ['?']
    client = session = None
    try:
        bring.start()
        bring.wait_ready(timeout=240)
        client = LiveClient(image_topic='/calm/camera/image_raw', result_topic='/calm/sage/result',
                            name='fleet_calm', context=context)
        if not client.wait_for_edge():
            raise RuntimeError('the calm robot did not come up')
        session = _zenoh(endpoint)

        def on_answer(sample: Any) -> None:
            a = deserialize_message(sample.payload.to_bytes(), CloudResult)
            server[0] = a.server_model or server[0]
            counts['ok' if a.status == CloudResult.STATUS_OK else 'busy'] += 1
            answered.release()

        sub = session.declare_subscriber('flood/sage/cloud_result', on_answer)
        sent = [0]

        def put() -> None:
            msg = flood[sent[0] % len(flood)]
            msg.request_id = f'flood/{sent[0]}'
            session.put('flood/sage/patch_set', serialize_message(msg))
            sent[0] += 1

        # The cloud's capacity for these requests: the flood robot alone, two requests out (one
        # computed while the next waits), after one answer as warm-up.
        put()
        put()
        if not answered.acquire(timeout=240):
            raise RuntimeError('the cloud never answered')
        put()
        done, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < calibrate_s and answered.acquire(timeout=120):
            done += 1
            put()
        capacity = done / (time.monotonic() - t0)
        answered.acquire(timeout=120)
        answered.acquire(timeout=120)
        flood_rps = flood_factor * capacity
        before = dict(counts)

        def flooder() -> None:
            k, t0 = 0, time.monotonic()
            while not stop.is_set():
                put()
                counts['put'] += 1
                k += 1
                time.sleep(max(0.0, t0 + k / flood_rps - time.monotonic()))

        thread = threading.Thread(target=flooder, daemon=True)
        thread.start()
        time.sleep(1.0)  # the flood is on before the calm robot's first frame
        stamps = []
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            due = time.monotonic() + 1.0 / calm_fps
            stamps.append(client.publish(images[len(stamps) % len(images)]))
            client.drain(max(0.0, due - time.monotonic()))
        stop.set()
        thread.join(5)
        client.drain(3.0)
        sub.undeclare()
        results = [client.results[s] for s in stamps if s in client.results]
        cloud = [r for r in results if r.source == OffloadResult.SOURCE_CLOUD]
        lat = np.array([r.latency_ms for r in cloud]) if cloud else np.zeros(1)
        report = {
            'server': server[0], 'capacity_rps': capacity, 'seconds': seconds,
            'flood_rps_sent': counts['put'] / (seconds + 1.0), 'flood_answered': counts['ok'] - before['ok'],
            'flood_busy': counts['busy'] - before['busy'], 'calm_frames': len(stamps), 'calm_results': len(results),
            'calm_cloud': len(cloud), 'calm_share': len(cloud) / max(1, len(stamps)),
            'calm_p50_ms': float(np.percentile(lat, 50)), 'calm_p95_ms': float(np.percentile(lat, 95)),
            'calm_details': sorted({r.detail for r in results if r.detail}),
        }
        emit(f'fairness ({server[0]} server): capacity {capacity:.2f} req/s of 196 raw patches; flood at '
             f'{flood_factor:g}x = {report["flood_rps_sent"]:.1f} req/s ({report["flood_answered"]} answered, '
             f'{report["flood_busy"]} BUSY); calm robot at {calm_fps:g} fps, B={calm_budget}: {len(cloud)} of '
             f'{len(stamps)} frames answered by the cloud ({100 * report["calm_share"]:.0f} %, target >= 90 %), '
             f'latency p50 {report["calm_p50_ms"]:.0f} / p95 {report["calm_p95_ms"]:.0f} ms; '
             f'other results: {report["calm_details"]}')
        return report
    finally:
        stop.set()
        if session is not None:
            session.close()
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
        bring.stop()


class _VirtualFleet:
    """Virtual robots on one Zenoh session, each on its own key, sending real requests that
    state a deadline. An answer counts for its robot when it is OK and came within it."""

    def __init__(self, session: Any, requests: list[Any], deadline_ms: float) -> None:
        self._session = session
        self._requests = requests
        self.deadline_ms = deadline_ms
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, float]] = {}
        self.sent: dict[str, int] = {}
        self.answered: dict[str, int] = {}
        self.statuses: dict[str, int] = {}
        self._sub = session.declare_subscriber('**/sage/cloud_result', self._on_answer)

    def _on_answer(self, sample: Any) -> None:
        from rclpy.serialization import deserialize_message
        from sage_ros_msgs.msg import CloudResult

        a = deserialize_message(sample.payload.to_bytes(), CloudResult)
        now = time.monotonic()
        with self._lock:
            entry = self._pending.pop(a.request_id, None)
            if entry is None:
                return
            robot, t = entry
            ok = a.status == CloudResult.STATUS_OK
            status = 'ok' if ok else (a.detail.split(':')[0] or str(a.status))
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if ok and (now - t) * 1e3 <= self.deadline_ms:
                self.answered[robot] = self.answered.get(robot, 0) + 1

    def put(self, robot: str, rid: str, k: int = 0) -> None:
        import zenoh
        from rclpy.serialization import serialize_message

        msg = self._requests[k % len(self._requests)]
        msg.request_id, msg.robot_id, msg.deadline_left_ms = rid, robot, self.deadline_ms
        data = serialize_message(msg)
        with self._lock:
            self._pending[rid] = (robot, time.monotonic())
            self.sent[robot] = self.sent.get(robot, 0) + 1
        # Blocking, not dropping, when the session's queue is full: every request reaches the
        # router, however fast a burst is put.
        self._session.put(f'{robot}/sage/patch_set', data, congestion_control=zenoh.CongestionControl.BLOCK)

    def run(self, robots: list[str], rate: float, seconds: float, tag: str = '') -> None:
        """Each robot sends ``rate`` requests/s for ``seconds``, the robots spread evenly."""
        n, t0 = len(robots), time.monotonic()
        for j in range(int(seconds * rate * n)):
            time.sleep(max(0.0, t0 + j / (rate * n) - time.monotonic()))
            robot = robots[j % n]
            self.put(robot, f'{robot}/{tag}{j // n}', j)
        time.sleep(self.deadline_ms / 1e3 + 0.5)  # the last answers in time

    def reset(self) -> None:
        with self._lock:
            self._pending.clear()
            self.sent, self.answered, self.statuses = {}, {}, {}

    def shares(self, robots: list[str]) -> list[float]:
        with self._lock:
            return [self.answered.get(r, 0) / max(1, self.sent.get(r, 0)) for r in robots]

    def totals(self) -> tuple[int, int, dict[str, int]]:
        """(requests sent, answered in time, answers by status) since the last reset."""
        with self._lock:
            return sum(self.sent.values()), sum(self.answered.values()), dict(sorted(self.statuses.items()))

    def close(self) -> None:
        self._sub.undeclare()


def _fleet_cloud(images_dir: Path, overrides: dict[str, Any] | None, log: TextIO | None, budget: int,
                 deadline_ms: float) -> tuple[Any, Any, _VirtualFleet]:
    """A router and a cloud (the fleet server model), a session and a virtual fleet on it."""
    from sage_ros.commands.bringup import Bringup, plan
    from sage_ros.commands.system_demo import free_port

    endpoint = f'tcp/127.0.0.1:{free_port()}'
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint,
          **_with_fleet_server(overrides)}
    requests = real_requests(_images(images_dir, 4), 'fleet', budget)
    bring = Bringup(plan('cloud', overrides=ov), log=log)
    bring.start()
    try:
        bring.wait_ready(timeout=240)
        session = _zenoh(endpoint)
    except BaseException:
        bring.stop()
        raise
    return bring, session, _VirtualFleet(session, requests, deadline_ms)


def fleet_scale(images_dir: Path, *, robots: tuple[int, ...] = (100, 200, 500), rate: float = 1.0,
                seconds: float = 15.0, budget: int = 32, deadline_ms: float = 1500.0,
                overrides: dict[str, Any] | None = None, log: TextIO | None = None,
                emit: Callable[[str], None] = print) -> dict[int, dict[str, float]]:
    """``N`` virtual robots x ``rate`` requests/s (B=``budget``, deadline ``deadline_ms``) for
    each N in ``robots``, one cloud: per-robot shares answered in time, answers/s, cloud CPU."""
    isolate_dds()
    from sage_ros.bench.pipeline import process_cpu_s

    bring, session, fleet = _fleet_cloud(images_dir, overrides, log, budget, deadline_ms)
    out: dict[int, dict[str, float]] = {}
    try:
        pid = _cloud_pid(bring)
        fleet.run([f'warm{i}' for i in range(8)], 2.0, 2.0)  # the first forwards
        for n in robots:
            names = [f'n{n}r{i}' for i in range(n)]
            fleet.reset()
            cpu0, t0 = process_cpu_s(pid) or 0.0, time.monotonic()
            fleet.run(names, rate, seconds)
            cores = ((process_cpu_s(pid) or 0.0) - cpu0) / (time.monotonic() - t0)
            shares = fleet.shares(names)
            med = statistics.median(shares)
            _, answered, statuses = fleet.totals()
            out[n] = {'answers_per_s': answered / seconds, 'min_share': min(shares),
                      'median_share': med, 'zero': sum(1 for x in shares if x == 0), 'cloud_cores': cores}
            r = out[n]
            emit(f'scale: {n} robots x {rate:g} req/s (B={budget}, deadline {deadline_ms:g} ms): '
                 f'{r["answers_per_s"]:.1f} answers/s in time; per-robot share min {r["min_share"]:.2f} / median '
                 f'{med:.2f} (min/median {r["min_share"] / med if med else float("nan"):.2f}, target >= 0.5), '
                 f'{r["zero"]} robots with none; cloud {cores:.2f} cores; answers {statuses}'
                 f'{"" if not bring.dead() else "; THE CLOUD DIED"}')
        if 100 in out and 500 in out and out[100]['answers_per_s']:
            emit(f'scale: answers/s at N=500 / N=100 = {out[500]["answers_per_s"] / out[100]["answers_per_s"]:.2f} '
                 '(target >= 0.9)')
        return out
    finally:
        fleet.close()
        session.close()
        bring.stop()


def many_prefixes(images_dir: Path, *, prefixes: int = 10_000, bursts: int = 5, load_robots: int = 50,
                  rate: float = 1.0, load_s: float = 10.0, budget: int = 32, deadline_ms: float = 1500.0,
                  overrides: dict[str, Any] | None = None, log: TextIO | None = None,
                  emit: Callable[[str], None] = print) -> dict[str, Any]:
    """A load of ``load_robots`` x ``rate`` requests/s, then ``bursts`` bursts of ``prefixes``
    new robot keys (one request each), then the same load: its share answered in time before
    and after, the cloud's RSS, whether it survived, and its diagnostics summary."""
    isolate_dds()
    import rclpy

    from sage_ros.ros.live_client import LiveClient

    bring, session, fleet = _fleet_cloud(images_dir, overrides, log, budget, deadline_ms)
    context = rclpy.Context()
    rclpy.init(context=context)
    client = None
    try:
        pid = _cloud_pid(bring)
        names = [f'load{i}' for i in range(load_robots)]
        fleet.run([f'warm{i}' for i in range(8)], 2.0, 2.0)

        def load(tag: str) -> float:
            fleet.reset()
            fleet.run(names, rate, load_s, tag)
            sent, answered, _ = fleet.totals()
            return answered / max(1, sent)

        before, rss_before = load('a'), _rss_mb(pid)
        alive, answered = [], []
        for b in range(bursts):
            fleet.reset()
            for i in range(prefixes):
                fleet.put(f'key{b}x{i}', f'key{b}x{i}/0', i)
            seen, quiet = -1, time.monotonic()
            while time.monotonic() - quiet < 2.0 and not bring.dead():  # until the answers stop coming
                time.sleep(0.1)
                now_seen = sum(fleet.totals()[2].values())
                if now_seen != seen:
                    seen, quiet = now_seen, time.monotonic()
            alive.append(not bring.dead())
            answered.append(seen)
        rss_burst = _rss_mb(pid)
        # The cloud's own summary while the load runs again (its busiest robots are the load's).
        client = LiveClient(name='fleet_diagnostics', context=context)
        shares: list[float] = []
        loader = threading.Thread(target=lambda: shares.append(load('b')), daemon=True)
        loader.start()
        time.sleep(load_s / 2)
        summary = client.diagnostics('sage_cloud: robots', timeout=load_s / 2) or {}
        loader.join()
        after, rss_after = shares[0], _rss_mb(pid)
        report = {'share_before': before, 'share_after': after, 'rss_before_mb': rss_before,
                  'rss_after_bursts_mb': rss_burst, 'rss_after_mb': rss_after, 'alive': all(alive) and not bring.dead(),
                  'burst_answers': answered, 'diagnostics': summary}
        emit(f'prefixes: {load_robots} robots x {rate:g} req/s answered {100 * before:.1f} % in time before '
             f'{bursts} x {prefixes} new robot keys (answers received: {answered}) and {100 * after:.1f} % after '
             f'({100 * (after - before):+.1f} points, target within 5); cloud RSS {rss_before:.0f} MB -> '
             f'{rss_burst:.0f} after the bursts -> {rss_after:.0f} after the load ({rss_after - rss_before:+.0f} MB, '
             f'target within 20); cloud alive after each burst: {alive}; diagnostics: {len(summary) - 1} values '
             f'({", ".join(f"{k} {v}" for k, v in summary.items() if k != "message")})')
        return report
    finally:
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
        fleet.close()
        session.close()
        bring.stop()


def batching(images_dir: Path, *, max_batches: tuple[int, ...] = (1, 4, 8, 16), robots: int = 8, budget: int = 64,
             seconds: float = 10.0, overrides: dict[str, Any] | None = None, log: TextIO | None = None,
             emit: Callable[[str], None] = print) -> dict[int, float]:
    """Answers per second of the cloud for each ``max_batch``, with ``robots`` virtual robots
    each keeping one request of ``budget`` patches in flight."""
    isolate_dds()
    from rclpy.serialization import serialize_message

    from sage_ros.commands.bringup import Bringup, plan
    from sage_ros.commands.system_demo import free_port

    images = _images(images_dir, 4)
    reqs = {f'v{i}': real_requests(images, f'v{i}', budget) for i in range(robots)}
    rates: dict[int, float] = {}
    for max_batch in max_batches:
        endpoint = f'tcp/127.0.0.1:{free_port()}'
        ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'max_batch': max_batch,
              'batch_wait_ms': 5.0, **(overrides or {})}
        bring = Bringup(plan('cloud', overrides=ov), log=log)
        session = None
        stop = threading.Event()
        answered = [0]
        lock = threading.Lock()
        try:
            bring.start()
            bring.wait_ready(timeout=240)
            session = _zenoh(endpoint)

            def robot(name: str) -> None:
                got = threading.Event()

                def on_answer(_sample: Any) -> None:
                    got.set()

                sub = session.declare_subscriber(f'{name}/sage/cloud_result', on_answer)
                k = 0
                while not stop.is_set():
                    msg = reqs[name][k % len(reqs[name])]
                    msg.request_id = f'{name}/{k}'
                    got.clear()
                    session.put(f'{name}/sage/patch_set', serialize_message(msg))
                    if got.wait(30.0) and not stop.is_set():
                        with lock:
                            answered[0] += 1
                    k += 1
                sub.undeclare()

            threads = [threading.Thread(target=robot, args=(name,), daemon=True) for name in reqs]
            for t in threads:
                t.start()
            time.sleep(2.0)  # warm-up: the first batches
            with lock:
                start_count = answered[0]
            t0 = time.monotonic()
            time.sleep(seconds)
            with lock:
                rates[max_batch] = (answered[0] - start_count) / (time.monotonic() - t0)
            stop.set()
            for t in threads:
                t.join(35)
        finally:
            stop.set()
            if session is not None:
                session.close()
            bring.stop()
        emit(f'batching: {robots} robots x 1 request of {budget} patches in flight, max_batch {max_batch}: '
             f'{rates[max_batch]:.2f} answers/s')
    if 1 in rates:
        emit('  speed-up over max_batch 1: ' + ', '.join(f'{b}: {r / rates[1]:.2f}x' for b, r in rates.items()))
    return rates


def ray_replicas(images_dir: Path, *, replicas: tuple[int, ...] = (1, 2), robots: int = 8, budget: int = 64,
                 seconds: float = 10.0, emit: Callable[[str], None] = print) -> dict[int, float]:
    """Answers per second through the Ray Serve backend with each number of replicas, with
    ``robots`` requests of ``budget`` patches in flight at a time (the server model, DeiT-Base,
    with random weights). On one machine the replicas share its CPUs: this measures the
    mechanics, not the scale-out a cluster gives."""
    from sage_ros.core.codec import decode_patches
    from sage_ros.serving.ray_backend import RayBackend

    reqs = [(decode_patches(bytes(r.payload), r.encoding, len(r.indices)), np.asarray(r.indices, np.int64))
            for r in real_requests(_images(images_dir, robots), 'bench', budget)]
    rates: dict[int, float] = {}
    for n in replicas:
        backend = RayBackend('deit_base_patch16_224', 'random:0', replicas=n,
                             replica_cpus=max(0.1, (os.cpu_count() or 1) / n), max_batch=robots)
        try:
            backend.classify(reqs)  # warm-up
            done, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < seconds:
                done += int(np.isfinite(backend.classify(reqs)).all(axis=1).sum())
            rates[n] = done / (time.monotonic() - t0)
            emit(f'ray: {n} replica(s), {robots} requests of {budget} patches at a time: {rates[n]:.2f} answers/s '
                 f'(replicas used: {len(set(backend.served_by))})')
        finally:
            backend.close()
    return rates
