# SPDX-License-Identifier: Apache-2.0
"""Offline evaluation mechanics (random weights: accuracies are meaningless, counts are not).

The server model is DeiT-Tiny (its own seed) rather than DeiT-Base: the sweep's mechanics are
what is tested, and a server forward then costs a fifteenth."""

from __future__ import annotations

import csv

import numpy as np
import pytest

import sage_ros.eval.sweep as sweep_mod
from sage_ros.cli import main
from sage_ros.core import Budget, EdgeOutput, SelectionConfig, classify_patches, load_vit, plan_offload, resize_crop
from sage_ros.eval.bags import labeled_images_from_folder, read_image_bag, read_results_bag, write_image_bag
from sage_ros.eval.cache import EvalCache
from sage_ros.eval.replay import replay_offline
from sage_ros.eval.report import CSV_COLUMNS
from sage_ros.eval.run import run_eval, sweep_config
from sage_ros.params import load_params

METHODS = ['sage', 'attention_topk', 'random', 'uniform_grid', 'attention_threshold']
BUDGETS = [16, 48]
SERVER = {'sage_cloud.model': 'deit_tiny_patch16_224', 'sage_cloud.weights': 'random:1'}
SERVER_ARGS = [arg for k, v in SERVER.items() for arg in ('-p', f'{k}:={v}')]


@pytest.fixture(scope='module')
def bag(imagenet_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp('bags') / 'eight'
    write_image_bag(labeled_images_from_folder(imagenet_dir / 'images', limit=8), path)
    return path


def config(**kw):
    ov = {'weights': 'random', 'delta': 0.004, **SERVER}
    edge, cloud = load_params('sage_edge', overrides=ov), load_params('sage_cloud', overrides=ov)
    args = {'methods': METHODS, 'budgets': BUDGETS, 'etas': [1.0, 20.0], 'codecs': ['jpeg'],
            'prefilter_ratios': [1.0, 2.0], **kw}
    return sweep_config(edge, cloud, **args)


def read_csv(path):
    with open(path, newline='') as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope='module')
def swept(bag, tmp_path_factory):
    out = tmp_path_factory.mktemp('eval')
    paths = run_eval(bag, config(), out, progress=False, emit=lambda s: None)
    return out, paths, read_csv(paths['csv'])


def test_sweep_rows_budgets_and_reference_rows(swept):
    out, paths, rows = swept
    assert tuple(rows[0]) == CSV_COLUMNS
    methods = {r['method'] for r in rows}
    assert methods == set(METHODS) | {'all_patches', 'frame_jpeg', 'frame_equal_bytes'}
    # 5 methods x 2 budgets + SAGE with k=1 at 2 budgets + equal bytes at 2 budgets + 2
    # references, at each of 2 etas.
    assert len(rows) == (5 * 2 + 2 + 2 + 2) * 2
    for r in rows:
        assert int(r['budget_violations']) == 0
        assert int(r['max_patches']) <= int(r['budget']) or r['method'] == 'frame_equal_bytes'
        assert r['edge_weights'] == 'random:0' and int(r['frames']) == 8
    at1 = [r for r in rows if float(r['eta']) == 1.0]
    at20 = [r for r in rows if float(r['eta']) == 20.0]
    # Random weights are never confident: all 8 offloaded at eta=1, none at eta=20 (> log2(1000)).
    assert all(float(r['offload_rate']) == 1.0 and int(r['answered']) == 8 for r in at1)
    assert all(float(r['offload_rate']) == 0.0 and r['overall_accuracy'] == r['edge_accuracy'] for r in at20)
    grid48 = next(r for r in at1 if r['method'] == 'uniform_grid' and r['budget'] == '48')
    # 48 patches can cover at most 48 of the 49 cells: the grid reaches that on every frame.
    assert float(grid48['coverage_7x7']) == pytest.approx(48 / 49) and int(grid48['max_patches']) == 48
    ceiling = next(r for r in at1 if r['method'] == 'all_patches')
    assert int(ceiling['max_patches']) == 196 and int(ceiling['max_bytes']) == 196 * 768
    thr = next(r for r in at1 if r['method'] == 'attention_threshold' and r['budget'] == '16')
    assert int(thr['truncated']) > 0  # delta=0.004 wants more than 16 patches on these frames
    # k=1: SAGE sends the attention prefix's patches, so the same coverage.
    sage_k1 = next(r for r in at1 if r['method'] == 'sage' and r['budget'] == '48' and r['prefilter_ratio'] == '1.0')
    prefix = next(r for r in at1 if r['method'] == 'attention_topk' and r['budget'] == '48')
    assert sage_k1['coverage_7x7'] == prefix['coverage_7x7']


def test_equal_bytes_frames_never_exceed_the_sage_request_of_the_same_frame_and_budget(swept):
    out, _, _ = swept
    with EvalCache(out / 'cache.sqlite') as cache:
        ctx = next(iter(cache.server_contexts()))
        for b in BUDGETS:
            sage = cache.server(ctx, sweep_mod.Setting('sage', b, 'jpeg', 90).key)
            equal = cache.server(ctx, sweep_mod.Setting(sweep_mod.EQUAL_BYTES, b, 'jpeg', 90).key)
            assert sage and set(equal) == set(sage)
            for frame, rec in equal.items():
                assert 0 < rec.bytes <= sage[frame].bytes and rec.patches == 196


