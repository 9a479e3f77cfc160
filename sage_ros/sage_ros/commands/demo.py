# SPDX-License-Identifier: Apache-2.0
"""``sage-ros demo``: the core end to end on real images, frame by frame."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from sage_ros.core import Budget, classify_patches, load_vit
from sage_ros.core.models import load_edge_model
from sage_ros.core.labels import class_name
from sage_ros.core.pipeline import EdgePipeline
from sage_ros.commands.images import format_skipped
from sage_ros.params import gate_config, selection_config, starting_budget


@dataclass(frozen=True)
class DemoFrame:
    """What the demo decided for one image."""

    name: str
    truth: int | None
    edge_label: int
    edge_conf: float
    score: float
    offloaded: bool
    indices: np.ndarray
    num_bytes: int
    coverage_7x7: float
    server_label: int | None
    server_conf: float | None
    edge_ms: float
    server_ms: float

    @property
    def final_label(self) -> int:
        return self.server_label if self.server_label is not None else self.edge_label


def run_demo(
    frames: Iterable[tuple[str, np.ndarray, int | None]],
    edge_params: dict[str, Any],
    cloud_params: dict[str, Any],
    *,
    emit: Callable[[str], None] = print,
    on_frame: Callable[[DemoFrame], None] | None = None,
    skipped: Sequence[str] = (),
) -> list[DemoFrame]:
    """Classify ``frames`` (name, RGB, label) on the edge, offload the uncertain ones with the
    core library in this process, print a line per frame and a summary. ``skipped``: names of
    images that could not be read (filled while ``frames`` is read), counted in the summary."""
    edge_model = load_edge_model(edge_params['model'], edge_params['weights'], runtime=edge_params['runtime'],
                                 device=edge_params['device'], num_threads=int(edge_params['num_threads']),
                                 int8=bool(edge_params['int8']))
    edge = edge_model.card
    server_vit = load_vit(cloud_params['model'], cloud_params['weights'], device=cloud_params['device'])
    if edge.random_weights or server_vit.random_weights:
        emit(f'NOTE: random weights (edge {edge.weights}, server {server_vit.weights}): '
             'labels and confidences are meaningless; the mechanics are real.')
    # The budget the live edge node starts with (auto mode: the controller's start, budget_max):
    # offline there is no link to adapt to, so every frame gets it.
    budget = Budget(starting_budget(edge_params), int(edge_params['byte_budget']))
    config = selection_config(edge_params)
    gate = gate_config(edge_params)
    pipeline = EdgePipeline(edge_model)
    emit(f'edge {edge.name} ({edge_model.runtime}) | server {server_vit.name} | '
         f'gate {gate.gate_metric} >= {gate.eta} | method {config.method} B={budget.patches} | codec {config.encoding}')
    done = []
    for name, rgb, truth in frames:
        d = pipeline.analyze(rgb, gate)
        indices, nbytes, cov, s_label, s_conf, server_ms = np.empty(0, np.int64), 0, 0.0, None, None, 0.0
        if d.offload:
            plan = pipeline.plan(d, budget, config)
            t1 = time.perf_counter()
            probs = classify_patches(server_vit, plan.payload, plan.encoding, plan.indices)
            server_ms = (time.perf_counter() - t1) * 1e3
            s_label, s_conf = int(np.argmax(probs)), float(probs.max())
            indices, nbytes, cov = plan.indices, plan.num_bytes, plan.coverage_7x7
        frame = DemoFrame(name, truth, d.label, d.confidence, d.score, d.offload, indices,
                          nbytes, cov, s_label, s_conf, d.forward_s * 1e3, server_ms)
        done.append(frame)
        if on_frame:
            on_frame(frame)
        emit(format_frame(frame, gate.gate_metric))
    emit(format_summary(done, skipped))
    return done


def format_frame(f: DemoFrame, metric: str) -> str:
    head = (f'{f.name:<28} edge: {class_name(f.edge_label)!r} ({f.edge_conf:.3f}) {metric}={f.score:.2f} bits '
            f'[{f.edge_ms:.0f} ms]')
    if not f.offloaded:
        return f'{head} -> keep edge label'
    idx = ', '.join(str(i) for i in f.indices[:8]) + (', ...' if f.indices.size > 8 else '')
    return (f'{head} -> OFFLOAD {f.indices.size} patches [{idx}] {f.num_bytes} B, cov7x7 {f.coverage_7x7:.2f}; '
            f'server: {class_name(f.server_label)!r} ({f.server_conf:.3f}) [{f.server_ms:.0f} ms]')


def format_summary(frames: list[DemoFrame], skipped: Sequence[str] = ()) -> str:
    n = len(frames)
    off = [f for f in frames if f.offloaded]
    lines = [f'summary: {n} frames, {len(off)} offloaded ({100.0 * len(off) / max(n, 1):.0f}%)']
    if skipped:
        lines.append(format_skipped(skipped))
    if off:
        b = np.array([f.num_bytes for f in off])
        p = np.array([f.indices.size for f in off])
        lines.append(f'  per offloaded request: patches mean {p.mean():.1f} max {p.max()}, '
                     f'bytes mean {b.mean():.0f} max {b.max()}')
        lines.append(f'  server forward mean {np.mean([f.server_ms for f in off]):.0f} ms; '
                     f'edge forward mean {np.mean([f.edge_ms for f in frames]):.0f} ms')
    labeled = [f for f in frames if f.truth is not None]
    if labeled:
        acc = np.mean([f.final_label == f.truth for f in labeled])
        edge_acc = np.mean([f.edge_label == f.truth for f in labeled])
        lines.append(f'  accuracy on {len(labeled)} labelled frames: final {acc:.3f}, edge only {edge_acc:.3f}')
    return '\n'.join(lines)
