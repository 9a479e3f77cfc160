# SPDX-License-Identifier: Apache-2.0
"""Checks a cloud runs on every offload request before touching its payload."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from sage_ros.core.codec import ENCODINGS, raw_patch_bytes
from sage_ros.core.errors import SageError


class RequestError(SageError, ValueError):
    """An offload request is inconsistent or outside what the cloud accepts."""


@dataclass(frozen=True)
class RequestLimits:
    """What this cloud accepts: its model's geometry and the largest request."""

    grid_rows: int = 14
    grid_cols: int = 14
    patch_size: int = 16
    input_size: int = 224
    max_budget: int = 196
    max_payload_bytes: int = 150528


def check_request(
    *,
    indices: Sequence[int],
    budget_patches: int,
    encoding: str,
    payload_len: int,
    patch_size: int,
    grid_rows: int,
    grid_cols: int,
    input_size: int,
    limits: RequestLimits,
) -> None:
    """Raise :class:`RequestError` saying what is wrong, or return for a valid request."""
    if (patch_size, grid_rows, grid_cols, input_size) != (
        limits.patch_size, limits.grid_rows, limits.grid_cols, limits.input_size
    ):
        raise RequestError(
            f'geometry {input_size}px/{patch_size}px/{grid_rows}x{grid_cols} does not match the server '
            f'({limits.input_size}px/{limits.patch_size}px/{limits.grid_rows}x{limits.grid_cols})'
        )
    n = len(indices)
    if n == 0:
        raise RequestError('no patches')
    if budget_patches < 1 or budget_patches > limits.max_budget:
        raise RequestError(f'declared budget {budget_patches} outside 1..{limits.max_budget}')
    if n > budget_patches:
        raise RequestError(f'{n} patches exceed the declared budget {budget_patches}')
    total = limits.grid_rows * limits.grid_cols
    if min(indices) < 0 or max(indices) >= total:
        raise RequestError(f'patch index outside 0..{total - 1}')
    if len(set(indices)) != n:
        raise RequestError('duplicate patch indices')
    if encoding not in ENCODINGS:
        raise RequestError(f'unknown encoding {encoding!r}')
    if payload_len > limits.max_payload_bytes:
        raise RequestError(f'payload of {payload_len} B exceeds the limit {limits.max_payload_bytes} B')
    if encoding == 'raw' and payload_len != n * raw_patch_bytes(patch_size):
        raise RequestError(f'raw payload of {n} patches must be {n * raw_patch_bytes(patch_size)} B, got {payload_len}')
    if encoding != 'raw' and payload_len == 0:
        raise RequestError('empty payload')
