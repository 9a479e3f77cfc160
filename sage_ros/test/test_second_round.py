# SPDX-License-Identifier: Apache-2.0
"""Two-round evidence end to end, in separate processes fed real images: the cloud, unsure
(eta_cloud 0: always, with random weights), asks for more patches; the edge sends them
within budget_max and the deadline; every frame gets exactly one final result, whatever the
link, the cloud or a hostile robot does between the rounds.

Nothing here depends on how fast this machine runs the models: round-1 tokens are kept far
longer than the tests take (a long round_one_ttl_s, long deadlines), and where a deadline must
hold one round but not two, it is set from the round trip measured first."""

from __future__ import annotations

import signal
import threading
import time

import numpy as np
import pytest
import zenoh
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient
from rclpy.serialization import deserialize_message, serialize_message
from sage_ros_msgs.msg import CloudResult, OffloadResult, PatchSet

from sage_ros.bench.fleet import real_requests
from sage_ros.commands.images import list_images, read_rgb
from sage_ros.ros.live_client import LiveClient
from conftest import wait_uplink

CLOUD = OffloadResult.SOURCE_CLOUD
B, BUDGET_MAX, K = 32, 44, 16
ROUND_ONE_MAX = 6
# The cloud runs DeiT-Tiny here: the mechanics are what is tested, and it keeps the test fast.
# Round-1 tokens are kept up to 10 min: only the count bound (round_one_max) and the requests'
# own deadlines end them here.
BASE = {'eta': 0.0, 'budget': B, 'budget_max': BUDGET_MAX, 'eta_cloud': 0.0,
        'second_round_k': K, 'round_one_max': ROUND_ONE_MAX, 'round_one_ttl_s': 600.0,
        'sage_cloud.model': 'deit_tiny_patch16_224'}
# What a virtual robot's round 1 says is left of its deadline: longer than the test.
LONG_MS = 600_000.0


@pytest.fixture(scope='module')
def images(imagenet_dir):
    return [read_rgb(i.path) for i in list_images(imagenet_dir / 'images')[300:310]]


def _set(client: LiveClient, node: str, **values) -> None:
    params = AsyncParameterClient(client, node)
    assert params.wait_for_services(timeout_sec=10.0)
    future = params.set_parameters([Parameter(k, value=v) for k, v in values.items()])
    client.spin_until_future_complete(future, timeout=10.0)
    assert all(r.successful for r in future.result().results), future.result()


def _counters(client: LiveClient, node: str) -> dict[str, str]:
    found = client.diagnostics(f'{node}: stats', timeout=5.0)
    assert found is not None, f'no diagnostics from {node}'
    return found


def _frames(client: LiveClient, images, *, timeout: float = 60.0) -> list[OffloadResult]:
    """One frame at a time; exactly one final result each."""
    stamps = []
    for rgb in images:
        stamps.append(client.publish(rgb))
        assert client.wait_result(stamps[-1], timeout) is not None, 'a frame got no result'
    client.drain(0.5)  # a second result for a frame would arrive now
    mine = [r for r in client.all_results if r.header.stamp.sec * 10**9 + r.header.stamp.nanosec in stamps]
    assert len(mine) == len(stamps), f'{len(mine)} results for {len(stamps)} frames'
    return [client.results[s] for s in stamps]


def _check_union(results: list[OffloadResult]) -> None:
    for r in results:
        assert r.source == CLOUD, (r.source, r.detail)
        assert r.patches_sent <= BUDGET_MAX and r.second_round_patches <= BUDGET_MAX - B
        assert r.patches_sent == B + r.second_round_patches and r.bytes_sent > r.second_round_bytes
        assert (r.rounds == 2) == (r.second_round_patches > 0), (r.rounds, r.second_round_patches, r.detail)


class _VirtualRobot:
    """A robot that speaks Zenoh to the cloud directly: requests as it likes, answers collected."""

    def __init__(self, session: zenoh.Session, robot: str, requests: list[PatchSet]) -> None:
        self.session, self.robot, self.requests = session, robot, requests
        self.answers: list[CloudResult] = []
        self._got = threading.Condition()
        self._sub = session.declare_subscriber(f'{robot}/sage/cloud_result', self._on_answer)

    def _on_answer(self, sample) -> None:
        answer = deserialize_message(sample.payload.to_bytes(), CloudResult)
        with self._got:
            self.answers.append(answer)
            self._got.notify_all()

    def _for(self, rid: str) -> list[CloudResult]:
        return [a for a in self.answers if a.request_id == rid]

    def send(self, msg: PatchSet, *, wait: bool = True) -> CloudResult | None:
        """Send; with ``wait``, the cloud's next answer to this request id."""
        with self._got:
            seen = len(self._for(msg.request_id))
        self.session.put(f'{self.robot}/sage/patch_set', serialize_message(msg))
        if not wait:
            return None
        with self._got:
            self._got.wait_for(lambda: len(self._for(msg.request_id)) > seen, 15.0)
            got = self._for(msg.request_id)
            return got[-1] if len(got) > seen else None

    def round_one(self, rid: str, i: int = 0, *, offer: int = K, deadline_left_ms: float = LONG_MS,
                  second_round_ms: float = 0.0) -> PatchSet:
        msg = self.requests[i % len(self.requests)]
        msg.request_id, msg.round = rid, 1
        msg.second_round_max, msg.deadline_left_ms, msg.second_round_ms = offer, deadline_left_ms, second_round_ms
        return msg

    def round_two(self, rid: str, indices: list[int]) -> PatchSet:
        n = len(self.requests[0].indices) + len(indices)
        return PatchSet(request_id=rid, robot_id=self.robot, round=2, input_size=224, patch_size=16, grid_rows=14,
                        grid_cols=14, budget_patches=n, method='sage', indices=np.asarray(indices, np.uint16),
                        encoding='raw', payload=np.full(len(indices) * 768, 128, np.uint8).tobytes())

    def close(self) -> None:
        self._sub.undeclare()


