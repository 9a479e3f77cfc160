# SPDX-License-Identifier: Apache-2.0
"""The main() every sage_ros node shares: init, spin, clean shutdown."""

from __future__ import annotations

import os
import sys

import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node

from sage_ros.core.errors import SageError


def exit_now(code: int = 0) -> None:
    """End the process once everything is closed, skipping interpreter finalisation: with torch
    loaded it takes over a second, and a node must stop within one or two."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_node(node_cls: type[Node], args: list[str] | None = None) -> None:
    """Spin ``node_cls`` until Ctrl-C, SIGTERM or external shutdown, then exit the process.

    A configuration that cannot work (unloadable weights, a bad parameter) stops the
    process with exit code 2 and one clear log line instead of a traceback.
    """
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = node_cls()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (SageError, ValueError, KeyError) as exc:
        if node is not None:
            raise
        rclpy.logging.get_logger(node_cls.__name__).fatal(f'cannot start: {exc}')
        code = 2
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    exit_now(code)
