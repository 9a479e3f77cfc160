# SPDX-License-Identifier: Apache-2.0
"""A rosbags typestore that knows sage_ros_msgs, for bags and CDR without rclpy."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

MSG_NAMES = ('PatchSet', 'CloudResult', 'OffloadResult', 'FrameLabel', 'BudgetStatus')


def msg_dir() -> Path:
    """The .msg files: the source tree's when running from it, else the installed share."""
    src = Path(__file__).resolve().parents[3] / 'sage_ros_msgs' / 'msg'
    if src.is_dir():
        return src
    from ament_index_python.packages import get_package_share_directory

    return Path(get_package_share_directory('sage_ros_msgs')) / 'msg'


@lru_cache(maxsize=1)
def typestore() -> Typestore:
    """ROS 2 Kilted's standard types plus sage_ros_msgs."""
    store = get_typestore(Stores.ROS2_KILTED)
    types = {}
    for name in MSG_NAMES:
        types.update(get_types_from_msg((msg_dir() / f'{name}.msg').read_text(), f'sage_ros_msgs/msg/{name}'))
    store.register(types)
    return store
