# SPDX-License-Identifier: Apache-2.0
"""Bounded work per frame: sizes refused before decoding, the camera's pixel limit, JPEG frames
decoded at the scale the model needs, byte budgets below one patch."""

from __future__ import annotations

import io
import struct
import time
import zlib
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sage_ros.core import (
    Budget,
    BudgetError,
    EdgeOutput,
    PreprocessError,
    SelectionConfig,
    check_byte_budget,
    check_frame_geometry,
    encode_patches,
    encode_within_budget,
    min_payload_bytes,
    plan_offload,
    resize_crop,
)
from sage_ros.core.preprocess import MAX_ASPECT, MAX_PIXELS, MIN_SIDE, normalize
from sage_ros.commands.images import list_images, read_rgb
from sage_ros.ros.ros_image import (
    compressed_to_rgb,
    decode_compressed,
    decode_short_side,
    image_to_rgb,
    jpeg_reduction,
    read_compressed_size,
)

# DeiT's eval transform (timm: 224 px, crop_pct 0.9), as the edge runs it.
INPUT, CROP_PCT = 224, 0.9
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))


def _png_of_zeros(width: int, height: int) -> bytes:
    """A genuine 1-bit greyscale PNG, streamed so a huge one costs little memory to make."""
    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then zero bits
    z = zlib.compressobj(9)
    idat = b''.join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack('>IIBBBBB', width, height, 1, 0, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', idat) + _chunk(b'IEND', b'')


def _compressed(data: bytes, fmt: str = 'png') -> SimpleNamespace:
    return SimpleNamespace(format=fmt, data=data)


def _raw(width: int, height: int, encoding: str, channels: int) -> SimpleNamespace:
    return SimpleNamespace(height=height, width=width, encoding=encoding, step=width * channels,
                           data=bytes(width * height * channels))


def test_png_helper_makes_real_pngs():
    rgb = compressed_to_rgb(_compressed(_png_of_zeros(64, 48)))
    assert rgb.shape == (48, 64, 3) and not rgb.any()


def test_a_huge_png_is_refused_from_its_header_in_milliseconds():
    data = _png_of_zeros(20000, 20000)  # 400 MP; OpenCV takes ~9 s to decode it
    assert len(data) < 1_000_000
    start = time.perf_counter()
    with pytest.raises(PreprocessError, match=f'image 20000x20000: 400000000 pixels exceeds {MAX_PIXELS}'):
        compressed_to_rgb(_compressed(data))
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(('width', 'height'), [(7_000_000, 1), (1, 7_000_000)])
def test_raw_strips_are_refused_naming_the_aspect_ratio(width, height):
    with pytest.raises(PreprocessError, match='aspect ratio 7000000:1 is more than the 32:1') as err:
        image_to_rgb(_raw(width, height, 'rgb8', 3))
    assert f'image {width}x{height}' in str(err.value)
    assert 'shorter side 1 px' in str(err.value)


def test_a_40_megapixel_mono_strip_is_refused():
    with pytest.raises(PreprocessError, match='image 1x40000000: aspect ratio 40000000:1'):
        image_to_rgb(_raw(1, 40_000_000, 'mono8', 1))
    # Over the pixel limit as well: every broken limit is named.
    with pytest.raises(PreprocessError, match=f'60000000 pixels exceeds {MAX_PIXELS}.*aspect ratio 60000000:1'):
        image_to_rgb(_raw(60_000_000, 1, 'mono8', 1))


def test_compressed_strips_are_refused_before_decoding():
    with pytest.raises(PreprocessError, match='image 20000x16: aspect ratio 1250:1'):
        compressed_to_rgb(_compressed(_png_of_zeros(20000, 16)))
    ok, buf = cv2.imencode('.jpg', np.zeros((8, 600, 3), np.uint8))
    with pytest.raises(PreprocessError, match='image 600x8: aspect ratio 75:1.*shorter side 8 px'):
        compressed_to_rgb(_compressed(buf.tobytes(), 'jpeg'))


def test_normal_frames_still_pass(real_images):
    rgb = cv2.resize(real_images[0], (640, 480))
    msg = SimpleNamespace(height=480, width=640, encoding='rgb8', step=640 * 3, data=rgb.tobytes())
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)
    ok, buf = cv2.imencode('.jpg', rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert read_compressed_size(buf.tobytes()) == ('JPEG', 640, 480)
    out = compressed_to_rgb(_compressed(buf.tobytes(), 'jpeg'))
    assert out.shape == (480, 640, 3) and np.abs(out.astype(int) - rgb).mean() < 4
    # Exactly at the limits is accepted.
    check_frame_geometry(MIN_SIDE * MAX_ASPECT, MIN_SIDE)
    check_frame_geometry(MIN_SIDE, MIN_SIDE * MAX_ASPECT)


def test_a_rotated_jpeg_decodes_transposed_and_passes():
    img = Image.fromarray(np.zeros((48, 64, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, 'JPEG', exif=exif)
    assert compressed_to_rgb(_compressed(buf.getvalue(), 'jpeg')).shape == (64, 48, 3)


def test_a_decode_that_disagrees_with_the_header_is_refused(monkeypatch):
    data = _png_of_zeros(64, 48)
    monkeypatch.setattr(cv2, 'imdecode', lambda buf, flags: np.zeros((4800, 64, 3), np.uint8))
    with pytest.raises(PreprocessError, match='header says 64x48 but it decoded to 64x4800'):
        compressed_to_rgb(_compressed(data))


@pytest.mark.parametrize(('data', 'match'), [
    (b'\xff\xd8garbage', r"format 'jpeg', starting ff d8 67.*is not a PNG, JPEG, WebP or BMP image"),
    (b'\x89PNG\r\n\x1a\n' + bytes(20), "cannot read the PNG header of a compressed image \\(format 'jpeg'\\)"),
    (b'GIF89a' + bytes(20), 'is not a PNG, JPEG'),
])
def test_unreadable_headers_are_refused_naming_the_format(data, match):
    with pytest.raises(PreprocessError, match=match):
        compressed_to_rgb(_compressed(data, 'jpeg'))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 1200), st.integers(0, 1200))
@example(640, 480)
@example(MIN_SIDE * MAX_ASPECT, MIN_SIDE)  # the most extreme accepted
@example(MIN_SIDE, MIN_SIDE)
@example(MIN_SIDE * MAX_ASPECT + 1, MIN_SIDE)
@example(MIN_SIDE - 1, 200)
def test_every_size_is_refused_or_makes_a_sound_crop(width, height):
    try:
        check_frame_geometry(width, height)
    except PreprocessError as exc:
        assert str(exc).startswith(('image ', 'empty image '))
        short, long = min(width, height), max(width, height)
        assert short < MIN_SIDE or long > MAX_ASPECT * short or width * height > MAX_PIXELS
        return
    crop, cmap = resize_crop(np.full((height, width, 3), 7, np.uint8))
    assert crop.shape == (224, 224, 3) and (crop == 7).all()
    # The resized frame stays within 256 x (32 * 256) whatever the size.
    assert min(cmap.resized_width, cmap.resized_height) == 256
    assert max(cmap.resized_width, cmap.resized_height) <= 256 * MAX_ASPECT


def test_the_camera_pixel_limit_refuses_larger_frames_before_decoding():
    limit = 16_000_000  # max_frame_pixels of a 12 MP class camera
    with pytest.raises(PreprocessError, match='image 4096x4096: 16777216 pixels exceeds max_frame_pixels 16000000'):
        compressed_to_rgb(_compressed(_png_of_zeros(4096, 4096)), max_pixels=limit)
    with pytest.raises(PreprocessError, match='image 4096x4000: 16384000 pixels exceeds max_frame_pixels 16000000'):
        image_to_rgb(_raw(4096, 4000, 'mono8', 1), max_pixels=limit)
    # At the limit, and over it without one (the core's own 50 MP ceiling still holds).
    assert image_to_rgb(_raw(4000, 4000, 'mono8', 1), max_pixels=limit).shape == (4000, 4000, 3)
    assert compressed_to_rgb(_compressed(_png_of_zeros(4096, 4096))).shape == (4096, 4096, 3)


def _mosaic(images: list[np.ndarray], width: int, height: int, tiles: int = 4) -> np.ndarray:
    """A ``width`` x ``height`` frame of real photographs at their own resolution, ``tiles`` per
    side: detail at every scale, as in a camera frame (an upscaled photo would have none)."""
    tw, th = width // tiles, height // tiles
    cells = [cv2.resize(images[i % len(images)], (tw, th), interpolation=cv2.INTER_AREA) for i in range(tiles * tiles)]
    rows = [np.concatenate(cells[r * tiles:(r + 1) * tiles], axis=1) for r in range(tiles)]
    return np.ascontiguousarray(np.concatenate(rows, axis=0))


@pytest.fixture(scope='module')
def photos(imagenet_dir) -> list[np.ndarray]:
    items = list_images(imagenet_dir / 'images')
    return [read_rgb(items[i].path) for i in range(0, len(items), max(1, len(items) // 40))][:40]


@pytest.mark.parametrize(('width', 'height', 'factor'), [(4056, 3040, 4), (3040, 4056, 4), (1920, 1080, 2),
                                                          (4608, 2592, 4), (640, 480, 1)])
def test_a_reduced_jpeg_decode_gives_the_model_the_same_crop(photos, width, height, factor):
    side = decode_short_side(INPUT, CROP_PCT)
    frames = [_mosaic(photos[k:] + photos[:k], width, height) for k in (0, 16)]
    for rgb in frames:
        ok, buf = cv2.imencode('.jpg', rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        msg = _compressed(buf.tobytes(), 'jpeg')
        full, full_size = decode_compressed(msg)
        small, size = decode_compressed(msg, min_short_side=side)
        assert full_size == size == (width, height) and full.shape == (height, width, 3)
        assert small.shape == (height // factor, width // factor, 3)
        crop_full, map_full = resize_crop(full, input_size=INPUT, crop_pct=CROP_PCT)
        crop_small, map_small = resize_crop(small, input_size=INPUT, crop_pct=CROP_PCT)
        # The same region of the frame, resized to the same size and cut at the same place ...
        assert ((map_small.resized_width, map_small.resized_height, map_small.crop_x, map_small.crop_y)
                == (map_full.resized_width, map_full.resized_height, map_full.crop_x, map_full.crop_y))
        # ... and the same pixels within what two decoders differ by.
        diff = np.abs(crop_small.astype(np.int16) - crop_full)
        assert diff.mean() < 1.0, diff.mean()
        x_full, x_small = (normalize(c, IMAGENET_MEAN, IMAGENET_STD) for c in (crop_full, crop_small))
        assert np.abs(x_small - x_full).mean() < 0.02


@settings(max_examples=300, deadline=None)
@given(st.integers(MIN_SIDE, 9000), st.integers(MIN_SIDE, 9000), st.sampled_from([224, 256, 384]),
       st.sampled_from([0.875, 0.9, 0.95, 1.0]))
@example(4056, 3040, 224, 0.9)
@example(2028, 1520, 224, 0.9)  # 2028 is not a multiple of 8
@example(496 * 8, 496 * 8, 224, 0.9)  # exactly twice the side at 1/8
def test_the_reduction_is_the_smallest_scale_that_keeps_the_side(width, height, input_size, crop_pct):
    side = decode_short_side(input_size, crop_pct)
    # Twice the side resize_crop scales a frame to, which is at least the model's input.
    _, cmap = resize_crop(np.zeros((MIN_SIDE, MIN_SIDE * 2, 3), np.uint8), input_size=input_size, crop_pct=crop_pct)
    assert side == 2 * min(cmap.resized_width, cmap.resized_height) >= 2 * input_size
    f = jpeg_reduction(width, height, side)
    assert f in (1, 2, 4, 8)
    if f > 1:
        assert width % f == 0 and height % f == 0
        assert min(width, height) // f >= side
    for larger in (2, 4, 8):
        if larger > f and width % larger == 0 and height % larger == 0:
            assert min(width, height) // larger < side
    assert jpeg_reduction(width, height, 0) == 1  # 0: full size


def test_a_rotated_jpeg_decoded_reduced_keeps_its_orientation_and_full_size():
    img = Image.fromarray(np.full((1536, 2048, 3), 90, np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    buf = io.BytesIO()
    img.save(buf, 'JPEG', exif=exif)
    rgb, size = decode_compressed(_compressed(buf.getvalue(), 'jpeg'), min_short_side=300)
    assert jpeg_reduction(2048, 1536, 300) == 4
    assert rgb.shape == (512, 384, 3) and size == (1536, 2048)


def test_a_reduced_decode_that_disagrees_with_the_header_is_refused(monkeypatch):
    ok, buf = cv2.imencode('.jpg', np.zeros((1536, 2048, 3), np.uint8))
    monkeypatch.setattr(cv2, 'imdecode', lambda data, flags: np.zeros((500, 512, 3), np.uint8))
    with pytest.raises(PreprocessError, match='header says 2048x1536 but it decoded at 1/4 to 512x500'):
        compressed_to_rgb(_compressed(buf.tobytes(), 'jpeg'), min_short_side=300)


def test_min_payload_bytes_per_codec():
    assert min_payload_bytes('raw') == 768
    flat = np.full((1, 16, 16, 3), 128, np.uint8)
    assert min_payload_bytes('png') <= len(encode_patches(flat, 'png'))
    assert 50 < min_payload_bytes('png') < 200
    for q in (1, 50, 90, 100):
        assert 500 < min_payload_bytes('jpeg', quality=q) <= len(encode_patches(flat, 'jpeg', quality=q))
    rng = np.random.default_rng(0)
    noisy = rng.integers(0, 256, (20, 1, 16, 16, 3), dtype=np.uint8)
    for enc in ('raw', 'png', 'jpeg'):
        assert all(len(encode_patches(p, enc, quality=90)) >= min_payload_bytes(enc) for p in noisy)


def test_byte_budget_below_one_patch_is_refused_up_front():
    need = min_payload_bytes('jpeg', quality=90)
    check_byte_budget(0, 'jpeg')  # 0: no byte budget
    check_byte_budget(need, 'jpeg')
    with pytest.raises(BudgetError, match=f'byte budget of {need - 1} B cannot hold one jpeg patch '
                                          f'at quality 90: the smallest takes {need} B'):
        check_byte_budget(need - 1, 'jpeg', quality=90)
    with pytest.raises(BudgetError, match='cannot hold one raw patch: the smallest takes 768 B'):
        check_byte_budget(700, 'raw')


@pytest.mark.parametrize('encoding', ['raw', 'png', 'jpeg'])
def test_plan_offload_refuses_a_byte_budget_below_one_patch(real_images, encoding):
    crop, _ = resize_crop(real_images[3])
    rng = np.random.default_rng(1)
    edge = EdgeOutput(np.empty(0), np.empty(0), rng.random(196), rng.standard_normal((196, 8)))
    config = SelectionConfig(method='attention_topk', encoding=encoding)
    plan = plan_offload(crop, edge, Budget(8, 100_000), config)
    assert plan.indices.size == 8
    with pytest.raises(BudgetError, match=f'byte budget of 60 B cannot hold one {encoding} patch'):
        plan_offload(crop, edge, Budget(8, 60), config)
    with pytest.raises(BudgetError, match='cannot hold one'):
        encode_within_budget(np.zeros((3, 16, 16, 3), np.uint8), encoding, max_bytes=60)
