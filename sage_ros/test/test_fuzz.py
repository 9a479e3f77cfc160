# SPDX-License-Identifier: Apache-2.0
"""Fuzzing the cloud's decode-and-validate path with arbitrary and mutated requests."""

from __future__ import annotations

import gc
import os
import struct
import time
import tracemalloc

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
# No request, however hostile, may cost the cloud more than this many of the costliest valid
# one: the limits bound the work, whatever the bytes say.
WORK_FACTOR = 100


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


def _cpu_s(data: bytes) -> tuple[float, tuple | None]:
    """This thread's CPU time for decoding ``data`` (other processes' load does not count, nor
    does a garbage collection of the test's objects), and the decoded request or None."""
    gc.disable()
    t0 = time.thread_time()
    try:
        out = decode_request(data, LIMITS)
    except RejectedRequest:
        out = None
    finally:
        took = time.thread_time() - t0
        gc.enable()
    return took, out


@pytest.fixture(scope='module')
def work_limit_s(real_images) -> float:
    """Calibrated on this machine: WORK_FACTOR times the CPU time of the costliest valid
    request the limits admit (every patch, in each codec; the best of five, warm)."""
    crop, _ = resize_crop(real_images[0])
    idx = np.arange(LIMITS.max_budget)
    patches = extract_patches(crop, idx)
    costs = []
    for enc in ('raw', 'png', 'jpeg'):
        data = serialize_message(PatchSet(
            request_id='fuzz/max', robot_id='fuzz', input_size=224, patch_size=16, grid_rows=14, grid_cols=14,
            budget_patches=LIMITS.max_budget, method='sage', indices=idx.astype(np.uint16), encoding=enc,
            quality=90 if enc == 'jpeg' else 0, payload=encode_patches(patches, enc, quality=90)))
        runs = [_cpu_s(data) for _ in range(6)]
        assert all(out is not None for _, out in runs)
        costs.append(min(took for took, _ in runs[1:]))
    return WORK_FACTOR * max(costs)


def _decode(data: bytes, work_limit_s: float) -> None:
    """Only two outcomes are allowed: a valid request, or RejectedRequest; and either within
    the work the limits allow (no hang, no decompression bomb)."""
    TRIED['n'] += 1
    took, out = _cpu_s(data)
    assert took < work_limit_s, (took, work_limit_s)
    if out is None:
        return
    msg, idx, patches = out
    assert idx.size <= msg.budget_patches <= LIMITS.max_budget or msg.method == 'probe'
    assert patches.shape == (idx.size, 16, 16, 3)


FUZZ = settings(max_examples=int(os.environ.get('SAGE_ROS_FUZZ_EXAMPLES', '300')), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(st.binary(max_size=4096))
def test_arbitrary_bytes(work_limit_s, data):
    _decode(data, work_limit_s)
    _decode(b'\x00\x01\x00\x00' + data, work_limit_s)  # with a valid CDR header


@FUZZ
@given(st.data())
def test_mutated_valid_requests(seeds, work_limit_s, data):
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
    _decode(bytes(msg), work_limit_s)


def test_a_4gb_length_field_is_refused_before_allocating(seeds):
    msg = bytearray(seeds[0])
    payload_len = 24 * 768
    pos = bytes(msg).rfind(struct.pack('<I', payload_len))  # the payload's length prefix
    assert pos > 0
    msg[pos:pos + 4] = struct.pack('<I', 0xFFFFFFF0)
    tracemalloc.start()
    try:
        with pytest.raises(RejectedRequest, match='malformed CDR'):
            decode_request(bytes(msg), LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Python's and numpy's allocations while parsing: a few copies of the 18 kB message at most,
    # nothing like the 4 GB the field claims (or even one buffer of it read from the message).
    assert peak < 1_000_000, peak


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
