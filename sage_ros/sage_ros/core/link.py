# SPDX-License-Identifier: Apache-2.0
"""Uplink estimation and the live budget controller.

The estimator learns from the offload traffic itself. For each answered request it gets the
request size, the edge's send->answer time (edge clock) and the cloud's receive->send time
(cloud clock). Only differences on one clock are used, so robot and cloud clocks need not
agree. The network part of a round trip is modelled as ``base_rtt + bytes / throughput``.

The controller turns the estimate and the per-frame deadline into the largest patch budget
that fits: fast down (the next request), slow up (hysteresis), and a suspension of
offloading when even the smallest budget cannot make the deadline.

:class:`UplinkMonitor` is the one owner of the link state an edge node shares between its
threads (the frame worker, the transport's answer callback, the deadline watcher, the probe
timer): the estimate, the requests in flight with their deadlines, the in-flight window and
whether the uplink is connected. Every public method takes its lock.

Requests are pipelined: several can be in flight. They share the uplink and the cloud, so a
request sent while others are still uploading or being served waits behind them. The monitor
models both as FIFO queues, so that waiting behind our own requests is neither read as a slow
link (estimation) nor forgotten when planning the next request (admission).
"""

from __future__ import annotations

import collections
import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Exchange:
    """One answered request, as the edge saw it."""

    request_bytes: int
    """Bytes on the wire for the request (the serialized message)."""
    patches: int
    payload_bytes: int
    round_trip_s: float
    """Edge clock: request sent -> answer received."""
    server_s: float
    """Cloud clock: request received -> answer sent (0 if unknown); includes its queueing there."""
    compute_s: float = 0.0
    """Cloud clock: model started on the request -> answer sent (0 if unknown)."""


@dataclass
class LinkEstimator:
    """Uplink throughput and base round-trip time from answered requests and probes.

    Small exchanges (probes, or requests of at most ``small_bytes``) measure the base RTT;
    for the others, what exceeds the base RTT is upload time, and bytes / upload time is a
    throughput sample. Throughput follows a drop at once and a rise slowly (EWMA).
    """

    window: int = 20
    small_bytes: int = 2048
    rise_alpha: float = 0.25
    throughput_bps: float = 0.0
    """Estimated usable uplink in bytes per second (0 = unknown)."""
    _base: collections.deque = field(default_factory=collections.deque, repr=False)
    _server: collections.deque = field(default_factory=collections.deque, repr=False)
    samples: int = 0

    @property
    def base_rtt_s(self) -> float:
        """Network round trip of a tiny message (0 until a small exchange was seen)."""
        return min(self._base) if self._base else 0.0

    @property
    def rtt_samples(self) -> int:
        """Small exchanges in the window :attr:`base_rtt_s` is the minimum of (0: assumed 0)."""
        return len(self._base)

    def update(self, ex: Exchange) -> None:
        self.samples += 1
        net = max(1e-6, ex.round_trip_s - max(0.0, ex.server_s))
        if ex.patches > 0:
            # The model's own time when the cloud reports it: queueing there depends on load,
            # and load from our own requests is planned for separately.
            compute = ex.compute_s if ex.compute_s > 0 else ex.server_s
            self._server.append((ex.patches, max(0.0, compute)))
            while len(self._server) > self.window:
                self._server.popleft()
        if ex.request_bytes <= self.small_bytes:
            self._base.append(net)
            while len(self._base) > max(3, self.window // 4):
                self._base.popleft()
            return
        upload = max(net - self.base_rtt_s, 1e-4)
        sample = ex.request_bytes / upload
        if self.throughput_bps <= 0 or sample < self.throughput_bps:
            self.throughput_bps = sample
        else:
            self.throughput_bps += self.rise_alpha * (sample - self.throughput_bps)

    def server_time_s(self, patches: int) -> float:
        """Expected server time for ``patches``: a line fitted over the window (time grows with
        the token count), or the last value scaled when only one budget was seen."""
        if not self._server:
            return 0.0
        xs = [p for p, _ in self._server]
        ys = [t for _, t in self._server]
        if len(set(xs)) >= 2:
            n = len(xs)
            mx, my = sum(xs) / n, sum(ys) / n
            sxx = sum((x - mx) ** 2 for x in xs)
            slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx)
            # Plus one standard deviation of the residuals: a cloud sharing its CPU varies,
            # and a plan on the mean misses half the time.
            spread = math.sqrt(sum((y - my - slope * (x - mx)) ** 2 for x, y in zip(xs, ys)) / n)
            return max(0.0, my + slope * (patches - mx) + spread)
        # One CLS token besides the patches: time ~ proportional to tokens.
        return ys[-1] * (patches + 1) / (xs[-1] + 1)


