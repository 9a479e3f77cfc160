# SPDX-License-Identifier: Apache-2.0
"""Uplink estimation and the live budget controller.

The estimator learns from the offload traffic itself. For each answered request it gets the
request size, the edge's send->answer time (edge clock) and the cloud's receive->send time
(cloud clock). Only differences on one clock are used, so robot and cloud clocks need not
agree. The network part of a round trip is modelled as ``base_rtt + bytes / throughput``.

The controller turns the estimate and the per-frame deadline into the largest patch budget
that fits: fast down (the next request), slow up (hysteresis), and a suspension of
offloading when even the smallest budget cannot make the deadline.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field


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
    """Cloud clock: request received -> answer sent (0 if unknown)."""


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

    def update(self, ex: Exchange) -> None:
        self.samples += 1
        net = max(1e-6, ex.round_trip_s - max(0.0, ex.server_s))
        if ex.patches > 0:
            self._server.append((ex.patches, max(0.0, ex.server_s)))
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
            return max(0.0, my + slope * (patches - mx))
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

    def fits(self, budget: int, link: LinkEstimator, edge_s: float) -> bool:
        """Does a request of ``budget`` patches make the deadline on this link?"""
        if link.throughput_bps <= 0:
            return True  # nothing known yet: try, and learn from the answer
        upload = (self.overhead_bytes + budget * max(self._bytes_per_patch, 1.0)) / link.throughput_bps
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
class _Sent:
    t: float
    request_bytes: int
    patches: int
    payload_bytes: int


class UplinkMonitor:
    """Ties requests to answers, feeds the estimator and the controller, and schedules probes.

    ``clock`` is the edge's monotonic clock; the cloud's only enters as a duration.
    """

    def __init__(self, controller: BudgetController, estimator: LinkEstimator | None = None, *,
                 probe_interval_s: float = 2.0, probe_bytes: int = 4096, clock=None) -> None:
        import time

        self.controller = controller
        self.link = estimator or LinkEstimator()
        self.probe_interval_s = probe_interval_s
        self.probe_bytes = probe_bytes
        self._clock = clock or time.monotonic
        self._sent: collections.OrderedDict[str, _Sent] = collections.OrderedDict()
        self._edge_s = 0.0
        self._last_evidence = self._clock()
        self._last_answer_t = float('-inf')
        self._probe_small = True
        self.answered_count = 0
        self.deadline_misses = 0
        self.probes = 0

    @property
    def budget(self) -> int:
        """Patch budget for the next request; 0 while offloading is suspended."""
        return 0 if self.controller.suspended else self.controller.budget

    def sent(self, request_id: str, *, request_bytes: int, patches: int, payload_bytes: int,
             edge_s: float = 0.0) -> None:
        """A request (or probe, with patches=0) left now; ``edge_s`` is its frame's edge time."""
        self._sent[request_id] = _Sent(self._clock(), request_bytes, patches, payload_bytes)
        while len(self._sent) > 256:
            self._sent.popitem(last=False)
        if patches > 0:
            self._edge_s = edge_s if self._edge_s <= 0 else 0.8 * self._edge_s + 0.2 * edge_s
            self.controller.learn_payload(patches, payload_bytes)

    def answered(self, request_id: str, server_s: float) -> Exchange | None:
        """An answer arrived (in time or late: both measure the link). Returns the exchange."""
        s = self._sent.pop(request_id, None)
        if s is None:
            return None
        now = self._clock()
        # A request sent while an earlier one still held the link only started to move when
        # that one was through: time it from there, or queueing would read as a slow link.
        start = max(s.t, self._last_answer_t)
        self._last_answer_t = now
        ex = Exchange(s.request_bytes, s.patches, s.payload_bytes, now - start, server_s)
        self.answered_count += 1
        self._learn(ex)
        return ex

    def missed(self, request_id: str) -> None:
        """No answer by the deadline. The link took at least this long, so it is at most this
        fast; and whatever the estimate says, the budget halves at once (the request still
        occupies the link, and the next one queues behind it)."""
        s = self._sent.get(request_id)
        if s is None:
            return
        self.deadline_misses += 1
        waited = self._clock() - s.t
        self._learn(Exchange(s.request_bytes, 0, s.payload_bytes, waited, self.link.server_time_s(s.patches)))
        self.controller.back_off()

    def _learn(self, ex: Exchange) -> None:
        self._last_evidence = self._clock()
        self.link.update(ex)
        self.controller.update(self.link, self._edge_s)

    def probe_due(self) -> int:
        """Bytes of the probe to send now, or 0. Probes go out when the estimate is stale (no
        answer for ``probe_interval_s``), and 4x as often while suspended; they alternate
        between a tiny one (base RTT) and a ``probe_bytes`` one (throughput)."""
        interval = self.probe_interval_s / (4 if self.controller.suspended else 1)
        if self._clock() - self._last_evidence < interval:
            return 0
        if any(self._clock() - s.t < interval for s in self._sent.values()):
            return 0  # something is in flight: its answer will be the evidence
        self._probe_small = not self._probe_small
        self.probes += 1
        return 64 if not self._probe_small else self.probe_bytes