def test_second_round_continue_roi_off_hostile_and_bounded(running_system, images):
    # A deadline far beyond two rounds here: the edge offers a second round once it has measured
    # the link (its first answer), whatever this machine's speed.
    with running_system('rounds', deadline_ms=20000.0, **BASE) as (bring, client, endpoint):
        # continue: round 1 measures the link; from then on the cloud asks and gets K' more.
        cont = _frames(client, images[:5])
        _check_union(cont)
        assert sum(r.rounds == 2 for r in cont) >= 4, [(r.rounds, r.detail) for r in cont]
        assert all(r.patches_sent == BUDGET_MAX for r in cont if r.rounds == 2)  # K=16 clipped to budget_max
        # roi: around the patches the cloud attended most.
        _set(client, 'sage_edge', second_round='roi')
        roi = _frames(client, images[5:9])
        _check_union(roi)
        assert sum(r.rounds == 2 for r in roi) >= 3, [(r.rounds, r.detail) for r in roi]
        # off: requests offer no second round, so the cloud does not ask.
        asked = int(_counters(client, 'sage_cloud')['more_asked'])
        _set(client, 'sage_edge', second_round='off')
        off = _frames(client, images[:3])
        assert all(r.source == CLOUD and r.rounds == 1 and r.patches_sent == B for r in off)
        assert int(_counters(client, 'sage_cloud')['more_asked']) == asked
        edge = client.diagnostics('sage_edge: link')
        assert int(edge['second_rounds']) >= 7  # the monitor counted them as traffic

        # Hostile second rounds, from robots that speak Zenoh to the cloud directly.
        session = zenoh.open(zenoh.Config.from_json5(
            f'{{mode: "client", connect: {{endpoints: ["{endpoint}"]}}, scouting: {{multicast: {{enabled: false}}}}}}'))
        reqs = real_requests(images[:3], 'alice', B, codec='raw')
        alice = _VirtualRobot(session, 'alice', reqs)
        mallory = _VirtualRobot(session, 'mallory', real_requests(images[:3], 'mallory', B, codec='raw'))
        try:
            before = _counters(client, 'sage_cloud')
            # A deadline that leaves no time: answered at once, no second round asked.
            quick = alice.send(alice.round_one('alice/q-1', deadline_left_ms=100.0, second_round_ms=500.0))
            assert quick.status == CloudResult.STATUS_OK and quick.round == 1
            ask = alice.send(alice.round_one('alice/1-aa'))
            assert ask.status == CloudResult.STATUS_MORE and 0 < ask.more_patches <= K and len(ask.labels)
            assert len(ask.roi_indices) and set(ask.roi_indices) <= set(reqs[0].indices)
            fresh = [i for i in range(196) if i not in set(reqs[0].indices)][:ask.more_patches]
            refused = [
                alice.send(alice.round_two('alice/never-asked', fresh)),        # unknown id
                mallory.send(mallory.round_two('alice/1-aa', fresh)),           # another robot's id
                alice.send(alice.round_two('alice/1-aa', [int(reqs[0].indices[0])] + fresh[1:])),  # repeats round 1
            ]
            ask2 = alice.send(alice.round_one('alice/2-bb'))
            assert ask2.status == CloudResult.STATUS_MORE
            refused += [
                alice.send(alice.round_two('alice/2-bb', [500] + fresh[1:])),   # out of range
                alice.send(alice.round_two('alice/2-bb', [fresh[0], fresh[0]])),  # repeated in itself
            ]
            for r in refused:
                assert r is not None and r.status == CloudResult.STATUS_REJECTED, r
            # Round-1 state is keyed by robot and request id: under mallory's key alice's id is unknown.
            assert 'unknown request' in refused[0].detail and 'unknown request' in refused[1].detail
            assert 'repeats patches of round 1' in refused[2].detail
            # The refusals did not cost alice her real second round.
            done = alice.send(alice.round_two('alice/2-bb', fresh))
            assert done.status == CloudResult.STATUS_OK and done.round == 2
            assert done.patches_received == len(reqs[0].indices) + len(fresh)
            after = _counters(client, 'sage_cloud')
            assert int(after['second_round_rejected']) - int(before['second_round_rejected']) == 5
            assert int(after['rejected']) - int(before['rejected']) == 5

            # Round-one state stays bounded while robots ask and never come back; the real
            # edge still gets one final result per frame (round 1's when its state was evicted).
            _set(client, 'sage_edge', second_round='continue')
            stop = threading.Event()

            def flood(robot: _VirtualRobot) -> None:
                k = 0
                while not stop.is_set():
                    robot.send(robot.round_one(f'{robot.robot}/f{k}-cc', k), wait=False)
                    k += 1
                    time.sleep(0.02)

            floods = [threading.Thread(target=flood, args=(r,)) for r in (alice, mallory)]
            for t in floods:
                t.start()
            try:
                under_load = _frames(client, images[:4], timeout=60.0)
                # Until more robots asked than round_one_max holds (an event, not a span of time).
                kept, evicted = [], 0
                end = time.monotonic() + 120  # a hang guard
                while not evicted and time.monotonic() < end:
                    counters = _counters(client, 'sage_cloud')
                    kept.append(int(counters['round_one_kept']))
                    evicted = int(counters['round_one_evicted'])
            finally:
                stop.set()
                for t in floods:
                    t.join(10)
            assert all(r.source in (CLOUD, OffloadResult.SOURCE_EDGE_FALLBACK) for r in under_load)
            assert evicted > 0 and max(kept) <= ROUND_ONE_MAX, (evicted, kept)
        finally:
            alice.close()
            mallory.close()
            session.close()


