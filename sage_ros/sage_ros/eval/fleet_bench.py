# SPDX-License-Identifier: Apache-2.0
"""The cloud serving a fleet: fairness under a flood, and answers per second by batch size.

``sage-ros bench --fleet`` runs both on this machine with real processes (router and cloud
from ``sage-ros up``'s plan) and prints the figures:

- **fairness**: one robot floods maximum-size requests (196 raw patches) at ``flood_rps``
  while a real edge node at ``calm_fps`` offloads every frame; the share of the calm robot's
  frames the cloud answered, and their latency;
- **batching**: ``robots`` virtual robots each keep one request of ``budget`` patches in
  flight, for each ``max_batch``; answers per second.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from sage_ros.bringup import isolate_dds
from sage_ros.images import list_images, read_rgb


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


def flood_fairness(images_dir: Path, *, seconds: float = 20.0, flood_rps: float = 50.0, calm_fps: float = 2.0,
                   calm_budget: int = 32, overrides: dict[str, Any] | None = None, log: TextIO | None = None,
                   emit: Callable[[str], None] = print) -> dict[str, Any]:
    """Robot 'flood' puts maximum-size requests at ``flood_rps``; robot 'calm', a real edge
    node at ``calm_fps``, offloads every frame at B=``calm_budget``. Returns the figures."""
    isolate_dds()
    import rclpy
    from rclpy.serialization import deserialize_message, serialize_message
    from sage_ros_msgs.msg import CloudResult, OffloadResult

    from sage_ros.bringup import Bringup, plan
    from sage_ros.live_client import LiveClient
    from sage_ros.system_demo import free_port

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
            counts['ok' if a.status == CloudResult.STATUS_OK else 'busy'] += 1

        sub = session.declare_subscriber('flood/sage/cloud_result', on_answer)

        def flooder() -> None:
            k, t0 = 0, time.monotonic()
            while not stop.is_set():
                msg = flood[k % len(flood)]
                msg.request_id = f'flood/{k}'
                session.put('flood/sage/patch_set', serialize_message(msg))
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
            'seconds': seconds, 'flood_rps_sent': counts['put'] / (seconds + 1.0), 'flood_answered': counts['ok'],
            'flood_busy': counts['busy'], 'calm_frames': len(stamps), 'calm_results': len(results),
            'calm_cloud': len(cloud), 'calm_share': len(cloud) / max(1, len(stamps)),
            'calm_p50_ms': float(np.percentile(lat, 50)), 'calm_p95_ms': float(np.percentile(lat, 95)),
            'calm_details': sorted({r.detail for r in results if r.detail}),
        }
        emit(f'fairness: flood {report["flood_rps_sent"]:.0f} req/s of 196 raw patches '
             f'({report["flood_answered"]} answered, {report["flood_busy"]} BUSY); calm robot at {calm_fps:g} fps, '
             f'B={calm_budget}: {len(cloud)} of {len(stamps)} frames answered by the cloud '
             f'({100 * report["calm_share"]:.0f} %), latency p50 {report["calm_p50_ms"]:.0f} / '
             f'p95 {report["calm_p95_ms"]:.0f} ms; other results: {report["calm_details"]}')
        return report
    finally:
        stop.set()
        if session is not None:
            session.close()
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
        bring.stop()


def batching(images_dir: Path, *, max_batches: tuple[int, ...] = (1, 4, 8, 16), robots: int = 8, budget: int = 64,
             seconds: float = 10.0, overrides: dict[str, Any] | None = None, log: TextIO | None = None,
             emit: Callable[[str], None] = print) -> dict[int, float]:
    """Answers per second of the cloud for each ``max_batch``, with ``robots`` virtual robots
    each keeping one request of ``budget`` patches in flight."""
    isolate_dds()
    from rclpy.serialization import serialize_message

    from sage_ros.bringup import Bringup, plan
    from sage_ros.system_demo import free_port

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
