# SPDX-License-Identifier: Apache-2.0
"""What a new user meets (issue 21): a setting that cannot work is one line naming the cause,
before any model loads; nothing is silently overwritten; outputs explain themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import sage_ros.commands.bringup
import sage_ros.core.torch_models
import sage_ros.commands.demo
import sage_ros.eval.sweep
from sage_ros.cli import build_parser, main
from sage_ros.eval.bags import labeled_images_from_folder, read_results_bag, write_image_bag
from sage_ros.commands.images import ImageReader, LabeledImage
from sage_ros.core.preflight import UnusableSetting, check_device

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load or bring-up fails the test: the error must come before them."""
    def loaded(*args, **kwargs):
        raise AssertionError('a model was loaded (or the system brought up) before the error')

    monkeypatch.setattr(sage_ros.commands.demo, 'load_vit', loaded)
    monkeypatch.setattr(sage_ros.commands.demo, 'load_edge_model', loaded)
    monkeypatch.setattr(sage_ros.eval.sweep, 'load_vit', loaded)
    monkeypatch.setattr(sage_ros.core.torch_models, 'load_vit', loaded)
    monkeypatch.setattr(sage_ros.commands.bringup.Bringup, 'start', loaded)


@pytest.fixture(scope='module')
def bag(imagenet_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp('bags') / 'four'
    write_image_bag(labeled_images_from_folder(imagenet_dir / 'images', limit=4), path)
    return path


def one_line_error(capsys, command: str) -> str:
    """The one line ``command`` wrote to stderr."""
    return one_line_error_and_output(capsys, command)[0]


def one_line_error_and_output(capsys, command: str) -> tuple[str, str]:
    """The one line ``command`` wrote to stderr, and what it printed."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and 'Traceback' not in err, err
    assert err.startswith(f'sage-ros {command}: error: '), err
    return err, captured.out


@pytest.fixture
def no_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)


# --- item 2: the default weights and an unreachable hub ----------------------------------------

@pytest.fixture
def no_hub(monkeypatch):
    """A hub that cannot be reached, on any machine: nothing listens on port 9 of loopback."""
    monkeypatch.setenv('HF_ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)


def test_demo_with_the_default_hub_weights_and_no_hub_is_one_line_at_once(no_hub, no_model_loads, capsys):
    assert main(['demo', '--limit', '1']) == 2
    err = one_line_error(capsys, 'demo')
    assert "sage_edge weights: 'hub'" in err and 'cannot be reached' in err and '--weights random' in err


def test_a_node_with_hub_weights_and_no_hub_exits_2_with_one_line(no_hub, ros_env):
    env = dict(os.environ, HF_ENDPOINT='http://127.0.0.1:9')
    out = subprocess.run([sys.executable, '-m', 'sage_ros.nodes.edge_node', '--ros-args', '-p', 'weights:=hub',
                          '-p', 'transport:=ros'], env=env, capture_output=True, text=True, timeout=120)
    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2, text
    assert 'Traceback' not in text and 'cannot be reached' in text.splitlines()[-1], text


# --- item 3: one line, not a traceback ----------------------------------------------------------

def test_demo_with_a_missing_checkpoint_is_one_line_before_the_bring_up(no_model_loads, capsys):
    assert main(['demo', '--weights', 'random', '-p', 'sage_edge.weights:=/ckpt/missing.pth']) == 2
    err, out = one_line_error_and_output(capsys, 'demo')
    assert 'sage_edge weights' in err and '/ckpt/missing.pth' in err
    assert 'bringing up' not in out


def test_a_demo_whose_system_cannot_start_is_one_line(ros_env, capsys):
    # The router cannot listen there: it exits at once, and the demo says so, without a traceback.
    assert main(['demo', '--limit', '1', '--weights', 'random', '-p', 'sage_router.zenoh_listen:=garbage/1.2.3.4']) == 2
    err = one_line_error(capsys, 'demo')
    assert 'sage_router exited with code 2 before it was ready' in err and 'garbage/1.2.3.4' in err


def test_a_device_this_machine_lacks_is_one_line(no_gpu, no_model_loads, capsys):
    with pytest.raises(UnusableSetting, match="sage_cloud device: 'cuda' but"):
        check_device('sage_cloud device', 'cuda')
    with pytest.raises(UnusableSetting, match='not a torch device'):
        check_device('sage_edge device', 'quantum')
    check_device('sage_edge device', 'cpu')
    assert main(['demo', '--offline', '--weights', 'random', '-p', 'sage_cloud.device:=cuda']) == 2
    assert "sage_cloud device: 'cuda'" in one_line_error(capsys, 'demo')


def test_up_with_a_gpu_the_machine_lacks_exits_2_with_one_line_before_the_model_loads(ros_env):
    import torch

    # 'cuda' where there is no GPU (the README's case), else one GPU more than there are.
    device = f'cuda:{torch.cuda.device_count()}' if torch.cuda.is_available() else 'cuda'
    # A checkpoint that does not exist either: had the model started loading first, its error
    # would be the one reported.
    out = subprocess.run([sys.executable, '-m', 'sage_ros.cli', 'up', '--side', 'cloud', '-p',
                          f'sage_cloud.device:={device}', '-p', 'sage_cloud.weights:=/nonexistent/deit_base.pth'],
                         capture_output=True, text=True, timeout=170)
    assert out.returncode == 2, out.stderr
    assert 'Traceback' not in out.stderr
    fatal = [ln for ln in out.stderr.splitlines() if '[FATAL]' in ln]
    assert len(fatal) == 1 and f"sage_cloud device: '{device}'" in fatal[0], out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith('sage-ros up: sage_cloud exited with code 2 before it was ready: cannot start: '
                           f"sage_cloud device: '{device}'"), last


def test_replay_live_without_an_edge_says_so_within_the_wait(ros_env, bag, tmp_path, capsys):
    assert main(['replay', str(bag), '--live', '--wait-edge', '1', '-o', str(tmp_path / 'res')]) == 2
    err, out = one_line_error_and_output(capsys, 'replay')
    assert 'no edge node subscribed to /camera/image_raw within 1 s' in err
    assert 'waiting up to 1 s' in out
    assert not (tmp_path / 'res').exists()  # no empty result bag left behind


# --- item 6: arguments checked before anything loads ----------------------------------------------

def test_replay_with_a_missing_bag_fails_before_the_models_load(no_model_loads, tmp_path, capsys):
    assert main(['replay', str(tmp_path / 'nope'), '--weights', 'random']) == 2
    assert 'does not exist' in one_line_error(capsys, 'replay')


def test_eval_with_a_missing_bag_leaves_no_output_folder(no_model_loads, tmp_path, capsys):
    out = tmp_path / 'sweep'
    assert main(['eval', str(tmp_path / 'nope'), '--weights', 'random', '--out', str(out)]) == 2
    assert 'does not exist' in one_line_error(capsys, 'eval')
    assert not out.exists()


@pytest.mark.parametrize('args, cause', [
    (['--budgets', '0'], 'budgets must be 1 to 196'),
    (['--budgets', '32,400'], 'budgets must be 1 to 196'),
    (['--codecs', 'gif'], 'unknown codecs'),
    (['--prefilter-ratios', '0.5'], 'prefilter ratios must be >= 1'),
    (['--methods', 'telepathy'], 'unknown methods'),
    (['--quality', '0'], 'quality must be 1 to 100'),
    (['--limit', '-1'], 'limit must be >= 0'),
    (['--figures', '-2'], 'figures must be >= 0'),
    (['-p', 'sage_cloud.weights:=/ckpt/missing.pth'], 'sage_cloud weights'),
])
def test_eval_refuses_bad_arguments_before_the_edge_pass(no_model_loads, bag, tmp_path, capsys, args, cause):
    out = tmp_path / 'sweep'
    assert main(['eval', str(bag), '--weights', 'random', '--out', str(out), *args]) == 2
    assert cause in one_line_error(capsys, 'eval')
    assert not out.exists()


def test_demo_skips_and_counts_an_unreadable_image(imagenet_dir, tmp_path, capsys):
    folder = tmp_path / 'images'
    folder.mkdir()
    good = sorted((imagenet_dir / 'images').iterdir())[:2]
    (folder / 'a.JPEG').symlink_to(good[0])
    (folder / 'b_corrupt.JPEG').write_bytes(b'\xff\xd8\xff\xe0 not really a JPEG')
    (folder / 'c.JPEG').symlink_to(good[1])
    assert main(['demo', str(folder), '--offline', '--weights', 'random']) == 0
    out = capsys.readouterr().out
    assert 'b_corrupt.JPEG               skipped: cannot read image' in out
    assert 'summary: 2 frames' in out and 'skipped 1 unreadable image: b_corrupt.JPEG' in out
    assert out.index('c.JPEG') > out.index('b_corrupt.JPEG')  # the run went on after it


def test_the_image_reader_counts_what_it_skips(imagenet_dir, tmp_path):
    bad = tmp_path / 'empty.png'
    bad.write_bytes(b'')
    good = sorted((imagenet_dir / 'images').iterdir())[0]
    lines = []
    reader = ImageReader([LabeledImage(bad), LabeledImage(good, 3), LabeledImage(tmp_path / 'gone.jpg')],
                         emit=lines.append)
    frames = list(reader.frames())
    assert [(name, label) for name, _, label in frames] == [(good.name, 3)]
    assert reader.skipped == ['empty.png', 'gone.jpg'] and len(lines) == 2


# --- item 4: an output folder holds one sweep -----------------------------------------------------

def test_eval_refuses_another_sweep_in_the_same_folder_and_leaves_nothing_stale(bag, tmp_path, capsys):
    out = tmp_path / 'sweep'
    common = ['eval', str(bag), '--weights', 'random', '--methods', 'sage,attention_topk', '--eta', '1',
              '--limit', '2', '--no-progress', '--out', str(out)]
    assert main([*common, '--budgets', '16', '--figures', '1']) == 0
    csv_before = (out / 'results.csv').read_text()
    assert list((out / 'figures').glob('figure_*.png'))
    capsys.readouterr()
    # Other settings: refused, one line naming what differs; the results stay.
    assert main([*common, '--budgets', '16,32']) == 2
    err = one_line_error(capsys, 'eval')
    assert 'holds a sweep with other settings (budgets 16 there, 16,32 now)' in err and '--cache' in err
    assert (out / 'results.csv').read_text() == csv_before
    # The same settings again (a resume): accepted; the figures it was not asked for are gone.
    assert main([*common, '--budgets', '16']) == 0
    assert not (out / 'figures').exists()
    recorded = json.loads((out / 'sweep.json').read_text())
    assert recorded['settings']['budgets'] == [16] and 'results.csv' in recorded['outputs']
    assert not any('figure' in name for name in recorded['outputs'])


def test_eval_refuses_a_folder_with_results_it_did_not_record(bag, tmp_path, no_model_loads, capsys):
    (tmp_path / 'results.csv').write_text('method,budget\n')
    assert main(['eval', str(bag), '--weights', 'random', '--out', str(tmp_path)]) == 2
    assert 'settings are not recorded' in one_line_error(capsys, 'eval')


# --- item 5: ./dev keeps the caller's directory -------------------------------------------------

def test_dev_runs_commands_where_they_were_typed(imagenet_dir, tmp_path):
    dev = str(REPO / 'dev')
    env = {k: v for k, v in os.environ.items() if k not in ('VIRTUAL_ENV',)}
    where = subprocess.run([dev, 'python', '-c', 'import os; print(os.getcwd())'], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip() == str(tmp_path), where.stderr
    image = sorted((imagenet_dir / 'images').iterdir())[0]
    made = subprocess.run([dev, 'sage-ros', 'bag', str(image.parent), '--limit', '1', '-o', 'relative_bag'],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    assert (tmp_path / 'relative_bag' / 'metadata.yaml').is_file()
    # The test suite still runs from the root, wherever it is started.
    tests = subprocess.run([dev, 'test', '--noconftest', '--collect-only', '-q', 'sage_ros/test/test_msgs.py'],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert tests.returncode == 0 and 'tests collected' in tests.stdout, tests.stdout + tests.stderr


# --- item 7: outputs that explain themselves ------------------------------------------------------

def test_help_shows_the_defaults():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == 'command').choices
    ev, replay = sub['eval'].format_help(), sub['replay'].format_help()
    flat = ' '.join(ev.split())
    assert '(default: 32,48,64,96)' in flat and '(default: sage,attention_topk,random,uniform_grid)' in flat
    assert '(default: 1.0)' in ' '.join(replay.split()) and '--namespace' in replay
    for text in (ev, replay, sub['demo'].format_help(), sub['bag'].format_help()):
        assert '(default: None)' not in text and '(default: False)' not in text and '(default: [])' not in text


def test_certs_summary_lists_every_file_it_wrote(tmp_path, capsys):
    out = tmp_path / 'deploy'
    assert main(['certs', '--robots', 'robot1,robot2', '--cloud-host', '127.0.0.1', '--out', str(out)]) == 0
    printed = {line.split()[-1] for line in capsys.readouterr().out.splitlines() if line.startswith('  ')}
    written = {str(p) for p in out.iterdir()}
    assert printed == written and len(written) == 17


class _FakeEdge:
    """An 'edge node' in namespace robot1 answering every camera frame with a scripted result."""

    def __init__(self, answers):
        import rclpy
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sage_ros_msgs.msg import OffloadResult
        from sensor_msgs.msg import Image

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = Node('sage_edge', namespace='/robot1', context=self.context)
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        pub = self.node.create_publisher(OffloadResult, 'sage/result', qos)
        script = iter(answers)

        def answer(img: Image) -> None:
            source, detail = next(script)
            pub.publish(OffloadResult(header=img.header, source=source, detail=detail, label=1, label_name='x'))

        self.node.create_subscription(Image, 'camera/image_raw', answer, qos)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(5)


def test_replay_live_finds_a_namespaced_edge_and_counts_fallback_reasons(ros_env, bag, tmp_path, capsys):
    from sage_ros_msgs.msg import OffloadResult

    fb = OffloadResult.SOURCE_EDGE_FALLBACK
    edge = _FakeEdge([(OffloadResult.SOURCE_EDGE, ''), (fb, 'window full'), (fb, 'no uplink'), (fb, 'window full')])
    try:
        # Without the namespace, the line says where an edge does listen.
        assert main(['replay', str(bag), '--live', '--wait-edge', '3']) == 2
        err = one_line_error(capsys, 'replay')
        assert 'no edge node subscribed to /camera/image_raw' in err and '/robot1/camera/image_raw' in err
        assert main(['replay', str(bag), '--live', '--namespace', 'robot1', '--rate', '0', '--wait-edge', '10',
                     '-o', str(tmp_path / 'res')]) == 0
    finally:
        edge.stop()
    out = capsys.readouterr().out
    assert 'replaying 4 frames onto /robot1/camera/image_raw' in out
    assert '4 results (1 edge, 0 cloud, 3 fallback: 2 window full, 1 no uplink)' in out
    assert len(read_results_bag(tmp_path / 'res')) == 4


def _sweep_data(accuracy: float):
    """Report rows of a sweep over budgets 16 and 48 whose accuracies are all ``accuracy``."""
    from sage_ros.eval.sweep import SweepConfig, SweepData

    cfg = SweepConfig(methods=['sage', 'random'], budgets=[16, 48], etas=[1.0])
    rows = [{'method': m, 'budget': b, 'eta': 1.0, 'codec': 'jpeg', 'quality': 90, 'prefilter_ratio': 2.0,
             'offloaded_accuracy': accuracy, 'coverage_7x7': 0.5, 'mean_bytes': 100.0 * b, 'offloaded': 8,
             'frames': 8, 'offload_rate': 1.0, 'edge_accuracy': accuracy, 'acc_low_attention_entropy': accuracy,
             'acc_high_attention_entropy': accuracy} for m in cfg.methods for b in cfg.budgets]
    rows.append({**rows[0], 'method': 'all_patches', 'budget': 196, 'codec': 'raw'})
    data = SweepData(cfg, [], [object()] * 8, {}, 'random:0', 'random:1', Path('bag'), {})
    return rows, data


@pytest.mark.parametrize('accuracy', [0.0, 0.5, 1.0])
def test_plots_say_weights_and_frames_and_keep_legend_and_range_sensible(accuracy):
    import matplotlib.pyplot as plt

    from sage_ros.eval.report import plots

    rows, data = _sweep_data(accuracy)
    for name, fig in plots(rows, data).items():
        ax = fig.axes[0]
        title = ax.get_title()
        assert '8 frames' in title and 'edge random:0' in title and 'server random:1' in title, title
        lo, hi = ax.get_ylim()
        if 'accuracy' in name:  # every value equal: a readable window around it, within 0..100
            assert hi - lo >= 10 and -1 < lo <= 100 * accuracy <= hi < 101, (name, lo, hi)
        if 'budget' in name:
            assert list(ax.get_xticks()) == [16, 48]
            assert [t.get_text() for t in ax.get_xticklabels()] == ['16', '48']
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1, name  # beside the axes, not on the data
        plt.close(fig)
