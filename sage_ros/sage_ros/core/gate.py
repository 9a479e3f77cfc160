# SPDX-License-Identifier: Apache-2.0
"""Confidence gates: decide from the edge softmax whether a frame is offloaded.

Every metric is an *uncertainty* in which larger means less sure, so one rule serves all:
offload when ``score >= eta``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

# Probabilities are clipped here before a log, so a zero never yields inf.
_TINY = 1e-12


def _as_probs(probs: ArrayLike) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 1 or p.size == 0:
        raise ValueError(f'expected a non-empty 1-D probability vector, got shape {p.shape}')
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError('probabilities must be finite and non-negative')
    return p


def min_entropy(probs: ArrayLike) -> float:
    """Min-entropy ``-log2(max p)`` in bits (Im et al.); 0 for a one-hot vector."""
    p = _as_probs(probs)
    return float(-np.log2(max(float(p.max()), _TINY)))


def shannon_entropy(probs: ArrayLike) -> float:
    """Shannon entropy ``-sum p log2 p`` in bits."""
    p = _as_probs(probs)
    nz = p[p > 0]
    return float(-(nz * np.log2(nz)).sum())


def margin_uncertainty(probs: ArrayLike) -> float:
    """``1 - (p1 - p2)``, one minus the gap between the two largest probabilities."""
    p = _as_probs(probs)
    if p.size == 1:
        return 1.0 - float(p[0])
    top2 = np.partition(p, -2)[-2:]
    return float(1.0 - (top2[1] - top2[0]))


GATE_METRICS: dict[str, Callable[[ArrayLike], float]] = {
    'min_entropy': min_entropy,
    'entropy': shannon_entropy,
    'margin': margin_uncertainty,
}


def gate_score(probs: ArrayLike, metric: str = 'min_entropy') -> float:
    """Uncertainty of ``probs`` under ``metric`` (one of :data:`GATE_METRICS`)."""
    try:
        fn = GATE_METRICS[metric]
    except KeyError:
        raise ValueError(f'unknown gate metric {metric!r}; choose from {sorted(GATE_METRICS)}') from None
    return fn(probs)


def should_offload(score: float, eta: float) -> bool:
    """Offload when the uncertainty reaches the threshold: ``score >= eta``."""
    return bool(score >= eta)
