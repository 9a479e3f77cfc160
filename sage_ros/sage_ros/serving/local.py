# SPDX-License-Identifier: Apache-2.0
"""The server model in the cloud node's own process."""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from sage_ros.core.models import VitModel, load_vit
from sage_ros.core.offload import classify_batch_attended

PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}

Request = tuple[np.ndarray, np.ndarray]
"""Decoded (M, P, P, 3) uint8 patches and their (M,) grid indices."""


class ServerBackend(Protocol):
    """Classifies batches of decoded requests; one softmax row per request, in order."""

    name: str
    weights: str
    random_weights: bool
    geometry: tuple[int, int, int, int]
    """The server model's (grid rows, grid cols, patch size, input size): what requests must match."""

    def classify(self, requests: list[Request]) -> np.ndarray: ...

    def classify_attended(self, requests: list[Request]) -> tuple[np.ndarray, list[np.ndarray]]:
        """The softmax rows and each request's last-layer CLS attention over its tokens."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The timm server model in this process; a batch is one padded, masked forward."""

    def __init__(self, model: str, weights: str, *, device: str = 'cpu', num_threads: int = 0,
                 precision: str = 'fp32') -> None:
        if precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {", ".join(PRECISIONS)}, got {precision!r}')
        self.vit: VitModel = load_vit(model, weights, device=device, num_threads=num_threads)
        self._precision = precision
        self.name, self.weights, self.random_weights = self.vit.name, self.vit.weights, self.vit.random_weights
        self.geometry = (*self.vit.grid, self.vit.patch_size, self.vit.input_size)
        p = self.vit.patch_size
        # One forward now, not inside the first request's deadline.
        self.classify([(np.zeros((64, p, p, 3), np.uint8), np.arange(64))])

    def classify(self, requests: list[Request]) -> np.ndarray:
        """One forward, requests padded to the largest and the padding masked; the caller
        groups sizes (:func:`sage_ros.core.offload.size_groups`)."""
        return self._forward(requests, attention=False)[0]

    def classify_attended(self, requests: list[Request]) -> tuple[np.ndarray, list[np.ndarray]]:
        """:meth:`classify`, and the CLS attention over each request's tokens (same forward)."""
        return self._forward(requests, attention=True)

    def _forward(self, requests: list[Request], *, attention: bool) -> tuple[np.ndarray, list[np.ndarray]]:
        if self._precision == 'fp32':
            return classify_batch_attended(self.vit, requests, attention=attention)
        # Mixed precision where the hardware has it (fp16/bf16 on a GPU: several times the
        # images per second of fp32); the softmax is computed in fp32 either way.
        device = next(self.vit.model.parameters()).device.type
        with torch.autocast(device_type=device, dtype=PRECISIONS[self._precision]):
            return classify_batch_attended(self.vit, requests, attention=attention)

    def close(self) -> None:
        pass
