# SPDX-License-Identifier: Apache-2.0
"""The launch file and `sage-ros up` start the same nodes from the same YAML."""

import ast
import sys
from pathlib import Path

import pytest

from sage_ros.bringup import plan
from sage_ros.params import config_dir
from sage_ros.transport.router import router_params_from_file

LAUNCH = Path(__file__).resolve().parents[1] / 'launch' / 'edge_cloud.launch.py'


def test_launch_file_is_valid_python_and_declares_the_usual_arguments():
    # launch/launch_ros are not installable here: check what can be checked without them.
    tree = ast.parse(LAUNCH.read_text())
    args = next(n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == 'ARGS')
    names = {k.value for k in args.value.keys}
    assert {'side', 'namespace', 'camera_topic', 'budget', 'method', 'eta', 'weights'} <= names
    text = LAUNCH.read_text()
    for exe in ('sage_edge', 'sage_cloud', 'sage_router'):
        assert f"executable='{exe}'" in text
    assert 'sage_ros.yaml' in text


def test_up_plans_processes_per_side_with_overrides_routed_to_the_right_node():
    procs = plan('both', namespace='robot1', overrides={'budget': 48, 'sage_cloud.weights': '/w/base.pth',
                                                         'weights': 'random',
                                                         'zenoh_listen': 'tcp/127.0.0.1:9'})
    by = {p.name: p.argv for p in procs}
    assert list(by) == ['router', 'cloud', 'edge']
    assert by['edge'][:3] == [sys.executable, '-m', 'sage_ros.nodes.edge_node']
    edge, cloud, router = ' '.join(by['edge']), ' '.join(by['cloud']), ' '.join(by['router'])
    assert '-r __ns:=/robot1' in edge and '-p budget:=48' in edge and '-p weights:=random' in edge
    assert f'--params-file {config_dir() / "sage_ros.yaml"}' in edge
    assert 'budget' not in cloud and '-p weights:=/w/base.pth' in cloud and '-p weights:=random' in cloud
    assert cloud.index('weights:=random') < cloud.index('weights:=/w/base.pth')  # the specific one wins
    assert '-p zenoh_listen:=tcp/127.0.0.1:9' in router and 'zenoh_listen' not in edge
    assert [p.name for p in plan('edge')] == ['edge']
    assert [p.name for p in plan('cloud')] == ['router', 'cloud']
    with pytest.raises(ValueError):
        plan('moon')


def test_router_reads_a_launch_params_file(tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text('/sage_router:\n  ros__parameters:\n    zenoh_listen: tcp/0.0.0.0:7447\n'
                 '/other:\n  ros__parameters:\n    x: 1\n')
    assert router_params_from_file(f) == {'zenoh_listen': 'tcp/0.0.0.0:7447'}


def test_up_runs_until_sigint_and_leaves_no_process_behind(ros_env):
    import os
    import signal
    import subprocess
    import time

    from sage_ros.system_demo import free_port

    endpoint = f'tcp/127.0.0.1:{free_port()}'
    proc = subprocess.Popen([sys.executable, '-m', 'sage_ros.cli', 'up', '--weights', 'random',
                             '-p', f'zenoh_listen:={endpoint}', '-p', f'zenoh_connect:={endpoint}'],
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines = []
    try:
        for line in proc.stderr:
            lines.append(line)
            if 'running; Ctrl-C stops' in line:
                break
        assert proc.poll() is None, ''.join(lines)
        children = subprocess.run(['pgrep', '-P', str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 3  # router, cloud, edge
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - t0 < 10
        for pid in children:
            with pytest.raises(ProcessLookupError):
                os.kill(int(pid), 0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
