# SPDX-License-Identifier: Apache-2.0
"""``sage-ros export-edge``: the edge model as one ONNX file a robot runs without torch, and what
it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Callable


def export_edge_model(model: str, weights: str, output: Path, *, int8: bool = False,
                      emit: Callable[[str], None] = print) -> Path:
    """Export, check against torch, and say what was written; returns the FP32 file."""
    from sage_ros.core.onnx_edge import FP32_TOLERANCE
    from sage_ros.core.onnx_export import export_edge

    result = export_edge(model, weights, output, int8=int8)
    card = result.card
    emit(f'wrote {result.path} ({result.path.stat().st_size / 1e6:.1f} MB): {card.name}, weights {card.weights}')
    emit(f'  input {card.input_size} px, crop_pct {card.crop_pct}, {card.interpolation}, mean {card.mean}, '
         f'std {card.std}; patch {card.patch_size}, grid {card.grid[0]}x{card.grid[1]}, {card.num_classes} classes')
    emit('  ONNX Runtime vs torch, max |difference|: ' + ', '.join(
        f'{k} {v:.1e} (tolerance {FP32_TOLERANCE[k]:.0e})' for k, v in result.max_abs_diff.items()))
    if result.int8_path is not None:
        emit(f'wrote {result.int8_path} ({result.int8_path.stat().st_size / 1e6:.1f} MB): int8 weights '
             '(dynamic quantisation; changes the outputs: `sage-ros bench --edge-runtimes` measures how much)')
    emit(f'on the robot: -p sage_edge.weights:={result.path.resolve()}')
    return result.path
