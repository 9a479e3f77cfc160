# SPDX-License-Identifier: Apache-2.0
"""The server model on Ray Serve: a local Ray instance on this machine, 2 replicas of a small
server model (DeiT-Tiny), and the cloud node as its ingress (joining that instance, as a cloud
node joins a cluster: starting Ray twice would double the module's time)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from sage_ros.serving.local import LocalBackend
from conftest import wait_uplink

MODEL = 'deit_tiny_patch16_224'


def _requests(n: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        m = (8, 16, 32, 64)[k % 4]
        out.append((rng.integers(0, 255, (m, 16, 16, 3), dtype=np.uint8), np.sort(rng.choice(196, m, replace=False))))
    return out


@pytest.fixture(scope='module')
def ray_backend():
    from sage_ros.serving.ray_backend import RayBackend

    backend = RayBackend(MODEL, 'random:0', replicas=2, replica_cpus=0.5, num_threads=1, max_batch=4,
                         batch_wait_ms=5.0)
    yield backend
    backend.close()


def test_every_request_is_answered_once_by_both_replicas_like_the_local_model(ray_backend):
    requests = _requests(48)
    ray_backend.served_by.clear()
    probs = ray_backend.classify(requests)
    assert probs.shape == (48, 1000) and np.isfinite(probs).all()
    assert len(ray_backend.served_by) == 48  # one answer per request
    assert len(set(ray_backend.served_by)) == 2, set(ray_backend.served_by)  # both replicas served
    local = LocalBackend(MODEL, 'random:0')
    np.testing.assert_allclose(probs, local.classify(requests), atol=1e-5)
    # The replicas report their model's geometry (the ingress checks requests against it) and
    # the CLS attention a second round's roi comes from, as the local model does.
    assert ray_backend.geometry == local.geometry == (14, 14, 16, 224)
    _, attention = ray_backend.classify_attended(requests[:3])
    for got, want in zip(attention, local.classify_attended(requests[:3])[1]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_a_replica_killed_mid_run_loses_no_request(ray_backend):
    import ray

    replicas = sorted(set(ray_backend.served_by))  # both served in the test before
    assert len(replicas) == 2
    n = 128
    requests = _requests(n, seed=1)
    out: dict[str, np.ndarray] = {}
    ray_backend.served_by.clear()
    worker = threading.Thread(target=lambda: out.setdefault('probs', ray_backend.classify(requests)))
    worker.start()
    # Mid-run: once answers come back (read in order), and before the last.
    end = time.monotonic() + 120  # a hang guard
    while len(ray_backend.served_by) < 4 and worker.is_alive() and time.monotonic() < end:
        time.sleep(0.001)
    assert worker.is_alive() and len(ray_backend.served_by) < n, 'the run was over before the kill'
    ray.kill(ray.get_actor(replicas[0], namespace='serve'), no_restart=False)
    worker.join(120)
    probs = out['probs']
    # Every request has its row: answered (retried on the live replica) or marked for an
    # ERROR answer (NaN) that makes its robot fall back; none is missing.
    assert probs.shape == (n, 1000)
    answered = np.isfinite(probs).all(axis=1)
    # Only calls out at the dead replica can fail twice, and Serve lets a replica hold at most
    # max_ongoing_requests (2 x max_batch here) at once.
    assert answered.sum() >= n - 2 * 4, answered.sum()


def test_cloud_node_with_ray_unreachable_says_so_in_one_line():
    proc = subprocess.run([sys.executable, '-m', 'sage_ros.nodes.cloud_node', '--ros-args', '-p', 'weights:=random',
                           '-p', 'backend:=ray', '-p', 'ray_address:=127.0.0.1:1'],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert 'Traceback' not in out and 'cannot reach Ray at 127.0.0.1:1' in out


def test_the_cloud_node_is_an_ingress_to_ray_serve_end_to_end(ray_backend, ros_env, real_images, tmp_path):
    import ray
    from ray import serve
    from sage_ros_msgs.msg import OffloadResult

    from sage_ros.serving.ray_backend import APP

    from sage_ros.commands.bringup import Bringup, plan
    from sage_ros.ros.live_client import LiveClient
    from sage_ros.commands.system_demo import free_port

    # The module's deployment goes: the node deploys its own in its place (a fresh deployment,
    # not an update rolling over the old replicas on these few CPUs).
    serve.delete(APP)
    endpoint = f'tcp/127.0.0.1:{free_port()}'
    # The cloud node joins the Ray instance this module started (ray_address), and deploys its
    # own server model there. A deadline far beyond a round trip here: every frame is answered
    # by the cloud.
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'deadline_ms': 60000.0,
          'sage_cloud.backend': 'ray', 'sage_cloud.model': MODEL, 'ray_replicas': 2, 'ray_replica_cpus': 0.5,
          'sage_cloud.num_threads': 1, 'ray_address': ray.get_runtime_context().gcs_address}
    with (tmp_path / 'nodes.log').open('w') as log:
        bring = Bringup(plan('both', overrides=ov), log=log)
        client = None
        try:
            bring.start()
            bring.wait_ready(timeout=240)
            client = LiveClient(name='ray_client')
            assert client.wait_for_edge()
            # Once the edge has seen the cloud, every frame is answered by it through Ray.
            wait_uplink(client, timeout=120)
            results = [client.classify(rgb, timeout=120) for rgb in real_images[:3]]
            assert [r.source if r else None for r in results] == [OffloadResult.SOURCE_CLOUD] * 3, \
                [(r.source, r.detail) if r else None for r in results]
        finally:
            if client is not None:
                client.destroy_node()
            bring.stop(timeout=20)
    assert 'Traceback' not in (tmp_path / 'nodes.log').read_text()
