# SPDX-License-Identifier: Apache-2.0
"""The cloud is fair between robots: while one robot floods it with maximum-size requests, a
well-behaved robot (a real edge node at 2 fps, every frame offloaded) keeps its answers."""

from __future__ import annotations

from sage_ros.eval.fleet_bench import flood_fairness


def test_a_flooding_robot_does_not_starve_a_well_behaved_one(ros_env, imagenet_dir, tmp_path):
    with (tmp_path / 'nodes.log').open('w') as log:
        report = flood_fairness(imagenet_dir / 'images', seconds=12, flood_rps=50, calm_fps=2, log=log)
    assert report['flood_rps_sent'] > 40 and report['flood_busy'] > 0  # the flood was on, and shed
    assert report['calm_frames'] >= 20
    assert report['calm_share'] >= 0.9, report
