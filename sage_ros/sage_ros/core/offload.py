# SPDX-License-Identifier: Apache-2.0
"""Turning an uncertain edge frame into a request that fits its budget, and back on the cloud."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from sage_ros.core.codec import decode_patches, encode_within_budget, extract_patches, min_payload_bytes
from sage_ros.core.errors import BudgetError
from sage_ros.core.models import EdgeOutput
from sage_ros.core.preprocess import normalize
from sage_ros.core.rounds import select_second_round
from sage_ros.core.selection import coverage, select_detailed

if TYPE_CHECKING:
    from sage_ros.core.torch_models import VitModel


@dataclass(frozen=True)
class Budget:
    """Hard limits of one request: patches always, payload bytes when ``max_bytes > 0``."""

    patches: int
    max_bytes: int = 0

    def __post_init__(self) -> None:
        if self.patches < 1:
            raise BudgetError(f'patch budget must be >= 1, got {self.patches}')
        if self.max_bytes < 0:
            raise BudgetError(f'byte budget must be >= 0, got {self.max_bytes}')

    def admits(self, patches: int, payload_bytes: int) -> bool:
        """True when a request of this size is within the budget."""
        return patches <= self.patches and (self.max_bytes == 0 or payload_bytes <= self.max_bytes)


def check_byte_budget(max_bytes: int, encoding: str, *, quality: int = 90) -> None:
    """Refuse a byte budget that is on (> 0) but below the smallest one-patch request.

    For validating a ``byte_budget`` setting up front: raises :class:`BudgetError` with the
    reason, since such a budget would make every request fail.
    """
    if max_bytes < 0:
        raise BudgetError(f'byte budget must be >= 0, got {max_bytes}')
    need = min_payload_bytes(encoding, quality=quality)
    if 0 < max_bytes < need:
        detail = f' at quality {quality}' if encoding == 'jpeg' else ''
        raise BudgetError(f'byte budget of {max_bytes} B cannot hold one {encoding} patch{detail}: '
                          f'the smallest takes {need} B (0 turns the byte budget off)')


@dataclass(frozen=True)
class SelectionConfig:
    """How patches are chosen and encoded (mirrors the node parameters)."""

    method: str = 'sage'
    prefilter_ratio: float = 2.0
    seed: int = 0
    encoding: str = 'jpeg'
    quality: int = 90
    method_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OffloadPlan:
    """The patches chosen for one frame, encoded, guaranteed within the budget."""

    indices: np.ndarray
    payload: bytes
    encoding: str
    quality: int
    truncated_by_method: int
    """Patches a threshold method wanted beyond the patch budget."""
    dropped_for_bytes: int
    """Selected patches dropped (least important first) to meet the byte budget."""
    coverage_7x7: float

    @property
    def num_bytes(self) -> int:
        return len(self.payload)


def plan_offload(crop: np.ndarray, edge: EdgeOutput, budget: Budget, config: SelectionConfig) -> OffloadPlan:
    """Select, encode and trim one frame's patches so the request fits ``budget``.

    Raises :class:`BudgetError` when the byte budget cannot hold even one selected patch.
    """
    sel = select_detailed(
        config.method,
        edge.attention,
        edge.embeddings,
        budget.patches,
        prefilter_ratio=config.prefilter_ratio,
        seed=config.seed,
        **config.method_params,
    )
    return _encoded_plan(crop, sel.indices, budget, config, truncated=sel.truncated)


def plan_second_round(crop: np.ndarray, edge: EdgeOutput, sent: np.ndarray, mode: str, budget: Budget,
                      config: SelectionConfig, *, roi: Sequence[int] | np.ndarray = ()) -> OffloadPlan:
    """The patches a second round adds to ``sent`` (at most ``budget``; ``mode`` and ``roi`` as
    :func:`~sage_ros.core.rounds.select_second_round`), encoded as a request of their own.

    Raises :class:`BudgetError` as :func:`plan_offload`, and SelectionError for a bad ``roi``.
    """
    new = select_second_round(mode, attention=edge.attention, embeddings=edge.embeddings, sent=sent,
                              k=budget.patches, roi=roi, prefilter_ratio=config.prefilter_ratio)
    return _encoded_plan(crop, new, budget, config)


def _encoded_plan(crop: np.ndarray, indices: np.ndarray, budget: Budget, config: SelectionConfig, *,
                  truncated: int = 0) -> OffloadPlan:
    """``indices`` (in selection order) encoded, least important dropped until within ``budget``."""
    payload, kept = encode_within_budget(
        extract_patches(crop, indices), config.encoding, quality=config.quality, max_bytes=budget.max_bytes
    )
    kept_indices = indices[:kept]
    # The guarantee the whole system rests on; cheap enough to check on every request.
    if not budget.admits(int(kept_indices.size), len(payload)):
        raise BudgetError(f'internal: plan of {kept_indices.size} patches / {len(payload)} B exceeds {budget}')
    return OffloadPlan(
        indices=kept_indices,
        payload=payload,
        encoding=config.encoding,
        quality=config.quality if config.encoding == 'jpeg' else 0,
        truncated_by_method=truncated,
        dropped_for_bytes=int(indices.size - kept),
        coverage_7x7=coverage(kept_indices),
    )


def classify_patches(
    vit: VitModel, payload: bytes, encoding: str, indices: np.ndarray
) -> np.ndarray:
    """Cloud side: decode a request's patches and return the server's softmax over classes."""
    idx = np.asarray(indices, dtype=np.int64)
    return classify_decoded(vit, decode_patches(payload, encoding, int(idx.size), patch=vit.patch_size), idx)


def classify_decoded(vit: VitModel, patches: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """The server's softmax for decoded (M, P, P, 3) uint8 patches at grid positions ``indices``."""
    # torch only here, on the cloud: the edge plans requests with this module and no torch.
    import torch

    from sage_ros.core.torch_models import server_forward_subset

    x = normalize(patches, vit.mean, vit.std)
    logits = server_forward_subset(vit, x, torch.from_numpy(np.asarray(indices, dtype=np.int64)))
    return torch.softmax(logits.float(), dim=-1).cpu().numpy()


