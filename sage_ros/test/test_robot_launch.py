# SPDX-License-Identifier: Apache-2.0
"""The robot deployment as far as package registries allow: `colcon build` of both packages
from a clean copy (colcon is on PyPI), and every `ros2 launch` line of the README's robot
section through :func:`sage_ros.nodes.launch_plan.launch_nodes`, the function the launch file is a thin
translation of. ROS 2's `launch`, `launch_ros` and `ros2cli` are on no registry, so `ros2 launch`,
`ros2 param` and `ros2 topic` themselves do not run here (the README says which lines these are).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from doc_commands import bash_commands
from sage_ros.commands.bringup import Bringup, Proc, plan
from sage_ros.nodes.launch_plan import CAMERA, LAUNCH_ARGS, LaunchArgumentError, launch_nodes
from sage_ros.commands.system_demo import free_port

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILE = REPO / 'sage_ros' / 'launch' / 'edge_cloud.launch.py'
LAUNCH = 'ros2 launch sage_ros edge_cloud.launch.py'


def clean_copy(dest: Path) -> Path:
    """The checkout's files as a fresh clone has them (tracked, plus new files not ignored)."""
    files = subprocess.run(['git', 'ls-files', '-z', '-co', '--exclude-standard'], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split('\0')
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_colcon_build_of_a_clean_copy(tmp_path):
    """The README's `colcon build`: both packages, the launch file, config and profile installed."""
    clean_copy(tmp_path / 'src' / 'sage_ros')
    colcon = Path(sys.executable).parent / 'colcon'
    out = subprocess.run([str(colcon), 'build'], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'Summary: 2 packages finished' in out.stdout, out.stdout
    share = tmp_path / 'install' / 'sage_ros' / 'share' / 'sage_ros'  # colcon's default: isolated
    for name in ('launch/edge_cloud.launch.py', 'config/sage_ros.yaml', 'config/fastdds_large_frames.xml'):
        assert (share / name).is_file(), name
    assert (tmp_path / 'install' / 'setup.bash').is_file()
    scripts = tmp_path / 'install' / 'sage_ros' / 'lib' / 'sage_ros'
    assert {'sage_edge', 'sage_cloud', 'sage_router'} <= {p.name for p in scripts.iterdir()}


# --- the launch file: only a translation of launch_nodes ------------------------------------
def test_the_launch_file_only_translates_launch_nodes_into_actions():
    tree = ast.parse(LAUNCH_FILE.read_text())
    functions = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert functions == {'_stop_launch', '_nodes', 'generate_launch_description'}
    imported = {(n.module, a.name) for n in tree.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert {('sage_ros.nodes.launch_plan', 'launch_nodes'), ('sage_ros.nodes.launch_plan', 'LAUNCH_ARGS')} <= imported
    # No parameter logic of its own: no module-level tables besides what it imports.
    assert not [n for n in tree.body if isinstance(n, ast.Assign)]


def test_launch_arguments_and_their_errors():
    for name in ('side', 'namespace', 'params_file', 'camera_topic', 'camera_transport', 'budget', 'budget_mode',
                 'zenoh_config', 'router_zenoh_config', 'zenoh_listen', 'use_sim_time', 'log_level', 'respawn'):
        assert name in LAUNCH_ARGS
    assert 'setting it switches budget_mode to fixed' in LAUNCH_ARGS['budget'][1]
    assert LAUNCH_ARGS['side'][2] == ('edge', 'cloud', 'both')
    cases = {
        (('side', 'foo'),): 'launch argument side:=foo: must be one of edge, cloud, both',
        (('budget', '48.0'),): 'launch argument budget:=48.0: sage_edge.budget must be int, got 48.0',
        (('eta', 'high'),): 'launch argument eta:=high: sage_edge.eta must be float',
        (('params_file', '/no/such.yaml'),): 'launch argument params_file:=/no/such.yaml: no such file',
        (('sidee', 'edge'),): 'unknown launch argument(s): sidee',
    }
    for args, message in cases.items():
        with pytest.raises(LaunchArgumentError, match=re.escape(message)):
            launch_nodes(dict(args))


def test_a_params_file_with_a_typo_names_the_file(tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text('/**/sage_edge:\n  ros__parameters:\n    budgte: 3\n')
    with pytest.raises(LaunchArgumentError, match=f'params_file:={re.escape(str(f))}: .*budgte'):
        launch_nodes({'params_file': str(f)})


def test_sage_ros_up_starts_what_the_launch_file_starts():
    """`sage-ros up` and `ros2 launch` give each node the same --ros-args from one plan."""
    procs = plan('both', namespace='robot1', camera_topic='/camera/color/image_raw',
                 overrides={'weights': 'random'})
    nodes = launch_nodes({'namespace': 'robot1', 'camera_topic': '/camera/color/image_raw', 'weights': 'random'})
    assert [p.name for p in procs] == [n.key for n in nodes] == ['router', 'cloud', 'edge']
    for p, n in zip(procs, nodes):
        assert p.argv[:3] == [sys.executable, '-m', n.module]
        own, theirs = p.argv[3:], n.ros_args()
        # The launch always states the log level (its argument defaults to rcl's own, info).
        j = theirs.index('--log-level')
        assert theirs[j + 1] == 'info'
        del theirs[j:j + 2]
        # The same arguments, each with its own (equal) parameter file.
        i = own.index('--params-file')
        assert yaml.safe_load(Path(own[i + 1]).read_text()) == yaml.safe_load(n.params_file.read_text())
        assert own[:i + 1] + own[i + 2:] == theirs[:i + 1] + theirs[i + 2:]


# --- the README's robot section --------------------------------------------------------------
ROBOT_DOC = REPO / 'docs' / 'robot.md'  # the robot section in full; the README keeps a short one


def readme_robot_section() -> str:
    """The README's short robot section, then docs/robot.md, the whole section it links to."""
    text = (REPO / 'README.md').read_text()
    section = text[text.index('## On a robot with a ROS 2 distribution'):]
    short = section[:section.index('\n## ', 5)]
    assert 'Not run here' not in short  # the list of what is not run here is docs/robot.md's
    return short + '\n' + ROBOT_DOC.read_text()


def readme_robot_commands() -> list[str]:
    """Every command line in the README's robot section and docs/robot.md (continuations joined,
    comments cut; a line in both counts once)."""
    return bash_commands(readme_robot_section())


def launch_args_of(command: str, **substitutions: str) -> dict[str, str]:
    """The arguments of a README `ros2 launch` line, made runnable here (random weights, this
    machine's addresses and files)."""
    for old, new in substitutions.items():
        command = command.replace(old, new)
    words = shlex.split(command.removeprefix(LAUNCH))
    args = dict(w.split(':=', 1) for w in words)
    return {k: 'random' if k.endswith('weights') else v for k, v in args.items()}


def readme_launches() -> list[str]:
    return [c for c in readme_robot_commands() if c.startswith(LAUNCH)]


def test_every_readme_robot_command_is_covered_or_named_as_not_run_here():
    from sage_ros.cli import build_parser

    commands = readme_robot_commands()
    launches = readme_launches()
    assert len(launches) >= 4
    not_run = readme_robot_section().split('Not run here')[1]
    covered = 0
    for c in commands:
        words = c.split()
        if c in launches or 'colcon build' in c:
            covered += 1  # launch_nodes below; colcon build above
        elif words[:3] == ['./dev', 'sage-ros', 'export-edge']:
            args = build_parser().parse_args(words[2:])  # test_onnx_edge.py runs the export itself
            assert args.output.suffix == '.onnx' and args.weights
            covered += 1
        elif words[:3] == ['pip', 'install', '-r']:
            # test_robot_requirements.py resolves and installs this file
            assert (REPO / words[3].removeprefix('sage_ros/')).is_file(), c
            covered += 1
        else:
            # The rest needs a robot; the README names each as not run here.
            tool = ' '.join(words[:3]) if words[:2] == ['python3', '-m'] else words[0]
            assert f'`{tool}' in not_run, f'README command neither run nor named: {c}'
    assert covered >= len(launches) + 3


def test_every_readme_launch_line_plans_its_nodes(tmp_path):
    deploy = tmp_path / 'sage-deploy'
    deploy.mkdir()
    section = readme_robot_section()
    cloud_yaml = re.search(r'where `cloud.yaml` is\n\n```yaml\n(.*?)```', section, re.S).group(1)
    (deploy / 'cloud.yaml').write_text(cloud_yaml.replace('/home/me/sage-deploy', str(deploy)))
    sub = {'$HOME/sage-deploy': str(deploy)}
    seen = set()
    for command in readme_launches():
        args = launch_args_of(command, **sub)
        nodes = {n.key: n for n in launch_nodes(args)}
        doc = yaml.safe_load(next(iter(nodes.values())).params_file.read_text())
        side = args.get('side', 'both')
        assert list(nodes) == {'edge': ['edge'], 'cloud': ['router', 'cloud'], 'both': ['router', 'cloud', 'edge']}[side]
        if 'edge' in nodes:
            edge = nodes['edge']
            assert edge.namespace == args.get('namespace', '')
            params = doc[f'/{edge.namespace}/sage_edge' if edge.namespace else '/sage_edge']['ros__parameters']
            if 'camera_topic' in args:
                assert (CAMERA, args['camera_topic']) in edge.remappings
                assert f'{CAMERA}:={args["camera_topic"]}' in edge.ros_args()
            if args.get('camera_transport') == 'compressed':
                assert params['image_topic'] == '' and params['compressed_image_topic'] == CAMERA + '/compressed'
                seen.add('compressed')
            if 'zenoh_connect' in args:
                assert params['zenoh_connect'] == args['zenoh_connect']
            if 'zenoh_config' in args:
                assert params['zenoh_config'] == args['zenoh_config']
                seen.add('secure robot')
        if 'router' in nodes:
            router = doc['/sage_router']['ros__parameters']
            if 'zenoh_listen' in args:
                assert router['zenoh_listen'] == args['zenoh_listen']
            if 'params_file' in args:  # the README's cloud.yaml moves the router to TLS
                assert router['zenoh_listen'] == 'tls/0.0.0.0:7447'
                assert router['zenoh_config'] == f'{deploy}/zenoh_router.json5'
                assert doc['/sage_cloud']['ros__parameters']['zenoh_config'] == f'{deploy}/zenoh_cloud.json5'
                seen.add('secure cloud')
    assert seen == {'compressed', 'secure robot', 'secure cloud'}


def test_readme_cloud_and_robot_lines_run_as_their_plan_says(ros_env, real_images, tmp_path):
    """The README's cloud and robot `ros2 launch` lines, started as processes with exactly the
    --ros-args that launch_ros gives them: the robot in /robot1 takes frames from the remapped
    camera topic and answers each on /robot1/sage/result; Ctrl-C stops every node with exit 0."""
    from sage_ros.ros.live_client import LiveClient

    cloud_line, robot_line = [c for c in readme_launches() if 'side:=cloud weights' in c or 'camera_topic:=' in c]
    port = str(free_port())
    sub = {'tcp/0.0.0.0': 'tcp/127.0.0.1', 'CLOUD_IP': '127.0.0.1', '7447': port}
    nodes = launch_nodes(launch_args_of(cloud_line, **sub)) + launch_nodes(launch_args_of(robot_line, **sub))
    procs = [Proc(n.key, [sys.executable, '-m', n.module, *n.ros_args()]) for n in nodes]
    with (tmp_path / 'nodes.log').open('w') as log:
        bring = Bringup(procs, log=log)
        client = None
        try:
            bring.start()
            bring.wait_ready(timeout=180)
            client = LiveClient(image_topic='/camera/color/image_raw', result_topic='/robot1/sage/result',
                                name='readme_robot_client')
            assert client.wait_for_edge(timeout=60)
            stamps = []
            for rgb in real_images[:3]:
                stamps.append(client.publish(rgb))
                assert client.wait_result(stamps[-1], 60.0) is not None, (tmp_path / 'nodes.log').read_text()
            client.drain(1.0)  # a second result for a frame would show up now
            assert sorted(client.results) == sorted(stamps) and len(client.all_results) == len(stamps)
            for p in reversed(procs):  # Ctrl-C in each terminal
                os.killpg(p.popen.pid, signal.SIGINT)
            codes = {p.name: p.popen.wait(30) for p in procs}
        finally:
            if client is not None:
                client.destroy_node()
            bring.stop()
    assert codes == {'router': 0, 'cloud': 0, 'edge': 0}, (codes, (tmp_path / 'nodes.log').read_text()[-3000:])
    assert 'Traceback' not in (tmp_path / 'nodes.log').read_text()
