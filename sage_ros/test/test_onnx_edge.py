# SPDX-License-Identifier: Apache-2.0
"""The edge on ONNX Runtime makes the torch edge's decisions.

The edge model is exported once (through ``sage-ros export-edge``, random weights) and run on
ONNX Runtime against torch over 100 real images: outputs within FP32_TOLERANCE, the same gate
decision on every image, the same SAGE and BAT patches and the same payload bytes.
"""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest

from sage_ros.cli import main as cli_main
from sage_ros.core import Budget, WeightsError, edge_forward, normalize, plan_offload
from sage_ros.core.models import EdgeOutput, ModelCard, edge_runtime, load_edge_model
from sage_ros.core.onnx_edge import CARD_KEY, FP32_TOLERANCE, INT8, QUANTIZATION_KEY, OnnxEdgeModel, session_options
from sage_ros.core.pipeline import EdgePipeline
from sage_ros.commands.images import list_images, read_rgb
from sage_ros.params import gate_config, load_params, selection_config

MODEL = 'deit_tiny_patch16_224'
N_IMAGES = 100
BUDGETS = (16, 32, 64, 96)


@pytest.fixture(scope='module')
def export_run(tmp_path_factory) -> tuple[Path, str]:
    """``sage-ros export-edge`` of random:0 weights, with its int8 sibling: (path, what it printed)."""
    out = tmp_path_factory.mktemp('onnx') / 'deit_tiny.onnx'
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli_main(['export-edge', '--model', MODEL, '--weights', 'random:0', '-o', str(out), '--int8'])
    assert code == 0
    return out, printed.getvalue()


@pytest.fixture(scope='module')
def exported(export_run) -> Path:
    return export_run[0]


@pytest.fixture(scope='module')
def ort_model(exported) -> OnnxEdgeModel:
    return load_edge_model(MODEL, str(exported), num_threads=1)


