# SPDX-License-Identifier: Apache-2.0
"""The robot deployment with the real ROS 2 tools: `colcon build` of both packages from a clean
copy, `ros2 launch sage_ros edge_cloud.launch.py`, `ros2 param`, `ros2 topic`, `ros2 node`.

The tools come from ../shared/vendor/ros2-python and PyPI (scripts/ros2_tools.sh, run by
./dev). Without them these tests skip, except in CI (CI=true), where that is a failure.
Every command of the README's robot section is one of the templates below and runs here.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sage_ros.system_demo import free_port

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# The README's robot commands, as written there; the tests run them with SUBSTITUTIONS.
BUILD = 'colcon build'
SOURCE = 'source install/setup.bash'
CLOUD = ('ros2 launch sage_ros edge_cloud.launch.py side:=cloud weights:=/ckpt/deit_base.pth '
         'zenoh_listen:=tcp/0.0.0.0:7447 zenoh_connect:=tcp/127.0.0.1:7447')
ROBOT = ('ros2 launch sage_ros edge_cloud.launch.py side:=edge namespace:=robot1 camera_topic:=/camera/color/image_raw '
         'weights:=/ckpt/deit_tiny.pth zenoh_connect:=tcp/CLOUD_IP:7447')
ECHO = 'ros2 topic echo /robot1/sage/result'
SET_BUDGET = 'ros2 param set /robot1/sage_edge budget 48'
SET_AUTO = 'ros2 param set /robot1/sage_edge budget_mode auto'
CERTS = ('./dev sage-ros certs --robots robot1,robot2 --cloud-host cloud.example.org --cloud-host 203.0.113.7 '
         '--out ~/sage-deploy')
SECURE_CLOUD = 'ros2 launch sage_ros edge_cloud.launch.py side:=cloud params_file:=$HOME/sage-deploy/cloud.yaml'
SECURE_ROBOT = ('ros2 launch sage_ros edge_cloud.launch.py side:=edge namespace:=robot1 '
                'zenoh_config:=$HOME/sage-deploy/zenoh_robot1.json5 zenoh_connect:=tls/CLOUD_IP:7447')
PI5_ROBOT = ('ros2 launch sage_ros edge_cloud.launch.py side:=edge namespace:=robot1 camera_transport:=compressed '
             'zenoh_connect:=tcp/CLOUD_IP:7447')
README_COMMANDS = (BUILD, SOURCE, CLOUD, ROBOT, ECHO, SET_BUDGET, SET_AUTO, SECURE_CLOUD, SECURE_ROBOT, PI5_ROBOT)


def tools_or_skip() -> None:
    missing = [t for t in ('ros2', 'colcon') if not (VENV_BIN / t).exists()]
    if missing:
        why = (f'{", ".join(missing)} not installed in {VENV_BIN.parent}: scripts/ros2_tools.sh installs them '
               'from ../shared/vendor/ros2-python')
        if os.environ.get('CI') == 'true':
            pytest.fail(why)
        pytest.skip(why)


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


@pytest.fixture(scope='session')
def ws(tmp_path_factory):
    """A colcon workspace with both packages built from a clean copy: `colcon build`."""
    tools_or_skip()
    root = tmp_path_factory.mktemp('sage_ws')
    clean_copy(root / 'src' / 'sage_ros')
    t0 = time.monotonic()
    out = subprocess.run(['bash', '-c', BUILD], cwd=root, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert 'Summary: 2 packages finished' in out.stdout, out.stdout
    print(f'colcon build of sage_ros_msgs and sage_ros: {time.monotonic() - t0:.1f} s')
    share = root / 'install' / 'sage_ros' / 'share' / 'sage_ros'  # colcon's default: isolated
    assert (share / 'launch' / 'edge_cloud.launch.py').is_file() and (share / 'config' / 'sage_ros.yaml').is_file()
    yield root


_DOMAINS = itertools.count()
_domain = {'id': 0}


@pytest.fixture
def ros_domain(ws, ros_env):
    """A DDS domain of its own for each test, as on a robot: the launch, the `ros2` commands and
    the test's client (in the context this yields) see each other and nothing else.

    Why: Fast DDS with local discovery announces itself to participant ids 0..31 of a domain
    only. A session that has started many processes on one domain can give a new launch's nodes
    ids above 31, which a fresh `ros2 node list` (also above 31) then never discovers."""
    import rclpy

    _domain['id'] = 1 + (os.getpid() + next(_DOMAINS)) % 100  # conftest's session domain: 101..200
    try:
        with rclpy.init(context=rclpy.Context(), domain_id=_domain['id']) as ros:
            yield ros.context
    finally:
        # The README's `ros2 param` / `ros2 topic` commands start the ros2 daemon of this domain.
        subprocess.run(sh(ws, 'ros2 daemon stop'), cwd=ws, env=ros_env_of(ws), capture_output=True, timeout=30)
        _domain['id'] = 0


def sh(ws: Path, command: str) -> list[str]:
    """argv running ``command`` in bash after `source install/setup.bash`, as a user types it."""
    return ['bash', '-c', f'{SOURCE} && exec {command}']


def ros_env_of(tmp: Path) -> dict[str, str]:
    assert _domain['id'], 'a test running ros2 tools takes the ros_domain fixture'
    return dict(os.environ, PYTHONUNBUFFERED='1', RCUTILS_COLORIZED_OUTPUT='0', ROS_LOG_DIR=str(tmp / 'ros_log'),
                ROS_DOMAIN_ID=str(_domain['id']))


def run(ws: Path, command: str, *, timeout: float = 60, retry_on: str = '', until: str = ''
        ) -> subprocess.CompletedProcess:
    """Run a ros2 command to its end; for up to 20 s, again while its output says ``retry_on``
    or lacks ``until`` (discovery: a fresh `ros2` process may not see every node at once)."""
    end = time.monotonic() + 20
    while True:
        out = subprocess.run(sh(ws, command), cwd=ws, env=ros_env_of(ws), capture_output=True, text=True,
                             timeout=timeout)
        text = out.stdout + out.stderr
        again = (retry_on and retry_on in text) or (until and until not in text)
        if not again or time.monotonic() > end:
            return out
        time.sleep(0.5)


class Launch:
    """`ros2 launch ...` in a process group of its own, its output in a file."""

    def __init__(self, ws: Path, command: str, name: str) -> None:
        self.log_path = ws / f'{name}.log'
        self._log = self.log_path.open('w')
        self.proc = subprocess.Popen(sh(ws, command), cwd=ws, env=ros_env_of(ws), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def text(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            m = re.search(pattern, self.text)
            if m:
                return m
            assert self.proc.poll() is None, f'launch ended ({self.proc.returncode}) before {pattern!r}:\n{self.text}'
            time.sleep(0.2)
        raise AssertionError(f'no {pattern!r} after {timeout} s:\n{self.text}')

    def interrupt(self, timeout: float = 20.0) -> int:
        """Ctrl-C in a terminal: SIGINT to the whole process group."""
        os.killpg(self.proc.pid, signal.SIGINT)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()


def substitute(command: str, **values: str) -> str:
    """A README command made runnable here: random weights, this machine, free ports."""
    for old, new in values.items():
        command = command.replace(old, new)
    return re.sub(r'weights:=/ckpt/\S+', 'weights:=random', command)


def one_result_per_frame(images, context, *, topic: str, result_topic: str = '/robot1/sage/result',
                         name: str) -> list:
    from sage_ros.live_client import LiveClient

    client = LiveClient(image_topic=topic, result_topic=result_topic, name=name, context=context)
    try:
        assert client.wait_for_edge(timeout=60), f'no edge subscribed to {topic}'
        stamps = []
        for rgb in images:
            stamps.append(client.publish(rgb))
            client.wait_result(stamps[-1], 30.0)
        client.drain(1.0)  # a second result for a frame would show up now
        assert all(s in client.results for s in stamps), f'{len(client.results)} results for {len(stamps)} frames'
        assert sorted(r.header.stamp.sec * 10**9 + r.header.stamp.nanosec for r in client.all_results) == sorted(stamps)
        return [client.results[s] for s in stamps]
    finally:
        client.destroy_node()


def no_traceback(text: str) -> None:
    assert 'Traceback' not in text, text


# --- the launch file's arguments -----------------------------------------------------------
def test_show_args_and_argument_errors(ws, ros_domain):
    out = run(ws, 'ros2 launch sage_ros edge_cloud.launch.py --show-args')
    assert out.returncode == 0, out.stderr
    for name in ('side', 'namespace', 'params_file', 'camera_topic', 'camera_transport', 'budget', 'budget_mode',
                 'zenoh_config', 'router_zenoh_config', 'zenoh_listen', 'use_sim_time', 'log_level', 'respawn'):
        assert f"'{name}':" in out.stdout, name
    assert 'setting it switches budget_mode to fixed' in out.stdout
    assert "Valid choices are: ['edge', 'cloud', 'both']" in out.stdout
    # The README's profile path for the camera's process.
    prefix = run(ws, 'ros2 pkg prefix sage_ros').stdout.strip()
    assert (Path(prefix) / 'share' / 'sage_ros' / 'config' / 'fastdds_large_frames.xml').is_file()

    bad = run(ws, 'ros2 launch sage_ros edge_cloud.launch.py side:=foo')
    assert bad.returncode != 0
    assert 'Argument "side" provided value "foo" is not valid' in bad.stdout + bad.stderr
    typed = run(ws, 'ros2 launch sage_ros edge_cloud.launch.py budget:=48.0')
    assert typed.returncode != 0
    assert 'launch argument budget:=48.0: sage_edge.budget must be int, got 48.0' in typed.stdout + typed.stderr
    no_traceback(bad.stdout + bad.stderr + typed.stdout + typed.stderr)


# --- both sides, one machine ----------------------------------------------------------------
def test_both_sides_in_a_namespace_with_ros2cli(ws, ros_domain, real_images):
    port = free_port()
    endpoint = f'tcp/127.0.0.1:{port}'
    launch = Launch(ws, f'ros2 launch sage_ros edge_cloud.launch.py namespace:=robot1 weights:=random '
                        f'zenoh_listen:={endpoint} zenoh_connect:={endpoint}', 'both')
    try:
        launch.wait_for(r'\[robot1\.sage_edge\]: ready:')
        launch.wait_for(r'\[sage_cloud\]: ready:')
        # Relative camera topic: /robot1/camera/image_raw; one result per frame on /robot1/sage/result.
        one_result_per_frame(real_images[:6], ros_domain, topic='/robot1/camera/image_raw', name='both_client')

        # Discovery: a fresh `ros2` process may see the nodes one by one; ask until all three.
        want, end = {'/robot1/sage_edge', '/sage_cloud', '/sage_router'}, time.monotonic() + 30
        while True:
            nodes = run(ws, 'ros2 node list --no-daemon --spin-time 2', until='sage_router').stdout.split()
            if want <= set(nodes) or time.monotonic() > end:
                break
        assert want <= set(nodes), nodes
        got = run(ws, 'ros2 param get --no-daemon --spin-time 2 /sage_router zenoh_listen', retry_on='Node not found')
        assert f'String value is: {endpoint}' in got.stdout, got.stdout + got.stderr

        # Budget semantics: setting budget switches budget_mode to fixed; refusals with reasons.
        def param(command: str) -> str:
            out = run(ws, command, retry_on='Node not found')
            return (out.stdout + out.stderr).strip()

        assert param(SET_BUDGET) == 'Set parameter successful'
        assert param('ros2 param get /robot1/sage_edge budget_mode') == 'String value is: fixed'
        assert 'budget_mode is now fixed' in launch.text
        assert 'out of range' in param('ros2 param set /robot1/sage_edge budget 500')
        assert param('ros2 param get /robot1/sage_edge budget') == 'Integer value is: 48'
        assert param(SET_AUTO) == 'Set parameter successful'
        assert param('ros2 param get /robot1/sage_edge budget_mode') == 'String value is: auto'
        assert 'budget_mode must be one of auto, fixed' in param('ros2 param set /robot1/sage_edge budget_mode max')
        assert param('ros2 param set /robot1/sage_edge eta 2.5') == 'Set parameter successful'
        assert 'out of range' in param('ros2 param set /robot1/sage_edge eta -1.0')
        assert param('ros2 param set /robot1/sage_edge method random') == 'Set parameter successful'
        assert 'method must be one of' in param('ros2 param set /robot1/sage_edge method best')
        # Two-round evidence, switched on at run time on the cloud: a random-weight cloud is never
        # sure, so once the link is measured its answers ask for more and frames take two rounds.
        # B 48 leaves room under budget_max (96); in auto mode a fast link takes B to budget_max,
        # and a frame whose first round already holds budget_max patches gets no second.
        assert param(SET_BUDGET) == 'Set parameter successful'
        assert param('ros2 param set /sage_cloud eta_cloud 0.0') == 'Set parameter successful'
        assert 'second_round must be one of' in param('ros2 param set /robot1/sage_edge second_round twice')
        results = one_result_per_frame(real_images[:4], ros_domain, topic='/robot1/camera/image_raw',
                                       name='rounds_client')
        assert any(r.rounds == 2 for r in results), [(r.rounds, r.detail) for r in results]
        assert all(r.patches_sent <= 96 for r in results)  # budget_max, both rounds together

        # ros2 topic echo: the README's command (until its first message) and --once.
        from sage_ros.live_client import LiveClient

        client = LiveClient(image_topic='/robot1/camera/image_raw', result_topic='/robot1/sage/result',
                            name='echo_client', context=ros_domain)
        echo_out = ws / 'echo.txt'
        with echo_out.open('w') as fh:
            echo = subprocess.Popen(sh(ws, ECHO), cwd=ws, env=ros_env_of(ws), stdout=fh, text=True,
                                    start_new_session=True)
        once = subprocess.Popen(sh(ws, 'ros2 topic echo --once /robot1/sage/result'), cwd=ws, env=ros_env_of(ws),
                                stdout=subprocess.PIPE, text=True)
        try:
            end = time.monotonic() + 40
            while (once.poll() is None or 'label_name:' not in echo_out.read_text()) and time.monotonic() < end:
                client.publish(real_images[0])
                client.drain(0.5)
            assert once.wait(5) == 0 and 'label_name:' in once.stdout.read()
            assert 'label_name:' in echo_out.read_text()
        finally:
            client.destroy_node()
            os.killpg(echo.pid, signal.SIGINT)
            echo.wait(10)
            if once.poll() is None:
                once.kill()
        # /diagnostics carries the edge's and the cloud's statuses (each once a second).
        diag = run(ws, "ros2 topic echo --once /diagnostics --filter 'any(\"sage_edge\" in s.name for s in m.status)'",
                   timeout=30)
        assert diag.returncode == 0 and 'robot1/sage_edge' in diag.stdout, diag.stdout + diag.stderr

        # A required node dies (respawn off): the whole launch stops, non-zero, saying which.
        os.kill(_pid_of(launch, 'sage_edge'), signal.SIGKILL)
        assert launch.proc.wait(30) != 0
        assert 'sage_edge exited with code -9; stopping the launch' in launch.text
    finally:
        launch.close()


def _pid_of(launch: Launch, executable: str) -> int:
    """pid of a node the launch started ('[INFO] [sage_edge-3]: process started with pid [123]')."""
    return int(re.search(rf'\[{executable}-\d+\]: process started with pid \[(\d+)\]', launch.text).group(1))


def test_respawn_restarts_a_node_that_dies(ws, ros_domain):
    """respawn:=true: a killed edge comes back (after respawn_delay) and the launch goes on."""
    launch = Launch(ws, f'ros2 launch sage_ros edge_cloud.launch.py side:=edge namespace:=robot1 weights:=random '
                        f'respawn:=true zenoh_connect:=tcp/127.0.0.1:{free_port()}', 'respawn')
    try:
        launch.wait_for(r'\[robot1\.sage_edge\]: ready:')
        first = _pid_of(launch, 'sage_edge')
        os.kill(first, signal.SIGKILL)
        launch.wait_for(r'sage_edge-\d+\]: process has died')
        # launch_ros names the restarted process like the first: two starts, two readies.
        end = time.monotonic() + 90
        while len(re.findall(r'\[sage_edge-\d+\]: process started with pid', launch.text)) < 2:
            assert time.monotonic() < end and launch.proc.poll() is None, launch.text
            time.sleep(0.2)
        while len(re.findall(r'\[robot1\.sage_edge\]: ready:', launch.text)) < 2:
            assert time.monotonic() < end and launch.proc.poll() is None, launch.text
            time.sleep(0.2)
        pids = re.findall(r'\[sage_edge-\d+\]: process started with pid \[(\d+)\]', launch.text)
        assert int(pids[-1]) != first
        assert launch.interrupt() == 0
    finally:
        launch.close()


# --- split sides, as on a robot and a server ------------------------------------------------
def test_readme_cloud_and_robot_commands_with_ctrl_c(ws, ros_domain, real_images):
    port = str(free_port())
    sub = {'tcp/0.0.0.0': 'tcp/127.0.0.1', 'CLOUD_IP': '127.0.0.1', '7447': port}
    cloud = Launch(ws, substitute(CLOUD, **sub), 'cloud')
    robot = Launch(ws, substitute(ROBOT, **sub), 'robot')
    try:
        robot.wait_for(r'\[robot1\.sage_edge\]: ready:')
        cloud.wait_for(r'\[sage_cloud\]: ready:')
        # camera_topic:= remaps the relative camera/image_raw to the driver's topic.
        one_result_per_frame(real_images[:3], ros_domain, topic='/camera/color/image_raw', name='split_client')
        # Ctrl-C in each terminal: exit 0, no traceback.
        assert robot.interrupt() == 0
        assert cloud.interrupt() == 0
        no_traceback(robot.text + cloud.text)
        assert 'process has finished cleanly' in cloud.text
    finally:
        robot.close()
        cloud.close()


def test_secure_deployment_through_ros2_launch(ws, ros_domain, real_images, tmp_path):
    """`sage-ros certs`, then cloud and robot through `ros2 launch` with mutual TLS. The cloud's
    params_file moves the router to its zenoh_listen and zenoh_config (TLS on a free port)."""
    port = free_port()
    deploy = tmp_path / 'sage-deploy'
    certs = subprocess.run([sys.executable, '-m', 'sage_ros.cli', *substitute(CERTS, **{
        '--cloud-host cloud.example.org --cloud-host 203.0.113.7': '--cloud-host 127.0.0.1',
        '~/sage-deploy': f'{deploy} --port {port}'}).split()[2:]], capture_output=True, text=True)
    assert certs.returncode == 0, certs.stderr
    # The README's cloud.yaml, for this machine.
    readme = (REPO / 'README.md').read_text()
    cloud_yaml = re.search(r'where `cloud.yaml` is\n\n```yaml\n(.*?)```', readme, re.S).group(1)
    for old, new in (('/home/me/sage-deploy', str(deploy)), ('0.0.0.0:7447', f'127.0.0.1:{port}'),
                     ('127.0.0.1:7447', f'127.0.0.1:{port}'), ('/ckpt/deit_base.pth', 'random')):
        cloud_yaml = cloud_yaml.replace(old, new)
    assert yaml.safe_load(cloud_yaml)['sage_router']['ros__parameters']['zenoh_listen'] == f'tls/127.0.0.1:{port}'
    (deploy / 'cloud.yaml').write_text(cloud_yaml)
    sub = {'$HOME/sage-deploy': str(deploy), 'CLOUD_IP': '127.0.0.1', '7447': str(port)}
    cloud = Launch(ws, substitute(SECURE_CLOUD, **sub), 'secure_cloud')
    robot = Launch(ws, substitute(SECURE_ROBOT, **sub) + ' weights:=random eta:=0.0 budget:=16', 'secure_robot')
    try:
        cloud.wait_for(rf'Zenoh router \w+ up \(tls/127\.0\.0\.1:{port} of {re.escape(str(deploy))}/zenoh_router\.json5\)')
        cloud.wait_for(r'\[sage_cloud\]: ready:')
        robot.wait_for(r'\[robot1\.sage_edge\]: ready:')
        # eta 0: every frame is offloaded; answered by the cloud over mutual TLS.
        results = one_result_per_frame(real_images[:3], ros_domain, topic='/robot1/camera/image_raw', name='tls_client')
        assert any(r.source == 1 for r in results), [(r.source, r.detail) for r in results]
        assert all(r.budget_patches == 16 for r in results if r.source == 1)
        got = run(ws, 'ros2 param get --no-daemon --spin-time 2 /sage_router zenoh_config', retry_on='Node not found')
        assert str(deploy / 'zenoh_router.json5') in got.stdout
        assert robot.interrupt() == 0 and cloud.interrupt() == 0
        no_traceback(robot.text + cloud.text)
    finally:
        robot.close()
        cloud.close()


def test_camera_ros_on_a_pi5_compressed_topic(ws, ros_domain, real_images):
    """The README's Pi 5 command: the edge takes camera/image_raw/compressed (camera_ros's
    CompressedImage), no raw frames."""
    from sensor_msgs.msg import CompressedImage

    import cv2
    import rclpy.node
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    port = str(free_port())
    robot = Launch(ws, substitute(PI5_ROBOT, **{'CLOUD_IP': '127.0.0.1', '7447': port}) + ' weights:=random',
                   'pi5_robot')
    node = rclpy.node.Node('pi5_camera', context=ros_domain)
    from sage_ros.live_client import LiveClient

    client = LiveClient(image_topic='/robot1/camera/image_raw_unused', result_topic='/robot1/sage/result',
                        name='pi5_client', context=ros_domain)
    try:
        robot.wait_for(r'\[robot1\.sage_edge\]: ready:')
        pub = node.create_publisher(CompressedImage, '/robot1/camera/image_raw/compressed',
                                    QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE))
        end = time.monotonic() + 30
        while pub.get_subscription_count() == 0 and time.monotonic() < end:
            time.sleep(0.1)
        ok, jpeg = cv2.imencode('.jpg', real_images[1][:, :, ::-1])
        msg = CompressedImage(format='jpeg', data=jpeg.tobytes())
        while not client.all_results and time.monotonic() < end:
            msg.header.stamp = node.get_clock().now().to_msg()
            pub.publish(msg)
            client.drain(0.5)
        assert client.all_results, robot.text
        assert robot.interrupt() == 0
    finally:
        client.destroy_node()
        node.destroy_node()
        robot.close()


# --- the README says what is tested ----------------------------------------------------------
def readme_robot_commands() -> list[str]:
    """Every command line in the README's robot section (continuations joined, comments cut)."""
    text = (REPO / 'README.md').read_text()
    section = text[text.index('## On a robot with a ROS 2 distribution'):]
    section = section[:section.index('\n## ', 5)]
    commands = []
    for block in re.findall(r'```bash\n(.*?)```', section, re.S):
        for line in block.replace('\\\n', ' ').splitlines():
            line = ' '.join(line.split('#')[0].split()) if not line.lstrip().startswith('#') else ''
            if line:
                commands.append(line)
    return commands


def test_every_readme_robot_command_runs_in_a_test():
    commands = readme_robot_commands()
    assert commands
    # The install steps a ROS machine needs that this one cannot run (git, pip for what rosdep
    # lacks, rosdep): checked against the project's own files instead.
    install = [c for c in commands if c.split()[0] in ('mkdir', 'pip', 'cd')]
    for c in install:
        if c.startswith('pip install'):
            reqs = (REPO / 'requirements.txt').read_text()
            assert all(re.search(rf'^{re.escape(p)}\b', reqs, re.M) for p in c.split()[2:]), c
    for c in commands:
        if c not in install:
            assert c in README_COMMANDS, f'README command not run by a test: {c}'
