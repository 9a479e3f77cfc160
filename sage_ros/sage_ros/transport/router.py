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

from sage_ros.params import config_path, load_params, parse_overrides
from sage_ros.transport.zenoh_link import open_session


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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ros_args = argv[argv.index('--ros-args') + 1:] if '--ros-args' in argv else []
    parser = argparse.ArgumentParser(prog='sage_router', description=__doc__)
    parser.add_argument('--config', type=Path, default=None, help='directory holding sage_ros.yaml')
    args = parser.parse_args(argv[: argv.index('--ros-args')] if '--ros-args' in argv else argv)
    overrides = {}
    # `ros2 launch` hands parameters over as a params file; keep the sage_router entries.
    for i, a in enumerate(ros_args[:-1]):
        if a == '--params-file':
            overrides.update(router_params_from_file(Path(ros_args[i + 1])))
    overrides.update(parse_overrides(ros_args[i + 1] for i, a in enumerate(ros_args) if a == '-p'))
    params = load_params('sage_router', directory=args.config, overrides=overrides)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    run_router(config_path(params['zenoh_config'], args.config), listen=params['zenoh_listen'], stop=stop)
    return 0


if __name__ == '__main__':
    sys.exit(main())
