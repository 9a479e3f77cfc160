# SPDX-License-Identifier: Apache-2.0
"""Zenoh sessions and key names for sage_ros.

Payloads are the standard CDR serialisation of the ROS message (4-byte encapsulation header
included) and keys are the ROS topic name without its leading slash, which is exactly how
zenoh-bridge-ros2dds maps topics: a site running that bridge can use it in place of ours.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

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
    empty keeps the file's. A missing file (FileNotFoundError) or one that is not valid json5
    (ValueError) is refused in one line naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Zenoh config {str(path)!r} ' + ('is not a file' if path.exists() else 'not found'))
    try:
        conf = zenoh.Config.from_file(str(path))
    except zenoh.ZError as exc:
        raise ValueError(f'Zenoh config {str(path)!r}: {error_text(exc)}') from None
    for field, value in (('connect/endpoints', connect), ('listen/endpoints', listen)):
        endpoints = [e.strip() for e in value.split(',') if e.strip()]
        if endpoints:
            conf.insert_json5(field, json.dumps(endpoints))
    return conf


def open_session(path: Path, *, connect: str = '', listen: str = '') -> zenoh.Session:
    """Open a Zenoh session from a config file (see :func:`load_config`)."""
    return zenoh.open(load_config(path, connect=connect, listen=listen))


def _config_value(conf: zenoh.Config, key: str) -> Any:
    """A value of a Zenoh config (None when unset)."""
    try:
        return json.loads(conf.get_json(key))
    except (zenoh.ZError, ValueError):
        return None


@dataclass(frozen=True)
class Identity:
    """Who a client session logs in to the router as: what a router's access control matches
    (a certificate's common name, or a user name)."""

    name: str
    """'' when the certificate cannot be read here."""
    evidence: str
    """'certificate /deploy/robot1.pem' or 'user robot1'."""


def session_identity(conf: zenoh.Config) -> Identity | None:
    """The identity a client config logs in with (mutual TLS certificate, else user/password),
    or None when it uses neither."""
    cert = _config_value(conf, 'transport/link/tls/connect_certificate')
    if cert:
        try:
            from cryptography import x509
            from cryptography.x509.oid import NameOID

            subject = x509.load_pem_x509_certificate(Path(cert).read_bytes()).subject
            name = str(subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        except (ImportError, OSError, ValueError, IndexError):  # shown by path only
            name = ''
        return Identity(name, f'certificate {cert}')
    user = _config_value(conf, 'transport/auth/usrpwd/user')
    return Identity(str(user), f'user {user}') if user else None


def connect_endpoints(conf: zenoh.Config) -> list[str]:
    """The endpoints a config connects to (a list, or per mode: {router: [...], peer: [...]})."""
    value = _config_value(conf, 'connect/endpoints') or []
    if isinstance(value, dict):
        value = [e for endpoints in value.values() for e in endpoints or []]
    return [str(e) for e in value]


# Endpoint protocols whose address is HOST:PORT.
_HOST_PORT = ('tcp', 'udp', 'tls', 'quic', 'ws')


def unresolvable(endpoint: str) -> str | None:
    """The host of ``endpoint`` ('tcp/999.999.999.999:7447') when it resolves to no address,
    else None. Zenoh retries such an endpoint for ever without a word."""
    locator = re.split(r'[?#]', endpoint, maxsplit=1)[0]
    proto, _, address = locator.partition('/')
    host = address.rpartition(':')[0].strip('[]')
    if proto not in _HOST_PORT or not host:
        return None
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return host
    return None


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
