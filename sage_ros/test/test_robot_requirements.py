# SPDX-License-Identifier: Apache-2.0
"""requirements-robot.txt, what a Raspberry Pi 5 installs over its ROS distribution: resolved by
pip for aarch64 / Python 3.12 from PyPI (metadata only, nothing installed), pinned, with no
torch, CUDA or NVIDIA wheel, covering what the edge node imports, and, installed into a venv of
its own here (x86-64), running the ROS-free edge on ONNX Runtime exactly as this environment
does."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv

import pytest

from conftest import REPO

REQUIREMENTS = REPO / 'requirements-robot.txt'
# Ubuntu 24.04 (glibc 2.39) runs wheels of every manylinux tag up to 2.39; pip's --platform
# takes each tag literally, so all of them are named.
PLATFORMS = ['manylinux2014_aarch64', *(f'manylinux_2_{minor}_aarch64' for minor in range(17, 40))]
PYTHON = '3.12'
FORBIDDEN = re.compile(r'^(torch|torchvision|torchaudio|timm|triton|nvidia-.*|cuda-.*|.*-cu\d+)$')
# Distributions a robot has without pip: its ROS distribution (apt; here the ros-* wheels),
# what `colcon build` installs, and the venv's own tools.
PROVIDED = re.compile(r'^(ros-.*|sage-ros|sage-ros-msgs|setuptools|pip|ros-wheels-bootstrapper)$')


def _canonical(name: str) -> str:
    return re.sub(r'[-_.]+', '-', name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in REQUIREMENTS.read_text().splitlines():
        line = line.split('#', 1)[0].strip()
        if line:
            name, sep, version = line.partition('==')
            assert sep and version and not re.search(r'[<>=!~;\[ ]', name + version), f'not pinned: {line!r}'
            pins[_canonical(name)] = version
    return pins


@pytest.fixture(scope='module')
def resolved() -> dict[str, dict]:
    """pip's install report for a Pi 5: canonical name -> the wheel it would install."""
    cmd = [sys.executable, '-m', 'pip', 'install', '--dry-run', '--ignore-installed', '--quiet', '--report', '-',
           *(arg for p in PLATFORMS for arg in ('--platform', p)), '--python-version', PYTHON,
           '--only-binary=:all:', '-r', str(REQUIREMENTS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    return {_canonical(item['metadata']['name']): item for item in report['install']}


def test_the_robot_requirements_resolve_for_a_pi5_without_torch(resolved):
    pins = _pins()
    for name, item in sorted(resolved.items()):
        wheel = item['download_info']['url'].rsplit('/', 1)[-1]
        print(f'{name}=={item["metadata"]["version"]}  {wheel}')
    assert {name: resolved[name]['metadata']['version'] for name in pins} == pins
    assert not [name for name in resolved if FORBIDDEN.match(name)]
    for name, item in resolved.items():
        wheel = item['download_info']['url'].rsplit('/', 1)[-1]
        assert wheel.endswith('-none-any.whl') or '_aarch64' in wheel, (name, wheel)


# What the edge process imports once its runtime is loaded: the node, the ONNX Runtime edge
# model, and the sage-ros CLI (`sage-ros up --side edge` on a robot without ros2 launch).
EDGE_IMPORTS = 'import sage_ros.nodes.edge_node, sage_ros.core.onnx_edge, sage_ros.cli'


def test_the_robot_requirements_cover_what_the_edge_imports(resolved):
    code = '\n'.join([
        'import importlib.metadata, json, sys',
        EDGE_IMPORTS,
        'dists = importlib.metadata.packages_distributions()',
        'print(json.dumps({m: dists.get(m, []) for m in sorted({k.split(".")[0] for k in sys.modules})}))',
    ])
    done = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    modules = json.loads(done.stdout)
    assert 'onnxruntime' in modules and 'numpy' in modules  # the check sees the third-party modules
    missing = {module: dists for module, dists in modules.items()
               if dists and not any(_canonical(d) in resolved or PROVIDED.match(_canonical(d)) for d in dists)}
    assert not missing, f'imported by the edge but not installed on a robot by requirements-robot.txt: {missing}'


# The edge's per-frame work without ROS, on ONNX Runtime, over real frames sent as JPEG: what the
# robot would decide, which patches SAGE sends and their bytes. Run by both interpreters.
ROBOT_FRAMES = """
import hashlib, json, os, sys
from types import SimpleNamespace
import cv2, numpy as np
from sage_ros.core.codec import encode_patches, extract_patches
from sage_ros.core.gate import gate_score
from sage_ros.core.onnx_edge import load_onnx_edge
from sage_ros.core.preprocess import normalize
from sage_ros.core.selection import select_sage
from sage_ros.commands.images import list_images, read_rgb
from sage_ros.ros.ros_image import decode_compressed, decode_short_side
model = load_onnx_edge(sys.argv[1], num_threads=1)
card = model.card
out = {'versions': [np.__version__, cv2.__version__], 'frames': []}
for item in list_images(os.path.join(sys.argv[2], 'images'))[::250][:5]:
    rgb = cv2.resize(read_rgb(item.path), (2048, 1536), interpolation=cv2.INTER_CUBIC)
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(rgb[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90])
    frame, _ = decode_compressed(SimpleNamespace(format='jpeg', data=buf.tobytes()),
                                 min_short_side=decode_short_side(card.input_size, card.crop_pct))
    crop, _ = card.crop(frame)
    edge = model.edge_outputs(normalize(crop, card.mean, card.std))[0]
    picks = select_sage(edge.attention, edge.embeddings, 32)
    payload = encode_patches(extract_patches(crop, picks), 'jpeg', quality=90)
    out['frames'].append({'shape': list(frame.shape), 'min_entropy': float(gate_score(edge.probs, 'min_entropy')),
                          'probs': edge.probs.tolist(), 'sage': picks.tolist(),
                          'payload': hashlib.sha256(payload).hexdigest()})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_the_robot_requirements_run_the_edge_as_the_workstation_does(tmp_path, imagenet_dir):
    # The robot's path as far as this machine goes: a venv, `pip install -r requirements-robot.txt`
    # (x86-64 wheels of the same pins; Python 3.11), then the edge's frame work in it. Not
    # --system-site-packages: here the base Python is no ROS Python, only other packages.
    onnx = tmp_path / 'edge.onnx'
    done = subprocess.run([sys.executable, '-m', 'sage_ros.cli', 'export-edge', '--weights', 'random:0',
                           '-o', str(onnx)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    robot = tmp_path / 'robot-venv'
    venv.create(robot, with_pip=True)
    python = str(robot / 'bin' / 'python')
    done = subprocess.run([python, '-m', 'pip', 'install', '--quiet', '-r', str(REQUIREMENTS)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, 'PYTHONPATH': str(REPO / 'sage_ros')}  # sage_ros from source, as colcon installs it
    results = {}
    for name, interpreter in (('robot', python), ('workstation', sys.executable)):
        done = subprocess.run([interpreter, '-c', ROBOT_FRAMES, str(onnx), str(imagenet_dir)], capture_output=True,
                              text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads(done.stdout)
    robot_run, here = results['robot'], results['workstation']
    print(f'robot venv: numpy {robot_run["versions"][0]}, OpenCV {robot_run["versions"][1]}; '
          f'here: numpy {here["versions"][0]}, OpenCV {here["versions"][1]}')
    assert robot_run['versions'][0] == _pins()['numpy']
    assert len(robot_run['frames']) == len(here['frames']) == 5
    for a, b in zip(robot_run['frames'], here['frames']):
        assert a['shape'] == b['shape'] == [768, 1024, 3]  # decoded at 1/2
        assert a['sage'] == b['sage'] and a['payload'] == b['payload']
        assert abs(a['min_entropy'] - b['min_entropy']) < 1e-6
        assert max(abs(x - y) for x, y in zip(a['probs'], b['probs'])) < 1e-6
