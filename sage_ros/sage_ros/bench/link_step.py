# SPDX-License-Identifier: Apache-2.0
"""A link-step experiment: shape the uplink in steps while frames flow, record what the
bandwidth monitor does, and plot it.

``python -m sage_ros.bench.link_step`` runs on the robot side (beside the edge node): for each
phase it sets the egress rate of ``--device`` with ``tc tbf`` (root, a network namespace the
caller made) and publishes frames, one at a time or as a camera at ``--fps``, recording per
frame the budget, bytes, latency and source, and every BudgetStatus. The records go to a
JSON-lines file.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from sage_ros.commands.images import list_images, read_rgb


def parse_phases(text: str) -> list[tuple[str, int, bool]]:
    """'8mbit:20,24kbit:8+' -> [('8mbit', 20, False), ('24kbit', 8, True)]. A trailing '+' (camera
    mode): the phase lasts at least that long, then until the edge suspends offloading, at most
    SUSPEND_WAIT times as long (how soon evidence of a dead link adds up is the machine's)."""
    out = []
    for part in text.split(','):
        rate, _, n = part.partition(':')
        until = n.strip().endswith('+')
        out.append((rate.strip(), int(n.strip().rstrip('+')), until))
    return out


SUSPEND_WAIT = 6


def rate_bps(rate: str) -> float:
    """tc rate text to bits per second."""
    units = {'kbit': 1e3, 'mbit': 1e6, 'gbit': 1e9, 'bit': 1.0}
    for unit, mult in units.items():
        if rate.endswith(unit):
            return float(rate[: -len(unit)]) * mult
    raise ValueError(f'unknown rate {rate!r}')


def shape(device: str, rate: str) -> None:
    """Token bucket on the egress of ``device``: ``rate``, a burst of a few packets."""
    burst = max(4000, int(rate_bps(rate) / 8 / 250))  # tbf needs >= rate/HZ bytes
    subprocess.run(['tc', 'qdisc', 'replace', 'dev', device, 'root', 'tbf', 'rate', rate,
                    'burst', str(burst), 'latency', '2s'], check=True)


def run(images_dir: Path, phases: list[tuple[str, int, bool]], device: str, out: Path, *, period_s: float = 0.3,
        timeout_s: float = 10.0, fps: float = 0.0) -> None:
    """Step the link through ``phases`` while frames flow, recording each frame's result.

    ``fps`` 0: one frame at a time (each waits for its result, then ``period_s``), phases
    counted in frames. ``fps`` > 0: a camera at that rate that never waits, the edge pipelining
    its requests, phases counted in seconds.
    """
    import rclpy
    from sage_ros_msgs.msg import BudgetStatus

    from sage_ros.ros.live_client import LiveClient

    context = rclpy.Context()
    rclpy.init(context=context)
    client = LiveClient(name='sage_link_step', context=context)
    statuses: list[dict[str, Any]] = []
    t0 = time.monotonic()
    client.create_subscription(BudgetStatus, '/sage/budget', lambda m: statuses.append(
        {'kind': 'budget', 't': time.monotonic() - t0, 'budget': m.budget, 'throughput_bps': m.throughput_bps,
         'suspended': m.suspended, 'misses': m.deadline_misses}), 10)
    frames = [read_rgb(i.path) for i in list_images(images_dir, limit=12)]
    records: list[dict[str, Any]] = []
    sent: list[tuple[int, int, float, str]] = []  # (stamp, phase, t, rate) of every published frame

    def record(res: Any, phase: int, rate: str, t: float) -> None:
        records.append({'kind': 'frame', 't': t, 'phase': phase, 'rate_bps': rate_bps(rate),
                        'budget': res.budget_patches if res else -1,
                        'patches': res.patches_sent if res else -1, 'bytes': res.bytes_sent if res else -1,
                        'latency_ms': res.latency_ms if res else -1.0, 'source': res.source if res else -1,
                        'detail': res.detail if res else 'no result'})

    try:
        if not client.wait_for_edge():
            raise RuntimeError('no edge node')
        k = 0
        for phase, (rate, n, until_suspended) in enumerate(phases):
            shape(device, rate)
            began = time.monotonic()
            records.append({'kind': 'phase', 't': began - t0, 'phase': phase, 'rate_bps': rate_bps(rate)})
            if fps > 0:
                end = began + n
                last = began + n * SUSPEND_WAIT if until_suspended else end

                def suspended() -> bool:  # for a second already: frames then carry it in their results
                    now = time.monotonic() - t0
                    return any(st['suspended'] and began - t0 < st['t'] < now - 1.0 for st in statuses)

                while time.monotonic() < end or (time.monotonic() < last and not suspended()):
                    due = time.monotonic() + 1.0 / fps
                    sent.append((client.publish(frames[k % len(frames)]), phase, time.monotonic() - t0, rate))
                    k += 1
                    client.drain(max(0.0, due - time.monotonic()))
                continue
            for _ in range(n):
                start = time.monotonic()
                res = client.classify(frames[k % len(frames)], timeout=timeout_s)
                k += 1
                record(res, phase, rate, time.monotonic() - t0)
                client.drain(max(0.0, period_s - (time.monotonic() - start)))
        client.drain(timeout_s if fps > 0 else 0.5)
        # Camera mode: frames the edge dropped as stale (newest-frame slot) have no result.
        for stamp, phase, t, rate in sent:
            if stamp in client.results:
                record(client.results[stamp], phase, rate, t)
        if fps > 0:
            records.append({'kind': 'camera', 'published': len(sent), 'results': len(client.all_results),
                            'fps': fps})
    finally:
        with Path(out).open('w') as fh:
            for rec in records + statuses:
                fh.write(json.dumps(rec) + '\n')
        client.destroy_node()
        rclpy.try_shutdown(context=context)


def load(path: Path) -> tuple[list[dict], list[dict]]:
    """(frame records in time order, BudgetStatus records)."""
    recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    frames = sorted((r for r in recs if r['kind'] == 'frame'), key=lambda r: r['t'])
    return frames, [r for r in recs if r['kind'] == 'budget']


def plot(path: Path, png: Path, *, deadline_ms: float | None = None) -> Path:
    """Link rate, estimated throughput and B over time."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    frames, statuses = load(path)
    t = np.array([f['t'] for f in frames])
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(7, 7), sharex=True)
    ax1.step(t, [f['rate_bps'] / 1e3 for f in frames], where='post', label='link rate (tc tbf)')
    ax1.plot([s['t'] for s in statuses], [s['throughput_bps'] * 8 / 1e3 for s in statuses], '.-',
             label='estimated throughput')
    ax1.set_yscale('log')
    ax1.set_ylabel('kbit/s')
    ax1.legend(fontsize=8)
    ax2.step(t, [f['budget'] for f in frames], where='post', label='budget B')
    sent = [f for f in frames if f['patches'] > 0]  # camera mode: most frames send nothing
    ax2.plot([f['t'] for f in sent], [f['patches'] for f in sent], '.', label='patches sent')
    ax2.set_ylabel('patches')
    ax2.legend(fontsize=8)
    lat = np.array([f['latency_ms'] for f in frames])
    miss = np.array([f['detail'] == 'timeout' for f in frames])
    ax3.plot(t[~miss], lat[~miss], '.', label='answered')
    ax3.plot(t[miss], lat[miss], 'rx', label='deadline miss (fallback)')
    if deadline_ms:
        ax3.axhline(deadline_ms, color='grey', ls='--', label='deadline')
    ax3.set_ylabel('latency ms')
    ax3.set_xlabel('time s')
    ax3.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('images', type=Path)
    parser.add_argument('--device', required=True, help='network device whose egress is shaped')
    parser.add_argument('--phases', type=parse_phases, required=True, help='RATE:FRAMES,... e.g. 8mbit:20,400kbit:25 (camera mode: seconds; RATE:S+ lasts until offloading is suspended)')
    parser.add_argument('--out', type=Path, required=True)
    parser.add_argument('--period', type=float, default=0.3, help='seconds between frames (one at a time)')
    parser.add_argument('--fps', type=float, default=0.0,
                        help='camera rate; phases then count seconds and frames do not wait for results')
    args = parser.parse_args(argv)
    run(args.images, args.phases, args.device, args.out, period_s=args.period, fps=args.fps)
    return 0


if __name__ == '__main__':
    sys.exit(main())