def classify_batch(vit: VitModel, requests: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The server's softmax for several requests in one forward: ``requests`` are (decoded
    (M_i, P, P, 3) uint8 patches, grid indices (M_i,)). Different M_i are padded to the largest
    and masked (see :func:`server_forward_subset`); returns (len(requests), classes)."""
    return classify_batch_attended(vit, requests, attention=False)[0]


def classify_batch_attended(vit: VitModel, requests: list[tuple[np.ndarray, np.ndarray]], *,
                            attention: bool = True) -> tuple[np.ndarray, list[np.ndarray]]:
    """:func:`classify_batch`, and each request's last-layer CLS attention over its own
    tokens, (M_i,) in the order of its indices (empty arrays when ``attention`` is False)."""
    import torch

    from sage_ros.core.torch_models import server_forward_subset

    n = max(int(np.asarray(idx).size) for _, idx in requests)
    b, p = len(requests), vit.patch_size
    patches = np.zeros((b, n, p, p, 3), np.uint8)
    indices = np.zeros((b, n), np.int64)
    valid = np.zeros((b, n), bool)
    for i, (pt, idx) in enumerate(requests):
        m = int(np.asarray(idx).size)
        patches[i, :m], indices[i, :m], valid[i, :m] = pt, idx, True
    x = normalize(patches.reshape(b * n, p, p, 3), vit.mean, vit.std).reshape(b, n, 3, p, p)
    if not attention:
        logits = server_forward_subset(vit, x, torch.from_numpy(indices), torch.from_numpy(valid))
        return torch.softmax(logits.float(), dim=-1).cpu().numpy(), [np.empty(0, np.float32)] * b
    logits, att = server_forward_subset(vit, x, torch.from_numpy(indices), torch.from_numpy(valid),
                                        return_attention=True)
    att_np = att.float().cpu().numpy()
    rows = [att_np[i, : int(valid[i].sum())] for i in range(b)]
    return torch.softmax(logits.float(), dim=-1).cpu().numpy(), rows


def size_groups(token_counts: list[int], *, pad_limit: float = 2.0) -> list[list[int]]:
    """Positions of requests grouped for padded forwards, smallest first: within a group the
    largest has at most ``pad_limit`` times the tokens of the smallest (plus CLS), so padding
    never costs a small request a big one's time."""
    order = sorted(range(len(token_counts)), key=lambda i: token_counts[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and token_counts[i] + 1 <= pad_limit * (token_counts[groups[-1][0]] + 1):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups
