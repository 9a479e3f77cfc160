# SPDX-License-Identifier: Apache-2.0
"""Clean lifecycle: a node that cannot start says why in one line (exit 2), Ctrl-C and SIGTERM
end everything with exit 0 and no traceback, and `sage-ros up` leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from sage_ros.commands.bringup import Bringup, Proc, plan
from sage_ros.params import read_params_file
from sage_ros.commands.system_demo import free_port
from conftest import STOP_GRACE_S

# A node without torch, so the runner's behaviour is tested in a second or two: it builds
# slowly, can be told to fail after Node.__init__, and its destroy_node needs what __init__
# sets last (as EdgeNode's and CloudNode's do).
FAKE_NODE = '''
import sys, time
from rclpy.node import Node
from std_msgs.msg import String
from sage_ros.nodes.runner import run_node

class Fake(Node):
    def __init__(self):
        super().__init__('fake')
        print('building', flush=True)
        time.sleep(float(sys.argv[2]))
        self._pub = self.create_publisher(String, 'fake', 1)
        if sys.argv[1] == 'fail':
            raise ValueError('parameter x must be positive')
        self._ready = True
        print('ready:', flush=True)

    def destroy_node(self):
        assert self._ready
        super().destroy_node()

run_node(Fake)
'''


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _run(argv: list[str], timeout: float = 60, env: dict | None = None) -> tuple[int, str]:
    """Exit code and output; ``timeout`` is a hang guard."""
    r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout, env=env)
    return r.returncode, r.stdout


def _port_free(port: int) -> bool:
    """Whether a new router could listen on ``port`` (connections of the old one in TIME_WAIT
    do not count: Zenoh, like most servers, sets SO_REUSEADDR)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(('127.0.0.1', port))
            s.listen()
        except OSError:
            return False
    return True


def _no_process_with(text: str) -> bool:
    return subprocess.run(['pgrep', '-f', text], capture_output=True).returncode == 1


@pytest.fixture
def fake_node(tmp_path: Path) -> Path:
    path = tmp_path / 'fake_node.py'
    path.write_text(FAKE_NODE)
    return path


def test_a_node_failing_after_node_init_exits_2_with_one_line(ros_env, fake_node):
    """rclpy's context destroys the nodes it tracks at shutdown; the half-built one must not
    go through its subclass's destroy_node (that was a second traceback)."""
    code, out = _run([sys.executable, str(fake_node), 'fail', '0'])
    assert code == 2, out
    assert 'Traceback' not in out
    assert len(_lines(out)) == 2 and 'cannot start: parameter x must be positive' in _lines(out)[1], out


