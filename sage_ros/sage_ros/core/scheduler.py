# SPDX-License-Identifier: Apache-2.0
"""Fair sharing of the cloud's server time between robots, within their deadlines, in batches.

**Cost-aware fairness.** Each robot has a FIFO queue of its own. The server's time is shared by
start-time fair queueing (Goyal, Vin and Cheng, SIGCOMM 1996) weighed in tokens: a robot's next
request carries a virtual start tag, the robot's previous finish tag (start + the tokens it
was served), and never less than the system's virtual time (the start tag last served), so a
robot that was idle gets no credit and a robot that just arrived is served next. The smallest
tag is served first. A robot sending 196-patch requests therefore gets as many tokens of
server time as one sending 32-patch requests, not six times as many; and a well-behaved robot
waits for at most the forward already running.

**Bounded queues.** A robot over ``per_robot`` sheds its own oldest request. When all queues
together are over ``max_queue``, the longest queue sheds; among equally long queues, the robot
furthest ahead in the fair order (the largest tag: the most service lately), then the one
served most recently, then the latest to arrive; never simply the robot seen first. The
caller answers every item shed (BUSY), so nothing is lost silently.

**Deadlines.** A request may carry the time by which its answer is of use. The scheduler
learns the server's seconds per token from the caller (:meth:`FairScheduler.served`) and drops,
at once, every request that could no longer be answered in time: when offered, while queued,
and when its turn comes. Those are answered at once too, so the robot falls back now and not
at its deadline, and no server time goes to an answer nobody waits for. The estimate is the
best of the last few batches (one slow forward, such as the first after start, cannot make
every request look late), and it is forgotten after ``cost_memory_s`` without a batch: a
server thought too slow for every deadline is measured again rather than never used.

**Bounded state.** Intake costs O(log) of the requests queued, whatever the number of robots:
totals are kept, never summed over robots. A robot with nothing queued for ``idle_s`` is
forgotten; at most ``max_robots`` are remembered (the longest idle goes first). Readers get
snapshots taken under the one lock.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

T = TypeVar('T')

OVERLOADED = 'overloaded'
"""Why an item was shed: its robot's queue, or all queues together, were full."""
LATE = 'late'
"""Why an item was dropped: its answer could not come before its deadline."""


@dataclass
class RobotCounts:
    """What one robot sent and what became of it, while the scheduler remembers the robot."""

    queued: int = 0
    served: int = 0
    shed: int = 0
    """Shed for room (OVERLOADED)."""
    late: int = 0
    """Dropped for their deadline (LATE)."""


@dataclass(frozen=True)
class Dropped(Generic[T]):
    """An item that will not be served: answer it at once."""

    robot: str
    item: T
    reason: str
    """:data:`OVERLOADED` or :data:`LATE`."""


@dataclass
class Taken(Generic[T]):
    """What :meth:`FairScheduler.take` hands the worker."""

    items: list[tuple[str, T]] = field(default_factory=list)
    """(robot, item) to serve now, at most one per robot, in fair order."""
    dropped: list[Dropped[T]] = field(default_factory=list)
    """Items found too late to be served: answer them at once."""


@dataclass(frozen=True)
class FleetSummary:
    """A snapshot for diagnostics: totals, and the few robots that stood out since the last one."""

    queued: int
    active: int
    """Robots with a request queued."""
    tracked: int
    """Robots remembered (queued, or idle for less than ``idle_s``)."""
    seen: int
    """Robots that were new to the scheduler (counted again after being forgotten)."""
    forgotten: int
    """Robots forgotten: idle for ``idle_s``, or the longest idle beyond ``max_robots``."""
    served: int
    shed: int
    late: int
    s_per_token: float
    """The server's measured seconds per token, as deadlines use it (0: not measured lately)."""
    most_shed: list[tuple[str, int]]
    """The robots with the most requests shed or dropped since the last summary, most first."""
    busiest: list[tuple[str, int]]
    """The robots served most since the last summary, most first."""


@dataclass(eq=False)
class _Job(Generic[T]):
    robot: str
    item: T
    cost: float
    deadline: float
    done: bool = False
    """Served, shed or dropped: its deadline heap entry is stale."""


@dataclass(eq=False)
class _Robot:
    name: str
    queue: collections.deque = field(default_factory=collections.deque)
    tag: float = 0.0
    """Virtual start tag of its next service (valid while it has a request queued)."""
    finish: float = 0.0
    """Virtual finish tag of its last service."""
    arrival: int = 0
    """When it last became active, in arrivals (ties: the latest is shed first, served last)."""
    served_at: int = -1
    """When it was last served, in services (-1: never)."""
    version: int = 0
    """Bumped on every change of its queue or tag: heap entries of older versions are stale."""
    idle_since: float = 0.0
    counts: RobotCounts = field(default_factory=RobotCounts)


