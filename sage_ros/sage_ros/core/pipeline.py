# SPDX-License-Identifier: Apache-2.0
"""One camera frame through the edge: crop, normalize, edge forward, gate, and the offload plan.

The edge node, ``sage-ros demo --offline`` and the evaluation sweep all call this, so the three
make the same decisions on the same frame, whichever runtime (torch or ONNX Runtime) runs the
edge model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from sage_ros.core.gate import gate_score, should_offload
from sage_ros.core.models import EdgeModel, EdgeOutput, ModelCard
from sage_ros.core.offload import Budget, OffloadPlan, SelectionConfig, plan_offload, plan_second_round
from sage_ros.core.preprocess import CropMap, normalize


@dataclass(frozen=True)
class GateConfig:
    """How the edge looks at a frame and decides (mirrors the sage_edge parameters)."""

    crop_pct: float = 0.0
    """Eval centre-crop ratio; 0 = the model's own."""
    embedding_source: str = 'final'
    gate_metric: str = 'min_entropy'
    eta: float = 1.0
    """Offload when the gate metric >= eta."""
    topk: int = 5


@dataclass(frozen=True)
class FrameDecision:
    """What the edge concluded about one frame."""

    crop: np.ndarray
    """The model's input crop, (S, S, 3) uint8 RGB."""
    crop_map: CropMap
    edge: EdgeOutput
    top_labels: np.ndarray
    top_scores: np.ndarray
    score: float
    """The gate metric's value."""
    min_entropy: float
    offload: bool
    forward_s: float
    """Seconds of crop + edge forward + gate."""

    @property
    def label(self) -> int:
        return int(self.top_labels[0])

    @property
    def confidence(self) -> float:
        return float(self.top_scores[0])


class EdgePipeline:
    """The per-frame work of the edge around one model, on either runtime. Stateless between
    frames."""

    def __init__(self, model: EdgeModel) -> None:
        self.model = model
        self.card: ModelCard = model.card

    def crop(self, rgb: np.ndarray, crop_pct: float = 0.0) -> tuple[np.ndarray, CropMap]:
        return self.card.crop(rgb, crop_pct)

    def forward(self, crops: np.ndarray, embedding_source: str = 'final') -> list[EdgeOutput]:
        """Edge outputs of a batch of crops, (B, S, S, 3) or one (S, S, 3)."""
        return self.model.edge_outputs(normalize(crops, self.card.mean, self.card.std), embedding_source)

    def decide(self, crop: np.ndarray, crop_map: CropMap, edge: EdgeOutput, config: GateConfig,
               forward_s: float = 0.0) -> FrameDecision:
        """The gate's decision for one frame's edge output."""
        top, conf = edge.topk(config.topk)
        score = gate_score(edge.probs, config.gate_metric)
        return FrameDecision(crop, crop_map, edge, top, conf, float(score),
                             float(gate_score(edge.probs, 'min_entropy')), should_offload(score, config.eta),
                             forward_s)

    def analyze(self, rgb: np.ndarray, config: GateConfig) -> FrameDecision:
        """Crop, forward and gate one RGB frame."""
        t0 = time.perf_counter()
        crop, cmap = self.crop(rgb, config.crop_pct)
        edge = self.forward(crop, config.embedding_source)[0]
        return self.decide(crop, cmap, edge, config, time.perf_counter() - t0)

    @staticmethod
    def plan(decision: FrameDecision, budget: Budget, selection: SelectionConfig) -> OffloadPlan:
        """The patches of an offloaded frame, selected and encoded within ``budget``."""
        return EdgePipeline.plan_crop(decision.crop, decision.edge, budget, selection)

    @staticmethod
    def plan_second_round(decision: FrameDecision, sent: np.ndarray, mode: str, budget: Budget,
                          selection: SelectionConfig, *, roi: Sequence[int] | np.ndarray = ()) -> OffloadPlan:
        """The patches a second round adds to ``sent`` (``mode``: continue or roi around the
        cloud's ``roi``), encoded within ``budget`` as a request of their own."""
        return plan_second_round(decision.crop, decision.edge, sent, mode, budget, selection, roi=roi)

    @staticmethod
    def plan_crop(crop: np.ndarray, edge: EdgeOutput, budget: Budget, selection: SelectionConfig) -> OffloadPlan:
        """As :meth:`plan`, from a crop and its (possibly cached) edge output."""
        return plan_offload(crop, edge, budget, selection)
