# SPDX-License-Identifier: Apache-2.0
"""sage_router: the cloud side's Zenoh router, as a Python session in router mode.

No zenohd binary is needed. The router is a real ROS node (``/sage_router``) with two
read-only parameters, ``zenoh_config`` and ``zenoh_listen``, and nothing else: no topics.

Why a node and not a plain process (an ``ExecuteProcess`` in the launch file): parameters then
take the one route every sage_ros node takes. rcl itself reads ``--ros-args --params-file F -p
name:=value`` (node keys, wildcards, namespaces, types, errors), so the launch file's
``params_file`` reaches the router exactly as it reaches the cloud node, ``sage-ros up`` starts
it the same way, and ``ros2 node list`` / ``ros2 param get /sage_router zenoh_listen`` show
what it runs with. ``log_level``, ``respawn`` and the launch's shutdown-on-exit work as for the
other nodes. The cost is rclpy's import and one DDS participant on the cloud machine; it still
imports no torch.
"""

from __future__ import annotations

from typing import Any

import zenoh
from rclpy.node import Node

from sage_ros.nodes.parameters import Spec, declare
from sage_ros.nodes.runner import run_node
from sage_ros.params import config_path
from sage_ros.transport.zenoh_link import busy_endpoint, error_text, open_session

SPECS = {
    'zenoh_config': Spec('Zenoh router json5 config (relative: the package config/)', read_only=True),
    'zenoh_listen': Spec('listen endpoints replacing the config\'s (comma-separated)', read_only=True),
}


def listen_failure(exc: zenoh.ZError, listen: str, config: Any) -> str:
    """One line saying why the router cannot start, and what to change when the port is taken."""
    endpoint = busy_endpoint(exc)
    if endpoint is None:
        return f'cannot start the Zenoh router ({listen or config}): {error_text(exc)}'
    return (f'cannot listen on {endpoint}: address in use; another router running? '
            f'choose another with zenoh_listen (e.g. -p zenoh_listen:=tcp/0.0.0.0:PORT)')


class RouterNode(Node):
    """A Zenoh router session living as long as the node."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__('sage_router', **kwargs)
        p = declare(self, 'sage_router', SPECS)
        config = config_path(p['zenoh_config'])
        try:
            self._session = open_session(config, listen=p['zenoh_listen'])
        except zenoh.ZError as exc:
            raise ValueError(listen_failure(exc, p['zenoh_listen'], config)) from None
        self.get_logger().info(f'Zenoh router {self._session.zid()} up ({p["zenoh_listen"] or "listen"} '
                               f'of {config})')

    def destroy_node(self) -> None:
        if hasattr(self, '_session'):
            self._session.close()
        super().destroy_node()


def main(args: list[str] | None = None) -> None:
    """Run the router; exit code 2 and one line when it cannot start, 0 on Ctrl-C/SIGTERM."""
    run_node(RouterNode, args)


if __name__ == '__main__':
    main()
