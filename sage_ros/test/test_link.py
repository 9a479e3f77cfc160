# SPDX-License-Identifier: Apache-2.0
"""Bandwidth estimator and budget controller on simulated request timings."""

from __future__ import annotations

import time

import pytest

from sage_ros.core.link import BudgetController, Exchange, LinkEstimator, UplinkMonitor

BASE_RTT, EDGE_S, BYTES_PER_PATCH, OVERHEAD = 0.020, 0.030, 768, 600


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def server_s(patches: int) -> float:
    return 0.030 + 0.0012 * patches


def run(monitor: UplinkMonitor, clock: FakeClock, rate_bps: float, n: int, *, deadline: float = 0.7) -> list[tuple]:
    """n frames over a link of ``rate_bps``; returns (budget, latency, missed) per offloaded frame."""
    out = []
    for i in range(n):
        clock.t += 0.2
        size = monitor.probe_due()
        if size:
            rid = f'probe{clock.t}'
            monitor.sent(rid, request_bytes=size + 200, patches=0, payload_bytes=size)
            clock.t += BASE_RTT + (size + 200) / rate_bps
            monitor.answered(rid, 0.0005)
        b = monitor.budget
        if b == 0:
            out.append((0, 0.0, False))
            continue
        rid = f'r{clock.t}'
        nbytes = OVERHEAD + b * BYTES_PER_PATCH
        monitor.sent(rid, request_bytes=nbytes, patches=b, payload_bytes=b * BYTES_PER_PATCH, edge_s=EDGE_S)
        rtt = BASE_RTT + nbytes / rate_bps + server_s(b)
        latency = EDGE_S + rtt
        if latency > deadline:
            clock.t += deadline - EDGE_S
            monitor.missed(rid)
            clock.t += latency - deadline
            monitor.answered(rid, server_s(b))  # arrives late: still evidence
        else:
            clock.t += rtt
            monitor.answered(rid, server_s(b))
        out.append((b, latency, latency > deadline))
    return out


def make(deadline: float = 0.7, start: float = 1000.0, max_in_flight: int = 4, **kw) -> tuple[UplinkMonitor, FakeClock]:
    clock = FakeClock()
    clock.t = start
    ctl = BudgetController(deadline_s=deadline, budget_min=8, budget_max=96, **kw)
    return UplinkMonitor(ctl, probe_interval_s=2.0, probe_bytes=4096, max_in_flight=max_in_flight, clock=clock), clock


def test_estimator_recovers_throughput_and_base_rtt():
    est = LinkEstimator()
    est.update(Exchange(300, 0, 100, BASE_RTT + 300 / 1e6, 0.001))  # tiny probe: base RTT
    for b in (32, 64, 96, 64):
        nbytes = OVERHEAD + b * BYTES_PER_PATCH
        est.update(Exchange(nbytes, b, b * BYTES_PER_PATCH, BASE_RTT + nbytes / 1e6 + server_s(b), server_s(b)))
    assert est.throughput_bps == pytest.approx(1e6, rel=0.05)
    assert est.base_rtt_s == pytest.approx(BASE_RTT, abs=1e-3)
    assert est.server_time_s(48) == pytest.approx(server_s(48), rel=0.01)


def test_budget_follows_a_drop_at_once_and_a_rise_carefully():
    monitor, clock = make()
    fast = run(monitor, clock, 1e6, 30)  # 8 Mbit/s
    assert fast[-1][0] == 96 and not any(m for _, _, m in fast[5:])
    slow = run(monitor, clock, 50e3, 30)  # 400 kbit/s
    budgets = [b for b, _, _ in slow]
    settled = next(i for i in range(len(budgets)) if budgets[i] == budgets[-1] and len(set(budgets[i:])) == 1)
    assert settled <= 3, budgets  # the drop is followed within a few requests
    assert 8 <= budgets[-1] <= 40
    assert not any(m for _, _, m in slow[settled + 1:]), slow  # after settling: no misses
    assert len(set(budgets[settled:])) == 1  # and no oscillation
    back = run(monitor, clock, 1e6, 40)
    budgets = [b for b, _, _ in back]
    assert budgets[0] < 96 and budgets[-1] == 96  # rises again, not in one jump
    assert all(b2 >= b1 for b1, b2 in zip(budgets, budgets[1:]))  # monotone climb, no overshoot-and-drop
    assert not any(m for _, _, m in back)


