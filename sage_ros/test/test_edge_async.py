# SPDX-License-Identifier: Apache-2.0
"""The asynchronous edge in separate processes on 127.0.0.1, fed real images: it boots without
a network, never waits on it, and gives every handled frame exactly one result whatever
happens to the cloud and the router.

Phases end on events (a cloud answer, a timeout, a 'no uplink' fallback), never after a span
of time a slower machine might need more of; deadlines are set from the round trip measured
here, so that a frame misses one only where the test makes it."""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import time
from types import SimpleNamespace
from typing import Callable

import pytest
import zenoh
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.serialization import deserialize_message
from sage_ros_msgs.msg import OffloadResult, PatchSet

from sage_ros.commands.bringup import Bringup, plan
from sage_ros.commands.images import list_images, read_rgb
from sage_ros.ros.live_client import LiveClient, stamp_ns
from sage_ros.commands.system_demo import free_port
from conftest import stop_by_signal, system_up

EDGE, CLOUD, FALLBACK = OffloadResult.SOURCE_EDGE, OffloadResult.SOURCE_CLOUD, OffloadResult.SOURCE_EDGE_FALLBACK


@pytest.fixture(scope='module')
def images(imagenet_dir):
    return [read_rgb(i.path) for i in list_images(imagenet_dir / 'images')[200:206]]


@pytest.fixture(scope='module')
def system(ros_env, tmp_path_factory):
    """Router, cloud and edge (random weights), shared by the tests that restart or stall
    them: each sets the parameters it relies on."""
    log_dir = tmp_path_factory.mktemp('edge_async')
    with system_up(log_dir, 'async_client') as (bring, client, endpoint):
        yield SimpleNamespace(bring=bring, client=client, endpoint=endpoint)
    assert 'Traceback' not in (log_dir / 'async_client.log').read_text()


def _proc(bring: Bringup, name: str):
    return next(p.popen for p in bring.procs if p.name == name)


def _edge_link(client: LiveClient, status: str = 'link') -> dict[str, str]:
    """The edge's next diagnostics status ('link' or 'stats'), as key/values (plus its message)."""
    found = client.diagnostics(f'sage_edge: {status}')
    assert found is not None, f'no {status} diagnostics from the edge'
    return found


def _set_edge(client: LiveClient, **values) -> None:
    params = AsyncParameterClient(client, 'sage_edge')
    assert params.wait_for_services(timeout_sec=10.0)
    future = params.set_parameters([Parameter(k, value=v) for k, v in values.items()])
    client.spin_until_future_complete(future, timeout=10.0)
    assert all(r.successful for r in future.result().results), future.result()


@contextlib.contextmanager
def _requests_on_the_wire(endpoint: str):
    """Ids of the requests the edge puts on the Zenoh key sage/patch_set, as the router passes
    them on (link probes left out): proof that a request is in flight."""
    session = zenoh.open(zenoh.Config.from_json5(
        f'{{mode: "client", connect: {{endpoints: ["{endpoint}"]}}, scouting: {{multicast: {{enabled: false}}}}}}'))
    seen: list[str] = []

    def on_request(sample) -> None:
        msg = deserialize_message(sample.payload.to_bytes(), PatchSet)
        if msg.method != PatchSet.METHOD_PROBE:
            seen.append(msg.request_id)

    watch = session.declare_subscriber('sage/patch_set', on_request)
    try:
        yield seen
    finally:
        watch.undeclare()
        session.close()


def _publish_until_on_the_wire(client: LiveClient, seen: list[str], rgb) -> int:
    """Publish a frame and return once its request was seen on the wire (a hang guard of 60 s)."""
    before = len(seen)
    stamp = client.publish(rgb)
    end = time.monotonic() + 60
    while len(seen) == before and time.monotonic() < end:
        client.drain(0.01)
    assert len(seen) > before, 'the frame was not offloaded'
    return stamp


def _calibrated_deadline_ms(client: LiveClient, images, **params) -> float:
    """With ``params`` and a deadline no frame meets its end of, the round trip of a frame
    here (edge, uplink, cloud); returns three times the slowest of three, at least 1 s: a
    deadline that only a stall or a stopped cloud makes a frame miss."""
    _set_edge(client, deadline_ms=60000.0, **params)
    latencies = []
    for rgb in images[:3]:
        res = client.classify(rgb, timeout=90)
        assert res is not None and res.source == CLOUD, res and res.detail
        latencies.append(res.latency_ms)
    return max(1000.0, 3 * max(latencies))


