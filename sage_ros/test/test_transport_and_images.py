# SPDX-License-Identifier: Apache-2.0
import numpy as np
import pytest
from sensor_msgs.msg import CompressedImage, Image

from sage_ros.core import PreprocessError
from sage_ros.ros.ros_image import compressed_to_rgb, image_to_rgb, rgb_to_image_fields
from sage_ros.transport.zenoh_link import reply_key, robot_of, topic_to_key


def test_keys_follow_zenoh_bridge_ros2dds():
    assert topic_to_key('/robot1/sage/patch_set') == 'robot1/sage/patch_set'
    assert topic_to_key('/sage/patch_set') == 'sage/patch_set'
    assert reply_key('robot1/sage/patch_set', 'sage/patch_set', 'sage/cloud_result') == 'robot1/sage/cloud_result'
    assert reply_key('a/b/sage/patch_set', '/sage/patch_set', 'sage/cloud_result') == 'a/b/sage/cloud_result'
    assert reply_key('sage/patch_set', 'sage/patch_set', 'sage/cloud_result') == 'sage/cloud_result'
    assert robot_of('fleet/robot7/sage/patch_set', 'sage/patch_set') == 'fleet/robot7'
    with pytest.raises(ValueError):
        reply_key('robot1/other', 'sage/patch_set', 'sage/cloud_result')
    with pytest.raises(ValueError):
        topic_to_key('/')


def test_image_messages_round_trip_every_encoding(real_images):
    rgb = real_images[0][:101, :77]  # odd sizes
    for enc in ('rgb8', 'bgr8'):
        msg = Image(**rgb_to_image_fields(rgb, enc))
        np.testing.assert_array_equal(image_to_rgb(msg), rgb)
    mono = image_to_rgb(Image(**rgb_to_image_fields(rgb, 'mono8')))
    assert mono.shape == rgb.shape


def test_padded_rows_are_read_through_step(real_images):
    rgb = np.ascontiguousarray(real_images[1][:50, :30])
    padded = np.zeros((50, 30 * 3 + 6), np.uint8)
    padded[:, :90] = rgb.reshape(50, 90)
    msg = Image(height=50, width=30, encoding='rgb8', step=96, data=padded.tobytes())
    np.testing.assert_array_equal(image_to_rgb(msg), rgb)


@pytest.mark.parametrize(('fields', 'match'), [
    ({'height': 20, 'width': 20, 'encoding': 'rgb8', 'step': 60, 'data': bytes(1199)}, 'needs'),
    ({'height': 20, 'width': 20, 'encoding': 'rgb8', 'step': 40, 'data': bytes(1200)}, 'step'),
    ({'height': 10, 'width': 10, 'encoding': 'rgb8', 'step': 30, 'data': bytes(300)}, 'shorter side 10 px'),
    ({'height': 0, 'width': 10, 'encoding': 'rgb8', 'step': 30, 'data': b''}, 'empty'),
    ({'height': 10, 'width': 10, 'encoding': '16UC1', 'step': 20, 'data': bytes(200)}, 'unsupported'),
    ({'height': 100000, 'width': 100000, 'encoding': 'mono8', 'step': 100000, 'data': b''}, 'exceeds'),
])
def test_inconsistent_image_messages_are_refused(fields, match):
    with pytest.raises(PreprocessError, match=match):
        image_to_rgb(Image(**fields))


def test_compressed_images(real_images):
    import cv2

    rgb = real_images[2]
    ok, buf = cv2.imencode('.png', rgb[:, :, ::-1])
    np.testing.assert_array_equal(compressed_to_rgb(CompressedImage(format='png', data=buf.tobytes())), rgb)
    with pytest.raises(PreprocessError):
        compressed_to_rgb(CompressedImage(format='jpeg', data=b'\xff\xd8garbage'))
    with pytest.raises(PreprocessError):
        compressed_to_rgb(CompressedImage(format='jpeg', data=b''))


def test_publisher_gaps_count_what_each_publisher_sent_that_never_arrived():
    from sage_ros.ros.publisher_gaps import PublisherGaps

    gaps = PublisherGaps()

    def info(gid: int, seq: int) -> dict:
        return {'publisher_gid': {'data': bytes([gid] * 16)}, 'publication_sequence_number': seq}

    assert [gaps.missed(info(1, s)) for s in (1, 2, 5, 6)] == [0, 0, 2, 0]
    assert gaps.missed(info(2, 40)) == 0 and gaps.missed(info(2, 42)) == 1  # publishers apart
    assert gaps.missed(info(1, 6)) == 0  # a repeat is no gap
    assert gaps.missed({}) == 0 and gaps.missed(None) == 0  # an rmw that numbers nothing


def test_draw_boxes_outlines_on_a_copy():
    from sage_ros.ros.ros_image import draw_boxes

    rgb = np.zeros((32, 32, 3), np.uint8)
    out = draw_boxes(rgb, [(16, 0, 32, 16)])
    assert not rgb.any() and tuple(out[0, 16]) == (255, 255, 0) and tuple(out[15, 31]) == (255, 255, 0)
    assert not out[8, 24].any() and not out[20, 8].any()  # inside and outside the box untouched
