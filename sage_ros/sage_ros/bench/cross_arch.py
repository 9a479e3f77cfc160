# SPDX-License-Identifier: Apache-2.0
"""The robot edge's frame work recorded on one machine and compared with another's: does an
aarch64 robot (a Raspberry Pi 5) decide what x86 decides on the same frames?

``python -m sage_ros.bench.cross_arch run MODEL.onnx FRAME.jpg ... -o RESULT.json`` runs, without ROS
or torch, what the edge node does with a compressed camera frame: decode it reduced, the model's
crop, the ONNX Runtime forward (one thread), the gate, and the request SAGE plans at several
budgets with the configured codec. It writes every output and decision as JSON.
:func:`compare` then holds two such records against each other: the same gate decisions, the
same SAGE patches, outputs within :data:`~sage_ros.core.onnx_edge.FP32_TOLERANCE`, and whether
the payload bytes are equal. ``scripts/aarch64_edge_check.py`` drives both ends (x86 here,
aarch64 under QEMU); on a real robot ``run`` is the same command.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import platform
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Sequence

import cv2
import numpy as np

from sage_ros.core.errors import SageError
from sage_ros.core.gate import should_offload
from sage_ros.core.models import load_edge_model
from sage_ros.core.offload import Budget
from sage_ros.core.onnx_edge import FP32_TOLERANCE
from sage_ros.core.pipeline import EdgePipeline
from sage_ros.params import gate_config, load_params, selection_config
from sage_ros.ros.ros_image import decode_compressed, decode_short_side

DEFAULT_BUDGETS = (16, 32, 64, 96)
# A camera frame as a Pi camera mode sends it (4:3, a multiple of 16), so the edge decodes it
# reduced (1/2 for DeiT's 224 / 0.9), as it would on the robot.
CAMERA_SIZE = (2048, 1536)
CAMERA_JPEG_QUALITY = 90
# The outputs compared, and the FP32_TOLERANCE entry each is held to (logits have none: they are
# reported only; the decisions depend on probs, attention and embeddings).
OUTPUT_TOLERANCE = {'probs': 'probs', 'attention': 'attention', 'embeddings': 'embeddings_final'}
# What the record notes of the machine it was made on.
DISTRIBUTIONS = ('numpy', 'onnxruntime', 'opencv-python-headless', 'opencv-python')


def write_camera_frames(images: Sequence[Path], out_dir: Path) -> list[Path]:
    """Each real image resized to :data:`CAMERA_SIZE` and JPEG-encoded, as a camera would send
    it, written once so that both machines decode the very same bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = []
    for path in images:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f'cannot read image {path}')
        ok, buf = cv2.imencode('.jpg', cv2.resize(bgr, CAMERA_SIZE, interpolation=cv2.INTER_CUBIC),
                               [cv2.IMWRITE_JPEG_QUALITY, CAMERA_JPEG_QUALITY])
        if not ok:
            raise ValueError(f'cannot encode {path} as JPEG')
        frame = out_dir / f'{path.stem}.jpg'
        frame.write_bytes(buf.tobytes())
        frames.append(frame)
    return frames


def _versions() -> dict[str, str]:
    found = {'python': platform.python_version(), 'opencv': cv2.__version__}
    for name in DISTRIBUTIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def edge_record(model_path: Path, frames: Sequence[Path], budgets: Sequence[int] = DEFAULT_BUDGETS,
                *, num_threads: int = 1) -> dict[str, Any]:
    """The edge's work on each compressed frame with the shipped sage_edge parameters (method
    sage), as a JSON-ready record."""
    params = load_params('sage_edge', overrides={'method': 'sage'})
    gate, selection = gate_config(params), selection_config(params)
    t0 = time.perf_counter()
    model = load_edge_model(params['model'], str(model_path), runtime='onnxruntime', num_threads=num_threads)
    load_s = time.perf_counter() - t0
    pipeline = EdgePipeline(model)
    card = model.card
    side = decode_short_side(card.input_size, gate.crop_pct or card.crop_pct)
    record: dict[str, Any] = {
        'machine': platform.machine(), 'versions': _versions(), 'model': str(model_path),
        'weights': card.weights, 'threads': num_threads, 'gate_metric': gate.gate_metric, 'eta': gate.eta,
        'codec': selection.encoding, 'budgets': [int(b) for b in budgets], 'load_s': load_s, 'frames': [],
    }
    for path in frames:
        data = Path(path).read_bytes()
        rgb, _ = decode_compressed(SimpleNamespace(format='jpeg', data=data), min_short_side=side)
        decision = pipeline.analyze(rgb, gate)
        edge = decision.edge
        plans = {}
        for budget in budgets:
            plan = EdgePipeline.plan(decision, Budget(int(budget)), selection)
            plans[str(budget)] = {'indices': plan.indices.tolist(), 'bytes': plan.num_bytes,
                                  'payload_sha256': _sha256(plan.payload)}
        record['frames'].append({
            'name': Path(path).name, 'frame_sha256': _sha256(data), 'decoded': list(rgb.shape),
            'crop_sha256': _sha256(np.ascontiguousarray(decision.crop).tobytes()),
            'logits': edge.logits.tolist(), 'probs': edge.probs.tolist(), 'attention': edge.attention.tolist(),
            'embeddings': edge.embeddings.tolist(), 'score': decision.score, 'offload': decision.offload,
            'forward_s': decision.forward_s, 'plans': plans,
        })
    return record


