# SPDX-License-Identifier: Apache-2.0
"""Core of sage_ros with no ROS imports: models, preprocessing, gate, selection, codec, budget.

Names are imported from their submodule on first use (PEP 562), so importing this package, or
one submodule of it (``sage_ros.core.errors``), costs only what that submodule imports. The
router, the ``sage-ros`` CLI and a robot's ONNX Runtime edge use parts of the core and must
not load torch and timm for the parts they do not use: only the torch-backed names
(``load_vit``, ``VitModel``, ``edge_forward``, ``server_forward_subset``, the planning in
``offload``) pull them in.
"""

from __future__ import annotations

import importlib
from typing import Any

# Public name -> the submodule of sage_ros.core that defines it.
_EXPORTS = {
    **dict.fromkeys(('decode_patches', 'encode_patches', 'encode_within_budget', 'extract_patches',
                     'min_payload_bytes'), 'codec'),
    **dict.fromkeys(('BudgetError', 'CodecError', 'PreprocessError', 'SageError', 'SelectionError',
                     'WeightsError'), 'errors'),
    **dict.fromkeys(('gate_score', 'margin_uncertainty', 'min_entropy', 'shannon_entropy', 'should_offload'),
                    'gate'),
    **dict.fromkeys(('EdgeOutput', 'VitModel', 'edge_forward', 'load_vit', 'server_forward_subset'), 'models'),
    **dict.fromkeys(('Budget', 'OffloadPlan', 'SelectionConfig', 'check_byte_budget', 'classify_patches',
                     'plan_offload'), 'offload'),
    **dict.fromkeys(('CropMap', 'check_frame_geometry', 'normalize', 'resize_crop', 'to_rgb'), 'preprocess'),
    **dict.fromkeys(('METHODS', 'Selection', 'coverage', 'select', 'select_attention_sum',
                     'select_attention_threshold', 'select_attention_topk', 'select_bat', 'select_detailed',
                     'select_random', 'select_sage', 'select_uniform_grid'), 'selection'),
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        # Also the way `from sage_ros.core import gate` finds a submodule not imported yet.
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    value = getattr(importlib.import_module(f'{__name__}.{module}'), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
