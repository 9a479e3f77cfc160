# SPDX-License-Identifier: Apache-2.0
"""The main() every sage_ros node shares: init, spin, clean shutdown."""

from __future__ import annotations

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from sage_ros.core.errors import SageError


def run_node(node_cls: type[Node], args: list[str] | None = None) -> None:
    """Spin ``node_cls`` until Ctrl-C, SIGTERM or external shutdown.

    A configuration that cannot work (unloadable weights, a bad parameter) stops the
    process with exit code 2 and one clear log line instead of a traceback.
    """
    rclpy.init(args=args)
    node = None
    try:
        node = node_cls()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (SageError, ValueError, KeyError) as exc:
        if node is not None:
            raise
        rclpy.logging.get_logger(node_cls.__name__).fatal(f'cannot start: {exc}')
        raise SystemExit(2) from None
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
