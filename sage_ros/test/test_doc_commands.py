# SPDX-License-Identifier: Apache-2.0
"""Every `sage-ros` line of the README and docs/ is one the CLI accepts as written: its
subcommand and options parse, and every -p names a parameter some node has. Lines that run
here run in the tests of what they do; this keeps the text from drifting from the CLI."""

from __future__ import annotations

import shlex

import pytest

from doc_commands import bash_commands, doc_files
from sage_ros.cli import build_parser
from sage_ros.params import NODES, check_overrides_known, load_params, parse_overrides

PREFIX = './dev sage-ros '


def _sage_ros_lines() -> list[tuple[str, str]]:
    return [(f.name, c) for f in doc_files() for c in bash_commands(f.read_text()) if c.startswith(PREFIX)]


LINES = _sage_ros_lines()


def test_the_docs_have_sage_ros_lines_of_every_kind():
    used = {shlex.split(c)[2] for _, c in LINES}
    assert {'demo', 'up', 'certs', 'bag', 'replay', 'eval', 'bench', 'export-edge'} <= used, used


@pytest.mark.parametrize('where, line', LINES, ids=[f'{w}:{c[len(PREFIX):][:60]}' for w, c in LINES])
def test_a_documented_line_parses_and_names_known_parameters(where, line, capsys):
    try:
        args = build_parser().parse_args(shlex.split(line)[2:])
    except SystemExit:
        pytest.fail(f'{where}: the CLI refuses {line!r}: {capsys.readouterr().err.strip()}')
    overrides = parse_overrides(getattr(args, 'param', []) or [])
    check_overrides_known(overrides, NODES)
    for name in overrides:
        node, _, param = name.rpartition('.')
        if node:
            assert node in NODES and param in load_params(node), f'{where}: {line!r}: no parameter {name}'
