# SPDX-License-Identifier: Apache-2.0
"""What a robot pays: the robot figures of ``sage-ros bench --robot``.

- Resident memory of each process kind of ``sage-ros up`` (the supervisor, the router, the
  cloud node, the edge node on torch and on ONNX Runtime), and whether it maps torch, read
  from ``/proc`` as ``top`` would; targets: router and supervisor <= 150 MB.
- The cost of one 12 MP JPEG camera frame (decode, then the model's resize and crop), decoded
  at full size (as before) and at the reduced scale the edge now decodes it at.
- The camera's results per second while such frames arrive on the compressed camera topic at
  1 and 5 Hz beside a 5 fps camera (an outsider's frames, or a second camera).

Printed, never asserted: the figures depend on the machine. ``tests`` use the process helpers
(:class:`UpProcess`, :func:`torch_libraries`) to check from outside that the light processes
map no torch.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

MB = 1e6
# Resident memory targets (issue 18): the processes that run no model.
RSS_TARGET_MB = {'supervisor': 150.0, 'router': 150.0}
# What a Raspberry Pi HQ camera sends at full resolution (12.3 MP).
FRAME_12MP = (4056, 3040)
# Rows of the memory table, in this order.
KINDS = ('supervisor', 'router', 'cloud', 'edge (torch)', 'edge (onnxruntime)')
# The supervisor's line once every process it started is ready.
_UP_RUNNING = re.compile(r'^sage-ros up: .* running')


# --- processes seen from outside ------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process (VmRSS of /proc/PID/status); None if it is gone."""
    try:
        for line in Path(f'/proc/{pid}/status').read_text().splitlines():
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def torch_libraries(pid: int) -> list[str]:
    """The torch shared libraries (libtorch*.so: libtorch_cpu, libtorch_python, ...) mapped
    into a process, from /proc/PID/maps: what loading torch leaves, whatever imported it."""
    found = set()
    for line in Path(f'/proc/{pid}/maps').read_text().splitlines():
        fields = line.split(maxsplit=5)  # address perms offset dev inode [path]
        if len(fields) == 6 and os.path.basename(fields[5]).startswith('libtorch'):
            found.add(fields[5])
    return sorted(found)


def child_pids(pid: int) -> list[int]:
    """Direct children of a process (from each /proc/N/stat's parent id)."""
    out = []
    for stat in Path('/proc').glob('[0-9]*/stat'):
        try:
            fields = stat.read_text().rpartition(')')[2].split()
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def node_kind(pid: int) -> str | None:
    """'router', 'cloud' or 'edge' for a process running a sage_ros node (``-m MODULE``)."""
    from sage_ros.nodes.launch_plan import NODES

    try:
        argv = Path(f'/proc/{pid}/cmdline').read_bytes().split(b'\0')
    except OSError:
        return None
    modules = {module.encode(): key for key, (_, module) in NODES.items()}
    return next((modules[a] for a in argv if a in modules), None)


def sage_ros_command() -> list[str]:
    """How to run ``sage-ros`` as a user would: the console script beside this Python, else
    ``python -m sage_ros.cli``."""
    script = Path(sys.executable).with_name('sage-ros')
    return [str(script)] if script.is_file() else [sys.executable, '-m', 'sage_ros.cli']