def test_edge_boots_without_a_router_answers_at_once_and_offloads_when_one_appears(ros_env, images, tmp_path):
    endpoint = f'tcp/127.0.0.1:{free_port()}'  # nothing listens here yet
    # Second rounds on (a random-weight cloud always asks; B 32 leaves room under budget_max);
    # a deadline far beyond any round trip here, so both rounds always fit.
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'deadline_ms': 20000.0,
          'eta_cloud': 0.0, 'budget': 32}
    log = (tmp_path / 'nodes.log').open('w')
    edge = Bringup(plan('edge', overrides=ov), log=log)
    cloud = Bringup(plan('cloud', overrides=ov), log=log)
    client = None
    try:
        # Ready with no router anywhere: model load and warm-up only, no network wait (the
        # timeout is a hang guard).
        edge.start()
        edge.wait_ready(timeout=120)
        client = LiveClient(name='boot_client')
        assert client.wait_for_edge()
        for rgb in images[:3]:
            res = client.classify(rgb, timeout=30)
            assert res is not None, 'no result without a router'
            # Random weights are never confident: each frame wants the cloud and gets its edge
            # label, refused at admission ('no uplink'), not after waiting for its deadline.
            assert res.source == FALLBACK and res.detail == 'no uplink', res
        link = _edge_link(client)
        assert link['uplink'] != 'connected' and link['message'].startswith('no uplink')
        assert int(_edge_link(client, 'stats')['timeouts']) == 0

        # SIGINT while the session is still trying to open: the node ends by itself, cleanly.
        assert stop_by_signal(_proc(edge, 'edge'), signal.SIGINT) == 0
        # The edge again, and the cloud node loading meanwhile (it waits for a router); the
        # router appears only once the edge is up.
        edge.start()
        cloud.start(['cloud'])
        edge.wait_ready(timeout=240)
        assert client.wait_for_edge()
        cloud.start(['router'])
        cloud.wait_ready(timeout=240)
        with _requests_on_the_wire(endpoint) as seen:
            sources = []
            end = time.monotonic() + 120  # a hang guard
            while CLOUD not in sources and time.monotonic() < end:
                res = client.classify(images[3], timeout=30)
                sources.append(res.source if res else None)
                client.drain(0.3)
            assert sources[-1] == CLOUD, f'offloading did not start by itself: {sources}'
            assert _edge_link(client)['uplink'] == 'connected'
            # Once the link is measured (the base-RTT probes go out after connecting, one a
            # second), frames take the second round the cloud asks for.
            later = []
            end = time.monotonic() + 60  # a hang guard
            while not any(r is not None and r.rounds == 2 for r in later) and time.monotonic() < end:
                later.append(client.classify(images[len(later) % 4], timeout=30))
            assert any(r is not None and r.rounds == 2 for r in later), [(r.rounds, r.detail) for r in later if r]

            # SIGINT, connected and with a request in flight: the cloud is stopped, so its
            # answer cannot come first; the request was seen on the wire before the signal.
            cloud_proc = _proc(cloud, 'cloud')
            os.kill(cloud_proc.pid, signal.SIGSTOP)
            try:
                _publish_until_on_the_wire(client, seen, images[4])
                assert stop_by_signal(_proc(edge, 'edge'), signal.SIGINT) == 0
            finally:
                os.kill(cloud_proc.pid, signal.SIGCONT)
    finally:
        if client is not None:
            client.destroy_node()
        edge.stop()
        cloud.stop()
        log.close()
    assert 'Traceback' not in (tmp_path / 'nodes.log').read_text()


def test_a_stalled_edge_does_not_suspend_offloading(system, images):
    """One frame that takes far longer than the deadline (here: the whole process stopped for
    1.5 deadlines, like a CPU stall) must not switch offloading off; the next frames offload
    again."""
    client, bring = system.client, system.bring
    deadline_ms = _calibrated_deadline_ms(client, images, budget_mode='auto', probe_interval_s=0.5)
    _set_edge(client, deadline_ms=deadline_ms)
    edge = _proc(bring, 'edge')
    with _requests_on_the_wire(system.endpoint) as seen:
        end = time.monotonic() + 60  # a hang guard
        while not seen:  # until the watch is routed: its first request seen
            assert time.monotonic() < end, 'no request seen on the wire'
            res = client.classify(images[0], timeout=30)
            assert res is not None and res.source == CLOUD, res and res.detail
            client.drain(0.1)
        # A request out, and likely the next frame inside the worker, when the process stops:
        # the answer is read, and the frame finished, only well past their deadlines.
        stamp = _publish_until_on_the_wire(client, seen, images[3])
        stamps = [stamp, client.publish(images[4])]
        os.kill(edge.pid, signal.SIGSTOP)
        time.sleep(1.5 * deadline_ms / 1e3)
        os.kill(edge.pid, signal.SIGCONT)
    assert client.wait_result(stamps[0], 30) is not None
    client.wait_result(stamps[1], 30)  # the frame may have reached the edge only after the stall, or not at all
    results = [client.classify(rgb, timeout=30) for rgb in images[:5]]
    assert sum(r is not None and r.source == CLOUD for r in results) >= 4, \
        [(r.source, r.detail) if r else None for r in results]
    assert _edge_link(client)['suspended'] == 'False'


