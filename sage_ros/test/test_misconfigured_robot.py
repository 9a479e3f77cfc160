# SPDX-License-Identifier: Apache-2.0
"""A robot whose namespace does not match its certificate (issue 21, item 1): the router's access
control drops its requests without a word, the cloud never sees them, every frame times out.
The edge says so once, in one line naming its namespace, key, config and certificate, and on
/diagnostics; a slow cloud is never taken for it."""

from __future__ import annotations

from pathlib import Path

from sage_ros.commands.bringup import Bringup, plan
from sage_ros.ros.live_client import LiveClient
from sage_ros.commands.system_demo import free_port
from sage_ros.transport.uplink_watch import (NO_CLOUD, NO_ROUTER, UNANSWERED, RouteContext, Trouble, UplinkWatch,
                                            problem_line)
from sage_ros.transport.zenoh_link import Identity, load_config, session_identity
from test_security import _until, deployment  # noqa: F401 - the module's certificates fixture

SILENCE_S = 10.0


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _watch() -> tuple[UplinkWatch, Clock]:
    clock = Clock()
    return UplinkWatch(silence_s=SILENCE_S, min_sent=3, clock=clock), clock


def _run(watch: UplinkWatch, clock: Clock, seconds: float, *, state: str = 'connected', send_every: float = 1.0,
         answer_after: float | None = None) -> list[Trouble]:
    """``seconds`` of an uplink in ``state`` at 4 updates a second (as the edge's link timer),
    sending a probe every ``send_every`` s; each answer comes ``answer_after`` s after its probe
    (None: never). The causes reported."""
    reported, sent_at, step = [], [], 0.25
    for i in range(int(seconds / step)):
        clock.t += step
        if state == 'connected' and i % int(send_every / step) == 0:
            watch.sent()
            sent_at.append(clock.t)
        if answer_after is not None:
            while sent_at and clock.t - sent_at[0] >= answer_after:
                sent_at.pop(0)
                watch.answered()
        trouble = watch.update(state)
        if trouble is not None:
            reported.append(trouble)
    return reported


def test_requests_the_router_drops_are_reported_once_after_the_silence():
    watch, clock = _watch()
    reported = _run(watch, clock, 60.0)
    assert len(reported) == 1 and reported[0].cause == UNANSWERED and watch.cause == UNANSWERED
    assert reported[0].unanswered >= 3 and reported[0].waited_s >= SILENCE_S
    # The first answer ends it, and says so to the caller (which logs it).
    assert watch.answered() is True and watch.cause == ''
    assert watch.answered() is False


def test_a_slow_cloud_is_not_a_dropping_router():
    # Every answer comes 9 s after its request (far past any deadline, just inside the silence):
    # answers arrive, so nothing is reported, then or later.
    watch, clock = _watch()
    assert _run(watch, clock, 120.0, answer_after=9.0) == []
    # One answer ever disarms it: a route that worked was not refused, whatever comes later.
    assert _run(watch, clock, 120.0) == []


def test_too_few_requests_or_a_short_silence_report_nothing():
    watch, clock = _watch()
    assert _run(watch, clock, 60.0, send_every=30.0) == []  # two requests in 60 s
    watch, clock = _watch()
    assert _run(watch, clock, SILENCE_S - 1.0) == []


def test_no_cloud_and_no_router_are_reported_once_per_outage():
    watch, clock = _watch()
    # Unmatched requests are never sent: the silence of a missing cloud is no dropping router.
    reported = _run(watch, clock, 60.0, state='no cloud')
    assert [t.cause for t in reported] == [NO_CLOUD]
    assert _run(watch, clock, 5.0, answer_after=0.1) == [] and watch.cause == ''
    assert [t.cause for t in _run(watch, clock, 60.0, state='router lost')] == [NO_ROUTER]
    assert [t.cause for t in _run(watch, clock, 60.0, state='connecting')] == []  # the same outage


