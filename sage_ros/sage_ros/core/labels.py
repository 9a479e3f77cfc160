# SPDX-License-Identifier: Apache-2.0
"""Human-readable class names for ImageNet-1K indices.

The table ships with the package (``imagenet_classes.txt``, one short name per line, taken from
timm's ImageNet-1K descriptions; a test keeps it equal to timm's), so an edge on ONNX Runtime
names its classes without importing timm or torch.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

NUM_CLASSES = 1000


@lru_cache(maxsize=1)
def class_names() -> tuple[str, ...]:
    """The 1000 short class names, by index."""
    names = tuple(files('sage_ros.core').joinpath('imagenet_classes.txt').read_text().splitlines())
    if len(names) != NUM_CLASSES:
        raise RuntimeError(f'imagenet_classes.txt holds {len(names)} names, not {NUM_CLASSES}')
    return names


def class_name(index: int) -> str:
    """Short name of ImageNet-1K class ``index`` (e.g. 'tabby, tabby cat' -> 'tabby');
    ``class_<index>`` for an index outside 0..999."""
    if not 0 <= int(index) < NUM_CLASSES:
        return f'class_{int(index)}'
    return class_names()[int(index)]
