# SPDX-License-Identifier: Apache-2.0
"""The package's rooms: every module imports from its own layer or lower ones, never up.

Layers, lowest first: core -> serving, transport, ros, params -> nodes -> commands, eval ->
bench -> cli. Imports inside functions count too: they run up a layer just the same.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'sage_ros'

LAYERS = {
    'core': 0,
    'serving': 1, 'transport': 1, 'ros': 1, 'params': 1,
    'nodes': 2,
    'commands': 3, 'eval': 3,
    'bench': 4,
    'cli': 5,
}


def _room(module: str) -> str | None:
    """'nodes' for sage_ros.nodes.edge_node; None for the package itself (its version)."""
    parts = module.split('.')
    return parts[1] if len(parts) > 1 else None


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PKG.rglob('*.py')):
        rel = path.relative_to(PKG.parent).with_suffix('')
        parts = rel.parts[:-1] if rel.name == '__init__' else rel.parts
        found['.'.join(parts)] = path
    return found


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f'{node.module}.{a.name}' for a in node.names}  # `from sage_ros import bench`
    return {n for n in names if n == 'sage_ros' or n.startswith('sage_ros.')}


MODULES = _modules()


def test_every_top_level_room_has_a_layer():
    rooms = {_room(m) for m in MODULES} - {None}
    assert rooms <= set(LAYERS), f'not in a layer: {sorted(rooms - set(LAYERS))}'
    loose = sorted(p.name for p in PKG.glob('*.py') if p.stem not in ('__init__', *LAYERS))
    assert not loose, f'modules loose at the package top: {loose}'


@pytest.mark.parametrize('module', sorted(MODULES))
def test_no_import_runs_up_a_layer(module):
    room = _room(module)
    if room is None:
        return
    up = sorted(name for name in _imports(MODULES[module])
                if (target := _room(name)) in LAYERS and LAYERS[target] > LAYERS[room])
    assert not up, f'{module} (layer {LAYERS[room]}) imports from a higher layer: {up}'


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: a core module importing a node is caught."""
    f = tmp_path / 'bad.py'
    f.write_text('def f():\n    from sage_ros.nodes.edge_node import EdgeNode\n')
    assert {_room(n) for n in _imports(f)} == {'nodes'}
    assert LAYERS['nodes'] > LAYERS['core']
