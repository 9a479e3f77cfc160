# SPDX-License-Identifier: Apache-2.0
"""Fuzzing the cloud's decode-and-validate path with arbitrary and mutated requests."""

from __future__ import annotations

import os
import resource
import struct
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rclpy.serialization import serialize_message
from sage_ros_msgs.msg import PatchSet

from sage_ros.core import encode_patches, extract_patches, resize_crop
from sage_ros.core.request import RequestLimits
from sage_ros.nodes.cloud_node import RejectedRequest, decode_request

LIMITS = RequestLimits()
TRIED = {'n': 0}


def _request(encoding: str, patches: np.ndarray, indices: np.ndarray) -> bytes:
    return serialize_message(PatchSet(
        request_id='fuzz/1', robot_id='fuzz', input_size=224, patch_size=16, grid_rows=14, grid_cols=14,
        budget_patches=64, method='sage', indices=indices.astype(np.uint16), encoding=encoding,
        quality=90 if encoding == 'jpeg' else 0, payload=encode_patches(patches, encoding, quality=90)))


@pytest.fixture(scope='module')
def seeds(real_images):
    crop, _ = resize_crop(real_images[0])
    idx = np.arange(0, 196, 7)[:24]
    p = extract_patches(crop, idx)
    return [_request(enc, p, idx) for enc in ('raw', 'png', 'jpeg')]


def _decode(data: bytes) -> None:
    """Only two outcomes are allowed: a valid request, or RejectedRequest."""
    TRIED['n'] += 1
    t0 = time.perf_counter()
    try:
        msg, idx, patches = decode_request(data, LIMITS)
    except RejectedRequest:
        return
    finally:
        assert time.perf_counter() - t0 < 1.0  # no hang
    assert idx.size <= msg.budget_patches <= LIMITS.max_budget or msg.method == 'probe'
    assert patches.shape == (idx.size, 16, 16, 3)


FUZZ = settings(max_examples=int(os.environ.get('SAGE_ROS_FUZZ_EXAMPLES', '300')), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(data):
    _decode(data)
    _decode(b'\x00\x01\x00\x00' + data)  # with a valid CDR header


@FUZZ
@given(st.data())
def test_mutated_valid_requests(seeds, data):
    msg = bytearray(data.draw(st.sampled_from(seeds)))
    for _ in range(data.draw(st.integers(1, 8))):
        kind = data.draw(st.sampled_from(['flip', 'byte', 'length', 'truncate', 'extend']))
        if kind == 'truncate':
            del msg[data.draw(st.integers(0, len(msg))):]
        elif kind == 'extend':
            msg += data.draw(st.binary(max_size=64))
        elif msg:
            pos = data.draw(st.integers(0, len(msg) - 1))
            if kind == 'flip':
                msg[pos] ^= 1 << data.draw(st.integers(0, 7))
            elif kind == 'byte':
                msg[pos] = data.draw(st.integers(0, 255))
            else:  # an absurd length or count, 4-aligned like CDR's
                pos -= pos % 4
                msg[pos:pos + 4] = struct.pack('<I', data.draw(st.sampled_from([0xFFFFFFFF, 0xFFFFFFF0, 2**31, 10**6])))
    _decode(bytes(msg))


def test_a_4gb_length_field_is_refused_before_allocating(seeds):
    msg = bytearray(seeds[0])
    payload_len = 24 * 768
    pos = bytes(msg).rfind(struct.pack('<I', payload_len))  # the payload's length prefix
    assert pos > 0
    msg[pos:pos + 4] = struct.pack('<I', 0xFFFFFFF0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(RejectedRequest, match='malformed CDR'):
        decode_request(bytes(msg), LIMITS)
    assert time.perf_counter() - t0 < 0.1
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50_000  # kB: nothing like 4 GB


def test_seeds_are_valid_and_fuzzing_ran(seeds):
    for data in seeds:
        msg, idx, patches = decode_request(data, LIMITS)
        assert idx.size == 24 and patches.shape == (24, 16, 16, 3)
    print(f'fuzz cases tried in this session: {TRIED["n"]}')


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), max_size=40),
       st.text(st.characters(blacklist_characters='\x00', blacklist_categories=('Cs',)), max_size=200), st.binary(max_size=64))
def test_peek_reads_the_request_id_without_parsing_and_never_raises(frame_id, rid, tail):
    from std_msgs.msg import Header

    from sage_ros.transport.wire import peek_request_id

    data = serialize_message(PatchSet(request_id=rid, header=Header(frame_id=frame_id)))
    fits = len(rid.encode()) < 256 and len(frame_id.encode()) < 1024
    assert peek_request_id(data) == (rid if fits else None)
    for cut in (0, 3, 12, len(data) // 2):
        assert peek_request_id(data[:cut] + tail) is None or isinstance(peek_request_id(data[:cut] + tail), str)