def test_every_handled_frame_gets_one_result_through_cloud_and_router_kills(system, images):
    """A 10 fps camera with requests in flight while the cloud and then the router are killed
    (SIGKILL) and restarted: results and handled frames match one to one."""
    client, bring = system.client, system.bring
    deadline_ms = _calibrated_deadline_ms(client, images, max_in_flight=4, budget=16)
    _set_edge(client, deadline_ms=deadline_ms)
    edge_pid = _proc(bring, 'edge').pid
    before = {k: int(v) for k, v in _edge_link(client, status='stats').items() if k != 'message'}
    start = len(client.all_results)
    published: list[int] = []

    def camera_until(done: Callable[[list[OffloadResult]], bool], what: str) -> None:
        """A 10 fps camera until ``done`` holds for the results that came since it started."""
        first = len(client.all_results)
        end = time.monotonic() + 180  # a hang guard
        k = 0
        while not done(client.all_results[first:]):
            assert time.monotonic() < end, f'no {what}: {[(r.source, r.detail) for r in client.all_results[first:]]}'
            published.append(client.publish(images[k % len(images)]))
            k += 1
            client.drain(0.1)

    def cloud_answers(n: int) -> Callable[[list[OffloadResult]], bool]:
        return lambda rs: sum(r.source == CLOUD for r in rs) >= n

    def fallback(detail: str) -> Callable[[list[OffloadResult]], bool]:
        return lambda rs: any(r.source == FALLBACK and r.detail == detail for r in rs)

    def kill_and_restart(victim: str) -> None:
        """SIGKILL ``victim``: frames keep their edge labels ('no uplink') until it is back,
        then offloading resumes by itself."""
        proc = _proc(bring, victim)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        camera_until(fallback('no uplink'), f"'no uplink' while the {victim} was gone")
        bring.start([victim])
        bring.wait_ready(timeout=240)
        camera_until(cloud_answers(1), f'a cloud answer after the {victim} restarted')

    camera_until(cloud_answers(5), 'cloud answers')
    # The cloud stops answering with requests in flight: they fall back at their deadline.
    os.kill(_proc(bring, 'cloud').pid, signal.SIGSTOP)
    camera_until(fallback('timeout'), 'timeout while the cloud was stopped')
    kill_and_restart('cloud')
    kill_and_restart('router')
    # The last frame published is never replaced by a newer one: once it has its result, the
    # edge has received every frame it will.
    end = time.monotonic() + 60  # a hang guard (a best-effort camera frame can be lost)
    while client.wait_result(published[-1], 10) is None and time.monotonic() < end:
        published.append(client.publish(images[0]))
    assert published[-1] in client.results
    # No request is left in flight once the last deadlines have passed.
    end = time.monotonic() + 60  # a hang guard
    while int(_edge_link(client)['in_flight']) and time.monotonic() < end:
        client.drain(0.5)
    assert int(_edge_link(client)['in_flight']) == 0
    after = {k: int(v) for k, v in _edge_link(client, status='stats').items() if k != 'message'}
    stats = {k: after[k] - before[k] for k in after}
    end = time.monotonic() + 30  # results may trail the diagnostics that counted them
    while len(client.all_results) - start < stats['processed'] and time.monotonic() < end:
        client.drain(0.1)
    results = client.all_results[start:]
    stamps = [stamp_ns(r.header.stamp) for r in results]
    assert len(stamps) == len(set(stamps)), 'a frame got two results'
    assert set(stamps) <= set(published)
    assert _proc(bring, 'edge').pid == edge_pid  # never restarted
    by = collections.Counter((r.source, r.detail.split(':')[0]) for r in results)
    assert by[(CLOUD, '')] >= 7, by
    # Exactly one result per handled frame; every published frame is accounted for.
    assert len(results) == stats['processed'] == stats['edge'] + stats['cloud'] + stats['fallback'], (stats, by)
    assert stats['received'] + stats['lost'] == len(published), stats
    assert stats['processed'] + stats['dropped'] + stats['rejected'] + stats['stale'] == stats['received'], stats
