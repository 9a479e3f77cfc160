# SPDX-License-Identifier: Apache-2.0
"""Two-round evidence, ROS-free: which patches a second round adds, what the cloud keeps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ros.core import SelectionError, edge_forward, normalize
from sage_ros.core.link import BudgetController, Exchange, LinkEstimator, UplinkMonitor
from sage_ros.core.offload import Budget, SelectionConfig, classify_batch, classify_batch_attended, plan_second_round
from sage_ros.core.rounds import (RoundOneStore, cloud_roi, continue_sage, neighbours, roi_neighbours,
                                  select_second_round)
from sage_ros.core.selection import select_sage

N = 196


def features(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(N), rng.normal(size=(N, 24)).astype(np.float32)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(0, 120), k=st.integers(0, 120),
       ratio=st.sampled_from([1.0, 1.5, 2.0, 3.0]))
def test_continue_adds_distinct_unsent_patches(seed, b, k, ratio):
    att, emb = features(seed)
    sent = select_sage(att, emb, b, prefilter_ratio=ratio)
    more = continue_sage(att, emb, sent, k, prefilter_ratio=ratio)
    assert more.size == min(k, N - sent.size)
    assert np.unique(more).size == more.size and not np.isin(more, sent).any()
    assert ((0 <= more) & (more < N)).all()
    np.testing.assert_array_equal(more, continue_sage(att, emb, sent, k, prefilter_ratio=ratio))  # deterministic


def test_continue_from_nothing_is_sage_and_from_sage_stays_in_the_enlarged_prefilter():
    att, emb = features(3)
    np.testing.assert_array_equal(continue_sage(att, emb, [], 32), select_sage(att, emb, 32))
    sent = select_sage(att, emb, 32)
    more = continue_sage(att, emb, sent, 16, prefilter_ratio=2.0)
    top = np.argsort(-att, kind='stable')[:96]  # ceil(2 x (32 + 16))
    assert np.isin(more, top).all()
    # Farthest-point: the first added patch is the candidate least similar to all of round 1.
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cand = top[~np.isin(top, sent)]
    assert more[0] == cand[np.argmin((unit[cand] @ unit[sent].T).max(axis=1))]


def test_roi_takes_unsent_neighbours_region_by_region():
    assert sorted(neighbours(0)) == [1, 14, 15] and len(neighbours(15)) == 8
    sent = [15, 16]
    got = roi_neighbours([15, 100], sent, 12)
    assert not np.isin(got, sent).any() and np.unique(got).size == got.size
    assert set(got[:7].tolist()) == set(neighbours(15)) - {16}  # region 1 first: its 7 unsent neighbours
    assert set(got[7:].tolist()) <= set(neighbours(100))
    assert roi_neighbours([0], [1, 14, 15], 5).size == 0  # nothing left around it
    att = np.zeros(N)
    att[29] = 1.0
    assert roi_neighbours([15], [], 1, attention=att)[0] == 29  # the edge's attention orders a region
    with pytest.raises(SelectionError):
        roi_neighbours([196], [], 4)
    with pytest.raises(SelectionError):
        select_second_round('more', attention=att, embeddings=np.ones((N, 4)), sent=[], k=4)
    assert select_second_round('off', attention=att, embeddings=np.ones((N, 4)), sent=[], k=4).size == 0


def test_cloud_roi_ranks_the_tokens_it_attended():
    np.testing.assert_array_equal(cloud_roi([0.1, 0.5, 0.2], [40, 7, 99], 2), [7, 99])
    with pytest.raises(SelectionError):
        cloud_roi([0.1], [1, 2], 1)


def test_server_attention_over_all_patches_is_the_edge_attention(tiny, real_images):
    """The cloud's CLS attention comes from the same last block as the edge's importance."""
    crop = tiny.crop(real_images[0])[0]
    edge = edge_forward(tiny, normalize(crop, tiny.mean, tiny.std))[0]
    patches = crop.reshape(14, 16, 14, 16, 3).transpose(0, 2, 1, 3, 4).reshape(N, 16, 16, 3)
    probs, att = classify_batch_attended(tiny, [(patches, np.arange(N)), (patches[:40], np.arange(40))])
    np.testing.assert_allclose(att[0], edge.attention, atol=1e-5)
    np.testing.assert_allclose(probs[0], edge.probs, atol=1e-5)
    assert att[1].shape == (40,)
    np.testing.assert_allclose(probs, classify_batch(tiny, [(patches, np.arange(N)), (patches[:40], np.arange(40))]),
                               atol=1e-6)


def test_round_one_store_is_bounded_and_per_robot():
    now = [0.0]
    store = RoundOneStore(max_entries=3, ttl_s=1.0, clock=lambda: now[0])
    tok = np.zeros((4, 16, 16, 3), np.uint8)
    for i in range(5):
        store.put(f'r/{i}', 'r', tok, np.arange(4), more=8)
    assert len(store) == 3 and store.evicted == 2
    assert store.take('r/0', 'r', [9])[0] is None  # evicted: round 2 is refused
    # Keyed by its owner: under another robot's key the id is simply unknown, and stays kept.
    state, why = store.take('r/4', 'other', [9])
    assert state is None and 'unknown request' in why and len(store) == 3
    assert store.take('r/4', 'r', list(range(10, 19)))[1].startswith('second round of 9 patches')
    assert 'repeats' in store.take('r/3', 'r', [2])[1]
    state, why = store.take('r/2', 'r', [10, 11])
    assert why == '' and state.indices.tolist() == [0, 1, 2, 3]
    assert store.take('r/2', 'r', [10])[0] is None  # answered once
    store.put('r/9', 'r', tok, np.arange(4), more=8, ttl_s=0.2)
    now[0] = 0.3
    assert store.take('r/9', 'r', [10])[0] is None and store.expired == 1


def test_round_one_state_is_its_robots_alone():
    """Another robot's round 1 under the same request id neither replaces nor reaches it, and a
    robot asking many cannot push another's state out of the full store."""
    now = [0.0]
    store = RoundOneStore(max_entries=4, ttl_s=5.0, clock=lambda: now[0])
    mine, theirs = np.zeros((4, 16, 16, 3), np.uint8), np.full((8, 16, 16, 3), 255, np.uint8)
    store.put('robot1/7-ab', 'robot1', mine, np.arange(4), more=8)
    store.put('robot1/7-ab', 'intruder', theirs, np.arange(100, 108), more=8)  # robot1's id, another key
    assert store.kept_tokens('robot1/7-ab', 'robot1') == 4 and store.kept_tokens('robot1/7-ab', 'intruder') == 8
    for i in range(10):  # the intruder fills the store
        store.put(f'x/{i}', 'intruder', theirs, np.arange(8), more=8)
    assert len(store) == 4 and store.evicted == 8
    state, why = store.take('robot1/7-ab', 'robot1', [50, 51])
    assert why == '' and state.indices.tolist() == [0, 1, 2, 3] and (state.patches == 0).all()
    # Expiry, in order of each entry's own time, without scanning the rest.
    store.put('robot1/8-cd', 'robot1', mine, np.arange(4), more=8, ttl_s=0.5)
    now[0] = 1.0
    assert store.take('robot1/8-cd', 'robot1', [9])[0] is None
    assert store.expired == 1 and len(store) == 3  # the intruder's, 5 s each, are still kept