def test_suspends_when_even_the_minimum_misses_and_recovers_by_probing():
    monitor, clock = make()
    run(monitor, clock, 1e6, 10)
    dead = run(monitor, clock, 4e3, 40)  # 32 kbit/s: 8 raw patches need 1.7 s
    assert dead[-1][0] == 0 and monitor.controller.suspended
    probes_before = monitor.probes
    assert any(b == 0 for b, _, _ in dead[:10])
    again = run(monitor, clock, 1e6, 40)
    assert monitor.probes > probes_before  # probes found the link again
    assert not monitor.controller.suspended and again[-1][0] > 8


def test_clock_offsets_do_not_matter():
    """Only durations enter (the cloud's clock only as received->sent): the same timings give the
    same estimate whatever the edge clock reads."""
    results = []
    for start in (0.0, 1.7e6):
        monitor, clock = make(start=start)
        run(monitor, clock, 2e5, 20)
        results.append((monitor.budget, round(monitor.link.throughput_bps, -1)))
    assert results[0] == results[1]


def test_controller_bounds():
    with pytest.raises(ValueError):
        BudgetController(deadline_s=1.0, budget_min=10, budget_max=5)
    ctl = BudgetController(deadline_s=1.0, budget_min=4, budget_max=50)
    assert ctl.budget == 50  # optimistic start; the first answer corrects it


# --- concurrency: requests in flight, the window, deadlines, the lock ----------------------

def pipelined(monitor: UplinkMonitor, clock: FakeClock, rate_bps: float, n: int, *, period: float,
              deadline: float = 0.7) -> list[tuple]:
    """A camera at 1/period fps whose every frame wants offloading, over a FIFO uplink of
    ``rate_bps`` and a FIFO cloud; requests overlap. Returns (budget, latency or None, reason)."""
    link_free = cloud_free = -1.0
    out, events = [], []  # events: (answer time, request id, server_s, compute_s)
    for i in range(n):
        now = clock.t + period
        for t, rid, srv, compute in sorted(e for e in events if e[0] <= now):
            clock.t = t
            monitor.expire()
            monitor.answered(rid, srv, compute)  # the cloud reports its queueing and the model's time
            events.remove((t, rid, srv, compute))
        clock.t = now
        monitor.expire()
        arrival = clock.t
        clock.t += EDGE_S
        monitor.note_frame(EDGE_S)
        adm = monitor.admit(arrival=arrival)
        if not adm.budget:
            out.append((0, None, adm.cause))
            continue
        b = adm.budget
        nbytes = OVERHEAD + b * BYTES_PER_PATCH
        rid = f'r{i}'
        monitor.sent(rid, request_bytes=nbytes, patches=b, payload_bytes=b * BYTES_PER_PATCH,
                     deadline=arrival + deadline)
        link_free = max(clock.t, link_free) + nbytes / rate_bps
        at_cloud = link_free + BASE_RTT / 2
        cloud_free = max(at_cloud, cloud_free) + server_s(b)
        answer_t = cloud_free + BASE_RTT / 2
        events.append((answer_t, rid, cloud_free - at_cloud, server_s(b)))
        out.append((b, answer_t - arrival, ''))
    return out


def test_queueing_behind_our_own_requests_is_not_read_as_a_slow_link():
    monitor, clock = make(max_in_flight=8)
    monitor.sent('tiny', request_bytes=264, patches=0, payload_bytes=64)  # a probe: the base RTT
    clock.t += BASE_RTT
    monitor.answered('tiny', 0.0)
    out = pipelined(monitor, clock, 1e6, 60, period=0.05)  # 20 requests/s: they overlap on the link
    assert sum(1 for b, _, _ in out if b) > 30
    # Timed from its own send, each request would look several times slower than the link.
    assert monitor.link.throughput_bps == pytest.approx(1e6, rel=0.2)


