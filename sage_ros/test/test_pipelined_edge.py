# SPDX-License-Identifier: Apache-2.0
"""The edge does not wait for the cloud: while a request is in flight over a link that answers
only after many frame times, the edge keeps handling new frames, and each frame it keeps gets
its own result before that answer comes; every frame still gets exactly one result.

Independent of the machine's speed: the edge's frame time is measured first, in the running
system, and the link's one-way delay is then set to many of those frame times (the relay's
delay is the test's to set). Frames are published one after another as the edge handles each
(its result, or for an offloaded frame its provisional label), so no camera rate is assumed.
What the edge sustains at 30 fps with a third offloaded is a capacity figure: `sage-ros bench
--pipeline` prints it."""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any

from sage_ros.commands.bringup import Bringup, plan
from sage_ros.bench.delay_relay import DelayRelay
from sage_ros.bench.pipeline import calibrate_eta, camera_frames, gate_scores, set_edge_eta
from sage_ros.params import load_params
from sage_ros.commands.system_demo import free_port

from conftest import wait_uplink

HANDLED_WHILE_OUT = 6
"""Frames the edge must handle while one request is out."""
DELAY_FRAME_TIMES = 12
"""The link's one-way delay, in measured frame times: a round trip is 24 of them, so the 6
frames above fit four times over."""
SOURCE_EDGE, SOURCE_CLOUD = 0, 1


def _client(name: str) -> Any:
    """A LiveClient that also notes when each final result and provisional label arrived."""
    from sage_ros_msgs.msg import OffloadResult

    from sage_ros.ros.live_client import LiveClient, stamp_ns

    class Client(LiveClient):
        def __init__(self) -> None:
            super().__init__(name=name)
            self.final_at: dict[int, float] = {}
            self.provisional_at: dict[int, float] = {}
            self.create_subscription(OffloadResult, '/sage/provisional', self._on_provisional, 100)

        def _on_result(self, msg: Any) -> None:
            super()._on_result(msg)
            self.final_at.setdefault(stamp_ns(msg.header.stamp), time.monotonic())

        def _on_provisional(self, msg: Any) -> None:
            self.provisional_at.setdefault(stamp_ns(msg.header.stamp), time.monotonic())

        def handle_frame(self, rgb: Any, timeout: float = 60.0) -> int:
            """Publish one frame and spin until the edge has handled it; returns its stamp."""
            stamp = self.publish(rgb)
            end = time.monotonic() + timeout
            while stamp not in self.final_at and stamp not in self.provisional_at:
                assert time.monotonic() < end, f'frame {stamp} not handled in {timeout} s'
                self._executor.spin_once(timeout_sec=0.01)
            return stamp

    return Client()


@contextlib.contextmanager
def _system(tmp_path, overrides: dict[str, Any]):
    """Router, cloud and edge; the edge reaches the router through a DelayRelay (yielded)."""
    port = free_port()
    endpoint = f'tcp/127.0.0.1:{port}'
    relay = DelayRelay(free_port(), '127.0.0.1', port, 0.02)
    relay.start()
    ov = {'weights': 'random', 'zenoh_listen': endpoint, 'zenoh_connect': endpoint,
          'sage_edge.zenoh_connect': relay.endpoint, **overrides}
    with (tmp_path / 'nodes.log').open('w') as log:
        bring = Bringup(plan('both', overrides=ov), log=log)
        client = None
        try:
            bring.start()
            bring.wait_ready(timeout=180)
            client = _client('pipelined_client')
            assert client.wait_for_edge(timeout=60)
            wait_uplink(client, timeout=60)
            yield client, relay
        finally:
            if client is not None:
                client.destroy_node()
            bring.stop()
            relay.stop()


def test_the_edge_handles_new_frames_while_a_request_is_out(ros_env, imagenet_dir, tmp_path):
    frames = camera_frames(imagenet_dir / 'images', 12)
    edge = load_params('sage_edge', overrides={'weights': 'random'})
    # A third of these frames offloaded: their gate score is at or above eta.
    scores = gate_scores(frames, edge)
    eta = calibrate_eta(scores, 1 / 3)
    offloads = scores >= eta
    overrides = {'sage_edge.eta': 20.0,  # nothing offloaded while the frame time is measured
                 'sage_edge.deadline_ms': 120_000.0,  # answers count however slow the link is made
                 'sage_edge.budget': 16, 'sage_cloud.model': 'deit_tiny_patch16_224'}
    with _system(tmp_path, overrides) as (client, relay):
        # 1. The edge's own frame time here, now: publish to result, nothing offloaded.
        times = []
        for rgb in frames[:8]:
            t0 = time.monotonic()
            stamp = client.handle_frame(rgb)
            times.append(client.final_at[stamp] - t0)
            assert client.results[stamp].source == SOURCE_EDGE
        frame_time = statistics.median(times)

        # 2. A third offloaded; one answer over the fast link measures it (until then the edge
        # sends one request at a time).
        set_edge_eta(client, eta)
        first = next(i for i, off in enumerate(offloads) if off)
        stamp = client.handle_frame(frames[first])
        assert client.wait_result(stamp, 60.0).source == SOURCE_CLOUD

        # 3. The link now answers only after 2 x DELAY_FRAME_TIMES frame times.
        relay.delay_s = max(0.25, DELAY_FRAME_TIMES * frame_time)
        out = client.handle_frame(frames[first])  # offloaded: its request is now in flight
        assert out in client.provisional_at and out not in client.final_at
        during: list[int] = []
        order = [i for i in range(len(frames)) if i != first]
        k = 0
        while out not in client.final_at and len(during) < 200:
            during.append(client.handle_frame(frames[order[k % len(order)]]))
            k += 1
        assert client.wait_result(out, 120.0) is not None
        answered_at = client.final_at[out]
        assert client.results[out].source == SOURCE_CLOUD, client.results[out].detail

        handled_before = [s for s in during if min(client.final_at.get(s, 1e18),
                                                    client.provisional_at.get(s, 1e18)) < answered_at]
        print(f'frame time {frame_time * 1e3:.0f} ms, link delay {relay.delay_s:.2f} s each way: '
              f'{len(handled_before)} frames handled while the request was out')
        assert len(handled_before) >= HANDLED_WHILE_OUT, (len(handled_before), frame_time, relay.delay_s)
        kept = [s for s in handled_before if s in client.final_at and client.results[s].source == SOURCE_EDGE]
        assert kept, 'no frame was kept at the edge while the request was out'
        # Every frame kept at the edge had its result before the answer to the earlier request.
        assert all(client.final_at[s] < answered_at for s in kept)

        # 4. Exactly one result for every frame, the offloaded ones once their answers come.
        relay.delay_s = 0.02
        sent = [stamp, out, *during]
        end = time.monotonic() + 120
        while not all(s in client.results for s in sent) and time.monotonic() < end:
            client.drain(0.2)
        client.drain(1.0)  # a second result for a frame would show up now
        assert all(s in client.results for s in sent)
        finals = sorted(r.header.stamp.sec * 10**9 + r.header.stamp.nanosec for r in client.all_results)
        assert len(finals) == len(set(finals)), 'a frame got two results'
