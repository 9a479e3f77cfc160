# SPDX-License-Identifier: Apache-2.0
import shutil

import pytest

from sage_ros.cli import main


def test_demo_on_real_images(imagenet_dir, tmp_path, capsys):
    folder = tmp_path / 'images'
    folder.mkdir()
    for p in sorted((imagenet_dir / 'images').iterdir())[:3]:
        (folder / p.name).symlink_to(p)
    shutil.copy(imagenet_dir / 'labels.csv', tmp_path / 'labels.csv')
    rc = main(['demo', str(folder), '--offline', '--weights', 'random', '-p', 'budget_mode:=fixed', '-p', 'budget:=32',
                '-p', 'codec:=png'])
    out = capsys.readouterr().out
    assert rc == 0
    assert 'random weights' in out
    assert out.count('OFFLOAD 32 patches') == 3  # random weights are never confident
    assert 'summary: 3 frames, 3 offloaded' in out
    assert 'accuracy on 3 labelled frames' in out


def test_demo_keeps_confident_frames_on_the_edge(capsys):
    # eta above log2(1000) bits: nothing is uncertain enough to offload.
    assert main(['demo', '--offline', '--limit', '2', '--weights', 'random', '-p', 'eta:=11.0']) == 0
    out = capsys.readouterr().out
    assert out.count('keep edge label') == 2 and 'OFFLOAD' not in out


def test_demo_refuses_unloadable_weights(tmp_path, capsys):
    assert main(['demo', '--offline', '--weights', str(tmp_path / 'nope.pth')]) == 2
    assert 'checkpoint file' in capsys.readouterr().err


def test_help_everywhere(capsys):
    for argv in (['--help'], ['demo', '--help']):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert 'weights' in capsys.readouterr().out


def test_demo_runs_the_ros_system_on_real_images(imagenet_dir, tmp_path, capsys):
    """The README's main job: bring-up, camera replay, one printed result per frame, summary."""
    folder = tmp_path / 'images'
    folder.mkdir()
    for p in sorted((imagenet_dir / 'images').iterdir())[10:13]:
        (folder / p.name).symlink_to(p)
    log = tmp_path / 'nodes.log'
    rc = main(['demo', str(folder), '--weights', 'random', '-p', 'eta:=9.0', '--log', str(log)])
    out = capsys.readouterr().out
    assert rc == 0, out + log.read_text()
    lines = [ln for ln in out.splitlines() if ln.startswith('ILSVRC2012_val_')]
    assert len(lines) == 3 and not any('NO RESULT' in ln for ln in lines)
    assert 'summary: 3 frames, 3 results' in out and 'latency' in out
    # Random weights put min-entropy near 9 bits: with eta=9 some frames stay, some go.
    assert all((' edge ' in ln) or (' cloud ' in ln) for ln in lines)
    assert 'ready:' in log.read_text()
