# SPDX-License-Identifier: Apache-2.0
"""Image files for demos, tests and bags: folders, label CSVs and the default sample set."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

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


def demo_images(folder: Path | None, limit: int) -> list[LabeledImage]:
    """The images of ``sage-ros demo``: a folder's (see :func:`list_images`), or the default
    samples; at most ``limit`` (0: all)."""
    if folder is None:
        items = default_samples()
        return items[:limit] if limit > 0 else items
    return list_images(folder, limit=limit)


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


@dataclass
class ImageReader:
    """The images of a demo, read one at a time as they are iterated. A file that cannot be
    decoded is skipped with a line saying so, and its name kept in ``skipped``: one bad file
    in a folder must not end the run before its summary."""

    images: Sequence[LabeledImage]
    emit: Callable[[str], None] = print
    skipped: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[tuple[LabeledImage, np.ndarray]]:
        for item in self.images:
            try:
                rgb = read_rgb(item.path)
            except (ValueError, OSError) as exc:
                self.skipped.append(item.path.name)
                self.emit(f'{item.path.name:<28} skipped: {exc}')
                continue
            yield item, rgb

    def frames(self) -> Iterator[tuple[str, np.ndarray, int | None]]:
        """(name, RGB, label) of each readable image, for :func:`sage_ros.commands.demo.run_demo`."""
        for item, rgb in self:
            yield item.path.name, rgb, item.label


def format_skipped(skipped: Sequence[str]) -> str | None:
    """The summary line of the images a demo could not read, or None when there were none."""
    if not skipped:
        return None
    names = ', '.join(skipped[:5]) + (', ...' if len(skipped) > 5 else '')
    return f'  skipped {len(skipped)} unreadable image{"s" if len(skipped) > 1 else ""}: {names}'
