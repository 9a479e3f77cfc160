# SPDX-License-Identifier: Apache-2.0
"""``sage-ros bench --edge-runtimes``: the edge on torch, ONNX Runtime FP32 and ONNX Runtime
int8, at 1 and 2 threads, measured interleaved in one run (printed, not asserted).

Each runtime and thread count runs in a worker process of its own that imports only what that
edge imports, so its resident memory is that edge's (the pipeline without ROS). The workers
take turns frame by frame, one at a time, the order rotating each frame, so load from
elsewhere on the machine falls on all of them alike. Every worker runs the same frames through
:class:`~sage_ros.core.pipeline.EdgePipeline` and returns what it decided, so the run also
measures how far int8 drifts from torch: whether SAGE picks the same patches and the gate
makes the same decision.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

MODEL = 'deit_tiny_patch16_224'
THREADS = (1, 2)
BUDGETS = (16, 32, 64, 96)
# Targets of issue 18, compared with in the printout.
TARGET_FORWARD_RATIO = 0.8
TARGET_RSS_RATIO = 0.3
HEAVY_MODULES = ('torch', 'timm', 'torchvision')


def _worker(model: str, weights: str, threads: int, int8: bool) -> None:
    """Serve frames on stdin (JSON lines: {"path": ...} or {"quit": true}), answer on stdout."""
    from sage_ros.core.models import load_edge_model
    from sage_ros.core.pipeline import EdgePipeline
    from sage_ros.core.selection import select_detailed
    from sage_ros.commands.images import read_rgb
    from sage_ros.params import gate_config, load_params

    params = load_params('sage_edge')
    gate = gate_config(params)
    pipeline = EdgePipeline(load_edge_model(model, weights, num_threads=threads, int8=int8))
    warm = np.zeros((pipeline.card.input_size, pipeline.card.input_size, 3), np.uint8)
    for _ in range(3):
        pipeline.forward(warm)
    print(json.dumps({'ready': True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get('quit'):
            break
        rgb = read_rgb(Path(cmd['path']))
        t0 = time.perf_counter()
        crop, cmap = pipeline.crop(rgb, gate.crop_pct)
        t1 = time.perf_counter()
        edge = pipeline.forward(crop, gate.embedding_source)[0]
        t2 = time.perf_counter()
        decision = pipeline.decide(crop, cmap, edge, gate)
        t3 = time.perf_counter()
        sage = {b: select_detailed('sage', edge.attention, edge.embeddings, b,
                                   prefilter_ratio=float(params['prefilter_ratio'])).indices.tolist() for b in BUDGETS}
        print(json.dumps({'frame_ms': (t3 - t0) * 1e3, 'forward_ms': (t2 - t1) * 1e3, 'score': decision.score,
                          'probs': edge.probs.tolist(), 'attention': edge.attention.tolist(), 'sage': sage}),
              flush=True)
    from sage_ros.bench.robot import MB, rss_bytes

    print(json.dumps({'rss_mb': (rss_bytes(os.getpid()) or 0) / MB,
                      'heavy': sorted({m.split('.')[0] for m in sys.modules} & set(HEAVY_MODULES))}), flush=True)


@dataclass
class _Run:
    """One worker: a runtime at a thread count, and what it measured."""

    label: str
    threads: int
    weights: str
    int8: bool = False
    proc: subprocess.Popen | None = None
    frames: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def start(self, model: str) -> None:
        cmd = [sys.executable, '-m', 'sage_ros.bench.edge', '--model', model, '--weights', self.weights,
               '--threads', str(self.threads)] + (['--int8'] if self.int8 else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        if cmd:
            self.proc.stdin.write(json.dumps(cmd) + '\n')
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f'edge bench worker {self.label} ({self.threads} threads) exited '
                               f'with code {self.proc.wait()}')
        return json.loads(line)

    def median(self, key: str) -> float:
        return float(np.median([f[key] for f in self.frames]))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _agreement(ref: _Run, other: _Run, eta: float) -> dict[str, Any]:
    """How often ``other`` decided as ``ref`` did, frame by frame."""
    n = len(ref.frames)
    pairs = list(zip(ref.frames, other.frames))
    return {
        'sage_same_set': {b: sum(set(a['sage'][str(b)]) == set(c['sage'][str(b)]) for a, c in pairs) for b in BUDGETS},
        'sage_same_order': {b: sum(a['sage'][str(b)] == c['sage'][str(b)] for a, c in pairs) for b in BUDGETS},
        'gate_config': sum((a['score'] >= eta) == (c['score'] >= eta) for a, c in pairs),
        'probs_max_diff': max(float(np.abs(np.subtract(a['probs'], c['probs'])).max()) for a, c in pairs),
        'attention_max_diff': max(float(np.abs(np.subtract(a['attention'], c['attention'])).max()) for a, c in pairs),
        'n': n,
    }


def _median_split_agreement(ref: _Run, other: _Run) -> tuple[float, int]:
    """Gate agreement at the threshold that offloads half of ``ref``'s frames: where a small
    change of the score flips most decisions."""
    scores = np.sort([f['score'] for f in ref.frames])
    mid = len(scores) // 2
    eta = float(scores[mid - 1] + scores[mid]) / 2 if len(scores) > 1 else float(scores[0])
    return eta, sum((a['score'] >= eta) == (c['score'] >= eta) for a, c in zip(ref.frames, other.frames))


def run_edge_runtime_bench(images_dir: Path, *, n_images: int = 50, model: str = MODEL, weights: str = 'random',
                           threads: tuple[int, ...] = THREADS, emit: Callable[[str], None] = print) -> dict[str, float]:
    """Export the edge model, run the workers interleaved over ``n_images`` real images, print
    the comparison; returns the headline figures by name."""
    from sage_ros.core.onnx_export import export_edge
    from sage_ros.commands.images import list_images
    from sage_ros.params import load_params

    items = list_images(images_dir)
    if not items:
        raise FileNotFoundError(f'no images in {images_dir}')
    paths = [str(it.path) for it in items[:: max(1, len(items) // n_images)][:n_images]]
    eta = float(load_params('sage_edge')['eta'])
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix='sage_ros_edge_bench_') as tmp:
        t0 = time.perf_counter()
        exported = export_edge(model, weights, Path(tmp) / 'edge.onnx', int8=True)
        sizes = [p.stat().st_size / 1e6 for p in (exported.path, exported.int8_path)]
        emit(f'exported {model} ({exported.card.weights}) to ONNX in {time.perf_counter() - t0:.0f} s '
             f'(FP32 {sizes[0]:.0f} MB, int8 {sizes[1]:.0f} MB); load average {os.getloadavg()[0]:.1f} '
             f'on {os.cpu_count()} CPUs')
        runs = [r for t in threads for r in (_Run('torch', t, weights), _Run('onnxruntime fp32', t, str(exported.path)),
                                             _Run('onnxruntime int8', t, str(exported.int8_path), int8=True))]
        try:
            for r in runs:
                r.start(model)
            for r in runs:
                r.ask({})  # ready
            for i, path in enumerate(paths):
                for r in runs[i % len(runs):] + runs[: i % len(runs)]:
                    r.frames.append(r.ask({'path': path}))
            for r in runs:
                r.final = r.ask({'quit': True})
        finally:
            for r in runs:
                r.stop()
    _report(runs, threads, eta, len(paths), images_dir, emit, figures)
    return figures


def _report(runs: list[_Run], threads: tuple[int, ...], eta: float, n: int, images_dir: Path,
            emit: Callable[[str], None], figures: dict[str, float]) -> None:
    emit(f'edge per frame on {n} real images from {images_dir}, interleaved, one process per row: the edge '
         'pipeline without ROS (`sage-ros bench --robot` measures the nodes). Median ms; resident memory of the '
         'process after the run; x torch: ratio to torch at the same threads.')
    emit(f'  {"threads":<8}{"runtime":<18}{"forward ms":>11}{"x torch":>9}{"frame ms":>10}{"x torch":>9}'
         f'{"RSS MB":>8}{"x torch":>9}  imports')
    by_key = {(r.label, r.threads): r for r in runs}
    for t in threads:
        ref = by_key[('torch', t)]
        for r in (x for x in runs if x.threads == t):
            fwd, frame, rss = r.median('forward_ms'), r.median('frame_ms'), r.final['rss_mb']
            key = f'{r.label.replace(" ", "_")}_t{t}'
            figures.update({f'{key}_forward_ms': fwd, f'{key}_frame_ms': frame, f'{key}_rss_mb': rss,
                            f'{key}_forward_x_torch': fwd / ref.median('forward_ms'),
                            f'{key}_rss_x_torch': rss / ref.final['rss_mb']})
            emit(f'  {t:<8}{r.label:<18}{fwd:>11.1f}{fwd / ref.median("forward_ms"):>9.2f}{frame:>10.1f}'
                 f'{frame / ref.median("frame_ms"):>9.2f}{rss:>8.0f}{rss / ref.final["rss_mb"]:>9.2f}'
                 f'  {", ".join(r.final["heavy"]) or "no torch/timm"}')
    for t in threads:
        ratio = figures[f'onnxruntime_fp32_t{t}_forward_x_torch']
        rss_ratio = figures[f'onnxruntime_fp32_t{t}_rss_x_torch']
        emit(f'  target, {t} thread{"s" if t > 1 else ""}: ONNX Runtime forward <= {TARGET_FORWARD_RATIO}x torch: '
             f'{ratio:.2f}x ({"met" if ratio <= TARGET_FORWARD_RATIO else "NOT met"}); edge process RSS <= '
             f'{TARGET_RSS_RATIO}x torch: {rss_ratio:.2f}x ({"met" if rss_ratio <= TARGET_RSS_RATIO else "NOT met"})')
    t = threads[0]
    ref = by_key[('torch', t)]
    for label in ('onnxruntime fp32', 'onnxruntime int8'):
        other = by_key[(label, t)]
        agree = _agreement(ref, other, eta)
        split_eta, split = _median_split_agreement(ref, other)
        same = ', '.join(f'B={b}: {agree["sage_same_set"][b]}' for b in BUDGETS)
        order = ', '.join(f'{agree["sage_same_order"][b]}' for b in BUDGETS)
        emit(f'{label} against torch ({t} thread{"s" if t > 1 else ""}, {n} images): SAGE picks the same set '
             f'on {same} (same order: {order}); same gate decision at eta {eta:g} (config): '
             f'{agree["gate_config"]}/{n}, '
             f'at eta {split_eta:.4f} (half offloaded): {split}/{n}; max |difference| softmax '
             f'{agree["probs_max_diff"]:.1e}, attention {agree["attention_max_diff"]:.1e}')
        key = label.replace(' ', '_')
        figures.update({f'{key}_gate_agree_median_eta': split / n,
                        **{f'{key}_sage_same_set_B{b}': agree['sage_same_set'][b] / n for b in BUDGETS}})


def main(argv: list[str] | None = None) -> None:
    """Worker entry point (``python -m sage_ros.bench.edge``), started by :func:`run_edge_runtime_bench`."""
    parser = argparse.ArgumentParser(description='edge bench worker: serves frames on stdin')
    parser.add_argument('--model', required=True)
    parser.add_argument('--weights', required=True)
    parser.add_argument('--threads', type=int, required=True)
    parser.add_argument('--int8', action='store_true')
    args = parser.parse_args(argv)
    _worker(args.model, args.weights, args.threads, args.int8)


if __name__ == '__main__':
    main()
