# SPDX-License-Identifier: Apache-2.0
"""The launch file and `sage-ros up` start the same nodes from the same YAML."""

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from sage_ros.commands.bringup import plan
from sage_ros.params import load_params, read_params_file

def _params_of(proc):
    """The parameter file a planned process gets, and the node it is for."""
    path = Path(proc.argv[proc.argv.index('--params-file') + 1])
    return yaml.safe_load(path.read_text())


def test_up_plans_processes_per_side_with_one_params_file_keyed_by_node():
    procs = plan('both', namespace='robot1', overrides={'budget': 48, 'sage_cloud.weights': '/w/base.pth',
                                                         'weights': 'random',
                                                         'zenoh_listen': 'tcp/127.0.0.1:9'})
    by = {p.name: p for p in procs}
    assert list(by) == ['router', 'cloud', 'edge']
    assert by['edge'].argv[:3] == [sys.executable, '-m', 'sage_ros.nodes.edge_node']
    assert by['router'].argv[:3] == [sys.executable, '-m', 'sage_ros.nodes.router_node']
    assert by['edge'].argv[-2:] == ['-r', '__ns:=/robot1'] and '-p' not in by['edge'].argv
    doc = _params_of(by['edge'])
    assert _params_of(by['router']) == doc  # one file for the side, every node in it
    assert list(doc) == ['/sage_router', '/sage_cloud', '/robot1/sage_edge']
    edge, cloud, router = (doc[k]['ros__parameters'] for k in ('/robot1/sage_edge', '/sage_cloud', '/sage_router'))
    assert edge['budget'] == 48 and edge['budget_mode'] == 'fixed' and edge['weights'] == 'random'
    assert 'budget' not in cloud and cloud['weights'] == '/w/base.pth'  # the specific one wins
    assert router == {'zenoh_config': 'zenoh_router.json5', 'zenoh_listen': 'tcp/127.0.0.1:9', 'use_sim_time': False}
    assert edge == load_params('sage_edge', overrides={'budget': 48, 'weights': 'random'})
    assert [p.name for p in plan('edge')] == ['edge']
    assert [p.name for p in plan('cloud')] == ['router', 'cloud']
    with pytest.raises(ValueError, match='side must be one of edge, cloud, both'):
        plan('moon')


def test_a_users_params_file_in_every_form_rcl_reads(tmp_path):
    f = tmp_path / 'p.yaml'
    f.write_text(textwrap.dedent("""\
        /**:
          ros__parameters:
            use_sim_time: true
        sage_router:
          ros__parameters:
            zenoh_listen: tls/0.0.0.0:7447
        robot1:                      # nav2: the namespace as root key
          sage_edge:
            ros__parameters:
              eta: 2
              method: random
        /robot2/sage_edge:
          ros__parameters:
            budget: 32
        /*/sage_edge:
          ros__parameters:
            codec: png
        """))
    assert read_params_file(f, 'sage_router') == {'use_sim_time': True, 'zenoh_listen': 'tls/0.0.0.0:7447'}
    assert read_params_file(f, 'sage_edge', namespace='robot1') == {'use_sim_time': True, 'eta': 2,
                                                                      'method': 'random', 'codec': 'png'}
    assert read_params_file(f, 'sage_edge') == {'use_sim_time': True}  # /*/ needs one namespace token
    r1 = load_params('sage_edge', params_file=f, namespace='robot1')
    assert r1['eta'] == 2.0 and r1['budget_mode'] == 'auto' and r1['use_sim_time'] is True
    r2 = load_params('sage_edge', params_file=f, namespace='robot2', overrides={'method': 'uniform_grid'})
    assert r2['budget'] == 32 and r2['budget_mode'] == 'fixed' and r2['method'] == 'uniform_grid'
    # Overrides win over the file; a typo in the file is an error naming the file.
    f.write_text('/**/sage_edge:\n  ros__parameters:\n    budgte: 3\n')
    with pytest.raises(KeyError, match='budgte'):
        load_params('sage_edge', params_file=f)


def test_budget_means_fixed_unless_budget_mode_is_given_too():
    assert load_params('sage_edge')['budget_mode'] == 'auto'
    assert load_params('sage_edge', overrides={'sage_edge.budget': 48})['budget_mode'] == 'fixed'
    assert load_params('sage_edge', overrides={'budget': 48, 'budget_mode': 'auto'})['budget_mode'] == 'auto'


# `sage-ros up` running until Ctrl-C and leaving nothing behind:
# test_lifecycle.py::test_ctrl_c_to_the_process_group_of_up_ends_everything_cleanly.
