# SPDX-License-Identifier: Apache-2.0
"""Pictures like the SAGE paper's Figure 4: which patches each method sends, on the frame."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from sage_ros.core.selection import coverage, select
from sage_ros.eval.bags import read_image_bag
from sage_ros.eval.sweep import SweepData, TwoRound, cloud_uncertainty, record_score

FIGURE_METHODS = ('attention_topk', 'sage', 'bat')
_LABELS = {'attention_topk': 'attention prefix', 'sage': 'SAGE', 'bat': 'BAT'}


def write_figures(data: SweepData, out_dir: Path, n: int, *, budget: int | None = None,
                  methods: Sequence[str] = FIGURE_METHODS) -> list[Path]:
    """PNGs of the first ``n`` offloaded frames with the patches of each method drawn on the
    model's input crop, and their 7x7 coverage in the caption. ``budget`` defaults to the
    sweep's smallest, where the methods differ most. With two-round settings, the first one (K > 0) at
    that budget: where the server asked for more, SAGE's round-two patches in cyan."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    from sage_ros.core import load_vit
    from sage_ros.core.pipeline import EdgePipeline

    cfg = data.config
    b = budget or min(cfg.budgets)
    eta = min(cfg.etas)
    scores = {r.idx: r for r in data.edge}
    wanted = [r.idx for r in data.edge if record_score(r, cfg.gate_metric) >= eta][:n]
    if not wanted:
        return []
    pipeline = EdgePipeline(load_vit(cfg.edge_model, cfg.edge_weights))
    params = {**cfg.method_params}
    two = next((t for t in data.two_round if t.budget == b and t.k > 0), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for frame in read_image_bag(data.bag, limit=max(wanted) + 1):
        if frame.index not in wanted:
            continue
        rec = scores[frame.index]
        crop, _ = pipeline.crop(frame.rgb, cfg.crop_pct)
        fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods), 3.6))
        for ax, method in zip(np.atleast_1d(axes), methods):
            idx = select(method, rec.attention, rec.embeddings, b, prefilter_ratio=2.0, seed=cfg.seed,
                         **params.get(method, {}))
            more = _round_two(data, two, frame.index) if method == 'sage' else np.empty(0, np.int64)
            ax.imshow(crop)
            for i, colour in [(i, 'yellow') for i in idx.tolist()] + [(i, 'cyan') for i in more.tolist()]:
                r, c = divmod(i, 14)
                ax.add_patch(Rectangle((c * 16 - 0.5, r * 16 - 0.5), 16, 16, fill=False, lw=1.2, ec=colour))
            extra = f'\n+{more.size} round 2 ({two.mode}, cyan)' if more.size else ''
            ax.set_title(f'{_LABELS.get(method, method)}: B={b}\n7x7 coverage {100 * coverage(idx):.0f} %{extra}',
                         fontsize=9)
            ax.axis('off')
        fig.suptitle(f'{frame.source or f"frame {frame.index}"} (weights {data.edge_weights})', fontsize=8)
        fig.tight_layout(rect=(0, 0, 1, 0.92))  # room for the title above the captions
        path = out_dir / f'figure_{frame.index:04d}.png'
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _round_two(data: SweepData, two: TwoRound | None, frame: int) -> np.ndarray:
    """The patches a second round added to ``frame`` under the two-round setting ``two``: none
    when there is no such setting or the server was sure enough on round one."""
    first = data.server[two.round_one.key].get(frame) if two else None
    if first is None or cloud_uncertainty(first) < two.eta_cloud:
        return np.empty(0, np.int64)
    return data.round_two.get(two.key, {}).get(frame, np.empty(0, np.int64))
