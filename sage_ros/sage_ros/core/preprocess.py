# SPDX-License-Identifier: Apache-2.0
"""Camera frame to model input, exactly as timm's eval transform, with the way back recorded.

timm's eval transform for a ViT is: resize the shorter side to ``floor(input_size / crop_pct)``
with bicubic (PIL, antialiased), centre crop ``input_size``, scale to [0, 1], normalise with
mean/std. The uint8 crop is kept as well: patches are cut from it for the wire, so the cloud
can normalise them for its own model.

No torch here: numpy, OpenCV (colour conversions) and Pillow, whose antialiased resize is the
one timm's transform runs (OpenCV's bicubic does not antialias when it shrinks, so only
Pillow gives the same pixels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from sage_ros.core.errors import PreprocessError

# Conversions to RGB for the image encodings cameras publish (sensor_msgs/Image names).
_TO_RGB = {
    'rgb8': None,
    'bgr8': cv2.COLOR_BGR2RGB,
    'rgba8': cv2.COLOR_RGBA2RGB,
    'bgra8': cv2.COLOR_BGRA2RGB,
    'mono8': cv2.COLOR_GRAY2RGB,
    'yuv422': cv2.COLOR_YUV2RGB_UYVY,  # ROS "yuv422" is UYVY
    'uyvy': cv2.COLOR_YUV2RGB_UYVY,
    'yuv422_yuy2': cv2.COLOR_YUV2RGB_YUYV,
    'yuyv': cv2.COLOR_YUV2RGB_YUYV,
}
CHANNELS = {'rgb8': 3, 'bgr8': 3, 'rgba8': 4, 'bgra8': 4, 'mono8': 1,
            'yuv422': 2, 'uyvy': 2, 'yuv422_yuy2': 2, 'yuyv': 2}
ENCODINGS = tuple(_TO_RGB)

_PIL_INTERP = {'bicubic': Image.Resampling.BICUBIC, 'bilinear': Image.Resampling.BILINEAR,
               'nearest': Image.Resampling.NEAREST, 'lanczos': Image.Resampling.LANCZOS}

# Limits on the size of a camera frame, checked before any pixel is copied or decoded.
# resize_crop scales the shorter side to S = floor(input_size / crop_pct) (256 for the default
# 224 / 0.875) and centre-crops input_size, so for any positive size it cannot fail; what the
# limits bound is the cost and the meaning of its output:
# - MAX_PIXELS: a 50 MP frame is 150 MB as RGB; beyond that a frame is refused before the copy.
# - MIN_SIDE: the crop covers crop_pct of the shorter side and is cut into input_size / 16
#   patches across (14 at 224), so a shorter side of 16 px (14 px after a 0.875 crop) is the
#   least that gives every patch at least one source pixel of its own. Below it, neighbouring
#   patches are interpolations of the same pixels and patch selection means nothing.
# - MAX_ASPECT: the resized frame is S x (aspect * S); at 32:1 that is at most 256 x 8192
#   (6 MB) for the default transform, while a 1 x 7,000,000 strip would resize to 256 x 1.8e9.
#   32:1 also admits every real camera layout (panoramas and side-by-side stereo are <= 8:1).
MAX_PIXELS = 50_000_000
MIN_SIDE = 16
MAX_ASPECT = 32


def check_frame_geometry(width: int, height: int) -> None:
    """Refuse a frame size that :func:`resize_crop` cannot turn into a sound model input.

    Raises :class:`PreprocessError` naming every limit the size breaks (see ``MAX_PIXELS``,
    ``MIN_SIDE`` and ``MAX_ASPECT``); needs only the size, so it runs before any decode.
    """
    w, h = int(width), int(height)
    if w <= 0 or h <= 0:
        raise PreprocessError(f'empty image {w}x{h}')
    short, long = min(w, h), max(w, h)
    problems = []
    if w * h > MAX_PIXELS:
        problems.append(f'{w * h} pixels exceeds {MAX_PIXELS} pixels')
    if long > MAX_ASPECT * short:
        ratio = f'{long // short}:1' if long % short == 0 else f'{long / short:.1f}:1'
        problems.append(f'aspect ratio {ratio} is more than the {MAX_ASPECT}:1 accepted')
    if short < MIN_SIDE:
        problems.append(f'shorter side {short} px is less than the {MIN_SIDE} px a patch grid needs')
    if problems:
        raise PreprocessError(f'image {w}x{h}: ' + '; '.join(problems))


@dataclass(frozen=True)
class CropMap:
    """How the model input was cut from the source frame (all sizes in pixels)."""

    source_width: int
    source_height: int
    resized_width: int
    resized_height: int
    crop_x: int
    crop_y: int
    input_size: int

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        """Model-input pixel coordinates to source-frame pixel coordinates."""
        sx = self.source_width / self.resized_width
        sy = self.source_height / self.resized_height
        return ((x + self.crop_x) * sx, (y + self.crop_y) * sy)

    def patch_box(self, index: int, patch: int = 16) -> tuple[float, float, float, float]:
        """Box (x0, y0, x1, y1) in the source frame covered by patch ``index`` (row-major)."""
        cols = self.input_size // patch
        r, c = divmod(int(index), cols)
        x0, y0 = self.to_source(c * patch, r * patch)
        x1, y1 = self.to_source((c + 1) * patch, (r + 1) * patch)
        return (x0, y0, x1, y1)


def to_rgb(frame: np.ndarray, encoding: str = 'rgb8') -> np.ndarray:
    """Any supported 8-bit frame to a contiguous HxWx3 uint8 RGB array."""
    enc = encoding.lower()
    if enc not in _TO_RGB:
        raise PreprocessError(f'unsupported image encoding {encoding!r}; supported: {", ".join(ENCODINGS)}')
    if frame.dtype != np.uint8:
        raise PreprocessError(f'expected 8-bit pixels, got {frame.dtype}')
    ch = CHANNELS[enc]
    if frame.ndim == 2 and ch == 1:
        frame = frame[:, :, None]
    if frame.ndim != 3 or frame.shape[2] != ch:
        raise PreprocessError(f'{encoding} frame must be HxWx{ch}, got shape {frame.shape}')
    h, w = frame.shape[:2]
    if h < 1 or w < 1:
        raise PreprocessError(f'empty frame {w}x{h}')
    if ch == 2 and w % 2:
        raise PreprocessError(f'{encoding} needs an even width, got {w}')
    code = _TO_RGB[enc]
    if code is None:
        return np.ascontiguousarray(frame)
    src = frame[:, :, 0] if ch == 1 else np.ascontiguousarray(frame)
    return cv2.cvtColor(src, code)


def resize_crop(
    rgb: np.ndarray,
    *,
    input_size: int = 224,
    crop_pct: float = 0.875,
    interpolation: str = 'bicubic',
) -> tuple[np.ndarray, CropMap]:
    """Resize the shorter side to ``floor(input_size / crop_pct)``, centre crop ``input_size``.

    Same arithmetic as torchvision's ``Resize(int)`` + ``CenterCrop`` on a PIL image, which is
    what timm's eval transform runs. Returns the uint8 crop and its :class:`CropMap`.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise PreprocessError(f'expected HxWx3 uint8 RGB, got {rgb.shape} {rgb.dtype}')
    if not 0.0 < crop_pct <= 1.0:
        raise PreprocessError(f'crop_pct must be in (0, 1], got {crop_pct}')
    if interpolation not in _PIL_INTERP:
        raise PreprocessError(f'unsupported interpolation {interpolation!r}')
    h, w = rgb.shape[:2]
    scale = math.floor(input_size / crop_pct)
    if w <= h:
        new_w, new_h = scale, int(scale * h / w)
    else:
        new_w, new_h = int(scale * w / h), scale
    img = Image.fromarray(rgb)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), _PIL_INTERP[interpolation])
    left = int(round((new_w - input_size) / 2.0))
    top = int(round((new_h - input_size) / 2.0))
    crop = np.asarray(img.crop((left, top, left + input_size, top + input_size)))
    return np.ascontiguousarray(crop), CropMap(w, h, new_w, new_h, left, top, input_size)


def normalize(
    crop: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> np.ndarray:
    """uint8 HxWx3 (or NxHxWx3) to float32 CHW (NCHW): ``(x / 255 - mean) / std``.

    The same float32 operations, in the same order, as timm's eval transform (torchvision's
    ``ToTensor`` then ``Normalize``), so the result is the same tensor; numpy only, so the edge
    needs no torch for it.
    """
    x = np.asarray(crop)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
        raise PreprocessError(f'expected uint8 HxWx3 or NxHxWx3, got {x.shape} {x.dtype}')
    t = np.moveaxis(x, -1, -3).astype(np.float32, order='C')  # a copy: crops may be read-only views
    t /= np.float32(255.0)
    t -= np.asarray(mean, np.float32).reshape(3, 1, 1)
    t /= np.asarray(std, np.float32).reshape(3, 1, 1)
    return t
