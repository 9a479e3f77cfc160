# SPDX-License-Identifier: Apache-2.0
"""The edge node in this process with large camera frames: its max_frame_pixels refuses what the
camera cannot send before decoding it, and a 12 MP JPEG is decoded at a fraction of its size
while the request still describes the frame as sent."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import CompressedImage, Image

from test_frame_limits import _png_of_zeros

LIMIT = 13_000_000  # a 12 MP camera's frames pass, a 16 MP frame does not


@pytest.fixture(scope='module')
def edge(ros_env):
    from sage_ros.nodes.edge_node import EdgeNode

    node = EdgeNode(parameter_overrides=[Parameter('weights', value='random'), Parameter('transport', value='ros'),
                                         Parameter('max_frame_pixels', value=LIMIT)])
    yield node
    node.destroy_node()


def _handle(edge, msg):
    """One frame through the node's frame work, in this thread; the frame and the counters' change."""
    from sage_ros.nodes.edge_node import _Frame

    before = edge.stats.snapshot()
    frame = _Frame(msg, msg.header, time.monotonic())
    edge._process(frame)
    after = edge.stats.snapshot()
    return frame, {k: after[k] - before[k] for k in ('processed', 'rejected')}


def test_frames_over_max_frame_pixels_are_rejected_before_decoding(edge, capfd):
    assert edge.get_parameter('max_frame_pixels').value == LIMIT
    big = CompressedImage(format='png', data=_png_of_zeros(4096, 4096))  # 16.8 MP, a 2 kB file
    frame, counts = _handle(edge, big)
    assert counts == {'processed': 0, 'rejected': 1} and frame.source_size is None
    assert 'image 4096x4096: 16777216 pixels exceeds max_frame_pixels 13000000' in capfd.readouterr().err
    raw = Image(height=3500, width=4000, encoding='mono8', step=4000, data=bytes(4000 * 3500))  # 14 MP
    assert _handle(edge, raw)[1] == {'processed': 0, 'rejected': 1}


def test_a_12mp_jpeg_is_decoded_reduced_and_described_as_sent(edge, real_images):
    rgb = cv2.resize(real_images[0], (4056, 3040), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    frame, counts = _handle(edge, CompressedImage(format='jpeg', data=buf.tobytes()))
    assert counts == {'processed': 1, 'rejected': 0}
    assert frame.source_size == (4056, 3040)  # not the 1014x760 decoded
    assert edge._decode_side == 2 * 248  # DeiT-Tiny: 224 / 0.9
    # The request built for this frame describes the crop in the frame as sent, exactly as
    # after a full decode.
    from builtin_interfaces.msg import Time
    from sage_ros_msgs.msg import OffloadResult

    from sage_ros.core.offload import Budget
    from sage_ros.nodes import edge_messages
    from sage_ros.params import gate_config, selection_config
    from sage_ros.ros.ros_image import compressed_to_rgb, decode_compressed

    p = edge._params
    _, full_map = edge._pipeline.crop(compressed_to_rgb(frame.rgb_source), p['crop_pct'])
    reduced, _ = decode_compressed(frame.rgb_source, min_short_side=edge._decode_side)
    assert reduced.shape == (760, 1014, 3)
    decision = edge._pipeline.analyze(reduced, gate_config(p))
    plan = edge._pipeline.plan(decision, Budget(16), selection_config(p))
    msg = edge_messages.patch_set(OffloadResult(), decision, plan, edge._pipeline.card, p, header=frame.header,
                                  robot_id='', source_size=frame.source_size, sent_stamp=Time(), deadline_left_s=1.0)
    geometry = ('source_width', 'source_height', 'resized_width', 'resized_height', 'crop_x', 'crop_y', 'input_size')
    assert {k: getattr(msg, k) for k in geometry} == {k: getattr(full_map, k) for k in geometry}
