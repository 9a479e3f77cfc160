# SPDX-License-Identifier: Apache-2.0
"""Shared fixtures: the real ImageNet subset and seeded random-weight models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from sage_ros.core import load_vit
from sage_ros.images import list_images, read_rgb

REPO = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    return Path(os.environ.get('SAGE_ROS_DATA', REPO.parent / 'shared' / 'data' / 'imagenet-val-1300'))


@pytest.fixture(scope='session')
def imagenet_dir() -> Path:
    d = data_dir()
    if not (d / 'images').is_dir():
        pytest.fail(f'real test images not found at {d}; set SAGE_ROS_DATA to the imagenet-val-1300 folder')
    return d


@pytest.fixture(scope='session')
def real_images(imagenet_dir: Path) -> list[np.ndarray]:
    """Twelve real photographs (RGB uint8), spread over the subset."""
    items = list_images(imagenet_dir / 'images')
    return [read_rgb(items[i].path) for i in range(0, len(items), max(1, len(items) // 12))][:12]


@pytest.fixture(scope='session')
def ros_env():
    """One rclpy context for the session, on a DDS domain of its own, local discovery only.

    The nodes the tests start inherit the same environment, so they see each other and
    nothing else on the machine.
    """
    import rclpy

    from sage_ros.bringup import dds_defaults

    os.environ['ROS_DOMAIN_ID'] = str(101 + os.getpid() % 100)
    os.environ['ROS_AUTOMATIC_DISCOVERY_RANGE'] = 'LOCALHOST'
    for key, value in dds_defaults().items():
        os.environ.setdefault(key, value)
    rclpy.init()
    yield
    rclpy.try_shutdown()


@pytest.fixture(scope='session')
def tiny():
    return load_vit('deit_tiny_patch16_224', 'random:0')


@pytest.fixture(scope='session')
def base():
    return load_vit('deit_base_patch16_224', 'random:0')
