# SPDX-License-Identifier: Apache-2.0
"""Reading the parameter YAML of config/ without ROS, with ROS-style ``name:=value`` overrides."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

import yaml

if TYPE_CHECKING:
    from sage_ros.core.link import UplinkMonitor
    from sage_ros.core.offload import SelectionConfig
    from sage_ros.core.pipeline import GateConfig

CONFIG_FILE = 'sage_ros.yaml'


NODES = ('sage_edge', 'sage_cloud', 'sage_router')


def config_path(name: str, directory: Path | None = None) -> Path:
    """A file of the config directory (absolute names are kept)."""
    p = Path(name)
    return p if p.is_absolute() else (directory or config_dir()) / p


def config_dir() -> Path:
    """Directory of the shipped config: the source tree's, else the installed package share."""
    env = os.environ.get('SAGE_ROS_CONFIG_DIR')
    if env:
        return Path(env)
    src = Path(__file__).resolve().parents[1] / 'config'
    if (src / CONFIG_FILE).is_file():
        return src
    from ament_index_python.packages import get_package_share_directory  # only on installed setups

    return Path(get_package_share_directory('sage_ros')) / 'config'


def parse_value(text: str) -> Any:
    """A command-line value the way ROS reads one: YAML scalars (1, 1.5, true, 'abc')."""
    value = yaml.safe_load(text)
    return text if value is None else value


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``['budget:=48', 'sage_edge.weights:=random']`` -> ``{'budget': 48, ...}``."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition(':=')
        if not sep or not name:
            raise ValueError(f'parameter override must look like name:=value, got {item!r}')
        out[name.strip()] = parse_value(value)
    return out


def load_params(
    node: str, *, directory: Path | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Parameters of ``node`` from the YAML, then overrides.

    An override ``name`` applies to every node that has the parameter; ``node.name`` to one.
    Unknown names are errors, so a typo never passes silently.
    """
    path = (directory or config_dir()) / CONFIG_FILE
    with path.open() as fh:
        doc = yaml.safe_load(fh) or {}
    section = doc.get(f'/**/{node}', doc.get(node))
    if not isinstance(section, dict) or 'ros__parameters' not in section:
        raise KeyError(f'{path} has no ros__parameters for node {node!r}')
    params = dict(section['ros__parameters'])
    # Node-qualified overrides last, so they win over the unqualified ones.
    for name, value in sorted((overrides or {}).items(), key=lambda kv: '.' in kv[0]):
        target, _, key = name.rpartition('.')
        if target and target != node:
            continue
        if key not in params:
            if target:
                raise KeyError(f'node {node!r} has no parameter {key!r} (see {path})')
            continue
        expected = type(params[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, expected):
            raise TypeError(f'{node}.{key} must be {expected.__name__}, got {value!r}')
        params[key] = value
    return params


def check_overrides_known(overrides: dict[str, Any], nodes: Iterable[str], *, directory: Path | None = None) -> None:
    """Raise when an unqualified override matches no node's parameter."""
    known: set[str] = set()
    for node in nodes:
        known |= set(load_params(node, directory=directory))
    for name in overrides:
        if '.' not in name and name not in known:
            raise KeyError(f'no node has a parameter {name!r}')


def selection_config(edge: dict[str, Any]) -> SelectionConfig:
    """The core's SelectionConfig from sage_edge parameters."""
    # Imported here: the router reads parameters too and must not pay for torch.
    from sage_ros.core.offload import SelectionConfig

    method_params: dict[str, Any] = {}
    if edge['method'] == 'attention_threshold':
        method_params['delta'] = float(edge['delta'])
    elif edge['method'] == 'attention_sum':
        method_params['delta_sum'] = float(edge['delta_sum'])
    return SelectionConfig(
        method=edge['method'],
        prefilter_ratio=float(edge['prefilter_ratio']),
        seed=int(edge['seed']),
        encoding=edge['codec'],
        quality=int(edge['jpeg_quality']),
        method_params=method_params,
    )


def gate_config(edge: dict[str, Any]) -> GateConfig:
    """The core's GateConfig from sage_edge parameters."""
    from sage_ros.core.pipeline import GateConfig

    return GateConfig(crop_pct=float(edge['crop_pct']), embedding_source=edge['embedding_source'],
                      gate_metric=edge['gate_metric'], eta=float(edge['eta']), topk=int(edge['topk']))


def uplink_monitor(edge: dict[str, Any], *, connected: bool = True) -> UplinkMonitor:
    """The bandwidth monitor, budget controller and in-flight window from sage_edge parameters."""
    from sage_ros.core.link import BudgetController, UplinkMonitor

    controller = BudgetController(deadline_s=edge['deadline_ms'] / 1e3, budget_min=edge['budget_min'],
                                  budget_max=edge['budget_max'], safety=edge['budget_safety'])
    return UplinkMonitor(controller, probe_interval_s=edge['probe_interval_s'], probe_bytes=edge['probe_bytes'],
                         max_in_flight=edge['max_in_flight'], connected=connected)


def starting_budget(edge: dict[str, Any]) -> int:
    """B of the first offloaded frame: the parameter in fixed mode, else the controller's start
    (budget_max, corrected by the first answers). What an offline run uses for every frame."""
    if edge['budget_mode'] == 'fixed':
        return int(edge['budget'])
    return uplink_monitor(edge).budget
