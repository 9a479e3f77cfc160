# SPDX-License-Identifier: Apache-2.0
"""Patch selection under a hard budget: SAGE and the baselines it is compared with.

Every method is a pure function returning at most ``budget`` distinct indices in
``[0, N)`` in selection order (most important first), so a prefix of the result is
itself a valid, lower-budget selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from sage_ros.core.errors import SelectionError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

GRID_SIDE = 14
METHODS = ('sage', 'attention_topk', 'attention_threshold', 'attention_sum', 'random', 'uniform_grid', 'bat')
# Methods whose natural output size is not the budget; they are truncated to it.
THRESHOLD_METHODS = frozenset({'attention_threshold', 'attention_sum'})


def _check_attention(attention: ArrayLike) -> np.ndarray:
    a = np.asarray(attention, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise SelectionError(f'attention must be a non-empty 1-D array, got shape {a.shape}')
    if not np.all(np.isfinite(a)):
        raise SelectionError('attention holds NaN or inf')
    return a


def _check_budget(budget: int, n: int) -> int:
    if isinstance(budget, bool) or int(budget) != budget:
        raise SelectionError(f'budget must be an integer, got {budget!r}')
    if budget < 0:
        raise SelectionError(f'budget must be >= 0, got {budget}')
    return min(int(budget), n)


def attention_order(attention: ArrayLike) -> np.ndarray:
    """All indices by decreasing attention; ties go to the lower index."""
    a = _check_attention(attention)
    return np.argsort(-a, kind='stable')


def select_attention_topk(attention: ArrayLike, budget: int) -> np.ndarray:
    """The ``budget`` patches of highest attention (the "attention prefix")."""
    order = attention_order(attention)
    return order[: _check_budget(budget, order.size)]


def select_sage(
    attention: ArrayLike,
    embeddings: ArrayLike,
    budget: int,
    *,
    prefilter_ratio: float = 2.0,
) -> np.ndarray:
    """SAGE: attention prefilter, then farthest-point sampling on cosine similarity.

    The top ``ceil(prefilter_ratio * budget)`` patches by attention are candidates.
    The first pick is the highest-attention candidate; each next pick is the candidate
    whose largest cosine similarity to the picks so far is smallest. Ties go to the
    higher attention, then the lower index.
    """
    a = _check_attention(attention)
    n = a.size
    b = _check_budget(budget, n)
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or e.shape[0] != n:
        raise SelectionError(f'embeddings must have shape ({n}, D), got {e.shape}')
    if not np.all(np.isfinite(e)):
        raise SelectionError('embeddings hold NaN or inf')
    if not prefilter_ratio >= 1.0:
        raise SelectionError(f'prefilter_ratio must be >= 1, got {prefilter_ratio}')
    if b == 0:
        return np.empty(0, dtype=np.int64)
    m = min(n, math.ceil(prefilter_ratio * b))
    # Candidates in attention order, so argmin's first-hit rule is the tie-break.
    cand = attention_order(a)[:m]
    ce = e[cand]
    ce = ce / np.maximum(np.linalg.norm(ce, axis=1, keepdims=True), 1e-12)
    sim = ce @ ce.T
    picked = np.empty(b, dtype=np.int64)
    picked[0] = 0
    max_sim = sim[0].copy()
    max_sim[0] = np.inf
    for i in range(1, b):
        j = int(np.argmin(max_sim))
        picked[i] = j
        # Picks stay at inf: max(inf, x) = inf, so only the new one needs marking.
        np.maximum(max_sim, sim[j], out=max_sim)
        max_sim[j] = np.inf
    return cand[picked]


def _check_embeddings(embeddings: ArrayLike, n: int) -> np.ndarray:
    e = np.asarray(embeddings, dtype=np.float32)
    if e.ndim != 2 or e.shape[0] != n:
        raise SelectionError(f'embeddings must have shape ({n}, D), got {e.shape}')
    if not np.all(np.isfinite(e)):
        raise SelectionError('embeddings hold NaN or inf')
    return e


def select_bat(
    attention: ArrayLike,
    embeddings: ArrayLike,
    budget: int,
    *,
    attentive_share: float = 0.5,
    k: int = 5,
) -> np.ndarray:
    """BAT (Long et al., "Beyond Attentive Tokens", CVPR 2023) under a hard budget of patches.

    BAT keeps the attentive tokens and, for diversity, clusters the inattentive ones with
    DPC-kNN and fuses each cluster into one token. Patches cannot be fused before they are
    sent, so, as the SAGE paper compares it, the budget is split: the top
    ``round(attentive_share * budget)`` patches by CLS attention, then the centres of the
    density-peak clusters of the remaining patches' embeddings. DPC-kNN scores each remaining
    patch by density ``rho = exp(-mean squared distance to its k nearest neighbours)`` times
    ``delta``, its distance to the nearest denser patch (the largest distance for the
    densest); the highest scores are the centres. Distances are Euclidean on the embeddings
    divided by sqrt(D), as in TCFormer's DPC-kNN. ``attentive_share`` 1 is the attention prefix.
    """
    a = _check_attention(attention)
    n = a.size
    b = _check_budget(budget, n)
    if not 0.0 <= attentive_share <= 1.0:
        raise SelectionError(f'attentive_share must be in [0, 1], got {attentive_share}')
    if k < 1:
        raise SelectionError(f'k must be >= 1, got {k}')
    e = _check_embeddings(embeddings, n)
    order = attention_order(a)
    n_att = min(b, int(round(attentive_share * b)))
    attentive, rest = order[:n_att], order[n_att:]
    n_div = b - n_att
    if n_div == 0 or rest.size == 0:
        return attentive
    x = e[rest].astype(np.float64) / math.sqrt(e.shape[1])
    sq = np.sum(x * x, axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    kk = min(k, rest.size - 1)
    if kk > 0:
        knn = np.sort(d2, axis=1)[:, 1:kk + 1]  # column 0 is the patch itself
        rho = np.exp(-knn.mean(axis=1))
    else:
        rho = np.ones(rest.size)
    dist = np.sqrt(d2)
    # Ties in density go to the higher attention (rest is in attention order): "denser" is
    # strictly greater density, or equal density and earlier in that order.
    pos = np.arange(rest.size)
    denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None]) & (pos[None, :] < pos[:, None]))
    delta = np.where(denser.any(axis=1), np.where(denser, dist, np.inf).min(axis=1), dist.max(axis=1))
    centres = rest[np.argsort(-(rho * delta), kind='stable')[:n_div]]
    return np.concatenate([attentive, centres]).astype(np.int64)


def select_attention_threshold(attention: ArrayLike, budget: int, *, delta: float = 0.005) -> np.ndarray:
    """Patches with attention ``>= delta`` (Im et al.), by decreasing attention, cut at ``budget``."""
    order = attention_order(attention)
    a = np.asarray(attention, dtype=np.float64)
    keep = order[a[order] >= delta]
    return keep[: _check_budget(budget, order.size)]


def select_attention_sum(attention: ArrayLike, budget: int, *, delta_sum: float = 0.5) -> np.ndarray:
    """Fewest top-attention patches whose share of the total attention reaches ``delta_sum``.

    Attention is normalised to sum to one first, so ``delta_sum`` is a fraction in (0, 1].
    The result is cut at ``budget``.
    """
    if not 0.0 < delta_sum <= 1.0:
        raise SelectionError(f'delta_sum must be in (0, 1], got {delta_sum}')
    order = attention_order(attention)
    a = np.asarray(attention, dtype=np.float64)[order]
    total = a.sum()
    if total <= 0:
        count = order.size
    else:
        cum = np.cumsum(a) / total
        # First position where the running share reaches delta_sum (float slack for delta_sum=1).
        count = int(np.searchsorted(cum, delta_sum - 1e-12, side='left')) + 1
    return order[: min(count, _check_budget(budget, order.size))]


def select_random(n: int, budget: int, *, seed: int = 0) -> np.ndarray:
    """``budget`` distinct indices drawn uniformly with a seeded generator."""
    b = _check_budget(budget, n)
    return np.random.default_rng(seed).choice(n, size=b, replace=False).astype(np.int64)


def select_uniform_grid(budget: int, *, grid: int = GRID_SIDE) -> np.ndarray:
    """``budget`` patches spread evenly over a ``grid x grid`` lattice, row-major.

    About ``sqrt(budget)`` rows are spaced evenly; the patches are split over them as
    evenly as possible and spaced evenly within each row, so any budget works.
    """
    b = _check_budget(budget, grid * grid)
    if b == 0:
        return np.empty(0, dtype=np.int64)
    rows = max(1, round(math.sqrt(b)))
    while math.ceil(b / rows) > grid:
        rows += 1
    per_row = [b // rows + (1 if r < b % rows else 0) for r in range(rows)]
    out = []
    for r, count in enumerate(per_row):
        y = int((r + 0.5) * grid / rows)
        out.extend(y * grid + int((c + 0.5) * grid / count) for c in range(count))
    return np.asarray(out, dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    """A method's selection with what the budget cost it."""

    indices: np.ndarray
    """Selected indices in selection order; never more than the budget."""
    wanted: int
    """How many patches the method would have chosen without the budget."""

    @property
    def truncated(self) -> int:
        """Patches the method wanted but the budget cut off (threshold methods only)."""
        return max(0, self.wanted - int(self.indices.size))


