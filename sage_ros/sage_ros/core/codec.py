# SPDX-License-Identifier: Apache-2.0
"""Patch codecs: selected 16x16 RGB patches to wire bytes and back.

``raw`` sends the pixels as they are (768 bytes a patch). ``png`` and ``jpeg`` pack the
patches edge to edge into a mosaic whose 16x16 cells line up with JPEG's 8x8 blocks and
16x16 chroma MCUs, so no patch bleeds into its neighbour, and compress the mosaic.
"""

from __future__ import annotations

import functools
import io
import math
from typing import TYPE_CHECKING

import cv2
import numpy as np
from PIL import Image

from sage_ros.core.errors import BudgetError, CodecError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

PATCH = 16
ENCODINGS = ('raw', 'png', 'jpeg')


def raw_patch_bytes(patch: int = PATCH) -> int:
    """Bytes of one raw RGB patch."""
    return patch * patch * 3


@functools.lru_cache(maxsize=64)
def min_payload_bytes(encoding: str, *, quality: int = 90, patch: int = PATCH) -> int:
    """Payload bytes of the smallest one-patch request :func:`encode_patches` makes.

    A lower bound for byte budgets: a budget under it can carry no patch at all. It is the
    smallest encoding of a flat patch (black, grey or white), which compresses best; real
    patches are usually larger (a detailed jpeg patch at quality 90 is ~850 B against ~630 B),
    so a budget at exactly this bound may still fit no patch of a real frame.
    """
    if encoding == 'raw':
        return raw_patch_bytes(patch)
    return min(
        len(encode_patches(np.full((1, patch, patch, 3), value, np.uint8), encoding, quality=quality))
        for value in (0, 128, 255)
    )


