# SPDX-License-Identifier: Apache-2.0
"""``sage-ros eval``: sweep selection methods x budgets x eta (x codecs) over a bag.

The edge pass is computed once per frame and cached; server answers are cached per
(setting, frame). A rerun, or a run after an interruption, computes only what is missing.

Two-round evidence (offline): SAGE's request at B is round one; when the server's min-entropy
on it is at least eta_cloud, the edge adds K patches (:func:`sage_ros.core.rounds.select_second_round`),
encoded as a request of their own, and the server classifies the union.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

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
from sage_ros.core.codec import ENCODINGS
from sage_ros.core.gate import min_entropy
from sage_ros.core.offload import classify_batch_attended, plan_second_round
from sage_ros.core.pipeline import EdgePipeline
from sage_ros.core.rounds import SECOND_ROUND_MODES as _ROUND_MODES
from sage_ros.core.rounds import cloud_roi
from sage_ros.core.selection import METHODS
from sage_ros.eval.bags import BagFrame, bag_fingerprint, count_frames, read_image_bag
from sage_ros.eval.cache import EdgeRecord, EvalCache, ServerRecord, context_key
from sage_ros.eval.frame_jpeg import encode_frame_within

# Reference settings beside the methods: every patch raw (the server's ceiling), and the whole
# 224x224 frame as one JPEG (what a budget-free uplink would send).
CEILING = 'all_patches'
FRAME_JPEG = 'frame_jpeg'
# The whole frame as a JPEG of at most the bytes of that frame's SAGE request at the same B.
EQUAL_BYTES = 'frame_equal_bytes'
# SAGE with a second round of evidence when the server is unsure (rows with second_round set).
TWO_ROUND = 'sage_two_round'
SECOND_ROUND_MODES = tuple(m for m in _ROUND_MODES if m != 'off')
# Regions of interest the server names for a roi second round: its most attended patches.
ROI_COUNT = 8
# Patches of the 224x224 input's 14x14 grid, which the sweep's models share: the largest budget.
GRID_PATCHES = 196
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


@dataclass(frozen=True)
class TwoRound:
    """A two-round point: SAGE at ``budget`` (round one); when the server's min-entropy on it is
    >= ``eta_cloud``, ``k`` more patches by ``mode`` (round two), both within ``budget_max``."""

    mode: str
    k: int
    eta_cloud: float
    budget: int
    codec: str = 'jpeg'
    quality: int = 90
    budget_max: int = 96
    roi_count: int = ROI_COUNT

    @property
    def round_one(self) -> Setting:
        """The one-round SAGE setting whose request is round one."""
        return Setting('sage', self.budget, self.codec, self.quality)

    @property
    def key(self) -> str:
        """Cache key of the union's answers: they do not depend on ``eta_cloud``, which only
        decides, at report time, which frames take them."""
        roi = f'|roi{self.roi_count}' if self.mode == 'roi' else ''
        return f'{TWO_ROUND}:{self.mode}|K{self.k}|max{self.budget_max}{roi}|{self.round_one.key}'

    def extra(self, sent: int) -> int:
        """Patches round two may add to ``sent`` round-one patches."""
        return max(0, min(self.k, self.budget_max - sent))


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
    second_rounds: Sequence[str] = ()
    """Two-round modes (``continue``, ``roi``); none: no two-round settings."""
    second_ks: Sequence[int] = (16, 32)
    eta_clouds: Sequence[float] = (3.0,)
    """The server's min-entropy thresholds (bits) for asking for a second round."""
    budget_max: int = 96
    """Round one plus round two stay within this many patches (sage_edge budget_max)."""
    roi_count: int = ROI_COUNT

    def __post_init__(self) -> None:
        self._check_axes()
        unknown = [m for m in self.second_rounds if m not in SECOND_ROUND_MODES]
        if unknown:
            raise ValueError(f'unknown second-round modes {unknown}; choose from {", ".join(SECOND_ROUND_MODES)}')
        if self.second_rounds and (not self.second_ks or not self.eta_clouds):
            raise ValueError('two-round evidence needs at least one K and one eta_cloud')
        if any(k < 0 for k in self.second_ks):
            raise ValueError(f'second-round K must be >= 0, got {list(self.second_ks)}')

    def _check_axes(self) -> None:
        """Every axis of the sweep, before anything runs: a bad value found after the edge pass
        would cost its time."""
        for name, values in (('methods', self.methods), ('budgets', self.budgets), ('etas', self.etas),
                             ('codecs', self.codecs), ('prefilter ratios', self.prefilter_ratios)):
            if not values:
                raise ValueError(f'no {name} to sweep: give at least one')
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f'unknown methods {unknown}; choose from {", ".join(METHODS)}')
        bad = [b for b in self.budgets if not 1 <= b <= GRID_PATCHES]
        if bad:
            raise ValueError(f'budgets must be 1 to {GRID_PATCHES} patches (the 14x14 grid), got {bad}')
        unknown = sorted(set(self.codecs) - set(ENCODINGS))
        if unknown:
            raise ValueError(f'unknown codecs {unknown}; choose from {", ".join(ENCODINGS)}')
        if not 1 <= self.quality <= 100:
            raise ValueError(f'JPEG quality must be 1 to 100, got {self.quality}')
        bad = [k for k in self.prefilter_ratios if not k >= 1.0]
        if bad:
            raise ValueError(f'prefilter ratios must be >= 1, got {bad}')
        if self.limit < 0:
            raise ValueError(f'limit must be >= 0 (0: every frame), got {self.limit}')

    def settings(self) -> list[Setting]:
        out = [Setting(m, b, c, self.quality) for m in self.methods for b in self.budgets for c in self.codecs]
        for k in self.prefilter_ratios:
            out += [Setting('sage', b, self.codecs[0], self.quality, k) for b in self.budgets]
        out += [Setting(EQUAL_BYTES, b, self.codecs[0], self.quality) for b in self.budgets]
        out += [t.round_one for t in self.two_round_settings()]
        out += [Setting(CEILING, 196, 'raw', 0), Setting(FRAME_JPEG, 196, 'jpeg', 75)]
        return list(dict.fromkeys(out))

    def two_round_settings(self) -> list[TwoRound]:
        """Every (mode, K, eta_cloud, B) point, on the first codec."""
        return [TwoRound(m, int(k), float(e), b, self.codecs[0], self.quality, self.budget_max, self.roi_count)
                for m in self.second_rounds for k in self.second_ks for e in self.eta_clouds for b in self.budgets]


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
    two_round: list[TwoRound] = field(default_factory=list)
    rounds: dict[str, dict[int, ServerRecord]] = field(default_factory=dict)
    """Union answers by :attr:`TwoRound.key` and frame (frames the server may ask for more)."""
    round_two: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    """Round-two patch indices, as ``rounds``."""


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


