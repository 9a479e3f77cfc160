# SPDX-License-Identifier: Apache-2.0
"""``sage-ros demo``: bring the system up, replay real images on the camera topic, report."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sage_ros.commands.bringup import Bringup, isolate_dds, plan
from sage_ros.commands.images import ImageReader, LabeledImage, format_skipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def isolated_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Pick a free loopback port for the demo's own router unless endpoints were given."""
    out = dict(overrides)
    if not any(k.endswith(('zenoh_listen', 'zenoh_connect')) for k in out):
        endpoint = f'tcp/127.0.0.1:{free_port()}'
        out['zenoh_listen'] = endpoint
        out['zenoh_connect'] = endpoint
    return out


class SystemStartError(ConnectionError):
    """A node of the demo's system could not start; the message (one line) says which and why."""


def run_system_demo(
    images: list[LabeledImage],
    overrides: dict[str, Any],
    *,
    directory: Path | None = None,
    edge_params: dict[str, Any],
    emit: Callable[[str], None] = print,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Bring up router, cloud and edge; publish each image and print its OffloadResult."""
    isolate_dds(directory)
    import rclpy

    from sage_ros.core.labels import class_name
    from sage_ros.ros.live_client import SOURCE_NAMES, LiveClient

    overrides = isolated_overrides(overrides)
    log = open(log_path, 'w') if log_path else None  # noqa: SIM115 - closed below
    bring = Bringup(plan('both', directory=directory, overrides=overrides), log=log, directory=directory)
    emit(f'bringing up router, cloud and edge (ROS_DOMAIN_ID={os.environ["ROS_DOMAIN_ID"]}, '
         f'Zenoh {overrides.get("zenoh_listen", "from config")}) ...')
    context = rclpy.Context()
    rclpy.init(context=context)
    client = None
    try:
        bring.start()
        try:
            bring.wait_ready()
        except (RuntimeError, TimeoutError) as exc:  # its own one line: which node ended, and why
            raise SystemStartError(str(exc)) from None
        client = LiveClient(image_topic=edge_params['image_topic'],
                            result_topic='/' + edge_params['result_topic'].lstrip('/'), context=context)
        client.require_edge(30.0)
        emit(f'publishing {len(images)} frames on {edge_params["image_topic"]}')
        # answer: who labelled the frame (edge, cloud, fallback); H: the edge's min-entropy (the gate's
        # default score); sent: the request's patches (p) and bytes; detail: e.g. why it fell back.
        emit(f'{"image":<28} {"answer":<8} {"H bits":>6} {"sent":>16} {"latency":>8}  label (confidence)'
             '  [detail; truth]  request id')
        rows = []
        timeout = edge_params['deadline_ms'] / 1e3 + 30.0
        reader = ImageReader(images, emit=emit)
        for item, rgb in reader:
            res = client.classify(rgb, timeout=timeout)
            if res is None:
                emit(f'{item.path.name:<28} NO RESULT within {timeout:.0f} s')
                rows.append((item, None))
                continue
            src = SOURCE_NAMES.get(res.source, '?')
            sent = f'{res.patches_sent} p {res.bytes_sent} B' if res.patches_sent else '-'
            notes = [res.detail] if res.detail else []
            if item.label is not None:
                notes.append(f'truth {class_name(item.label)!r}')
            emit(f'{item.path.name:<28} {src:<8} {res.min_entropy:>6.2f} {sent:>16} {res.latency_ms:>5.0f} ms  '
                 f'{res.label_name!r} ({res.confidence:.3f})  {"[" + "; ".join(notes) + "]  " if notes else ""}'
                 f'{res.request_id}')
            rows.append((item, res))
        summary = summarize(rows)
        summary['skipped'] = list(reader.skipped)
        emit(format_summary(summary, random_weights=any(r is not None and r.random_weights for _, r in rows)))
        return summary
    finally:
        if client is not None:
            client.destroy_node()
        rclpy.try_shutdown(context=context)
        bring.stop()
        if log:
            log.close()


def summarize(rows: list[tuple[LabeledImage, Any]]) -> dict[str, Any]:
    got = [r for _, r in rows if r is not None]
    off = [r for r in got if r.patches_sent > 0]
    labelled = [(i, r) for i, r in rows if r is not None and i.label is not None]
    return {
        'frames': len(rows),
        'results': len(got),
        'edge': sum(r.source == 0 for r in got),
        'cloud': sum(r.source == 1 for r in got),
        'fallback': sum(r.source == 2 for r in got),
        'bytes_per_request': [r.bytes_sent for r in off],
        'patches_per_request': [r.patches_sent for r in off],
        'latency_edge_ms': [r.latency_ms for r in got if r.patches_sent == 0],
        'latency_offloaded_ms': [r.latency_ms for r in off],
        'accuracy': (float(np.mean([r.label == i.label for i, r in labelled])) if labelled else None),
    }


def _pct(values: list[float]) -> str:
    if not values:
        return 'n/a'
    return f'p50 {np.percentile(values, 50):.0f} ms, p95 {np.percentile(values, 95):.0f} ms'


def format_summary(s: dict[str, Any], *, random_weights: bool) -> str:
    lines = [f'summary: {s["frames"]} frames, {s["results"]} results: {s["edge"]} edge, {s["cloud"]} cloud, '
             f'{s["fallback"]} fallback']
    skipped = format_skipped(s.get('skipped', ()))
    if skipped:
        lines.append(skipped)
    if s['bytes_per_request']:
        b = np.array(s['bytes_per_request'])
        p = np.array(s['patches_per_request'])
        lines.append(f'  per offloaded request: {p.mean():.1f} patches (max {p.max()}), '
                     f'{b.mean():.0f} B (max {b.max()})')
    lines.append(f'  latency, kept on the edge: {_pct(s["latency_edge_ms"])}; offloaded: {_pct(s["latency_offloaded_ms"])}')
    if s['accuracy'] is not None:
        lines.append(f'  accuracy on labelled frames: {s["accuracy"]:.3f}')
    if random_weights:
        lines.append('  (random weights: labels and accuracy are meaningless)')
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit('use: sage-ros demo')