def select_detailed(
    method: str,
    attention: ArrayLike,
    embeddings: ArrayLike | None,
    budget: int,
    *,
    prefilter_ratio: float = 2.0,
    seed: int = 0,
    **method_params: Any,
) -> Selection:
    """Like :func:`select`, and also report how much the budget truncated the method."""
    a = _check_attention(attention)
    n = a.size
    b = _check_budget(budget, n)
    if method in THRESHOLD_METHODS:
        fn: Callable[..., np.ndarray] = (
            select_attention_threshold if method == 'attention_threshold' else select_attention_sum
        )
        wish = fn(a, n, **method_params)
        return Selection(indices=wish[:b], wanted=int(wish.size))
    if method == 'sage':
        if embeddings is None:
            raise SelectionError('sage needs patch embeddings')
        idx = select_sage(a, embeddings, b, prefilter_ratio=prefilter_ratio, **method_params)
    elif method == 'bat':
        if embeddings is None:
            raise SelectionError('bat needs patch embeddings')
        idx = select_bat(a, embeddings, b, **method_params)
    elif method == 'attention_topk':
        idx = select_attention_topk(a, b, **method_params)
    elif method == 'random':
        idx = select_random(n, b, seed=seed, **method_params)
    elif method == 'uniform_grid':
        side = math.isqrt(n)
        if side * side != n:
            raise SelectionError(f'uniform_grid needs a square grid, got N={n}')
        idx = select_uniform_grid(b, grid=side, **method_params)
    else:
        raise SelectionError(f'unknown selection method {method!r}; choose from {", ".join(METHODS)}')
    return Selection(indices=idx, wanted=int(idx.size))


def select(
    method: str,
    attention: ArrayLike,
    embeddings: ArrayLike | None,
    budget: int,
    *,
    prefilter_ratio: float = 2.0,
    seed: int = 0,
    **method_params: Any,
) -> np.ndarray:
    """Select at most ``budget`` patch indices with ``method``, in selection order.

    ``attention`` has shape (N,), ``embeddings`` (N, D) (only ``sage`` and ``bat`` read them).
    ``method_params`` go to the method: ``delta`` for ``attention_threshold``,
    ``delta_sum`` for ``attention_sum``, ``attentive_share`` and ``k`` for ``bat``.
    """
    return select_detailed(
        method, attention, embeddings, budget, prefilter_ratio=prefilter_ratio, seed=seed, **method_params
    ).indices


def coverage(indices: ArrayLike, *, grid: int = GRID_SIDE, cell: int = 2) -> float:
    """Fraction of coarse cells (``cell x cell`` patches; 7x7 cells on 14x14) holding a pick."""
    idx = np.asarray(indices, dtype=np.int64)
    coarse = grid // cell
    if idx.size == 0:
        return 0.0
    cells = (idx // grid) // cell * coarse + (idx % grid) // cell
    return float(np.unique(cells).size) / float(coarse * coarse)