def extract_patches(image: np.ndarray, indices: ArrayLike, *, patch: int = PATCH) -> np.ndarray:
    """Cut the patches ``indices`` (row-major on the patch grid) out of an HxWx3 uint8 image."""
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise CodecError(f'expected an HxWx3 uint8 image, got {image.shape} {image.dtype}')
    h, w = image.shape[:2]
    if h % patch or w % patch:
        raise CodecError(f'image {w}x{h} is not a whole number of {patch}px patches')
    cols = w // patch
    idx = np.asarray(indices, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= (h // patch) * cols):
        raise CodecError('patch index out of range')
    # (rows, p, cols, p, 3) -> (rows*cols, p, p, 3) view, then a gather.
    blocks = image.reshape(h // patch, patch, cols, patch, 3).swapaxes(1, 2).reshape(-1, patch, patch, 3)
    return blocks[idx]


def place_patches(
    patches: np.ndarray, indices: ArrayLike, *, grid: tuple[int, int] = (14, 14), fill: int = 0
) -> np.ndarray:
    """Paste patches back at their grid positions on a ``fill``-coloured canvas."""
    n, p = patches.shape[0], patches.shape[1]
    rows, cols = grid
    canvas = np.full((rows, cols, p, p, 3), fill, dtype=np.uint8).reshape(rows * cols, p, p, 3)
    canvas[np.asarray(indices, dtype=np.int64)[:n]] = patches
    return canvas.reshape(rows, cols, p, p, 3).swapaxes(1, 2).reshape(rows * p, cols * p, 3)


def mosaic_shape(count: int) -> tuple[int, int]:
    """(rows, cols) of cells in the mosaic that holds ``count`` patches: near-square."""
    if count <= 0:
        return (0, 0)
    cols = math.ceil(math.sqrt(count))
    return (math.ceil(count / cols), cols)


def _to_mosaic(patches: np.ndarray) -> np.ndarray:
    m, p = patches.shape[0], patches.shape[1]
    rows, cols = mosaic_shape(m)
    cells = np.zeros((rows * cols, p, p, 3), dtype=np.uint8)
    cells[:m] = patches
    return cells.reshape(rows, cols, p, p, 3).swapaxes(1, 2).reshape(rows * p, cols * p, 3)


def _from_mosaic(mosaic: np.ndarray, count: int, patch: int) -> np.ndarray:
    rows, cols = mosaic_shape(count)
    cells = mosaic.reshape(rows, patch, cols, patch, 3).swapaxes(1, 2).reshape(-1, patch, patch, 3)
    return np.ascontiguousarray(cells[:count])


def _check_patches(patches: np.ndarray) -> None:
    if patches.ndim != 4 or patches.shape[3] != 3 or patches.shape[1] != patches.shape[2]:
        raise CodecError(f'expected patches of shape (M, P, P, 3), got {patches.shape}')
    if patches.dtype != np.uint8:
        raise CodecError(f'expected uint8 patches, got {patches.dtype}')


def encode_patches(patches: np.ndarray, encoding: str, *, quality: int = 90) -> bytes:
    """Encode (M, P, P, 3) uint8 RGB patches with ``encoding`` (``raw``, ``png`` or ``jpeg``)."""
    _check_patches(patches)
    if encoding == 'raw':
        return np.ascontiguousarray(patches).tobytes()
    if patches.shape[0] == 0:
        return b''
    bgr = _to_mosaic(patches)[:, :, ::-1]
    if encoding == 'jpeg':
        if not 1 <= quality <= 100:
            raise CodecError(f'JPEG quality must be 1..100, got {quality}')
        ok, buf = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif encoding == 'png':
        ok, buf = cv2.imencode('.png', bgr, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    else:
        raise CodecError(f'unknown encoding {encoding!r}; choose from {", ".join(ENCODINGS)}')
    if not ok:
        raise CodecError(f'{encoding} encoding failed')
    return buf.tobytes()


def decode_patches(payload: bytes, encoding: str, count: int, *, patch: int = PATCH) -> np.ndarray:
    """Decode ``count`` patches; the payload must be exactly what :func:`encode_patches` makes.

    The image header is checked before any pixel is decoded, so a payload claiming a huge
    image is refused without allocating it.
    """
    if count < 0:
        raise CodecError(f'negative patch count {count}')
    if encoding == 'raw':
        expected = count * raw_patch_bytes(patch)
        if len(payload) != expected:
            raise CodecError(f'raw payload of {count} patches must be {expected} bytes, got {len(payload)}')
        return np.frombuffer(payload, dtype=np.uint8).reshape(count, patch, patch, 3).copy()
    if encoding not in ENCODINGS:
        raise CodecError(f'unknown encoding {encoding!r}; choose from {", ".join(ENCODINGS)}')
    if count == 0:
        if payload:
            raise CodecError('payload present for zero patches')
        return np.zeros((0, patch, patch, 3), dtype=np.uint8)
    rows, cols = mosaic_shape(count)
    want = (cols * patch, rows * patch)
    try:
        with Image.open(io.BytesIO(payload)) as header:
            fmt, size = header.format, header.size
    except Exception as exc:  # PIL raises many types for garbage; all mean "not an image"
        raise CodecError(f'{encoding} payload is not a readable image: {exc}') from None
    if fmt != {'png': 'PNG', 'jpeg': 'JPEG'}[encoding]:
        raise CodecError(f'payload is {fmt}, not {encoding}')
    if size != want:
        raise CodecError(f'mosaic of {count} patches must be {want[0]}x{want[1]}, got {size[0]}x{size[1]}')
    bgr = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (want[1], want[0]):
        raise CodecError(f'{encoding} payload could not be decoded')
    return _from_mosaic(np.ascontiguousarray(bgr[:, :, ::-1]), count, patch)


def encode_within_budget(
    patches: np.ndarray, encoding: str, *, quality: int = 90, max_bytes: int = 0
) -> tuple[bytes, int]:
    """Encode the longest prefix of ``patches`` whose payload fits ``max_bytes`` (0: no limit).

    Patches are in selection order, so dropping from the end drops the least important.
    Returns the payload and how many patches it holds. Raises :class:`BudgetError` when
    ``max_bytes`` cannot hold even the first patch, rather than returning an empty request.
    """
    _check_patches(patches)
    m = patches.shape[0]
    if max_bytes < 0:
        raise BudgetError(f'max_bytes must be >= 0, got {max_bytes}')
    if max_bytes == 0:
        return encode_patches(patches, encoding, quality=quality), m
    if encoding == 'raw':
        k = min(m, max_bytes // raw_patch_bytes(patches.shape[1]))
        best = (encode_patches(patches[:k], encoding), k)
    else:
        full = encode_patches(patches, encoding, quality=quality)
        if len(full) <= max_bytes:
            return full, m
        # Size grows with the count almost monotonically; binary search, then keep the best
        # fit. 0 is not searched: if nothing fits, 1 was tried and failed.
        lo, hi, best = 1, m - 1, (b'', 0)
        while lo <= hi:
            mid = (lo + hi) // 2
            data = encode_patches(patches[:mid], encoding, quality=quality)
            if len(data) <= max_bytes:
                best, lo = (data, mid), mid + 1
            else:
                hi = mid - 1
    if m and not best[1]:
        one = len(encode_patches(patches[:1], encoding, quality=quality))
        raise BudgetError(f'byte budget of {max_bytes} B cannot hold one {encoding} patch: the first '
                          f'selected patch takes {one} B (the smallest possible takes '
                          f'{min_payload_bytes(encoding, quality=quality, patch=patches.shape[1])} B)')
    return best
