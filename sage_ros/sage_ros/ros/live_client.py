# SPDX-License-Identifier: Apache-2.0
"""Feeding frames to a running system and collecting its OffloadResults (demo, replay, tests)."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.task import Future
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sage_ros_msgs.msg import OffloadResult
from sensor_msgs.msg import Image

from sage_ros.ros.ros_image import rgb_to_image_fields

SOURCE_NAMES = {OffloadResult.SOURCE_EDGE: 'edge', OffloadResult.SOURCE_CLOUD: 'cloud',
                OffloadResult.SOURCE_EDGE_FALLBACK: 'fallback'}


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


class EdgeNotFound(ConnectionError):
    """No edge node subscribed to the camera topic in time; the message says where we looked."""


class LiveClient(Node):
    """Publishes camera frames and matches each OffloadResult to its frame by header stamp.

    Relative topic names resolve in ``namespace``, as the edge node's do in its own (a robot's
    namespace given to ``sage-ros up --namespace``)."""

    def __init__(self, *, image_topic: str = '/camera/image_raw', result_topic: str = '/sage/result',
                 name: str = 'sage_live_client', namespace: str = '', context: Context | None = None) -> None:
        super().__init__(name, namespace='/' + namespace.strip('/'), context=context)
        # An executor of our own: works with any context and never competes with the global one.
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self)
        reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        self._pub = self.create_publisher(Image, image_topic, reliable)
        self.results: dict[int, OffloadResult] = {}
        self.all_results: list[OffloadResult] = []
        self._sub = self.create_subscription(OffloadResult, result_topic, self._on_result, reliable)

    def _on_result(self, msg: OffloadResult) -> None:
        self.all_results.append(msg)
        self.results[stamp_ns(msg.header.stamp)] = msg

    def wait_for_edge(self, timeout: float = 30.0, settle: float = 1.0) -> bool:
        """Wait until the edge node's camera subscription and result publisher are matched.

        Discovery is not symmetric: our writer can see the edge's reader before that reader
        has matched our writer, and a best-effort reader drops samples of writers it does not
        know yet. ``settle`` seconds more let the other side catch up.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self._pub.get_subscription_count() > 0 and self._sub.get_publisher_count() > 0:
                self.drain(settle)
                return True
            self._executor.spin_once(timeout_sec=0.05)
        return False

    @property
    def image_topic(self) -> str:
        """The camera topic, resolved ('/robot1/camera/image_raw')."""
        return self._pub.topic_name

    def require_edge(self, timeout: float) -> None:
        """:meth:`wait_for_edge`, raising :class:`EdgeNotFound` (one line: where we looked, and
        where an edge does listen when one does so in another namespace) when none came."""
        if self.wait_for_edge(timeout):
            return
        topic = self.image_topic
        tail = topic.rsplit('/', 2)[-2:]
        elsewhere = sorted(name for name, _ in self.get_topic_names_and_types()
                           if name != topic and name.split('/')[-2:] == tail and self.count_subscribers(name) > 0)
        hint = (f'; an edge listens on {", ".join(elsewhere)} (--namespace)' if elsewhere else
                '; is the system up (sage-ros up), on this ROS_DOMAIN_ID '
                f'({os.environ.get("ROS_DOMAIN_ID", "0")}) and namespace?')
        raise EdgeNotFound(f'no edge node subscribed to {topic} within {timeout:g} s{hint}')

    def spin_until_future_complete(self, future: Future, timeout: float = 10.0) -> None:
        self._executor.spin_until_future_complete(future, timeout_sec=timeout)

    def destroy_node(self) -> None:
        self._executor.remove_node(self)
        self._executor.shutdown()
        super().destroy_node()

    def publish(self, rgb: np.ndarray, *, encoding: str = 'rgb8', frame_id: str = 'camera',
                stamp: int | None = None) -> int:
        """Publish one frame now (stamped now, or ``stamp`` in ns); returns the stamp, the key of its result."""
        msg = Image(**rgb_to_image_fields(rgb, encoding))
        msg.header.frame_id = frame_id
        if stamp is None:
            msg.header.stamp = self.get_clock().now().to_msg()
        else:
            msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(int(stamp), 10**9)
        self._pub.publish(msg)
        return stamp_ns(msg.header.stamp)

    def wait_result(self, stamp: int, timeout: float) -> OffloadResult | None:
        end = time.monotonic() + timeout
        while stamp not in self.results and time.monotonic() < end:
            self._executor.spin_once(timeout_sec=0.02)
        return self.results.get(stamp)

    def classify(self, rgb: np.ndarray, *, timeout: float = 30.0, encoding: str = 'rgb8') -> OffloadResult | None:
        """Publish a frame and wait for its result."""
        return self.wait_result(self.publish(rgb, encoding=encoding), timeout)

    def diagnostics(self, name: str, timeout: float = 5.0) -> dict[str, str] | None:
        """Key/values (and ``message``) of the next /diagnostics status whose name ends with
        ``name`` (e.g. 'sage_edge: link'), or None if none came within ``timeout``."""
        from diagnostic_msgs.msg import DiagnosticArray

        seen: list[DiagnosticArray] = []
        sub = self.create_subscription(DiagnosticArray, '/diagnostics', seen.append, 10)
        try:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                self.drain(0.05)
                for arr in seen:
                    for st in arr.status:
                        if st.name.endswith(name):
                            return {'message': st.message, **{kv.key: kv.value for kv in st.values}}
            return None
        finally:
            self.destroy_subscription(sub)

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._executor.spin_once(timeout_sec=0.02)
