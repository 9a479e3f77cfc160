# SPDX-License-Identifier: Apache-2.0
"""Periodic counters of a node on /diagnostics (diagnostic_msgs/DiagnosticArray).

diagnostic_updater is not installable from PyPI, so this is the small part of it we need:
one status per node, its counters as key/values, WARN while a watched counter grows.
"""

from __future__ import annotations

import threading
from typing import Callable, Iterable

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.node import Node


class Counters:
    """Named event counters shared by a node's threads (camera callbacks, worker, transport)."""

    def __init__(self, names: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def __getitem__(self, name: str) -> int:
        with self._lock:
            return self._counts[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


class CounterDiagnostics:
    """Publish ``stats`` every ``period`` s; WARN when any of ``warn_on`` grew since the last."""

    def __init__(self, node: Node, stats: Callable[[], dict[str, int]], *, hardware_id: str,
                 warn_on: tuple[str, ...] = (), period: float = 1.0,
                 extra: Callable[[], DiagnosticStatus] | None = None) -> None:
        self._extra = extra
        self._node = node
        self._stats = stats
        self._hardware_id = hardware_id
        self._warn_on = warn_on
        self._last: dict[str, int] = {}
        self._pub = node.create_publisher(DiagnosticArray, '/diagnostics', 10)
        node.create_timer(period, self.publish)

    def publish(self) -> None:
        now = dict(self._stats())
        grew = [k for k in self._warn_on if now.get(k, 0) > self._last.get(k, 0)]
        self._last = now
        status = DiagnosticStatus(
            level=DiagnosticStatus.WARN if grew else DiagnosticStatus.OK,
            name=f'{self._node.get_fully_qualified_name()}: stats',
            message=('new ' + ', '.join(grew)) if grew else 'ok',
            hardware_id=self._hardware_id,
            values=[KeyValue(key=k, value=str(v)) for k, v in now.items()],
        )
        msg = DiagnosticArray(status=[status] + ([self._extra()] if self._extra else []))
        msg.header.stamp = self._node.get_clock().now().to_msg()
        self._pub.publish(msg)
