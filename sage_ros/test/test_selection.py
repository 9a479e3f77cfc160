# SPDX-License-Identifier: Apache-2.0
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sage_ros.core import (
    METHODS,
    SelectionError,
    coverage,
    select,
    select_attention_sum,
    select_attention_threshold,
    select_attention_topk,
    select_bat,
    select_detailed,
    select_sage,
    select_uniform_grid,
)

N = 196


@st.composite
def frames(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    # Mix of smooth and tied attention, like real CLS attention with repeated values.
    att = rng.dirichlet(np.full(N, draw(st.sampled_from([0.1, 1.0, 10.0]))))
    if draw(st.booleans()):
        att = np.round(att, 3)
    emb = rng.standard_normal((N, draw(st.sampled_from([8, 192])))).astype(np.float32)
    return att, emb


budgets = st.integers(0, N + 20)


@settings(max_examples=60, deadline=None)
@given(frames(), budgets, st.sampled_from(METHODS), st.integers(0, 5))
def test_every_method_is_budget_safe_distinct_in_range_and_deterministic(frame, budget, method, seed):
    att, emb = frame
    params = {'attention_threshold': {'delta': 0.002}, 'attention_sum': {'delta_sum': 0.9}}.get(method, {})
    idx = select(method, att, emb, budget, seed=seed, **params)
    assert idx.dtype.kind == 'i'
    assert idx.size <= min(budget, N)
    assert np.unique(idx).size == idx.size
    assert idx.size == 0 or (idx.min() >= 0 and idx.max() < N)
    again = select(method, att, emb, budget, seed=seed, **params)
    np.testing.assert_array_equal(idx, again)
    if method not in ('attention_threshold', 'attention_sum'):
        assert idx.size == min(budget, N)  # budgeted methods use the whole budget


@settings(max_examples=40, deadline=None)
@given(frames(), st.integers(1, N))
def test_sage_with_k1_is_attention_prefix(frame, budget):
    att, emb = frame
    # Same patches (FPS only reorders them): the request carries the same pixels.
    np.testing.assert_array_equal(
        np.sort(select('sage', att, emb, budget, prefilter_ratio=1.0)),
        np.sort(select('attention_topk', att, emb, budget)),
    )


@settings(max_examples=40, deadline=None)
@given(frames(), st.integers(1, N), st.floats(1.0, 4.0))
def test_sage_never_leaves_the_prefilter_and_starts_at_max_attention(frame, budget, k):
    att, emb = frame
    idx = select('sage', att, emb, budget, prefilter_ratio=k)
    prefilter = set(select('attention_topk', att, emb, math.ceil(k * budget)).tolist())
    assert set(idx.tolist()) <= prefilter
    assert idx[0] == select('attention_topk', att, emb, 1)[0]


def test_sage_farthest_point_rule_on_a_hand_made_case():
    # Patches 0,1,2 are near-duplicates with the highest attention; 3 and 4 point elsewhere.
    att = np.array([0.30, 0.29, 0.28, 0.10, 0.03] + [0.0] * 5)
    emb = np.zeros((10, 3), np.float32)
    emb[[0, 1, 2]] = [1.0, 0.0, 0.0]
    emb[1, 1] = 0.01
    emb[3] = [0.0, 1.0, 0.0]
    emb[4] = [0.0, 0.0, 1.0]
    # k = 2, B = 3: candidates are patches 0..5; patch 5 has zero attention and a zero embedding.
    assert select_sage(att, emb, 3, prefilter_ratio=2.0).tolist() == [0, 3, 4]
    # The attention prefix would send the three duplicates.
    assert select('attention_topk', att, emb, 3).tolist() == [0, 1, 2]


def test_sage_ties_go_to_higher_attention_then_lower_index():
    att = np.array([0.5, 0.2, 0.2, 0.1])
    emb = np.array([[1, 0], [0, 1], [0, 1], [0, 1]], np.float32)
    # 1, 2 and 3 are equally far from 0: 1 and 2 tie on attention too, so the lower index wins.
    assert select_sage(att, emb, 2, prefilter_ratio=2.0).tolist() == [0, 1]
    att = np.array([0.5, 0.1, 0.3, 0.1])
    assert select_sage(att, emb, 2, prefilter_ratio=2.0).tolist() == [0, 2]


def test_threshold_methods_follow_im_et_al_and_count_truncation():
    att = np.array([0.4, 0.3, 0.2, 0.05, 0.05])
    assert select_attention_threshold(att, 5, delta=0.1).tolist() == [0, 1, 2]
    assert select_attention_sum(att, 5, delta_sum=0.7).tolist() == [0, 1]
    assert select_attention_sum(att, 5, delta_sum=0.71).tolist() == [0, 1, 2]
    assert select_attention_sum(att, 5, delta_sum=1.0).size == 5
    sel = select_detailed('attention_threshold', att, None, 2, delta=0.1)
    assert sel.indices.tolist() == [0, 1] and sel.truncated == 1
    assert select_detailed('attention_sum', att, None, 4, delta_sum=0.5).truncated == 0


def test_uniform_grid_is_spread_for_every_budget():
    for b in range(0, N + 1):
        idx = select_uniform_grid(b)
        assert idx.size == b and np.unique(idx).size == b
    assert coverage(select_uniform_grid(49)) == 1.0
    assert coverage(select_uniform_grid(196)) == 1.0
    # 4 patches land one in each quadrant.
    quadrants = {(i // 14 >= 7, i % 14 >= 7) for i in select_uniform_grid(4).tolist()}
    assert len(quadrants) == 4


def test_coverage_counts_7x7_cells():
    assert coverage([]) == 0.0
    assert coverage([0, 1, 14, 15]) == pytest.approx(1 / 49)  # one 2x2 cell
    assert coverage([0, 2]) == pytest.approx(2 / 49)
    assert coverage(np.arange(196)) == 1.0


def test_bad_arguments_are_clear_errors():
    att = np.ones(N) / N
    with pytest.raises(SelectionError, match='unknown selection method'):
        select('bogus', att, None, 4)
    with pytest.raises(SelectionError, match='budget'):
        select('attention_topk', att, None, -1)
    with pytest.raises(SelectionError, match='embeddings'):
        select('sage', att, None, 4)
    with pytest.raises(SelectionError, match='shape'):
        select('sage', att, np.ones((5, 3)), 4)
    with pytest.raises(SelectionError, match='NaN'):
        select('attention_topk', np.full(N, np.nan), None, 4)
    with pytest.raises(SelectionError, match='prefilter_ratio'):
        select('sage', att, np.ones((N, 3)), 4, prefilter_ratio=0.5)


@settings(max_examples=40, deadline=None)
@given(frames(), st.integers(1, N))
def test_bat_with_attentive_share_1_is_the_attention_prefix(frame, budget):
    att, emb = frame
    np.testing.assert_array_equal(select_bat(att, emb, budget, attentive_share=1.0),
                                  select_attention_topk(att, budget))


def test_bat_spends_the_rest_of_the_budget_on_the_centres_of_dense_clusters():
    """Two tight clusters of embeddings and scattered patches, all with low attention: the
    diverse part picks one patch per cluster before anything else."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(N, 8)) * 3.0
    emb[10:20] = np.array([10.0] * 8) + rng.normal(size=(10, 8)) * 0.01
    emb[50:60] = np.array([-10.0] * 8) + rng.normal(size=(10, 8)) * 0.01
    att = np.full(N, 0.001)
    att[[100, 101, 102, 103]] = [0.5, 0.4, 0.3, 0.2]
    idx = select_bat(att, emb, 6, attentive_share=4 / 6)
    assert idx[:4].tolist() == [100, 101, 102, 103]  # the attentive part, in attention order
    centres = set(idx[4:].tolist())
    assert len(centres & set(range(10, 20))) == 1 and len(centres & set(range(50, 60))) == 1


def test_bat_refuses_bad_parameters():
    att, emb = np.full(N, 1.0 / N), np.ones((N, 4))
    with pytest.raises(SelectionError, match='attentive_share'):
        select_bat(att, emb, 8, attentive_share=1.5)
    with pytest.raises(SelectionError, match='k must be'):
        select_bat(att, emb, 8, k=0)
    with pytest.raises(SelectionError, match='embeddings'):
        select_bat(att, emb[:10], 8)
