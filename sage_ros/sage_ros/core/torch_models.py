# SPDX-License-Identifier: Apache-2.0
"""Vision transformers of the edge and the cloud on torch, built with timm.

The edge forward returns, from one pass, the softmax, the last layer's CLS-to-patch
attention averaged over heads (computed explicitly: timm's fused attention never
materialises the weights) and patch embeddings. The server forward runs the model on a
subset of patch tokens only, each with its own position embedding, plus the prefix tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import timm
import torch
from timm.data import resolve_data_config
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from sage_ros.core.errors import WeightsError
from sage_ros.core.models import WEIGHTS_HELP, EdgeOutput, ModelCard, check_embedding_source
from sage_ros.core.preprocess import CropMap


@dataclass
class VitModel:
    """A timm ViT in eval mode, with where its weights came from and its input config."""

    model: VisionTransformer
    name: str
    weights: str
    random_weights: bool
    data_config: dict[str, Any] = field(repr=False)
    runtime: str = field(default='torch', init=False)
    int8: bool = field(default=False, init=False)

    @property
    def mean(self) -> tuple[float, float, float]:
        return tuple(self.data_config['mean'])  # type: ignore[return-value]

    @property
    def std(self) -> tuple[float, float, float]:
        return tuple(self.data_config['std'])  # type: ignore[return-value]

    @property
    def input_size(self) -> int:
        return int(self.data_config['input_size'][-1])

    @property
    def crop_pct(self) -> float:
        return float(self.data_config['crop_pct'])

    @property
    def interpolation(self) -> str:
        return str(self.data_config['interpolation'])

    def crop(self, rgb: np.ndarray, crop_pct: float = 0.0) -> tuple[np.ndarray, CropMap]:
        """This model's eval resize and centre crop of an RGB frame; ``crop_pct`` 0 keeps the
        model's own ratio."""
        return self.card.crop(rgb, crop_pct)

    @property
    def patch_size(self) -> int:
        return int(self.model.patch_embed.patch_size[0])

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.model.patch_embed.grid_size)  # type: ignore[return-value]

    @property
    def num_patches(self) -> int:
        g = self.grid
        return g[0] * g[1]

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @cached_property
    def card(self) -> ModelCard:
        """What a runtime other than torch needs to run this model as the edge."""
        return ModelCard(name=self.name, weights=self.weights, random_weights=self.random_weights,
                         input_size=self.input_size, crop_pct=self.crop_pct, interpolation=self.interpolation,
                         mean=tuple(map(float, self.mean)), std=tuple(map(float, self.std)),  # type: ignore[arg-type]
                         patch_size=self.patch_size, grid=self.grid, num_classes=self.num_classes,
                         embed_dim=int(self.model.embed_dim))

    def edge_outputs(self, pixels: np.ndarray | torch.Tensor, embedding_source: str = 'final') -> list[EdgeOutput]:
        return edge_forward(self, pixels, embedding_source=embedding_source)  # type: ignore[arg-type]


def load_vit(name: str, weights: str, *, device: str = 'cpu', num_threads: int = 0) -> VitModel:
    """Build timm model ``name`` and load ``weights`` (see :data:`WEIGHTS_HELP`).

    Never falls back silently: weights that cannot be loaded raise :class:`WeightsError`.
    """
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    if name not in timm.list_models():
        raise WeightsError(f'unknown timm model {name!r}')
    weights = str(weights).strip()
    random_weights = weights == 'random' or weights.startswith('random:')
    try:
        if random_weights:
            seed = int(weights.split(':', 1)[1]) if ':' in weights else 0
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = timm.create_model(name, pretrained=False)
            source = f'random:{seed}'
        elif weights == 'hub' or weights.startswith('hf-hub:'):
            hub_name = weights if weights.startswith('hf-hub:') else name
            model = timm.create_model(hub_name, pretrained=True)
            source = weights if weights.startswith('hf-hub:') else f'hub:{name}'
        elif weights:
            path = Path(os.path.expanduser(weights))
            if not path.is_file():
                raise WeightsError(f'checkpoint file {str(path)!r} not found for {name}. {WEIGHTS_HELP}')
            model = timm.create_model(name, pretrained=False)
            timm.models.load_checkpoint(model, str(path), filter_fn=checkpoint_filter_fn)
            source = str(path)
        else:
            raise WeightsError(f'no weights configured for {name}. {WEIGHTS_HELP}')
    except WeightsError:
        raise
    except Exception as exc:  # timm/hub/torch raise many types; all mean "not loadable"
        raise WeightsError(f'cannot load weights {weights!r} for {name}: {exc}. {WEIGHTS_HELP}') from exc
    if not isinstance(model, VisionTransformer):
        raise WeightsError(f'{name} is not a timm VisionTransformer')
    model.eval().to(device)
    return VitModel(model, name, source, random_weights, resolve_data_config({}, model=model))


