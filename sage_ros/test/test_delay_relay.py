# SPDX-License-Identifier: Apache-2.0
"""The TCP delay relay: latency without loss of throughput, intact bytes, a rate limit,
clean stop/start, and a Zenoh session through it.

Timing bounds here come from the relay's own settings, never from this machine's speed: a
chunk is held at least its delay (the relay's clock guarantees it), and an upper bound sits
half-way between the right value and the next wrong one a defect would give (a delay applied
twice, a rate applied to both ways in turn), so it is as wide as the delay or the
serialisation time the test sets, not a guess at how fast the machine relays bytes."""

from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest
import zenoh

from sage_ros.bench.delay_relay import DelayRelay
from sage_ros.commands.system_demo import free_port

DELAY_S = 0.2


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
    # The timeout is a hang guard only: a loaded machine may take a while over 16 MiB.
    with socket.create_connection(('127.0.0.1', port), timeout=120) as sock:
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
            for i in range(3):
                t0 = time.monotonic()
                sock.sendall(b'ping %d' % i)
                assert _recv_exactly(sock, 6) == b'ping %d' % i
                rtts.append(time.monotonic() - t0)
    # One delay each way: at least 2 delays, and short of the 4 a doubled delay would give.
    assert 2 * DELAY_S - 0.005 <= min(rtts) and max(rtts) < 3 * DELAY_S, rtts


def test_large_payload_arrives_intact_and_in_order(echo_port):
    payload = os.urandom(16 * 1024 * 1024)
    with DelayRelay(0, '127.0.0.1', echo_port, 0.05) as relay:
        back, _ = _echo_round_trip(relay.port, payload)
        # The relay counts a chunk after writing it: the echo may be read before the count.
        end = time.monotonic() + 60
        while relay.stats.bytes_down < len(payload) and time.monotonic() < end:
            time.sleep(0.01)
        assert relay.stats.bytes_up == relay.stats.bytes_down == len(payload)
    assert back == payload


def test_chunks_are_pipelined_not_sent_one_delay_at_a_time(echo_port):
    """Throughput does not depend on the delay: the relay keeps reading while earlier chunks
    wait out their delay. With a delay far longer than the test, a 16 MiB send (some 250 reads,
    several times what the sockets' kernel buffers hold) completes while not one byte has been
    delivered yet; a stop-and-wait relay would hold the sender after its first chunk."""
    payload = os.urandom(16 * 1024 * 1024)
    with DelayRelay(0, '127.0.0.1', echo_port, 3600.0) as relay:
        with socket.create_connection(('127.0.0.1', relay.port), timeout=20) as sock:
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            sender.join(120)  # a hang guard: pipelined, the relay reads as fast as it is sent
            assert not sender.is_alive(), 'the relay stopped reading while its chunks waited out the delay'
            assert relay.stats.bytes_up == 0  # every chunk is still being held for the delay


def test_rate_limit_paces_the_bytes(echo_port):
    rate_bps, size, delay = 4e6, 500_000, 0.05  # 0.5 MB/s: a second each way, the two ways overlapping
    with DelayRelay(0, '127.0.0.1', echo_port, delay, rate_bps=rate_bps) as relay:
        back, elapsed = _echo_round_trip(relay.port, os.urandom(size))
    assert len(back) == size
    serialise = size * 8 / rate_bps
    # Paced at the rate, never faster; and the ways overlap: short of the two serialisations
    # one after the other that pacing the echo only after the upload would take.
    assert serialise + 2 * delay <= elapsed < 1.5 * serialise + 2 * delay, elapsed


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
        deadline = time.monotonic() + 20  # a hang guard: the counters are the test
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
                payload = os.urandom(200_000)

                def arrival(store: list, data: bytes) -> float | None:
                    return next((t for got, t in list(store) if got == data), None)

                t0 = time.monotonic()
                client.put('relay/up', payload)
                router.put('relay/down', payload[::-1])
                deadline = time.monotonic() + 20  # a hang guard
                while (arrival(up, payload) is None or arrival(down, payload[::-1]) is None) \
                        and time.monotonic() < deadline:
                    time.sleep(0.005)
                times = arrival(up, payload), arrival(down, payload[::-1])
                assert None not in times, 'samples did not cross the relay'
                # One way of the link each: one delay, short of the two a doubled delay would give.
                for t in times:
                    assert DELAY_S - 0.005 <= t - t0 < 2 * DELAY_S, t - t0
                assert relay.stats.accepted >= 1 and relay.connections >= 1
            finally:
                sub_router.undeclare()
                sub_client.undeclare()
                client.close()
    finally:
        router.close()
