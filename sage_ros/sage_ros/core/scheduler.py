# SPDX-License-Identifier: Apache-2.0
"""Fair queueing of the cloud's work between robots, and batches for the server model.

One queue per robot, served in turn (round robin: a batch takes at most one request of each
robot, starting where the last one stopped), each bounded. A robot over its bound sheds
its own oldest request; when all queues together are over ``max_queue``, the robot with the
longest queue sheds. A flooding robot therefore fills and sheds only its own queue, while a
well-behaved one is served within one turn. The caller answers every shed item (BUSY), so
nothing is lost silently.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

T = TypeVar('T')


@dataclass
class RobotCounts:
    """What one robot sent and what became of it."""

    queued: int = 0
    served: int = 0
    shed: int = 0


@dataclass
class FairScheduler(Generic[T]):
    """Per-robot FIFO queues served round robin, in batches. Thread-safe."""

    max_queue: int = 8
    """Items waiting at most, all robots together."""
    per_robot: int = 4
    """Items one robot may have waiting."""
    _queues: dict[str, collections.deque[T]] = field(default_factory=dict, repr=False)
    _turn: collections.deque[str] = field(default_factory=collections.deque, repr=False)
    _cv: threading.Condition = field(default_factory=threading.Condition, repr=False)
    _closed: bool = False
    counts: dict[str, RobotCounts] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_queue < 1 or self.per_robot < 1:
            raise ValueError('max_queue and per_robot must be >= 1')

    def configure(self, *, max_queue: int | None = None, per_robot: int | None = None) -> None:
        with self._cv:
            self.max_queue = self.max_queue if max_queue is None else max_queue
            self.per_robot = self.per_robot if per_robot is None else per_robot

    def offer(self, robot: str, item: T) -> list[T]:
        """Queue ``item`` for ``robot``; returns the items shed to make room (answer them BUSY)."""
        shed: list[T] = []
        with self._cv:
            q = self._queues.get(robot)
            if q is None:
                q = self._queues[robot] = collections.deque()
                self._turn.append(robot)
            counts = self.counts.setdefault(robot, RobotCounts())
            counts.queued += 1
            q.append(item)
            if len(q) > self.per_robot:
                shed.append(self._shed(robot))
            while self._total() > self.max_queue:
                longest = max(self._queues, key=lambda r: len(self._queues[r]))
                shed.append(self._shed(longest))
            self._cv.notify()
        return shed

    def _shed(self, robot: str) -> T:
        self.counts[robot].shed += 1
        return self._queues[robot].popleft()

    def _total(self) -> int:
        return sum(len(q) for q in self._queues.values())

    def depth(self) -> dict[str, int]:
        """Items waiting per robot."""
        with self._cv:
            return {r: len(q) for r, q in self._queues.items() if q}

    def __len__(self) -> int:
        with self._cv:
            return self._total()

    def take(self, max_batch: int, *, wait_s: float = 0.0, timeout: float = 0.2) -> list[tuple[str, T]]:
        """Up to ``max_batch`` (robot, item), at most one per robot, robots in turn (round robin).

        Blocks up to ``timeout`` for the first item, then up to ``wait_s`` more while the batch
        is not full (a short wait fills batches under load and costs little when idle).
        Returns [] on timeout or after :meth:`close`.
        """
        with self._cv:
            if not self._cv.wait_for(lambda: self._closed or self._total() > 0, timeout):
                return []
            end = time.monotonic() + wait_s
            while not self._closed and self._total() < max_batch:
                left = end - time.monotonic()
                if left <= 0 or not self._cv.wait(left):
                    break
            # One turn: at most one request per robot in a batch, so a robot with a full queue
            # cannot fill the batch that another robot's request then waits behind.
            batch: list[tuple[str, T]] = []
            for _ in range(len(self._turn)):
                if len(batch) >= max_batch:
                    break
                robot = self._turn[0]
                self._turn.rotate(-1)
                q = self._queues[robot]
                if q:
                    batch.append((robot, q.popleft()))
                    self.counts[robot].served += 1
            return batch

    def drain(self) -> list[tuple[str, T]]:
        """Everything still queued (shutdown: answer each)."""
        with self._cv:
            out = [(r, item) for r, q in self._queues.items() for item in q]
            for q in self._queues.values():
                q.clear()
            return out

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
