# SPDX-License-Identifier: Apache-2.0
"""Sweep results as CSV, Markdown tables laid out like the SAGE paper's, and PNG plots."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

matplotlib.use('Agg')  # files only; no display here or on a robot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from sage_ros.eval.sweep import CEILING, EQUAL_BYTES, FRAME_JPEG, TWO_ROUND, SweepData  # noqa: E402

CSV_COLUMNS = (
    'method', 'budget', 'eta', 'codec', 'quality', 'prefilter_ratio', 'offloaded_accuracy', 'overall_accuracy',
    'edge_accuracy', 'offload_rate', 'offloaded', 'answered', 'mean_patches', 'max_patches', 'mean_bytes',
    'max_bytes', 'coverage_7x7', 'budget_violations', 'truncated', 'acc_low_attention_entropy',
    'acc_high_attention_entropy', 'frames', 'edge_weights', 'server_weights',
    # Two-round rows only (method sage_two_round; offloaded_accuracy is then after round two).
    'second_round', 'second_k', 'eta_cloud', 'round1_accuracy', 'second_round_share',
)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    with path.open('w', newline='') as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS, extrasaction='ignore')
        w.writeheader()
        w.writerows(rows)


def _pct(v: float) -> str:
    return '–' if v is None or (isinstance(v, float) and math.isnan(v)) else f'{100 * v:.1f}'


def _main_rows(rows: Sequence[dict[str, Any]], data: SweepData, eta: float) -> list[dict[str, Any]]:
    codec, k = data.config.codecs[0], 2.0
    main = [r for r in rows if r['eta'] == eta and r['codec'] == codec and r['prefilter_ratio'] == k
            and r['method'] not in (CEILING, FRAME_JPEG, TWO_ROUND)]
    # A display-only cell for the attention-entropy table.
    return [{**r, 'attention_entropy_split': f'{_pct(r["acc_low_attention_entropy"])} / '
                                             f'{_pct(r["acc_high_attention_entropy"])}'} for r in main]


def _two_round_rows(rows: Sequence[dict[str, Any]], eta: float) -> list[dict[str, Any]]:
    return [r for r in rows if r['eta'] == eta and r['method'] == TWO_ROUND]


def _curves(rows: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Two-round rows by (mode, K, eta_cloud), each over budgets in order."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for r in sorted(rows, key=lambda r: r['budget']):
        out.setdefault((r['second_round'], r['second_k'], r['eta_cloud']), []).append(r)
    return out


def _table(rows: list[dict[str, Any]], methods: Sequence[str], budgets: Sequence[int], key: str,
           fmt: Any = _pct) -> list[str]:
    cell = {(r['method'], r['budget']): r[key] for r in rows}
    lines = ['| method | ' + ' | '.join(f'B={b}' for b in budgets) + ' |',
             '|---|' + '---|' * len(budgets)]
    for m in methods:
        lines.append(f'| {m} | ' + ' | '.join(fmt(cell.get((m, b), math.nan)) for b in budgets) + ' |')
    return lines


def write_markdown(rows: Sequence[dict[str, Any]], data: SweepData, path: Path) -> None:
    cfg = data.config
    random = data.edge_weights.startswith('random') or data.server_weights.startswith('random')
    out = [
        '# SAGE offloading sweep',
        '',
        f'- bag: `{data.bag}` ({len(data.edge)} frames)',
        f'- edge: {cfg.edge_model}, weights `{data.edge_weights}`; server: {cfg.server_model}, '
        f'weights `{data.server_weights}`',
        f'- gate: {cfg.gate_metric} >= eta; codec {cfg.codecs[0]} (q={cfg.quality}); SAGE k=2',
    ]
    if random:
        out += ['', '**Random weights: every accuracy below is meaningless (chance level). The counts, '
                    'bytes, budgets and coverage are real.**']
    for eta in cfg.etas:
        main = _main_rows(rows, data, eta)
        ref = {r['method']: r for r in rows if r['eta'] == eta and r['method'] in (CEILING, FRAME_JPEG)}
        any_row = main[0] if main else next(iter(ref.values()), None)
        out += ['', f'## eta = {eta:g}', '']
        if any_row:
            out += [f'Offloaded: {any_row["offloaded"]} of {any_row["frames"]} frames '
                    f'({_pct(any_row["offload_rate"])}%). Edge-only accuracy: {_pct(any_row["edge_accuracy"])}%.']
        if CEILING in ref:
            out += [f'Server ceiling (all 196 patches): offloaded accuracy {_pct(ref[CEILING]["offloaded_accuracy"])}%.']
        if FRAME_JPEG in ref:
            r = ref[FRAME_JPEG]
            out += [f'Whole frame as JPEG q={r["quality"]}: {r["mean_bytes"]:.0f} B per request, offloaded '
                    f'accuracy {_pct(r["offloaded_accuracy"])}%.']
        out += ['', '### Offloaded accuracy (%) (cf. Table III)', '',
                f'`{EQUAL_BYTES}`: the whole frame as one JPEG of at most the bytes of the same frame\'s '
                'SAGE request at that B (highest quality that fits, downscaled if quality 5 does not).', '']
        out += _table(main, [*cfg.methods, EQUAL_BYTES], cfg.budgets, 'offloaded_accuracy')
        out += ['', '### Overall accuracy (%)', '']
        out += _table(main, cfg.methods, cfg.budgets, 'overall_accuracy')
        out += ['', '### 7x7 coverage (%) (cf. Table II)', '']
        out += _table(main, cfg.methods, cfg.budgets, 'coverage_7x7')
        out += ['', '### Mean bytes per offloaded request', '']
        out += _table(main, [*cfg.methods, EQUAL_BYTES], cfg.budgets, 'mean_bytes',
                      fmt=lambda v: '–' if isinstance(v, float) and math.isnan(v) else f'{v:.0f}')
        out += ['', '### Budget violations (must be 0)', '']
        out += _table(main, cfg.methods, cfg.budgets, 'budget_violations', fmt=str)
        out += ['', '### Offloaded accuracy (%) by attention entropy: low / high half', '']
        out += _table(main, cfg.methods, cfg.budgets, 'attention_entropy_split', fmt=str)
        ks = sorted({r['prefilter_ratio'] for r in rows if r['method'] == 'sage'})
        if len(ks) > 1:
            out += ['', '### SAGE prefilter ratio k: offloaded accuracy (%)', '',
                    '| k | ' + ' | '.join(f'B={b}' for b in cfg.budgets) + ' |', '|---|' + '---|' * len(cfg.budgets)]
            for k in ks:
                sel = {r['budget']: r for r in rows if r['method'] == 'sage' and r['prefilter_ratio'] == k
                       and r['eta'] == eta and r['codec'] == cfg.codecs[0]}
                out.append(f'| {k:g} | ' + ' | '.join(_pct(sel[b]['offloaded_accuracy']) if b in sel else '–'
                                                   for b in cfg.budgets) + ' |')
        two = _two_round_rows(rows, eta)
        if two:
            out += ['', '### Two-round evidence', '',
                    f'Round one is the SAGE request at B (k=2). When the server\'s min-entropy on it is >= eta_cloud '
                    f'(bits), the edge sends up to K more patches as a request of its own (continue: SAGE carried '
                    f'on from round one; roi: the unsent neighbours of the server\'s {cfg.roi_count} most attended '
                    f'patches), within budget_max = {cfg.budget_max} patches in all, and the server classifies '
                    f'both rounds together. Accuracies are on the offloaded frames (%); bytes and patches per '
                    f'offloaded frame, both rounds.', '',
                    '| round 2 | K | eta_cloud | B | after round 1 | after round 2 | second round (%) | '
                    'mean bytes | max bytes | mean patches |',
                    '|---|---|---|---|---|---|---|---|---|---|']
            for (mode, k, eta_c), curve in _curves(two).items():
                out += [f'| {mode} | {k} | {eta_c:g} | {r["budget"]} | {_pct(r["round1_accuracy"])} | '
                        f'{_pct(r["offloaded_accuracy"])} | {_pct(r["second_round_share"])} | '
                        f'{r["mean_bytes"]:.0f} | {r["max_bytes"]} | {r["mean_patches"]:.1f} |' for r in curve]
    out += ['', f'Wall time: {data.seconds.get("total", 0):.1f} s (edge pass and cache reads '
                f'{data.seconds.get("edge", 0):.1f} s).', '']
    path.write_text('\n'.join(out))


# A percentage axis whose values (nearly) coincide still shows this many points around them,
# not matplotlib's +-5 % of the value (nothing at all at 0).
_MIN_PERCENT_SPAN = 10.0


def _percent_range(ax: Any) -> None:
    """Keep a percentage axis readable when every value plotted is (about) the same."""
    ys = np.concatenate([np.asarray(line.get_ydata(), float) for line in ax.get_lines()] or [np.zeros(0)])
    ys = ys[np.isfinite(ys)]
    if ys.size and ys.max() - ys.min() >= 1.0:
        return
    mid = float(ys.mean()) if ys.size else 50.0
    lo = min(max(0.0, mid - _MIN_PERCENT_SPAN / 2), 100.0 - _MIN_PERCENT_SPAN)
    pad = 0.02 * _MIN_PERCENT_SPAN  # markers at 0 or 100 are shown whole
    ax.set_ylim(lo - pad, lo + _MIN_PERCENT_SPAN + pad)


def plots(rows: Sequence[dict[str, Any]], data: SweepData) -> dict[str, Figure]:
    """The report's plots by file name: accuracy and coverage vs the budget, accuracy vs bytes.
    Each says its weights and frames; the legend sits beside the axes, never on the data."""
    cfg = data.config
    eta = cfg.etas[0]
    main = _main_rows(rows, data, eta)
    ref = {r['method']: r for r in rows if r['eta'] == eta and r['method'] in (CEILING, FRAME_JPEG)}
    any_row = main[0] if main else next(iter(ref.values()), None)
    offloaded = f', {any_row["offloaded"]} offloaded at eta={eta:g}' if any_row else f', eta={eta:g}'
    title = (f'{len(data.edge)} frames{offloaded}; {cfg.codecs[0]}\n'
             f'weights: edge {data.edge_weights}, server {data.server_weights}')
    budgets = sorted(set(cfg.budgets))
    figs = {}

    def series(method: str, x: str, y: str) -> tuple[list, list]:
        pts = sorted((r[x], r[y]) for r in main if r['method'] == method)
        return [p[0] for p in pts], [100 * p[1] for p in pts]

    for name, x, y, xlabel, ylabel in (
        ('accuracy_vs_budget.png', 'budget', 'offloaded_accuracy', 'budget B (patches)', 'offloaded accuracy (%)'),
        ('accuracy_vs_bytes.png', 'mean_bytes', 'offloaded_accuracy', 'mean bytes per request', 'offloaded accuracy (%)'),
        ('coverage_vs_budget.png', 'budget', 'coverage_7x7', 'budget B (patches)', '7x7 coverage (%)'),
    ):
        fig, ax = plt.subplots(figsize=(7.5, 4))
        for m in cfg.methods:
            xs, ys = series(m, x, y)
            ax.plot(xs, ys, marker='o', label=m)
        if x == 'mean_bytes':
            xs, ys = series(EQUAL_BYTES, x, y)
            ax.plot(xs, ys, marker='s', color='black', ls=':', label='whole frame, equal bytes')
            for n, ((mode, k, eta_c), curve) in enumerate(_curves(_two_round_rows(rows, eta)).items()):
                ax.plot([r[x] for r in curve], [100 * r[y] for r in curve], marker='^v<>DPX'[n % 7], ls='--',
                        label=f'SAGE + {mode} K={k}, eta_cloud={eta_c:g}')
        if y == 'offloaded_accuracy' and CEILING in ref:
            ax.axhline(100 * ref[CEILING]['offloaded_accuracy'], color='grey', ls='--', label='all 196 patches')
        if x == 'mean_bytes' and FRAME_JPEG in ref:
            r = ref[FRAME_JPEG]
            ax.plot([r['mean_bytes']], [100 * r['offloaded_accuracy']], marker='*', ms=14, ls='',
                    color='black', label=f'whole frame JPEG q={r["quality"]}')
        if x == 'budget':
            ax.set_xticks(budgets, [str(b) for b in budgets])
        _percent_range(ax)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        fig.tight_layout()
        figs[name] = fig
    return figs


def write_plots(rows: Sequence[dict[str, Any]], data: SweepData, out_dir: Path) -> list[Path]:
    paths = []
    for name, fig in plots(rows, data).items():
        path = out_dir / name
        fig.savefig(path, dpi=110, bbox_inches='tight')  # the legend beside the axes included
        plt.close(fig)
        paths.append(path)
    return paths
