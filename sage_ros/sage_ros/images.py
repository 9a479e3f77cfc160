# SPDX-License-Identifier: Apache-2.0
"""Image files for demos, tests and bags: folders, label CSVs and the default sample set."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sage_ros.core.preprocess import to_rgb

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff'}
# Real photographs shipped inside scikit-image's wheel: a demo needs no download.
DEFAULT_SAMPLES = ('astronaut.png', 'chelsea.png', 'coffee.png', 'rocket.jpg', 'motorcycle_left.png', 'camera.png')


@dataclass(frozen=True)
class LabeledImage:
    path: Path
    label: int | None = None


def default_samples() -> list[LabeledImage]:
    """scikit-image's sample photographs (no labels)."""
    import skimage.data

    root = Path(skimage.data.__file__).parent
    return [LabeledImage(root / name) for name in DEFAULT_SAMPLES]


def read_labels(csv_path: Path) -> dict[str, int]:
    """``file,class_index,...`` CSV (as shipped with the ImageNet subset) -> {file name: index}."""
    with Path(csv_path).open(newline='') as fh:
        return {row['file']: int(row['class_index']) for row in csv.DictReader(fh)}


def list_images(folder: Path, *, labels: Path | None = None, limit: int = 0) -> list[LabeledImage]:
    """Image files of ``folder`` in name order, with labels from ``labels`` (or the folder's
    ``labels.csv`` / its parent's, when present)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'image folder {folder} does not exist')
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if labels is None:
        for cand in (folder / 'labels.csv', folder.parent / 'labels.csv'):
            if cand.is_file():
                labels = cand
                break
    table = read_labels(labels) if labels else {}
    out = [LabeledImage(p, table.get(p.name)) for p in files]
    return out[:limit] if limit > 0 else out


def read_rgb(path: Path) -> np.ndarray:
    """Any 8-bit image file (colour, grey or with alpha) as HxWx3 uint8 RGB."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError(f'cannot read image {path}')
    if img.dtype != np.uint8:
        img = cv2.convertScaleAbs(img, alpha=255.0 / max(1.0, float(img.max())))
    if img.ndim == 2:
        return to_rgb(img, 'mono8')
    return to_rgb(img, {3: 'bgr8', 4: 'bgra8'}[img.shape[2]])
