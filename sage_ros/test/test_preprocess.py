# SPDX-License-Identifier: Apache-2.0
import cv2
import numpy as np
import pytest
from PIL import Image
from timm.data import create_transform

from sage_ros.core import PreprocessError, normalize, resize_crop, to_rgb


def timm_eval(vit, rgb):
    return create_transform(**vit.data_config)(Image.fromarray(rgb))


@pytest.mark.parametrize('size', [(227, 227), (301, 199), (199, 301), (640, 480), (225, 1000), (97, 61)])
def test_matches_timm_eval_transform_on_odd_sizes(tiny, real_images, size):
    rgb = cv2.resize(real_images[3], size, interpolation=cv2.INTER_AREA)
    crop, cmap = resize_crop(rgb, input_size=224, crop_pct=tiny.crop_pct, interpolation=tiny.interpolation)
    ours = normalize(crop, tiny.mean, tiny.std)
    # The same tensor, bit for bit, from numpy alone.
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours, timm_eval(tiny, rgb).numpy())
    assert crop.shape == (224, 224, 3)
    assert (cmap.source_width, cmap.source_height) == size
    assert min(cmap.resized_width, cmap.resized_height) == int(224 / tiny.crop_pct)


def test_crop_map_points_back_to_source_pixels(real_images):
    rgb = cv2.resize(real_images[0], (640, 480))
    crop, cmap = resize_crop(rgb, crop_pct=0.875)
    assert (cmap.resized_width, cmap.resized_height) == (341, 256)
    assert (cmap.crop_x, cmap.crop_y) == (58, 16)
    x0, y0, x1, y1 = cmap.patch_box(0)
    assert x0 == pytest.approx(58 * 640 / 341) and y0 == pytest.approx(16 * 480 / 256)
    # The patch box of the centre patch covers the same content in the source.
    x0, y0, x1, y1 = (int(round(v)) for v in cmap.patch_box(7 * 14 + 7))
    src = cv2.resize(rgb[y0:y1, x0:x1], (16, 16), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(src - crop[112:128, 112:128]).mean() < 12


def test_encodings_convert_to_the_same_rgb(real_images):
    rgb = real_images[1]
    bgr = rgb[:, :, ::-1].copy()
    np.testing.assert_array_equal(to_rgb(bgr, 'bgr8'), rgb)
    np.testing.assert_array_equal(to_rgb(rgb, 'rgb8'), rgb)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    np.testing.assert_array_equal(to_rgb(rgba, 'rgba8'), rgb)
    np.testing.assert_array_equal(to_rgb(rgba[:, :, [2, 1, 0, 3]].copy(), 'bgra8'), rgb)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    for g in (gray, gray[:, :, None]):
        out = to_rgb(g, 'mono8')
        assert out.shape == rgb.shape and (out[:, :, 0] == gray).all() and (out[:, :, 2] == gray).all()


def test_yuv422_frames_decode_close_to_the_original(real_images):
    rgb = cv2.resize(real_images[2], (320, 240))
    yuv = cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV)
    # Build UYVY by hand: U Y0 V Y1 per pixel pair, chroma averaged over the pair.
    u = yuv[:, 0::2, 1] // 2 + yuv[:, 1::2, 1] // 2
    v = yuv[:, 0::2, 2] // 2 + yuv[:, 1::2, 2] // 2
    uyvy = np.empty((240, 320, 2), np.uint8)
    uyvy[:, 0::2, 0], uyvy[:, 1::2, 0] = u, v
    uyvy[:, :, 1] = yuv[:, :, 0]
    out = to_rgb(uyvy, 'yuv422')
    assert np.abs(out.astype(int) - rgb).mean() < 8


@pytest.mark.parametrize(('frame', 'encoding', 'match'), [
    (np.zeros((4, 4, 3), np.uint16), 'rgb8', '8-bit'),
    (np.zeros((4, 4, 3), np.uint8), 'mono8', 'HxWx1'),
    (np.zeros((4, 4, 4), np.uint8), 'rgb8', 'HxWx3'),
    (np.zeros((0, 4, 3), np.uint8), 'rgb8', 'empty'),
    (np.zeros((4, 4, 3), np.uint8), 'bayer_rggb8', 'unsupported'),
    (np.zeros((4, 5, 2), np.uint8), 'yuv422', 'even width'),
])
def test_bad_frames_are_clear_errors(frame, encoding, match):
    with pytest.raises(PreprocessError, match=match):
        to_rgb(frame, encoding)


def test_tiny_frames_are_upscaled():
    crop, cmap = resize_crop(np.full((3, 5, 3), 200, np.uint8))
    assert crop.shape == (224, 224, 3) and (crop == 200).all()
    assert cmap.resized_height == 256


def test_normalize_batches_and_refuses_what_is_not_a_uint8_rgb_crop(tiny, real_images):
    crops = np.stack([resize_crop(rgb, crop_pct=tiny.crop_pct)[0] for rgb in real_images[:3]])
    batch = normalize(crops, tiny.mean, tiny.std)
    assert batch.shape == (3, 3, 224, 224)
    np.testing.assert_array_equal(batch[1], normalize(crops[1], tiny.mean, tiny.std))
    view = crops[0]
    view.flags.writeable = False  # a read-only view is copied, never written
    normalize(view, tiny.mean, tiny.std)
    for bad in (crops[0].astype(np.float32), crops[0][:, :, :2], crops[0, 0]):
        with pytest.raises(PreprocessError, match='expected uint8'):
            normalize(bad, tiny.mean, tiny.std)
