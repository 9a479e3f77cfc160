# SPDX-License-Identifier: Apache-2.0
"""The edge model, whichever runtime runs it.

What one edge pass yields (:class:`EdgeOutput`: softmax, last-layer CLS-to-patch attention
averaged over heads, patch embeddings), what the robot must know about a model to feed it and
cut patches for the cloud (:class:`ModelCard`), and which runtime loads a model's weights
(:func:`load_edge_model`): torch and timm for a checkpoint, ``hub`` or ``random``; ONNX Runtime
for a ``.onnx`` file written by ``sage-ros export-edge``.

This module imports neither torch nor onnxruntime: each is imported when a model of its
runtime is loaded. The torch models (``VitModel``, ``load_vit``, ``edge_forward``,
``server_forward_subset``) live in :mod:`sage_ros.core.torch_models` and are importable from
here as before; the name is resolved, and torch imported, on first use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from sage_ros.core.errors import WeightsError
from sage_ros.core.preprocess import CropMap, resize_crop

if TYPE_CHECKING:
    from sage_ros.core.torch_models import VitModel, edge_forward, load_vit, server_forward_subset  # noqa: F401

EMBEDDING_SOURCES: tuple[str, ...] = ('final', 'input')
RUNTIMES = ('auto', 'torch', 'onnxruntime')
ONNX_SUFFIX = '.onnx'

WEIGHTS_HELP = (
    'Set weights to a local checkpoint file (.pth/.pt/.bin from timm or the DeiT repository, or '
    '.safetensors), to "hub" (timm downloads the pretrained weights from the Hugging Face hub; '
    'needs network access; HF_HUB_OFFLINE=1 uses an already filled cache), to "hf-hub:ORG/NAME", '
    'or to "random" / "random:SEED" for seeded random weights (tests and offline demos only: '
    'their labels are meaningless). The edge also takes a .onnx file written by '
    '`sage-ros export-edge`, which runs on ONNX Runtime without torch.'
)


@dataclass(frozen=True)
class ModelCard:
    """What a runtime needs besides the weights: provenance, the input transform and the patch
    geometry. An exported edge model carries it in its ONNX metadata."""

    name: str
    """timm model name."""
    weights: str
    """Where the weights came from: a checkpoint path, ``hub:NAME``, ``hf-hub:...`` or ``random:SEED``."""
    random_weights: bool
    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    grid: tuple[int, int]
    num_classes: int
    embed_dim: int

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    def crop(self, rgb: np.ndarray, crop_pct: float = 0.0) -> tuple[np.ndarray, CropMap]:
        """This model's eval resize and centre crop of an RGB frame; ``crop_pct`` 0 keeps the
        model's own ratio."""
        return resize_crop(rgb, input_size=self.input_size, crop_pct=crop_pct or self.crop_pct,
                           interpolation=self.interpolation)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = 'model card') -> ModelCard:
        """Parse :meth:`to_json`'s output; anything else is a :class:`WeightsError` naming ``source``."""
        try:
            fields = json.loads(text)
            return cls(**{**fields, 'mean': tuple(float(v) for v in fields['mean']),
                          'std': tuple(float(v) for v in fields['std']), 'grid': tuple(int(v) for v in fields['grid'])})
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightsError(f'{source}: not a sage_ros model card ({exc}); '
                               're-export it with `sage-ros export-edge`') from None


@dataclass(frozen=True)
class EdgeOutput:
    """What one edge forward pass yields for one frame."""

    logits: np.ndarray
    """(C,) class logits."""
    probs: np.ndarray
    """(C,) softmax."""
    attention: np.ndarray
    """(N,) last-layer CLS-to-patch attention averaged over heads; sums to the CLS row's patch mass."""
    embeddings: np.ndarray
    """(N, D) patch embeddings (final-layer tokens after the last norm, or the input embeddings)."""

    def topk(self, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-k class indices and probabilities, best first."""
        idx = np.argsort(-self.probs, kind='stable')[:k]
        return idx, self.probs[idx]


class EdgeModel(Protocol):
    """An edge model on some runtime: :class:`~sage_ros.core.torch_models.VitModel` (torch) or
    :class:`~sage_ros.core.onnx_edge.OnnxEdgeModel` (ONNX Runtime)."""

    runtime: str
    int8: bool
    """Weights quantised to int8 (ONNX Runtime only)."""

    @property
    def card(self) -> ModelCard: ...

    def edge_outputs(self, pixels: np.ndarray, embedding_source: str = 'final') -> list[EdgeOutput]:
        """One pass over normalised float32 pixels, (B, 3, H, W) or (3, H, W)."""
        ...


def check_embedding_source(embedding_source: str) -> None:
    if embedding_source not in EMBEDDING_SOURCES:
        raise ValueError(f"embedding_source must be 'final' or 'input', got {embedding_source!r}")


def edge_runtime(weights: str, runtime: str = 'auto') -> str:
    """The runtime that runs ``weights``: ``onnxruntime`` for a .onnx file, else ``torch``;
    ``runtime`` other than ``auto`` must agree with the weights."""
    if runtime not in RUNTIMES:
        raise WeightsError(f'unknown edge runtime {runtime!r}; choose from {", ".join(RUNTIMES)}')
    is_onnx = str(weights).strip().lower().endswith(ONNX_SUFFIX)
    if runtime == 'onnxruntime' and not is_onnx:
        raise WeightsError(f'runtime onnxruntime needs weights that are a {ONNX_SUFFIX} file, got {weights!r}; '
                           'write one with `sage-ros export-edge` where torch is installed')
    if runtime == 'torch' and is_onnx:
        raise WeightsError(f'{weights!r} is an ONNX model: it runs on ONNX Runtime (runtime auto or onnxruntime)')
    return 'onnxruntime' if is_onnx else 'torch'


def load_edge_model(name: str, weights: str, *, runtime: str = 'auto', device: str = 'cpu', num_threads: int = 0,
                    int8: bool = False) -> EdgeModel:
    """The edge model ``name`` with ``weights`` on the runtime they call for (see
    :func:`edge_runtime`). ``int8`` quantises an ONNX model's weights at load (ONNX Runtime
    dynamic quantisation); ``num_threads`` 0 keeps the runtime's default."""
    chosen = edge_runtime(weights, runtime)
    if chosen == 'torch':
        if int8:
            raise WeightsError('int8 applies to an ONNX Runtime edge only (weights: a .onnx file)')
        from sage_ros.core.torch_models import load_vit

        return load_vit(name, weights, device=device, num_threads=num_threads)
    if device != 'cpu':
        raise WeightsError(f'the ONNX Runtime edge runs on the CPU; device {device!r} applies to torch only')
    from sage_ros.core.onnx_edge import load_onnx_edge

    return load_onnx_edge(weights, name=name, num_threads=num_threads, int8=int8)


_TORCH_NAMES = ('VitModel', 'edge_forward', 'load_vit', 'server_forward_subset')


def __getattr__(name: str) -> Any:
    # The torch models, imported (with torch and timm) only when asked for.
    if name in _TORCH_NAMES:
        from sage_ros.core import torch_models

        return getattr(torch_models, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
