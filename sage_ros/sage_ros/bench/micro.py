# SPDX-License-Identifier: Apache-2.0
"""``sage-ros bench``: speed and size figures of the core on real images (not a test)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch

from sage_ros.core import (
    METHODS,
    decode_patches,
    edge_forward,
    encode_patches,
    extract_patches,
    load_vit,
    normalize,
    select,
    server_forward_subset,
)
from sage_ros.commands.images import list_images, read_rgb
from sage_ros.commands.system_demo import free_port

BUDGETS = (32, 48, 64, 96)


def _median_ms(fn: Callable[[], object], repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)


def run_bench(
    images_dir: Path,
    *,
    n_images: int = 50,
    repeat: int = 20,
    edge_model: str = 'deit_tiny_patch16_224',
    server_model: str = 'deit_base_patch16_224',
    weights: str = 'random',
    emit: Callable[[str], None] = print,
) -> dict[str, float]:
    """Measure and print; returns the headline figures by name."""
    tiny = load_vit(edge_model, weights)
    base = load_vit(server_model, weights)
    items = list_images(images_dir)
    items = items[:: max(1, len(items) // n_images)][:n_images]
    crops = [tiny.crop(read_rgb(it.path))[0] for it in items]
    emit(f'{len(crops)} real images from {images_dir}; weights {tiny.weights}; torch threads {torch.get_num_threads()}')
    figures: dict[str, float] = {}

    x0 = normalize(crops[0], tiny.mean, tiny.std)
    edge_ms = _median_ms(lambda: edge_forward(tiny, x0), repeat)
    figures['edge_forward_ms'] = edge_ms
    emit(f'edge forward ({edge_model}, batch 1): {edge_ms:.1f} ms')
    outs = [edge_forward(tiny, normalize(c, tiny.mean, tiny.std))[0] for c in crops]

    emit('selection ms (median over images) by budget:')
    emit('  ' + f'{"method":<20}' + ''.join(f'B={b:<8}' for b in BUDGETS))
    params = {'attention_threshold': {'delta': 0.0}, 'attention_sum': {'delta_sum': 1.0}}
    for method in METHODS:
        row = []
        for b in BUDGETS:
            per = [_median_ms(lambda o=o: select(method, o.attention, o.embeddings, b, **params.get(method, {})),
                              max(3, repeat // 4), warmup=1) for o in outs]
            row.append(float(np.median(per)))
            figures[f'select_{method}_B{b}_ms'] = row[-1]
        emit('  ' + f'{method:<20}' + ''.join(f'{v:<10.3f}' for v in row))
    sage96 = figures['select_sage_B96_ms']
    emit(f'  SAGE at B=96: {sage96:.3f} ms = {100 * sage96 / edge_ms:.2f}% of the edge forward '
         f'(targets: < 1 ms, < 2%)')

    emit('codec per request (median over images; selection = SAGE):')
    emit(f'  {"codec":<10}{"B":>4}{"bytes":>9}{"encode ms":>11}{"decode ms":>11}')
    for codec, q in (('raw', 0), ('png', 0), ('jpeg', 75), ('jpeg', 90)):
        for b in BUDGETS:
            sizes, enc, dec = [], [], []
            for c, o in zip(crops, outs):
                p = extract_patches(c, select('sage', o.attention, o.embeddings, b))
                data = encode_patches(p, codec, quality=q or 90)
                sizes.append(len(data))
                enc.append(_median_ms(lambda: encode_patches(p, codec, quality=q or 90), 3, 1))
                dec.append(_median_ms(lambda: decode_patches(data, codec, b), 3, 1))
            name = f'{codec}{q or ""}'
            figures[f'bytes_{name}_B{b}'] = float(np.median(sizes))
            emit(f'  {name:<10}{b:>4}{np.median(sizes):>9.0f}{np.median(enc):>11.3f}{np.median(dec):>11.3f}')
    whole = [len(cv2.imencode('.jpg', c[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 75])[1]) for c in crops]
    figures['bytes_whole_frame_jpeg75'] = float(np.median(whole))
    emit(f'  reference: whole 224x224 frame as JPEG q=75: {np.median(whole):.0f} B')

    emit(f'server forward ({server_model}, batch 1) on a subset of patches:')
    xb = torch.from_numpy(normalize(crops[0], base.mean, base.std))
    patches = xb.unfold(1, 16, 16).unfold(2, 16, 16).permute(1, 2, 0, 3, 4).reshape(196, 3, 16, 16)
    full_ms = _median_ms(lambda: server_forward_subset(base, patches, torch.arange(196)), max(5, repeat // 2))
    figures['server_B196_ms'] = full_ms
    for b in BUDGETS:
        idx = torch.from_numpy(select('sage', outs[0].attention, outs[0].embeddings, b))
        ms = _median_ms(lambda: server_forward_subset(base, patches[idx], idx), max(5, repeat // 2))
        figures[f'server_B{b}_ms'] = ms
        emit(f'  B={b:<4} {ms:7.1f} ms  ({full_ms / ms:.2f}x faster than 196)')
    emit(f'  B=196  {full_ms:7.1f} ms   (target: B=64 at least 2.5x faster: '
         f'{full_ms / figures["server_B64_ms"]:.2f}x)')
    figures.update(run_transport_bench(crops, outs, emit=emit))
    return figures


def run_transport_bench(crops: list, outs: list, *, budgets: tuple[int, ...] = (32, 96), repeat: int = 3,
                        emit: Callable[[str], None] = print) -> dict[str, float]:
    """Transport alone, one way: serialize PatchSet + Zenoh put through a router on 127.0.0.1 +
    deserialize at the subscriber. Same process and clock, so no clock offset enters."""
    import threading

    import zenoh
    from rclpy.serialization import deserialize_message, serialize_message
    from sage_ros_msgs.msg import PatchSet

    from sage_ros.core import Budget, SelectionConfig, plan_offload

    port = free_port()
    endpoint = f'tcp/127.0.0.1:{port}'

    def conf(mode: str) -> zenoh.Config:
        c = zenoh.Config()
        c.insert_json5('mode', f'"{mode}"')
        c.insert_json5('listen/endpoints' if mode == 'router' else 'connect/endpoints', f'["{endpoint}"]')
        c.insert_json5('scouting/multicast/enabled', 'false')
        c.insert_json5('transport/shared_memory/enabled', 'false')  # as config/: bytes cross TCP
        return c

    router = zenoh.open(conf('router'))
    sender, receiver = zenoh.open(conf('client')), zenoh.open(conf('client'))
    arrived = threading.Event()
    stamps: dict[str, float] = {}

    def on_sample(sample: zenoh.Sample) -> None:
        msg = deserialize_message(sample.payload.to_bytes(), PatchSet)
        stamps['t1'] = time.perf_counter()
        stamps['n'] = len(msg.payload)
        arrived.set()

    sub = receiver.declare_subscriber('bench/sage/patch_set', on_sample)
    pub = sender.declare_publisher('bench/sage/patch_set')
    time.sleep(0.5)
    figures: dict[str, float] = {}
    emit('transport alone (serialize + Zenoh via a router on 127.0.0.1 + deserialize), one way:')
    emit(f'  {"codec":<8}{"B":>4}{"msg bytes":>11}{"p50 ms":>9}{"p95 ms":>9}')
    try:
        for codec in ('raw', 'png', 'jpeg'):
            for b in budgets:
                times, sizes = [], []
                for crop, out in zip(crops, outs):
                    plan_ = plan_offload(crop, out, Budget(b), SelectionConfig(encoding=codec, quality=90))
                    msg = PatchSet(request_id='bench/0', indices=plan_.indices.astype(np.uint16),
                                   encoding=codec, payload=plan_.payload, budget_patches=b)
                    for _ in range(repeat):
                        arrived.clear()
                        t0 = time.perf_counter()
                        data = serialize_message(msg)
                        pub.put(data)
                        if not arrived.wait(5.0):
                            raise RuntimeError('transport bench: a message did not arrive')
                        times.append((stamps['t1'] - t0) * 1e3)
                        sizes.append(len(data))
                p50, p95 = np.percentile(times, 50), np.percentile(times, 95)
                figures[f'transport_{codec}_B{b}_p50_ms'] = float(p50)
                emit(f'  {codec:<8}{b:>4}{np.median(sizes):>11.0f}{p50:>9.2f}{p95:>9.2f}')
    finally:
        sub.undeclare()
        pub.undeclare()
        for session in (sender, receiver, router):
            session.close()
    return figures