class FairScheduler(Generic[T]):
    """Per-robot FIFO queues served by start-time fair queueing in tokens, in batches. Thread-safe."""

    def __init__(self, max_queue: int = 8, per_robot: int = 4, *, idle_s: float = 60.0, max_robots: int = 4096,
                 top: int = 3, cost_samples: int = 3, cost_memory_s: float = 3.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cv = threading.Condition()
        self._clock = clock
        self._top = top
        self._cost_memory_s = cost_memory_s
        self.max_queue = self.per_robot = self.max_robots = 0
        self.idle_s = 0.0
        self.configure(max_queue=max_queue, per_robot=per_robot, idle_s=idle_s, max_robots=max_robots)
        self._robots: dict[str, _Robot] = {}
        """Every robot remembered: the active and the idle."""
        self._active: dict[str, _Robot] = {}
        """Robots with a request queued (at most max_queue)."""
        self._idle: collections.OrderedDict[str, _Robot] = collections.OrderedDict()
        """Robots with nothing queued, the longest idle first."""
        self._serve_heap: list[tuple[float, int, int, str]] = []
        """(tag, arrival, version, robot): the first is served next."""
        self._shed_heap: list[tuple[int, float, int, int, int, str]] = []
        """(-queue length, -tag, -last service, -arrival, version, robot): the first sheds next."""
        self._deadlines: list[tuple[float, int, _Job[T]]] = []
        """(deadline, job number, job) of the jobs queued with a deadline (done ones are stale)."""
        self._job_numbers = itertools.count()
        self._queued = 0
        self._arrivals = 0
        self._services = 0
        self._vtime = 0.0
        self._cost: collections.deque[tuple[float, float]] = collections.deque(maxlen=cost_samples)
        """(when, seconds per token) of the last batches."""
        self._busy_until = 0.0
        self._closed = False
        self._totals: collections.Counter[str] = collections.Counter()
        # Since the last summary: robot -> [served, shed or late], at most max_robots robots.
        self._window: dict[str, list[int]] = {}

    def configure(self, *, max_queue: int | None = None, per_robot: int | None = None, idle_s: float | None = None,
                  max_robots: int | None = None) -> None:
        """Change bounds (``None`` keeps a value); they apply from the next request on."""
        values = {'max_queue': max_queue, 'per_robot': per_robot, 'max_robots': max_robots}
        if any(v is not None and v < 1 for v in values.values()) or (idle_s is not None and not idle_s > 0):
            raise ValueError('max_queue, per_robot and max_robots must be >= 1, idle_s > 0')
        with self._cv:
            for name, value in values.items():
                if value is not None:
                    setattr(self, name, value)
            if idle_s is not None:
                self.idle_s = idle_s

    # --- intake -------------------------------------------------------------------------
    def offer(self, robot: str, item: T, *, cost: float = 1.0, deadline: float = math.inf) -> list[Dropped[T]]:
        """Queue ``item`` for ``robot``; returns what will not be served (answer each at once).

        ``cost`` is the server time the item takes, in tokens; ``deadline`` (scheduler clock)
        when its answer stops being of use. The item itself may come back: shed for room, or
        too late already.
        """
        with self._cv:
            now = self._clock()
            out: list[Dropped[T]] = []
            self._drop_late(now, out)
            self._forget_idle(now)
            r = self._robots.get(robot)
            if r is None:
                r = self._robots[robot] = _Robot(robot)
                self._totals['seen'] += 1
            r.counts.queued += 1
            job: _Job[T] = _Job(robot, item, max(0.0, float(cost)), float(deadline))
            if self._too_late(job, now):
                self._count_out(r, job, LATE, out)
                if not r.queue:
                    self._to_idle(r, now)
                return out
            if not r.queue:
                self._activate(r)
            r.queue.append(job)
            self._queued += 1
            if job.deadline < math.inf:
                heapq.heappush(self._deadlines, (job.deadline, next(self._job_numbers), job))
            self._changed(r)
            if len(r.queue) > self.per_robot:
                self._drop(r, r.queue[0], OVERLOADED, now, out)
            while self._queued > self.max_queue:
                victim = self._longest()
                self._drop(victim, victim.queue[0], OVERLOADED, now, out)
            self._compact()
            self._cv.notify()
            return out

    def _activate(self, r: _Robot) -> None:
        # No credit for time spent idle: never before the system's virtual time.
        self._idle.pop(r.name, None)
        self._active[r.name] = r
        r.tag = max(self._vtime, r.finish)
        r.arrival = self._arrivals
        self._arrivals += 1

    def _changed(self, r: _Robot) -> None:
        r.version += 1
        if r.queue:
            heapq.heappush(self._serve_heap, (r.tag, r.arrival, r.version, r.name))
            heapq.heappush(self._shed_heap, self._shed_key(r))

    @staticmethod
    def _shed_key(r: _Robot) -> tuple[int, float, int, int, int, str]:
        return -len(r.queue), -r.tag, -r.served_at, -r.arrival, r.version, r.name

    def _valid(self, version: int, name: str) -> _Robot | None:
        r = self._active.get(name)
        return r if r is not None and r.version == version else None

    def _longest(self) -> _Robot:
        while True:
            *_, version, name = self._shed_heap[0]
            r = self._valid(version, name)
            if r is not None:
                return r
            heapq.heappop(self._shed_heap)

    def _drop(self, r: _Robot, job: _Job[T], reason: str, now: float, out: list[Dropped[T]]) -> None:
        """Take a queued ``job`` out of ``r``'s queue, shed or late."""
        if job is r.queue[0]:
            r.queue.popleft()
        else:  # a late job behind its robot's head: queues are short (per_robot)
            del r.queue[next(i for i, j in enumerate(r.queue) if j is job)]
        job.done = True
        self._queued -= 1
        if r.queue:
            self._changed(r)
        else:
            self._to_idle(r, now)
        self._count_out(r, job, reason, out)

    def _count_out(self, r: _Robot, job: _Job[T], reason: str, out: list[Dropped[T]]) -> None:
        if reason == LATE:
            r.counts.late += 1
        else:
            r.counts.shed += 1
        self._totals[reason] += 1
        self._note(r.name, 1)
        out.append(Dropped(r.name, job.item, reason))

    def _to_idle(self, r: _Robot, now: float) -> None:
        r.version += 1
        self._active.pop(r.name, None)
        r.idle_since = now
        self._idle[r.name] = r
        self._idle.move_to_end(r.name)

    def _forget_idle(self, now: float) -> None:
        # The longest idle come first: amortised O(1) per request.
        while self._idle:
            name, r = next(iter(self._idle.items()))
            if now - r.idle_since < self.idle_s and len(self._robots) < self.max_robots:
                break
            del self._idle[name]
            del self._robots[name]
            self._totals['forgotten'] += 1

    # --- deadlines ----------------------------------------------------------------------
    def _too_late(self, job: _Job[T], now: float) -> bool:
        """Its answer cannot come in time: not before the batch running now, plus its own forward."""
        return max(now, self._busy_until) + job.cost * self._s_per_token(now) > job.deadline

    def _drop_late(self, now: float, out: list[Dropped[T]]) -> None:
        while self._deadlines:
            _, _, job = self._deadlines[0]
            if not job.done and not self._too_late(job, now):
                break
            heapq.heappop(self._deadlines)
            if not job.done:
                self._drop(self._active[job.robot], job, LATE, now, out)

    def served(self, tokens: float, seconds: float) -> None:
        """The worker served ``tokens`` in ``seconds``: the server's cost, for deadlines."""
        with self._cv:
            self._busy_until = 0.0
            if tokens > 0 and seconds >= 0:
                self._cost.append((self._clock(), seconds / tokens))

    def _s_per_token(self, now: float) -> float:
        # The best recent batch: optimistic, so that only what is surely late is dropped; 0
        # (no prediction) once the last batch is older than cost_memory_s.
        if not self._cost or now - self._cost[-1][0] > self._cost_memory_s:
            return 0.0
        return min(spt for _, spt in self._cost)

    def predict_s(self, tokens: float) -> float:
        """Seconds the server takes for ``tokens`` (0 while not measured)."""
        with self._cv:
            return tokens * self._s_per_token(self._clock())

    # --- service ------------------------------------------------------------------------
    def take(self, max_batch: int, *, wait_s: float = 0.0, timeout: float = 0.2) -> Taken[T]:
        """Up to ``max_batch`` (robot, item), at most one per robot, smallest tag first, and
        the items found too late on the way (answer those at once).

        Blocks up to ``timeout`` for the first item, then up to ``wait_s`` more while fewer
        robots than ``max_batch`` wait (a short wait fills batches under load and costs
        little when idle). Empty on timeout or after :meth:`close`.
        """
        taken: Taken[T] = Taken()
        with self._cv:
            if not self._cv.wait_for(lambda: self._closed or self._queued > 0, timeout):
                return taken
            end = time.monotonic() + wait_s
            while not self._closed and len(self._active) < max_batch:
                left = end - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    break
            now = self._clock()
            self._drop_late(now, taken.dropped)
            chosen: list[_Robot] = []
            tokens = 0.0
            spt = self._s_per_token(now)
            while len(taken.items) < max_batch and self._serve_heap:
                _, _, version, name = heapq.heappop(self._serve_heap)
                r = self._valid(version, name)
                if r is None:
                    continue
                job = r.queue[0]
                if now + (tokens + job.cost) * spt > job.deadline:
                    self._drop(r, job, LATE, now, taken.dropped)  # back in the heap if more is queued
                    continue
                r.queue.popleft()
                job.done = True
                self._queued -= 1
                tokens += job.cost
                # Virtual time moves on with service; the robot's next request starts where
                # this one finishes.
                self._vtime = max(self._vtime, r.tag)
                r.finish = r.tag = r.tag + job.cost
                r.served_at = self._services
                self._services += 1
                r.version += 1  # out of both heaps until the batch is complete
                r.counts.served += 1
                self._totals['served'] += 1
                self._note(name, 0)
                taken.items.append((name, job.item))
                chosen.append(r)
            for r in chosen:  # back in line after the batch: one request per robot per batch
                if r.queue:
                    self._changed(r)
                else:
                    self._to_idle(r, now)
            if taken.items:
                self._busy_until = now + tokens * spt
            self._compact()
            return taken

    def _compact(self) -> None:
        # Stale heap entries are skipped lazily, and the heaps rebuilt once they outnumber the
        # live ones: they stay within a constant factor of what is queued.
        if len(self._serve_heap) + len(self._shed_heap) > 4 * len(self._active) + 64:
            self._serve_heap = [(r.tag, r.arrival, r.version, n) for n, r in self._active.items()]
            self._shed_heap = [self._shed_key(r) for r in self._active.values()]
            heapq.heapify(self._serve_heap)
            heapq.heapify(self._shed_heap)
        if len(self._deadlines) > 2 * self._queued + 64:
            self._deadlines = [e for e in self._deadlines if not e[2].done]
            heapq.heapify(self._deadlines)

    # --- reading ------------------------------------------------------------------------
    def _note(self, robot: str, which: int) -> None:
        w = self._window.get(robot)
        if w is None:
            if len(self._window) >= self.max_robots:
                return
            w = self._window[robot] = [0, 0]
        w[which] += 1

    def summary(self) -> FleetSummary:
        """Totals, and the robots most shed and most served since the last summary."""
        with self._cv:
            window, self._window = self._window, {}
            totals = dict(self._totals)
            queued, active, tracked = self._queued, len(self._active), len(self._robots)
            spt = self._s_per_token(self._clock())
        # Outside the lock: the window is ours now.
        shed = heapq.nlargest(self._top, ((n, w[1]) for n, w in window.items() if w[1]), key=lambda x: x[1])
        busy = heapq.nlargest(self._top, ((n, w[0]) for n, w in window.items() if w[0]), key=lambda x: x[1])
        return FleetSummary(queued=queued, active=active, tracked=tracked, seen=totals.get('seen', 0),
                            forgotten=totals.get('forgotten', 0), served=totals.get('served', 0),
                            shed=totals.get(OVERLOADED, 0), late=totals.get(LATE, 0), s_per_token=spt,
                            most_shed=shed, busiest=busy)

    def counts_of(self, robot: str) -> RobotCounts | None:
        """A copy of ``robot``'s counts, or None when it is not remembered."""
        with self._cv:
            r = self._robots.get(robot)
            return None if r is None else RobotCounts(**vars(r.counts))

    def depth(self) -> dict[str, int]:
        """Items waiting per robot that has any (at most ``max_queue`` robots)."""
        with self._cv:
            return {name: len(r.queue) for name, r in self._active.items()}

    def __len__(self) -> int:
        with self._cv:
            return self._queued

    def drain(self) -> list[tuple[str, T]]:
        """Everything still queued (shutdown: answer each)."""
        with self._cv:
            now = self._clock()
            out = []
            for r in list(self._active.values()):
                for job in r.queue:
                    job.done = True
                    out.append((r.name, job.item))
                r.queue.clear()
                self._to_idle(r, now)
            self._queued = 0
            return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