def _last_block_with_attention(block: torch.nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """timm ``Block.forward`` written out, returning the attention weights too (eval mode);
    ``attn_mask`` is added to the attention logits, as timm's ``Attention`` does."""
    attn_mod = block.attn
    h = block.norm1(x)
    b, n, _ = h.shape
    qkv = attn_mod.qkv(h).reshape(b, n, 3, attn_mod.num_heads, attn_mod.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn_mod.q_norm(q), attn_mod.k_norm(k)
    logits = (q * attn_mod.scale) @ k.transpose(-2, -1)
    if attn_mask is not None:
        logits = logits + attn_mask
    weights = logits.softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, attn_mod.attn_dim)
    out = attn_mod.norm(out)
    if getattr(attn_mod, 'gate', None) is not None:
        out = out * attn_mod.gate(h).sigmoid()
    out = attn_mod.proj(out)
    x = x + block.ls1(out)
    x = x + block.ls2(block.mlp(block.norm2(x)))
    return x, weights


class EdgeTensors(NamedTuple):
    """The edge pass of a batch, as tensors: also the outputs of the exported ONNX graph, in
    this order and under these names."""

    logits: torch.Tensor
    probs: torch.Tensor
    attention: torch.Tensor
    embeddings_final: torch.Tensor
    embeddings_input: torch.Tensor


def edge_tensors(m: VisionTransformer, x: torch.Tensor) -> EdgeTensors:
    """One pass of ``m`` over a normalised (B, 3, H, W) batch, both embedding sources at once
    (the input embeddings are computed on the way anyway)."""
    patch_tokens = m.patch_embed(x)
    h = m.norm_pre(m.patch_drop(m._pos_embed(patch_tokens)))
    for blk in m.blocks[:-1]:
        h = blk(h)
    h, weights = _last_block_with_attention(m.blocks[-1], h)
    h = m.norm(h)
    logits = m.forward_head(h).float()
    p = m.num_prefix_tokens
    return EdgeTensors(logits, torch.softmax(logits, dim=-1), weights[:, :, 0, p:].mean(dim=1).float(),
                       h[:, p:].float(), patch_tokens.float())


@torch.inference_mode()
def edge_forward(
    vit: VitModel, images: np.ndarray | torch.Tensor, *, embedding_source: str = 'final'
) -> list[EdgeOutput]:
    """One pass over a normalised (B, 3, H, W) batch (or one (3, H, W) image)."""
    check_embedding_source(embedding_source)
    m = vit.model
    x = torch.as_tensor(images)
    x = x.unsqueeze(0) if x.ndim == 3 else x
    out = edge_tensors(m, x.to(next(m.parameters()).device, torch.float32))
    emb = out.embeddings_final if embedding_source == 'final' else out.embeddings_input
    logits_np, probs_np, att_np, emb_np = (t.cpu().numpy() for t in (out.logits, out.probs, out.attention, emb))
    return [EdgeOutput(logits_np[i], probs_np[i], att_np[i], emb_np[i]) for i in range(logits_np.shape[0])]


@torch.inference_mode()
def server_forward_subset(vit: VitModel, patches: np.ndarray | torch.Tensor, indices: torch.Tensor,
                          valid: torch.Tensor | None = None, *, return_attention: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Logits of the model run on the given patches only.

    ``patches`` are normalised pixels, (M, 3, P, P) or (B, M, 3, P, P); ``indices`` their
    row-major grid positions, (M,) or (B, M). Each token gets its own position embedding;
    the prefix (CLS) tokens are added as in the full forward. With all N patches in grid
    order this equals the model's normal forward.

    ``valid`` (B, M) bool batches requests of different sizes: each is padded to M, and the
    padding is masked out of every attention as a key, so no real token ever sees it (the
    classifier reads the CLS token): each row's logits equal its own unpadded forward.

    ``return_attention`` also returns the last layer's CLS-to-token attention averaged over
    heads, (M,) or (B, M) in the order of ``indices`` (0 on padding): what the server looked at.
    """
    m = vit.model
    patches = torch.as_tensor(patches)
    single = patches.ndim == 4
    if single:
        patches, indices = patches.unsqueeze(0), indices.unsqueeze(0)
    b, n_sel = patches.shape[:2]
    device = next(m.parameters()).device
    patches = patches.to(device, torch.float32)
    idx = indices.to(device, torch.long)
    if n_sel and (int(idx.min()) < 0 or int(idx.max()) >= vit.num_patches):
        raise ValueError('patch index out of range')
    # The patch embedding is a stride-P convolution: embedding each patch alone is exact.
    tok = m.patch_embed.proj(patches.reshape(b * n_sel, *patches.shape[2:]))
    tok = m.patch_embed.norm(tok.flatten(1).reshape(b, n_sel, -1))
    p = m.num_prefix_tokens
    pos = m.pos_embed
    patch_pos = pos[:, p:] if not m.no_embed_class else pos
    tok = tok + patch_pos[0][idx]
    prefix = []
    if m.cls_token is not None:
        prefix.append(m.cls_token.expand(b, -1, -1))
    if m.reg_token is not None:
        prefix.append(m.reg_token.expand(b, -1, -1))
    if prefix:
        pre = torch.cat(prefix, dim=1)
        if not m.no_embed_class:
            pre = pre + pos[:, :p]
        tok = torch.cat([pre, tok], dim=1)
    x = m.norm_pre(tok)
    mask = None
    if valid is not None:
        keep = torch.cat([torch.ones(b, p, dtype=torch.bool, device=device), valid.to(device, torch.bool)], dim=1)
        mask = torch.zeros(b, 1, 1, keep.shape[1], device=device, dtype=x.dtype)
        mask.masked_fill_(~keep[:, None, None, :], float('-inf'))
    for blk in (m.blocks[:-1] if return_attention else m.blocks):
        x = blk(x) if mask is None else blk(x, attn_mask=mask)
    attention = None
    if return_attention:
        x, weights = _last_block_with_attention(m.blocks[-1], x, mask)
        attention = weights[:, :, 0, p:].mean(dim=1)
    x = m.norm(x)
    logits = m.forward_head(x)
    if not return_attention:
        return logits[0] if single else logits
    return (logits[0], attention[0]) if single else (logits, attention)
