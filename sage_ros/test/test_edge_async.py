# SPDX-License-Identifier: Apache-2.0
"""The asynchronous edge in separate processes on 127.0.0.1, fed real images: it boots without
a network, never waits on it, and gives every handled frame exactly one result whatever
happens to the cloud and the router."""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest
from sage_ros_msgs.msg import OffloadResult

from sage_ros.bringup import Bringup, plan
from sage_ros.images import list_images, read_rgb
from sage_ros.live_client import LiveClient, stamp_ns
from sage_ros.system_demo import free_port

EDGE, CLOUD, FALLBACK = OffloadResult.SOURCE_EDGE, OffloadResult.SOURCE_CLOUD, OffloadResult.SOURCE_EDGE_FALLBACK


@pytest.fixture(scope='module')
def images(imagenet_dir):
    return [read_rgb(i.path) for i in list_images(imagenet_dir / 'images')[200:206]]


def _stop_within(bring: Bringup, name: str, sig: int = signal.SIGINT) -> tuple[float, int]:
    """Signal one process; (seconds until it exited, exit code)."""
    proc = next(p.popen for p in bring.procs if p.name == name)
    t0 = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(timeout=10)
    return time.monotonic() - t0, code


def _edge_link(client: LiveClient, status: str = 'link') -> dict[str, str]:
    """The edge's next diagnostics status ('link' or 'stats'), as key/values (plus its message)."""
    found = client.diagnostics(f'sage_edge: {status}')
    assert found is not None, f'no {status} diagnostics from the edge'
    return found


def test_edge_boots_without_a_router_answers_at_once_and_offloads_when_one_appears(ros_env, images, tmp_path):
    endpoint = f'tcp/127.0.0.1:{free_port()}'  # nothing listens here yet
    # Second rounds on (a random-weight cloud always asks; B 32 leaves room under budget_max).
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'deadline_ms': 3000.0,
          'eta_cloud': 0.0, 'budget': 32}
    log = (tmp_path / 'nodes.log').open('w')
    edge = Bringup(plan('edge', overrides=ov), log=log)
    cloud = Bringup(plan('cloud', overrides=ov), log=log)
    client = None
    try:
        t0 = time.monotonic()
        edge.start()
        edge.wait_ready(timeout=60)
        assert time.monotonic() - t0 < 30  # model load and warm-up only: no network wait
        client = LiveClient(name='boot_client')
        assert client.wait_for_edge()
        for rgb in images[:3]:
            res = client.classify(rgb, timeout=5)
            assert res is not None, 'no result without a router'
            # Random weights are never confident: each frame wants the cloud and gets its edge label.
            assert res.source == FALLBACK and res.detail == 'no uplink', res
            assert res.latency_ms < 1000
        link = _edge_link(client)
        assert link['uplink'] != 'connected' and link['message'].startswith('no uplink')

        # SIGINT while the session is still trying to open: the node ends at once, cleanly.
        took, code = _stop_within(edge, 'edge')
        assert code == 0 and took < 2.0, (took, code)
        edge.start()
        edge.wait_ready(timeout=60)
        assert client.wait_for_edge()

        cloud.start()
        cloud.wait_ready(timeout=120)
        sources = []
        end = time.monotonic() + 60
        while CLOUD not in sources and time.monotonic() < end:
            res = client.classify(images[3], timeout=10)
            sources.append(res.source if res else None)
            client.drain(0.3)
        assert sources[-1] == CLOUD, f'offloading did not start by itself: {sources}'
        assert _edge_link(client)['uplink'] == 'connected'
        # Once the link is measured (the base-RTT probes go out after connecting), frames take
        # the second round the cloud asks for.
        later = [client.classify(rgb, timeout=10) for rgb in images[:4]]
        assert any(r is not None and r.rounds == 2 for r in later), [(r.rounds, r.detail) for r in later if r]

        # SIGINT, connected and with a request in flight.
        client.publish(images[4])
        client.drain(0.2)
        took, code = _stop_within(edge, 'edge')
        assert code == 0 and took < 2.0, (took, code)
    finally:
        if client is not None:
            client.destroy_node()
        edge.stop()
        cloud.stop()
        log.close()
    assert 'Traceback' not in (tmp_path / 'nodes.log').read_text()


def test_every_handled_frame_gets_one_result_through_cloud_and_router_kills(running_system, images):
    """A 10 fps camera with requests in flight while the cloud and then the router are killed
    (SIGKILL) and restarted: results and handled frames match one to one."""
    with running_system('kill_client', deadline_ms=1500.0, max_in_flight=4, budget_mode='fixed',
                        budget=16) as (bring, client, _):
        edge_pid = next(p.popen.pid for p in bring.procs if p.name == 'edge')
        published: list[int] = []

        def camera(seconds: float) -> None:
            end = time.monotonic() + seconds
            k = 0
            while time.monotonic() < end:
                published.append(client.publish(images[k % len(images)]))
                k += 1
                client.drain(0.1)

        camera(4)
        for victim in ('cloud', 'router'):
            proc = next(p.popen for p in bring.procs if p.name == victim)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            camera(4)
            bring.start([victim])
            bring.wait_ready(timeout=120)
            camera(6)
        client.drain(2.5)  # the last deadlines pass
        assert int(_edge_link(client)['in_flight']) == 0
        stats = {k: int(v) for k, v in _edge_link(client, status='stats').items() if k != 'message'}
    results = client.all_results
    stamps = [stamp_ns(r.header.stamp) for r in results]
    assert len(stamps) == len(set(stamps)), 'a frame got two results'
    assert set(stamps) <= set(published)
    assert next(p.popen.pid for p in bring.procs if p.name == 'edge') == edge_pid  # never restarted
    by = collections.Counter((r.source, r.detail.split(':')[0]) for r in results)
    assert by[(CLOUD, '')] > 10, by
    assert by[(FALLBACK, 'timeout')] > 0, by  # requests in flight when the cloud died
    assert by[(FALLBACK, 'no uplink')] > 0, by  # frames while the router was down
    # Exactly one result per handled frame; every published frame is accounted for.
    assert len(results) == stats['processed'] == stats['edge'] + stats['cloud'] + stats['fallback'], stats
    assert stats['received'] + stats['lost'] == len(published), stats
    assert stats['processed'] + stats['dropped'] + stats['rejected'] + stats['stale'] == stats['received'], stats


def test_a_stalled_edge_does_not_suspend_offloading(running_system, images):
    """One frame that takes far longer than the deadline (here: the whole process stopped for
    3 s, like a CPU stall) must not switch offloading off; the next frames offload again."""
    with running_system('stall_client', deadline_ms=1200.0, budget_mode='auto',
                        probe_interval_s=0.5) as (bring, client, _):
        for rgb in images[:3]:
            assert client.classify(rgb, timeout=10).source == CLOUD
        edge = next(p.popen for p in bring.procs if p.name == 'edge')
        stamp = client.publish(images[3])
        time.sleep(0.02)
        os.kill(edge.pid, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(edge.pid, signal.SIGCONT)
        assert client.wait_result(stamp, 10) is not None
        sources = [client.classify(rgb, timeout=10).source for rgb in images[:5]]
        assert sources.count(CLOUD) >= 4, sources
        assert _edge_link(client)['suspended'] == 'False'
