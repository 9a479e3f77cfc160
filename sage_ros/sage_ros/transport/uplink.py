# SPDX-License-Identifier: Apache-2.0
"""The edge's uplink: sending requests, receiving answers, and whether the cloud is reachable,
over Zenoh (the session opens in the background) or plain ROS topics."""

from __future__ import annotations

import threading
from typing import Any, Callable

from rclpy.node import Node
from rclpy.qos import QoSProfile
from sage_ros_msgs.msg import CloudResult, PatchSet

from sage_ros.params import config_path
from sage_ros.transport.uplink_watch import (NO_ROUTER, UNANSWERED, RouteContext, UplinkWatch, problem_line,
                                            unresolved_line)


def edge_zenoh_config(p: dict[str, Any]) -> Any:
    """The edge's Zenoh config (zenoh.Config), None for the ros transport; a file that cannot be
    read is a configuration error, said at start in one line naming it."""
    if p['transport'] != 'zenoh':
        return None
    from sage_ros.transport.zenoh_link import load_config

    return load_config(config_path(p['zenoh_config']), connect=p['zenoh_connect'])


class Uplink:
    """The edge's side of the transport: sending requests, receiving answers, and whether the
    cloud is reachable. Zenoh: the session opens (and reopens) in a background thread, so the
    node never waits on the network. ros: plain topics, reachable while something subscribes."""

    def __init__(self, node: Node, p: dict[str, Any], qos: QoSProfile, on_answer: Callable[[bytes], None],
                 zenoh_config: Any = None) -> None:
        self._node = node
        self._p = p
        self._on_answer = on_answer
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._session: Any = None
        self._channel: Any = None
        self._publisher: Any = None
        self._thread: threading.Thread | None = None
        self.state = 'connecting'
        self.problem = ''
        """While the uplink stays useless for a known cause: the line that said why (/diagnostics)."""
        self._watch: Any = None
        if p['transport'] == 'zenoh':
            from sage_ros.transport.zenoh_link import connect_endpoints, session_identity, topic_to_key

            self._config = zenoh_config
            self._put_key = topic_to_key(node.resolve_topic_name(p['patch_set_topic']))
            self._sub_key = topic_to_key(node.resolve_topic_name(p['cloud_result_topic']))
            self._route = RouteContext(self._put_key, self._sub_key, node.get_namespace().strip('/'),
                                       config_path(p['zenoh_config']), session_identity(zenoh_config),
                                       tuple(connect_endpoints(zenoh_config)))
            # As long as the link monitor keeps an unanswered request in flight.
            self._watch = UplinkWatch(silence_s=max(10.0, 10 * p['deadline_ms'] / 1e3))
        else:
            self._publisher = node.create_publisher(PatchSet, p['patch_set_topic'], qos)
            node.create_subscription(CloudResult, p['cloud_result_topic'], on_answer, qos, raw=True)

    def start(self) -> None:
        if self._publisher is None:
            self._thread = threading.Thread(target=self._open, name='sage_edge_uplink', daemon=True)
            self._thread.start()

    def _open(self) -> None:
        import zenoh

        from sage_ros.transport.zenoh_link import ZenohChannel

        log = self._node.get_logger()
        self._say_unresolvable()
        while not self._closed.is_set():
            try:
                # Blocks until a router answers (the shipped config retries for ever).
                session = zenoh.open(self._config)
            except Exception as exc:  # zenoh.ZError: no router within the config's timeout
                self.state = 'no router'
                log.warning(f'uplink: {exc}; retrying', throttle_duration_sec=30.0)
                self._closed.wait(1.0)
                continue
            channel = ZenohChannel(session, self._put_key, self._sub_key, lambda _k, data: self._heard(data))
            with self._lock:
                if self._closed.is_set():
                    channel.close()
                    session.close()
                    return
                self._session, self._channel = session, channel
            log.info(f'Zenoh: requests on {self._put_key!r}, answers from {self._sub_key!r}')
            return

    def _say_unresolvable(self) -> None:
        """An endpoint whose host does not resolve: zenoh.open would retry it for ever in silence."""
        from sage_ros.transport.zenoh_link import unresolvable

        for endpoint in self._route.endpoints:
            host = unresolvable(endpoint)
            if host is not None:
                self.problem = unresolved_line(host, endpoint, self._route)
                self._node.get_logger().warning(self.problem)
                self._watch.said(NO_ROUTER)  # and not again as 'no router reached'

    def _heard(self, data: bytes) -> None:
        """Anything on our answer key: the route works (whatever the answer turns out to be)."""
        if self._watch.answered():
            self.problem = ''
            self._node.get_logger().info('uplink: answers from the cloud arrive now')
        self._on_answer(data)

    def _watch_state(self, state: str) -> None:
        """Say once, in one line, why the uplink stays useless (uplink_watch.UplinkWatch)."""
        trouble = self._watch.update(state)
        if trouble is not None:
            self.problem = problem_line(trouble, self._route)
            log = self._node.get_logger()
            (log.error if trouble.cause == UNANSWERED else log.warning)(self.problem)
        elif not self._watch.cause:
            self.problem = ''
        if self._watch.cause == UNANSWERED:
            self.state = 'unanswered'

    def connected(self) -> bool:
        """Is the cloud reachable now? Zenoh: the session has a router (it reconnects by itself
        after a router restart) and a cloud subscribes to our requests. ros: something
        subscribes to the requests."""
        if self._publisher is not None:
            ok = self._publisher.get_subscription_count() > 0
            self.state = 'connected' if ok else 'no subscriber'
            return ok
        with self._lock:
            session, channel = self._session, self._channel
        if session is None:
            self._watch_state(self.state)
            return False
        try:
            routed = bool(list(session.info.routers_zid()) or list(session.info.peers_zid()))
            served = routed and channel.has_subscribers()
        except Exception:  # noqa: BLE001 - a session closing under us: not connected
            routed = served = False
        # A router without a cloud behind it would swallow our requests: the same as no uplink.
        self.state = 'connected' if served else ('no cloud' if routed else 'router lost')
        self._watch_state(self.state)
        return served

    def send(self, data: bytes) -> None:
        if self._publisher is not None:
            self._publisher.publish(data)  # serialized bytes are published as they are
            return
        with self._lock:
            channel = self._channel
        if channel is None:
            raise RuntimeError('no uplink')
        channel.put(data)
        self._watch.sent()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._channel is not None:
                self._channel.close()
                self._session.close()
            self._session = self._channel = None
