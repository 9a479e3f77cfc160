# SPDX-License-Identifier: Apache-2.0
"""``sage-ros up``: the system as separate processes, from the same config/ as the launch file.

For machines without a ROS distribution (no ``ros2 launch``). Starts the router, the cloud
node and the edge node (or one side), relays their logs with a prefix, and tears everything
down on Ctrl-C / SIGTERM or when one of them dies.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

from sage_ros.nodes.launch_plan import NODES, plan_nodes
from sage_ros.params import FASTDDS_PROFILE, config_dir

# A process is ready when it logs this at INFO level (never a FATAL line that names the same
# thing: 'cannot start the Zenoh router ...' is not ready).
_READY = {name: re.compile(r'^\[INFO\] \[[\d.]+\] \[[^\]]*\]: ' + marker) for name, marker in
          (('router', r'Zenoh router \S+ up '), ('cloud', 'ready: '), ('edge', 'ready: '))}


def dds_defaults(directory: Path | None = None) -> dict[str, str]:
    """Environment our processes get unless the user set it: the large-frames Fast DDS profile."""
    return {'FASTDDS_DEFAULT_PROFILES_FILE': str((directory or config_dir()) / FASTDDS_PROFILE)}


def isolate_dds(directory: Path | None = None) -> None:
    """For a run that brings up its own system (demo, benchmarks): a DDS domain of its own
    and local discovery only, unless the user chose them, and the large-frames profile."""
    os.environ.setdefault('ROS_DOMAIN_ID', str(1 + os.getpid() % 100))
    os.environ.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    for key, value in dds_defaults(directory).items():
        os.environ.setdefault(key, value)


@dataclass
class Proc:
    name: str
    argv: list[str]
    popen: subprocess.Popen | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    lines: list[str] = field(default_factory=list)
    relay: threading.Thread | None = None

    @property
    def node(self) -> str:
        """The ROS node name, as users know it ('sage_cloud')."""
        return NODES[self.name][0] if self.name in NODES else self.name


# rcutils' prefix of a log line: '[FATAL] [1795562371.302307116] [EdgeNode]: '.
_LOG_PREFIX = re.compile(r'^\[(?:DEBUG|INFO|WARN|ERROR|FATAL)\] \[[\d.]+\] \[[^\]]*\]: ')
_TROUBLE = re.compile(r'FATAL|ERROR|[Ee]rror|cannot|Traceback')


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f'was killed by {signal.Signals(-code).name}'
        except ValueError:
            return f'was killed by signal {-code}'
    return f'exited with code {code}'


def _why(lines: list[str]) -> str:
    """The line of a process's output that best says why it ended (its last error line)."""
    text = [line.strip() for line in lines if line.strip()]
    for line in reversed(text):
        if _TROUBLE.search(line) and not line.startswith('Traceback'):
            return _LOG_PREFIX.sub('', line)
    return _LOG_PREFIX.sub('', text[-1]) if text else 'no output'