def _edge_output(rec: EdgeRecord) -> EdgeOutput:
    """What selection reads of the cached edge pass: its attention and embeddings."""
    return EdgeOutput(logits=np.empty(0), probs=np.empty(0), attention=rec.attention, embeddings=rec.embeddings)


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
    plan = EdgePipeline.plan_crop(crop, _edge_output(rec), Budget(setting.budget), sel)
    patches = decode_patches(plan.payload, plan.encoding, int(plan.indices.size))
    return plan.indices, patches, plan.num_bytes, plan.truncated_by_method


def _server_probs(base: VitModel, jobs: Sequence[tuple[np.ndarray, np.ndarray]]
                  ) -> Iterator[tuple[int, np.ndarray]]:
    """(position, the server's softmax) of each (indices, decoded patches) job, as each forward
    ends (so an interruption keeps what was done); jobs of one size share forwards."""
    by_count: dict[int, list[int]] = {}
    for pos, (ind, _) in enumerate(jobs):
        by_count.setdefault(int(ind.size), []).append(pos)
    for count, positions in by_count.items():
        for start in range(0, len(positions), _SERVER_BATCH):
            chunk = positions[start:start + _SERVER_BATCH]
            if count == 0:
                probs = np.zeros((len(chunk), base.num_classes), np.float32)
            else:
                x = normalize(np.concatenate([jobs[j][1] for j in chunk]), base.mean, base.std)
                x = x.reshape(len(chunk), count, *x.shape[1:])
                idx = torch.from_numpy(np.stack([jobs[j][0] for j in chunk]).astype(np.int64))
                probs = torch.softmax(server_forward_subset(base, x, idx).float(), -1).numpy()
            yield from zip(chunk, probs)


def _answer(fidx: int, probs: np.ndarray, indices: np.ndarray, nbytes: int, truncated: int = 0) -> ServerRecord:
    top = int(np.argmax(probs))
    return ServerRecord(fidx, top, float(probs[top]), int(indices.size), nbytes, coverage(indices), truncated)


