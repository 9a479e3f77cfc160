# SPDX-License-Identifier: Apache-2.0
"""Requests off the wire: untrusted CDR bytes to a checked PatchSet, or a reason to refuse.

Intake under load reads as little as it can: :func:`peek_request_id` finds the id to answer
BUSY to without parsing the message, and :func:`decode_request` parses and validates only the
requests the model will serve.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from sage_ros_msgs.msg import PatchSet

from sage_ros.core import decode_patches
from sage_ros.core.request import RequestError, RequestLimits, check_request
from sage_ros.transport.typestore import typestore

PATCH_SET_TYPE = 'sage_ros_msgs/msg/PatchSet'
_MAX_ID = 256


def peek_request_id(data: bytes) -> str | None:
    """The request id of serialized PatchSet bytes, reading only the header before it; None
    when the bytes do not hold a plausible one (then there is nobody to answer)."""
    # CDR little endian: 4-byte encapsulation, header.stamp (int32 sec, uint32 nanosec),
    # header.frame_id (uint32 length incl. NUL, bytes, pad to 4), request_id likewise.
    try:
        if data[:2] != b'\x00\x01':
            return None
        off = 4 + 8
        for field in range(2):
            (n,) = struct.unpack_from('<I', data, off)
            if n == 0 or n > _MAX_ID * (4 if field == 0 else 1):
                return None
            text = data[off + 4: off + 4 + n]
            if len(text) != n or text[-1:] != b'\x00':
                return None
            off = (off + 4 + n + 3) & ~3
        return text[:-1].decode('utf-8')
    except (struct.error, UnicodeDecodeError):
        return None


# CDR framing and the non-payload fields of a PatchSet stay well under this.
_ENVELOPE_BYTES = 64 * 1024


class RejectedRequest(RequestError):
    """A request refused by :func:`decode_request`; ``request`` is the parsed message when the
    failure came after parsing (so the robot can be told), else None."""

    def __init__(self, why: str, request: Any = None) -> None:
        super().__init__(why)
        self.request = request


def decode_request(data: bytes, limits: RequestLimits) -> tuple[Any, np.ndarray, np.ndarray]:
    """Bytes off the wire to (message, indices, decoded patches), or :class:`RejectedRequest`.

    Order matters for hostile input: the size is checked before parsing, the CDR parser checks
    every length against the buffer before allocating, and the request is validated before
    its payload is decoded, whose image header is checked before its pixels.
    """
    if len(data) > limits.max_payload_bytes + _ENVELOPE_BYTES:
        raise RejectedRequest(f'message of {len(data)} B exceeds the limit')
    # Untrusted bytes are parsed by rosbags' pure-Python CDR reader, not rclpy's C type
    # support: fuzzing found inputs (e.g. invalid UTF-8 in a string) that crash the latter.
    try:
        msg = typestore().deserialize_cdr(data, PATCH_SET_TYPE)
    except Exception as exc:  # rosbags raises several types on bad CDR; all mean malformed
        raise RejectedRequest(f'malformed CDR: {type(exc).__name__}: {exc}') from None
    if msg.method == PatchSet.METHOD_PROBE:
        return msg, np.empty(0, np.int64), np.empty((0, 16, 16, 3), np.uint8)
    indices = np.asarray(msg.indices, dtype=np.int64).reshape(-1)
    try:
        check_request(indices=indices.tolist(), budget_patches=msg.budget_patches, encoding=msg.encoding,
                      payload_len=len(msg.payload), patch_size=msg.patch_size, grid_rows=msg.grid_rows,
                      grid_cols=msg.grid_cols, input_size=msg.input_size, limits=limits)
        payload = np.asarray(msg.payload, np.uint8).tobytes()
        patches = decode_patches(payload, msg.encoding, int(indices.size), patch=limits.patch_size)
    except (RequestError, ValueError) as exc:  # CodecError is a ValueError
        raise RejectedRequest(str(exc), msg) from None
    return msg, indices, patches