def test_the_line_names_namespace_key_config_certificate_and_what_to_do(deployment):  # noqa: F811
    robot1 = deployment['files']['robot1']
    ctx = RouteContext('robot2/sage/patch_set', 'robot2/sage/cloud_result', 'robot2', robot1,
                       session_identity(load_config(robot1)), ())
    line = problem_line(Trouble(UNANSWERED, 12, 15.0), ctx)
    assert '\n' not in line
    for part in ("'robot2/sage/patch_set'", 'namespace /robot2', str(robot1), "'robot1'",
                 str(deployment['files']['robot1_cert']), "'robot1/sage/patch_set'", 'namespace robot1',
                 'zenoh_robot2.json5'):
        assert part in line, (part, line)
    # A robot whose name matches: the router's access control is what to check.
    ctx = RouteContext('robot1/sage/patch_set', 'robot1/sage/cloud_result', 'robot1', robot1, ctx.identity, ())
    assert "access_control lets this identity put on 'robot1/sage/patch_set'" in problem_line(
        Trouble(UNANSWERED, 12, 15.0), ctx)
    assert session_identity(load_config(deployment['files']['robot2_usrpwd'])) == Identity('robot2', 'user robot2')


def _edge_lines(log: Path, namespace: str) -> list[str]:
    return [ln for ln in log.read_text().splitlines() if f'[{namespace}.sage_edge]' in ln]


def test_a_robot_with_another_robots_certificate_says_why_once(deployment, ros_env, tmp_path):  # noqa: F811
    """Router, cloud and two edges with real certificates from `sage-ros certs`: robot1 as
    deployed, robot2 started with robot1's config (the README's misconfiguration)."""
    f = deployment['files']
    endpoint = f'tls/127.0.0.1:{free_port()}'
    common = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint,
              'sage_router.zenoh_config': str(f['router']), 'sage_cloud.zenoh_config': str(f['cloud']),
              'sage_edge.zenoh_config': str(f['robot1']), 'sage_edge.deadline_ms': 500.0}
    procs = plan('both', namespace='robot2', overrides=common) + plan('edge', namespace='robot1', overrides=common)
    log_path = tmp_path / 'nodes.log'
    log = log_path.open('w')
    bring = Bringup(procs, log=log)
    client = None
    try:
        bring.start()
        bring.wait_ready(timeout=240)  # a hang guard: four processes load at once
        client = LiveClient(image_topic='/robot2/camera/image_raw', result_topic='/robot2/sage/result',
                            name='misconfigured_client')

        def link(ns: str) -> dict:
            return client.diagnostics(f'/{ns}/sage_edge: link') or {}

        # The guard only bounds a hang: the edge needs SILENCE_S of requests without answers.
        _until(lambda: link('robot2').get('uplink') == 'unanswered', 'robot2 reporting its unanswered requests',
               guard_s=120.0)
        status = link('robot2')
        _until(lambda: link('robot1').get('uplink') == 'connected', 'robot1 served')
        said = [ln for ln in _edge_lines(log_path, 'robot2') if 'got no answer' in ln]
        assert len(said) == 1, said
        line = said[0]
        assert line.startswith('[edge] [ERROR]') and status['message'] in line
        for part in ("'robot2/sage/patch_set'", 'namespace /robot2', str(f['robot1']), str(f['robot1_cert']),
                     "'robot1'", 'namespace robot1'):
            assert part in line, (part, line)
        # The correctly deployed robot beside it is served, and says nothing of the kind.
        assert int(link('robot1')['answered']) > 0
        assert not [ln for ln in _edge_lines(log_path, 'robot1') if 'got no answer' in ln]
        # Once: a while later, still one line, still on /diagnostics.
        client.drain(2.0)
        assert len([ln for ln in _edge_lines(log_path, 'robot2') if 'got no answer' in ln]) == 1
        assert link('robot2').get('uplink') == 'unanswered'
    finally:
        if client is not None:
            client.destroy_node()
        bring.stop()
        log.close()