@pytest.mark.parametrize('sig', [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize('when', ['building', 'ready:'])
def test_sigint_and_sigterm_exit_0_quickly_while_building_or_spinning(ros_env, fake_node, sig, when):
    # A build of an hour: a node that exits at all was interrupted, not waited for.
    build_s = '3600' if when == 'building' else '0'
    proc = subprocess.Popen([sys.executable, str(fake_node), 'ok', build_s], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out = []
        for line in proc.stdout:
            out.append(line)
            if line.startswith(when):
                break
        time.sleep(0.3)  # into the build's sleep, or into spin
        os.killpg(proc.pid, sig)
        # Ended by itself within the grace a supervisor gives before SIGKILL.
        assert proc.wait(timeout=STOP_GRACE_S) == 0, ''.join(out)
        out.append(proc.stdout.read())
        assert 'Traceback' not in ''.join(out)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_edge_node_with_an_int_for_a_double_exits_2_with_one_line(ros_env):
    code, out = _run([sys.executable, '-m', 'sage_ros.nodes.edge_node', '--ros-args', '-p', 'eta:=20'])
    assert code == 2, out
    assert 'Traceback' not in out
    assert len(_lines(out)) == 1 and 'cannot start' in out and "'eta'" in out and 'DOUBLE' in out, out


def test_router_on_a_busy_port_says_so_in_one_line(ros_env):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        endpoint = f'tcp/127.0.0.1:{busy.getsockname()[1]}'
        code, out = _run([sys.executable, '-m', 'sage_ros.nodes.router_node', '--ros-args',
                         '-p', f'zenoh_listen:={endpoint}'])
    assert code == 2
    assert len(_lines(out)) == 1, out
    assert out.strip().endswith(f'cannot start: cannot listen on {endpoint}: address in use; another router '
                                'running? choose another with zenoh_listen (e.g. -p zenoh_listen:=tcp/0.0.0.0:PORT)')


@pytest.mark.parametrize('args', [['-p'], ['--params-file'], ['-p', 'zenoh_listen:=5'], ['-p', 'zenoh_listen']])
def test_router_rejects_bad_ros_args_in_one_line(ros_env, args):
    # The router is a ROS node: rcl parses its arguments, the runner reports in one line.
    code, out = _run([sys.executable, '-m', 'sage_ros.nodes.router_node', '--ros-args', *args])
    assert code == 2, out
    # rcl itself logs 'Failed to parse global arguments' first for arguments it cannot parse.
    lines = [line for line in _lines(out) if '[rcl]: Failed to parse global arguments' not in line]
    assert len(lines) == 1 and 'cannot start: ' in lines[0] and 'Traceback' not in out, out


def test_up_passes_an_int_for_a_double_parameter_as_a_double():
    edge = plan('edge', overrides={'eta': 20, 'budget': 16})[0]
    params = read_params_file(Path(edge.argv[edge.argv.index('--params-file') + 1]), 'sage_edge')
    assert params['eta'] == 20.0 and isinstance(params['eta'], float) and params['budget'] == 16


def test_stop_ends_the_whole_process_group():
    """A child's own children go too, even one that ignores SIGTERM."""
    stubborn = 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'
    parent = textwrap.dedent(f'''
        import subprocess, sys, time
        subprocess.Popen([sys.executable, '-c', {stubborn!r}])
        time.sleep(60)
    ''')
    bring = Bringup([Proc('edge', [sys.executable, '-c', parent])], log=None)
    bring.start()
    leader = bring.procs[0].popen
    try:
        end = time.monotonic() + 10
        children: list[str] = []
        while not children and time.monotonic() < end:
            children = subprocess.run(['pgrep', '-P', str(leader.pid)], capture_output=True, text=True).stdout.split()
            time.sleep(0.05)
        assert children
        # A grace of an hour: stop returns once the leader has ended (by the SIGTERM), without
        # waiting out the grace for the child that ignores it, which goes with the group.
        stopper = threading.Thread(target=bring.stop, kwargs={'timeout': 3600}, daemon=True)
        stopper.start()
        stopper.join(60)  # a hang guard
        assert not stopper.is_alive(), 'stop waited for a process that ignores SIGTERM'
        assert leader.returncode == -signal.SIGTERM
        # The stubborn child: gone, or a zombie waiting for init to reap it.
        end = time.monotonic() + 10  # a hang guard: init reaps in its own time

        def alive(pid: str) -> bool:
            stat = Path(f'/proc/{pid}/stat')
            return stat.exists() and stat.read_text().rsplit(')', 1)[1].split()[0] != 'Z'

        while any(alive(pid) for pid in children) and time.monotonic() < end:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in children), children
    finally:
        try:
            os.killpg(leader.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _up(*args: str, endpoint: str) -> list[str]:
    return [sys.executable, '-m', 'sage_ros.cli', 'up', '--weights', 'random',
            '-p', f'zenoh_listen:={endpoint}', '-p', f'zenoh_connect:={endpoint}', *args]


def _up_env(endpoint: str) -> tuple[dict, str]:
    """Environment of one `sage-ros up`, and a text in the command line of every process it
    starts: its parameter file lives under this TMPDIR."""
    mark = f'sage_up_{endpoint.rpartition(":")[2]}_{os.getpid()}'
    tmp = Path(tempfile.gettempdir()) / mark
    tmp.mkdir(exist_ok=True)
    return dict(os.environ, TMPDIR=str(tmp)), mark


def test_up_stops_everything_when_the_cloud_cannot_load_its_weights(ros_env):
    port = free_port()
    endpoint = f'tcp/127.0.0.1:{port}'
    env, mark = _up_env(endpoint)
    # up ends by itself when the cloud cannot start (the 120 s of _run are only a hang guard).
    code, out = _run(_up('--side', 'cloud', '-p', 'sage_cloud.weights:=/nonexistent.pth', endpoint=endpoint),
                     timeout=120, env=env)
    assert code == 2, out
    assert 'Traceback' not in out
    last = _lines(out)[-1]
    assert last.startswith('sage-ros up: sage_cloud exited with code 2 before it was ready: cannot start: ')
    assert '/nonexistent.pth' in last
    assert _port_free(port) and _no_process_with(mark), 'the router outlived sage-ros up'


def test_up_reports_a_busy_router_port_in_one_line(ros_env):
    with socket.socket() as busy:
        busy.bind(('127.0.0.1', 0))
        busy.listen()
        endpoint = f'tcp/127.0.0.1:{busy.getsockname()[1]}'
        env, mark = _up_env(endpoint)
        code, out = _run(_up('--side', 'cloud', endpoint=endpoint), timeout=120, env=env)
    assert code == 2, out
    assert 'Traceback' not in out
    assert _lines(out)[-1] == (f'sage-ros up: sage_router exited with code 2 before it was ready: cannot start: '
                               f'cannot listen on '
                               f'{endpoint}: address in use; another router running? choose another with '
                               'zenoh_listen (e.g. -p zenoh_listen:=tcp/0.0.0.0:PORT)')
    assert _no_process_with(mark)


def test_ctrl_c_to_the_process_group_of_up_ends_everything_cleanly(ros_env):
    """`sage-ros up` runs router, cloud and edge until Ctrl-C, then leaves nothing behind."""
    port = free_port()
    endpoint = f'tcp/127.0.0.1:{port}'
    env, mark = _up_env(endpoint)
    proc = subprocess.Popen(_up(endpoint=endpoint), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env=env)
    out = []
    try:
        for line in proc.stdout:
            out.append(line)
            if 'running; Ctrl-C stops' in line:
                break
        assert proc.poll() is None, ''.join(out)
        children = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 3, children  # router, cloud, edge
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        # up stops its nodes with SIGTERM, SIGKILL after STOP_GRACE_S: it ends within that
        # grace, plus its own exit.
        assert proc.wait(timeout=STOP_GRACE_S + 5) == 0, ''.join(out)
        out.append(proc.stdout.read())
        assert 'Traceback' not in ''.join(out)
        assert _port_free(port) and _no_process_with(mark)
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
