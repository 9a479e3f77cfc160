# SPDX-License-Identifier: Apache-2.0
"""The whole frame as one JPEG of at most a given size: the reference a robotics user asks
for first (do B patches beat a smaller JPEG of the same bytes?)."""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

QUALITIES = tuple(range(95, 4, -5))  # 95, 90, ..., 5
SCALES = tuple(s / 20 for s in range(19, 0, -1))  # 0.95, 0.90, ..., 0.05


@dataclass(frozen=True)
class FrameJpeg:
    """A crop encoded to fit a byte budget, and what the server sees after decoding it."""

    decoded: np.ndarray
    """(S, S, 3) uint8 RGB at the crop's size (upscaled back when it was sent smaller)."""
    num_bytes: int
    quality: int
    scale: float
    """1.0, or the downscale needed when even quality 5 was too big."""


def _encode(rgb: np.ndarray, quality: int) -> bytes:
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError('JPEG encoding failed')
    return buf.tobytes()


def encode_frame_within(crop: np.ndarray, max_bytes: int) -> FrameJpeg | None:
    """The highest quality whose JPEG of ``crop`` takes at most ``max_bytes``; if even quality
    5 is too big, the largest downscale (at quality 5) that fits. None if nothing fits."""
    size = crop.shape[0]
    for quality in QUALITIES:
        data = _encode(crop, quality)
        if len(data) <= max_bytes:
            return FrameJpeg(_decode(data, size), len(data), quality, 1.0)
    for scale in SCALES:
        side = max(8, int(round(size * scale)))
        small = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        data = _encode(small, QUALITIES[-1])
        if len(data) <= max_bytes:
            return FrameJpeg(_decode(data, size), len(data), QUALITIES[-1], scale)
    return None


def _decode(data: bytes, size: int) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    if img.shape[0] != size:
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
    return np.ascontiguousarray(img)
