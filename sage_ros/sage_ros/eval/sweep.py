# SPDX-License-Identifier: Apache-2.0
"""``sage-ros eval``: sweep selection methods x budgets x eta (x codecs) over a bag.

The edge pass is computed once per frame and cached; server answers are cached per
(setting, frame). A rerun, or a run after an interruption, computes only what is missing.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import cv2
import numpy as np
import torch
from tqdm import tqdm

from sage_ros.core import (
    Budget,
    EdgeOutput,
    SelectionConfig,
    VitModel,
    coverage,
    decode_patches,
    extract_patches,
    gate_score,
    load_vit,
    normalize,
    server_forward_subset,
)
from sage_ros.core.pipeline import EdgePipeline
from sage_ros.eval.bags import BagFrame, bag_fingerprint, count_frames, read_image_bag
from sage_ros.eval.cache import EdgeRecord, EvalCache, ServerRecord, context_key
from sage_ros.eval.frame_jpeg import encode_frame_within

# Reference settings beside the methods: every patch raw (the server's ceiling), and the whole
# 224x224 frame as one JPEG (what a budget-free uplink would send).
CEILING = 'all_patches'
FRAME_JPEG = 'frame_jpeg'
# The whole frame as a JPEG of at most the bytes of that frame's SAGE request at the same B.
EQUAL_BYTES = 'frame_equal_bytes'
_SERVER_BATCH = 32


@dataclass(frozen=True)
class Setting:
    """One point of the sweep: how patches are chosen and sent."""

    method: str
    budget: int
    codec: str = 'jpeg'
    quality: int = 90
    prefilter_ratio: float = 2.0

    @property
    def key(self) -> str:
        q = self.quality if self.codec == 'jpeg' else 0
        return f'{self.method}|B{self.budget}|{self.codec}{q}|k{self.prefilter_ratio:g}'

    @property
    def is_reference(self) -> bool:
        return self.method in (CEILING, FRAME_JPEG)


@dataclass
class SweepConfig:
    """What to sweep and with which models (defaults: the sage_edge/sage_cloud YAML)."""

    methods: Sequence[str]
    budgets: Sequence[int]
    etas: Sequence[float]
    codecs: Sequence[str] = ('jpeg',)
    quality: int = 90
    prefilter_ratios: Sequence[float] = (2.0,)
    gate_metric: str = 'min_entropy'
    edge_model: str = 'deit_tiny_patch16_224'
    server_model: str = 'deit_base_patch16_224'
    edge_weights: str = 'random'
    server_weights: str = 'random'
    crop_pct: float = 0.0
    embedding_source: str = 'final'
    seed: int = 0
    method_params: dict[str, dict[str, float]] = field(default_factory=dict)
    limit: int = 0
    batch: int = 16

    def settings(self) -> list[Setting]:
        out = [Setting(m, b, c, self.quality) for m in self.methods for b in self.budgets for c in self.codecs]
        for k in self.prefilter_ratios:
            out += [Setting('sage', b, self.codecs[0], self.quality, k) for b in self.budgets]
        out += [Setting(EQUAL_BYTES, b, self.codecs[0], self.quality) for b in self.budgets]
        out += [Setting(CEILING, 196, 'raw', 0), Setting(FRAME_JPEG, 196, 'jpeg', 75)]
        return list(dict.fromkeys(out))


@dataclass
class SweepData:
    """Everything the report needs, read back from the cache."""

    config: SweepConfig
    settings: list[Setting]
    edge: list[EdgeRecord]
    server: dict[str, dict[int, ServerRecord]]
    edge_weights: str
    server_weights: str
    bag: Path
    seconds: dict[str, float]


def _frames(bag: Path, limit: int, wanted: set[int] | None = None) -> Iterable[BagFrame]:
    for frame in read_image_bag(bag, limit=limit):
        if wanted is None or frame.index in wanted:
            yield frame


def _edge_pass(cache: EvalCache, ctx: str, bag: Path, cfg: SweepConfig, tiny: VitModel, total: int,
               progress: bool) -> None:
    done = cache.edge_indices(ctx)
    todo = total - len(done)
    if todo <= 0:
        return
    batch: list[tuple[BagFrame, np.ndarray]] = []
    pipeline = EdgePipeline(tiny)

    def flush() -> None:
        outs = pipeline.forward(np.stack([c for _, c in batch]), cfg.embedding_source)
        recs = []
        for (frame, _), out in zip(batch, outs):
            top = int(np.argmax(out.probs))
            recs.append(EdgeRecord(frame.index, frame.stamp_ns, frame.label, top, float(out.probs[top]),
                                   gate_score(out.probs, 'min_entropy'), gate_score(out.probs, 'entropy'),
                                   gate_score(out.probs, 'margin'), out.attention, out.embeddings))
        cache.put_edge(ctx, recs)
        batch.clear()

    with tqdm(total=todo, desc='edge pass', unit='frame', disable=not progress) as bar:
        for frame in _frames(bag, cfg.limit):
            if frame.index in done:
                continue
            batch.append((frame, pipeline.crop(frame.rgb, cfg.crop_pct)[0]))
            if len(batch) >= cfg.batch:
                bar.update(len(batch))
                flush()
        if batch:
            bar.update(len(batch))
            flush()


def _jobs_for_frame(setting: Setting, crop: np.ndarray, rec: EdgeRecord,
                    cfg: SweepConfig) -> tuple[np.ndarray, np.ndarray, int, int]:
    """(indices, decoded patches, payload bytes, truncated) the server receives for a setting."""
    if setting.method == CEILING:
        idx = np.arange(196)
        return idx, extract_patches(crop, idx), 196 * 768, 0
    if setting.method == EQUAL_BYTES:
        sage = _jobs_for_frame(Setting('sage', setting.budget, setting.codec, setting.quality), crop, rec, cfg)
        frame = encode_frame_within(crop, sage[2])
        idx = np.arange(196)
        if frame is None:  # not even the smallest JPEG fits: nothing is sent
            return np.empty(0, np.int64), np.empty((0, 16, 16, 3), np.uint8), 0, 0
        return idx, extract_patches(frame.decoded, idx), frame.num_bytes, 0
    if setting.method == FRAME_JPEG:
        ok, buf = cv2.imencode('.jpg', crop[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, setting.quality])
        frame = cv2.imdecode(buf, cv2.IMREAD_COLOR)[:, :, ::-1]
        idx = np.arange(196)
        return idx, extract_patches(np.ascontiguousarray(frame), idx), len(buf), 0
    sel = SelectionConfig(method=setting.method, prefilter_ratio=setting.prefilter_ratio, seed=cfg.seed,
                          encoding=setting.codec, quality=setting.quality,
                          method_params=cfg.method_params.get(setting.method, {}))
    # Selection reads only the attention and embeddings of the cached edge pass.
    edge = EdgeOutput(logits=np.empty(0), probs=np.empty(0), attention=rec.attention, embeddings=rec.embeddings)
    plan = EdgePipeline.plan_crop(crop, edge, Budget(setting.budget), sel)
    patches = decode_patches(plan.payload, plan.encoding, int(plan.indices.size))
    return plan.indices, patches, plan.num_bytes, plan.truncated_by_method


def _server_pass(cache: EvalCache, ctx: str, bag: Path, cfg: SweepConfig, settings: list[Setting],
                 base: VitModel, tiny: VitModel, records: dict[int, EdgeRecord], offloaded: set[int],
                 progress: bool) -> None:
    missing = {s.key: offloaded - cache.server_done(ctx, s.key) for s in settings}
    frames_needed = set().union(*missing.values()) if missing else set()
    if not frames_needed:
        return
    pending: list[tuple[Setting, int, np.ndarray, np.ndarray, int, int]] = []

    def flush() -> None:
        by_count: dict[int, list] = {}
        for job in pending:
            by_count.setdefault(int(job[2].size), []).append(job)
        for count, jobs in by_count.items():
            for start in range(0, len(jobs), _SERVER_BATCH):
                chunk = jobs[start:start + _SERVER_BATCH]
                if count == 0:
                    probs = np.zeros((len(chunk), base.num_classes), np.float32)
                else:
                    x = normalize(np.concatenate([j[3] for j in chunk]), base.mean, base.std)
                    x = x.reshape(len(chunk), count, *x.shape[1:])
                    idx = torch.from_numpy(np.stack([j[2] for j in chunk]).astype(np.int64))
                    probs = torch.softmax(server_forward_subset(base, x, idx).float(), -1).numpy()
                for (setting, fidx, ind, _, nbytes, trunc), p in zip(chunk, probs):
                    top = int(np.argmax(p))
                    cache.put_server(ctx, setting.key, [ServerRecord(fidx, top, float(p[top]), int(ind.size),
                                                                     nbytes, coverage(ind), trunc)])
        cache.commit()
        pending.clear()

    pipeline = EdgePipeline(tiny)
    with tqdm(total=len(frames_needed), desc='server pass', unit='frame', disable=not progress) as bar:
        for frame in _frames(bag, cfg.limit, frames_needed):
            crop = pipeline.crop(frame.rgb, cfg.crop_pct)[0]
            for s in settings:
                if frame.index in missing[s.key]:
                    ind, patches, nbytes, trunc = _jobs_for_frame(s, crop, records[frame.index], cfg)
                    pending.append((s, frame.index, ind, patches, nbytes, trunc))
            bar.update(1)
            if len(pending) >= _SERVER_BATCH:
                flush()
        if pending:
            flush()


def run_sweep(bag: Path, cfg: SweepConfig, *, cache_path: Path, progress: bool = True,
              emit: Callable[[str], None] = print) -> SweepData:
    """Compute (or read from the cache) every setting's answers on the bag's frames."""
    t0 = time.perf_counter()
    fingerprint = bag_fingerprint(bag)
    total = count_frames(bag)
    if cfg.limit:
        total = min(total, cfg.limit)
    tiny = load_vit(cfg.edge_model, cfg.edge_weights)
    base = load_vit(cfg.server_model, cfg.server_weights)
    edge_ctx = context_key(bag=fingerprint, model=tiny.name, weights=tiny.weights, crop=cfg.crop_pct,
                           emb=cfg.embedding_source)
    server_ctx = context_key(edge=edge_ctx, model=base.name, weights=base.weights, seed=cfg.seed,
                             params=cfg.method_params)
    settings = cfg.settings()
    seconds = {}
    with EvalCache(cache_path) as cache:
        _edge_pass(cache, edge_ctx, bag, cfg, tiny, total, progress)
        seconds['edge'] = time.perf_counter() - t0
        records = {r.idx: r for r in cache.edge(edge_ctx) if r.idx < total or not cfg.limit}
        eta_min = min(cfg.etas)
        offloaded = {i for i, r in records.items() if record_score(r, cfg.gate_metric) >= eta_min}
        emit(f'{len(records)} frames, {len(offloaded)} offloaded at eta={eta_min:g}; {len(settings)} settings')
        _server_pass(cache, server_ctx, bag, cfg, settings, base, tiny, records, offloaded, progress)
        seconds['total'] = time.perf_counter() - t0
        server = {s.key: cache.server(server_ctx, s.key) for s in settings}
        edge = [records[i] for i in sorted(records)]
    return SweepData(cfg, settings, edge, server, tiny.weights, base.weights, bag, seconds)


def record_score(rec: EdgeRecord, metric: str) -> float:
    """The gate metric of a cached edge record."""
    return {'min_entropy': rec.min_entropy, 'entropy': rec.entropy, 'margin': rec.margin}[metric]


def attention_entropy(attention: np.ndarray) -> float:
    """Shannon entropy (bits) of the attention map normalised to sum to one."""
    a = np.asarray(attention, np.float64)
    a = a / max(a.sum(), 1e-12)
    nz = a[a > 0]
    return float(-(nz * np.log2(nz)).sum())


def rows(data: SweepData) -> list[dict[str, Any]]:
    """One row per (setting, eta): the paper's measures, plus reference rows."""
    out = []
    edge = data.edge
    n = len(edge)
    truth = np.array([-1 if r.truth is None else r.truth for r in edge])
    labelled = truth >= 0
    edge_correct = np.array([r.label for r in edge]) == truth
    scores = np.array([record_score(r, data.config.gate_metric) for r in edge])
    att_h = np.array([attention_entropy(r.attention) for r in edge])
    common = {'edge_weights': data.edge_weights, 'server_weights': data.server_weights, 'frames': n}
    for eta in data.config.etas:
        off = scores >= eta
        # Median split of the offloaded frames by attention entropy (the paper's analysis).
        med = float(np.median(att_h[off])) if off.any() else 0.0
        for s in data.settings:
            recs = data.server[s.key]
            idx = [i for i, r in enumerate(edge) if off[i] and r.idx in recs]
            srv = [recs[edge[i].idx] for i in idx]
            correct = np.array([r.label == truth[i] for i, r in zip(idx, srv)], bool)
            lab = labelled[idx] if idx else np.zeros(0, bool)
            overall = edge_correct.copy()
            overall[idx] = correct
            hi = att_h[idx] > med if idx else np.zeros(0, bool)
            patches = np.array([r.patches for r in srv]) if srv else np.zeros(0)
            nbytes = np.array([r.bytes for r in srv]) if srv else np.zeros(0)
            out.append({
                **common, 'method': s.method, 'budget': s.budget, 'codec': s.codec,
                'quality': s.quality if s.codec == 'jpeg' else 0, 'prefilter_ratio': s.prefilter_ratio,
                'eta': eta, 'offloaded': int(off.sum()), 'answered': len(srv),
                'offload_rate': float(off.mean()) if n else 0.0,
                'offloaded_accuracy': _mean(correct[lab]),
                'overall_accuracy': _mean(overall[labelled]),
                'edge_accuracy': _mean(edge_correct[labelled]),
                'acc_low_attention_entropy': _mean(correct[lab & ~hi]),
                'acc_high_attention_entropy': _mean(correct[lab & hi]),
                'mean_patches': float(patches.mean()) if srv else 0.0,
                'max_patches': int(patches.max()) if srv else 0,
                'mean_bytes': float(nbytes.mean()) if srv else 0.0,
                'max_bytes': int(nbytes.max()) if srv else 0,
                'coverage_7x7': float(np.mean([r.coverage for r in srv])) if srv else 0.0,
                # The equal-bytes frame sends every patch of a smaller JPEG: its bound is bytes.
                'budget_violations': int((patches > s.budget).sum()) if srv and s.method != EQUAL_BYTES else 0,
                'truncated': int(sum(r.truncated for r in srv)),
            })
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan
