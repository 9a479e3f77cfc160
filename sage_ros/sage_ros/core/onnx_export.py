# SPDX-License-Identifier: Apache-2.0
"""Export the edge's one pass to ONNX, for the ONNX Runtime edge (:mod:`sage_ros.core.onnx_edge`).

Runs where torch is (the workstation or the cloud): ``sage-ros export-edge``. The graph is
:func:`sage_ros.core.torch_models.edge_tensors`, the very code the torch edge runs, exported
with torch's ONNX exporter (torch.export based) with a dynamic batch dimension; the model
card goes into the file's metadata.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import timm
import torch

from sage_ros.core.errors import WeightsError
from sage_ros.core.models import ModelCard
from sage_ros.core.onnx_edge import (
    CARD_KEY,
    FP32_TOLERANCE,
    INPUT_NAME,
    OUTPUT_NAMES,
    load_onnx_edge,
    quantize_int8,
)
from sage_ros.core.torch_models import VitModel, edge_tensors, load_vit

EXPORTED_WITH_KEY = 'sage_ros.exported_with'


class _EdgeGraph(torch.nn.Module):
    """The torch edge pass as a module, for the exporter."""

    def __init__(self, vit: VitModel) -> None:
        super().__init__()
        self.model = vit.model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(edge_tensors(self.model, pixels))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_edge` wrote and how closely ONNX Runtime reproduces torch."""

    path: Path
    card: ModelCard
    int8_path: Path | None
    max_abs_diff: dict[str, float]
    """Largest |ONNX Runtime - torch| per output over a check batch."""


def _write_onnx(vit: VitModel, out: Path) -> None:
    size = vit.card.input_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    # The exporter traces the module: no inference-mode tensors (a caller may be in that mode).
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(_EdgeGraph(vit).eval(), (example,), dynamo=True, input_names=[INPUT_NAME],
                                    output_names=list(OUTPUT_NAMES), dynamic_shapes={'pixels': {0: batch}},
                                    external_data=False, verbose=False)
    program.save(str(out), external_data=False)
    model = onnx.load(str(out))
    onnx.helper.set_model_props(model, {
        CARD_KEY: vit.card.to_json(),
        EXPORTED_WITH_KEY: f'torch {torch.__version__}, timm {timm.__version__}',
    })
    onnx.save(model, str(out))


def compare_with_torch(vit: VitModel, onnx_path: Path, pixels: np.ndarray) -> dict[str, float]:
    """Largest |ONNX Runtime - torch| of each output over normalised ``pixels`` (B, 3, H, W)."""
    ort_model = load_onnx_edge(onnx_path, name=vit.name)
    with torch.inference_mode():
        want = edge_tensors(vit.model, torch.from_numpy(pixels))
    final, given = ort_model.edge_outputs(pixels, 'final'), ort_model.edge_outputs(pixels, 'input')

    def max_diff(outputs: list, field: str, reference: torch.Tensor) -> float:
        return float(np.abs(np.stack([getattr(o, field) for o in outputs]) - reference.numpy()).max())

    return {'probs': max_diff(final, 'probs', want.probs), 'attention': max_diff(final, 'attention', want.attention),
            'embeddings_final': max_diff(final, 'embeddings', want.embeddings_final),
            'embeddings_input': max_diff(given, 'embeddings', want.embeddings_input)}


def export_edge(name: str, weights: str, out: Path, *, int8: bool = False, check_pixels: np.ndarray | None = None
                ) -> ExportResult:
    """Write the edge model ``name`` with ``weights`` (a checkpoint, hub, or random[:SEED]) as
    ONNX to ``out``, check it against torch on ``check_pixels`` (default: seeded noise) and
    raise :class:`WeightsError` if it differs beyond :data:`FP32_TOLERANCE`. ``int8`` also
    writes the dynamically quantised model beside it (``NAME.int8.onnx``)."""
    out = Path(os.path.expanduser(str(out)))
    if out.suffix != '.onnx':
        raise ValueError(f'the exported model must be a .onnx file, got {str(out)!r}')
    if not out.parent.is_dir():
        raise FileNotFoundError(f'folder {str(out.parent)!r} does not exist')
    vit = load_vit(name, weights)
    tmp = out.with_name(f'.{out.name}.tmp')
    try:
        _write_onnx(vit, tmp)
        size = vit.card.input_size
        pixels = (check_pixels if check_pixels is not None
                  else np.random.default_rng(0).standard_normal((4, 3, size, size), dtype=np.float32))
        diffs = compare_with_torch(vit, tmp, pixels)
        over = {k: v for k, v in diffs.items() if v > FP32_TOLERANCE[k]}
        if over:
            raise WeightsError(f'the exported model differs from torch beyond tolerance: {over} '
                               f'(tolerance {FP32_TOLERANCE})')
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    int8_path = None
    if int8:
        int8_path = out.with_suffix('.int8.onnx')
        quantize_int8(out, int8_path)
    return ExportResult(out, vit.card, int8_path, diffs)