def _server_pass(cache: EvalCache, ctx: str, bag: Path, cfg: SweepConfig, settings: list[Setting],
                 base: VitModel, tiny: VitModel, records: dict[int, EdgeRecord], offloaded: set[int],
                 progress: bool) -> None:
    missing = {s.key: offloaded - cache.server_done(ctx, s.key) for s in settings}
    frames_needed = set().union(*missing.values()) if missing else set()
    if not frames_needed:
        return
    pending: list[tuple[Setting, int, np.ndarray, np.ndarray, int, int]] = []

    def flush() -> None:
        for pos, p in _server_probs(base, [(j[2], j[3]) for j in pending]):
            setting, fidx, ind, _, nbytes, trunc = pending[pos]
            cache.put_server(ctx, setting.key, [_answer(fidx, p, ind, nbytes, trunc)])
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


def cloud_uncertainty(rec: ServerRecord) -> float:
    """The server's min-entropy (bits) on a request: it reads only the top probability."""
    return min_entropy([rec.confidence])


def _two_round_pass(cache: EvalCache, ctx: str, bag: Path, cfg: SweepConfig, base: VitModel, tiny: VitModel,
                    records: dict[int, EdgeRecord], offloaded: set[int], progress: bool) -> None:
    """Union answers for every offloaded frame on which the server, given round one (the cached
    SAGE answer at B), is unsure at the smallest eta_cloud and round two has room to add patches."""
    points = list({t.key: t for t in cfg.two_round_settings()}.values())  # one per union: eta_cloud apart
    if not points:
        return
    eta = min(cfg.eta_clouds)
    first = {t.round_one.key: cache.server(ctx, t.round_one.key) for t in points}
    missing: dict[str, set[int]] = {}
    for t in points:
        r1 = first[t.round_one.key]
        asks = {i for i in offloaded if i in r1 and t.extra(r1[i].patches) > 0 and cloud_uncertainty(r1[i]) >= eta}
        missing[t.key] = asks - cache.server_done(ctx, t.key)
    frames_needed = set().union(*missing.values())
    if not frames_needed:
        return
    chunk: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        # Round one of each (frame, B) a union needs, as the server received it.
        sent: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for fidx, crop in chunk:
            for t in points:
                if fidx in missing[t.key] and (fidx, t.budget) not in sent:
                    sent[fidx, t.budget] = _jobs_for_frame(t.round_one, crop, records[fidx], cfg)[:2]
        # roi: the server names the patches it attended most on round one.
        wanted = sorted({(f, t.budget) for f, _ in chunk for t in points if t.mode == 'roi' and f in missing[t.key]})
        attention: dict[tuple[int, int], np.ndarray] = {}
        for start in range(0, len(wanted), _SERVER_BATCH):
            part = wanted[start:start + _SERVER_BATCH]
            attention.update(zip(part, classify_batch_attended(base, [(sent[w][1], sent[w][0]) for w in part])[1]))
        unions = []
        for fidx, crop in chunk:
            rec = records[fidx]
            for t in (t for t in points if fidx in missing[t.key]):
                ind, patches = sent[fidx, t.budget]
                roi = cloud_roi(attention[fidx, t.budget], ind, t.roi_count) if t.mode == 'roi' else ()
                # Round two travels as a request of its own (the edge's plan): encoded alone,
                # decoded by the server.
                plan = plan_second_round(crop, _edge_output(rec), ind, t.mode, Budget(t.extra(int(ind.size))),
                                         SelectionConfig(prefilter_ratio=t.round_one.prefilter_ratio,
                                                         encoding=t.codec, quality=t.quality), roi=roi)
                new = plan.indices
                r1 = first[t.round_one.key][fidx]
                if not new.size:  # nothing left to add: round one's answer stands
                    cache.put_round_two(ctx, t.key, fidx, new)
                    cache.put_server(ctx, t.key, [r1])
                    continue
                decoded = decode_patches(plan.payload, t.codec, int(new.size))
                unions.append((t, fidx, np.concatenate([ind, new]), np.concatenate([patches, decoded]),
                               r1.bytes + plan.num_bytes, new))
        for pos, p in _server_probs(base, [(u[2], u[3]) for u in unions]):
            t, fidx, ind, _, nbytes, new = unions[pos]
            cache.put_round_two(ctx, t.key, fidx, new)  # first: a frame is done once its answer is in
            cache.put_server(ctx, t.key, [_answer(fidx, p, ind, nbytes)])
        cache.commit()
        chunk.clear()

    pipeline = EdgePipeline(tiny)
    with tqdm(total=len(frames_needed), desc='two-round pass', unit='frame', disable=not progress) as bar:
        for frame in _frames(bag, cfg.limit, frames_needed):
            chunk.append((frame.index, pipeline.crop(frame.rgb, cfg.crop_pct)[0]))
            bar.update(1)
            if len(chunk) >= cfg.batch:
                flush()
        if chunk:
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
        two_round = cfg.two_round_settings()
        extra = f', {len(two_round)} two-round' if two_round else ''
        emit(f'{len(records)} frames, {len(offloaded)} offloaded at eta={eta_min:g}; {len(settings)} settings{extra}')
        _server_pass(cache, server_ctx, bag, cfg, settings, base, tiny, records, offloaded, progress)
        _two_round_pass(cache, server_ctx, bag, cfg, base, tiny, records, offloaded, progress)
        seconds['total'] = time.perf_counter() - t0
        server = {s.key: cache.server(server_ctx, s.key) for s in settings}
        rounds = {t.key: cache.server(server_ctx, t.key) for t in two_round}
        round_two = {t.key: cache.round_two(server_ctx, t.key) for t in two_round}
        edge = [records[i] for i in sorted(records)]
    return SweepData(cfg, settings, edge, server, tiny.weights, base.weights, bag, seconds, two_round, rounds,
                     round_two)


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
    """One row per (setting, eta): the paper's measures, plus reference rows; then one per
    (two-round setting, eta), with ``second_round`` set."""
    out = []
    edge = data.edge
    n = len(edge)
    truth = np.array([-1 if r.truth is None else r.truth for r in edge])
    labelled = truth >= 0
    edge_correct = np.array([r.label for r in edge]) == truth
    scores = np.array([record_score(r, data.config.gate_metric) for r in edge])
    att_h = np.array([attention_entropy(r.attention) for r in edge])
    common = {'edge_weights': data.edge_weights, 'server_weights': data.server_weights, 'frames': n}

    def fields(s: Setting) -> dict[str, Any]:
        return {'method': s.method, 'budget': s.budget, 'codec': s.codec,
                'quality': s.quality if s.codec == 'jpeg' else 0, 'prefilter_ratio': s.prefilter_ratio}

    def measures(off: np.ndarray, med: float, idx: list[int], srv: list[ServerRecord]) -> dict[str, Any]:
        """Accuracy, size and coverage of the answers ``srv`` to the offloaded frames ``idx``."""
        correct = np.array([r.label == truth[i] for i, r in zip(idx, srv)], bool)
        lab = labelled[idx] if idx else np.zeros(0, bool)
        overall = edge_correct.copy()
        overall[idx] = correct
        hi = att_h[idx] > med if idx else np.zeros(0, bool)
        patches = np.array([r.patches for r in srv]) if srv else np.zeros(0)
        nbytes = np.array([r.bytes for r in srv]) if srv else np.zeros(0)
        return {
            'offloaded': int(off.sum()), 'answered': len(srv),
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
            'truncated': int(sum(r.truncated for r in srv)),
        }

    for eta in data.config.etas:
        off = scores >= eta
        # Median split of the offloaded frames by attention entropy (the paper's analysis).
        med = float(np.median(att_h[off])) if off.any() else 0.0
        for s in data.settings:
            recs = data.server[s.key]
            idx = [i for i, r in enumerate(edge) if off[i] and r.idx in recs]
            srv = [recs[edge[i].idx] for i in idx]
            m = measures(off, med, idx, srv)
            out.append({
                **common, **fields(s), 'eta': eta, **m,
                # The equal-bytes frame sends every patch of a smaller JPEG: its bound is bytes.
                'budget_violations': int(sum(r.patches > s.budget for r in srv)) if s.method != EQUAL_BYTES else 0,
            })
        for t in data.two_round:
            one, unions = data.server[t.round_one.key], data.rounds.get(t.key, {})
            idx = [i for i, r in enumerate(edge) if off[i] and r.idx in one]
            first = [one[edge[i].idx] for i in idx]
            # A second round: the server is unsure on round one and round two added patches.
            took = [cloud_uncertainty(r) >= t.eta_cloud and r.idx in unions and unions[r.idx].patches > r.patches
                    for r in first]
            final = [unions[r.idx] if tk else r for r, tk in zip(first, took)]
            m = measures(off, med, idx, final)
            out.append({
                **common, **fields(t.round_one), 'method': TWO_ROUND, 'eta': eta, **m,
                'second_round': t.mode, 'second_k': t.k, 'eta_cloud': t.eta_cloud,
                'round1_accuracy': measures(off, med, idx, first)['offloaded_accuracy'],
                'second_round_share': float(np.mean(took)) if took else 0.0,
                # Round one stays within B; with a second round, both rounds within budget_max.
                'budget_violations': int(sum(r.patches > t.budget for r in first)
                                         + sum(r.patches > t.budget_max for r, tk in zip(final, took) if tk)),
            })
    return out


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if x.size else math.nan
