# SPDX-License-Identifier: Apache-2.0
"""rosbag2 bags of labelled real frames and of results (rosbags, both storages), and `sage-ros bag`."""

import shutil

import numpy as np
import pytest

from sage_ros.cli import main
from sage_ros.core.labels import class_name
from sage_ros.eval.bags import (
    IMAGE_TOPIC,
    LABEL_TOPIC,
    STORAGES,
    ResultBagWriter,
    bag_fingerprint,
    count_frames,
    labeled_images_from_folder,
    read_image_bag,
    read_results_bag,
    write_image_bag,
)
from sage_ros.commands.images import LabeledImage, read_labels, read_rgb
from sage_ros.transport.typestore import typestore

START = 1_700_000_000_123_456_789
RATE = 7.0


@pytest.fixture(scope='module')
def six(imagenet_dir):
    """Six real photographs spread over the subset, labelled from labels.csv."""
    items = labeled_images_from_folder(imagenet_dir / 'images')
    return [items[i] for i in range(0, len(items), len(items) // 6)][:6]


@pytest.mark.parametrize('storage', STORAGES)
def test_round_trip_real_images(six, imagenet_dir, tmp_path, storage):
    out = tmp_path / 'bag'
    assert write_image_bag(six, out, storage=storage, rate_hz=RATE, start_ns=START) == 6
    assert (out / 'metadata.yaml').is_file()
    assert any(p.suffix == ('.mcap' if storage == 'mcap' else '.db3') for p in out.iterdir())
    truth = read_labels(imagenet_dir / 'labels.csv')
    frames = list(read_image_bag(out))
    assert [f.index for f in frames] == list(range(6))
    assert [f.source for f in frames] == [it.path.name for it in six]
    assert [f.label for f in frames] == [truth[it.path.name] for it in six]
    assert [f.stamp_ns for f in frames] == [START + round(i * 1e9 / RATE) for i in range(6)]
    for f, it in zip(frames, six):
        assert f.rgb.dtype == np.uint8 and f.rgb.ndim == 3
        np.testing.assert_array_equal(f.rgb, read_rgb(it.path))
    assert count_frames(out) == 6


def test_label_messages_carry_names_and_stamps(six, tmp_path):
    from rosbags.rosbag2 import Reader

    out = tmp_path / 'bag'
    write_image_bag(six[:3], out, start_ns=START, rate_hz=RATE)
    store = typestore()
    with Reader(out) as reader:
        topics = {c.topic: c.msgtype for c in reader.connections}
        assert topics == {IMAGE_TOPIC: 'sensor_msgs/msg/Image', LABEL_TOPIC: 'sage_ros_msgs/msg/FrameLabel'}
        msgs = [(c.topic, t, store.deserialize_cdr(raw, c.msgtype)) for c, t, raw in reader.messages()]
    labels = [(t, m) for topic, t, m in msgs if topic == LABEL_TOPIC]
    images = [(t, m) for topic, t, m in msgs if topic == IMAGE_TOPIC]
    assert len(labels) == len(images) == 3
    for (ti, img), (tl, lab), item in zip(images, labels, six):
        assert ti == tl  # bag timestamps are the header stamps
        assert img.header.stamp == lab.header.stamp and img.header.frame_id == lab.header.frame_id == 'camera'
        assert img.encoding == 'rgb8' and img.step == 3 * img.width
        assert lab.class_index == item.label and lab.class_name == class_name(item.label)
        assert ti == img.header.stamp.sec * 10**9 + img.header.stamp.nanosec


def test_compressed(six, tmp_path):
    out = tmp_path / 'bag'
    assert write_image_bag(six[:3], out, compressed=True, start_ns=START) == 3
    assert count_frames(out) == 3
    assert count_frames(out, image_topic=IMAGE_TOPIC + '/compressed') == 3
    frames = list(read_image_bag(out))
    assert [f.label for f in frames] == [it.label for it in six[:3]]
    for f, it in zip(frames, six):
        ref = read_rgb(it.path)
        assert f.rgb.shape == ref.shape
        assert np.abs(f.rgb.astype(int) - ref.astype(int)).mean() < 6
    # JPEG, not raw: the bag is much smaller than the pixels.
    raw = sum(read_rgb(it.path).nbytes for it in six[:3])
    assert sum(p.stat().st_size for p in out.iterdir()) < raw / 2


def test_unlabelled_images_and_default_stamps(six, tmp_path):
    import time

    items = [LabeledImage(it.path) for it in six[:2]]
    before = time.time_ns()
    write_image_bag(items, tmp_path / 'bag', storage='sqlite3')
    frames = list(read_image_bag(tmp_path / 'bag'))
    assert [(f.label, f.source) for f in frames] == [(None, ''), (None, '')]
    assert before <= frames[0].stamp_ns <= time.time_ns()
    assert frames[1].stamp_ns - frames[0].stamp_ns == 100_000_000  # default 10 Hz


def test_imagenet_tree_labels_from_wnid(imagenet_dir, tmp_path):
    import csv

    with (imagenet_dir / 'labels.csv').open(newline='') as fh:
        rows = list(csv.DictReader(fh))[:5]
    tree = tmp_path / 'tree'
    for row in rows:
        (tree / row['wnid']).mkdir(parents=True, exist_ok=True)
        (tree / row['wnid'] / row['file']).symlink_to(imagenet_dir / 'images' / row['file'])
    (tree / rows[0]['wnid'] / 'notes.txt').write_text('not an image')
    items = labeled_images_from_folder(tree)
    expected = sorted((r['wnid'], r['file'], int(r['class_index'])) for r in rows)
    assert [(it.path.parent.name, it.path.name, it.label) for it in items] == expected
    assert labeled_images_from_folder(tree, limit=2) == items[:2]
    write_image_bag(items, tmp_path / 'bag', start_ns=START)
    assert [f.label for f in read_image_bag(tmp_path / 'bag')] == [e[2] for e in expected]
    (tree / 'misc').mkdir()
    with pytest.raises(ValueError, match='misc'):
        labeled_images_from_folder(tree)


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        labeled_images_from_folder(tmp_path / 'missing')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(ValueError, match='no images'):
        labeled_images_from_folder(tmp_path / 'empty')


def test_limit(six, imagenet_dir, tmp_path):
    items = labeled_images_from_folder(imagenet_dir / 'images', limit=4)
    assert len(items) == 4 and all(it.label is not None for it in items)
    assert items == labeled_images_from_folder(imagenet_dir / 'images')[:4]
    write_image_bag(six, tmp_path / 'bag', start_ns=START)
    frames = list(read_image_bag(tmp_path / 'bag', limit=2))
    assert [f.source for f in frames] == [it.path.name for it in six[:2]]


def test_existing_output_refused(six, tmp_path):
    out = tmp_path / 'bag'
    out.mkdir()
    (out / 'keep').write_text('x')
    with pytest.raises(FileExistsError):
        write_image_bag(six[:1], out)
    assert (out / 'keep').read_text() == 'x' and sorted(p.name for p in out.iterdir()) == ['keep']
    with pytest.raises(ValueError):
        write_image_bag(six[:1], tmp_path / 'other', storage='rosbag1')
    with pytest.raises(ValueError):
        write_image_bag(six[:1], tmp_path / 'other', rate_hz=0)
    assert not (tmp_path / 'other').exists()


def test_failed_write_leaves_nothing(six, tmp_path):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not a jpeg')
    with pytest.raises(ValueError, match='cannot read image'):
        write_image_bag([six[0], LabeledImage(bad, 1)], tmp_path / 'bag')
    assert not (tmp_path / 'bag').exists()


def test_image_topic_detection(six, tmp_path):
    out = tmp_path / 'bag'
    write_image_bag(six[:2], out, image_topic='/robot1/cam/image', start_ns=START)
    assert count_frames(out) == 2
    assert [f.label for f in read_image_bag(out)] == [it.label for it in six[:2]]
    with pytest.raises(ValueError, match='/camera/image_raw'):
        read_image_bag(out, image_topic=IMAGE_TOPIC)
    with ResultBagWriter(tmp_path / 'results') as w:
        pass
    with pytest.raises(ValueError, match='no sensor_msgs/msg/Image'):
        read_image_bag(tmp_path / 'results')
    with pytest.raises(ValueError, match='no sensor_msgs/msg/Image'):
        count_frames(tmp_path / 'results')
    with pytest.raises(FileNotFoundError):
        read_image_bag(tmp_path / 'missing')
    assert w.count == 0 and read_results_bag(tmp_path / 'results') == []


def test_several_image_topics_need_a_choice(six, tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    out = tmp_path / 'bag'
    store = typestore()
    # Two camera topics, written by rosbags directly.
    with Writer(out, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        for topic in ('/left/image_raw', '/right/image_raw'):
            conn = writer.add_connection(topic, 'sensor_msgs/msg/Image', typestore=store)
            img = store.types['sensor_msgs/msg/Image'](
                header=store.types['std_msgs/msg/Header'](
                    stamp=store.types['builtin_interfaces/msg/Time'](sec=1, nanosec=0), frame_id='c'),
                height=16, width=32, encoding='mono8', is_bigendian=0, step=32,
                data=np.tile(np.array([7, 9], np.uint8), 16 * 16))  # 16 px: the shortest side accepted
            writer.write(conn, 1_000_000_000, store.serialize_cdr(img, 'sensor_msgs/msg/Image'))
    with pytest.raises(ValueError, match='several image topics'):
        read_image_bag(out)
    [frame] = read_image_bag(out, image_topic='/right/image_raw')
    assert frame.label is None and frame.stamp_ns == 1_000_000_000
    np.testing.assert_array_equal(frame.rgb, np.tile(np.array([[[7, 7, 7], [9, 9, 9]]], np.uint8), (16, 16, 1)))


def test_fingerprint(six, tmp_path):
    a, b, c = tmp_path / 'a', tmp_path / 'b', tmp_path / 'c'
    write_image_bag(six[:3], a, start_ns=START)
    write_image_bag(six[:3], b, start_ns=START + 1)
    write_image_bag(six[1:4], c, start_ns=START)
    fa = bag_fingerprint(a)
    assert len(fa) == 16 and int(fa, 16) >= 0
    assert bag_fingerprint(a) == fa
    shutil.copytree(a, tmp_path / 'moved')
    assert bag_fingerprint(tmp_path / 'moved') == fa
    assert len({fa, bag_fingerprint(b), bag_fingerprint(c)}) == 3


def _result(seq: int, label: int, source: int) -> bytes:
    from rclpy.serialization import serialize_message
    from sage_ros_msgs.msg import OffloadResult

    msg = OffloadResult()
    msg.header.stamp.sec = 100 + seq
    msg.header.stamp.nanosec = 5
    msg.header.frame_id = 'camera'
    msg.request_id = f'robot1/{seq}'
    msg.sequence = seq
    msg.source = source
    msg.label = label
    msg.label_name = class_name(label)
    msg.confidence = 0.25
    msg.patches_sent = 48 if source == OffloadResult.SOURCE_CLOUD else 0
    msg.bytes_sent = 12345
    msg.method = 'sage'
    msg.latency_ms = 12.5
    msg.detail = 'timeout' if source == OffloadResult.SOURCE_EDGE_FALLBACK else ''
    msg.random_weights = True
    return serialize_message(msg)


@pytest.mark.parametrize('storage', STORAGES)
def test_result_bag_round_trip(tmp_path, storage):
    out = tmp_path / 'results'
    sent = [(3, 281, 1), (4, 7, 0), (5, 999, 2)]
    with ResultBagWriter(out, storage=storage) as writer:
        for seq, label, source in sent:
            writer.write((100 + seq) * 10**9 + 5, _result(seq, label, source))
    got = read_results_bag(out)
    assert [(r.sequence, r.label, r.source) for r in got] == sent
    assert [r.request_id for r in got] == ['robot1/3', 'robot1/4', 'robot1/5']
    assert [r.patches_sent for r in got] == [48, 0, 0] and [r.detail for r in got] == ['', '', 'timeout']
    assert got[0].label_name == class_name(281) and got[0].method == 'sage' and got[0].random_weights
    assert got[2].header.stamp.sec == 105 and got[2].latency_ms == 12.5 and got[0].bytes_sent == 12345
    with pytest.raises(FileExistsError):
        ResultBagWriter(out)
    with pytest.raises(ValueError, match='no topic'):
        read_results_bag(out, topic='/other')


def test_result_bag_kept_after_error(tmp_path):
    out = tmp_path / 'results'
    with pytest.raises(RuntimeError):
        with ResultBagWriter(out, topic='/robot1/sage/result') as writer:
            writer.write(1, _result(1, 2, 0))
            raise RuntimeError('sweep interrupted')
    assert [r.label for r in read_results_bag(out, topic='/robot1/sage/result')] == [2]


def test_cli_bag(imagenet_dir, tmp_path, capsys):
    folder = tmp_path / 'images'
    folder.mkdir()
    for p in sorted((imagenet_dir / 'images').iterdir())[:5]:
        (folder / p.name).symlink_to(p)
    labels = imagenet_dir / 'labels.csv'
    out = tmp_path / 'bag'
    assert main(['bag', str(folder), '--labels', str(labels), '-o', str(out), '--storage', 'sqlite3',
                 '--rate', '5', '--limit', '4']) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith('bag: 4 frames') and '4 labelled' in line and 'sqlite3' in line and str(out) in line
    frames = list(read_image_bag(out))
    truth = read_labels(labels)
    assert [f.label for f in frames] == [truth[p.name] for p in sorted(folder.iterdir())[:4]]
    assert frames[1].stamp_ns - frames[0].stamp_ns == 200_000_000

    assert main(['bag', str(folder), '-o', str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith('sage-ros bag: error:') and 'exists' in err
    assert main(['bag', str(tmp_path / 'nope'), '-o', str(tmp_path / 'bag2')]) == 2
    assert 'sage-ros bag: error:' in capsys.readouterr().err and not (tmp_path / 'bag2').exists()

    comp = tmp_path / 'comp'
    assert main(['bag', str(folder), '-o', str(comp), '--compressed', '--image-topic', '/cam/image']) == 0
    assert '0 labelled' in capsys.readouterr().out  # no labels.csv beside the folder
    shutil.copy(labels, tmp_path / 'labels.csv')  # found in the folder's parent, as the demo does
    shutil.rmtree(comp)
    assert main(['bag', str(folder), '-o', str(comp), '--compressed', '--image-topic', '/cam/image',
                 '--label-topic', '/cam/label']) == 0
    line = capsys.readouterr().out
    assert 'jpeg' in line and '5 frames' in line and '5 labelled' in line
    assert count_frames(comp, image_topic='/cam/image/compressed') == 5
    assert [f.label for f in read_image_bag(comp, label_topic='/cam/label')] == [truth[p.name] for p in
                                                                                 sorted(folder.iterdir())]
