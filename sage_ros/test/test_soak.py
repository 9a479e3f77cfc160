# SPDX-License-Identifier: Apache-2.0
"""Soak: several robots send to one cloud at the rate it sustains. Bounded for CI
(SAGE_ROS_SOAK_S seconds, default 60); run longer on demand with the same variable."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import zenoh
from rclpy.serialization import deserialize_message, serialize_message
from sage_ros_msgs.msg import CloudResult

from sage_ros.bringup import Bringup, plan
from sage_ros.eval.fleet_bench import real_requests
from sage_ros.live_client import LiveClient
from sage_ros.system_demo import free_port

SOAK_S = float(os.environ.get('SAGE_ROS_SOAK_S', '60'))
VIRTUAL_ROBOTS = 4
LEAK_MB_PER_MIN = 10.0


def rss_kb(pid: int) -> int:
    with open(f'/proc/{pid}/status') as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith('VmRSS:'))


def slopes(samples: list[tuple[float, int, list[int]]]) -> dict[str, float]:
    """RSS growth of each process over the last half of the samples, MB per minute."""
    t = np.array([s[0] for s in samples])
    last = t >= t[-1] / 2
    series = {'cloud': [s[1] for s in samples]}
    for i in range(len(samples[0][2])):
        series[f'edge{i}'] = [s[2][i] for s in samples]
    return {k: float(np.polyfit(t[last], np.array(v)[last], 1)[0]) * 60 / 1024 for k, v in series.items()}


def test_soak_several_robots_one_cloud(ros_env, tiny, real_images, tmp_path):
    endpoint = f'tcp/127.0.0.1:{free_port()}'
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint, 'budget_mode': 'fixed',
          'budget': 64, 'deadline_ms': 5000.0, 'sage_edge.image_topic': 'camera/image_raw'}
    log = (tmp_path / 'nodes.log').open('w')
    bring = Bringup(plan('both', namespace='robot1', overrides=ov) + plan('edge', namespace='robot2', overrides=ov),
                    log=log)
    stop = threading.Event()
    counts = {'answered': 0, 'busy': 0}
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
                got.wait(10.0)
                k += 1
            sub.undeclare()

        def real_robot(ns: str) -> None:
            client = LiveClient(image_topic=f'/{ns}/camera/image_raw', result_topic=f'/{ns}/sage/result',
                                name=f'soak_{ns}')
            sent = answered = 0
            try:
                assert client.wait_for_edge()
                while not stop.is_set():
                    res = client.classify(real_images[sent % len(real_images)], timeout=20)
                    sent += 1
                    answered += res is not None
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
                samples.append((time.monotonic() - t0, rss_kb(cloud_pid), [rss_kb(p) for p in edge_pids]))
            # Warm-up (allocator arenas, torch's caches) ends when it ends, later on a machine with
            # more threads: a leak keeps its slope when the soak goes on, a warm-up flattens.
            if all(v < LEAK_MB_PER_MIN for v in slopes(samples).values()) or until >= 2 * SOAK_S:
                break
            until += SOAK_S / 2
        answered_before = counts['answered']
        stop.set()
        for t in threads:
            t.join(30)
        session.close()
        rate = answered_before / (samples[-1][0])

        # Clean shutdown: SIGTERM for the cloud, SIGINT for an edge, each within two seconds.
        timings = {}
        for name, sig in (('cloud', signal.SIGTERM), ('edge', signal.SIGINT)):
            proc = next(p.popen for p in bring.procs if p.name == name and p.popen.poll() is None)
            t1 = time.monotonic()
            proc.send_signal(sig)
            proc.wait(10)
            timings[name] = time.monotonic() - t1
    finally:
        stop.set()
        bring.stop()
        log.close()

    slope = slopes(samples)
    trace = ' '.join(f'{s[1] / 1024:.0f}' for s in samples[::max(1, len(samples) // 8)])
    print(f'\nsoak {samples[-1][0]:.0f} s: cloud answered {rate:.2f} req/s at B=64 ({counts["busy"]} busy); '
          f'RSS cloud {trace} MB; slopes over the last half (MB/min): '
          + ', '.join(f'{k} {v:+.2f}' for k, v in slope.items())
          + f'; edges sent/answered {edge_stats}; shutdown {timings}')
    for ns, (sent, answered, results) in edge_stats.items():
        assert sent > 0 and answered == sent == results, (ns, sent, answered, results)  # no frame lost
    assert counts['answered'] > 0 and rate > 1.0
    for name, mb_per_min in slope.items():
        assert mb_per_min < LEAK_MB_PER_MIN, (name, mb_per_min, trace)  # flat after warm-up, within allocator noise
    assert all(v < 2.0 for v in timings.values()), timings
