# SPDX-License-Identifier: Apache-2.0
"""The cloud serving a fleet, as mechanisms: CloudNode with a server backend whose forwards the
test times (it holds each forward until the test lets it finish, or sleeps a time the test
sets), fed requests directly. Every assertion is on an order or a count, never on this
machine's speed. The end-to-end figures (a real edge under a flood at 5x the cloud's measured
capacity, 200 and 500 robots, 10,000 robot keys) are printed by `sage-ros bench --fleet`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.serialization import deserialize_message, serialize_message
from sage_ros_msgs.msg import CloudResult, PatchSet

MARKERS = {'flood': 1, 'calm': 2, 'other': 3, 'robot1': 4, 'intruder': 5}
"""Each robot's patches carry its marker as pixel value: the backend sees whose tokens it runs."""
NAMES = {v: k for k, v in MARKERS.items()}


class TimedBackend:
    """A server backend whose forward takes the time the test sets: ``forward_s`` of sleep, or,
    while ``held``, until the test calls :meth:`finish`. It records whose tokens each forward
    ran, in order."""

    name, weights, random_weights, geometry = 'timed', 'random:0', True, (14, 14, 16, 224)

    def __init__(self, forward_s: float = 0.0, *, held: bool = False) -> None:
        self.forward_s, self.held = forward_s, held
        self.forwards: list[list[tuple[str, ...]]] = []
        """Per forward, per request: the robots whose patches it held (a union can hold two)."""
        self._started: queue.Queue[list[tuple[str, ...]]] = queue.Queue()
        self._go = threading.Semaphore(0)

    def classify_attended(self, requests):
        owners = [tuple(sorted({NAMES[int(v)] for v in patches[:, 0, 0, 0]})) for patches, _ in requests]
        self.forwards.append(owners)
        if self.held:
            self._started.put(owners)
            assert self._go.acquire(timeout=60), 'the test never finished a held forward'
        else:
            time.sleep(self.forward_s)
        return np.full((len(requests), 1000), 1e-3, np.float32), [np.full(len(i), 1.0 / len(i)) for _, i in requests]

    def classify(self, requests):
        return self.classify_attended(requests)[0]

    def next_forward(self) -> list[tuple[str, ...]]:
        """The owners of the next held forward, once it has started (it runs until finish())."""
        return self._started.get(timeout=60)

    def finish(self) -> None:
        self._go.release()

    def close(self) -> None:
        self.held = False
        for _ in range(64):
            self._go.release()


def request(robot: str, n: int, rid: str, *, deadline_ms: float = 0.0, round_: int = 1, first: int = 0,
            second_round_max: int = 0) -> bytes:
    """A PatchSet of ``n`` raw patches (grid indices from ``first``) marked as ``robot``'s."""
    msg = PatchSet(request_id=rid, robot_id=robot, input_size=224, patch_size=16, grid_rows=14, grid_cols=14,
                   budget_patches=first + n, method='sage', indices=np.arange(first, first + n, dtype=np.uint16),
                   encoding='raw', payload=bytes([MARKERS[robot]]) * (768 * n), deadline_left_ms=deadline_ms,
                   round=round_, second_round_max=second_round_max, second_round_ms=50.0 if second_round_max else 0.0)
    return serialize_message(msg)