def test_no_second_round_past_the_deadline_and_a_cloud_restart_between_rounds(running_system, images):
    # 1 s each way between the robot and the router: a round takes 2 s or more.
    with running_system('slow', relay_delay_s=1.0, deadline_ms=60000.0, second_round='off',
                        **BASE) as (bring, client, endpoint):
        # One round's time here, link and models (the edge's first offloaded frame: no faster
        # than the next): the deadlines below hold two rounds (3x), or one with room to spare
        # but not two (1.8x: the edge plans with 85 % of it, and two rounds take about 2x).
        one_round_ms = _frames(client, images[8:9], timeout=120.0)[0].latency_ms
        _set(client, 'sage_edge', second_round='continue', deadline_ms=3 * one_round_ms)
        first = _frames(client, images[:2], timeout=120.0)
        _check_union(first)
        assert first[-1].rounds == 2, first[-1].detail  # 3 rounds' time holds two
        # 1.8 rounds' time holds one round but not two: the edge offers none, the cloud asks none.
        asked = int(_counters(client, 'sage_cloud')['more_asked'])
        _set(client, 'sage_edge', deadline_ms=1.8 * one_round_ms)
        tight = _frames(client, images[2:5], timeout=120.0)
        assert all(r.source == CLOUD and r.rounds == 1 for r in tight), [(r.source, r.rounds, r.detail) for r in tight]
        assert int(_counters(client, 'sage_cloud')['more_asked']) == asked

        # The cloud restarts between the rounds: its answer asking for more is on its way back
        # (1 s), round 2 reaches a router without a cloud. The frame gets round 1's answer at
        # its deadline, not a hang; then the new cloud serves two rounds again.
        _set(client, 'sage_edge', deadline_ms=3 * one_round_ms)
        cloud = next(p for p in bring.procs if p.name == 'cloud')
        # Watch the cloud's answers at the router, before the relay delays them.
        asked = threading.Event()
        session = zenoh.open(zenoh.Config.from_json5(
            f'{{mode: "client", connect: {{endpoints: ["{endpoint}"]}}, scouting: {{multicast: {{enabled: false}}}}}}'))

        def on_answer(sample) -> None:
            if deserialize_message(sample.payload.to_bytes(), CloudResult).status == CloudResult.STATUS_MORE:
                asked.set()

        watch = session.declare_subscriber('**/sage/cloud_result', on_answer)
        stamp = client.publish(images[5])
        # Kill it as soon as it has asked (about 1 s in): round 2 is then 2 s away from it.
        try:
            assert asked.wait(60.0), 'the cloud never asked for a second round'
        finally:
            watch.undeclare()
            session.close()
        cloud.popen.send_signal(signal.SIGKILL)
        cloud.popen.wait(10)
        res = client.wait_result(stamp, 120.0)  # a hang guard; the deadline is the edge's
        assert res is not None and res.source == CLOUD and res.rounds == 1, res
        # Round 2 lost on the way: given up at the deadline ('timeout' comes only from the
        # deadline watcher), or not sent at all once the edge heard the cloud was gone.
        assert 'second round failed (timeout)' in res.detail or res.detail == 'no second round: no uplink', res.detail
        bring.start(['cloud'])
        bring.wait_ready(timeout=120)
        wait_uplink(client)
        again = _frames(client, images[6:8], timeout=120.0)
        assert all(r.source == CLOUD for r in again), [(r.source, r.detail) for r in again]
        assert any(r.rounds == 2 for r in again), [(r.rounds, r.detail) for r in again]
