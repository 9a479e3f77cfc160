# SPDX-License-Identifier: Apache-2.0
"""An outsider's bad parameter files given to `sage-ros up --params-file` (issue 21, item 8): a
clean one-line refusal before any node starts, through the one route of parameters that the
launch plan takes too; a warning for what would set nothing; and where only the node can tell
(a torch device, a checkpoint, a Zenoh config or endpoint), one line naming it, before any
model loads."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import sage_ros.commands.bringup
from sage_ros.commands.bringup import Bringup, plan
from sage_ros.cli import main
from sage_ros.ros.live_client import LiveClient
from sage_ros.nodes.launch_plan import LaunchArgumentError, launch_nodes
from sage_ros.params import read_params_file
from sage_ros.commands.system_demo import free_port
from test_security import _until


def _edge(params: str) -> str:
    return '/**/sage_edge:\n  ros__parameters:\n' + textwrap.indent(textwrap.dedent(params), '    ')


REFUSED = {
    'bad topic': (_edge("image_topic: 'bad topic name!'"),
                  "sage_edge.image_topic: 'bad topic name!' is not a valid ROS topic name (topic name must not "
                  'contain characters other than'),
    'empty result topic': (_edge("result_topic: ''"),
                           "sage_edge.result_topic: '' is not a valid ROS topic name (topic name must not be empty"),
    'repeated slash': (_edge("budget_topic: '/sage//budget'"), 'sage_edge.budget_topic'),
    'yaml syntax': (_edge('eta: [1.0, 2.0\n'), 'is not valid YAML: expected \',\' or \']\''),
    'top-level list': ('- eta: 2.0\n- budget: 3\n', 'holds a list; a parameter file maps node keys'),
    'value outside ros__parameters': ('eta: 2.0\n', "'eta' is not under a node key's ros__parameters"),
    'ros__parameters not a mapping': ('/**/sage_edge:\n  ros__parameters: [eta, 2.0]\n',
                                      "ros__parameters of '/**/sage_edge' must map names to values"),
}


@pytest.fixture
def no_node_starts(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError('a node was started before the error')

    monkeypatch.setattr(sage_ros.commands.bringup, 'run_up', started)


def _one_line(capsys, kind: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert err.startswith(f'sage-ros up: {kind}: '), err
    return err


@pytest.mark.parametrize('case', sorted(REFUSED))
def test_a_bad_params_file_is_one_line_before_any_node_starts(case, tmp_path, no_node_starts, capsys):
    text, cause = REFUSED[case]
    f = tmp_path / 'params.yaml'
    f.write_text(text)
    assert main(['up', '--side', 'edge', '--params-file', str(f)]) == 2
    assert cause in _one_line(capsys, 'error')
    # The launch plan takes the same route (`ros2 launch sage_ros edge_cloud.launch.py params_file:=...`).
    with pytest.raises(LaunchArgumentError, match='params_file') as refused:
        launch_nodes({'side': 'edge', 'params_file': str(f)})
    assert cause in str(refused.value) and '\n' not in str(refused.value)


def test_a_directory_or_a_missing_params_file_is_one_line(tmp_path, no_node_starts, capsys):
    assert main(['up', '--side', 'edge', '--params-file', str(tmp_path)]) == 2
    assert f'params file {tmp_path} is a directory' in _one_line(capsys, 'error')
    assert main(['up', '--side', 'edge', '--params-file', str(tmp_path / 'nope.yaml')]) == 2
    assert f'params file {tmp_path / "nope.yaml"} not found' in _one_line(capsys, 'error')
    # `ros2 launch ... params_file:=<dir>` says the same, not "no such file".
    with pytest.raises(LaunchArgumentError, match=f'params file {tmp_path} is a directory, not a YAML'):
        launch_nodes({'side': 'edge', 'params_file': str(tmp_path)})
    with pytest.raises(LaunchArgumentError, match='nope.yaml: no such file'):
        launch_nodes({'side': 'edge', 'params_file': str(tmp_path / 'nope.yaml')})


@pytest.fixture
def planned(monkeypatch):
    """The processes `sage-ros up` would start (started: none)."""
    procs: list = []

    def run_up(p, **kwargs):
        procs.extend(p)
        return 0

    monkeypatch.setattr(sage_ros.commands.bringup, 'run_up', run_up)
    return procs


def _given(procs, node: str = 'sage_edge') -> dict:
    """The parameters the node would be started with."""
    argv = procs[-1].argv
    return read_params_file(Path(argv[argv.index('--params-file') + 1]), node, namespace='robot1')


def test_a_node_key_no_node_matches_is_a_warning_naming_it(tmp_path, planned, capsys):
    f = tmp_path / 'typo.yaml'
    f.write_text('/**/sage_edg:\n  ros__parameters:\n    eta: 2.0\n/**/sage_cloud:\n  ros__parameters:\n'
                 '    topk: 3\n')
    assert main(['up', '--side', 'edge', '--namespace', 'robot1', '--params-file', str(f)]) == 0
    line = _one_line(capsys, 'warning')
    assert "node key '/**/sage_edg' matches no sage_ros node" in line and "did you mean '/**/sage_edge'?" in line
    # The typo set nothing, as the warning says; a node this side does not start (sage_cloud on
    # the robot) is no typo: the one line is the typo's.
    assert _given(planned)['eta'] == 1.0


def test_an_empty_params_file_is_a_warning(tmp_path, planned, capsys):
    f = tmp_path / 'empty.yaml'
    f.write_text('# nothing yet\n')
    assert main(['up', '--side', 'edge', '--namespace', 'robot1', '--params-file', str(f)]) == 0
    assert f'params file {f} is empty: it changes no parameter' in _one_line(capsys, 'warning')
    assert _given(planned)['eta'] == 1.0


def test_valid_topic_names_pass_and_empty_turns_an_optional_topic_off(tmp_path, planned, capsys):
    f = tmp_path / 'ok.yaml'
    f.write_text(_edge("image_topic: ''\ncompressed_image_topic: ~/image/compressed\n"
                       "result_topic: /fleet/{node}/result\n"))
    assert main(['up', '--side', 'edge', '--namespace', 'robot1', '--params-file', str(f)]) == 0
    assert capsys.readouterr().err == ''
    assert _given(planned)['result_topic'] == '/fleet/{node}/result'


def _up_edge(params_file: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'sage_ros.cli', 'up', '--side', 'edge', '--params-file',
                           str(params_file), *args], capture_output=True, text=True, timeout=170)


@pytest.mark.parametrize('params, args, cause', [
    ('device: quantum', ['--weights', 'random'], "sage_edge device: 'quantum' is not a torch device"),
    ('weights: /etc/passwd', [], "sage_edge weights: '/etc/passwd' is not a checkpoint"),
    ('zenoh_config: /nonexistent/zenoh_robot1.json5', ['--weights', 'random'],
     "Zenoh config '/nonexistent/zenoh_robot1.json5' not found"),
], ids=['device', 'weights', 'zenoh_config'])
def test_what_only_the_node_can_check_is_its_one_line_before_the_model_loads(params, args, cause, tmp_path,
                                                                             ros_env):
    f = tmp_path / 'params.yaml'
    f.write_text(_edge(params))
    out = _up_edge(f, *args)
    assert out.returncode == 2, out.stderr
    assert 'Traceback' not in out.stderr and 'RANDOM weights' not in out.stderr  # no model was loaded
    fatal = [ln for ln in out.stderr.splitlines() if '[FATAL]' in ln]
    assert len(fatal) == 1 and cause in fatal[0], out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('sage-ros up: sage_edge exited with code 2 before it was ready: cannot start: ') and \
        cause in last, last


def test_a_cloud_whose_endpoint_cannot_resolve_is_refused_before_its_model_loads(ros_env, tmp_path):
    """The cloud's own zenoh.open would wait for a host that resolves to nothing for ever, and
    `up` would wait for a ready line that never comes: refused in one line, exit 2, at once."""
    f = tmp_path / 'params.yaml'
    f.write_text(f'/**/sage_router:\n  ros__parameters:\n    zenoh_listen: tcp/127.0.0.1:{free_port()}\n')
    out = subprocess.run([sys.executable, '-m', 'sage_ros.cli', 'up', '--side', 'cloud', '--params-file', str(f),
                          '--weights', 'random', '-p', 'sage_cloud.zenoh_connect:=tcp/999.999.999.999:7447'],
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 2, out.stderr
    assert 'Traceback' not in out.stderr and 'RANDOM weights' not in out.stderr  # no model was loaded
    cause = "cannot resolve '999.999.999.999' of Zenoh endpoint tcp/999.999.999.999:7447"
    fatal = [ln for ln in out.stderr.splitlines() if '[FATAL]' in ln]
    assert len(fatal) == 1 and cause in fatal[0] and fatal[0].startswith('[cloud]'), out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('sage-ros up: sage_cloud exited with code 2 before it was ready') and cause in last, last


def test_an_endpoint_that_cannot_be_reached_is_said_not_sat_on(ros_env, tmp_path):
    """zenoh_connect:=tcp/999.999.999.999:7447 resolves to nothing: said at once. A router that
    is not there: said once the edge has waited its silence (10 s at a 500 ms deadline)."""
    nobody = f'tcp/127.0.0.1:{free_port()}'
    procs = [*plan('edge', namespace='robot1', overrides={
                 'weights': 'random', 'zenoh_connect': 'tcp/999.999.999.999:7447', 'deadline_ms': 500.0}),
             *plan('edge', namespace='robot2', overrides={
                 'weights': 'random', 'zenoh_connect': nobody, 'deadline_ms': 500.0})]
    log_path = tmp_path / 'edges.log'
    log = log_path.open('w')
    bring = Bringup(procs, log=log)
    client = None

    def said(ns: str, what: str) -> list[str]:
        return [ln for ln in log_path.read_text().splitlines() if f'[{ns}.sage_edge]' in ln and what in ln]

    try:
        bring.start()
        bring.wait_ready(timeout=240)  # a hang guard
        _until(lambda: said('robot1', 'cannot resolve'), 'the unresolvable endpoint said', guard_s=60.0)
        line, = said('robot1', 'cannot resolve')
        assert "[WARN]" in line and "cannot resolve '999.999.999.999' of Zenoh endpoint tcp/999.999.999.999:7447" \
            in line
        _until(lambda: said('robot2', 'no Zenoh router reached'), 'the missing router said', guard_s=120.0)
        line, = said('robot2', 'no Zenoh router reached')
        assert nobody in line and '[WARN]' in line
        client = LiveClient(image_topic='/robot1/camera/image_raw', result_topic='/robot1/sage/result',
                            name='endpoint_client')
        status = client.diagnostics('/robot1/sage_edge: link', timeout=10.0) or {}
        assert status.get('uplink') == 'connecting' and 'cannot resolve' in status.get('problem', ''), status
        assert not said('robot1', 'no Zenoh router reached')  # the one cause, said once
    finally:
        if client is not None:
            client.destroy_node()
        bring.stop()
        log.close()