def test_planned_requests_meet_their_deadlines_while_others_are_in_flight():
    monitor, clock = make(max_in_flight=8)
    run(monitor, clock, 2e5, 10)  # learn a 1.6 Mbit/s link one request at a time
    out = pipelined(monitor, clock, 2e5, 200, period=1 / 30)  # then a 30 fps camera
    sent = [(b, lat) for b, lat, _ in out if b]
    assert len(sent) > 20
    late = [lat for _, lat in sent[10:] if lat > 0.7]
    assert not late, late
    # The link cannot carry every frame at any budget: the rest stay on the edge, at once.
    assert {c for b, _, c in out if not b} <= {'uplink_busy', 'window_full'}


def test_window_bounds_requests_in_flight_and_each_frame_is_claimed_once():
    monitor, clock = make(max_in_flight=3)
    run(monitor, clock, 1e6, 5)  # measured: requests may overlap (before that, one at a time)
    for i in range(3):
        assert monitor.admit(arrival=clock.t).budget
        monitor.sent(f'r{i}', request_bytes=5000, patches=8, payload_bytes=4000, deadline=clock.t + 0.7,
                     context=i)
    assert monitor.admit(arrival=clock.t).cause == 'window_full'
    assert monitor.answered('r0', 0.01).context == 0
    assert monitor.answered('r0', 0.01) is None  # a duplicate answer claims nothing
    assert monitor.answered('forged', 0.01) is None  # nor does an id never sent
    clock.t += 1.0
    assert [r.context for r in monitor.expire()] == [1, 2]
    assert monitor.expire() == [] and monitor.answered('r1', 0.01) is None  # late: measured, not claimed
    assert monitor.deadline_misses == 2
    # r2's frame has its fallback, but its bytes may still hold the link: it keeps its place in
    # the window until answered or given up for lost.
    assert monitor.in_flight == 1
    monitor.set_connected(False)  # gone with its connection
    assert monitor.in_flight == 0


def test_no_uplink_keeps_frames_on_the_edge_and_sends_no_probes():
    monitor, clock = make()
    monitor.set_connected(False)
    clock.t += 100
    assert monitor.admit(arrival=clock.t).cause == 'no_uplink'
    assert monitor.probe_due() == 0
    monitor.set_connected(True)
    assert monitor.admit(arrival=clock.t).budget == 96 and monitor.probe_due() > 0


def test_one_slow_frame_cannot_suspend_offloading_for_good():
    """The stuck-suspension defect: an 8.7 s frame used to set the edge-time estimate, which
    only sent frames updated; suspended, nothing was sent, so it never came down."""
    monitor, clock = make()
    run(monitor, clock, 1e6, 10)
    monitor.note_frame(8.7)
    monitor.sent('slow', request_bytes=20000, patches=24, payload_bytes=19000, edge_s=8.7)
    clock.t += 0.05
    monitor.answered('slow', server_s(24))
    for _ in range(30):  # frames keep coming and are handled at normal speed
        clock.t += 0.2
        monitor.note_frame(EDGE_S)
        size = monitor.probe_due()
        if size:
            monitor.sent(f'p{clock.t}', request_bytes=size + 200, patches=0, payload_bytes=size)
            clock.t += BASE_RTT
            monitor.answered(f'p{clock.t - BASE_RTT}', 0.0005)
    assert not monitor.controller.suspended and monitor.budget > 8


