# SPDX-License-Identifier: Apache-2.0
"""Each process imports what it uses: the router, the ``sage-ros`` CLI and the ``sage-ros up``
supervisor (and the edge on ONNX Runtime) load no torch, timm or torchvision; the cloud, which
runs the server model, does. Checked from outside, on running processes: /proc/PID/maps must
map no libtorch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sage_ros.bench.robot import MB, UpProcess, rss_bytes, sage_ros_command, torch_libraries
from sage_ros.commands.system_demo import free_port

HEAVY = ('torch', 'timm', 'torchvision')


def test_the_light_modules_import_no_torch():
    # What the router, the CLI (its parser: every subcommand's options), the supervisor and the
    # robot's frame handling import, in a fresh interpreter; then a torch-backed name of the
    # core, which must bring torch in (so the check sees torch when it is there).
    code = '\n'.join([
        'import sys',
        'import sage_ros.cli, sage_ros.commands.bringup, sage_ros.nodes.launch_plan, sage_ros.nodes.router_node, sage_ros.ros.ros_image',
        'import sage_ros.core.gate, sage_ros.core.selection, sage_ros.core.link, sage_ros.core.rounds',
        'from sage_ros.core import SageError, CropMap, check_frame_geometry, gate_score, select_sage',
        'sage_ros.cli.build_parser()',
        f'print(sorted(m for m in {HEAVY!r} if m in sys.modules))',
        'from sage_ros.core import load_vit',
        f'print(sorted(m for m in {HEAVY!r} if m in sys.modules))',
    ])
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    light, heavy = out.stdout.splitlines()
    assert light == '[]', light
    assert 'torch' in heavy and 'timm' in heavy, heavy


def test_sage_ros_runs_where_torch_cannot_be_imported(tmp_path):
    # As on a robot without torch: torch, timm and torchvision shadowed by packages that refuse
    # to import. The CLI's help, and the help of `up`, still work.
    for name in HEAVY:
        (tmp_path / name).mkdir()
        (tmp_path / name / '__init__.py').write_text(f'raise ImportError("{name} is not installed here")\n')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [str(tmp_path), os.environ.get('PYTHONPATH')]))}
    for args in (['--help'], ['up', '--help']):
        out = subprocess.run([*sage_ros_command(), *args], capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert 'usage: sage-ros' in out.stdout
    # The shadowing works: the torch models cannot load.
    out = subprocess.run([sys.executable, '-c', 'from sage_ros.core import load_vit'], capture_output=True,
                         text=True, timeout=120, env=env)
    assert out.returncode != 0 and 'is not installed here' in out.stderr


@pytest.fixture(scope='module')
def edge_onnx(tmp_path_factory):
    """The edge model exported as on a workstation, with ``sage-ros export-edge``."""
    out = tmp_path_factory.mktemp('export') / 'edge.onnx'
    done = subprocess.run([*sage_ros_command(), 'export-edge', '--weights', 'random:0', '-o', str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return out


def _cloud_side(fixture) -> list[str]:
    endpoint = f'tcp/127.0.0.1:{free_port()}'
    # DeiT-Tiny as the server model: a lighter cloud, the same torch.
    return ['--side', 'cloud', '-p', 'weights:=random', '-p', 'sage_cloud.model:=deit_tiny_patch16_224',
            '-p', f'zenoh_listen:={endpoint}', '-p', f'zenoh_connect:={endpoint}']


def _onnx_edge(fixture) -> list[str]:
    return ['--side', 'edge', '-p', f'sage_edge.weights:={fixture("edge_onnx")}',
            '-p', f'zenoh_connect:=tcp/127.0.0.1:{free_port()}']  # no router there: the edge boots without


# Each case: its `sage-ros up` arguments (from the fixtures it needs), and for each process
# kind it runs, whether that process maps torch.
CASES = {
    'cloud side': (_cloud_side, {'supervisor': False, 'router': False, 'cloud': True}),
    'edge on ONNX Runtime': (_onnx_edge, {'supervisor': False, 'edge': False}),
}


@pytest.mark.parametrize('case', list(CASES))
def test_each_process_of_sage_ros_up_maps_torch_only_where_a_torch_model_runs(ros_env, tmp_path, request, case):
    make_args, expect = CASES[case]
    with (tmp_path / 'up.log').open('w') as log, UpProcess(make_args(request.getfixturevalue), log=log) as up:
        up.wait_running()
        pids = {'supervisor': up.pid, **up.nodes()}
        assert set(pids) == set(expect), pids
        for kind, pid in pids.items():
            rss = rss_bytes(pid)
            print(f'{case}: {kind} (pid {pid}) VmRSS {rss / MB:.1f} MB')
            assert bool(torch_libraries(pid)) == expect[kind], (kind, torch_libraries(pid))
