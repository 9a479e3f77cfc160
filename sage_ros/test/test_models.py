# SPDX-License-Identifier: Apache-2.0
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sage_ros.core import WeightsError, edge_forward, load_vit, normalize, resize_crop, server_forward_subset
from sage_ros.core.models import ModelCard, load_edge_model


@pytest.fixture(scope='module')
def batch(real_images, tiny):
    crops = [resize_crop(rgb, crop_pct=tiny.crop_pct)[0] for rgb in real_images[:4]]
    return torch.from_numpy(normalize(np.stack(crops), tiny.mean, tiny.std))


def to_patches(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, 224, 224) -> (B, 196, 3, 16, 16) in row-major grid order."""
    b = x.shape[0]
    return x.unfold(2, 16, 16).unfold(3, 16, 16).permute(0, 2, 3, 1, 4, 5).reshape(b, 196, 3, 16, 16)


def reference_attention(vit, x):
    """Last-layer attention through timm's own non-fused path, captured at its dropout."""
    attn = vit.model.blocks[-1].attn
    seen = {}
    handle = attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault('w', o))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.inference_mode():
            logits = vit.model(x)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return logits, seen['w']


def test_edge_forward_matches_timm(tiny, batch):
    outs = edge_forward(tiny, batch)
    logits, weights = reference_attention(tiny, batch)
    for i, out in enumerate(outs):
        np.testing.assert_allclose(out.logits, logits[i].numpy(), atol=1e-4, rtol=0)
        np.testing.assert_allclose(out.probs.sum(), 1.0, atol=1e-5)
        cls_row = weights[i, :, 0].mean(0).numpy()
        np.testing.assert_allclose(out.attention, cls_row[1:], atol=1e-6)
        # The CLS row's patch mass: everything but CLS-to-CLS.
        assert out.attention.sum() == pytest.approx(1.0 - cls_row[0], abs=1e-5)
        assert out.attention.shape == (196,) and out.embeddings.shape == (196, 192)


def test_edge_forward_takes_numpy_or_torch_and_the_card_describes_the_model(tiny, batch):
    from_numpy = edge_forward(tiny, batch[:2].numpy())
    via_model = tiny.edge_outputs(batch[:2].numpy(), 'input')
    from_torch = edge_forward(tiny, batch[:2])
    for a, b, c in zip(from_numpy, from_torch, edge_forward(tiny, batch[:2], embedding_source='input')):
        np.testing.assert_array_equal(a.probs, b.probs)
        np.testing.assert_array_equal(a.embeddings, b.embeddings)
    np.testing.assert_array_equal(via_model[1].embeddings, c.embeddings)
    card = tiny.card
    assert (card.name, card.weights, card.random_weights, card.embed_dim) == (tiny.name, 'random:0', True, 192)
    assert (card.mean, card.std, card.crop_pct, card.grid) == (tiny.mean, tiny.std, tiny.crop_pct, tiny.grid)
    assert ModelCard.from_json(card.to_json()) == card
    with pytest.raises(WeightsError, match='not a sage_ros model card'):
        ModelCard.from_json('{"name": "x"}', source='f.onnx')


def test_torch_models_are_named_by_the_runtime_free_module(tiny):
    import sage_ros.core.models as models
    import sage_ros.core.torch_models as torch_models

    assert models.load_vit is torch_models.load_vit and models.VitModel is torch_models.VitModel
    with pytest.raises(AttributeError):
        models.no_such_thing  # noqa: B018
    vit = load_edge_model('deit_tiny_patch16_224', 'random:0')
    assert isinstance(vit, torch_models.VitModel) and vit.runtime == 'torch'
    assert torch.equal(vit.model.head.weight, tiny.model.head.weight)


def test_embedding_sources(tiny, batch):
    final = edge_forward(tiny, batch[:1])[0].embeddings
    inp = edge_forward(tiny, batch[:1], embedding_source='input')[0].embeddings
    with torch.inference_mode():
        want = tiny.model.patch_embed(batch[:1])[0].numpy()
        feats = tiny.model.forward_features(batch[:1])[0, 1:].numpy()
    np.testing.assert_allclose(inp, want, atol=1e-5)
    np.testing.assert_allclose(final, feats, atol=1e-4)
    with pytest.raises(ValueError):
        edge_forward(tiny, batch[:1], embedding_source='middle')


