# SPDX-License-Identifier: Apache-2.0
"""The bandwidth monitor on a real shaped link: robot and cloud in their own network
namespaces, joined by a veth pair whose robot-side egress is a tc token bucket, stepped from
8 Mbit/s to 400 kbit/s and back while frames flow.

The budgets the monitor picks depend on the link and on the time left for it: the deadline
minus the edge's and the cloud's own time. That time is measured here first, and the deadline
set from it, so that the link gets the same share of it on a fast machine as on a slow or busy
one; the figures asserted are then the link's, not this machine's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sage_ros.commands.bringup import Bringup, plan
from sage_ros.bench.link_step import load, plot

PHASES = '8mbit:8,400kbit:15,8mbit:12,24kbit:8+,8mbit:12'  # rate:seconds ('+': then until suspended)
CALIBRATION = '8mbit:6'
# Of the deadline the monitor plans with (budget_safety of it), what the link may take: about
# 30 patches at 400 kbit/s, all 96 at 8 Mbit/s, not even budget_min at 24 kbit/s.
LINK_WINDOW_S = 0.45
SAFETY = 0.85  # sage_edge budget_safety, as in config/sage_ros.yaml

# Sets sage_edge's deadline_ms from inside the robot's namespace (ROS 2 traffic stays there).
SET_DEADLINE = """
import sys, rclpy
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
rclpy.init()
node = rclpy.create_node('shaped_link_deadline')
params = AsyncParameterClient(node, 'sage_edge')
assert params.wait_for_services(timeout_sec=60.0), 'no sage_edge'
future = params.set_parameters([Parameter('deadline_ms', value=float(sys.argv[1]))])
rclpy.spin_until_future_complete(node, future, timeout_sec=60.0)
assert future.result().results[0].successful, future.result()
"""


def _ip(*args: str) -> None:
    subprocess.run(['ip', *args], check=True, capture_output=True, text=True)


@pytest.fixture
def netns():
    """Two namespaces and a veth pair between them; everything is removed afterwards."""
    if os.geteuid() != 0 or shutil.which('ip') is None or shutil.which('tc') is None:
        pytest.skip('needs root with ip and tc to create network namespaces')
    tag = f'{os.getpid() % 100000}'
    robot, cloud, vr, vc = f'sage_r{tag}', f'sage_c{tag}', f'sr{tag}', f'sc{tag}'
    net = f'10.231.{os.getpid() % 250}'
    try:
        _ip('netns', 'add', robot)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f'cannot create network namespaces here: {exc.stderr.strip()}')
    try:
        _ip('netns', 'add', cloud)
        _ip('link', 'add', vr, 'type', 'veth', 'peer', 'name', vc)
        _ip('link', 'set', vr, 'netns', robot)
        _ip('link', 'set', vc, 'netns', cloud)
        for ns, dev, addr in ((robot, vr, f'{net}.1/30'), (cloud, vc, f'{net}.2/30')):
            _ip('-n', ns, 'addr', 'add', addr, 'dev', dev)
            _ip('-n', ns, 'link', 'set', dev, 'up')
            _ip('-n', ns, 'link', 'set', 'lo', 'up')
        yield {'robot': robot, 'cloud': cloud, 'robot_dev': vr, 'cloud_ip': f'{net}.2'}
    finally:
        for ns in (robot, cloud):
            subprocess.run(['ip', 'netns', 'del', ns], capture_output=True)


def _in_ns(ns: str, procs):
    for p in procs:
        p.argv = ['ip', 'netns', 'exec', ns, *p.argv]
    return procs


def _link_step(netns, imagenet_dir: Path, phases: str, out: Path) -> None:
    subprocess.run(['ip', 'netns', 'exec', netns['robot'], sys.executable, '-m', 'sage_ros.bench.link_step',
                    str(imagenet_dir / 'images'), '--device', netns['robot_dev'], '--phases', phases,
                    '--fps', '30', '--out', str(out)], check=True, timeout=600, env=os.environ.copy())


def _handled_while_out(frames: list[dict]) -> int:
    """Frames the edge finished while the request of an earlier frame was still out: published
    after it, their results before its answer. One worker handles frames in turn, so each such
    frame was handled after that request left; a synchronous edge would have none."""
    answered = [f for f in frames if f['source'] == 1]
    return sum(any(g['t'] > f['t'] and g['t'] + g['latency_ms'] / 1e3 < f['t'] + f['latency_ms'] / 1e3
                   for f in answered) for g in frames)


def test_budget_follows_link_steps_and_meets_the_deadline(netns, ros_env, imagenet_dir, tmp_path):
    """A 30 fps camera, requests pipelined (max_in_flight 4), the uplink stepped 8 Mbit/s ->
    400 kbit/s -> 8 Mbit/s, then cut to 24 kbit/s (not even budget_min fits: offloading is
    suspended) and given back (probes must end the suspension)."""
    endpoint = f'tcp/{netns["cloud_ip"]}:7447'
    # A deadline no frame misses until the calibration has measured the machine.
    start_deadline_ms = 60000.0
    common = {'weights': 'random', 'zenoh_connect': endpoint}
    log = (tmp_path / 'nodes.log').open('w')
    # This test is about the uplink: the cloud runs DeiT-Tiny, so that on these 2 shared cores
    # it is not the bottleneck (DeiT-Base beside a 30 fps edge is, and then the monitor
    # rightly plans for the cloud, not the link). The edge keeps one core to itself.
    cloud = Bringup(_in_ns(netns['cloud'], plan('cloud', overrides={
        **common, 'zenoh_listen': endpoint, 'sage_cloud.model': 'deit_tiny_patch16_224',
        'sage_cloud.num_threads': 1})), log=log)
    edge = Bringup(_in_ns(netns['robot'], plan('edge', overrides={
        **common, 'codec': 'raw', 'deadline_ms': start_deadline_ms, 'budget_mode': 'auto', 'budget_min': 8,
        'budget_max': 96, 'budget_safety': SAFETY, 'probe_interval_s': 1.0, 'max_in_flight': 4,
        'sage_edge.num_threads': 1})), log=log)
    records, calibration = tmp_path / 'link_step.jsonl', tmp_path / 'calibration.jsonl'
    try:
        cloud.start()
        cloud.wait_ready()
        edge.start()
        edge.wait_ready()
        # The edge's and the cloud's own time on this machine: the latency of the frames answered
        # over the fast link (the slowest but one in ten), less their upload at 8 Mbit/s.
        _link_step(netns, imagenet_dir, CALIBRATION, calibration)
        answered = sorted(f['latency_ms'] - f['bytes'] * 8 / 8e6 * 1e3 for f in load(calibration)[0]
                          if f['source'] == 1)
        assert len(answered) >= 5, answered
        own_ms = answered[int(0.9 * (len(answered) - 1))]
        deadline_ms = (own_ms + LINK_WINDOW_S * 1e3) / SAFETY
        subprocess.run(['ip', 'netns', 'exec', netns['robot'], sys.executable, '-c', SET_DEADLINE, str(deadline_ms)],
                       check=True, timeout=120, env=os.environ.copy())
        _link_step(netns, imagenet_dir, PHASES, records)
    finally:
        edge.stop()
        cloud.stop()
        log.close()
    frames, statuses = load(records)
    png = plot(records, tmp_path / 'link_step.png', deadline_ms=deadline_ms)
    if os.environ.get('SAGE_ROS_ARTIFACTS'):
        out = Path(os.environ['SAGE_ROS_ARTIFACTS'])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, out / png.name)
        shutil.copy(records, out / records.name)
    assert all(f['source'] in (0, 1, 2) for f in frames), 'a frame without a result'
    # The edge kept handling camera frames while requests were out on the slow link (the
    # newest-frame slot drops what it cannot take). How many per second is this machine's
    # figure: printed, and measured by `sage-ros bench`.
    phase_t = [r['t'] for r in (json.loads(line) for line in records.read_text().splitlines()) if r['kind'] == 'phase']
    seconds = max(f['t'] for f in frames) - phase_t[0]
    print(f'\nshaped link: deadline {deadline_ms:.0f} ms (edge and cloud {own_ms:.0f} ms here); '
          f'{len(frames) / seconds:.1f} frames/s handled of the 30 fps camera')
    assert _handled_while_out([f for f in frames if f['phase'] == 1]) > 0
    # Requests: the frames that went to the cloud (patches were sent).
    req = [[f for f in frames if f['phase'] == i and f['patches'] > 0] for i in range(5)]
    budgets = [[f['budget'] for f in ph] for ph in req]
    fast_b = budgets[0][-1]
    assert fast_b >= 64, budgets[0]
    # The drop: B follows within a few requests ...
    assert budgets[1][3] <= fast_b // 2, budgets[1]
    # ... and after settling no request misses the deadline, and B stays put.
    settled = req[1][5:]
    assert settled, budgets[1]
    assert not [f for f in settled if f['detail'] == 'timeout'], settled
    assert all(f['latency_ms'] <= deadline_ms for f in settled if f['source'] == 1)
    assert max(budgets[1][5:]) <= 48
    # The rise: back up once the link recovers, without misses.
    assert budgets[2][-1] >= 64 and budgets[2][-1] > max(budgets[1][5:]), budgets[2]
    # (Requests still out when the link is cut at the end of the phase may miss.)
    cut_t = next(json.loads(line)['t'] for line in records.read_text().splitlines()
                 if json.loads(line) == {**json.loads(line), 'kind': 'phase', 'phase': 3})
    assert not [f for f in req[2] if f['detail'] == 'timeout' and f['t'] < cut_t - deadline_ms / 1e3]
    # Cut: offloading is suspended (frames keep their edge labels) ...
    cut = [f for f in frames if f['phase'] == 3]
    assert any(f['detail'].startswith('link too slow') for f in cut), {f['detail'] for f in cut}
    # ... and comes back by itself once probes see the link again.
    back = [f for f in frames if f['phase'] == 4]
    assert [f for f in back if f['source'] == 1], {f['detail'] for f in back}
    assert not back[-1]['detail'].startswith('link too slow')
    assert statuses and png.read_bytes()[:4] == b'\x89PNG'
