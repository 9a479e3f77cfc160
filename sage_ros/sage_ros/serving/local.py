# SPDX-License-Identifier: Apache-2.0
"""The server model in the cloud node's own process."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sage_ros.core.models import VitModel, load_vit
from sage_ros.core.offload import classify_batch

Request = tuple[np.ndarray, np.ndarray]
"""Decoded (M, P, P, 3) uint8 patches and their (M,) grid indices."""


class ServerBackend(Protocol):
    """Classifies batches of decoded requests; one softmax row per request, in order."""

    name: str
    weights: str
    random_weights: bool

    def classify(self, requests: list[Request]) -> np.ndarray: ...

    def close(self) -> None: ...


class LocalBackend:
    """The timm server model in this process; a batch is one padded, masked forward."""

    def __init__(self, model: str, weights: str, *, device: str = 'cpu', num_threads: int = 0) -> None:
        self.vit: VitModel = load_vit(model, weights, device=device, num_threads=num_threads)
        self.name, self.weights, self.random_weights = self.vit.name, self.vit.weights, self.vit.random_weights
        p = self.vit.patch_size
        # One forward now, not inside the first request's deadline.
        self.classify([(np.zeros((64, p, p, 3), np.uint8), np.arange(64))])

    def classify(self, requests: list[Request]) -> np.ndarray:
        """One forward, requests padded to the largest and the padding masked; the caller
        groups sizes (:func:`sage_ros.core.offload.size_groups`)."""
        return classify_batch(self.vit, requests)

    def close(self) -> None:
        pass
