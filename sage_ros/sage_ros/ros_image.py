# SPDX-License-Identifier: Apache-2.0
"""sensor_msgs/Image and CompressedImage to and from numpy, without cv_bridge.

Duck-typed on the message fields, so it imports no ROS module and is tested without ROS.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

from sage_ros.core.errors import PreprocessError
from sage_ros.core.preprocess import CHANNELS, to_rgb

# Frames larger than this are refused before any copy (a 16k x 16k RGB frame is 768 MB).
MAX_PIXELS = 50_000_000


def image_to_rgb(msg: Any) -> np.ndarray:
    """A sensor_msgs/Image (any supported 8-bit encoding) as HxWx3 uint8 RGB.

    Checks ``step`` and the data length against the declared size; raises
    :class:`PreprocessError` with the reason for anything inconsistent.
    """
    enc = str(msg.encoding).lower()
    if enc not in CHANNELS:
        raise PreprocessError(f'unsupported image encoding {msg.encoding!r}')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h <= 0 or w <= 0:
        raise PreprocessError(f'empty image {w}x{h}')
    if h * w > MAX_PIXELS:
        raise PreprocessError(f'image {w}x{h} exceeds {MAX_PIXELS} pixels')
    ch = CHANNELS[enc]
    row = w * ch
    if step < row:
        raise PreprocessError(f'step {step} is smaller than width*channels {row}')
    data = msg.data
    buf = np.frombuffer(data if isinstance(data, (bytes, bytearray, memoryview)) else memoryview(data), np.uint8)
    if buf.size < step * (h - 1) + row:
        raise PreprocessError(f'data holds {buf.size} bytes, {w}x{h} {enc} with step {step} needs {step * h}')
    rows = np.lib.stride_tricks.as_strided(buf, shape=(h, row), strides=(step, 1))
    return to_rgb(rows.reshape(h, w, ch), enc)


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """A sensor_msgs/CompressedImage (jpeg/png) as HxWx3 uint8 RGB."""
    buf = np.frombuffer(bytes(msg.data), np.uint8)
    if buf.size == 0:
        raise PreprocessError('empty compressed image')
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    if img is None:
        raise PreprocessError(f'cannot decode compressed image (format {msg.format!r})')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = 'rgb8') -> dict[str, Any]:
    """Fields of a sensor_msgs/Image holding ``rgb`` in ``encoding`` (rgb8, bgr8 or mono8)."""
    if encoding == 'rgb8':
        arr = rgb
    elif encoding == 'bgr8':
        arr = rgb[:, :, ::-1]
    elif encoding == 'mono8':
        arr = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    else:
        raise ValueError(f'cannot write encoding {encoding!r}')
    arr = np.ascontiguousarray(arr)
    h, w = arr.shape[:2]
    return {'height': h, 'width': w, 'encoding': encoding, 'is_bigendian': 0,
            'step': arr.strides[0], 'data': arr.tobytes()}
