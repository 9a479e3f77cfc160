# SPDX-License-Identifier: Apache-2.0
"""Zenoh sessions and key names for sage_ros.

Payloads are the standard CDR serialisation of the ROS message (4-byte encapsulation header
included) and keys are the ROS topic name without its leading slash, which is exactly how
zenoh-bridge-ros2dds maps topics: a site running that bridge can use it in place of ours.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import zenoh

RESULT_SUFFIX_ERROR = 'request key {key!r} does not end with {suffix!r}'


def topic_to_key(resolved_topic: str) -> str:
    """'/robot1/sage/patch_set' -> 'robot1/sage/patch_set' (as zenoh-bridge-ros2dds does)."""
    key = resolved_topic.strip('/')
    if not key:
        raise ValueError('empty topic name')
    return key


def reply_key(request_key: str, request_suffix: str, reply_suffix: str) -> str:
    """The key of the answer to a request: same robot prefix, other topic.

    'robot1/sage/patch_set' -> 'robot1/sage/cloud_result'.
    """
    request_suffix, reply_suffix = request_suffix.strip('/'), reply_suffix.strip('/')
    if request_key == request_suffix:
        return reply_suffix
    if not request_key.endswith('/' + request_suffix):
        raise ValueError(RESULT_SUFFIX_ERROR.format(key=request_key, suffix=request_suffix))
    return request_key[: -len(request_suffix)] + reply_suffix


def robot_of(request_key: str, request_suffix: str) -> str:
    """Robot namespace a request key belongs to ('' without a namespace)."""
    prefix = reply_key(request_key, request_suffix, '')
    return prefix.strip('/')


def load_config(path: Path, *, connect: str = '', listen: str = '') -> zenoh.Config:
    """A Zenoh config from a json5 file, with endpoints optionally replaced.

    ``connect`` / ``listen`` are comma-separated endpoint lists (e.g. 'tcp/10.0.0.5:7447');
    empty keeps the file's.
    """
    conf = zenoh.Config.from_file(str(path))
    for field, value in (('connect/endpoints', connect), ('listen/endpoints', listen)):
        endpoints = [e.strip() for e in value.split(',') if e.strip()]
        if endpoints:
            conf.insert_json5(field, json.dumps(endpoints))
    return conf


def open_session(path: Path, *, connect: str = '', listen: str = '') -> zenoh.Session:
    """Open a Zenoh session from a config file (see :func:`load_config`)."""
    return zenoh.open(load_config(path, connect=connect, listen=listen))


# zenoh.open's error for a listen endpoint that another process holds.
_ADDRESS_IN_USE = re.compile(r'bound to (\S+): \[.*(?:Address already in use|os error 98)', re.S)


def error_text(exc: BaseException) -> str:
    """A Zenoh error as one readable line: the message of a Json5Err, no Rust source locations."""
    text = str(exc)
    inner = re.search(r'msg: "((?:[^"\\]|\\.)*)"', text)
    if inner:
        text = inner.group(1)
    text = re.sub(r',? at /\S+\.rs:\d+\.?', '', text)
    return ' '.join(text.split()) or type(exc).__name__


def busy_endpoint(exc: BaseException) -> str | None:
    """The endpoint ``exc`` says cannot be listened on because it is in use, else None."""
    match = _ADDRESS_IN_USE.search(str(exc))
    return match.group(1) if match else None


class ZenohChannel:
    """Put CDR bytes on one key, receive CDR bytes from another (one robot, one direction each)."""

    def __init__(self, session: zenoh.Session, put_key: str, sub_key: str,
                 on_bytes: Callable[[str, bytes], None]) -> None:
        self._publisher = session.declare_publisher(
            put_key, congestion_control=zenoh.CongestionControl.DROP, reliability=zenoh.Reliability.RELIABLE
        ) if put_key else None
        self._subscriber = session.declare_subscriber(
            sub_key, lambda sample: on_bytes(str(sample.key_expr), sample.payload.to_bytes())
        )

    def has_subscribers(self) -> bool:
        """Does anything (the cloud) subscribe to the put key now? Zenoh tracks it through the
        router: a cloud that stops or dies is seen as soon as the router notices."""
        return self._publisher is not None and bool(self._publisher.matching_status.matching)

    def put(self, data: bytes) -> None:
        if self._publisher is None:
            raise RuntimeError('this channel has no put key')
        self._publisher.put(data)

    def close(self) -> None:
        if self._publisher is not None:
            self._publisher.undeclare()
        self._subscriber.undeclare()
