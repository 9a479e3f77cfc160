# SPDX-License-Identifier: Apache-2.0
"""rosbag2 bags of labelled camera frames and of results, read and written with rosbags (no rclpy)."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from types import TracebackType
from typing import Any, Iterator, Sequence

import cv2
import numpy as np
from rosbags.interfaces import Connection
from rosbags.rosbag2 import Reader, StoragePlugin, Writer

from sage_ros.commands.images import IMAGE_SUFFIXES, LabeledImage, list_images, read_rgb
from sage_ros.ros.ros_image import compressed_to_rgb, image_to_rgb, rgb_to_image_fields
from sage_ros.transport.typestore import typestore

IMAGE_TOPIC = '/camera/image_raw'
LABEL_TOPIC = '/camera/label'
STORAGES = ('mcap', 'sqlite3')

IMAGE_TYPE = 'sensor_msgs/msg/Image'
COMPRESSED_TYPE = 'sensor_msgs/msg/CompressedImage'
LABEL_TYPE = 'sage_ros_msgs/msg/FrameLabel'
RESULT_TYPE = 'sage_ros_msgs/msg/OffloadResult'
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
BAG_VERSION = 9  # rosbag2 metadata version of Jazzy and Kilted
JPEG_QUALITY = 95
_FINGERPRINT_SAMPLE = 1 << 20  # bytes hashed at each end of every storage file


@dataclass(frozen=True)
class BagFrame:
    """One camera frame of a bag, decoded, with its ground truth when the bag has one."""

    index: int
    stamp_ns: int
    rgb: np.ndarray
    label: int | None
    source: str


# --- image folders ---------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _wnid_to_index() -> dict[str, int]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo('imagenet-1k')
    return {info.index_to_label_name(i): i for i in range(1000)}


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def labeled_images_from_folder(folder: Path, *, labels: Path | None = None, limit: int = 0) -> list[LabeledImage]:
    """Images of a flat folder (labels from a ``file,class_index,...`` CSV, see
    :func:`sage_ros.commands.images.list_images`) or of an ImageNet-style tree ``folder/<wnid>/*`` (labels
    from the wnid, in timm's ImageNet-1K order), sorted; at most ``limit`` (0: all)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f'image folder {folder} does not exist')
    if labels is not None and not Path(labels).is_file():
        raise FileNotFoundError(f'labels file {labels} does not exist')
    if any(_is_image(p) for p in folder.iterdir()):
        items = list_images(folder, labels=labels, limit=limit)
    else:
        subdirs = sorted(p for p in folder.iterdir() if p.is_dir())
        if not subdirs:
            raise ValueError(f'no images in {folder}')
        if labels is not None:
            raise ValueError(f'{folder} is a class-folder tree: labels come from the folder names, not from {labels}')
        table = _wnid_to_index()
        unknown = [d.name for d in subdirs if d.name not in table]
        if unknown:
            raise ValueError(f'{folder} has images in neither the folder nor ImageNet class folders '
                             f'(not wnids: {", ".join(unknown[:5])}{", ..." if len(unknown) > 5 else ""})')
        items = [LabeledImage(p, table[d.name]) for d in subdirs for p in sorted(d.iterdir()) if _is_image(p)]
        items = items[:limit] if limit > 0 else items
    if not items:
        raise ValueError(f'no images in {folder}')
    return items


# --- writing ---------------------------------------------------------------------------------

def _plugin(storage: str) -> StoragePlugin:
    if storage not in STORAGES:
        raise ValueError(f'unknown bag storage {storage!r}; expected one of {", ".join(STORAGES)}')
    return StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3


def _header(stamp_ns: int, frame_id: str) -> Any:
    types = typestore().types
    stamp = types['builtin_interfaces/msg/Time'](sec=stamp_ns // 1_000_000_000, nanosec=stamp_ns % 1_000_000_000)
    return types['std_msgs/msg/Header'](stamp=stamp, frame_id=frame_id)


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _image_msg(rgb: np.ndarray, header: Any, compressed: bool) -> Any:
    types = typestore().types
    if compressed:
        ok, buf = cv2.imencode('.jpg', cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise ValueError('JPEG encoding failed')
        return types[COMPRESSED_TYPE](header=header, format='jpeg', data=buf.reshape(-1))
    fields = rgb_to_image_fields(rgb, 'rgb8')
    fields['data'] = np.frombuffer(fields['data'], np.uint8)
    return types[IMAGE_TYPE](header=header, **fields)


def write_image_bag(items: Sequence[LabeledImage], out: Path, *, storage: str = 'mcap', image_topic: str = IMAGE_TOPIC,
                    label_topic: str = LABEL_TOPIC, rate_hz: float = 10.0, start_ns: int | None = None,
                    compressed: bool = False, frame_id: str = 'camera', progress: bool = False) -> int:
    """Write ``items`` as a new bag: one image per file (rgb8 Image, or JPEG CompressedImage on
    ``image_topic + '/compressed'``) stamped ``start_ns + i / rate_hz`` s, and a FrameLabel with
    the same stamp for each labelled one. Returns the number of frames."""
    from sage_ros.core.labels import class_name

    out = Path(out)
    plugin = _plugin(storage)
    if rate_hz <= 0:
        raise ValueError(f'rate must be positive, got {rate_hz}')
    if out.exists() or out.is_symlink():
        raise FileExistsError(f'{out} exists already; not overwriting it')
    start = time.time_ns() if start_ns is None else int(start_ns)
    store = typestore()
    msgtype = COMPRESSED_TYPE if compressed else IMAGE_TYPE
    topic = image_topic.rstrip('/') + '/compressed' if compressed else image_topic
    writer = Writer(out, version=BAG_VERSION, storage_plugin=plugin)
    writer.open()
    try:
        img_conn = writer.add_connection(topic, msgtype, typestore=store)
        label_conn: Connection | None = None
        seq: Sequence[LabeledImage] | Any = items
        if progress:
            from tqdm import tqdm

            seq = tqdm(items, desc=f'bag {out.name}', unit='frame')
        for i, item in enumerate(seq):
            stamp = start + round(i * 1e9 / rate_hz)
            header = _header(stamp, frame_id)
            msg = _image_msg(read_rgb(item.path), header, compressed)
            writer.write(img_conn, stamp, store.serialize_cdr(msg, msgtype))
            if item.label is not None:
                if label_conn is None:
                    label_conn = writer.add_connection(label_topic, LABEL_TYPE, typestore=store)
                label = store.types[LABEL_TYPE](header=header, class_index=int(item.label),
                                                class_name=class_name(int(item.label)), source=Path(item.path).name)
                writer.write(label_conn, stamp, store.serialize_cdr(label, LABEL_TYPE))
        writer.close()
    except BaseException:
        writer.abort()
        shutil.rmtree(out, ignore_errors=True)
        raise
    return len(items)


# --- reading ---------------------------------------------------------------------------------

def _image_connections(reader: Reader, image_topic: str | None) -> list[Connection]:
    conns = [c for c in reader.connections if c.msgtype in IMAGE_TYPES]
    if image_topic is not None:
        chosen = [c for c in conns if c.topic == image_topic]
        if not chosen:
            raise ValueError(f'{reader.path} has no Image or CompressedImage topic {image_topic!r} '
                             f'(image topics: {", ".join(sorted({c.topic for c in conns})) or "none"})')
        return chosen
    topics = sorted({c.topic for c in conns})
    if not topics:
        raise ValueError(f'{reader.path} has no sensor_msgs/msg/Image or CompressedImage topic')
    if len(topics) > 1:
        raise ValueError(f'{reader.path} has several image topics ({", ".join(topics)}); choose one')
    return [c for c in conns if c.topic == topics[0]]


def _open(path: Path) -> Reader:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f'bag {path} does not exist')
    reader = Reader(path)
    reader.open()
    return reader


def _labels(reader: Reader, label_topic: str) -> dict[int, tuple[int, str]]:
    """{header stamp: (class index, source)} of the bag's FrameLabel messages."""
    store = typestore()
    conns = [c for c in reader.connections if c.topic == label_topic and c.msgtype == LABEL_TYPE]
    table: dict[int, tuple[int, str]] = {}
    if conns:
        for conn, _, raw in reader.messages(connections=conns):
            msg = store.deserialize_cdr(raw, conn.msgtype)
            table[_stamp_ns(msg.header)] = (int(msg.class_index), str(msg.source))
    return table


def read_image_bag(path: Path, *, image_topic: str | None = None, label_topic: str = LABEL_TOPIC,
                   limit: int = 0) -> Iterator[BagFrame]:
    """The camera frames of a bag (either storage) in bag order, decoded to RGB, with the label of
    the same header stamp; at most ``limit`` (0: all). Streams: one image in memory at a time.

    A missing bag or image topic raises here, not at the first frame.
    """
    reader = _open(path)
    try:
        topic = _image_connections(reader, image_topic)[0].topic
    finally:
        reader.close()
    return _frames(Path(path), topic, label_topic, limit)


def _frames(path: Path, topic: str, label_topic: str, limit: int) -> Iterator[BagFrame]:
    reader = _open(path)
    try:
        conns = _image_connections(reader, topic)
        labels = _labels(reader, label_topic)
        store = typestore()
        for index, (conn, _, raw) in enumerate(reader.messages(connections=conns)):
            if 0 < limit <= index:
                break
            msg = store.deserialize_cdr(raw, conn.msgtype)
            rgb = compressed_to_rgb(msg) if conn.msgtype == COMPRESSED_TYPE else image_to_rgb(msg)
            stamp = _stamp_ns(msg.header)
            label, source = labels.get(stamp, (-1, ''))
            yield BagFrame(index=index, stamp_ns=stamp, rgb=rgb, label=None if label < 0 else label, source=source)
    finally:
        reader.close()


def count_frames(path: Path, *, image_topic: str | None = None) -> int:
    """Number of camera messages in the bag (from its index, nothing decoded)."""
    reader = _open(path)
    try:
        return sum(c.msgcount for c in _image_connections(reader, image_topic))
    finally:
        reader.close()


def _storage_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.name != 'metadata.yaml')


def bag_fingerprint(path: Path) -> str:
    """Short hex id of a bag's content (topics, types, counts, time range, and the size and both
    ends of each storage file); the same for the same bag wherever it lies."""
    path = Path(path)
    reader = _open(path)
    try:
        meta = {
            'topics': sorted((c.topic, c.msgtype, c.msgcount) for c in reader.connections),
            'messages': reader.message_count,
            'start': reader.start_time,
            'end': reader.end_time,
        }
    finally:
        reader.close()
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for f in _storage_files(path):
        size = f.stat().st_size
        digest.update(size.to_bytes(8, 'little'))
        with f.open('rb') as fh:
            digest.update(fh.read(_FINGERPRINT_SAMPLE))
            if size > _FINGERPRINT_SAMPLE:
                fh.seek(max(_FINGERPRINT_SAMPLE, size - _FINGERPRINT_SAMPLE))
                digest.update(fh.read())
    return digest.hexdigest()[:16]


# --- results ---------------------------------------------------------------------------------

class ResultBagWriter:
    """A new bag of serialized OffloadResult messages on one topic; use as a context manager."""

    def __init__(self, path: Path, *, storage: str = 'mcap', topic: str = '/sage/result') -> None:
        self.path = Path(path)
        self.topic = topic
        plugin = _plugin(storage)
        if self.path.exists() or self.path.is_symlink():
            raise FileExistsError(f'{self.path} exists already; not overwriting it')
        self._writer = Writer(self.path, version=BAG_VERSION, storage_plugin=plugin)
        self._writer.open()
        self._conn = self._writer.add_connection(topic, RESULT_TYPE, typestore=typestore())
        self._open = True
        self.count = 0

    def write(self, stamp_ns: int, cdr: bytes) -> None:
        """Append one OffloadResult (CDR bytes, encapsulation header included) at ``stamp_ns``."""
        if not self._open:
            raise ValueError(f'result bag {self.path} is closed')
        self._writer.write(self._conn, int(stamp_ns), bytes(cdr))
        self.count += 1

    def close(self) -> None:
        """Finish the bag (index and metadata.yaml); idempotent."""
        if self._open:
            self._open = False
            self._writer.close()

    def discard_if_empty(self) -> None:
        """Close, and remove the bag when nothing was written to it (a run that failed at its start)."""
        self.close()
        if self.count == 0:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> ResultBagWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        # Results written before an error are kept: the bag is closed properly either way.
        self.close()


def read_results_bag(path: Path, *, topic: str = '/sage/result') -> list[Any]:
    """The OffloadResult messages of ``topic`` (rosbags objects), in bag order."""
    reader = _open(path)
    try:
        conns = [c for c in reader.connections if c.topic == topic]
        if not conns:
            raise ValueError(f'{path} has no topic {topic!r}')
        bad = {c.msgtype for c in conns} - {RESULT_TYPE}
        if bad:
            raise ValueError(f'{topic} in {path} holds {", ".join(sorted(bad))}, not {RESULT_TYPE}')
        store = typestore()
        return [store.deserialize_cdr(raw, RESULT_TYPE) for _, _, raw in reader.messages(connections=conns)]
    finally:
        reader.close()
