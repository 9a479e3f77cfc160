# SPDX-License-Identifier: Apache-2.0
"""`sage-ros up` when a node cannot start: it stops at once with that node's own one-line
reason, never waiting out the readiness timeout, and its log lines never run together."""

from __future__ import annotations

import subprocess
import sys


def test_a_router_that_cannot_listen_stops_up_at_once_with_its_reason(ros_env):
    # The router's FATAL line names the Zenoh router too; it must not count as ready.
    out = subprocess.run([sys.executable, '-m', 'sage_ros.cli', 'up', '--side', 'cloud', '--weights', 'random',
                          '-p', 'sage_router.zenoh_listen:=garbage/1.2.3.4'],
                         capture_output=True, text=True, timeout=170)  # up's own readiness wait is 180 s
    assert out.returncode == 2, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('sage-ros up: sage_router exited with code 2 before it was ready: '), last
    assert 'garbage/1.2.3.4' in last and 'not ready after' not in out.stderr
    assert 'Traceback' not in out.stderr
    # Every line is one process's line or the supervisor's, whole.
    for line in out.stderr.splitlines():
        assert line.startswith(('[router] ', '[cloud] ', 'sage-ros up: ', '[bootstrap] ')), line
