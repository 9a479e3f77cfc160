# SPDX-License-Identifier: Apache-2.0
"""sage_ros_msgs as built into the environment: fields, constants and CDR round trips."""

import numpy as np
from rclpy.serialization import deserialize_message, serialize_message
from sage_ros_msgs.msg import CloudResult, OffloadResult, PatchSet


def test_patch_set_round_trips_through_cdr():
    msg = PatchSet(request_id='robot1/7', robot_id='robot1', sequence=7, budget_patches=64,
                   method='sage', encoding=PatchSet.ENCODING_JPEG, quality=90,
                   source_width=640, source_height=480, input_size=224, patch_size=16, grid_rows=14, grid_cols=14)
    msg.indices = np.arange(0, 128, 2, dtype=np.uint16)
    msg.payload = bytes(range(256)) * 20
    msg.edge_topk_labels = [281, 282]
    msg.edge_topk_scores = [0.4, 0.3]
    data = serialize_message(msg)
    assert data[:4] == b'\x00\x01\x00\x00'  # CDR little-endian encapsulation header
    back = deserialize_message(data, PatchSet)
    assert back.request_id == 'robot1/7' and list(back.indices) == list(range(0, 128, 2))
    assert bytes(back.payload) == bytes(range(256)) * 20 and list(back.edge_topk_labels) == [281, 282]


def test_constants():
    assert (PatchSet.ENCODING_RAW, PatchSet.ENCODING_PNG, PatchSet.ENCODING_JPEG) == ('raw', 'png', 'jpeg')
    assert (OffloadResult.SOURCE_EDGE, OffloadResult.SOURCE_CLOUD, OffloadResult.SOURCE_EDGE_FALLBACK) == (0, 1, 2)
    assert CloudResult.STATUS_OK == 0 and CloudResult.STATUS_BUSY == 2
    r = deserialize_message(serialize_message(OffloadResult(label=3, latency_ms=1.5)), OffloadResult)
    assert r.label == 3 and r.latency_ms == 1.5
