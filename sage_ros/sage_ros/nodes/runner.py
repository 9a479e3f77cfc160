# SPDX-License-Identifier: Apache-2.0
"""The main() every sage_ros node shares: init, spin, clean shutdown."""

from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from typing import NoReturn, TypeVar

import rclpy
import rclpy.logging
from rclpy.exceptions import ParameterException
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from zenoh import ZError

from sage_ros.core.errors import SageError
from sage_ros.transport.zenoh_link import error_text

# What a configuration that cannot work raises while a node is built: bad weights or config
# (SageError, ValueError, KeyError, OSError), a parameter of the wrong type or out of range
# (rclpy's ParameterException), an unusable Zenoh endpoint (ZError). Anything else is a bug
# and keeps its traceback.
START_ERRORS: tuple[type[BaseException], ...] = (SageError, ValueError, KeyError, OSError, ParameterException, ZError)

N = TypeVar('N', bound=Node)


def exit_now(code: int = 0) -> None:
    """End the process once everything is closed, skipping interpreter finalisation: with torch
    loaded it takes over a second, and a node must stop within one or two."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def one_line(exc: BaseException) -> str:
    """``exc`` as one line, without the C/Rust source locations rcl and Zenoh append."""
    if isinstance(exc, ZError):
        return error_text(exc)
    text = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else str(exc)
    text = re.sub(r',? at /\S+:\d+\.?', '', str(text))
    return ' '.join(text.split()) or type(exc).__name__


def build_node(node_cls: type[N]) -> N:
    """``node_cls()``, except that a node whose ``__init__`` fails is destroyed as a plain Node.

    rclpy's context keeps a weak reference to every node from ``Node.__init__`` on and calls
    ``destroy_node`` on those still alive at shutdown; the traceback keeps a half-built node
    alive, and its subclass's ``destroy_node`` would trip over attributes never set.
    """
    node = node_cls.__new__(node_cls)
    try:
        node.__init__()
    except BaseException:
        try:
            Node.destroy_node(node)  # also untracks it from the context
        except Exception:  # noqa: BLE001 - Node.__init__ itself failed: nothing was tracked
            pass
        raise
    return node


def _ignore_signals() -> None:
    """Teardown is short and must finish: a second Ctrl-C or a SIGTERM arriving inside
    destroy_node or try_shutdown would end it with a traceback instead."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _interrupt(signum: int, frame: object) -> NoReturn:
    raise KeyboardInterrupt


def _stopping() -> None:
    """Silence ``__del__`` errors from here on: the interrupt may have landed inside some
    constructor, and the half-built object would print 'Exception ignored ... Traceback' as it
    is collected. Nothing else runs after this but teardown."""
    sys.unraisablehook = lambda unraisable: None


def _run(node_cls: type[Node], args: list[str] | None) -> int:
    logger = rclpy.logging.get_logger(node_cls.__name__)
    # rclpy's SIGTERM handler shuts the context down and then calls the handler it found at
    # init: with this one, SIGTERM also interrupts a node still loading its model right away
    # (as Ctrl-C does) instead of letting it run on until its next rclpy call fails.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        rclpy.init(args=args)
    except RuntimeError as exc:  # rcl's RCLError: unparsable --ros-args
        logger.fatal(f'cannot start: {one_line(exc)}')
        return 2
    node: Node | None = None
    code = 0
    try:
        # Made now rather than lazily by rclpy.spin, so that a Ctrl-C right after the node is
        # ready cannot land inside the executor's constructor.
        executor = SingleThreadedExecutor()
        node = build_node(node_cls)
        # SIGINT and SIGTERM both shut the context down and raise KeyboardInterrupt here.
        rclpy.spin(node, executor)
    except (KeyboardInterrupt, ExternalShutdownException):
        _stopping()
    except Exception as exc:
        if node is not None:
            raise
        if not rclpy.ok():
            # The context was shut down (SIGTERM) while the node was being built and an rclpy
            # call in __init__ failed because of that: a stop, not an error.
            pass
        elif isinstance(exc, START_ERRORS):
            logger.fatal(f'cannot start: {one_line(exc)}')
            code = 2
        else:
            raise
    finally:
        _ignore_signals()
        try:
            if node is not None:
                node.destroy_node()
            # Leave our SIG_IGN in place: restoring the handlers saved at init would let a
            # late Ctrl-C raise before the process is gone.
            rclpy.try_shutdown(uninstall_handlers=False)
        except Exception:  # noqa: BLE001 - report, and still exit promptly
            traceback.print_exc()
            code = code or 1
    return code


def run_node(node_cls: type[Node], args: list[str] | None = None) -> None:
    """Spin ``node_cls`` until Ctrl-C, SIGTERM or external shutdown, then exit the process.

    A configuration that cannot work (unloadable weights, a parameter of the wrong type or out
    of range) stops the process with exit code 2 and one log line instead of a traceback.
    Ctrl-C and SIGTERM exit with 0.
    """
    try:
        code = _run(node_cls, args)
    except KeyboardInterrupt:  # a Ctrl-C between the end of spin and the start of teardown
        _stopping()
        code = 0
    except Exception:  # noqa: BLE001 - a bug: one traceback, then exit as fast as a clean stop
        traceback.print_exc()
        code = 1
    exit_now(code)
