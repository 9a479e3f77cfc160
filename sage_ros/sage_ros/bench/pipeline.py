# SPDX-License-Identifier: Apache-2.0
"""Does the edge keep its frame rate while requests are out? The pipeline benchmark.

Brings up the router and the cloud node (DeiT-Base), a :class:`DelayRelay` in front of the
router (the uplink's latency), and the edge node connecting through it; publishes real
640x480 bgr8 frames at a camera rate for a while, once with nothing offloaded (eta 20) and
once with a third of the frames offloaded (eta calibrated on the same frames), and reports
per setting how many frames the edge handled, result latencies by source, the edge's own
counters, its in-flight window and the CPU each process took. With random weights every
frame is uncertain, hence the calibration: eta is the 2/3 quantile of the gate score of the
frames used, computed here with the edge's own model and preprocessing.

``sage-ros bench --pipeline`` or ``python -m sage_ros.bench.pipeline`` run it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from sage_ros.bench.delay_relay import DelayRelay

# Results by OffloadResult.source.
SOURCES = {0: 'edge', 1: 'cloud', 2: 'fallback'}
FRAME_SIZE = (640, 480)
ETA_NOTHING = 20.0  # above any min-entropy of 1000 classes (log2 1000 = 9.97 bits)
# The edge's link status carries these once the edge pipelines its requests.
WINDOW_KEYS = ('in_flight', 'max_in_flight')
_CLK_TCK = os.sysconf('SC_CLK_TCK')


def default_images_dir() -> Path:
    """$SAGE_ROS_DATA/images (the ImageNet subset), as the tests use."""
    data = os.environ.get('SAGE_ROS_DATA', str(Path(__file__).resolve().parents[3].parent / 'shared' / 'data'
                                               / 'imagenet-val-1300'))
    return Path(data) / 'images'


def camera_frames(images_dir: Path, n: int, size: tuple[int, int] = FRAME_SIZE) -> list[np.ndarray]:
    """``n`` real images spread over the folder, resized to ``size`` (w, h), RGB uint8."""
    import cv2

    from sage_ros.commands.images import list_images, read_rgb

    items = list_images(images_dir)
    if not items:
        raise FileNotFoundError(f'no images in {images_dir}')
    picks = [items[i] for i in np.linspace(0, len(items) - 1, num=min(n, len(items))).astype(int)]
    return [cv2.resize(read_rgb(i.path), size, interpolation=cv2.INTER_AREA) for i in picks]


def gate_scores(frames: list[np.ndarray], edge_params: dict[str, Any]) -> np.ndarray:
    """The edge node's gate score of each frame, with its model, weights, crop and metric.

    ``weights: random`` is ``random:0`` both here and in the node (load_vit's default seed).
    """
    import torch

    from sage_ros.core import edge_forward, gate_score, load_vit, normalize

    p = edge_params
    vit = load_vit(p['model'], p['weights'], device=p['device'])
    scores = []
    with torch.inference_mode():
        for rgb in frames:
            crop, _ = vit.crop(rgb, p['crop_pct'])
            probs = edge_forward(vit, normalize(crop, vit.mean, vit.std))[0].probs
            scores.append(gate_score(probs, p['gate_metric']))
    return np.array(scores)


def calibrate_eta(scores: np.ndarray, offload_share: float) -> float:
    """The threshold that offloads ``offload_share`` of the frames (offload when score >= eta)."""
    if not 0.0 < offload_share < 1.0:
        raise ValueError(f'offload_share must be in (0, 1), got {offload_share}')
    return float(np.quantile(scores, 1.0 - offload_share))


# --- process CPU ---------------------------------------------------------------------------
def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (all its threads) so far; None if it is gone."""
    try:
        fields = Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def process_nice(pid: int) -> int | None:
    """Niceness of a process's main thread; None if it is gone."""
    try:
        return int(Path(f'/proc/{pid}/stat').read_text().rpartition(')')[2].split()[16])
    except OSError:
        return None


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the machine, all cores, from /proc/stat."""
    values = [int(v) for v in Path('/proc/stat').read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])  # user nice system idle iowait irq softirq steal
    return (total - values[3] - values[4]) / _CLK_TCK, total / _CLK_TCK


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {'n': 0, 'p50': None, 'p95': None}
    return {'n': len(values), 'p50': float(np.percentile(values, 50)), 'p95': float(np.percentile(values, 95))}


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _client_class() -> type:
    """LiveClient plus arrival times and the /diagnostics reports (imported late: rclpy)."""
    from diagnostic_msgs.msg import DiagnosticArray

    from sage_ros.ros.live_client import LiveClient, stamp_ns

    class BenchClient(LiveClient):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.arrived: dict[int, float] = {}
            self.last_result_at = 0.0
            # status name -> (arrival time, key/values); link samples for the window occupancy
            self.diagnostics: dict[str, tuple[float, dict[str, float | str]]] = {}
            self.link_samples: list[tuple[float, dict[str, float | str]]] = []
            self.create_subscription(DiagnosticArray, '/diagnostics', self._on_diagnostics, 50)

        def _on_result(self, msg: Any) -> None:
            now = time.monotonic()
            super()._on_result(msg)
            self.arrived[stamp_ns(msg.header.stamp)] = self.last_result_at = now

        def _on_diagnostics(self, msg: Any) -> None:
            now = time.monotonic()
            for st in msg.status:
                values = {kv.key: _number(kv.value) for kv in st.values}
                self.diagnostics[st.name] = (now, values)
                if st.name.endswith(': link') and 'sage_edge' in st.name:
                    self.link_samples.append((now, values))

        def spin_until(self, t: float) -> None:
            """Handle callbacks until monotonic time ``t`` (no 20 ms overshoot as in drain)."""
            while (left := t - time.monotonic()) > 0:
                self._executor.spin_once(timeout_sec=left)

        def fresh_report(self, name: str, after: float, timeout: float = 4.0) -> dict[str, float | str] | None:
            """Key/values of the first report of status ``name`` that arrives after ``after``."""
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                got = self.diagnostics.get(name)
                if got is not None and got[0] > after:
                    return got[1]
                self._executor.spin_once(timeout_sec=0.05)
            return None

    return BenchClient


def set_edge_eta(client: Any, eta: float) -> None:
    """Set the running edge node's eta through its parameter services (as `ros2 param set` does)."""
    from rclpy.parameter import Parameter
    from rclpy.parameter_client import AsyncParameterClient

    params = AsyncParameterClient(client, 'sage_edge')
    if not params.wait_for_services(timeout_sec=10.0):
        raise RuntimeError('the edge node offers no parameter services')
    future = params.set_parameters([Parameter('eta', value=float(eta))])
    client.spin_until_future_complete(future, timeout=10.0)
    result = future.result()
    if result is None or not result.results[0].successful:
        raise RuntimeError(f'setting eta={eta} on the edge failed: {result}')


def _counter_deltas(before: dict | None, after: dict | None) -> dict[str, int] | None:
    if before is None or after is None:
        return None
    return {k: int(v - before.get(k, 0)) for k, v in after.items() if isinstance(v, float)}


def _add_counters(total: dict[str, int] | None, more: dict[str, int] | None) -> dict[str, int] | None:
    if total is None or more is None:
        return None
    return {k: total.get(k, 0) + more.get(k, 0) for k in {*total, *more}}


def _measure(client: Any, eta: float, frames: list[np.ndarray], *, seconds: float, fps: float,
             deadline_s: float, pids: dict[str, int], before: tuple[dict | None, dict | None] | None = None
             ) -> dict[str, Any]:
    """One round: publish for ``seconds`` at ``fps`` with the edge at ``eta``; what was seen.

    ``before``: the (edge, cloud) counters at the start, if known (the last round's end).
    """
    set_edge_eta(client, eta)
    if before is None:
        t = time.monotonic()
        before = client.fresh_report('/sage_edge: stats', t), client.fresh_report('/sage_cloud: stats', t)
    edge_before, cloud_before = before
    cpu_before = {k: process_cpu_s(pid) for k, pid in pids.items()}
    machine_before = machine_cpu_s()[0]
    sent: dict[int, float] = {}
    period = 1.0 / fps
    t0 = next_t = time.monotonic()
    end = t0 + seconds
    i = 0
    while next_t < end:
        client.spin_until(next_t)
        sent[client.publish(frames[i % len(frames)], encoding='bgr8')] = time.monotonic()
        i += 1
        next_t += period
        # Behind by more than a frame (a loaded host): skip the slot rather than burst.
        if time.monotonic() > next_t + period:
            next_t = time.monotonic()
    published_s = time.monotonic() - t0
    cpu_after = {k: process_cpu_s(pid) for k, pid in pids.items()}
    machine_busy = machine_cpu_s()[0] - machine_before
    load = os.getloadavg()[0]
    link = [v for at, v in client.link_samples if t0 <= at <= t0 + published_s]
    _drain(client, t0 + published_s, deadline_s=deadline_s)
    t = time.monotonic()
    edge_after = client.fresh_report('/sage_edge: stats', t)
    cloud_after = client.fresh_report('/sage_cloud: stats', t)
    return {
        'after': (edge_after, cloud_after),
        'sent': sent, 'seconds': published_s, 'link': link, 'loadavg': load, 'machine_busy_s': machine_busy,
        'results': [r for r in client.all_results if _stamp(r) in sent],
        'cpu_s': {k: None if cpu_before[k] is None or cpu_after[k] is None else cpu_after[k] - cpu_before[k]
                  for k in pids},
        'edge_counters': _counter_deltas(edge_before, edge_after),
        'cloud_counters': _counter_deltas(cloud_before, cloud_after),
    }


def _summarize(client: Any, name: str, eta: float, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of one setting over its rounds."""
    secs = sum(r['seconds'] for r in rounds)
    sent = {k: v for r in rounds for k, v in r['sent'].items()}
    results = [x for r in rounds for x in r['results']]
    link = [v for r in rounds for v in r['link']]
    by_source: dict[str, list] = {s: [r for r in results if SOURCES.get(r.source) == s] for s in SOURCES.values()}
    window = {k: [float(v[k]) for v in link if isinstance(v.get(k), float)] for k in WINDOW_KEYS}
    cpu: dict[str, float | None] = {}
    for proc in rounds[0]['cpu_s']:
        used = [r['cpu_s'][proc] for r in rounds]
        cpu[proc] = None if None in used else sum(used) / secs
    edge_counters: dict[str, int] | None = {}
    cloud_counters: dict[str, int] | None = {}
    for r in rounds:
        edge_counters = _add_counters(edge_counters, r['edge_counters'])
        cloud_counters = _add_counters(cloud_counters, r['cloud_counters'])
    return {
        'setting': name,
        'eta': eta,
        'rounds': len(rounds),
        'seconds': secs,
        'published': len(sent),
        'published_fps': len(sent) / secs,
        'results': len(results),
        'handled_per_s': len(results) / secs,
        'handled_share': len(results) / max(1, len(sent)),
        'by_source': {s: len(rs) for s, rs in by_source.items()},
        'latency_ms': {s: _percentiles([r.latency_ms for r in rs]) for s, rs in by_source.items()},
        'e2e_ms': {s: _percentiles([(client.arrived[_stamp(r)] - sent[_stamp(r)]) * 1e3 for r in rs
                                    if _stamp(r) in client.arrived]) for s, rs in by_source.items()},
        'details': dict(Counter(r.detail for r in results if r.detail)),
        'edge_counters': edge_counters,
        'cloud_counters': cloud_counters,
        'in_flight': ({'mean': float(np.mean(window['in_flight'])), 'max': float(np.max(window['in_flight'])),
                       'max_in_flight': (window['max_in_flight'][-1] if window['max_in_flight'] else None),
                       'samples': len(window['in_flight'])} if window['in_flight'] else None),
        'cpu_cores': cpu,
        'machine_busy_cores': sum(r['machine_busy_s'] for r in rounds) / secs,
        'cores': os.cpu_count(),
        'loadavg_1m': max(r['loadavg'] for r in rounds),
    }


def _drain(client: Any, since: float, *, deadline_s: float, quiet_s: float = 0.5) -> None:
    """Collect the last results: every frame is answered within the deadline of its arrival,
    so wait until results stopped for ``quiet_s`` and the edge reports nothing in flight (or,
    from an edge that does not report it, until the deadline passed)."""
    hard_end = since + deadline_s + quiet_s
    while (now := time.monotonic()) < hard_end:
        if now - max(client.last_result_at, since) >= quiet_s:
            after = [v for at, v in client.link_samples if at > since]
            if after and after[-1].get('in_flight') == 0.0:
                return
        client.spin_until(now + 0.05)


def _stamp(result: Any) -> int:
    return int(result.header.stamp.sec) * 10**9 + int(result.header.stamp.nanosec)


def _pinned(argv: list[str], cpus: list[int]) -> list[str]:
    """``argv`` exec'd on ``cpus`` only (threads started later inherit the affinity)."""
    boot = 'import os, sys; os.sched_setaffinity(0, {%s}); os.execv(sys.argv[1], sys.argv[1:])' % ','.join(
        str(c) for c in cpus)
    return [sys.executable, '-c', boot, *argv]


def run_pipeline_bench(
    images_dir: Path | None = None,
    *,
    seconds: float = 20.0,
    fps: float = 30.0,
    delay_ms: float = 100.0,
    budget: int = 16,
    offload_share: float = 1 / 3,
    n_images: int = 48,
    rounds: int = 2,
    cloud_nice: int = 10,
    cloud_threads: int = 0,
    edge_threads: int = 0,
    split_cores: bool = False,
    overrides: dict[str, Any] | None = None,
    directory: Path | None = None,
    log: TextIO | None = None,
    emit: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run both settings (nothing offloaded, ``offload_share`` offloaded) and return the figures.

    Each setting gets ``seconds`` of frames in total, in ``rounds`` alternating rounds.
    ``cloud_nice``: the cloud node runs at this niceness. In a deployment it has a machine of
    its own; here it gets the CPU the edge leaves, so its compute does not count against the
    edge's frame rate (0: an equal share, the contention of one shared host).

    ``split_cores``: the cloud side (router, cloud) and this process (camera, relay) are pinned
    to the last CPU and the edge to the others, like two machines (needs 2 CPUs or more).

    ``overrides`` are ROS parameters as for ``sage-ros up`` (e.g. ``{'max_in_flight': 4}``);
    ``cloud_threads`` / ``edge_threads`` are the nodes' torch threads (0: torch's default);
    ``log`` receives the nodes' output (None: discarded).
    """
    from sage_ros.commands.bringup import Bringup, isolate_dds, plan
    from sage_ros.params import load_params
    from sage_ros.commands.system_demo import free_port

    if rounds < 1 or seconds <= 0 or fps <= 0:
        raise ValueError('rounds must be >= 1, seconds and fps > 0')
    isolate_dds(directory)
    import rclpy

    began = time.monotonic()

    def say(text: str) -> None:
        emit(f'[{time.monotonic() - began:5.1f} s] {text}')

    router_port = free_port()
    router_endpoint = f'tcp/127.0.0.1:{router_port}'
    relay = DelayRelay(free_port(), '127.0.0.1', router_port, delay_ms / 1e3)
    ov: dict[str, Any] = {
        'weights': 'random', 'budget_mode': 'fixed', 'budget': int(budget), 'eta': ETA_NOTHING,
        'zenoh_listen': router_endpoint, 'sage_cloud.zenoh_connect': router_endpoint,
        'sage_edge.zenoh_connect': relay.endpoint,
        'sage_cloud.num_threads': int(cloud_threads), 'sage_edge.num_threads': int(edge_threads),
        **(overrides or {}),
    }
    edge_params = load_params('sage_edge', directory=directory, overrides=ov)
    procs = plan('cloud', directory=directory, overrides=ov) + plan('edge', directory=directory, overrides=ov)
    cpus = sorted(os.sched_getaffinity(0))
    split = split_cores and len(cpus) >= 2
    for proc in procs:
        if split:
            proc.argv = _pinned(proc.argv, cpus[-1:] if proc.name in ('cloud', 'router') else cpus[:-1])
        if proc.name == 'cloud' and cloud_nice:
            proc.argv = ['nice', '-n', str(int(cloud_nice)), *proc.argv]  # nice execs: same pid
    bring = Bringup(procs, log=log, directory=directory)
    if split:
        # The camera and the relay (this process) are not the robot's classifier either.
        os.sched_setaffinity(0, cpus[-1:])
    context = rclpy.Context()
    rclpy.init(context=context)
    client = None
    try:
        relay.start()
        bring.start()
        say(f'router {router_endpoint}, edge through a relay at {relay.endpoint} ({delay_ms:g} ms each way); '
            f'calibrating eta on {n_images} frames while the nodes start ...')
        frames = camera_frames(images_dir or default_images_dir(), n_images)
        scores = gate_scores(frames, edge_params)
        eta = calibrate_eta(scores, offload_share)
        say(f'{edge_params["gate_metric"]} of the frames: min {scores.min():.4f}, max {scores.max():.4f}; '
            f'eta {eta:.6f} offloads {np.mean(scores >= eta):.0%} of them')
        bring.wait_ready()
        say('nodes ready')
        client = _client_class()(name='sage_pipeline_bench', context=context,
                                 image_topic=edge_params['image_topic'],
                                 result_topic='/' + edge_params['result_topic'].lstrip('/'))
        if not client.wait_for_edge():
            raise RuntimeError('the edge node did not subscribe to the camera topic')
        pids = {p.name: p.popen.pid for p in bring.procs if p.popen is not None}
        pids['bench'] = os.getpid()
        nice = {k: process_nice(pid) for k, pid in pids.items()}
        etas = {'nothing': ETA_NOTHING, 'third': eta}
        measured: dict[str, list[dict[str, Any]]] = {name: [] for name in etas}
        before = None
        # Alternating rounds: a change in the host's other load hits both settings alike.
        for k in range(rounds):
            for name, value in etas.items():
                say(f'round {k + 1}/{rounds}, setting {name!r}: eta {value:g}, {fps:g} fps for '
                    f'{seconds / rounds:g} s ...')
                got = _measure(client, value, frames, seconds=seconds / rounds, fps=fps,
                               deadline_s=edge_params['deadline_ms'] / 1e3, pids=pids, before=before)
                measured[name].append(got)
                before = got['after']
                if bring.dead():
                    raise RuntimeError(f'{bring.dead()[0].name} died during setting {name!r}')
        settings = {name: _summarize(client, name, etas[name], measured[name]) for name in etas}
        nothing, third = settings['nothing'], settings['third']
        p95_nothing = nothing['latency_ms']['edge']['p95']
        p95_third = third['latency_ms']['edge']['p95']
        return {
            'config': {'seconds': seconds, 'rounds': rounds, 'fps': fps, 'delay_ms': delay_ms, 'budget': budget,
                       'offload_share': offload_share, 'n_images': len(frames), 'cloud_nice': cloud_nice,
                       'cloud_threads': cloud_threads, 'split_cores': split,
                       'edge_threads': edge_threads, 'deadline_ms': edge_params['deadline_ms'],
                       'max_in_flight': edge_params.get('max_in_flight'), 'overrides': overrides or {}},
            'nice': nice,
            'eta_third': eta,
            'expected_offload_share': float(np.mean(scores >= eta)),
            'settings': settings,
            'ratio': (third['handled_per_s'] / nothing['handled_per_s']) if nothing['handled_per_s'] else None,
            'edge_p95_rise': (p95_third / p95_nothing) if p95_nothing and p95_third is not None else None,
            'relay': {'bytes_up': relay.stats.bytes_up, 'bytes_down': relay.stats.bytes_down,
                      'connections': relay.stats.accepted},
        }
    finally:
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
        bring.stop()
        relay.stop()
        if split:
            os.sched_setaffinity(0, cpus)


# --- report --------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = '.0f') -> str:
    return 'n/a' if value is None else format(value, spec)


def _lat(d: dict[str, Any]) -> str:
    return f'{_fmt(d["p50"])} / {_fmt(d["p95"])} (n={d["n"]})' if d['n'] else 'n/a'


def format_report(report: dict[str, Any]) -> str:
    """The figures as a small text table, one column per setting."""
    names = list(report['settings'])
    s = report['settings']
    rows: list[tuple[str, list[str]]] = [
        ('eta', [_fmt(s[n]['eta'], '.4f') for n in names]),
        ('frames published', [f'{s[n]["published"]} ({s[n]["published_fps"]:.1f}/s)' for n in names]),
        ('results (handled)', [str(s[n]['results']) for n in names]),
        ('handled per second', [f'{s[n]["handled_per_s"]:.2f}' for n in names]),
        ('handled share of published', [f'{s[n]["handled_share"]:.2f}' for n in names]),
    ]
    for key in ('received', 'dropped', 'processed', 'lost'):
        rows.append((f'edge {key}', [_fmt((s[n]['edge_counters'] or {}).get(key), 'd') for n in names]))
    rows.append(('results edge/cloud/fallback', ['/'.join(str(s[n]['by_source'][k]) for k in SOURCES.values())
                                                 for n in names]))
    for src in SOURCES.values():
        rows.append((f'latency {src} p50/p95 ms', [_lat(s[n]['latency_ms'][src]) for n in names]))
    for src in SOURCES.values():
        rows.append((f'end-to-end {src} p50/p95 ms', [_lat(s[n]['e2e_ms'][src]) for n in names]))
    rows.append(('fallback details', [', '.join(f'{k}: {v}' for k, v in sorted(s[n]['details'].items())) or '-'
                                      for n in names]))
    rows.append(('in flight mean/max (window)', [
        'n/a' if s[n]['in_flight'] is None else
        f'{s[n]["in_flight"]["mean"]:.2f}/{s[n]["in_flight"]["max"]:.0f} ({_fmt(s[n]["in_flight"]["max_in_flight"])})'
        for n in names]))
    rows.append(('cloud answered/shed', [
        f'{_fmt((s[n]["cloud_counters"] or {}).get("answered"), "d")}/'
        f'{_fmt((s[n]["cloud_counters"] or {}).get("shed"), "d")}' for n in names]))
    for proc in s[names[0]]['cpu_cores']:
        rows.append((f'cpu {proc} (cores, nice {_fmt(report["nice"].get(proc), "d")})', [_fmt(s[n]['cpu_cores'][proc], '.2f') for n in names]))
    rows.append(('machine busy (cores of n)', [f'{s[n]["machine_busy_cores"]:.2f} of {s[n]["cores"]}' for n in names]))
    rows.append(('load average 1 min (max)', [f'{s[n]["loadavg_1m"]:.2f}' for n in names]))
    width = max(len(r[0]) for r in rows)
    cols = [max(len(n), *(len(r[1][i]) for r in rows)) for i, n in enumerate(names)]
    c = report['config']
    lines = [f'pipeline bench: {c["fps"]:g} fps for {c["seconds"]:g} s per setting ({c["rounds"]} rounds), '
             f'relay {c["delay_ms"]:g} ms each way, budget {c["budget"]}, deadline {c["deadline_ms"]:g} ms, '
             f'max_in_flight {_fmt(c["max_in_flight"], "")}, cloud nice {c["cloud_nice"]}, '
             f'threads {c["cloud_threads"] or "default"}',
             f'{"":<{width}}  ' + '  '.join(f'{n:>{w}}' for n, w in zip(names, cols))]
    lines += [f'{label:<{width}}  ' + '  '.join(f'{v:>{w}}' for v, w in zip(values, cols)) for label, values in rows]
    lines.append(f'handled third/nothing: {_fmt(report["ratio"], ".3f")} (target >= 0.9); p95 latency of '
                 f'edge-kept frames third/nothing: {_fmt(report["edge_p95_rise"], ".2f")} (target <= 1.2)')
    return '\n'.join(lines)


def add_arguments(parser: argparse._ActionsContainer) -> None:
    """The benchmark's options (shared by ``sage-ros bench --pipeline`` and this module's main)."""
    parser.add_argument('--seconds', type=float, default=20.0, help='publishing time per setting (default 20)')
    parser.add_argument('--rounds', type=int, default=2,
                        help='alternating rounds the seconds are split into (default 2)')
    parser.add_argument('--fps', type=float, default=30.0, help='camera rate (default 30)')
    parser.add_argument('--delay-ms', type=float, default=100.0, help='uplink delay each way (default 100)')
    parser.add_argument('--budget', type=int, default=16, help='fixed budget B in patches (default 16)')
    parser.add_argument('--offload-share', type=float, default=1 / 3,
                        help='share of the frames the second setting offloads (default 1/3)')
    parser.add_argument('--n-frames', type=int, default=48, help='distinct images cycled through (default 48)')
    parser.add_argument('--cloud-nice', type=int, default=10,
                        help='niceness of the cloud node, which would have its own machine (default 10; '
                             '0: an equal share of this host)')
    parser.add_argument('--cloud-threads', type=int, default=0, help="cloud's torch threads (0: torch's default)")
    parser.add_argument('--split-cores', action='store_true',
                        help='pin the cloud side to the last CPU and the edge to the others, like two machines')
    parser.add_argument('--edge-threads', type=int, default=0, help="edge's torch threads (0: torch's default)")
    parser.add_argument('--json', type=Path, default=None, help='also write the figures to this JSON file')
    parser.add_argument('--log', type=Path, default=None, help="write the nodes' logs to this file")


def run_from_args(args: argparse.Namespace, images: Path | None, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run from parsed :func:`add_arguments` options; prints the table (and writes --json)."""
    log = args.log.open('w') if args.log else None
    try:
        report = run_pipeline_bench(images, seconds=args.seconds, fps=args.fps, delay_ms=args.delay_ms,
                                    budget=args.budget, offload_share=args.offload_share, n_images=args.n_frames,
                                    rounds=args.rounds, cloud_nice=args.cloud_nice,
                                    cloud_threads=args.cloud_threads, edge_threads=args.edge_threads,
                                    split_cores=args.split_cores,
                                    overrides=overrides, log=log)
    finally:
        if log is not None:
            log.close()
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    from sage_ros.params import parse_overrides

    parser = argparse.ArgumentParser(prog='python -m sage_ros.bench.pipeline', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='?', type=Path, default=None,
                        help='image folder (default $SAGE_ROS_DATA/images)')
    parser.add_argument('-p', '--param', action='append', default=[], metavar='NAME:=VALUE',
                        help='node parameter override, ROS style (e.g. -p max_in_flight:=4)')
    add_arguments(parser)
    args = parser.parse_args(argv)
    run_from_args(args, args.images, parse_overrides(args.param))
    return 0


if __name__ == '__main__':
    sys.exit(main())
