# SPDX-License-Identifier: Apache-2.0
"""The bandwidth monitor on a real shaped link: robot and cloud in their own network
namespaces, joined by a veth pair whose robot-side egress is a tc token bucket, stepped from
8 Mbit/s to 400 kbit/s and back while frames flow."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from sage_ros.bringup import Bringup, plan
from sage_ros.eval.link_step import load, plot

DEADLINE_MS = 700.0
PHASES = '8mbit:8,400kbit:15,8mbit:12,24kbit:8,8mbit:12'  # rate:seconds


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


def test_budget_follows_link_steps_and_meets_the_deadline(netns, ros_env, imagenet_dir, tmp_path):
    """A 30 fps camera, requests pipelined (max_in_flight 4), the uplink stepped 8 Mbit/s ->
    400 kbit/s -> 8 Mbit/s, then cut to 24 kbit/s (not even budget_min fits: offloading is
    suspended) and given back (probes must end the suspension)."""
    endpoint = f'tcp/{netns["cloud_ip"]}:7447'
    common = {'weights': 'random', 'zenoh_connect': endpoint}
    log = (tmp_path / 'nodes.log').open('w')
    # This test is about the uplink: the cloud runs DeiT-Tiny, so that on these 2 shared cores
    # it is not the bottleneck (DeiT-Base beside a 30 fps edge is, and then the monitor
    # rightly plans for the cloud, not the link). The edge keeps one core to itself.
    cloud = Bringup(_in_ns(netns['cloud'], plan('cloud', overrides={
        **common, 'zenoh_listen': endpoint, 'sage_cloud.model': 'deit_tiny_patch16_224',
        'sage_cloud.num_threads': 1})), log=log)
    edge = Bringup(_in_ns(netns['robot'], plan('edge', overrides={
        **common, 'codec': 'raw', 'deadline_ms': DEADLINE_MS, 'budget_mode': 'auto', 'budget_min': 8,
        'budget_max': 96, 'probe_interval_s': 1.0, 'max_in_flight': 4, 'sage_edge.num_threads': 1})), log=log)
    records = tmp_path / 'link_step.jsonl'
    try:
        cloud.start()
        cloud.wait_ready()
        edge.start()
        edge.wait_ready()
        subprocess.run(['ip', 'netns', 'exec', netns['robot'], sys.executable, '-m', 'sage_ros.eval.link_step',
                        str(imagenet_dir / 'images'), '--device', netns['robot_dev'], '--phases', PHASES,
                        '--fps', '30', '--out', str(records)], check=True, timeout=600, env=os.environ.copy())
    finally:
        edge.stop()
        cloud.stop()
        log.close()
    frames, statuses = load(records)
    png = plot(records, tmp_path / 'link_step.png', deadline_ms=DEADLINE_MS)
    if os.environ.get('SAGE_ROS_ARTIFACTS'):
        out = Path(os.environ['SAGE_ROS_ARTIFACTS'])
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(png, out / png.name)
        shutil.copy(records, out / records.name)
    assert all(f['source'] in (0, 1, 2) for f in frames), 'a frame without a result'
    # The edge kept up with the camera while requests were out (the newest-frame slot drops
    # what it cannot take; a synchronous edge handled a third of this).
    seconds = sum(int(part.split(':')[1]) for part in PHASES.split(','))
    assert len(frames) >= 0.3 * 30 * seconds, len(frames)
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
    assert all(f['latency_ms'] <= DEADLINE_MS for f in settled if f['source'] == 1)
    assert max(budgets[1][5:]) <= 48
    # The rise: back up once the link recovers, without misses.
    assert budgets[2][-1] >= 64 and budgets[2][-1] > max(budgets[1][5:]), budgets[2]
    # (Requests still out when the link is cut at the end of the phase may miss.)
    cut_t = next(json.loads(line)['t'] for line in records.read_text().splitlines()
                 if json.loads(line) == {**json.loads(line), 'kind': 'phase', 'phase': 3})
    assert not [f for f in req[2] if f['detail'] == 'timeout' and f['t'] < cut_t - DEADLINE_MS / 1e3]
    # Cut: offloading is suspended (frames keep their edge labels) ...
    cut = [f for f in frames if f['phase'] == 3]
    assert any(f['detail'].startswith('link too slow') for f in cut), {f['detail'] for f in cut}
    # ... and comes back by itself once probes see the link again.
    back = [f for f in frames if f['phase'] == 4]
    assert [f for f in back if f['source'] == 1], {f['detail'] for f in back}
    assert not back[-1]['detail'].startswith('link too slow')
    assert statuses and png.read_bytes()[:4] == b'\x89PNG'
