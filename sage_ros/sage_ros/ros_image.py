# SPDX-License-Identifier: Apache-2.0
"""sensor_msgs/Image and CompressedImage to and from numpy, without cv_bridge.

Duck-typed on the message fields, so it imports no ROS module and is tested without ROS.
"""

from __future__ import annotations

import io
from typing import Any

import cv2
import numpy as np
from PIL import BmpImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from sage_ros.core.errors import PreprocessError
from sage_ros.core.preprocess import CHANNELS, MAX_PIXELS, check_frame_geometry, to_rgb

# Compressed formats whose header is read (by Pillow, no pixels decoded) before OpenCV decodes
# them, told apart by their magic bytes. Anything else is refused: its size cannot be known
# without decoding it.
_HEADERS = (
    ('PNG', b'\x89PNG\r\n\x1a\n', PngImagePlugin.PngImageFile),
    ('JPEG', b'\xff\xd8\xff', JpegImagePlugin.JpegImageFile),
    ('WebP', b'RIFF', WebPImagePlugin.WebPImageFile),  # RIFF....WEBP
    ('BMP', b'BM', BmpImagePlugin.BmpImageFile),
)


def image_to_rgb(msg: Any) -> np.ndarray:
    """A sensor_msgs/Image (any supported 8-bit encoding) as HxWx3 uint8 RGB.

    Checks ``step`` and the data length against the declared size; raises
    :class:`PreprocessError` with the reason for anything inconsistent.
    """
    enc = str(msg.encoding).lower()
    if enc not in CHANNELS:
        raise PreprocessError(f'unsupported image encoding {msg.encoding!r}')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    check_frame_geometry(w, h)
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


def read_compressed_size(data: bytes, fmt: str = '') -> tuple[str, int, int]:
    """(format, width, height) from a compressed image's header, without decoding a pixel.

    ``fmt`` is the message's ``format`` field, only quoted in errors. Raises
    :class:`PreprocessError` when the data is not a PNG, JPEG, WebP or BMP image or its header
    cannot be read.
    """
    for name, magic, reader in _HEADERS:
        if not data.startswith(magic) or (name == 'WebP' and data[8:12] != b'WEBP'):
            continue
        try:
            with reader(io.BytesIO(data)) as header:
                width, height = header.size
        except Image.DecompressionBombError as exc:
            # Pillow refuses some headers itself, always far above MAX_PIXELS.
            raise PreprocessError(f'{name} image exceeds {MAX_PIXELS} pixels: {exc}') from None
        except Exception as exc:  # Pillow raises many types for a broken header
            raise PreprocessError(f'cannot read the {name} header of a compressed image '
                                  f'(format {fmt!r}): {exc}') from None
        return name, int(width), int(height)
    names = [name for name, _, _ in _HEADERS]
    raise PreprocessError(f'compressed image (format {fmt!r}, starting {data[:8].hex(" ")}) is not '
                          f'a {", ".join(names[:-1])} or {names[-1]} image')


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """A sensor_msgs/CompressedImage (png, jpeg, webp or bmp) as HxWx3 uint8 RGB.

    The size in the image header is checked with :func:`check_frame_geometry` before anything
    is decoded, so a small file claiming a huge image costs no more than reading its header.
    """
    data = bytes(msg.data)
    if not data:
        raise PreprocessError('empty compressed image')
    name, w, h = read_compressed_size(data, str(msg.format))
    check_frame_geometry(w, h)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise PreprocessError(f'cannot decode compressed image ({name}, format {msg.format!r})')
    # OpenCV applies the EXIF orientation, so a rotated JPEG decodes as h x w; any other size
    # means the decoder read something the header did not describe.
    if img.shape[:2] not in ((h, w), (w, h)):
        raise PreprocessError(f'{name} header says {w}x{h} but it decoded to {img.shape[1]}x{img.shape[0]}')
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