class UpProcess:
    """``sage-ros up ARGS`` as a process of its own, as a user starts it: :meth:`wait_running`
    returns once it says every node runs, :meth:`nodes` gives its children by kind, and
    :meth:`stop` ends it as Ctrl-C would (its children with it)."""

    def __init__(self, args: list[str], *, log: TextIO | None = None, env: dict[str, str] | None = None) -> None:
        self.argv = [*sage_ros_command(), 'up', *args]
        self._env = {**os.environ, **(env or {}), 'PYTHONUNBUFFERED': '1'}
        self._log = log
        self.lines: list[str] = []
        self._running = threading.Event()
        self.popen: subprocess.Popen | None = None
        self._children: list[int] = []

    def start(self) -> UpProcess:
        self.popen = subprocess.Popen(self.argv, env=self._env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1)
        threading.Thread(target=self._read, args=(self.popen,), daemon=True).start()
        return self

    def _read(self, popen: subprocess.Popen) -> None:
        assert popen.stdout is not None
        for line in popen.stdout:
            line = line.rstrip('\n')
            self.lines.append(line)
            if self._log is not None:
                print(line, file=self._log, flush=True)
            if _UP_RUNNING.match(line):
                self._running.set()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def wait_running(self, timeout: float = 180.0) -> None:
        """Until the supervisor says its nodes run; RuntimeError (with its last lines) if it
        ends first or ``timeout`` passes."""
        assert self.popen is not None
        end = time.monotonic() + timeout
        while not self._running.wait(0.2):
            if self.popen.poll() is not None or time.monotonic() > end:
                why = 'ended' if self.popen.returncode is not None else f'not running after {timeout:.0f} s'
                raise RuntimeError(f'{" ".join(self.argv)} {why}:\n' + '\n'.join(self.lines[-15:]))
        self._children = child_pids(self.pid)

    def nodes(self) -> dict[str, int]:
        """The supervisor's children by kind ('router', 'cloud', 'edge') -> pid."""
        return {kind: pid for pid in self._children if (kind := node_kind(pid)) is not None}

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGINT, as Ctrl-C; SIGKILL to it and to the children it started if it does not end."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pid in self._children:  # each runs in a session of its own: not in our group
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return self.popen.returncode

    def __enter__(self) -> UpProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def footprint(pid: int) -> dict[str, Any]:
    """Resident memory (MB) and the torch libraries mapped, of one process."""
    rss = rss_bytes(pid)
    return {'pid': pid, 'rss_mb': None if rss is None else rss / MB, 'torch': torch_libraries(pid)}