class Answers:
    """Every answer the cloud sent, by robot and request id, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.all: list[tuple[str, CloudResult]] = []

    def reply_to(self, robot: str):
        def reply(data: bytes) -> None:
            with self._lock:
                self.all.append((robot, deserialize_message(data, CloudResult)))
        return reply

    def of(self, rid: str) -> list[CloudResult]:
        with self._lock:
            return [a for _, a in self.all if a.request_id == rid]

    def wait(self, count: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while len(self.all) < count:
            assert time.monotonic() < end, f'{len(self.all)} of {count} answers'
            time.sleep(0.01)


@contextlib.contextmanager
def cloud(monkeypatch, backend: TimedBackend, **params):
    """A CloudNode in this process on ``backend``; yields (node, answers, send)."""
    from sage_ros.nodes.cloud_node import CloudNode

    monkeypatch.setattr(CloudNode, '_new_backend', staticmethod(lambda p: backend))
    overrides = {'transport': 'ros', 'weights': 'random', 'batch_wait_ms': 0.0, **params}
    node = CloudNode(parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
    answers = Answers()

    def send(robot: str, n: int, rid: str, **kw) -> None:
        node._enqueue(robot, request(robot, n, rid, **kw), answers.reply_to(robot))

    try:
        yield node, answers, send
    finally:
        backend.close()
        node.destroy_node()


@pytest.mark.parametrize('max_batch', [1, 8])
def test_the_calm_robot_waits_at_most_the_forward_running_when_it_arrives(ros_env, monkeypatch, max_batch):
    """A flood of 196-patch requests, two more for every forward; now and then a calm robot's
    32-patch request arrives while a flood forward runs. The next forward is the calm robot's:
    it waits for at most that one forward of another robot. The flood sheds only its own."""
    backend = TimedBackend(held=True)
    with cloud(monkeypatch, backend, max_batch=max_batch, max_queue_per_robot=4) as (node, answers, send):
        flood = 0
        for _ in range(8):
            send('flood', 196, f'flood/{flood}')
            flood += 1
        order, calm_at = [], []
        for step in range(18):
            order.append(backend.next_forward())  # running now, held
            if step % 3 == 0:
                calm_at.append(step)
                send('calm', 32, f'calm/{len(calm_at)}')
            for _ in range(2):
                send('flood', 196, f'flood/{flood}')
                flood += 1
            backend.finish()
        backend.held = False
        backend.finish()
        answers.wait(flood + len(calm_at))
    robots = [sorted({o[0] for o in fwd}) for fwd in order]
    for step in calm_at:  # the forward after its arrival is the calm robot's, and it holds nobody else
        assert robots[step + 1] == ['calm'], robots
    assert robots == [['calm'] if step - 1 in calm_at else ['flood'] for step in range(18)]
    by_robot = {robot: [a for r, a in answers.all if r == robot] for robot in ('flood', 'calm')}
    assert all(a.status == CloudResult.STATUS_OK for a in by_robot['calm'])
    assert len({a.request_id for a in by_robot['flood']}) == flood == len(by_robot['flood'])  # one answer each
    busy = [a for a in by_robot['flood'] if a.status == CloudResult.STATUS_BUSY]
    assert busy and all(a.detail == 'overloaded' for a in busy)
    assert node.stats['shed'] == len(busy) and node.stats['late'] == 0


def test_a_request_that_cannot_be_answered_in_time_is_answered_busy_at_once_and_never_computed(ros_env,
                                                                                             monkeypatch):
    backend = TimedBackend(forward_s=0.2)
    with cloud(monkeypatch, backend, max_batch=1) as (node, answers, send):
        send('calm', 32, 'calm/0')  # the cloud measures its forward: at least 0.2 s for 33 tokens
        answers.wait(1)
        end = time.monotonic() + 60
        while node._scheduler.predict_s(33) == 0:  # recorded just after the answer went out
            assert time.monotonic() < end
            time.sleep(0.01)
        assert node._scheduler.predict_s(33) >= 0.2
        # A deadline shorter than one forward: answered in the very call that received it.
        send('calm', 32, 'calm/1', deadline_ms=50.0)
        [late] = answers.of('calm/1')
        assert late.status == CloudResult.STATUS_BUSY and late.detail.startswith('late')
        # One that fits when it comes, then waits behind a forward held past its deadline: it is
        # answered as soon as the cloud sees it is too late (here: the next request), not computed.
        backend.held = True
        send('other', 32, 'other/0')
        backend.next_forward()
        left_s = 2 * node._scheduler.predict_s(33) + 0.3
        send('calm', 32, 'calm/2', deadline_ms=left_s * 1e3)
        assert answers.of('calm/2') == []  # queued: it could still make it
        time.sleep(left_s + 0.1)  # past its deadline, whatever this machine's speed
        send('other', 32, 'other/1')
        [late] = answers.of('calm/2')
        assert late.status == CloudResult.STATUS_BUSY and late.detail.startswith('late')
        backend.held = False
        backend.finish()
        answers.wait(5)
    assert [fwd for fwd in backend.forwards if ('calm',) in fwd] == [[('calm',)]]  # calm/0 only
    assert node.stats['late'] == 2 and node.stats['answered'] == 3


def test_diagnostics_summarise_thousands_of_robots_while_they_arrive(ros_env, monkeypatch):
    """5,000 robot keys while diagnostics are read (the crash of the issue): no failure, a
    summary of a fixed size, state for at most max_robots robots, and one answer per request."""
    backend = TimedBackend()
    errors: list[BaseException] = []
    data = request('other', 4, 'other/0')
    with cloud(monkeypatch, backend, max_robots=200) as (node, answers, send):
        stop = threading.Event()
        sizes = set()

        def read() -> None:
            try:
                while not stop.is_set():
                    status = node._robots_status()
                    values = {kv.key: kv.value for kv in status.values}
                    sizes.add(len(status.values))
                    assert int(values['robots']) <= 200 + 32
                    assert values['busiest'] == '-' or values['busiest'].count(',') <= 2
            except BaseException as exc:  # noqa: BLE001 - any failure fails the test
                errors.append(exc)

        def intake(prefix: str) -> None:
            try:
                for i in range(2500):
                    node._enqueue(f'{prefix}{i}', data, answers.reply_to(f'{prefix}{i}'))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        reader = threading.Thread(target=read)
        writers = [threading.Thread(target=intake, args=(p,)) for p in ('a', 'b')]
        for t in [reader, *writers]:
            t.start()
        for t in writers:
            t.join()
        answers.wait(5000)
        stop.set()
        reader.join()
        assert errors == [] and sizes == {11}
        assert len({robot for robot, _ in answers.all}) == 5000 and len(answers.all) == 5000
        assert node._scheduler.summary().tracked <= 200 + 32


def test_another_key_cannot_touch_a_robots_round_one(ros_env, monkeypatch):
    """Round 1 under robot1's request id sent on another robot's key is kept apart: robot1's
    round 2 is classified with robot1's own round-1 tokens."""
    backend = TimedBackend()
    with cloud(monkeypatch, backend, eta_cloud=0.0, second_round_k=8) as (node, answers, send):
        rid = 'robot1/7-00aa11bb22cc33dd'
        send('robot1', 16, rid, deadline_ms=5000.0, second_round_max=8)
        answers.wait(1)
        send('intruder', 16, rid, deadline_ms=5000.0, second_round_max=8)
        answers.wait(2)
        assert [a.status for _, a in answers.all] == [CloudResult.STATUS_MORE] * 2
        send('robot1', 8, rid, round_=2, first=16, deadline_ms=4000.0)
        answers.wait(3)
    robot, final = answers.all[-1]
    assert robot == 'robot1' and final.status == CloudResult.STATUS_OK and final.round == 2
    assert final.patches_received == 24
    assert backend.forwards[-1] == [('robot1',)]  # the union: robot1's tokens only
