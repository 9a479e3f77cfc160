# SPDX-License-Identifier: Apache-2.0
"""Mutual TLS, user/password and access control on 127.0.0.1 with generated certificates."""

from __future__ import annotations

import json
import stat
import time

import pytest
import zenoh

from sage_ros.commands.bringup import Bringup, plan
from sage_ros.cli import main
from sage_ros.ros.live_client import LiveClient
from sage_ros.commands.system_demo import free_port
from sage_ros.commands.certs import write_deployment
from conftest import wait_uplink


@pytest.fixture(scope='module')
def deployment(tmp_path_factory):
    port = free_port()
    out = tmp_path_factory.mktemp('deploy')
    files = write_deployment(out, robots=['robot1', 'robot2'], cloud_hosts=['127.0.0.1', 'localhost'], port=port)
    other = write_deployment(tmp_path_factory.mktemp('other'), robots=['robot1'], cloud_hosts=['127.0.0.1'],
                             port=port)
    return {'files': files, 'other': other, 'port': port, 'dir': out}


def _conf(path, port, **extra):
    c = zenoh.Config.from_file(str(path))
    c.insert_json5('connect/endpoints', f'["tls/127.0.0.1:{port}"]')
    c.insert_json5('connect/timeout_ms', '3000')
    for k, v in extra.items():
        c.insert_json5(k, json.dumps(v))
    return c


def _router(path, port):
    c = zenoh.Config.from_file(str(path))
    c.insert_json5('listen/endpoints', f'["tls/127.0.0.1:{port}"]')
    return zenoh.open(c)


def _until(cond, what: str, guard_s: float = 30.0) -> None:
    """Until ``cond()`` holds; fails after ``guard_s`` (a hang guard)."""
    end = time.monotonic() + guard_s
    while not cond():
        assert time.monotonic() < end, f'{what}: not within {guard_s:g} s'
        time.sleep(0.01)


def _refused(conf) -> bool:
    try:
        zenoh.open(conf).close()
    except zenoh.ZError:
        return True
    return False


@pytest.mark.parametrize('auth', ['mtls', 'usrpwd'])
def test_only_valid_robots_connect_and_each_sees_only_its_own_traffic(deployment, auth):
    f, port = deployment['files'], deployment['port']
    sfx = '' if auth == 'mtls' else '_usrpwd'
    router = _router(f['router' + sfx], port)
    sessions = []
    try:
        cloud = zenoh.open(_conf(f['cloud' + sfx], port))
        sessions.append(cloud)
        seen = []

        def serve(sample):
            key = str(sample.key_expr)
            seen.append((key, sample.payload.to_bytes()))
            cloud.put(key.split('/')[0] + '/sage/cloud_result', b'answer:' + sample.payload.to_bytes())

        cloud.declare_subscriber('**/sage/patch_set', serve)
        r1, r2 = (zenoh.open(_conf(f[name + sfx], port)) for name in ('robot1', 'robot2'))
        sessions += [r1, r2]
        got1, got2, spied = [], [], []
        r1.declare_subscriber('robot1/sage/cloud_result', lambda s: got1.append(s.payload.to_bytes()))
        r2.declare_subscriber('robot2/sage/cloud_result', lambda s: got2.append(s.payload.to_bytes()))
        r1.declare_subscriber('robot2/sage/cloud_result', lambda s: spied.append(s.payload.to_bytes()))
        # Each robot's requests are routed to the cloud (the router knows its subscriber);
        # the robots' subscribers were declared before, on the same links, so answers find them.
        pub1 = r1.declare_publisher('robot1/sage/patch_set')  # as the edge node sends
        pub2 = r2.declare_publisher('robot2/sage/patch_set')
        _until(lambda: pub1.matching_status.matching and pub2.matching_status.matching, 'a route to the cloud')
        pub1.put(b'r1')
        r2.put('robot2/sage/patch_set', b'r2')
        r1.put('robot2/sage/patch_set', b'forged')  # robot1 pretending to be robot2
        _until(lambda: got1 and got2, 'the answers')
        assert got2 == [b'answer:r2']

        # Refused at the door: no credentials, a certificate of another CA, a wrong password.
        anon = zenoh.Config()
        anon.insert_json5('mode', '"client"')
        anon.insert_json5('connect/endpoints', f'["tls/127.0.0.1:{port}"]')
        anon.insert_json5('connect/timeout_ms', '3000')
        anon.insert_json5('transport/link/tls/root_ca_certificate', json.dumps(str(f['ca'])))
        assert _refused(anon)
        if auth == 'mtls':
            assert _refused(_conf(deployment['other']['robot1'], port))
        else:
            assert _refused(_conf(f['robot1_usrpwd'], port, **{'transport/auth/usrpwd/password': 'wrong'}))
            assert _refused(_conf(f['robot1_usrpwd'], port, **{'transport/auth/usrpwd/user': 'robot9'}))
        # The cloud kept serving the valid robot throughout.
        r1.put('robot1/sage/patch_set', b'again')
        _until(lambda: len(got1) >= 2, 'the answer to robot1 again')
        # The router passes each robot's messages on in order: the forged request (sent on
        # robot1's link before 'again') and a copy of robot2's answer for robot1's spying
        # subscriber (sent to robot1 before the answer to 'again') would have arrived by now.
        assert sorted(seen) == [('robot1/sage/patch_set', b'again'), ('robot1/sage/patch_set', b'r1'),
                                ('robot2/sage/patch_set', b'r2')]
        assert got1 == [b'answer:r1', b'answer:again'] and got2 == [b'answer:r2']
        assert spied == []  # robot1 cannot read robot2's results
    finally:
        for s in sessions:
            s.close()
        router.close()


