# SPDX-License-Identifier: Apache-2.0
"""Soak: several robots send to one cloud at the rate it sustains. Bounded for CI
(SAGE_ROS_SOAK_S seconds, default 60); run longer on demand with the same variable.

Whatever this machine's speed: memory growth is measured per request served (per frame on an
edge), not per minute, and the cloud is held to answering every request, not to a rate (the
rate is printed; `sage-ros bench --fleet` measures it). The cloud runs DeiT-Tiny: the nodes'
own code is what is soaked, and a cheaper model gives it many more requests to leak on."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import zenoh
from rclpy.serialization import deserialize_message, serialize_message
from sage_ros_msgs.msg import CloudResult

from sage_ros.commands.bringup import Bringup, plan
from sage_ros.bench.fleet import real_requests
from sage_ros.ros.live_client import LiveClient
from sage_ros.commands.system_demo import free_port
from conftest import stop_by_signal

SOAK_S = float(os.environ.get('SAGE_ROS_SOAK_S', '60'))
VIRTUAL_ROBOTS = 4
# A leak, after warm-up: growth per request the cloud handles (per frame an edge handles) of
# at least this much, a third of a request's decoded patches (64 x 768 B) or a sixteenth of a
# camera frame (~0.5 MB) ...
LEAK_KB = {'cloud': 16.0, 'edge': 32.0}
# ... adding up, over the last half of the soak, to more than the allocator and torch's buffers
# move RSS by, up and down, under a steady load.
NOISE_MB = {'cloud': 24.0, 'edge': 4.0}


def _leaking(name: str, kb_per_unit: float, mb: float) -> bool:
    kind = 'cloud' if name == 'cloud' else 'edge'
    return kb_per_unit >= LEAK_KB[kind] and mb >= NOISE_MB[kind]


def rss_kb(pid: int) -> int:
    with open(f'/proc/{pid}/status') as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith('VmRSS:'))


def growth(samples: list[tuple[float, int, list[int], int, list[int]]]) -> dict[str, tuple[float, float]]:
    """RSS growth of each process over the last half of the samples (by time), fitted against
    the work it did: (kB per request handled, MB over that half). Samples are (seconds, cloud
    kB, edge kB each, cloud requests so far, frames so far each edge)."""
    t = np.array([s[0] for s in samples])
    last = t >= t[-1] / 2
    series = {'cloud': ([s[3] for s in samples], [s[1] for s in samples])}
    for i in range(len(samples[0][2])):
        series[f'edge{i}'] = ([s[4][i] for s in samples], [s[2][i] for s in samples])
    out = {}
    for k, (work, rss) in series.items():
        work, rss = np.array(work, float)[last], np.array(rss, float)[last]
        if work.max() <= work.min():  # no work at all in the last half: nothing to judge by
            out[k] = (float('inf'), float('inf'))
            continue
        per_unit = float(np.polyfit(work, rss, 1)[0])
        out[k] = (per_unit, per_unit * (work.max() - work.min()) / 1024)
    return out


def test_soak_several_robots_one_cloud(ros_env, tiny, real_images, tmp_path):
    endpoint = f'tcp/127.0.0.1:{free_port()}'
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'budget_mode': 'fixed',
          'budget': 64, 'deadline_ms': 5000.0, 'sage_edge.image_topic': 'camera/image_raw',
          'sage_cloud.model': 'deit_tiny_patch16_224'}
    log = (tmp_path / 'nodes.log').open('w')
    bring = Bringup(plan('both', namespace='robot1', overrides=ov) + plan('edge', namespace='robot2', overrides=ov),
                    log=log)
    stop = threading.Event()
    counts = {'answered': 0, 'busy': 0, 'sent': 0, 'unanswered': 0}
    frames = {'robot1': 0, 'robot2': 0}  # frames each real robot had answered so far
    edge_stats = {}
    try:
        bring.start()
        bring.wait_ready()
        cloud_pid = next(p.popen.pid for p in bring.procs if p.name == 'cloud')
        edge_pids = [p.popen.pid for p in bring.procs if p.name == 'edge']

        # Virtual robots: one request in flight each, the next as soon as the answer is back.
        session = zenoh.open(zenoh.Config.from_json5(
            f'{{mode: "client", connect: {{endpoints: ["{endpoint}"]}}, scouting: {{multicast: {{enabled: false}}}}}}'))
        lock = threading.Lock()

        def virtual(robot: str) -> None:
            reqs = real_requests(real_images[:4], robot, 64)
            got = threading.Event()

            def on_answer(sample):
                a = deserialize_message(sample.payload.to_bytes(), CloudResult)
                with lock:
                    counts['answered' if a.status == CloudResult.STATUS_OK else 'busy'] += 1
                got.set()

            sub = session.declare_subscriber(f'{robot}/sage/cloud_result', on_answer)
            k = 0
            while not stop.is_set():
                msg = reqs[k % len(reqs)]
                msg.request_id = f'{robot}/{k}'
                got.clear()
                session.put(f'{robot}/sage/patch_set', serialize_message(msg))
                with lock:
                    counts['sent'] += 1
                if not got.wait(120.0):  # a hang guard: every request is answered, OK or BUSY
                    with lock:
                        counts['unanswered'] += 1
                k += 1
            sub.undeclare()

        def real_robot(ns: str) -> None:
            client = LiveClient(image_topic=f'/{ns}/camera/image_raw', result_topic=f'/{ns}/sage/result',
                                name=f'soak_{ns}')
            sent = answered = 0
            try:
                assert client.wait_for_edge()
                while not stop.is_set():
                    res = client.classify(real_images[sent % len(real_images)], timeout=60)
                    sent += 1
                    answered += res is not None
                    frames[ns] = answered
            finally:
                edge_stats[ns] = (sent, answered, len(client.all_results))
                client.destroy_node()

        threads = [threading.Thread(target=virtual, args=(f'virtual{i}',)) for i in range(VIRTUAL_ROBOTS)]
        threads += [threading.Thread(target=real_robot, args=(ns,)) for ns in ('robot1', 'robot2')]
        for t in threads:
            t.start()
        samples = []
        t0, until = time.monotonic(), SOAK_S
        while True:
            while time.monotonic() - t0 < until:
                time.sleep(2.0)
                with lock:
                    served = counts['answered'] + counts['busy']
                served += sum(frames.values())  # every real frame is offloaded: one request each
                samples.append((time.monotonic() - t0, rss_kb(cloud_pid), [rss_kb(p) for p in edge_pids], served,
                                [frames['robot1'], frames['robot2']]))
            # Warm-up (allocator arenas, torch's caches) ends when it ends, later on a machine with
            # more threads: a leak keeps its slope when the soak goes on, a warm-up flattens.
            if not any(_leaking(k, *v) for k, v in growth(samples).items()) or until >= 2 * SOAK_S:
                break
            until += SOAK_S / 2
        answered_before = counts['answered']
        stop.set()
        for t in threads:
            t.join(150)  # a hang guard: each ends once its request in flight is answered
        session.close()
        rate = answered_before / (samples[-1][0])

        # Clean shutdown: SIGTERM for the cloud, SIGINT for an edge, each ending by itself
        # within the grace a supervisor gives before SIGKILL.
        codes = {}
        for name, sig in (('cloud', signal.SIGTERM), ('edge', signal.SIGINT)):
            proc = next(p.popen for p in bring.procs if p.name == name and p.popen.poll() is None)
            codes[name] = stop_by_signal(proc, sig)
    finally:
        stop.set()
        bring.stop()
        log.close()

    grown = growth(samples)
    every = max(1, len(samples) // 8)
    trace = ' '.join(f'{s[1] / 1024:.0f}' for s in samples[::every])
    edge_traces = ['/'.join(f'{s[2][i] / 1024:.0f}' for s in samples[::every]) for i in range(len(edge_pids))]
    print(f'\nsoak {samples[-1][0]:.0f} s: cloud answered {rate:.2f} req/s at B=64 ({counts["busy"]} busy, '
          f'{samples[-1][3]} requests); RSS cloud {trace} MB, edges {edge_traces} MB; growth over the last half '
          '(kB per request, per frame on an edge; MB): '
          + ', '.join(f'{k} {kb:+.2f} ({mb:+.1f})' for k, (kb, mb) in grown.items())
          + f'; edges sent/answered {edge_stats}; exit codes {codes}')
    for ns, (sent, answered, results) in edge_stats.items():
        assert sent > 0 and answered == sent == results, (ns, sent, answered, results)  # no frame lost
    # Every virtual robot's request was answered exactly once (OK, or BUSY when shed), and the
    # cloud served.
    assert counts['unanswered'] == 0 and counts['answered'] > 0, counts
    assert counts['answered'] + counts['busy'] == counts['sent'], counts
    for name, (kb, mb) in grown.items():
        assert not _leaking(name, kb, mb), (name, kb, mb, trace, edge_traces)  # flat after warm-up
    assert codes == {'cloud': 0, 'edge': 0}, codes
