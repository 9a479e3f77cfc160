# SPDX-License-Identifier: Apache-2.0
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sage_ros.core import gate_score, margin_uncertainty, min_entropy, shannon_entropy, should_offload


def test_min_entropy_known_values():
    assert min_entropy([1.0, 0.0, 0.0]) == 0.0
    assert min_entropy([0.5, 0.25, 0.25]) == pytest.approx(1.0)
    assert min_entropy(np.full(1000, 1e-3)) == pytest.approx(math.log2(1000))


def test_gate_threshold_is_inclusive():
    # eta = 1.0 bit means "offload unless the top class has more than half the mass".
    assert should_offload(min_entropy([0.5, 0.5]), 1.0)
    assert not should_offload(min_entropy([0.51, 0.49]), 1.0)
    assert should_offload(min_entropy([0.49, 0.51 / 2, 0.51 / 2]), 1.0)


def test_alternative_metrics():
    assert shannon_entropy([0.5, 0.5]) == pytest.approx(1.0)
    assert shannon_entropy([1.0, 0.0]) == 0.0
    assert margin_uncertainty([0.7, 0.2, 0.1]) == pytest.approx(0.5)
    assert gate_score([0.5, 0.5], 'entropy') == pytest.approx(1.0)
    with pytest.raises(ValueError, match='unknown gate metric'):
        gate_score([1.0], 'bogus')


def test_rejects_bad_vectors():
    for bad in ([], [[0.5, 0.5]], [np.nan, 1.0], [-0.1, 1.1]):
        with pytest.raises(ValueError):
            min_entropy(bad)


@given(arrays(np.float64, st.integers(2, 50), elements=st.floats(1e-6, 1.0)))
def test_min_entropy_is_a_lower_bound_of_shannon(v):
    p = v / v.sum()
    assert 0.0 <= min_entropy(p) <= shannon_entropy(p) + 1e-9
    assert min_entropy(p) <= math.log2(p.size) + 1e-9