def test_encode_frame_within_takes_the_best_quality_then_downscales(real_images):
    from sage_ros.eval.frame_jpeg import encode_frame_within

    crop, _ = resize_crop(real_images[0])
    big, mid, tiny = (encode_frame_within(crop, n) for n in (60_000, 4_000, 700))
    assert big.quality == 95 and big.scale == 1.0 and big.num_bytes <= 60_000
    assert mid.num_bytes <= 4_000 and mid.quality < big.quality
    assert tiny.num_bytes <= 700 and tiny.quality == 5 and tiny.scale < 1.0
    assert tiny.decoded.shape == crop.shape  # the server always sees a full-size frame
    assert encode_frame_within(crop, 50) is None


def test_reports_state_the_weights_and_plots_are_pngs(swept):
    out, paths, _ = swept
    md = paths['markdown'].read_text()
    assert 'weights `random:0`' in md and 'Random weights' in md
    assert '(cf. Table III)' in md and '(cf. Table II)' in md and 'prefilter ratio k' in md
    for name in ('accuracy_vs_budget', 'accuracy_vs_bytes', 'coverage_vs_budget'):
        assert paths[name].read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_cached_server_answers_are_what_the_core_computes(swept, bag, tiny):
    out, _, _ = swept
    cfg = config()
    frame = next(read_image_bag(bag))
    crop = resize_crop(frame.rgb, crop_pct=tiny.crop_pct)[0]
    with EvalCache(out / 'cache.sqlite') as cache:
        ctx = cache._db.execute('SELECT DISTINCT ctx FROM server').fetchone()[0]
        edge_ctx = cache._db.execute('SELECT DISTINCT ctx FROM edge').fetchone()[0]
        rec = next(r for r in cache.edge(edge_ctx) if r.idx == frame.index)
        got = cache.server(ctx, 'sage|B48|jpeg90|k2')[frame.index]
    plan = plan_offload(crop, EdgeOutput(np.empty(0), np.empty(0), rec.attention, rec.embeddings), Budget(48),
                        SelectionConfig(method='sage', encoding='jpeg', quality=cfg.quality))
    server = load_vit(SERVER['sage_cloud.model'], SERVER['sage_cloud.weights'])
    probs = classify_patches(server, plan.payload, 'jpeg', plan.indices)
    assert got.patches == plan.indices.size and got.bytes == plan.num_bytes
    assert got.label in np.argsort(-probs)[:3]  # batched vs single forward: near-ties may swap


def test_interrupted_sweep_resumes_and_matches(bag, tmp_path, monkeypatch, swept):
    calls = {'n': 0}
    real = sweep_mod.server_forward_subset

    def flaky(*a, **kw):
        calls['n'] += 1
        if calls['n'] == 3:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(sweep_mod, 'server_forward_subset', flaky)
    with pytest.raises(KeyboardInterrupt):
        run_eval(bag, config(), tmp_path, progress=False, emit=lambda s: None)
    with EvalCache(tmp_path / 'cache.sqlite') as cache:
        partial = cache._db.execute('SELECT COUNT(*) FROM server').fetchone()[0]
    assert partial > 0  # work before the interruption was kept
    calls['n'] = -10**9
    paths = run_eval(bag, config(), tmp_path, progress=False, emit=lambda s: None)
    resumed_calls = calls['n'] + 10**9
    assert read_csv(paths['csv']) == swept[2]  # same results as the uninterrupted sweep
    calls['n'] = -10**9
    run_eval(bag, config(), tmp_path, progress=False, emit=lambda s: None)
    assert calls['n'] + 10**9 == 0  # a complete cache needs no server pass
    assert resumed_calls > 0


def test_replay_offline_records_one_result_per_frame(bag, tmp_path):
    edge = load_params('sage_edge', overrides={'weights': 'random'})
    cloud = load_params('sage_cloud', overrides={'weights': 'random', **SERVER})
    done = replay_offline(bag, edge, cloud, out=tmp_path / 'res', limit=5, emit=lambda s: None)
    results = read_results_bag(tmp_path / 'res')
    stamps = [f.stamp_ns for f in read_image_bag(bag, limit=5)]
    assert len(done) == len(results) == 5
    assert [r.header.stamp.sec * 10**9 + r.header.stamp.nanosec for r in results] == stamps
    # Auto mode, as live: the controller's starting budget (budget_max), not the fixed-mode budget.
    assert all(r.source == 1 and r.patches_sent == r.budget_patches == edge['budget_max'] and r.random_weights
               for r in results)


def test_eval_cli(bag, tmp_path, capsys):
    rc = main(['eval', str(bag), '--methods', 'sage,random', '--budgets', '16', '--weights', 'random',
               *SERVER_ARGS, '--out', str(tmp_path), '--limit', '3', '--no-progress'])
    assert rc == 0
    rows = read_csv(tmp_path / 'results.csv')
    assert {r['method'] for r in rows} == {'sage', 'random', 'all_patches', 'frame_jpeg', 'frame_equal_bytes'}
    assert all(r['frames'] == '3' for r in rows)
    assert main(['eval', str(bag), '--methods', 'telepathy', '--out', str(tmp_path)]) == 2


def test_figures_draw_prefix_sage_and_bat_on_offloaded_frames(bag, tmp_path):
    paths = run_eval(bag, config(methods=['sage', 'attention_topk', 'bat'], etas=[1.0], prefilter_ratios=[2.0]),
                     tmp_path, progress=False, emit=lambda s: None, figures=2)
    figs = sorted((tmp_path / 'figures').glob('figure_*.png'))
    assert len(figs) == 2 and all(f.read_bytes()[:4] == b'\x89PNG' for f in figs)
    assert {p.stem for p in figs} <= set(paths)