def process_memory(*, edge_onnx: Path | None = None, log: TextIO | None = None,
                   emit: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Resident memory of each process kind of ``sage-ros up`` once everything runs (models
    loaded, one warm-up pass): ``--side both`` with random weights (the edge on torch), then,
    with ``edge_onnx``, ``--side edge`` with that exported model (the edge on ONNX Runtime).
    One row per kind, in :data:`KINDS` order."""
    from sage_ros.commands.bringup import isolate_dds
    from sage_ros.commands.system_demo import free_port

    isolate_dds()
    rows: dict[str, dict[str, Any]] = {}
    endpoint = f'tcp/127.0.0.1:{free_port()}'
    runs = [('torch', ['--side', 'both', '-p', 'weights:=random', '-p', f'zenoh_listen:={endpoint}',
                       '-p', f'zenoh_connect:={endpoint}'])]
    if edge_onnx is not None:
        runs.append(('onnxruntime', ['--side', 'edge', '-p', f'sage_edge.weights:={edge_onnx}',
                                     '-p', f'zenoh_connect:={endpoint}']))
    for edge_runtime, args in runs:
        emit(f'sage-ros up {" ".join(args)} ...')
        with UpProcess(args, log=log) as up:
            up.wait_running()
            rows.setdefault('supervisor', {'kind': 'supervisor', **footprint(up.pid)})
            for kind, pid in up.nodes().items():
                kind = f'edge ({edge_runtime})' if kind == 'edge' else kind
                rows.setdefault(kind, {'kind': kind, **footprint(pid)})
    return [rows[k] for k in KINDS if k in rows]


def format_memory(rows: list[dict[str, Any]]) -> str:
    lines = ['resident memory of each process kind of sage-ros up (after start-up and one warm-up pass):']
    by_kind = {r['kind']: r for r in rows}
    for r in rows:
        target = RSS_TARGET_MB.get(r['kind'])
        verdict = '' if target is None else f'  target <= {target:.0f} MB: {"met" if r["rss_mb"] <= target else "MISSED"}'
        if r['kind'] == 'edge (onnxruntime)' and 'edge (torch)' in by_kind:
            verdict = f'  {r["rss_mb"] / by_kind["edge (torch)"]["rss_mb"]:.2f}x the torch edge (target <= 0.3x)'
        torch = f'maps torch: {len(r["torch"])} libtorch libraries' if r['torch'] else 'no torch'
        lines.append(f'  {r["kind"]:<20} {r["rss_mb"]:8.1f} MB  ({torch}){verdict}')
    return '\n'.join(lines)


# --- a 12 MP JPEG frame ----------------------------------------------------------------------
def camera_jpeg(images_dir: Path, size: tuple[int, int] = FRAME_12MP, *, quality: int = 90,
                tiles: int = 8) -> bytes:
    """A ``size`` JPEG of real photographs at their own resolution (``tiles`` x ``tiles`` of
    them, detail at every scale as in a camera frame), at ``quality``."""
    import cv2

    from sage_ros.bench.pipeline import camera_frames

    w, h = size
    cells = camera_frames(images_dir, tiles * tiles, (w // tiles, h // tiles))
    rows = [np.concatenate(cells[r * tiles:(r + 1) * tiles], axis=1) for r in range(tiles)]
    frame = np.concatenate(rows, axis=0)
    ok, buf = cv2.imencode('.jpg', np.ascontiguousarray(frame[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError('OpenCV could not encode the frame')
    return buf.tobytes()


def jpeg_frame_cost(data: bytes, *, input_size: int, crop_pct: float, repeat: int = 7) -> dict[str, Any]:
    """Median seconds to turn one compressed frame into the model's crop, decoded at full size
    (before) and at the scale the edge decodes it at (after)."""
    from types import SimpleNamespace

    from sage_ros.core.preprocess import resize_crop
    from sage_ros.ros.ros_image import decode_compressed, decode_short_side

    msg = SimpleNamespace(format='jpeg', data=data)
    out: dict[str, Any] = {'bytes': len(data)}
    for name, side in (('full', 0), ('reduced', decode_short_side(input_size, crop_pct))):
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            rgb, size = decode_compressed(msg, min_short_side=side)
            resize_crop(rgb, input_size=input_size, crop_pct=crop_pct)
            times.append(time.perf_counter() - t0)
        out[name] = {'s': float(np.median(times)), 'decoded': rgb.shape[1::-1], 'size': size}
    return out


def format_jpeg_cost(cost: dict[str, Any]) -> str:
    full, reduced = cost['full'], cost['reduced']
    w, h = full['size']
    return (f'one {w}x{h} JPEG frame ({cost["bytes"] / MB:.2f} MB), decode + the model\'s resize and crop: '
            f'full size {full["s"] * 1e3:.0f} ms; reduced (decoded at {reduced["decoded"][0]}x{reduced["decoded"][1]}) '
            f'{reduced["s"] * 1e3:.0f} ms ({full["s"] / reduced["s"]:.1f}x faster)')


# --- the camera while large JPEG frames arrive ------------------------------------------------
def camera_under_jpeg_frames(
    jpeg: bytes,
    *,
    rates_hz: tuple[float, ...] = (0.0, 1.0, 5.0),
    camera_fps: float = 5.0,
    seconds: float = 10.0,
    images_dir: Path | None = None,
    overrides: dict[str, Any] | None = None,
    log: TextIO | None = None,
    emit: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """An edge node (random weights, nothing offloaded, no router) with its camera at
    ``camera_fps`` on the raw topic, while ``jpeg`` arrives on the compressed topic at each of
    ``rates_hz`` for ``seconds``: the camera's results per second and the longest gap between
    two of them, and how many of the JPEG frames got a result."""
    from sage_ros.commands.bringup import Bringup, isolate_dds, plan
    from sage_ros.bench.pipeline import ETA_NOTHING, _client_class, camera_frames, default_images_dir
    from sage_ros.commands.system_demo import free_port

    isolate_dds()
    import rclpy
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CompressedImage

    compressed_topic = 'camera/image_raw/compressed'
    ov = {'weights': 'random', 'eta': ETA_NOTHING, 'compressed_image_topic': compressed_topic,
          'zenoh_connect': f'tcp/127.0.0.1:{free_port()}', **(overrides or {})}  # nothing listens there
    bring = Bringup(plan('edge', overrides=ov), log=log)
    context = rclpy.Context()
    rclpy.init(context=context)
    client = None
    rows = []
    try:
        bring.start()
        frames = camera_frames(images_dir or default_images_dir(), 8)
        bring.wait_ready()
        client = _client_class()(name='sage_robot_bench', context=context)
        big = client.create_publisher(CompressedImage, '/' + compressed_topic,
                                      QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE))
        if not client.wait_for_edge():
            raise RuntimeError('the edge node did not subscribe to the camera topic')
        msg = CompressedImage(format='jpeg', data=jpeg)
        for rate in rates_hz:
            emit(f'camera at {camera_fps:g} fps, {len(jpeg) / MB:.1f} MB JPEG frames at {rate:g} Hz for {seconds:g} s ...')
            camera: set[int] = set()
            big_sent: set[int] = set()
            t0 = time.monotonic()
            events = [(k / camera_fps, 'camera') for k in range(int(seconds * camera_fps))]
            if rate > 0:
                events += [(0.1 + k / rate, 'jpeg') for k in range(int(seconds * rate))]
            for at, kind in sorted(events):
                client.spin_until(t0 + at)
                if kind == 'camera':
                    camera.add(client.publish(frames[len(camera) % len(frames)], encoding='bgr8'))
                else:
                    msg.header.stamp = client.get_clock().now().to_msg()
                    big.publish(msg)
                    big_sent.add(msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec)
            published_s = time.monotonic() - t0
            # The results of what was published: every handled frame gets one, the last ones
            # within a few frame times once the node caught up.
            quiet_end = time.monotonic() + 15.0
            while time.monotonic() < quiet_end and time.monotonic() - max(client.last_result_at, t0 + published_s) < 2.0:
                client.spin_until(time.monotonic() + 0.05)
            arrivals = sorted(at for stamp, at in client.arrived.items() if stamp in camera)
            gaps = np.diff([t0, *arrivals]) if arrivals else np.array([published_s])
            rows.append({'rate_hz': rate, 'seconds': published_s, 'camera_published': len(camera),
                         'camera_results': len(arrivals), 'camera_results_per_s': len(arrivals) / published_s,
                         'max_gap_s': float(gaps.max()), 'jpeg_published': len(big_sent),
                         'jpeg_results': sum(s in client.arrived for s in big_sent)})
            if bring.dead():
                raise RuntimeError(bring.failure(bring.dead()[0]))
        return rows
    finally:
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
        bring.stop()


def format_camera_rows(rows: list[dict[str, Any]], camera_fps: float) -> str:
    lines = [f'the camera ({camera_fps:g} fps, raw) while 12 MP JPEG frames arrive on the compressed topic:']
    for r in rows:
        lines.append(f'  JPEG at {r["rate_hz"]:g} Hz: camera results {r["camera_results_per_s"]:.2f}/s '
                     f'({r["camera_results"]} of {r["camera_published"]}), longest gap {r["max_gap_s"]:.2f} s; '
                     f'JPEG frames answered {r["jpeg_results"]} of {r["jpeg_published"]}')
    return '\n'.join(lines)


def run_robot_bench(images_dir: Path | None = None, *, edge_onnx: Path | None = None, seconds: float = 10.0,
                    log: TextIO | None = None, emit: Callable[[str], None] = print) -> dict[str, Any]:
    """All the robot figures, printed as they come; ``edge_onnx`` None exports the edge model
    (random weights) with ``sage-ros export-edge`` into a temporary folder first."""
    from sage_ros.bench.pipeline import default_images_dir
    from sage_ros.params import load_params

    images_dir = images_dir or default_images_dir()
    edge = load_params('sage_edge')
    import timm  # the model's own input size and crop ratio, as the edge takes them

    cfg = timm.get_pretrained_cfg(edge['model'])
    input_size, crop_pct = int(cfg.input_size[-1]), float(edge['crop_pct'] or cfg.crop_pct)
    jpeg = camera_jpeg(images_dir)
    cost = jpeg_frame_cost(jpeg, input_size=input_size, crop_pct=crop_pct)
    emit(format_jpeg_cost(cost))
    camera_fps = 5.0
    camera = camera_under_jpeg_frames(jpeg, camera_fps=camera_fps, seconds=seconds, images_dir=images_dir,
                                      log=log, emit=emit)
    emit(format_camera_rows(camera, camera_fps))
    tmp = None
    try:
        if edge_onnx is None:
            tmp = Path(tempfile.mkdtemp(prefix='sage_ros_bench_'))
            edge_onnx = tmp / 'edge.onnx'
            emit('exporting the edge model (random weights) for the ONNX Runtime edge ...')
            subprocess.run([*sage_ros_command(), 'export-edge', '--weights', 'random:0', '-o', str(edge_onnx)],
                           check=True, stdout=subprocess.DEVNULL)
        memory = process_memory(edge_onnx=edge_onnx, log=log, emit=emit)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    emit(format_memory(memory))
    return {'jpeg_cost': cost, 'camera': camera, 'memory': memory}
