# SPDX-License-Identifier: Apache-2.0
"""Fair per-robot queues and batched server forwards of requests of different sizes."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ros.core.offload import classify_batch, classify_decoded
from sage_ros.core.codec import extract_patches
from sage_ros.core.scheduler import FairScheduler


def test_a_flooding_robot_sheds_its_own_requests_and_the_others_are_served_in_turn():
    s: FairScheduler[str] = FairScheduler(max_queue=8, per_robot=3)
    shed = []
    for i in range(50):
        shed += s.offer('flood', f'f{i}')
        if i in (0, 20, 40):
            shed += s.offer('calm', f'c{i}')
    assert shed and all(x.startswith('f') for x in shed)  # only the flood pays
    assert s.depth() == {'flood': 3, 'calm': 3}
    robots = [r for r, _ in s.take(4)]
    assert sorted(robots) == ['calm', 'flood']  # one each per batch
    assert s.counts['flood'].shed == 47 and s.counts['calm'].shed == 0
    # All queues together over max_queue: the longest sheds its oldest, not the newcomer.
    t: FairScheduler[str] = FairScheduler(max_queue=4, per_robot=4)
    assert [t.offer('a', f'a{i}') for i in range(4)] == [[]] * 4
    assert t.offer('b', 'b0') == ['a0'] and t.depth() == {'a': 3, 'b': 1}


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from('abcd'), st.booleans()), max_size=200),
       st.integers(1, 12), st.integers(1, 6), st.integers(1, 8))
def test_every_offered_item_is_served_or_shed_exactly_once_and_bounds_hold(ops, max_queue, per_robot, batch):
    s: FairScheduler[int] = FairScheduler(max_queue=max_queue, per_robot=per_robot)
    seen: list[int] = []
    for k, (robot, take) in enumerate(ops):
        seen += s.offer(robot, k)
        assert len(s) <= max_queue and all(d <= per_robot for d in s.depth().values())
        if take:
            got = s.take(batch, timeout=0)
            assert len(got) <= batch
            seen += [i for _, i in got]
    seen += [i for _, i in s.drain()]
    assert sorted(seen) == list(range(len(ops)))


def test_take_waits_for_a_fuller_batch_and_close_wakes_it():
    s: FairScheduler[int] = FairScheduler(max_queue=16, per_robot=16)
    s.offer('a', 0)
    threading.Timer(0.05, lambda: [s.offer(r, i) for r, i in (('b', 1), ('c', 2))]).start()
    assert len(s.take(3, wait_s=1.0)) == 3
    threading.Timer(0.05, s.close).start()
    assert s.take(3, timeout=5.0) == []


def test_batched_requests_of_different_sizes_equal_their_unbatched_answers(base, real_images):
    rng = np.random.default_rng(0)
    requests = []
    for rgb, m in zip(real_images[:5], (8, 64, 17, 196, 1)):
        crop, _ = base.crop(rgb)
        idx = np.sort(rng.choice(196, m, replace=False))
        requests.append((extract_patches(crop, idx), idx))
    batched = classify_batch(base, requests)
    for (patches, idx), got in zip(requests, batched):
        want = classify_decoded(base, patches, idx)
        np.testing.assert_allclose(got, want, atol=2e-5)
        assert int(np.argmax(got)) == int(np.argmax(want))


def test_size_groups_bound_the_padding_and_start_with_the_smallest():
    from sage_ros.core.offload import size_groups

    counts = [196, 8, 33, 12, 150, 1, 16]
    groups = size_groups(counts)
    assert sorted(i for g in groups for i in g) == list(range(len(counts)))
    assert groups[0] == [5]  # the smallest request is served first
    for g in groups:
        assert max(counts[i] for i in g) + 1 <= 2 * (min(counts[i] for i in g) + 1)
    assert size_groups([64] * 8) == [list(range(8))]  # equal sizes: one batch


def test_bf16_autocast_gives_the_same_answers_within_its_precision(base, real_images):
    from sage_ros.serving.local import LocalBackend

    rng = np.random.default_rng(2)
    requests = []
    for rgb in real_images[:4]:
        crop, _ = base.crop(rgb)
        idx = np.sort(rng.choice(196, 64, replace=False))
        requests.append((extract_patches(crop, idx), idx))
    full, half = (LocalBackend.__new__(LocalBackend) for _ in range(2))
    full.vit = half.vit = base
    full._precision, half._precision = 'fp32', 'bf16'
    a, b = full.classify(requests), half.classify(requests)
    assert np.abs(a - b).max() < 0.05 and not np.array_equal(a, b)  # bf16 did run, and stays close
    with pytest.raises(ValueError, match='precision'):
        LocalBackend('deit_tiny_patch16_224', 'random:0', precision='fp8')
