# SPDX-License-Identifier: Apache-2.0
import numpy as np
import pytest

from sage_ros.core import (
    Budget,
    BudgetError,
    SelectionConfig,
    classify_patches,
    edge_forward,
    normalize,
    plan_offload,
    resize_crop,
)
from sage_ros.core.codec import decode_patches, extract_patches


@pytest.fixture(scope='module')
def frames(tiny, real_images):
    out = []
    for rgb in real_images:
        crop, _ = resize_crop(rgb, crop_pct=tiny.crop_pct)
        out.append((crop, edge_forward(tiny, normalize(crop, tiny.mean, tiny.std))[0]))
    return out


@pytest.mark.parametrize('encoding', ['raw', 'png', 'jpeg'])
@pytest.mark.parametrize('method', ['sage', 'attention_topk', 'attention_threshold', 'random', 'uniform_grid'])
def test_every_request_fits_patch_and_byte_budgets(frames, encoding, method):
    params = {'delta': 0.0} if method == 'attention_threshold' else {}
    config = SelectionConfig(method=method, encoding=encoding, quality=75, method_params=params)
    for b, max_bytes in ((32, 0), (64, 5000), (96, 20000), (196, 3000)):
        budget = Budget(b, max_bytes)
        for crop, edge in frames:
            plan = plan_offload(crop, edge, budget, config)
            assert plan.indices.size <= b
            assert max_bytes == 0 or plan.num_bytes <= max_bytes
            assert np.unique(plan.indices).size == plan.indices.size
            patches = decode_patches(plan.payload, encoding, plan.indices.size)
            if encoding != 'jpeg':
                np.testing.assert_array_equal(patches, extract_patches(crop, plan.indices))
            if method == 'attention_threshold':
                assert plan.truncated_by_method == 196 - b  # delta=0 wants every patch


def test_byte_budget_drops_least_important_patches_first(frames):
    crop, edge = frames[0]
    cfg = SelectionConfig(method='sage', encoding='raw')
    full = plan_offload(crop, edge, Budget(64), cfg)
    cut = plan_offload(crop, edge, Budget(64, 768 * 10 + 5), cfg)
    assert cut.indices.tolist() == full.indices[:10].tolist()
    assert cut.dropped_for_bytes == 54 and cut.num_bytes == 7680


def test_cloud_classifies_the_offloaded_patches(frames, base):
    crop, edge = frames[1]
    plan = plan_offload(crop, edge, Budget(64), SelectionConfig(method='sage', encoding='png'))
    probs = classify_patches(base, plan.payload, plan.encoding, plan.indices)
    assert probs.shape == (1000,) and probs.sum() == pytest.approx(1.0, abs=1e-4)
    # Lossless codec: the cloud sees exactly what it would see cutting the patches itself.
    direct = classify_patches(base, extract_patches(crop, plan.indices).tobytes(), 'raw', plan.indices)
    np.testing.assert_allclose(probs, direct, atol=1e-6)


def test_budget_must_be_positive():
    with pytest.raises(BudgetError):
        Budget(0)
    with pytest.raises(BudgetError):
        Budget(4, -1)
    assert Budget(4, 100).admits(4, 100) and not Budget(4, 100).admits(5, 10)
    assert not Budget(4, 100).admits(1, 101) and Budget(4).admits(4, 10**9)