def _max_abs(a: Any, b: Any) -> float:
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape:
        return float('inf')
    return float(np.abs(x - y).max()) if x.size else 0.0


def gate_thresholds(reference: dict[str, Any]) -> list[float]:
    """The configured eta, and one between each pair of neighbouring scores of ``reference``:
    thresholds that split the frames, where two machines could decide differently (random
    weights are unsure of every frame, so the configured eta alone offloads them all)."""
    scores = sorted(float(f['score']) for f in reference['frames'])
    return [float(reference['eta'])] + [(a + b) / 2 for a, b in zip(scores, scores[1:]) if a != b]


def compare(reference: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``other``'s record held against ``reference``'s (the same frames, budgets and settings).

    Returns the largest difference of each output, each frame's rows and ``mismatches``, one
    line per broken requirement: a different gate decision, different SAGE patches, or an
    output beyond its FP32 tolerance. Payload bytes are compared and reported
    (``payload_equal``), not required: the issue asks only whether they are equal.
    """
    mismatches: list[str] = []
    for key in ('weights', 'gate_metric', 'eta', 'codec', 'budgets'):
        if reference.get(key) != other.get(key):
            mismatches.append(f'settings differ: {key} {reference.get(key)!r} vs {other.get(key)!r}')
    names = [f['name'] for f in reference['frames']], [f['name'] for f in other['frames']]
    if names[0] != names[1] or not names[0]:
        mismatches.append(f'frames differ: {names[0]} vs {names[1]}')
        return {'frames': [], 'max_diff': {}, 'payload_equal': False, 'mismatches': mismatches}
    etas = gate_thresholds(reference)
    rows, max_diff = [], dict.fromkeys([*OUTPUT_TOLERANCE, 'logits', 'score'], 0.0)
    for a, b in zip(reference['frames'], other['frames']):
        name = a['name']
        if a['frame_sha256'] != b['frame_sha256']:
            mismatches.append(f'{name}: the two machines read different frame bytes')
        diff = {key: _max_abs(a[key], b[key]) for key in max_diff}
        for key, value in diff.items():
            max_diff[key] = max(max_diff[key], value)
        for key, tolerance_key in OUTPUT_TOLERANCE.items():
            if not diff[key] <= FP32_TOLERANCE[tolerance_key]:
                mismatches.append(f'{name}: {key} differ by {diff[key]:.3g} > {FP32_TOLERANCE[tolerance_key]:g}')
        gate_differs = [eta for eta in etas
                        if should_offload(a['score'], eta) != should_offload(b['score'], eta)]
        if a['offload'] != b['offload'] or gate_differs:
            mismatches.append(f'{name}: gate decisions differ (offload {a["offload"]} vs {b["offload"]}, '
                              f'eta {gate_differs})')
        sage_equal, payload_equal = {}, {}
        for budget in reference['budgets']:
            pa, pb = a['plans'][str(budget)], b['plans'][str(budget)]
            sage_equal[budget] = pa['indices'] == pb['indices']
            payload_equal[budget] = pa['payload_sha256'] == pb['payload_sha256']
            if not sage_equal[budget]:
                mismatches.append(f'{name}: SAGE patches at B={budget} differ')
        rows.append({'name': name, 'diff': diff, 'crop_equal': a['crop_sha256'] == b['crop_sha256'],
                     'offload': (a['offload'], b['offload']), 'gate_thresholds_equal': not gate_differs,
                     'sage_equal': sage_equal, 'payload_equal': payload_equal,
                     'payload_bytes': {k: (a['plans'][str(k)]['bytes'], b['plans'][str(k)]['bytes'])
                                       for k in reference['budgets']},
                     'forward_s': (a['forward_s'], b['forward_s'])})
    return {'frames': rows, 'max_diff': max_diff, 'etas': etas,
            'payload_equal': all(all(r['payload_equal'].values()) for r in rows), 'mismatches': mismatches}


def format_summary(result: dict[str, Any], reference: dict[str, Any], other: dict[str, Any]) -> str:
    """What :func:`compare` found, as the lines a person reads."""
    def side(record: dict[str, Any]) -> str:
        v = record['versions']
        return (f"{record['machine']}: Python {v.get('python')}, numpy {v.get('numpy')}, OpenCV {v.get('opencv')}, "
                f"onnxruntime {v.get('onnxruntime')}, model load {record['load_s']:.1f} s")

    def same(flags: Any) -> str:
        return 'equal' if all(flags.values() if isinstance(flags, dict) else [flags]) else 'DIFFER'

    pair = f"{reference['machine']}/{other['machine']}"
    lines = [side(reference), side(other), f'per frame, {pair}:']
    for row in result['frames']:
        d = row['diff']
        sizes = ', '.join(f'B={k} {a}/{b}' for k, (a, b) in row['payload_bytes'].items())
        lines.append(
            f"  {row['name']}: forward {row['forward_s'][0]:.3f}/{row['forward_s'][1]:.3f} s; max |diff| probs "
            f"{d['probs']:.2g}, attention {d['attention']:.2g}, embeddings {d['embeddings']:.2g}, "
            f"logits {d['logits']:.2g}, gate score {d['score']:.2g}; crop pixels {same(row['crop_equal'])}; "
            f"offload {row['offload'][0]}/{row['offload'][1]}; SAGE {same(row['sage_equal'])} at "
            f"B={','.join(map(str, row['sage_equal']))}; payload {same(row['payload_equal'])} ({sizes} bytes)")
    if result['max_diff']:
        tol = ', '.join(f'{k} {FP32_TOLERANCE[t]:g}' for k, t in OUTPUT_TOLERANCE.items())
        worst = ', '.join(f'{k} {v:.3g}' for k, v in result['max_diff'].items())
        lines.append(f'largest |diff| over all frames: {worst} (tolerance: {tol})')
        lines.append(f"gate decisions compared at eta = {', '.join(f'{e:.4f}' for e in result['etas'])}")
        lines.append(f"payload bytes: {'equal on every frame and budget' if result['payload_equal'] else 'NOT equal'}")
    lines += [f'MISMATCH {m}' for m in result['mismatches']]
    lines.append('result: ' + ('MISMATCH' if result['mismatches'] else
                               f"{other['machine']} decides as {reference['machine']} does"))
    return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m sage_ros.bench.cross_arch', description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    run = sub.add_parser('run', help='the edge work on compressed frames, written as JSON')
    run.add_argument('model', type=Path, help='edge model exported by `sage-ros export-edge` (.onnx)')
    run.add_argument('frames', type=Path, nargs='+', help='compressed camera frames (JPEG)')
    run.add_argument('-o', '--out', type=Path, required=True, help='JSON record to write')
    run.add_argument('--budgets', type=lambda s: [int(x) for x in s.split(',')], default=list(DEFAULT_BUDGETS),
                     help='comma-separated patch budgets (default: %(default)s)')
    run.add_argument('--threads', type=int, default=1, help='ONNX Runtime intra-op threads (default: 1)')
    cmp = sub.add_parser('compare', help='hold one record against another; exit 1 on a mismatch')
    cmp.add_argument('reference', type=Path)
    cmp.add_argument('other', type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == 'run':
            record = edge_record(args.model, args.frames, args.budgets, num_threads=args.threads)
            args.out.write_text(json.dumps(record))
            return 0
        reference, other = (json.loads(p.read_text()) for p in (args.reference, args.other))
    except (OSError, ValueError, SageError) as exc:  # a missing file, a bad model or frame, broken JSON
        print(f'error: {exc}', file=sys.stderr)
        return 2
    result = compare(reference, other)
    print(format_summary(result, reference, other))
    return 1 if result['mismatches'] else 0


if __name__ == '__main__':
    sys.exit(main())
