# SPDX-License-Identifier: Apache-2.0
"""sensor_msgs/Image and CompressedImage to and from numpy, without cv_bridge.

Duck-typed on the message fields, so it imports no ROS module and is tested without ROS.
"""

from __future__ import annotations

import io
import math
from typing import Any, Iterable

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
# A JPEG decodes straight at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling), for about
# the cost of decoding an image that size plus reading the file: a 12 MP frame that the model
# sees at 224x224 need not be decoded at 12 MP. Largest reduction first.
_JPEG_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
# The reduced frame keeps at least this many times the side the model's transform resizes
# to. libjpeg reduces by averaging 2x2..8x8 blocks (a box filter), the model's transform by an
# antialiased bicubic; with twice the side left, the bicubic still does the band-limiting, and
# the crop differs from the full decode's by 0.3-0.6 grey levels (mean, real photographs at
# 1080p to 12 MP), against 1.2-2.5 at the side itself, for little more time (a 12 MP q90 frame
# here: 79 ms at 1/4, 60 ms at 1/8, 378 ms at full size, decode and crop): reading the file
# costs the same at any scale.
_DECODE_MARGIN = 2


def check_frame_size(width: int, height: int, max_pixels: int = MAX_PIXELS) -> None:
    """:func:`check_frame_geometry`, then the camera's own pixel limit ``max_pixels`` (the
    edge's ``max_frame_pixels``: what the robot's camera can send; a larger frame is not from
    it). Raises :class:`PreprocessError` naming the limit broken."""
    check_frame_geometry(width, height)
    if int(width) * int(height) > max_pixels:
        raise PreprocessError(f'image {width}x{height}: {int(width) * int(height)} pixels exceeds '
                              f'max_frame_pixels {max_pixels}')


def decode_short_side(input_size: int, crop_pct: float) -> int:
    """The shorter side a frame keeps when decoded reduced: ``_DECODE_MARGIN`` times the side
    :func:`~sage_ros.core.preprocess.resize_crop` scales it to, ``floor(input_size / crop_pct)``
    (2 x 248 for DeiT's 224 / 0.9)."""
    return _DECODE_MARGIN * math.floor(input_size / crop_pct)


def jpeg_reduction(width: int, height: int, min_short_side: int) -> int:
    """The largest of 8, 4 and 2 that divides both sides of a ``width`` x ``height`` JPEG and
    leaves its shorter side at least ``min_short_side``, else 1 (full size; also for
    ``min_short_side`` 0).

    An exact divisor keeps the aspect ratio exact, so the model's resize and centre crop of the
    reduced frame cut the same region, to the pixel, as of the full one (camera modes are
    multiples of 8 or 16: 4056x3040, 4608x2592, 1920x1080, ...). With ``min_short_side`` =
    :func:`decode_short_side`, that resize still only shrinks.
    """
    if min_short_side <= 0:
        return 1
    w, h = int(width), int(height)
    for factor, _ in _JPEG_REDUCED:
        if w % factor == 0 and h % factor == 0 and min(w, h) // factor >= min_short_side:
            return factor
    return 1


def image_to_rgb(msg: Any, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """A sensor_msgs/Image (any supported 8-bit encoding) as HxWx3 uint8 RGB.

    Checks the size (:func:`check_frame_size`), ``step`` and the data length against the
    declared size; raises :class:`PreprocessError` with the reason for anything inconsistent.
    """
    enc = str(msg.encoding).lower()
    if enc not in CHANNELS:
        raise PreprocessError(f'unsupported image encoding {msg.encoding!r}')
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    check_frame_size(w, h, max_pixels)
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


def decode_compressed(msg: Any, *, max_pixels: int = MAX_PIXELS,
                      min_short_side: int = 0) -> tuple[np.ndarray, tuple[int, int]]:
    """A sensor_msgs/CompressedImage (png, jpeg, webp or bmp) as HxWx3 uint8 RGB, and the
    frame's full size (width, height) in the orientation it decoded to.

    The size in the image header is checked with :func:`check_frame_size` before anything is
    decoded, so a small file claiming a huge image costs no more than reading its header. A
    JPEG is decoded at the smallest scale that keeps its shorter side at least
    ``min_short_side`` (:func:`jpeg_reduction`; 0: full size), so the array can be smaller than
    the full size.
    """
    data = bytes(msg.data)
    if not data:
        raise PreprocessError('empty compressed image')
    name, w, h = read_compressed_size(data, str(msg.format))
    check_frame_size(w, h, max_pixels)
    factor = jpeg_reduction(w, h, min_short_side) if name == 'JPEG' else 1
    flags = dict(_JPEG_REDUCED).get(factor, cv2.IMREAD_COLOR)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if img is None:
        raise PreprocessError(f'cannot decode compressed image ({name}, format {msg.format!r})')
    # OpenCV applies the EXIF orientation, so a rotated JPEG decodes as h x w; any other size
    # means the decoder read something the header did not describe.
    rh, rw = h // factor, w // factor
    if img.shape[:2] == (rh, rw):
        size = (w, h)
    elif img.shape[:2] == (rw, rh):
        size = (h, w)
    else:
        at = f' at 1/{factor}' if factor > 1 else ''
        raise PreprocessError(f'{name} header says {w}x{h} but it decoded{at} to {img.shape[1]}x{img.shape[0]}')
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB), size


def compressed_to_rgb(msg: Any, *, max_pixels: int = MAX_PIXELS, min_short_side: int = 0) -> np.ndarray:
    """The RGB array of :func:`decode_compressed` (full size unless ``min_short_side`` > 0)."""
    return decode_compressed(msg, max_pixels=max_pixels, min_short_side=min_short_side)[0]


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


def draw_boxes(rgb: np.ndarray, boxes: Iterable[tuple[float, float, float, float]]) -> np.ndarray:
    """A copy of ``rgb`` with each (x0, y0, x1, y1) box outlined in yellow, one pixel wide."""
    canvas = np.array(rgb, order='C')  # a copy: cv2 draws in place
    for box in boxes:
        x0, y0, x1, y1 = (int(round(v)) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1 - 1, y1 - 1), (255, 255, 0), 1)
    return canvas