@dataclass
class BudgetController:
    """Largest patch budget whose request meets the deadline, with hysteresis."""

    deadline_s: float
    budget_min: int = 8
    budget_max: int = 96
    safety: float = 0.85
    """Fraction of the deadline the plan may use; the rest absorbs jitter."""
    rise_after: int = 2
    """Consecutive requests that must allow a larger budget before it is raised."""
    rise_step: float = 0.25
    """Largest relative raise per step."""
    overhead_bytes: int = 600
    """Bytes of a request besides its payload (CDR framing and the other fields)."""
    budget: int = 0
    suspended: bool = False
    _ups: int = 0
    _bytes_per_patch: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.budget_min <= self.budget_max:
            raise ValueError(f'need 1 <= budget_min <= budget_max, got {self.budget_min}, {self.budget_max}')
        self.budget = self.budget or self.budget_max

    @property
    def bytes_per_patch(self) -> float:
        return self._bytes_per_patch

    def learn_payload(self, patches: int, payload_bytes: int) -> None:
        """Bytes per patch of the codec in use (compressed sizes vary: EWMA, leaning high)."""
        if patches <= 0:
            return
        sample = payload_bytes / patches
        if self._bytes_per_patch <= 0 or sample > self._bytes_per_patch:
            self._bytes_per_patch = sample
        else:
            self._bytes_per_patch += 0.2 * (sample - self._bytes_per_patch)

    def request_bytes(self, budget: int) -> float:
        """Expected bytes on the wire of a request of ``budget`` patches."""
        return self.overhead_bytes + budget * max(self._bytes_per_patch, 1.0)

    def fits(self, budget: int, link: LinkEstimator, edge_s: float) -> bool:
        """Does a request of ``budget`` patches make the deadline on this link, alone on it?"""
        if link.throughput_bps <= 0:
            return True  # nothing known yet: try, and learn from the answer
        upload = self.request_bytes(budget) / link.throughput_bps
        total = edge_s + link.base_rtt_s + link.server_time_s(budget) + upload
        return total <= self.safety * self.deadline_s

    def target(self, link: LinkEstimator, edge_s: float) -> int:
        """Largest budget in [budget_min, budget_max] that fits, or 0 if none does."""
        for b in range(self.budget_max, self.budget_min - 1, -1):
            if self.fits(b, link, edge_s):
                return b
        return 0

    def back_off(self) -> None:
        """Halve the budget (a missed deadline), never below the minimum."""
        if not self.suspended:
            self.budget, self._ups = max(self.budget_min, self.budget // 2), 0

    def update(self, link: LinkEstimator, edge_s: float) -> int:
        """Recompute after new evidence; returns the budget for the next request (0 = suspend)."""
        want = self.target(link, edge_s)
        if want == 0:
            self.suspended, self._ups = True, 0
            self.budget = self.budget_min
            return 0
        if self.suspended:
            # Back from suspension: start low and climb.
            self.suspended, self._ups, self.budget = False, 0, self.budget_min
            return self.budget
        if want < self.budget:
            self.budget, self._ups = want, 0  # fast down
        elif want > self.budget:
            self._ups += 1
            if self._ups >= self.rise_after:
                self.budget = min(want, max(self.budget + 1, math.floor(self.budget * (1 + self.rise_step))))
                self._ups = 0
        else:
            self._ups = 0
        return self.budget


@dataclass
class Request:
    """One request (or probe) sent and not yet answered."""

    request_id: str
    t: float
    """Edge clock: when it was sent."""
    request_bytes: int
    patches: int
    payload_bytes: int
    deadline: float = math.inf
    """Edge clock: when its frame falls back if no answer came (its frame's arrival + deadline)."""
    context: Any = None
    """What the caller needs to finish the frame (opaque here)."""
    waiting: bool = True
    """Its frame still waits for this request's answer (False once answered or expired)."""
    queue_s: float = 0.0
    """Predicted wait behind our own earlier requests (uplink and cloud) when it was sent."""
    due: float = math.nan
    """Edge clock: when its answer was predicted to arrive (nan: no estimate yet)."""
    lost: bool = False
    """The connection that carried it went down: it no longer holds the link."""
    tokens: int = 0
    """Patches the cloud classifies for it: ``patches``, or the union of both rounds for a second round."""


@dataclass(frozen=True)
class Admission:
    """The budget for a frame that wants offloading, or why it stays on the edge."""

    budget: int
    """Patches this request may carry; 0 = do not send."""
    reason: str = ''
    """Why not, for the frame's result (``no uplink``, ``window full``, ...); empty when admitted."""
    cause: str = ''
    """The same as a counter name: no_uplink, window_full, suspended, uplink_busy."""


@dataclass(frozen=True)
class LinkSnapshot:
    """A consistent copy of the link state for diagnostics and BudgetStatus."""

    budget: int
    suspended: bool
    connected: bool
    throughput_bps: float
    base_rtt_s: float
    bytes_per_patch: float
    budget_min: int
    budget_max: int
    deadline_s: float
    answered: int
    deadline_misses: int
    probes: int
    in_flight: int
    """Requests holding the window (see :attr:`UplinkMonitor.in_flight`)."""
    waiting: int
    """Frames waiting for an answer."""
    max_in_flight: int
    queued_bytes: float
    edge_s: float
    second_rounds: int = 0
    """Second rounds sent (each is traffic like any request)."""


class UplinkMonitor:
    """The link state of one edge node: estimate, budget, requests in flight, window, uplink.

    ``clock`` is the edge's monotonic clock; the cloud's only enters as durations. Thread-safe:
    every public method holds the one lock.
    """

    def __init__(self, controller: BudgetController, estimator: LinkEstimator | None = None, *,
                 probe_interval_s: float = 2.0, probe_bytes: int = 4096, max_in_flight: int = 4,
                 connected: bool = True, edge_window: int = 15, clock: Callable[[], float] | None = None) -> None:
        self.controller = controller
        self.link = estimator or LinkEstimator()
        self.probe_interval_s = probe_interval_s
        self.probe_bytes = probe_bytes
        self.max_in_flight = max_in_flight
        self._lock = threading.RLock()
        self._clock = clock or time.monotonic
        self._sent: collections.OrderedDict[str, Request] = collections.OrderedDict()
        # Edge time per handled frame. A median, so one slow frame (a huge image, a CPU stall)
        # cannot move it, and fed by every frame, so it comes back down while nothing is sent.
        self._edge_times: collections.deque[float] = collections.deque(maxlen=edge_window)
        self._last_evidence = self._clock()
        self._link_free_seen = -math.inf  # edge clock: when our last answered request had left the uplink
        # Virtual FIFO queues of our own traffic (edge clock): when the uplink and the cloud are
        # expected to be free of the requests already sent.
        self._link_free_at = -math.inf
        self._cloud_free_at = -math.inf
        # How much later than predicted recent in-time answers came: the plan adds the largest,
        # so a model that is optimistic (jitter, a busy cloud) stops causing misses. Recent
        # only, and capped, so that it can never shut offloading off by itself.
        self._lateness: collections.deque[tuple[float, float]] = collections.deque(maxlen=10)
        self._last_bound = -math.inf
        self._probe_small = True
        self._rtt_probe_at = -math.inf
        self._connected = connected
        self.answered_count = 0
        self.deadline_misses = 0
        self.probes = 0
        self.second_rounds = 0

    # --- state --------------------------------------------------------------------------
    @property
    def budget(self) -> int:
        """Patch budget for the next request; 0 while offloading is suspended."""
        with self._lock:
            return 0 if self.controller.suspended else self.controller.budget

    @property
    def edge_s(self) -> float:
        """Typical edge time of a frame (median of the recent ones; 0 before any)."""
        with self._lock:
            return statistics.median(self._edge_times) if self._edge_times else 0.0

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._connected

    def set_connected(self, connected: bool) -> None:
        """The transport's view of the uplink (a router session, a matched subscriber)."""
        with self._lock:
            if self._connected and not connected:
                # The connection went: what it carried is gone, and holds the link no more.
                for r in self._sent.values():
                    r.lost = True
                self._reanchor(self._clock())
            self._connected = connected

    @property
    def in_flight(self) -> int:
        """Requests that occupy the window: sent, not answered, and not yet given up for lost
        (their frames may have fallen back already: their bytes still hold the link)."""
        with self._lock:
            return len(self._outstanding(self._clock()))

    def _outstanding(self, now: float) -> list[Request]:
        # While connected, a request is delivered (its bytes hold the link until answered),
        # however late. One lost anyway (the uplink dropped, a cloud died) must not close the
        # window for good: after this long it no longer counts.
        horizon = max(10.0, 10 * self.controller.deadline_s)
        return [r for r in self._sent.values() if r.patches > 0 and not r.lost and now - r.t < horizon]

    def _reanchor(self, now: float) -> None:
        """Rebuild the uplink's virtual queue from what is still outstanding: FIFO from when
        our last answered request had left the uplink, at the current throughput."""
        out = self._outstanding(now)
        if not out:
            self._link_free_at = self._cloud_free_at = -math.inf  # nothing of ours queued
            return
        if self.link.throughput_bps <= 0:
            return
        t = self._link_free_seen
        for r in sorted(out, key=lambda r: r.t):
            t = max(t, r.t) + r.request_bytes / self.link.throughput_bps
        self._link_free_at = t

    def configure(self, *, deadline_s: float | None = None, budget_min: int | None = None,
                  budget_max: int | None = None, safety: float | None = None,
                  probe_interval_s: float | None = None, probe_bytes: int | None = None,
                  max_in_flight: int | None = None) -> None:
        """Apply changed parameters (``None`` keeps a value)."""
        with self._lock:
            c = self.controller
            c.deadline_s = c.deadline_s if deadline_s is None else deadline_s
            c.budget_min = c.budget_min if budget_min is None else budget_min
            c.budget_max = c.budget_max if budget_max is None else budget_max
            c.safety = c.safety if safety is None else safety
            c.budget = min(max(c.budget, c.budget_min), c.budget_max)
            self.probe_interval_s = self.probe_interval_s if probe_interval_s is None else probe_interval_s
            self.probe_bytes = self.probe_bytes if probe_bytes is None else probe_bytes
            self.max_in_flight = self.max_in_flight if max_in_flight is None else max_in_flight

    def snapshot(self) -> LinkSnapshot:
        with self._lock:
            c, now = self.controller, self._clock()
            return LinkSnapshot(
                budget=self.budget, suspended=c.suspended, connected=self._connected,
                throughput_bps=self.link.throughput_bps, base_rtt_s=self.link.base_rtt_s,
                bytes_per_patch=c.bytes_per_patch, budget_min=c.budget_min, budget_max=c.budget_max,
                deadline_s=c.deadline_s, answered=self.answered_count, deadline_misses=self.deadline_misses,
                probes=self.probes, in_flight=self.in_flight, waiting=sum(r.waiting for r in self._sent.values()),
                max_in_flight=self.max_in_flight,
                queued_bytes=self._queued_bytes(now), edge_s=self.edge_s, second_rounds=self.second_rounds)

    # --- frames and requests ------------------------------------------------------------
    def note_frame(self, edge_s: float) -> None:
        """A frame was handled in ``edge_s`` (arrival -> decision), offloaded or not."""
        with self._lock:
            self._edge_times.append(max(0.0, edge_s))

    def admit(self, *, arrival: float, fixed_budget: int = 0) -> Admission:
        """The budget for a frame that arrived at ``arrival`` and wants offloading now.

        ``fixed_budget`` > 0 is the user's B (fixed mode): no planning, only the uplink and the
        window apply. In auto mode the controller's B is lowered until the request, queued
        behind the bytes and the cloud work already in flight, meets this frame's deadline;
        if not even ``budget_min`` does, the frame stays on the edge ('uplink busy').
        """
        with self._lock:
            c = self.controller
            if not self._connected:
                return Admission(0, 'no uplink', 'no_uplink')
            if fixed_budget <= 0 and c.suspended:
                return Admission(0, 'link too slow: offloading suspended', 'suspended')
            if self.in_flight >= self.max_in_flight:
                return Admission(0, 'window full', 'window_full')
            if fixed_budget > 0:
                return Admission(fixed_budget)
            if self.link.throughput_bps <= 0 and self.in_flight:
                # Nothing measured yet: one request at a time until the first answer says
                # what the link carries, or a burst at budget_max could miss every deadline.
                return Admission(0, 'uplink busy: measuring the link', 'uplink_busy')
            now = self._clock()
            due = self._due(arrival, now)
            for b in range(c.budget, c.budget_min - 1, -1):
                if self._predict(now, b)[1] <= due:
                    return Admission(b)
            return Admission(0, 'uplink busy: requests in flight fill the deadline', 'uplink_busy')

    def _plan_margin(self, now: float) -> float:
        recent = [late for t, late in self._lateness if now - t < 10.0]
        return min(max(recent, default=0.0), 0.5 * self.controller.safety * self.controller.deadline_s) \
            if recent and max(recent) > 0 else 0.0

    def _predict(self, now: float, patches: int, tokens: int = 0) -> tuple[float, float]:
        """(wait behind our own requests, answer time) of a request of ``patches`` sent now
        (the cloud classifying ``tokens`` patches, ``patches`` when 0)."""
        if self.link.throughput_bps <= 0:
            return 0.0, now  # nothing known yet: send, and learn from the answer
        half_rtt = self.link.base_rtt_s / 2
        upload_start = max(now, self._link_free_at)
        at_cloud = upload_start + self.controller.request_bytes(patches) / self.link.throughput_bps + half_rtt
        compute_start = max(at_cloud, self._cloud_free_at)
        done = compute_start + self.link.server_time_s(tokens or patches) + half_rtt
        wait = (upload_start - now) + (compute_start - at_cloud)
        return wait, done

    def _due(self, arrival: float, now: float) -> float:
        c = self.controller
        return arrival + c.safety * c.deadline_s - self._plan_margin(now)

    def second_round_offer(self, *, arrival: float, patches: int, total_max: int) -> tuple[int, float]:
        """(patches, seconds): the most patches a second round of the frame that arrived at
        ``arrival`` could add, its round 1 of ``patches`` being sent now, and that round's
        predicted duration; (0, 0.0) when none would meet the deadline (or nothing is measured).

        Round 2 follows round 1's answer: upload of the new patches, the cloud on the union,
        the answer back. Both rounds together stay within ``total_max`` patches.
        """
        with self._lock:
            if self.link.throughput_bps <= 0:
                return 0, 0.0
            now = self._clock()
            after = self._predict(now, patches)[1]
            due = self._due(arrival, now)
            for k in range(total_max - patches, 0, -1):
                took = (self.controller.request_bytes(k) / self.link.throughput_bps + self.link.base_rtt_s
                        + self.link.server_time_s(patches + k))
                if after + took <= due:
                    return k, took
            return 0, 0.0

    def second_round_fits(self, *, arrival: float, patches: int, tokens: int) -> bool:
        """Would a second round of ``patches`` (the cloud then classifying ``tokens``), sent
        now behind our own traffic, be answered within the deadline of the frame that arrived
        at ``arrival``?"""
        with self._lock:
            if self.link.throughput_bps <= 0:
                return False
            now = self._clock()
            return self._predict(now, patches, tokens)[1] <= self._due(arrival, now)

    def _queued_bytes(self, now: float) -> float:
        if self.link.throughput_bps <= 0 or self._link_free_at <= now:
            return 0.0
        return (self._link_free_at - now) * self.link.throughput_bps

    def sent(self, request_id: str, *, request_bytes: int, patches: int, payload_bytes: int,
             edge_s: float = 0.0, deadline: float = math.inf, context: Any = None, tokens: int = 0) -> None:
        """A request (or a probe, with patches=0) left now.

        ``edge_s`` feeds the edge-time estimate when the caller does not call
        :meth:`note_frame`; ``deadline`` (edge clock) is when its frame falls back. A second
        round (same id as its round 1, answered by now) gives ``tokens``, the patches of both
        rounds the cloud will classify: it is traffic like any request, and counted.
        """
        with self._lock:
            now = self._clock()
            queue_s, due = 0.0, math.nan
            if patches > 0:
                if edge_s > 0:
                    self._edge_times.append(edge_s)
                self.controller.learn_payload(patches, payload_bytes)
                # Book the request into the virtual queues (the prediction uses them).
                if self.link.throughput_bps > 0:
                    queue_s, due = self._predict(now, patches, tokens)
                    half_rtt = self.link.base_rtt_s / 2
                    self._link_free_at = max(now, self._link_free_at) + request_bytes / self.link.throughput_bps
                    self._cloud_free_at = max(self._link_free_at + half_rtt, self._cloud_free_at) \
                        + self.link.server_time_s(tokens or patches)
            if tokens:
                self.second_rounds += 1
            # A probe has no frame waiting for it.
            self._sent[request_id] = Request(request_id, now, request_bytes, patches, payload_bytes,
                                             deadline, context, patches > 0, queue_s, due, tokens=tokens or patches)
            self._evict()

    def _evict(self) -> None:
        # Answered-late bookkeeping is bounded; a request whose frame still waits is never
        # evicted (the window bounds those), or its frame would never get a result.
        while len(self._sent) > 256:
            victim = next((k for k, r in self._sent.items() if not r.waiting), None)
            if victim is None:
                break
            del self._sent[victim]

    def cancel(self, request_id: str) -> Request | None:
        """Forget a request that could not be sent; returns it if its frame still waited."""
        with self._lock:
            r = self._sent.pop(request_id, None)
            self._reanchor(self._clock())
            return r if r is not None and r.waiting else None

    def expects(self, request_id: str) -> bool:
        """Is ``request_id`` one we sent and still know? A dict lookup: answers are checked
        with it before anything costly, so a burst of forged ones cannot stall real ones."""
        with self._lock:
            return request_id in self._sent

    def answered(self, request_id: str, server_s: float, compute_s: float = 0.0, *,
                 computed: bool = True) -> Request | None:
        """An answer arrived (in time or late: both measure the link); its window slot is free.

        Returns the request when this answer is the one its frame waits for, else None (a late
        answer, a probe, or an id never sent: the caller must not act on those). ``computed``
        False: the cloud answered without running its model (BUSY): the exchange measures the
        link, not the server's time.
        """
        with self._lock:
            r = self._sent.pop(request_id, None)
            if r is None:
                return None
            now = self._clock()
            # A request sent while an earlier one of ours still held the uplink only started to
            # move once that one had left: time it from there, or queueing behind our own
            # traffic would read as a slow link. That one left when its answer came, less the
            # cloud's time and a round trip.
            start = max(r.t, self._link_free_seen)
            self._link_free_seen = max(self._link_free_seen, now - max(0.0, server_s) - self.link.base_rtt_s)
            # The cloud's time grows with the patches it classified: the union, for a second round.
            ex = Exchange(r.request_bytes, r.tokens if r.patches > 0 and computed else 0, r.payload_bytes, now - start,
                          server_s, compute_s)
            self.answered_count += 1
            self._learn(ex)
            if not math.isnan(r.due) and r.patches > 0:
                # The cloud's queue behind this one is as late (or early) as it was: absorbs
                # estimate errors and other robots' load at the cloud.
                late = now - r.due
                self._cloud_free_at += late
                if r.waiting and computed:  # in time; a late one is a miss, handled by the back-off
                    self._lateness.append((now, late))
            self._reanchor(now)
            claimed, r.waiting = r.waiting, False
            return r if claimed else None

    def missed(self, request_id: str) -> None:
        """No answer by the deadline. The link took at least this long, so it is at most this
        fast; and whatever the estimate says, the budget halves at once (the request still
        occupies the link)."""
        with self._lock:
            r = self._sent.get(request_id)
            if r is None:
                return
            self._miss(r)

    def _miss(self, r: Request) -> None:
        self.deadline_misses += 1
        if r.lost:
            # Its connection went down (router or cloud gone, e.g. a restart between two
            # rounds): that says nothing about the link's speed, and the uplink state already
            # stops offloading until the cloud is back.
            return
        if r.queue_s <= 0:
            # Alone on the link, its wait bounds the link's speed. Behind our own requests the
            # wait mixes in a queue we only predicted: leave it to the (late) answer to measure.
            waited = max(1e-3, self._clock() - r.t)
            self._learn(Exchange(r.request_bytes, 0, r.payload_bytes, waited, self.link.server_time_s(r.tokens)))
        self.controller.back_off()

    def expire(self) -> list[Request]:
        """Requests whose frames reached their deadline now: each returned once, to fall back.

        They stay known, so a late answer still measures the link.
        """
        with self._lock:
            now = self._clock()
            due = [r for r in self._sent.values() if r.waiting and r.deadline <= now]
            for r in due:
                r.waiting = False
                self._miss(r)
            self._bound_by_oldest(now)
            return due

    def _bound_by_oldest(self, now: float) -> None:
        """A request still unanswered bounds the link's speed from above: it has been out
        this long and its bytes are not through. Without this, a link that dies under
        requests in flight would hold a fast estimate (nothing answers to correct it) and
        only the window would stop sending: the budget could never be suspended."""
        if now - self._last_bound < 0.25 or self.link.throughput_bps <= 0:
            return
        self._last_bound = now
        out = self._outstanding(now)
        if not out:
            return
        r = min(out, key=lambda r: r.t)
        if r.waiting:
            return  # not even past its deadline: no evidence yet
        # Everything of ours before it was answered: its upload began when the last of those
        # had left, or when it was sent.
        upload = now - max(r.t, self._link_free_seen) - self.link.base_rtt_s - self.link.server_time_s(r.tokens)
        if upload <= 0:
            return
        bound = r.request_bytes / upload
        if bound < self.link.throughput_bps:
            self.link.throughput_bps = bound
            self.controller.update(self.link, self.edge_s)

    def next_deadline(self) -> float:
        """Edge clock of the earliest deadline of a waiting request (inf if none)."""
        with self._lock:
            return min((r.deadline for r in self._sent.values() if r.waiting), default=math.inf)

    def drain(self) -> list[Request]:
        """Every request whose frame still waits, marked done (shutdown: each gets a fallback)."""
        with self._lock:
            out = [r for r in self._sent.values() if r.waiting]
            for r in out:
                r.waiting = False
            return out

    def _learn(self, ex: Exchange) -> None:
        self._last_evidence = self._clock()
        self.link.update(ex)
        self.controller.update(self.link, self.edge_s)

    # --- probes -------------------------------------------------------------------------
    def probe_due(self, *, rtt_only: bool = False) -> int:
        """Bytes of the probe to send now, or 0. Probes go out when the estimate is stale (no
        answer for ``probe_interval_s``), and 4x as often while suspended; they alternate
        between a tiny one (base RTT) and a ``probe_bytes`` one (throughput). The caller sends
        it and reports it with :meth:`sent` (patches=0).

        Until the base RTT is measured (three small exchanges: the first after connecting can
        be slow), a tiny probe also goes out while answers flow, once a second and only when
        nothing of ours is in flight, so it does not queue behind a request. Without it, a
        robot that offloads from its first frame on would count the round trip as upload
        time and plan as if a long-RTT link were a slow one. ``rtt_only`` (a fixed budget,
        where only second rounds are planned) sends that one and no others.
        """
        with self._lock:
            if not self._connected:
                return 0
            now = self._clock()
            if (self.link.rtt_samples < 3 and not self._outstanding(now)
                    and now - self._rtt_probe_at >= min(self.probe_interval_s, 1.0)):
                self._rtt_probe_at = now
                self.probes += 1
                return 64
            if rtt_only:
                return 0
            interval = self.probe_interval_s / (4 if self.controller.suspended else 1)
            if now - self._last_evidence < interval:
                return 0
            if any(now - s.t < interval for s in self._sent.values()):
                return 0  # something is in flight: its answer will be the evidence
            self._probe_small = not self._probe_small
            self.probes += 1
            return 64 if not self._probe_small else self.probe_bytes
