# SPDX-License-Identifier: Apache-2.0
"""The edge model on ONNX Runtime, without torch: what a robot runs.

``sage-ros export-edge`` (:mod:`sage_ros.core.onnx_export`, where torch is) writes the edge's
one pass as an ONNX graph: normalised pixels (B, 3, H, W) float32 in, and out the logits,
softmax, last-layer CLS-to-patch attention averaged over heads, and both kinds of patch
embeddings (final-layer tokens and input embeddings), all float32. The file's metadata carries
the :class:`~sage_ros.core.models.ModelCard` (model name, weights provenance, input transform,
patch geometry, class count), so the one file is all a robot needs.

Optionally the weights are quantised to int8 (ONNX Runtime dynamic quantisation), either at
export or at load. That changes the outputs (``sage-ros bench`` measures how much): it is never
the default.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from sage_ros.core.errors import WeightsError
from sage_ros.core.models import EdgeOutput, ModelCard, check_embedding_source

INPUT_NAME = 'pixels'
# The graph's outputs, in order (the fields of torch_models.EdgeTensors).
OUTPUT_NAMES = ('logits', 'probs', 'attention', 'embeddings_final', 'embeddings_input')
# Metadata keys of an exported model.
CARD_KEY = 'sage_ros.model_card'
QUANTIZATION_KEY = 'sage_ros.quantization'
INT8 = 'int8-dynamic'

# Largest |ONNX Runtime FP32 - torch FP32| of the edge outputs accepted as "the same model"
# (tests and the export check). The two runtimes sum in different orders and ONNX Runtime fuses
# LayerNorm, GELU and attention, so float32 rounding differs by a few ulp per op. Measured for
# DeiT-Tiny with random weights on 128 real images (x86, 2 threads): softmax 2.1e-9, attention
# 1.9e-9, final embeddings 6.9e-6, input embeddings 5.0e-6 (logits 1.3e-6). The bounds leave room
# for other CPUs' kernels (the issue measured x86 against aarch64 ONNX Runtime within 5e-6) and
# stay far below what a decision can see: a softmax entry is ~1e-3 for 1000 classes, a patch's
# attention ~5e-3, an embedding entry O(1) in a vector of norm ~14.
FP32_TOLERANCE = {'probs': 1e-6, 'attention': 1e-6, 'embeddings_final': 5e-5, 'embeddings_input': 5e-5}


def session_options(num_threads: int = 0) -> ort.SessionOptions:
    """CPU session options of the edge: ``num_threads`` intra-op threads (0: ONNX Runtime's
    default, one per physical core), never spinning."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(num_threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Spinning threads busy-wait for the next op instead of sleeping: on a robot, whose CPU
    # other nodes share, they take that CPU from everyone, and ONNX Runtime lost most of its
    # lead over torch while other work ran with spinning on.
    opts.add_session_config_entry('session.intra_op.allow_spinning', '0')
    opts.add_session_config_entry('session.inter_op.allow_spinning', '0')
    opts.log_severity_level = 3  # errors only: the node reports what matters itself
    return opts


class OnnxEdgeModel:
    """An exported edge model in an ONNX Runtime CPU session."""

    runtime = 'onnxruntime'

    def __init__(self, session: ort.InferenceSession, card: ModelCard, *, path: Path, int8: bool) -> None:
        self._session = session
        self._card = card
        self.path = path
        self.int8 = int8

    @property
    def card(self) -> ModelCard:
        return self._card

    @property
    def num_threads(self) -> int:
        return int(self._session.get_session_options().intra_op_num_threads)

    def edge_outputs(self, pixels: np.ndarray, embedding_source: str = 'final') -> list[EdgeOutput]:
        """One pass over normalised float32 pixels, (B, 3, H, W) or (3, H, W)."""
        check_embedding_source(embedding_source)
        x = np.ascontiguousarray(pixels, dtype=np.float32)
        x = x[None] if x.ndim == 3 else x
        logits, probs, attention, emb = self._session.run(
            ['logits', 'probs', 'attention', f'embeddings_{embedding_source}'], {INPUT_NAME: x})
        return [EdgeOutput(logits[i], probs[i], attention[i], emb[i]) for i in range(logits.shape[0])]


def quantize_int8(src: Path, dst: Path) -> None:
    """ONNX Runtime dynamic quantisation of ``src``'s weights to int8, written to ``dst``, with
    ``src``'s metadata and a note that it is quantised. Needs the ``onnx`` package."""
    try:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # a robot installs onnxruntime only
        raise WeightsError(f'int8 quantisation needs the onnx package ({exc}): install it, or use a model '
                           'exported with `sage-ros export-edge --int8`') from None

    # quantize_dynamic logs a hint to pre-process the model first; for DeiT-Tiny that changed
    # neither the int8 speed nor its outputs (measured), so the hint is dropped, not printed.
    def no_hint(record: logging.LogRecord) -> bool:
        return 'pre-processing before quantization' not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(no_hint)
    try:
        quantize_dynamic(Path(src), Path(dst), weight_type=QuantType.QInt8)
    finally:
        root.removeFilter(no_hint)
    source, model = onnx.load(str(src), load_external_data=False), onnx.load(str(dst))
    props = {p.key: p.value for p in source.metadata_props}
    onnx.helper.set_model_props(model, {**props, QUANTIZATION_KEY: INT8})
    onnx.save(model, str(dst))


def _session(model: str | bytes, num_threads: int, source: str) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(model, session_options(num_threads), providers=['CPUExecutionProvider'])
    except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
        raise WeightsError(f'cannot load ONNX model {source!r}: {str(exc).strip()}') from None


def load_onnx_edge(path: str | Path, *, name: str = '', num_threads: int = 0, int8: bool = False) -> OnnxEdgeModel:
    """The exported edge model at ``path`` in an ONNX Runtime session.

    ``name``, when given, must be the model the file was exported from. ``int8`` quantises the
    weights at load (a file exported with ``--int8`` already is). Raises :class:`WeightsError`
    with what to do when the file cannot serve as the edge.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise WeightsError(f'ONNX edge model {str(p)!r} not found; write one with `sage-ros export-edge`')
    session = _session(str(p), num_threads, str(p))
    meta = session.get_modelmeta().custom_metadata_map
    if CARD_KEY not in meta:
        raise WeightsError(f'{p} has no sage_ros model card in its metadata: '
                           'export the edge model with `sage-ros export-edge`')
    card = ModelCard.from_json(meta[CARD_KEY], source=str(p))
    if name and card.name != name:
        raise WeightsError(f'{p} was exported from {card.name}, but the edge model is set to {name}')
    inputs, outputs = session.get_inputs(), [o.name for o in session.get_outputs()]
    if [i.name for i in inputs] != [INPUT_NAME] or tuple(outputs) != OUTPUT_NAMES:
        raise WeightsError(f'{p}: inputs {[i.name for i in inputs]} and outputs {outputs} are not those of '
                           'an edge model exported by `sage-ros export-edge`')
    quantized = meta.get(QUANTIZATION_KEY) == INT8
    if int8 and not quantized:
        with tempfile.TemporaryDirectory(prefix='sage_ros_int8_') as tmp:
            dst = Path(tmp) / p.name
            quantize_int8(p, dst)
            session = _session(dst.read_bytes(), num_threads, f'{p} (int8)')
        quantized = True
    return OnnxEdgeModel(session, card, path=p, int8=quantized)