def test_server_subset_with_all_patches_equals_full_forward(base, batch):
    with torch.inference_mode():
        full = base.model(batch)
    subset = server_forward_subset(base, to_patches(batch), torch.arange(196).expand(batch.shape[0], 196))
    torch.testing.assert_close(subset, full, atol=1e-4, rtol=1e-4)
    # Token order does not matter: each patch carries its own position embedding.
    perm = torch.randperm(196, generator=torch.Generator().manual_seed(0))
    shuffled = server_forward_subset(base, to_patches(batch)[:1, perm], perm[None])
    torch.testing.assert_close(shuffled, full[:1], atol=1e-4, rtol=1e-4)


def test_server_subset_equals_masked_full_forward(base, batch):
    """Dropping tokens is the same as the full model with the other keys masked out."""
    idx = torch.tensor(sorted(np.random.default_rng(3).choice(196, 48, replace=False).tolist()))
    keep = torch.zeros(197, dtype=torch.bool)
    keep[0] = True
    keep[idx + 1] = True
    mask = torch.zeros(1, 1, 197, 197)
    mask[..., ~keep] = float('-inf')
    with torch.inference_mode():
        feats = base.model.forward_features(batch[:2], attn_mask=mask)
        want = base.model.forward_head(feats)
    got = server_forward_subset(base, to_patches(batch)[:2, idx], idx.expand(2, -1))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match='out of range'):
        server_forward_subset(base, to_patches(batch)[0, :2], torch.tensor([0, 196]))


def test_random_weights_are_seeded_and_say_so(tiny):
    again = load_vit('deit_tiny_patch16_224', 'random:0')
    other = load_vit('deit_tiny_patch16_224', 'random:1')
    w = tiny.model.head.weight
    assert torch.equal(w, again.model.head.weight) and not torch.equal(w, other.model.head.weight)
    assert tiny.random_weights and tiny.weights == 'random:0'


@pytest.mark.parametrize('fmt', ['pth', 'fb_pth', 'safetensors'])
def test_checkpoint_files_load_exactly(tiny, tmp_path, fmt):
    sd = {k: v.clone() for k, v in load_vit('deit_tiny_patch16_224', 'random:7').model.state_dict().items()}
    path = tmp_path / f'ckpt.{"safetensors" if fmt == "safetensors" else "pth"}'
    if fmt == 'safetensors':
        save_file(sd, str(path))
    else:
        torch.save({'model': sd} if fmt == 'fb_pth' else sd, path)
    vit = load_vit('deit_tiny_patch16_224', str(path))
    assert not vit.random_weights and vit.weights == str(path)
    for k, v in vit.model.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_unloadable_weights_fail_with_instructions(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match='not found.*checkpoint file'):
        load_vit('deit_tiny_patch16_224', str(tmp_path / 'missing.pth'))
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(WeightsError, match='cannot load'):
        load_vit('deit_tiny_patch16_224', str(bad))
    wrong = tmp_path / 'wrong.pth'
    torch.save({'foo': torch.zeros(1)}, wrong)
    with pytest.raises(WeightsError, match='cannot load'):
        load_vit('deit_tiny_patch16_224', str(wrong))
    # No network here: offline mode makes the hub refuse at once instead of retrying.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    with pytest.raises(WeightsError, match='hub'):
        load_vit('deit_tiny_patch16_224', 'hub')
    with pytest.raises(WeightsError, match='no weights configured'):
        load_vit('deit_tiny_patch16_224', '')
    with pytest.raises(WeightsError, match='unknown timm model'):
        load_vit('no_such_model', 'random')


def test_the_shipped_class_names_are_timms():
    """The edge names classes from the package's table (no timm on a robot): the same as timm's."""
    from timm.data import ImageNetInfo

    from sage_ros.core.labels import class_name, class_names

    info = ImageNetInfo('imagenet-1k')
    assert class_names() == tuple(info.index_to_description(i).split(',')[0].strip() for i in range(1000))
    assert class_name(281) == 'tabby' and class_name(1000) == 'class_1000' and class_name(-1) == 'class_-1'
