# SPDX-License-Identifier: Apache-2.0
"""Core of sage_ros with no ROS imports: models, preprocessing, gate, selection, codec, budget."""

from sage_ros.core.codec import (
    decode_patches,
    encode_patches,
    encode_within_budget,
    extract_patches,
    min_payload_bytes,
)
from sage_ros.core.errors import (
    BudgetError,
    CodecError,
    PreprocessError,
    SageError,
    SelectionError,
    WeightsError,
)
from sage_ros.core.gate import gate_score, margin_uncertainty, min_entropy, shannon_entropy, should_offload
from sage_ros.core.models import EdgeOutput, VitModel, edge_forward, load_vit, server_forward_subset
from sage_ros.core.offload import (
    Budget,
    OffloadPlan,
    SelectionConfig,
    check_byte_budget,
    classify_patches,
    plan_offload,
)
from sage_ros.core.preprocess import CropMap, check_frame_geometry, normalize, resize_crop, to_rgb
from sage_ros.core.selection import (
    METHODS,
    Selection,
    coverage,
    select,
    select_attention_sum,
    select_attention_threshold,
    select_attention_topk,
    select_detailed,
    select_random,
    select_sage,
    select_uniform_grid,
)

__all__ = [
    'METHODS',
    'Budget',
    'BudgetError',
    'CodecError',
    'CropMap',
    'EdgeOutput',
    'OffloadPlan',
    'PreprocessError',
    'SageError',
    'Selection',
    'SelectionConfig',
    'SelectionError',
    'VitModel',
    'WeightsError',
    'check_byte_budget',
    'check_frame_geometry',
    'classify_patches',
    'coverage',
    'decode_patches',
    'edge_forward',
    'encode_patches',
    'encode_within_budget',
    'extract_patches',
    'gate_score',
    'load_vit',
    'margin_uncertainty',
    'min_entropy',
    'min_payload_bytes',
    'normalize',
    'plan_offload',
    'resize_crop',
    'select',
    'select_attention_sum',
    'select_attention_threshold',
    'select_attention_topk',
    'select_detailed',
    'select_random',
    'select_sage',
    'select_uniform_grid',
    'server_forward_subset',
    'shannon_entropy',
    'should_offload',
    'to_rgb',
]
