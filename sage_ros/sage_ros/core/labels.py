# SPDX-License-Identifier: Apache-2.0
"""Human-readable class names for ImageNet-1K indices (timm ships the table)."""

from __future__ import annotations

from functools import lru_cache

from timm.data import ImageNetInfo


@lru_cache(maxsize=1)
def _info() -> ImageNetInfo:
    return ImageNetInfo('imagenet-1k')


def class_name(index: int) -> str:
    """Short name of ImageNet-1K class ``index`` (e.g. 'tabby, tabby cat' -> 'tabby');
    ``class_<index>`` for an index outside 0..999."""
    if not 0 <= int(index) < 1000:
        return f'class_{int(index)}'
    return _info().index_to_description(int(index)).split(',')[0].strip()