def _measured_monitor(now: list[float]) -> UplinkMonitor:
    c = BudgetController(deadline_s=0.6, budget_min=8, budget_max=96)
    mon = UplinkMonitor(c, LinkEstimator(), clock=lambda: now[0])
    c.learn_payload(64, 64 * 100)
    # Base RTT 20 ms, 111 kB/s, the cloud 0.1 s for 64 patches.
    for rtt, size, patches, server in ((0.02, 500, 0, 0.0), (0.3, 20_000, 64, 0.1), (0.3, 20_000, 64, 0.1)):
        mon.link.update(Exchange(size, patches, size, rtt, server, server))
    return mon


def test_monitor_offers_a_second_round_only_within_the_deadline():
    now = [10.0]
    mon = _measured_monitor(now)
    k, took = mon.second_round_offer(arrival=10.0, patches=32, total_max=96)
    assert 0 < k <= 64 and took > 0
    # Half the deadline already gone: less room, or none.
    k_late, _ = mon.second_round_offer(arrival=9.75, patches=32, total_max=96)
    assert 0 < k_late < k
    assert mon.second_round_offer(arrival=9.5, patches=32, total_max=96) == (0, 0.0)
    assert mon.second_round_offer(arrival=10.0, patches=96, total_max=96) == (0, 0.0)  # budget_max used
    assert mon.second_round_fits(arrival=10.0, patches=16, tokens=48)
    assert not mon.second_round_fits(arrival=9.5, patches=16, tokens=48)
    # A second round is traffic: booked in the uplink queue and counted.
    mon.sent('r/1', request_bytes=2000, patches=16, payload_bytes=1600, deadline=11.0, tokens=48)
    assert mon.snapshot().second_rounds == 1 and mon.snapshot().queued_bytes > 0


def test_a_second_round_is_planned_like_a_first_within_its_own_budget(tiny, real_images):
    """plan_second_round: the continue pick, encoded alone, trimmed to the byte budget."""
    crop = tiny.crop(real_images[1])[0]
    edge = edge_forward(tiny, normalize(crop, tiny.mean, tiny.std))[0]
    sent = select_sage(edge.attention, edge.embeddings, 32)
    config = SelectionConfig(encoding='jpeg', quality=90)
    full = plan_second_round(crop, edge, sent, 'continue', Budget(16), config)
    np.testing.assert_array_equal(full.indices, continue_sage(edge.attention, edge.embeddings, sent, 16))
    tight = plan_second_round(crop, edge, sent, 'continue', Budget(16, full.num_bytes // 2), config)
    assert 0 < tight.indices.size < 16 and tight.num_bytes <= full.num_bytes // 2
    np.testing.assert_array_equal(tight.indices, full.indices[: tight.indices.size])  # least important dropped
    with pytest.raises(SelectionError):
        plan_second_round(crop, edge, sent, 'roi', Budget(16), config, roi=[500])
