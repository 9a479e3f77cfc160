# SPDX-License-Identifier: Apache-2.0
"""The edge node in this process: budget semantics at run time and the once-only warning about
camera frames that never arrive."""

from __future__ import annotations

import time

import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image


@pytest.fixture(scope='module')
def edge(ros_edge_node):
    return ros_edge_node


def test_camera_topic_is_relative_to_the_namespace(edge):
    assert edge._image_topic == '/robot9/camera/image_raw'


def test_setting_budget_switches_to_fixed_and_a_refused_one_changes_nothing(edge):
    assert edge.get_parameter('budget_mode').value == 'auto'
    [bad] = edge.set_parameters([Parameter('budget', value=500)])
    assert not bad.successful and edge.get_parameter('budget_mode').value == 'auto'
    [ok] = edge.set_parameters([Parameter('budget', value=48)])
    assert ok.successful
    assert edge.get_parameter('budget_mode').value == 'fixed' and edge._params['budget_mode'] == 'fixed'
    assert edge._params['budget'] == 48
    # budget_mode auto hands B back; set together, budget_mode wins.
    edge.set_parameters([Parameter('budget_mode', value='auto')])
    edge.set_parameters_atomically([Parameter('budget', value=32), Parameter('budget_mode', value='auto')])
    assert edge._params['budget'] == 32 and edge._params['budget_mode'] == 'auto'


def test_lost_frames_warn_once_with_the_fixes(edge, capfd):
    from sage_ros.nodes.edge_node import _Frame

    msg = Image(height=480, width=640, encoding='bgr8', step=1920, data=bytes(640 * 480 * 3))
    gid = {'data': bytes(range(24))}
    before = edge.stats.snapshot()['lost']
    for seq in (1, 2, 6, 7, 20):  # gaps: 3 and 12 frames never arrived
        edge._offer(_Frame(msg, msg.header, time.monotonic()), {'publication_sequence_number': seq,
                                                               'publisher_gid': gid}, len(msg.data),
                    edge._image_topic)
    err = capfd.readouterr().err  # the warning is logged in _offer itself, before it returns
    assert edge.stats.snapshot()['lost'] - before == 15
    assert err.count('never arrived') == 1, err
    line = next(line for line in err.splitlines() if 'never arrived' in line)
    assert '3 camera frame(s) from a publisher on /robot9/camera/image_raw' in line and '0.9 MB' in line
    assert 'FASTDDS_DEFAULT_PROFILES_FILE=' in line and 'fastdds_large_frames.xml' in line
    assert 'camera_transport:=compressed' in line and '32 MB' in line