@pytest.fixture(scope='module')
def frames(imagenet_dir) -> list[np.ndarray]:
    items = list_images(imagenet_dir / 'images')
    return [read_rgb(it.path) for it in items[:: len(items) // N_IMAGES][:N_IMAGES]]


@pytest.fixture(scope='module')
def crops(tiny, frames) -> np.ndarray:
    return np.stack([tiny.card.crop(rgb)[0] for rgb in frames])


def _forward(pipeline: EdgePipeline, crops: np.ndarray, source: str = 'final') -> list:
    return [o for s in range(0, len(crops), 25) for o in pipeline.forward(crops[s:s + 25], source)]


@pytest.fixture(scope='module')
def edges(tiny, ort_model, crops):
    """(torch outputs, ONNX Runtime outputs) of every crop, through the one EdgePipeline."""
    return _forward(EdgePipeline(tiny), crops), _forward(EdgePipeline(ort_model), crops)


def _max_diff(a: list, b: list, field: str) -> float:
    return max(float(np.abs(getattr(x, field) - getattr(y, field)).max()) for x, y in zip(a, b))


def test_export_writes_the_model_card_and_checks_itself(export_run, tiny, ort_model):
    path, printed = export_run
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    card = ModelCard.from_json(meta[CARD_KEY])
    assert card == tiny.card == ort_model.card
    assert (card.name, card.weights, card.random_weights) == (MODEL, 'random:0', True)
    assert (card.input_size, card.patch_size, card.grid, card.num_classes) == (224, 16, (14, 14), 1000)
    assert card.interpolation == 'bicubic' and card.crop_pct == pytest.approx(0.9)  # timm's DeiT
    assert f'wrote {path}' in printed and 'grid 14x14' in printed and 'tolerance' in printed
    assert f'sage_edge.weights:={path.resolve()}' in printed
    int8_meta = {p.key: p.value for p in onnx.load(str(path.with_suffix('.int8.onnx'))).metadata_props}
    assert int8_meta[CARD_KEY] == meta[CARD_KEY] and int8_meta[QUANTIZATION_KEY] == INT8
    assert QUANTIZATION_KEY not in meta


def test_fp32_outputs_equal_torch_within_tolerance(edges, tiny, ort_model, crops):
    want, got = edges
    assert len(got) == N_IMAGES
    assert _max_diff(want, got, 'probs') <= FP32_TOLERANCE['probs']
    assert _max_diff(want, got, 'attention') <= FP32_TOLERANCE['attention']
    assert _max_diff(want, got, 'embeddings') <= FP32_TOLERANCE['embeddings_final']
    # The other embedding source, on a part of the images (another pass of both models).
    want_in = _forward(EdgePipeline(tiny), crops[:25], 'input')
    got_in = _forward(EdgePipeline(ort_model), crops[:25], 'input')
    assert _max_diff(want_in, got_in, 'embeddings') <= FP32_TOLERANCE['embeddings_input']
    assert got_in[0].embeddings.shape == (196, 192) and not np.allclose(got_in[0].embeddings, got[0].embeddings)
    # The tolerance is no formality: a different model is far outside it.
    other = edge_forward(load_edge_model(MODEL, 'random:1'), normalize(crops[:2], tiny.mean, tiny.std))
    assert _max_diff(other, got[:2], 'attention') > 100 * FP32_TOLERANCE['attention']


def test_same_gate_decision_on_every_image(edges, crops, tiny, ort_model):
    want, got = edges
    params = load_params('sage_edge')
    torch_pipe, ort_pipe = EdgePipeline(tiny), EdgePipeline(ort_model)
    scores = np.sort([torch_pipe.decide(c, None, e, gate_config(params)).score for c, e in zip(crops, want)])
    # Random weights are unsure of every image, so the configured eta offloads them all; thresholds
    # between the scores' quartiles split the images, which is where a runtime could disagree.
    etas = [float(params['eta'])] + [float(scores[i - 1] + scores[i]) / 2 for i in (25, 50, 75)]
    for eta in etas:
        config = gate_config({**params, 'eta': eta})
        a = [torch_pipe.decide(c, None, e, config).offload for c, e in zip(crops, want)]
        b = [ort_pipe.decide(c, None, e, config).offload for c, e in zip(crops, got)]
        assert a == b, eta
    assert sum(a) == 25  # the last eta: 3 of 4 images kept on the edge


def _unit(e: np.ndarray) -> np.ndarray:
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _parts_at_a_tie(method: str, budget: int, params: dict, ref, other, a: np.ndarray, b: np.ndarray) -> bool:
    """Do torch's patches ``a`` and ONNX Runtime's ``b`` part at a tie: where the two patches
    in question score equal in torch's own outputs, within twice what the runtimes differ by
    on this frame? Such a tie either runtime may break either way; nothing else may differ."""
    att = ref.attention.astype(np.float64)
    att_band = 2 * float(np.abs(att - other.attention).max())
    e_ref, e_other = _unit(ref.embeddings.astype(np.float64)), _unit(other.embeddings.astype(np.float64))
    cos_band = 2 * float(np.abs(e_ref @ e_ref.T - e_other @ e_other.T).max())
    order = np.argsort(-att, kind='stable')

    def boundary_tie(k: int) -> bool:  # which patches make a top-k set by attention
        return 0 < k < att.size and att[order[k - 1]] - att[order[k]] <= att_band

    d = int(np.nonzero(a != b)[0][0])
    if method == 'sage':  # attention prefilter, first pick by attention, then farthest by cosine
        if boundary_tie(min(att.size, math.ceil(float(params['prefilter_ratio']) * budget))):
            return True
        if d == 0:
            return abs(att[a[0]] - att[b[0]]) <= att_band
        nearest = (e_ref[a[:d]] @ e_ref[[a[d], b[d]]].T).max(axis=0)
        return abs(nearest[0] - nearest[1]) <= cos_band
    n_att = min(budget, round(float(params['bat_attentive_share']) * budget))  # bat: the attentive part
    return boundary_tie(n_att) or (d < n_att and abs(att[a[d]] - att[b[d]]) <= att_band)


def test_identical_sage_and_bat_patches_and_payloads(edges, crops):
    want, got = edges
    params = load_params('sage_edge')
    ties = []
    for method in ('sage', 'bat'):
        # raw: the payload is the patches' pixels in selection order, cheap to make for all.
        raw = selection_config({**params, 'method': method, 'codec': 'raw'})
        for budget in BUDGETS:
            for i, (crop, a, b) in enumerate(zip(crops, want, got)):
                pa, pb = plan_offload(crop, a, Budget(budget), raw), plan_offload(crop, b, Budget(budget), raw)
                if np.array_equal(pa.indices, pb.indices):
                    assert pa.payload == pb.payload, (method, budget, i)
                else:
                    assert _parts_at_a_tie(method, budget, params, a, b, pa.indices, pb.indices), (method, budget, i)
                    ties.append((method, budget, i, set(pa.indices.tolist()) == set(pb.indices.tolist())))
    print(f'(method, B, image, same set) where the runtimes broke a float tie differently: {ties}')
    assert len(ties) <= 0.02 * 2 * len(BUDGETS) * len(want)  # rare, or the runtimes differ for real
    # The configured codec (jpeg) too: the PatchSet payload bytes of each frame are the same.
    config = selection_config({**params, 'method': 'sage'})
    assert config.encoding == 'jpeg'
    for crop, a, b in zip(crops, want, got):
        pa, pb = plan_offload(crop, a, Budget(64), config), plan_offload(crop, b, Budget(64), config)
        assert pa.payload == pb.payload or not np.array_equal(pa.indices, pb.indices)


def test_a_tie_is_told_from_a_real_difference(edges):
    """The tie rule above accepts a swap of equally attended patches only."""
    params = load_params('sage_edge')
    ref = edges[0][0]
    order = np.argsort(-ref.attention, kind='stable')
    tied = EdgeOutput(ref.logits, ref.probs, ref.attention.copy(), ref.embeddings)
    tied.attention[order[1]] = tied.attention[order[0]]
    a = np.array([order[0], order[1]])
    assert _parts_at_a_tie('bat', 4, params, tied, tied, a, a[::-1].copy())
    assert not _parts_at_a_tie('bat', 4, params, ref, ref, a, a[::-1].copy())
    far = np.array([order[0], order[150]])
    assert not _parts_at_a_tie('sage', 2, params, ref, ref, np.array([order[0], order[1]]), far)


def test_loading_says_what_is_wrong(exported, tmp_path):
    with pytest.raises(WeightsError, match='not found.*export-edge'):
        load_edge_model(MODEL, str(tmp_path / 'missing.onnx'))
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'not a model')
    with pytest.raises(WeightsError, match='cannot load ONNX model'):
        load_edge_model(MODEL, str(garbage))
    plain = tmp_path / 'plain.onnx'
    proto = onnx.load(str(exported))
    del proto.metadata_props[:]
    onnx.save(proto, str(plain))
    with pytest.raises(WeightsError, match='no sage_ros model card'):
        load_edge_model(MODEL, str(plain))
    with pytest.raises(WeightsError, match='exported from deit_tiny_patch16_224, but the edge model is set to'):
        load_edge_model('deit_small_patch16_224', str(exported))
    with pytest.raises(WeightsError, match='runs on ONNX Runtime'):
        load_edge_model(MODEL, str(exported), runtime='torch')
    with pytest.raises(WeightsError, match='needs weights that are a .onnx file'):
        load_edge_model(MODEL, 'random:0', runtime='onnxruntime')
    with pytest.raises(WeightsError, match='int8 applies to an ONNX Runtime edge only'):
        load_edge_model(MODEL, 'random:0', int8=True)
    with pytest.raises(WeightsError, match='runs on the CPU'):
        load_edge_model(MODEL, str(exported), device='cuda')
    with pytest.raises(ValueError, match='embedding_source'):
        load_edge_model(MODEL, str(exported)).edge_outputs(np.zeros((3, 224, 224), np.float32), 'middle')
    assert edge_runtime('/m/x.ONNX') == 'onnxruntime' and edge_runtime('hub') == 'torch'


def test_session_threads_and_no_spinning(exported):
    opts = session_options(2)
    assert opts.get_session_config_entry('session.intra_op.allow_spinning') == '0'
    assert opts.intra_op_num_threads == 2
    model = load_edge_model(MODEL, str(exported), runtime='onnxruntime', num_threads=3)
    assert model.runtime == 'onnxruntime' and model.num_threads == 3 and not model.int8


def test_int8_runs_the_same_interface(exported, crops, edges):
    """Quantised at load or at export: the same card and outputs of the same shapes; how far
    they drift is measured by `sage-ros bench --edge-runtimes`, not fixed here."""
    at_load = load_edge_model(MODEL, str(exported), int8=True)
    at_export = load_edge_model(MODEL, str(exported.with_suffix('.int8.onnx')))
    assert at_load.int8 and at_export.int8 and at_load.card == at_export.card
    a = EdgePipeline(at_load).forward(crops[:2])
    b = EdgePipeline(at_export).forward(crops[:2])
    for x, y, fp32 in zip(a, b, edges[1][:2]):
        np.testing.assert_allclose(x.probs, y.probs, atol=1e-6)  # the same quantisation
        assert x.embeddings.shape == fp32.embeddings.shape and x.probs.sum() == pytest.approx(1.0, abs=1e-5)
        assert not np.array_equal(x.attention, fp32.attention)  # int8 really changed the weights


def test_onnx_edge_process_imports_no_torch(exported, imagenet_dir):
    """The robot's edge: loading and running the exported model through the pipeline in a
    fresh process brings in no torch, timm or torchvision."""
    image = list_images(imagenet_dir / 'images')[0].path
    code = textwrap.dedent(f'''
        import sys
        from sage_ros.core.models import load_edge_model
        from sage_ros.core.pipeline import EdgePipeline, GateConfig
        from sage_ros.commands.images import read_rgb
        pipeline = EdgePipeline(load_edge_model({MODEL!r}, {str(exported)!r}, num_threads=1))
        decision = pipeline.analyze(read_rgb({str(image)!r}), GateConfig())
        assert decision.edge.attention.shape == (196,)
        print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'timm', 'torchvision')))
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == '[]', out.stdout[:500]


@pytest.mark.parametrize(('output', 'match'), [('model.txt', 'must be a .onnx file'),
                                               ('no/such/folder/model.onnx', 'does not exist')])
def test_export_edge_refuses_a_bad_output_in_one_line(tmp_path, capsys, output, match):
    assert cli_main(['export-edge', '--weights', 'random:0', '-o', str(tmp_path / output)]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_the_system_runs_with_the_edge_on_onnx_runtime(running_system, exported, frames, tiny, tmp_path):
    """Router, cloud (torch) and an edge whose weights are the exported model: every frame gets
    the torch edge's label, and the cloud answers the very request the torch edge would send."""
    overrides = {'sage_edge.weights': str(exported), 'budget': 64, 'budget_mode': 'fixed', 'codec': 'jpeg',
                 'deadline_ms': 20000.0, 'second_round': 'off'}
    params = load_params('sage_edge', overrides={k.split('.')[-1]: v for k, v in overrides.items()})
    torch_pipe = EdgePipeline(tiny)
    with running_system('onnx_edge', **overrides) as (_, client, _endpoint):
        for rgb in frames[:4]:
            res = client.classify(rgb, timeout=40)
            assert res is not None, 'frame without a result'
            want = torch_pipe.analyze(rgb, gate_config(params))
            plan = EdgePipeline.plan(want, Budget(64), selection_config(params))
            assert res.source == res.SOURCE_CLOUD, res.detail
            assert res.edge_label == want.label and res.random_weights
            assert (res.patches_sent, res.bytes_sent) == (plan.indices.size, plan.num_bytes)
    log = (tmp_path / 'onnx_edge.log').read_text()
    assert f'({tiny.weights}) on onnxruntime' in log, log[-2000:]


def test_edge_bench_worker_measures_the_onnx_edge_without_torch(exported, imagenet_dir):
    """One worker of `sage-ros bench --edge-runtimes`, as the bench drives it; and its comparison
    of two workers' decisions."""
    from sage_ros.bench.edge import _agreement, _median_split_agreement, _Run

    paths = [str(it.path) for it in list_images(imagenet_dir / 'images')[:3]]
    run = _Run('onnxruntime fp32', 1, str(exported))
    run.start(MODEL)
    try:
        assert run.ask({}) == {'ready': True}
        run.frames = [run.ask({'path': p}) for p in paths]
        run.final = run.ask({'quit': True})
    finally:
        run.stop()
    assert run.final['heavy'] == [] and run.final['rss_mb'] > 0
    assert all(f['forward_ms'] > 0 and f['frame_ms'] >= f['forward_ms'] for f in run.frames)
    assert [len(run.frames[0]['sage'][str(b)]) for b in BUDGETS] == list(BUDGETS)
    same = _agreement(run, run, eta=1.0)
    assert same['sage_same_set'] == dict.fromkeys(BUDGETS, 3) and same['probs_max_diff'] == 0.0
    shifted = _Run('shifted', 1, '', frames=[{**f, 'score': f['score'] + 10.0} for f in run.frames])
    assert _median_split_agreement(run, shifted)[1] == 2  # the lowest of 3 moves above the threshold