def test_monitor_survives_every_thread_at_once():
    """The race that killed the node: the probe timer iterated the requests while the worker
    and the transport changed them. Hammer all entry points from four threads."""
    import random
    import threading

    monitor = UplinkMonitor(BudgetController(deadline_s=0.05, budget_min=8, budget_max=96),
                            probe_interval_s=0.0001, max_in_flight=16)
    errors: list[BaseException] = []
    stop = threading.Event()
    ids: list[str] = []
    sent: list[str] = []

    def guard(fn):
        def loop():
            try:
                while not stop.is_set():
                    fn()
            except BaseException as exc:  # noqa: BLE001 - any exception fails the test
                errors.append(exc)
        return loop

    counter = iter(range(10**9))

    def worker():
        i = next(counter)
        monitor.note_frame(random.random() * 0.05)
        if monitor.admit(arrival=time.monotonic(), fixed_budget=8 if i % 2 else 0).budget:
            rid = f'r{i}'
            monitor.sent(rid, request_bytes=random.randint(600, 80000), patches=random.randint(1, 96),
                         payload_bytes=1000, deadline=time.monotonic() + 0.02, context=i)
            ids.append(rid)
            sent.append(rid)

    def answers():
        if ids:
            rid = ids.pop(0) if random.random() < 0.9 else 'unknown'
            monitor.answered(rid, random.random() * 0.01, random.random() * 0.005)

    def timer():
        size = monitor.probe_due()
        if size:
            monitor.sent(f'p{next(counter)}', request_bytes=size, patches=0, payload_bytes=size)
        monitor.snapshot()

    def deadlines():
        monitor.expire()
        monitor.next_deadline()

    def enough() -> bool:
        return len(sent) > 300 and monitor.answered_count > 300 and monitor.probes > 50

    threads = [threading.Thread(target=guard(f)) for f in (worker, answers, timer, deadlines)]
    for t in threads:
        t.start()
    # Until every entry point has run many times alongside the others (a count of events, not
    # a span of time: a slower or busier machine takes longer to get there), or one failed.
    hang_guard = time.monotonic() + 120
    while not enough() and not errors and time.monotonic() < hang_guard:
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert enough(), (len(sent), monitor.answered_count, monitor.probes)


def test_a_robot_that_offloads_from_its_first_frame_still_measures_the_base_rtt():
    """Answers flowing keep the estimate fresh, so interval probes never go out; the base RTT
    must still be measured, or the round trip reads as upload time (a long-RTT link as a slow one)."""
    monitor, clock = make(deadline=1.5)
    monitor.sent('r/0', request_bytes=8000, patches=64, payload_bytes=7400, deadline=clock.t + 1.5)
    assert monitor.probe_due() == 0  # a request is out: a probe now would queue behind it
    clock.t += 0.45
    monitor.answered('r/0', server_s(64))
    assert monitor.link.base_rtt_s == 0.0 and monitor.link.rtt_samples == 0
    for k in range(3):  # fresh evidence, but no base RTT yet: tiny probes, one a second
        assert monitor.probe_due() == 64
        assert monitor.probe_due() == 0  # not again at once
        monitor.sent(f'tiny{k}', request_bytes=264, patches=0, payload_bytes=64)
        clock.t += BASE_RTT * (3 - k)  # the first after connecting is the slowest
        monitor.answered(f'tiny{k}', 0.0005)
        clock.t += 1.0
    assert monitor.link.rtt_samples == 3 and abs(monitor.link.base_rtt_s - BASE_RTT) < 0.01
    clock.t += 5.0
    monitor.sent('r/1', request_bytes=8000, patches=64, payload_bytes=7400, deadline=clock.t + 1.5)
    clock.t += 0.45
    monitor.answered('r/1', server_s(64))
    assert monitor.probe_due() == 0  # measured, and answers are fresh: no probe
    monitor2, clock2 = make()
    for k in range(3):  # a fixed budget: the base-RTT probes only
        assert monitor2.probe_due(rtt_only=True) == 64
        monitor2.sent(f'tiny{k}', request_bytes=264, patches=0, payload_bytes=64)
        clock2.t += BASE_RTT
        monitor2.answered(f'tiny{k}', 0.0005)
        clock2.t += 1.0
    clock2.t += 60.0
    assert monitor2.probe_due(rtt_only=True) == 0 and monitor2.probe_due() > 0
