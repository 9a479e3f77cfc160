# SPDX-License-Identifier: Apache-2.0
"""The whole ``sage-ros eval`` job: sweep, then CSV, Markdown and plots in one folder.

An output folder holds one sweep. Its settings are recorded there (``sweep.json``): a rerun with
the same settings resumes or repeats it and replaces its reports, a run with other settings is
refused, so results are never silently replaced by another sweep's. Files a run wrote and the
next does not (figures/) are removed: nothing stale sits beside new results.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from sage_ros.eval.bags import bag_fingerprint
from sage_ros.eval.report import write_csv, write_markdown, write_plots
from sage_ros.eval.sweep import SweepConfig, rows, run_sweep
from sage_ros.params import method_params
from sage_ros.core.preflight import check_weights

MANIFEST = 'sweep.json'
REPORTS = ('results.csv', 'results.md')


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


def sweep_settings(bag: Path, cfg: SweepConfig) -> dict[str, Any]:
    """What a sweep's results depend on, as JSON values: the bag's content and every setting."""
    fields = dataclasses.asdict(cfg)
    del fields['batch']  # how many frames share a forward: the results do not depend on it
    return json.loads(json.dumps({'bag': bag_fingerprint(bag), **fields}, default=str))


def _shown(value: Any) -> str:
    return ','.join(map(str, value)) if isinstance(value, list) else str(value)


def claim_output(out_dir: Path, settings: dict[str, Any]) -> list[str]:
    """Check that ``out_dir`` may take the results of a sweep with ``settings``: new, or holding
    the same sweep. Returns the files its last run wrote (relative), to be replaced. Raises
    FileExistsError, one line naming the settings that differ, for another sweep's folder."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        try:
            held = json.loads(manifest.read_text())
            old, outputs = held['settings'], list(held['outputs'])
        except (ValueError, KeyError, TypeError):
            raise FileExistsError(f'{manifest} is not a sweep record; give another --out') from None
        if old == settings:
            return outputs
        diff = [k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)]
        shown = '; '.join('the bag differs' if k == 'bag' else
                          f'{k} {_shown(old.get(k))} there, {_shown(settings.get(k))} now' for k in diff[:3])
        more = f' (and {len(diff) - 3} more)' if len(diff) > 3 else ''
        raise FileExistsError(f'{out_dir} holds a sweep with other settings ({shown}{more}); give another --out '
                              f'(--cache {out_dir / "cache.sqlite"} reuses its model outputs) or remove it')
    found = [name for name in REPORTS if (out_dir / name).exists()]
    if found:
        raise FileExistsError(f'{out_dir} holds {", ".join(found)} of a sweep whose settings are not recorded; '
                              'give another --out or remove them')
    return []


def _record(out_dir: Path, settings: dict[str, Any], outputs: Sequence[str]) -> None:
    (out_dir / MANIFEST).write_text(json.dumps({'settings': settings, 'outputs': list(outputs)}, indent=1) + '\n')


def _remove(out_dir: Path, outputs: Sequence[str]) -> None:
    """The files a previous run wrote, and the folders they leave empty (figures/)."""
    inside = out_dir.resolve()
    for name in outputs:
        path = out_dir / name
        if not path.resolve().is_relative_to(inside):  # a hand-edited record never reaches outside
            continue
        path.unlink(missing_ok=True)
        if path.parent != out_dir and path.parent.is_dir() and not any(path.parent.iterdir()):
            path.parent.rmdir()


def run_eval(bag: Path, cfg: SweepConfig, out_dir: Path, *, cache_path: Path | None = None, progress: bool = True,
             emit: Callable[[str], None] = print, figures: int = 0) -> dict[str, Path]:
    """Sweep ``bag`` and write results.csv, results.md and the plots into ``out_dir``; with
    ``figures``, that many offloaded frames with each method's patches drawn (figures/).

    Everything that can be checked is checked before a model loads or ``out_dir`` is made: the
    bag, the weights files, the folder (see the module doc)."""
    if figures < 0:
        raise ValueError(f'figures must be >= 0, got {figures}')
    settings = sweep_settings(bag, cfg)  # reads the bag: a missing one fails here
    check_weights('sage_edge weights', cfg.edge_weights)
    check_weights('sage_cloud weights', cfg.server_weights)
    previous = claim_output(out_dir, settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Recorded now: an interrupted run is resumed by the same command, and refused to others.
    _record(out_dir, settings, previous)
    data = run_sweep(bag, cfg, cache_path=cache_path or out_dir / 'cache.sqlite', progress=progress, emit=emit)
    table = rows(data)
    _remove(out_dir, previous)
    paths = {'csv': out_dir / REPORTS[0], 'markdown': out_dir / REPORTS[1]}
    write_csv(table, paths['csv'])
    write_markdown(table, data, paths['markdown'])
    for p in write_plots(table, data, out_dir):
        paths[p.stem] = p
    if figures:
        from sage_ros.eval.figures import write_figures

        for p in write_figures(data, out_dir / 'figures', figures):
            paths[p.stem] = p
    _record(out_dir, settings, [str(p.relative_to(out_dir)) for p in paths.values()])
    emit(f'{len(table)} rows; wall time {data.seconds["total"]:.1f} s; wrote ' + ', '.join(str(p) for p in paths.values()))
    return paths
