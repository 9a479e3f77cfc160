# SPDX-License-Identifier: Apache-2.0
"""sage_router: the cloud side's Zenoh router, as a Python session in router mode.

No zenohd binary is needed. Parameters come from the sage_router section of
config/sage_ros.yaml; ``--ros-args -p zenoh_listen:=tcp/0.0.0.0:7447`` style overrides work
without a ROS installation too (this process uses no DDS).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

import yaml
import zenoh

from sage_ros.params import config_path, load_params, parse_overrides
from sage_ros.transport.zenoh_link import busy_endpoint, error_text, open_session


def run_router(zenoh_config: Path, *, listen: str = '', stop: threading.Event | None = None) -> None:
    """Run a Zenoh router until ``stop`` is set (or SIGINT/SIGTERM when run as a program)."""
    stop = stop or threading.Event()
    session = open_session(zenoh_config, listen=listen)
    print(f'sage_router: Zenoh router {session.zid()} up ({listen or zenoh_config})', flush=True)
    try:
        stop.wait()
    finally:
        session.close()


def router_params_from_file(path: Path) -> dict:
    """ros__parameters of the sections of a params file that apply to sage_router."""
    doc = yaml.safe_load(path.read_text()) or {}
    out: dict = {}
    for key, section in doc.items():
        if key.strip('/').split('/')[-1] in ('sage_router', '**') and isinstance(section, dict):
            out.update(section.get('ros__parameters', {}))
    return out


def _ros_args_overrides(ros_args: list[str]) -> dict:
    """Parameter overrides from the ``--ros-args`` we understand: ``--params-file F``, ``-p N:=V``."""
    overrides: dict = {}
    items = []
    for i, a in enumerate(ros_args):
        if a in ('--params-file', '-p', '--param'):
            if i + 1 == len(ros_args):
                raise ValueError(f'{a} needs a value' + (' (NAME:=VALUE)' if a != '--params-file' else ''))
            if a == '--params-file':
                # `ros2 launch` hands parameters over as a params file; keep the sage_router entries.
                overrides.update(router_params_from_file(Path(ros_args[i + 1])))
            else:
                items.append(ros_args[i + 1])
    overrides.update(parse_overrides(items))
    return overrides


def _listen_failure(exc: zenoh.ZError, listen: str, config: Path) -> str:
    """One line saying why the router cannot start, and what to change when the port is taken."""
    endpoint = busy_endpoint(exc)
    if endpoint is None:
        return f'sage_router: cannot start the Zenoh router ({listen or config}): {error_text(exc)}'
    return (f'sage_router: cannot listen on {endpoint}: address in use; another router running? '
            f'choose another with -p zenoh_listen:=tcp/0.0.0.0:PORT')


def main(argv: list[str] | None = None) -> int:
    """Run the router; exit code 2 and one line on stderr when it cannot start."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = argv[argv.index('--ros-args') + 1:] if '--ros-args' in argv else []
    parser = argparse.ArgumentParser(prog='sage_router', description=__doc__)
    parser.add_argument('--config', type=Path, default=None, help='directory holding sage_ros.yaml')
    args = parser.parse_args(argv[: argv.index('--ros-args')] if '--ros-args' in argv else argv)
    try:
        params = load_params('sage_router', directory=args.config, overrides=_ros_args_overrides(ros_args))
        zenoh_config = config_path(params['zenoh_config'], args.config)
    except (ValueError, KeyError, TypeError, OSError, yaml.YAMLError) as exc:
        why = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f'sage_router: cannot start: {why}', file=sys.stderr, flush=True)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_router(zenoh_config, listen=params['zenoh_listen'], stop=stop)
    except zenoh.ZError as exc:
        print(_listen_failure(exc, params['zenoh_listen'], zenoh_config), file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
