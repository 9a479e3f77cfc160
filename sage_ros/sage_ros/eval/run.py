# SPDX-License-Identifier: Apache-2.0
"""The whole ``sage-ros eval`` job: sweep, then CSV, Markdown and plots in one folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from sage_ros.eval.report import write_csv, write_markdown, write_plots
from sage_ros.eval.sweep import SweepConfig, rows, run_sweep
from sage_ros.params import method_params


def sweep_config(edge: dict[str, Any], cloud: dict[str, Any], *, methods: Sequence[str], budgets: Sequence[int],
                 etas: Sequence[float], codecs: Sequence[str], quality: int | None = None,
                 prefilter_ratios: Sequence[float] = (2.0,), limit: int = 0, second_rounds: Sequence[str] = (),
                 second_ks: Sequence[int] | None = None, eta_clouds: Sequence[float] | None = None) -> SweepConfig:
    """A SweepConfig whose models, weights and method parameters come from the node parameters;
    two rounds stay within sage_edge's budget_max, roi with sage_cloud's roi_count regions.
    ``second_ks`` / ``eta_clouds`` None: SweepConfig's defaults."""
    return SweepConfig(
        methods=list(methods), budgets=list(budgets), etas=list(etas), codecs=list(codecs),
        quality=int(edge['jpeg_quality'] if quality is None else quality), prefilter_ratios=list(prefilter_ratios),
        gate_metric=edge['gate_metric'], edge_model=edge['model'], server_model=cloud['model'],
        edge_weights=edge['weights'], server_weights=cloud['weights'], crop_pct=float(edge['crop_pct']),
        embedding_source=edge['embedding_source'], seed=int(edge['seed']),
        method_params=method_params(edge),
        limit=limit, second_rounds=list(second_rounds),
        second_ks=list(SweepConfig.second_ks if second_ks is None else second_ks),
        eta_clouds=list(SweepConfig.eta_clouds if eta_clouds is None else eta_clouds),
        budget_max=int(edge['budget_max']), roi_count=int(cloud['roi_count']),
    )


def run_eval(bag: Path, cfg: SweepConfig, out_dir: Path, *, cache_path: Path | None = None, progress: bool = True,
             emit: Callable[[str], None] = print, figures: int = 0) -> dict[str, Path]:
    """Sweep ``bag`` and write results.csv, results.md and the plots into ``out_dir``; with
    ``figures``, that many offloaded frames with each method's patches drawn (figures/)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = run_sweep(bag, cfg, cache_path=cache_path or out_dir / 'cache.sqlite', progress=progress, emit=emit)
    table = rows(data)
    paths = {'csv': out_dir / 'results.csv', 'markdown': out_dir / 'results.md'}
    write_csv(table, paths['csv'])
    write_markdown(table, data, paths['markdown'])
    for p in write_plots(table, data, out_dir):
        paths[p.stem] = p
    if figures:
        from sage_ros.eval.figures import write_figures

        for p in write_figures(data, out_dir / 'figures', figures):
            paths[p.stem] = p
    emit(f'{len(table)} rows; wall time {data.seconds["total"]:.1f} s; wrote ' + ', '.join(str(p) for p in paths.values()))
    return paths
