# SPDX-License-Identifier: Apache-2.0
"""The comparison behind scripts/aarch64_edge_check.py (which itself takes minutes under QEMU
and stays out of the suite): two machines' records of the edge's frame work agree only when
every gate decision, every SAGE patch list and every output within FP32_TOLERANCE agree; the
payload bytes are reported, not required."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from sage_ros.core.gate import gate_score
from sage_ros.core.onnx_edge import FP32_TOLERANCE
from sage_ros.bench.cross_arch import compare, gate_thresholds, main

BUDGETS = [16, 32]


def _record(machine: str, scores=(5.0, 6.0, 7.0)) -> dict:
    """A record as ``edge_record`` writes it, of frames whose gate scores are ``scores``."""
    rng = np.random.default_rng(0)
    frames = []
    for i, score in enumerate(scores):
        probs = np.full(1000, (1 - 2.0 ** -score) / 999, np.float32)
        probs[i] = 2.0 ** -score  # min-entropy = score bits
        frames.append({
            'name': f'frame{i}.jpg', 'frame_sha256': f'f{i}', 'decoded': [768, 1024, 3], 'crop_sha256': f'c{i}',
            'logits': rng.normal(size=1000).tolist(), 'probs': probs.tolist(),
            'attention': rng.dirichlet(np.ones(196)).tolist(), 'embeddings': rng.normal(size=(196, 8)).tolist(),
            'score': gate_score(probs, 'min_entropy'), 'offload': True, 'forward_s': 0.1,
            'plans': {str(b): {'indices': rng.permutation(196)[:b].tolist(), 'bytes': 100 * b,
                               'payload_sha256': f'p{i}-{b}'} for b in BUDGETS},
        })
    return {'machine': machine, 'versions': {'python': '3.11', 'numpy': '1.26.4', 'opencv': '4.11.0',
                                             'onnxruntime': '1.32.0'},
            'model': 'edge.onnx', 'weights': 'random:0', 'threads': 1, 'gate_metric': 'min_entropy', 'eta': 1.0,
            'codec': 'jpeg', 'budgets': BUDGETS, 'load_s': 0.2, 'frames': frames}


def _nudge(values: list, by: float) -> list:
    """``values`` (nested lists) with their first entry moved by ``by``."""
    out = np.array(values, np.float64)
    out.flat[0] += by
    return out.tolist()


def test_float_rounding_within_tolerance_is_a_match():
    x86, arm = _record('x86_64'), _record('aarch64')
    for frame in arm['frames']:
        frame['probs'] = _nudge(frame['probs'], 0.5 * FP32_TOLERANCE['probs'])
        frame['embeddings'] = _nudge(frame['embeddings'], 0.5 * FP32_TOLERANCE['embeddings_final'])
        frame['logits'] = _nudge(frame['logits'], 1e-3)  # reported, no tolerance of its own
    result = compare(x86, arm)
    assert result['mismatches'] == [] and result['payload_equal']
    assert result['max_diff']['embeddings'] == pytest.approx(0.5 * FP32_TOLERANCE['embeddings_final'])
    assert result['max_diff']['logits'] == pytest.approx(1e-3) and result['max_diff']['attention'] == 0.0
    assert all(row['crop_equal'] and all(row['sage_equal'].values()) for row in result['frames'])


def _break_probs(frame: dict) -> None:
    frame['probs'] = _nudge(frame['probs'], 2 * FP32_TOLERANCE['probs'])


def _break_attention(frame: dict) -> None:
    frame['attention'] = _nudge(frame['attention'], 2 * FP32_TOLERANCE['attention'])


def _break_embeddings(frame: dict) -> None:
    frame['embeddings'] = _nudge(frame['embeddings'], 2 * FP32_TOLERANCE['embeddings_final'])


def _truncate_embeddings(frame: dict) -> None:
    frame['embeddings'] = frame['embeddings'][:195]


def _swap_patches(frame: dict) -> None:
    idx = frame['plans']['32']['indices']
    idx[3], idx[4] = idx[4], idx[3]  # the same set in another order is another request


def _cross_a_threshold(frame: dict) -> None:
    frame['score'] = 5.6  # past the threshold between 5 and 6, though still offloaded at eta 1


def _flip_offload(frame: dict) -> None:
    frame['offload'] = False


@pytest.mark.parametrize(('breaks', 'says'), [
    (_break_probs, 'frame0.jpg: probs differ by 2e-06 > 1e-06'),
    (_break_attention, 'frame0.jpg: attention differ'),
    (_break_embeddings, 'frame0.jpg: embeddings differ'),
    (_truncate_embeddings, 'frame0.jpg: embeddings differ by inf'),
    (_swap_patches, 'frame0.jpg: SAGE patches at B=32 differ'),
    (_cross_a_threshold, 'frame0.jpg: gate decisions differ (offload True vs True, eta [5.5])'),
    (_flip_offload, 'frame0.jpg: gate decisions differ (offload True vs False'),
])
def test_each_broken_requirement_is_a_mismatch(breaks, says):
    x86, arm = _record('x86_64'), _record('aarch64')
    breaks(arm['frames'][0])
    mismatches = compare(x86, arm)['mismatches']
    assert len(mismatches) == 1 and mismatches[0].startswith(says), mismatches


def test_other_frames_or_settings_are_a_mismatch():
    x86 = _record('x86_64')
    renamed = copy.deepcopy(x86)
    renamed['frames'][1]['name'] = 'other.jpg'
    assert compare(x86, renamed)['mismatches'] == [
        "frames differ: ['frame0.jpg', 'frame1.jpg', 'frame2.jpg'] vs ['frame0.jpg', 'other.jpg', 'frame2.jpg']"]
    other_bytes = copy.deepcopy(x86)
    other_bytes['frames'][2]['frame_sha256'] = 'x'
    assert compare(x86, other_bytes)['mismatches'] == ['frame2.jpg: the two machines read different frame bytes']
    other_eta = {**x86, 'eta': 2.0}
    assert compare(x86, other_eta)['mismatches'] == ['settings differ: eta 1.0 vs 2.0']


def test_payload_bytes_are_reported_not_required():
    x86, arm = _record('x86_64'), _record('aarch64')
    arm['frames'][1]['plans']['16']['payload_sha256'] = 'different'
    result = compare(x86, arm)
    assert result['mismatches'] == [] and not result['payload_equal']
    assert result['frames'][1]['payload_equal'] == {16: False, 32: True}


def test_gate_thresholds_split_the_frames():
    assert gate_thresholds(_record('x86_64', scores=(7.0, 5.0, 6.0, 6.0))) == [1.0, 5.5, 6.5]


def test_commands_exit_codes_and_one_line_errors(tmp_path, capsys):
    x86, arm = _record('x86_64'), _record('aarch64')
    paths = {name: tmp_path / f'{name}.json' for name in ('x86', 'arm', 'bad')}
    paths['x86'].write_text(json.dumps(x86))
    paths['arm'].write_text(json.dumps(arm))
    assert main(['compare', str(paths['x86']), str(paths['arm'])]) == 0
    out = capsys.readouterr().out
    assert 'payload bytes: equal on every frame and budget' in out
    assert out.strip().endswith('result: aarch64 decides as x86_64 does')
    _swap_patches(arm['frames'][2])
    paths['bad'].write_text(json.dumps(arm))
    assert main(['compare', str(paths['x86']), str(paths['bad'])]) == 1
    assert 'MISMATCH frame2.jpg: SAGE patches at B=32 differ' in capsys.readouterr().out
    assert main(['compare', str(paths['x86']), str(tmp_path / 'missing.json')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and 'missing.json' in err and len(err.strip().splitlines()) == 1
    out_json = tmp_path / 'out.json'
    assert main(['run', str(tmp_path / 'missing.onnx'), str(paths['x86']), '-o', str(out_json)]) == 2
    err = capsys.readouterr().err
    assert 'missing.onnx' in err and 'export-edge' in err and len(err.strip().splitlines()) == 1
    assert not out_json.exists()
