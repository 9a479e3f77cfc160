# SPDX-License-Identifier: Apache-2.0
"""sage_edge's parameters: their descriptors (defaults live in config/sage_ros.yaml) and what
cannot work together."""

from __future__ import annotations

from typing import Any

from sage_ros.core.codec import ENCODINGS
from sage_ros.core.errors import SageError
from sage_ros.core.gate import GATE_METRICS
from sage_ros.core.models import RUNTIMES
from sage_ros.core.offload import check_byte_budget
from sage_ros.core.preprocess import MAX_PIXELS, MIN_SIDE
from sage_ros.core.rounds import SECOND_ROUND_MODES
from sage_ros.core.selection import METHODS
from sage_ros.nodes.parameters import Spec

SPECS = {
    'image_topic': Spec('camera sensor_msgs/Image topic, relative to the namespace ("" = off)', read_only=True),
    'compressed_image_topic': Spec('optional sensor_msgs/CompressedImage topic ("" = off)', read_only=True),
    'result_topic': Spec('OffloadResult output topic', read_only=True),
    'patch_set_topic': Spec('PatchSet request topic / Zenoh key', read_only=True),
    'cloud_result_topic': Spec('CloudResult answer topic / Zenoh key', read_only=True),
    'debug_image_topic': Spec('debug overlay image topic', read_only=True),
    'transport': Spec('zenoh or ros', read_only=True, choices=('zenoh', 'ros')),
    'zenoh_config': Spec('Zenoh json5 config file', read_only=True),
    'zenoh_connect': Spec('Zenoh connect endpoints overriding the file (comma-separated)', read_only=True),
    'robot_id': Spec('robot id in requests ("" = namespace)', read_only=True),
    'deadline_ms': Spec('per-frame deadline from arrival, ms', float_range=(1.0, 600000.0)),
    'max_in_flight': Spec('offloaded requests in flight at once', int_range=(1, 64)),
    'provisional_topic': Spec('edge label of offloaded frames at once ("" = off)', read_only=True),
    'max_frame_age_s': Spec('skip frames stamped longer ago than this (0 = off)', float_range=(0.0, 1e9)),
    'max_frame_pixels': Spec('largest camera frame accepted, width x height (what the camera can send)',
                             read_only=True, int_range=(MIN_SIDE * MIN_SIDE, MAX_PIXELS)),
    'model': Spec('timm edge model', read_only=True),
    'weights': Spec('checkpoint path, hub, hf-hub:..., random[:SEED], or an exported .onnx', read_only=True),
    'runtime': Spec('edge runtime: auto (.onnx weights: onnxruntime, else torch), torch or onnxruntime',
                    read_only=True, choices=RUNTIMES),
    'int8': Spec('ONNX Runtime only: quantise the weights to int8 at load (changes the outputs)', read_only=True),
    'device': Spec('torch device (the ONNX Runtime edge runs on the CPU)', read_only=True),
    'num_threads': Spec('CPU threads of the edge runtime (0 = its default)', read_only=True, int_range=(0, 256)),
    'crop_pct': Spec('eval centre-crop ratio (0 = the model\'s)', read_only=True, float_range=(0.0, 1.0)),
    'embedding_source': Spec('final or input patch embeddings', choices=('final', 'input')),
    'gate_metric': Spec('uncertainty metric of the gate', choices=tuple(GATE_METRICS)),
    'eta': Spec('offload when uncertainty >= eta', float_range=(0.0, 1000.0)),
    'method': Spec('patch selection method', choices=METHODS),
    'budget_topic': Spec('BudgetStatus output topic', read_only=True),
    'budget_mode': Spec('auto (bandwidth monitor) or fixed (the budget parameter)', choices=('auto', 'fixed')),
    'budget': Spec('hard budget B, patches per request; setting it switches budget_mode to fixed',
                   int_range=(1, 196)),
    'budget_min': Spec('smallest budget in auto mode', int_range=(1, 196)),
    'budget_max': Spec('largest budget in auto mode', int_range=(1, 196)),
    'budget_safety': Spec('share of the deadline a request may plan to use', float_range=(0.1, 1.0)),
    'probe_interval_s': Spec('probe the link after this long without an answer', float_range=(0.1, 3600.0)),
    'probe_bytes': Spec('payload of the throughput probe', int_range=(64, 1_000_000)),
    'byte_budget': Spec('hard budget, payload bytes per request (0 = off)', int_range=(0, 10_000_000)),
    'prefilter_ratio': Spec('SAGE prefilter ratio k', float_range=(1.0, 196.0)),
    'seed': Spec('seed of the random method', int_range=(0, 2**31 - 1)),
    'delta': Spec('attention_threshold delta', float_range=(0.0, 1.0)),
    'delta_sum': Spec('attention_sum share', float_range=(1e-6, 1.0)),
    'bat_attentive_share': Spec('bat: share of B taken by attention', float_range=(0.0, 1.0)),
    'bat_k': Spec('bat: nearest neighbours of the density estimate', int_range=(1, 195)),
    'codec': Spec('patch codec', choices=ENCODINGS),
    'jpeg_quality': Spec('JPEG quality', int_range=(1, 100)),
    'topk': Spec('edge top-k classes sent with a request', int_range=(1, 1000)),
    'second_round': Spec('patches a second round adds: continue (SAGE), roi (around the cloud\'s attention), off',
                         choices=SECOND_ROUND_MODES),
}


def config_problem(p: dict[str, Any]) -> str | None:
    """Why these sage_edge parameters cannot work together, or None."""
    if p['budget_min'] > p['budget_max']:
        return 'budget_min must be <= budget_max'
    if 0 < p['crop_pct'] < 0.5:
        # The frame is resized to input_size / crop_pct before the crop: gigabytes near 0.
        return f'crop_pct {p["crop_pct"]} must be 0 (the model\'s own) or in 0.5..1.0'
    if p['byte_budget']:
        try:
            check_byte_budget(p['byte_budget'], p['codec'], quality=p['jpeg_quality'])
        except SageError as exc:
            return f'byte_budget: {exc}'
    return None