def test_deployment_files_keep_secrets_private(deployment):
    d = deployment['dir']
    for key in d.glob('*.key'):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    for name in ('credentials.txt', 'zenoh_robot1_usrpwd.json5', 'zenoh_cloud_usrpwd.json5'):
        assert stat.S_IMODE((d / name).stat().st_mode) == 0o600
    router = json.loads((d / 'zenoh_router.json5').read_text())
    assert router['access_control']['default_permission'] == 'deny'
    assert router['transport']['link']['tls']['enable_mtls'] is True


def test_certs_cli(tmp_path, capsys):
    assert main(['certs', '--robots', 'r1', '--cloud-host', 'cloud.example.org', '--out', str(tmp_path)]) == 0
    assert (tmp_path / 'r1.pem').is_file() and 'Keep *.key' in capsys.readouterr().out
    assert main(['certs', '--robots', 'a/b', '--cloud-host', 'x', '--out', str(tmp_path / 'bad')]) == 2


def test_nodes_over_mutual_tls(deployment, ros_env, imagenet_dir, tmp_path):
    """The real router, cloud node and edge node with the generated configs."""
    from sage_ros.commands.images import list_images, read_rgb

    f = deployment['files']
    port = free_port()
    endpoint = f'tls/127.0.0.1:{port}'
    # A deadline far beyond a round trip here: the frame is answered by the cloud on any machine.
    overrides = {'weights': 'random', 'budget_mode': 'fixed', 'deadline_ms': 30000.0,
                 'sage_router.zenoh_config': str(f['router']),
                 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'sage_cloud.zenoh_config': str(f['cloud']),
                 'sage_edge.zenoh_config': str(f['robot1']),
                 'sage_edge.image_topic': 'camera/image_raw'}
    log = (tmp_path / 'nodes.log').open('w')
    bring = Bringup(plan('both', namespace='robot1', overrides=overrides), log=log)
    client = None
    try:
        bring.start()
        bring.wait_ready()
        client = LiveClient(image_topic='/robot1/camera/image_raw', result_topic='/robot1/sage/result',
                            name='tls_client')
        assert client.wait_for_edge()
        wait_uplink(client, timeout=120)  # the edge has seen the cloud, over TLS
        res = client.classify(read_rgb(list_images(imagenet_dir / 'images', limit=1)[0].path), timeout=120)
        assert res is not None and res.source == 1, res and res.detail  # answered by the cloud over TLS
    finally:
        if client is not None:
            client.destroy_node()
        bring.stop()
        log.close()


@pytest.mark.parametrize('robots, why', [
    (['ca'], 'reserved'), (['sage-cloud'], 'reserved'), (['robot1', 'robot1'], 'twice'),
    (['a#b'], 'not a valid'), (['r?'], 'not a valid'), (['r$1'], 'not a valid'), (['r*'], 'not a valid'),
    (['a/b'], 'not a valid'), (['1robot'], 'not a valid'), ([], 'at least one'),
])
def test_certs_refuse_dangerous_robot_ids(tmp_path, robots, why):
    from sage_ros.commands.certs import DeploymentError

    with pytest.raises(DeploymentError, match=why):
        write_deployment(tmp_path / 'd', robots=robots, cloud_hosts=['127.0.0.1'])
    assert not (tmp_path / 'd').exists()  # nothing written


def test_certs_never_replace_a_ca_without_force(tmp_path, capsys):
    from sage_ros.cli import main

    out = tmp_path / 'd'
    assert main(['certs', '--robots', 'robot1', '--cloud-host', '127.0.0.1', '--out', str(out)]) == 0
    ca = (out / 'ca.key').read_bytes()
    assert main(['certs', '--robots', 'robot2', '--cloud-host', '127.0.0.1', '--out', str(out)]) == 2
    assert 'already holds a CA' in capsys.readouterr().err and (out / 'ca.key').read_bytes() == ca
    assert main(['certs', '--robots', 'robot2', '--cloud-host', '127.0.0.1', '--out', str(out), '--force']) == 0
    assert (out / 'ca.key').read_bytes() != ca
    assert main(['certs', '--robots', 'ca', '--cloud-host', '127.0.0.1', '--out', str(tmp_path / 'e')]) == 2
