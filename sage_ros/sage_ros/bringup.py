# SPDX-License-Identifier: Apache-2.0
"""``sage-ros up``: the system as separate processes, from the same config/ as the launch file.

For machines without a ROS distribution (no ``ros2 launch``). Starts the router, the cloud
node and the edge node (or one side), relays their logs with a prefix, and tears everything
down on Ctrl-C / SIGTERM or when one of them dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import yaml

from sage_ros.params import CONFIG_FILE, config_dir, load_params

SIDES = ('edge', 'cloud', 'both')
_MODULES = {
    'router': 'sage_ros.transport.router',
    'cloud': 'sage_ros.nodes.cloud_node',
    'edge': 'sage_ros.nodes.edge_node',
}
_NODE_NAMES = {'router': 'sage_router', 'cloud': 'sage_cloud', 'edge': 'sage_edge'}
# A process is ready when it logs this.
_READY = {'router': 'Zenoh router', 'cloud': 'ready:', 'edge': 'ready:'}


FASTDDS_PROFILE = 'fastdds_large_frames.xml'


def dds_defaults(directory: Path | None = None) -> dict[str, str]:
    """Environment our processes get unless the user set it: the large-frames Fast DDS profile."""
    return {'FASTDDS_DEFAULT_PROFILES_FILE': str((directory or config_dir()) / FASTDDS_PROFILE)}


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    lines: list[str] = field(default_factory=list)


def _ros_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()


def plan(
    side: str = 'both',
    *,
    namespace: str = '',
    directory: Path | None = None,
    overrides: dict[str, Any] | None = None,
    python: str = sys.executable,
) -> list[Proc]:
    """The processes of one side (router and cloud for 'cloud', edge for 'edge')."""
    if side not in SIDES:
        raise ValueError(f'side must be one of {SIDES}, got {side!r}')
    directory = directory or config_dir()
    overrides = overrides or {}
    names = {'edge': ['edge'], 'cloud': ['router', 'cloud'], 'both': ['router', 'cloud', 'edge']}[side]
    procs = []
    for name in names:
        node = _NODE_NAMES[name]
        known = load_params(node, directory=directory)
        args = ['--ros-args']
        if name == 'edge' and namespace:
            args += ['-r', f'__ns:=/{namespace.strip("/")}']
        if name != 'router':
            args += ['--params-file', str(directory / CONFIG_FILE)]
        # Node-qualified overrides last: the last -p of a name wins, and the specific one must.
        for key, value in sorted(overrides.items(), key=lambda kv: '.' in kv[0]):
            target, _, pname = key.rpartition('.')
            if (target in ('', node)) and pname in known:
                args += ['-p', f'{pname}:={_ros_value(value)}']
        pre = ['--config', str(directory)] if name == 'router' else []
        procs.append(Proc(name, [python, '-m', _MODULES[name], *pre, *args]))
    return procs


class Bringup:
    """Start, watch and stop a list of processes."""

    def __init__(self, procs: list[Proc], *, env: dict[str, str] | None = None,
                 log: TextIO | None = sys.stderr, directory: Path | None = None) -> None:
        self.procs = procs
        self._env = {**dds_defaults(directory), **os.environ, **(env or {})}
        if directory is not None:
            self._env['SAGE_ROS_CONFIG_DIR'] = str(directory)
        self._env.setdefault('PYTHONUNBUFFERED', '1')
        self._env.setdefault('RCUTILS_COLORIZED_OUTPUT', '0')
        self._log = log
        self._log_lock = threading.Lock()

    def start(self, names: list[str] | None = None) -> None:
        for p in self.procs:
            if names is None or p.name in names:
                self._start(p)

    def _start(self, p: Proc) -> None:
        p.ready.clear()
        p.popen = subprocess.Popen(p.argv, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, bufsize=1, start_new_session=True)
        threading.Thread(target=self._relay, args=(p, p.popen), daemon=True).start()

    def _relay(self, p: Proc, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            line = line.rstrip('\n')
            p.lines.append(line)
            if _READY[p.name] in line:
                p.ready.set()
            if self._log is not None:
                with self._log_lock:
                    print(f'[{p.name}] {line}', file=self._log, flush=True)

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Block until every started process said it is ready; raise if one died or time ran out."""
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p.popen is None:
                continue
            while not p.ready.wait(0.1):
                if p.popen.poll() is not None:
                    tail = '\n'.join(p.lines[-15:])
                    raise RuntimeError(f'{p.name} exited with {p.popen.returncode} before it was ready:\n{tail}')
                if time.monotonic() > deadline:
                    raise TimeoutError(f'{p.name} not ready after {timeout:.0f} s')

    def dead(self) -> list[Proc]:
        return [p for p in self.procs if p.popen is not None and p.popen.poll() is not None]

    def stop(self, names: list[str] | None = None, *, timeout: float = 5.0) -> None:
        """SIGINT, then SIGKILL after ``timeout``; edge first so it stops sending."""
        targets = [p for p in reversed(self.procs) if p.popen is not None and (names is None or p.name in names)]
        for p in targets:
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGINT)
        end = time.monotonic() + timeout
        for p in targets:
            try:
                p.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()

    def __enter__(self) -> Bringup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_up(procs: list[Proc], *, directory: Path | None = None,
           on_ready: Callable[[], None] | None = None) -> int:
    """Run until SIGINT/SIGTERM or until a process dies; returns an exit code."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    bring = Bringup(procs, directory=directory)
    bring.start()
    code = 0
    try:
        bring.wait_ready()
        print(f'sage-ros up: {", ".join(p.name for p in procs)} running; Ctrl-C stops', file=sys.stderr, flush=True)
        if on_ready:
            on_ready()
        while not stop.wait(0.5):
            dead = bring.dead()
            if dead:
                print(f'sage-ros up: {dead[0].name} exited with {dead[0].popen.returncode}; stopping',
                      file=sys.stderr, flush=True)
                code = 1
                break
    except (RuntimeError, TimeoutError) as exc:
        print(f'sage-ros up: {exc}', file=sys.stderr, flush=True)
        code = 1
    finally:
        bring.stop()
    return code
