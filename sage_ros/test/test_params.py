# SPDX-License-Identifier: Apache-2.0
import pytest
import yaml

from sage_ros.params import check_overrides_known, config_dir, load_params, parse_overrides


def test_shipped_yaml_is_the_source_of_defaults():
    doc = yaml.safe_load((config_dir() / 'sage_ros.yaml').read_text())
    edge = load_params('sage_edge')
    assert edge == doc['/**/sage_edge']['ros__parameters']
    assert edge['model'] == 'deit_tiny_patch16_224' and edge['eta'] == 1.0 and edge['method'] == 'sage'
    assert load_params('sage_cloud')['model'] == 'deit_base_patch16_224'


def test_overrides_ros_style():
    ov = parse_overrides(['budget:=48', 'sage_cloud.weights:=/x.pth', 'weights:=random', 'eta:=2'])
    edge = load_params('sage_edge', overrides=ov)
    cloud = load_params('sage_cloud', overrides=ov)
    assert edge['budget'] == 48 and edge['weights'] == 'random' and edge['eta'] == 2.0
    assert isinstance(edge['eta'], float)
    assert cloud['weights'] == '/x.pth'
    assert 'budget' not in cloud


def test_override_errors_are_clear():
    with pytest.raises(ValueError, match='name:=value'):
        parse_overrides(['budget=48'])
    with pytest.raises(TypeError, match='budget must be int'):
        load_params('sage_edge', overrides={'budget': 'many'})
    with pytest.raises(KeyError, match='no parameter'):
        load_params('sage_edge', overrides={'sage_edge.budgte': 3})
    with pytest.raises(KeyError, match='no node has a parameter'):
        check_overrides_known({'budgte': 3}, ('sage_edge', 'sage_cloud'))
