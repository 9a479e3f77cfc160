# SPDX-License-Identifier: Apache-2.0
"""Offline two-round evidence in ``sage-ros eval`` (random weights: accuracies are chance level,
so the wiring is checked by relabelling frames with the server's own answers).

The server model is DeiT-Tiny (its own seed) rather than DeiT-Base: the wiring is what is
tested, and a server forward then costs a fifteenth."""

from __future__ import annotations

import csv
import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest

import sage_ros.eval.sweep as sweep_mod
from sage_ros.cli import build_parser, main
from sage_ros.eval.bags import labeled_images_from_folder, write_image_bag
from sage_ros.eval.cache import EvalCache
from sage_ros.eval.figures import _round_two
from sage_ros.eval.run import run_eval, sweep_config
from sage_ros.params import load_params

# B=88: a second round of K=16 has room for 96 - 88 = 8 patches only.
BUDGETS = [16, 88]
FRAMES = 5
SERVER = {'sage_cloud.model': 'deit_tiny_patch16_224', 'sage_cloud.weights': 'random:1'}
SERVER_ARGS = [arg for k, v in SERVER.items() for arg in ('-p', f'{k}:={v}')]


@pytest.fixture(scope='module')
def bag(imagenet_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp('bags') / 'five'
    write_image_bag(labeled_images_from_folder(imagenet_dir / 'images', limit=FRAMES), path)
    return path


def config(**kw):
    ov = {'weights': 'random', **SERVER}
    edge, cloud = load_params('sage_edge', overrides=ov), load_params('sage_cloud', overrides=ov)
    args = {'methods': ['sage'], 'budgets': BUDGETS, 'etas': [1.0], 'codecs': ['jpeg'],
            # 20 bits is above log2(1000): the server never asks for more.
            'second_rounds': ['continue', 'roi'], 'second_ks': [0, 16], 'eta_clouds': [3.0, 20.0], **kw}
    return sweep_config(edge, cloud, **args)


@pytest.fixture(scope='module')
def swept(bag, tmp_path_factory):
    out = tmp_path_factory.mktemp('rounds')
    paths = run_eval(bag, config(), out, progress=False, emit=lambda s: None, figures=1)
    # Read back from the complete cache: no model runs again.
    data = sweep_mod.run_sweep(bag, config(), cache_path=out / 'cache.sqlite', progress=False, emit=lambda s: None)
    with open(paths['csv'], newline='') as fh:
        return out, paths, data, list(csv.DictReader(fh))


def _pick(rows, **kw):
    return [r for r in rows if all(r[k] == v for k, v in kw.items())]


def test_second_k_zero_equals_the_one_round_sage_rows(swept):
    _, _, data, _ = swept
    # Relabel every frame with one-round SAGE's answer at B=16: that row is then 100 % right,
    # and any row whose answers differ from SAGE's by a single frame shows it.
    sage16 = data.server[sweep_mod.Setting('sage', 16, 'jpeg', data.config.quality).key]
    relabelled = dataclasses.replace(data, edge=[dataclasses.replace(r, truth=sage16[r.idx].label)
                                                 for r in data.edge])
    rows = sweep_mod.rows(relabelled)
    same = ('offloaded_accuracy', 'overall_accuracy', 'mean_bytes', 'max_bytes', 'mean_patches', 'max_patches',
            'coverage_7x7', 'answered')
    zero = [r for r in rows if r['method'] == sweep_mod.TWO_ROUND and r['second_k'] == 0]
    assert len(zero) == 2 * 2 * len(BUDGETS)  # modes x eta_cloud x B
    for r in zero:
        sage = next(s for s in rows if s['method'] == 'sage' and s['budget'] == r['budget']
                    and s['prefilter_ratio'] == 2.0)
        assert {k: r[k] for k in same} == {k: sage[k] for k in same}
        assert r['round1_accuracy'] == r['offloaded_accuracy'] == sage['offloaded_accuracy']
        assert r['second_round_share'] == 0.0
    assert next(r for r in zero if r['budget'] == 16)['offloaded_accuracy'] == 1.0
    # With K > 0, round one is still SAGE's request.
    for r in rows:
        if r['method'] == sweep_mod.TWO_ROUND and r['budget'] == 16:
            assert r['round1_accuracy'] == 1.0


def test_two_round_rows_are_sane(swept):
    _, paths, data, rows = swept
    assert len(_pick(rows, method=sweep_mod.TWO_ROUND)) == 2 * 2 * 2 * len(BUDGETS)  # modes x K x eta_cloud x B
    for r in _pick(rows, method=sweep_mod.TWO_ROUND):
        sage = _pick(rows, method='sage', budget=r['budget'], prefilter_ratio='2.0')[0]
        share = float(r['second_round_share'])
        assert 0.0 <= share <= 1.0 and int(r['budget_violations']) == 0
        assert int(r['max_bytes']) >= float(r['mean_bytes']) >= float(sage['mean_bytes'])
        assert float(r['mean_patches']) <= int(r['max_patches']) <= data.config.budget_max
        assert r['round1_accuracy'] == sage['offloaded_accuracy']
        if r['eta_cloud'] == '20.0' or r['second_k'] == '0':  # never asked: round one stands
            assert share == 0.0 and r['mean_bytes'] == sage['mean_bytes']
            assert r['offloaded_accuracy'] == r['round1_accuracy']
        else:  # a random server is never sure: it asks on every frame
            assert share == 1.0 and float(r['mean_bytes']) > float(sage['mean_bytes'])
    # continue adds exactly K' = min(K, budget_max - B) patches.
    cont = {int(r['budget']): r for r in _pick(rows, method=sweep_mod.TWO_ROUND, second_round='continue',
                                                 second_k='16', eta_cloud='3.0')}
    assert cont[16]['max_patches'] == '32' and cont[88]['max_patches'] == '96'
    md = paths['markdown'].read_text()
    assert '### Two-round evidence' in md and '| continue | 16 | 3 | 16 |' in md
    assert paths['accuracy_vs_bytes'].read_bytes()[:4] == b'\x89PNG'


def test_union_never_exceeds_budget_max_and_round_two_is_new(swept):
    _, _, data, _ = swept
    for t in data.two_round:
        first, unions = data.server[t.round_one.key], data.rounds[t.key]
        if t.k == 0:
            assert not unions  # nothing to add: no union computed
            continue
        assert set(unions) == {r.idx for r in data.edge}
        for frame, u in unions.items():
            added = data.round_two[t.key][frame]
            assert u.patches == first[frame].patches + added.size <= t.budget_max
            assert 0 < added.size <= t.k and np.unique(added).size == added.size
            assert u.bytes > first[frame].bytes  # round two's own JPEG on top of round one's


def test_figure_draws_round_two_of_the_first_setting(swept):
    out, _, data, _ = swept
    assert len(list((out / 'figures').glob('figure_*.png'))) == 1
    t = data.two_round[0]
    assert (t.mode, t.k) == ('continue', 0)  # the figure skips K=0: nothing to draw
    two = next(t for t in data.two_round if t.budget == 16 and t.k > 0)
    assert _round_two(data, two, data.edge[0].idx).size == 16
    never = next(t for t in data.two_round if t.budget == 16 and t.k > 0 and t.eta_cloud == 20.0)
    assert _round_two(data, never, data.edge[0].idx).size == 0


def test_rerun_reads_every_answer_from_the_cache(swept, bag, monkeypatch):
    out, _, _, rows = swept

    def boom(*a, **kw):
        raise AssertionError('the server ran although the cache was complete')

    monkeypatch.setattr(sweep_mod, 'server_forward_subset', boom)
    monkeypatch.setattr(sweep_mod, 'classify_batch_attended', boom)
    paths = run_eval(bag, config(), out, progress=False, emit=lambda s: None)
    with open(paths['csv'], newline='') as fh:
        assert list(csv.DictReader(fh)) == rows
    with EvalCache(out / 'cache.sqlite') as cache:
        assert cache._db.execute('SELECT COUNT(*) FROM round_two').fetchone()[0] > 0


def test_cli_parses_the_second_round_options(swept, bag, monkeypatch, capsys):
    out, _, _, _ = swept
    parse = build_parser().parse_args
    args = parse(['eval', 'b', '--out', 'o', '--second-round', 'continue,roi', '--second-k', '8,24',
                  '--eta-cloud', '2,4.5'])
    assert (args.second_round, args.second_k, args.eta_cloud) == (['continue', 'roi'], [8, 24], [2.0, 4.5])
    args = parse(['eval', 'b', '--out', 'o'])
    assert (args.second_round, args.second_k, args.eta_cloud) == ([], None, [3.0])
    assert main(['eval', str(bag), '--out', str(out), '--second-round', 'telepathy']) == 2
    assert main(['eval', str(bag), '--out', str(out), '--second-k', '16']) == 2
    assert 'second' in capsys.readouterr().err
    # The CLI on the fixture's cache: K=0 rows equal SAGE's, and nothing is computed again.
    monkeypatch.setattr(sweep_mod, 'server_forward_subset', None)
    monkeypatch.setattr(sweep_mod, 'classify_batch_attended', None)
    cli_out = out / 'cli'
    assert main(['eval', str(bag), '--methods', 'sage', '--budgets', '16', '--eta', '1', '--weights', 'random',
                 *SERVER_ARGS, '--second-round', 'roi', '--second-k', '0', '--cache', str(out / 'cache.sqlite'),
                 '--out', str(cli_out), '--limit', '3', '--no-progress']) == 0
    with open(cli_out / 'results.csv', newline='') as fh:
        rows = list(csv.DictReader(fh))
    sage = _pick(rows, method='sage')[0]
    two = _pick(rows, method=sweep_mod.TWO_ROUND)
    assert len(two) == 1 and two[0]['frames'] == '3' and two[0]['second_k'] == '0'
    for key in ('offloaded_accuracy', 'mean_bytes', 'max_bytes', 'mean_patches', 'coverage_7x7'):
        assert two[0][key] == sage[key]


def test_the_readme_two_round_command_runs(bag, tmp_path):
    """The README's `eval --second-round` line (README.md or docs/*.md: the evaluation protocol is
    docs/evaluation.md), as written, on this bag (first 3 frames; the server model as in this
    module's other sweeps)."""
    repo = Path(__file__).resolve().parents[2]
    readme = '\n'.join(p.read_text() for p in [repo / 'README.md', *sorted((repo / 'docs').glob('*.md'))])
    line = re.search(r'\./dev sage-ros eval (\S+) (.*?) \\\n\s+(--second-round .*?)\s+#', readme)
    assert line, 'no eval --second-round command in the README'
    argv = f'{line.group(2)} {line.group(3)}'.split()
    out = argv[argv.index('--out') + 1]
    argv[argv.index('--out') + 1] = str(tmp_path / 'sweep')
    assert out.startswith('/tmp/')
    assert main(['eval', str(bag), *argv, *SERVER_ARGS, '--limit', '3', '--no-progress']) == 0
    with open(tmp_path / 'sweep' / 'results.csv', newline='') as fh:
        two = _pick(list(csv.DictReader(fh)), method=sweep_mod.TWO_ROUND)
    # continue, roi x K 16, 32 x eta_cloud 2, 3 x B 32, 48, 64, each on 3 frames
    assert len(two) == 24 and all(r['frames'] == '3' and r['budget_violations'] == '0' for r in two)