def plan(
    side: str = 'both',
    *,
    namespace: str = '',
    directory: Path | None = None,
    overrides: dict[str, Any] | None = None,
    params_file: Path | None = None,
    camera_topic: str = '',
    python: str = sys.executable,
) -> list[Proc]:
    """The processes of one side: :func:`sage_ros.nodes.launch_plan.plan_nodes`, each node run with
    ``python -m`` and the ``--ros-args`` the launch file's ``Node`` actions get."""
    return [Proc(n.key, [python, '-m', n.module, *n.ros_args()])
            for n in plan_nodes(side, namespace=namespace, directory=directory or config_dir(), overrides=overrides,
                                params_file=params_file, camera_topic=camera_topic)]


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
        # The relay reads readiness and failures from rcutils' lines: their format is ours to fix.
        self._env['RCUTILS_CONSOLE_OUTPUT_FORMAT'] = '[{severity}] [{time}] [{name}]: {message}'
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
        p.relay = threading.Thread(target=self._relay, args=(p, p.popen), daemon=True)
        p.relay.start()

    def _relay(self, p: Proc, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            line = line.rstrip('\n')
            p.lines.append(line)
            if _READY[p.name].search(line):
                p.ready.set()
            self.say(f'[{p.name}] {line}')

    def say(self, text: str) -> None:
        """One whole line on the log: the relays of several processes and the supervisor
        write to it at once, so each line is one write under one lock."""
        if self._log is None:
            return
        with self._log_lock:
            self._log.write(text + '\n')
            self._log.flush()

    def failure(self, p: Proc) -> str:
        """One line: how ``p`` ended and why, from its last error line (e.g. 'sage_cloud exited
        with code 2 before it was ready: cannot start: checkpoint file ... not found')."""
        assert p.popen is not None and p.popen.returncode is not None
        if p.relay is not None:
            p.relay.join(2.0)  # its last lines may still be in the pipe
        when = '' if p.ready.is_set() else ' before it was ready'
        return f'{p.node} {_exit_text(p.popen.returncode)}{when}: {_why(p.lines).removeprefix(p.node + ": ")}'

    def wait_ready(self, timeout: float = 180.0, *, stop: threading.Event | None = None) -> bool:
        """Block until every started process said it is ready (True), or ``stop`` is set (False).

        Raises RuntimeError (one line: which process ended and why) when one dies first, and
        TimeoutError when time runs out.
        """
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p.popen is None:
                continue
            while not p.ready.wait(0.1):
                if stop is not None and stop.is_set():
                    return False
                # Any of them, not only p, ready or not: the edge may fail while the cloud
                # still loads, and the router may stop after its start.
                for q in self.dead():
                    raise RuntimeError(self.failure(q))
                if time.monotonic() > deadline:
                    raise TimeoutError(f'{p.node} not ready after {timeout:.0f} s')
        return True

    def dead(self) -> list[Proc]:
        return [p for p in self.procs if p.popen is not None and p.popen.poll() is not None]

    def stop(self, names: list[str] | None = None, *, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; edge first so it stops sending.

        SIGTERM, not SIGINT: a node still importing would print a KeyboardInterrupt traceback,
        while SIGTERM ends it silently; once running, a node treats both alike. Signals go to
        each process's group (each was started in a session of its own), so anything a node
        started goes with it.
        """
        targets = [p for p in reversed(self.procs) if p.popen is not None and (names is None or p.name in names)]
        for p in targets:
            if p.popen.poll() is None:
                _signal_group(p.popen, signal.SIGTERM)
        end = time.monotonic() + timeout
        for p in targets:
            try:
                p.popen.wait(max(0.0, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(p.popen, signal.SIGKILL)
                p.popen.wait()
            # Whatever of its group outlived it (the group id stays reserved while any live).
            _signal_group(p.popen, signal.SIGKILL)

    def __enter__(self) -> Bringup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(popen: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(popen.pid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def run_up(procs: list[Proc], *, directory: Path | None = None,
           on_ready: Callable[[], None] | None = None) -> int:
    """Run until SIGINT/SIGTERM/SIGHUP (exit code 0) or until a process dies: then stop the
    others and return 2 if it could not start for its configuration (its own exit code 2),
    else 1. The reason is one line on stderr."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    bring = Bringup(procs, directory=directory)
    code = 0
    try:
        bring.start()
        if bring.wait_ready(stop=stop):
            bring.say(f'sage-ros up: {", ".join(p.node for p in procs)} running; Ctrl-C stops')
            if on_ready:
                on_ready()
            while not stop.wait(0.5):
                dead = bring.dead()
                if dead:
                    bring.say(f'sage-ros up: {bring.failure(dead[0])}')
                    code = 1
                    break
    except RuntimeError as exc:
        bring.say(f'sage-ros up: {exc}')
        code = 2 if any(p.popen is not None and p.popen.returncode == 2 for p in procs) else 1
    except TimeoutError as exc:
        bring.say(f'sage-ros up: {exc}')
        code = 1
    finally:
        bring.stop()
    return code
