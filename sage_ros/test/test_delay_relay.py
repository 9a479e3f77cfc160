# SPDX-License-Identifier: Apache-2.0
"""The TCP delay relay: latency without loss of throughput, intact bytes, a rate limit,
clean stop/start, and a Zenoh session through it."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
import zenoh

from sage_ros.eval.delay_relay import DelayRelay
from sage_ros.system_demo import free_port

DELAY_S = 0.1


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    socketserver.ThreadingTCPServer.allow_reuse_address = True
    server = socketserver.ThreadingTCPServer(('127.0.0.1', 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b''.join(parts)


def _echo_round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    """Send ``payload`` from a thread while reading the echo; returns it and the seconds taken."""
    with socket.create_connection(('127.0.0.1', port), timeout=20) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.monotonic()
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        back = _recv_exactly(sock, len(payload))
        elapsed = time.monotonic() - t0
        sender.join()
    return back, elapsed


def test_round_trip_is_twice_the_delay(echo_port):
    with DelayRelay(0, '127.0.0.1', echo_port, DELAY_S) as relay:
        rtts = []
        with socket.create_connection(('127.0.0.1', relay.port), timeout=5) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(5):
                t0 = time.monotonic()
                sock.sendall(b'ping %d' % i)
                assert _recv_exactly(sock, 6) == b'ping %d' % i
                rtts.append(time.monotonic() - t0)
    assert 2 * DELAY_S - 0.005 <= min(rtts) and max(rtts) < 2 * DELAY_S + 0.1, rtts


def test_large_payload_arrives_intact_in_order_without_losing_throughput(echo_port):
    payload = os.urandom(16 * 1024 * 1024)
    with DelayRelay(0, '127.0.0.1', echo_port, DELAY_S) as relay:
        back, elapsed = _echo_round_trip(relay.port, payload)
        assert relay.stats.bytes_up == relay.stats.bytes_down == len(payload)
    assert back == payload
    # Some 500 chunks of 64 KiB or less: one delay per chunk (stop-and-wait) would take minutes.
    assert 2 * DELAY_S <= elapsed < 2 * DELAY_S + 2.0, elapsed


def test_rate_limit_paces_the_bytes(echo_port):
    rate_bps, size = 8e6, 500_000  # 1 MB/s: half a second each way, the two ways overlapping
    with DelayRelay(0, '127.0.0.1', echo_port, 0.05, rate_bps=rate_bps) as relay:
        back, elapsed = _echo_round_trip(relay.port, os.urandom(size))
    assert len(back) == size
    serialise = size * 8 / rate_bps
    assert serialise + 0.1 <= elapsed < serialise + 1.0, elapsed


def test_stop_closes_every_socket_and_start_brings_the_link_back(echo_port):
    relay = DelayRelay(0, '127.0.0.1', echo_port, 0.02)
    relay.start()
    try:
        port = relay.port
        sock = socket.create_connection(('127.0.0.1', port), timeout=5)
        sock.sendall(b'hello')
        assert _recv_exactly(sock, 5) == b'hello'
        assert relay.connections == 1
        relay.stop()
        assert not relay.running and relay.connections == 0
        # The client sees its connection end (EOF or reset), and nobody listens any more.
        try:
            assert sock.recv(10) == b''
        except ConnectionResetError:
            pass
        sock.close()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(('127.0.0.1', port), timeout=5).close()
        relay.start()
        assert relay.port == port
        back, _ = _echo_round_trip(port, b'again')
        assert back == b'again'
    finally:
        relay.stop()


def test_unreachable_target_closes_the_client():
    with DelayRelay(0, '127.0.0.1', free_port(), 0.01) as relay:
        with socket.create_connection(('127.0.0.1', relay.port), timeout=5) as sock:
            try:
                assert sock.recv(10) == b''
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 2
        while (relay.stats.refused == 0 or relay.connections) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.stats.refused == 1 and relay.connections == 0


def _zenoh_config(mode: str, field: str, endpoint: str) -> zenoh.Config:
    conf = zenoh.Config()
    conf.insert_json5('mode', f'"{mode}"')
    conf.insert_json5(field, f'["{endpoint}"]')
    conf.insert_json5('scouting/multicast/enabled', 'false')
    conf.insert_json5('transport/shared_memory/enabled', 'false')
    return conf


def test_zenoh_put_and_subscribe_through_the_relay():
    router_port = free_port()
    router = zenoh.open(_zenoh_config('router', 'listen/endpoints', f'tcp/127.0.0.1:{router_port}'))
    try:
        with DelayRelay(0, '127.0.0.1', router_port, DELAY_S) as relay:
            client = zenoh.open(_zenoh_config('client', 'connect/endpoints', relay.endpoint))
            up: list[tuple[bytes, float]] = []
            down: list[tuple[bytes, float]] = []
            got_up, got_down = threading.Event(), threading.Event()

            def on(store: list, event: threading.Event):
                def cb(sample: zenoh.Sample) -> None:
                    store.append((sample.payload.to_bytes(), time.monotonic()))
                    event.set()
                return cb

            sub_router = router.declare_subscriber('relay/up', on(up, got_up))
            sub_client = client.declare_subscriber('relay/down', on(down, got_down))
            try:
                # Declarations travel through the relay too: repeat until the route exists.
                deadline = time.monotonic() + 10
                while not (got_up.is_set() and got_down.is_set()) and time.monotonic() < deadline:
                    client.put('relay/up', b'warm')
                    router.put('relay/down', b'warm')
                    time.sleep(0.05)
                assert got_up.is_set() and got_down.is_set(), 'no route through the relay'
                time.sleep(2 * DELAY_S + 0.1)
                up.clear()
                down.clear()
                payload = os.urandom(200_000)
                t0 = time.monotonic()
                client.put('relay/up', payload)
                router.put('relay/down', payload[::-1])
                deadline = time.monotonic() + 5
                while not (up and down) and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert up and down, 'samples did not cross the relay'
                assert up[0][0] == payload and down[0][0] == payload[::-1]
                # One way of the link each: about one delay, not more than a little over.
                for _, t in (up[0], down[0]):
                    assert DELAY_S - 0.005 <= t - t0 < DELAY_S + 0.25, t - t0
                assert relay.stats.accepted >= 1 and relay.connections >= 1
            finally:
                sub_router.undeclare()
                sub_client.undeclare()
                client.close()
    finally:
        router.close()
