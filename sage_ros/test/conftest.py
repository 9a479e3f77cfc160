# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the real ImageNet subset, seeded random-weight models, running systems."""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from sage_ros.core import load_vit
from sage_ros.commands.images import list_images, read_rgb

REPO = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get('SAGE_ROS_DATA', REPO.parent / 'shared' / 'data' / 'imagenet-val-1300'))


@pytest.fixture(scope='session')
def imagenet_dir() -> Path:
    d = data_dir()
    if not (d / 'images').is_dir():
        pytest.fail(f'real test images not found at {d}; set SAGE_ROS_DATA to the imagenet-val-1300 folder')
    return d


@pytest.fixture(scope='session')
def real_images(imagenet_dir: Path) -> list[np.ndarray]:
    """Twelve real photographs (RGB uint8), spread over the subset."""
    items = list_images(imagenet_dir / 'images')
    return [read_rgb(items[i].path) for i in range(0, len(items), max(1, len(items) // 12))][:12]


@pytest.fixture(scope='session')
def ros_env():
    """One rclpy context for the session, on a DDS domain of its own, local discovery only.

    The nodes the tests start inherit the same environment, so they see each other and
    nothing else on the machine.
    """
    import rclpy

    from sage_ros.commands.bringup import dds_defaults

    os.environ['ROS_DOMAIN_ID'] = str(101 + os.getpid() % 100)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    for key, value in dds_defaults().items():
        os.environ.setdefault(key, value)
    rclpy.init()
    yield
    rclpy.try_shutdown()


@pytest.fixture(scope='module')
def ros_edge_node(ros_env):
    """An edge node in this process (random weights, ROS transport, namespace robot9), one per module."""
    from rclpy.parameter import Parameter

    from sage_ros.nodes.edge_node import EdgeNode

    node = EdgeNode(namespace='robot9', parameter_overrides=[
        Parameter('weights', value='random'), Parameter('transport', value='ros')])
    yield node
    node.destroy_node()


@pytest.fixture(scope='session')
def tiny():
    return load_vit('deit_tiny_patch16_224', 'random:0')


@pytest.fixture(scope='session')
def base():
    return load_vit('deit_base_patch16_224', 'random:0')


def _stop_grace_s() -> float:
    from sage_ros.commands.bringup import Bringup

    return float(inspect.signature(Bringup.stop).parameters['timeout'].default)


# What a supervisor (`sage-ros up`, as ros2 launch does) waits after SIGTERM before it sends
# SIGKILL: a node must end by itself within it. Tests of clean stops hold nodes to this bound,
# which the mechanism sets, never to a guess at how fast this machine stops a process.
STOP_GRACE_S = _stop_grace_s()


def stop_by_signal(popen: subprocess.Popen, sig: int = signal.SIGINT) -> int:
    """Send ``sig`` to a running node and return its exit code once it has ended by itself;
    fails if it is still running after STOP_GRACE_S (a supervisor would have killed it)."""
    popen.send_signal(sig)
    try:
        return popen.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
        raise AssertionError(f'still running {STOP_GRACE_S:g} s after {signal.Signals(sig).name}: '
                             'a supervisor would have killed it') from None


def wait_uplink(client, timeout: float = 30.0) -> None:
    """Until the edge's diagnostics say its uplink is up (router and cloud seen)."""
    end = time.monotonic() + timeout
    while (client.diagnostics('sage_edge: link') or {}).get('uplink') != 'connected':
        assert time.monotonic() < end, 'the edge never saw the cloud'


@contextlib.contextmanager
def system_up(log_dir: Path, name: str, *, relay_delay_s: float = 0.0, **overrides):
    """``with system_up(log_dir, name, relay_delay_s=0.0, **overrides) as (bringup, client, endpoint)``:
    router, cloud and edge (random weights, a free port, the edge behind a
    :class:`~sage_ros.bench.delay_relay.DelayRelay` of ``relay_delay_s`` each way when > 0), and
    a LiveClient ``name`` fed their results, on the default topics; their log in
    ``log_dir/name.log``. With a relay it waits for the uplink. Needs the ros_env fixture."""
    from sage_ros.commands.bringup import Bringup, plan
    from sage_ros.bench.delay_relay import DelayRelay
    from sage_ros.ros.live_client import LiveClient
    from sage_ros.commands.system_demo import free_port

    port = free_port()
    endpoint = f'tcp/127.0.0.1:{port}'
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, **overrides}
    relay = DelayRelay(free_port(), '127.0.0.1', port, relay_delay_s) if relay_delay_s else None
    if relay is not None:
        relay.start()
        ov['sage_edge.zenoh_connect'] = relay.endpoint
    log = (log_dir / f'{name}.log').open('w')
    bring = Bringup(plan('both', overrides=ov), log=log)
    client = None
    try:
        bring.start()
        bring.wait_ready(timeout=240)  # a hang guard: three processes load their models at once
        client = LiveClient(name=name)
        assert client.wait_for_edge()
        if relay is not None:
            wait_uplink(client, timeout=120)
        yield bring, client, endpoint
    finally:
        if client is not None:
            client.destroy_node()
        bring.stop()
        if relay is not None:
            relay.stop()
        log.close()


@pytest.fixture
def running_system(ros_env, tmp_path):
    """``with running_system(name, relay_delay_s=0.0, **overrides) as (bringup, client, endpoint)``:
    :func:`system_up` with its log in the test's tmp_path."""
    return functools.partial(system_up, tmp_path)
