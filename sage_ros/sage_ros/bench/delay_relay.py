# SPDX-License-Identifier: Apache-2.0
"""A TCP relay that adds latency (and optionally a rate limit): an uplink on one machine.

netem is not available everywhere (containers, CI), but a Zenoh session is one TCP
connection, so putting this relay between a client and its router gives that session a
link with a one-way delay. Every chunk read on one side is written to the other
``delay_s`` later, in order, while further chunks keep flowing: a pipe with latency, not a
stop-and-wait channel, so throughput is not reduced. ``rate_bps`` adds a bottleneck that
serialises bytes at that rate in front of the delay, with a bounded queue (``queue_s``), as a
token bucket on a real uplink would. ``stop()`` closes the listener and every connection,
which is what a peer sees when the link goes away; ``start()`` brings it back on the same
port.

Run standalone with ``python -m sage_ros.bench.delay_relay --listen 7448 --target
127.0.0.1:7447 --delay-ms 100``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from dataclasses import dataclass
from types import TracebackType

# One read is at most this much; smaller under a rate limit (see _Pipe._read_size).
_CHUNK = 64 * 1024


@dataclass
class RelayStats:
    """Counters of a relay, over all its connections and restarts."""

    accepted: int = 0
    """Connections accepted from clients."""
    refused: int = 0
    """Accepted connections closed at once because the target could not be reached."""
    bytes_up: int = 0
    """Bytes delivered from clients to the target."""
    bytes_down: int = 0
    """Bytes delivered from the target to clients."""


class _Pipe:
    """One direction of one connection: each chunk is written ``delay_s`` after it was read."""

    def __init__(self, relay: DelayRelay, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 counter: str) -> None:
        self._relay = relay
        self._reader = reader
        self._writer = writer
        self._counter = counter
        # (due time on the loop clock, chunk); b'' marks the end of the stream.
        self._queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        self._buffered = 0
        self._room = asyncio.Event()
        self._room.set()
        self._last_due = 0.0
        self._tx_free = 0.0  # when the rate limiter's "wire" is free again

    def _read_size(self) -> int:
        rate = self._relay.rate_bps
        # Under a rate limit a 64 KiB chunk would arrive as one late burst: read ~10 ms worth.
        return _CHUNK if rate <= 0 else int(min(_CHUNK, max(1024, rate / 8 * 0.01)))

    async def receive(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._room.wait()
            data = await self._reader.read(self._read_size())
            now = loop.time()
            due = now + self._relay.delay_s
            rate = self._relay.rate_bps
            if data and rate > 0:
                self._tx_free = max(now, self._tx_free) + len(data) * 8 / rate
                due = self._tx_free + self._relay.delay_s
            # Never overtake an earlier chunk, even if delay_s was lowered meanwhile.
            due = self._last_due = max(due, self._last_due)
            self._queue.put_nowait((due, data))
            if not data:
                return
            self._buffered += len(data)
            if self._buffered >= self._relay.max_buffer_bytes:
                self._room.clear()
            # Bounded bottleneck queue: stop reading, so the sender's TCP window fills.
            if rate > 0 and self._tx_free - now > self._relay.queue_s:
                await asyncio.sleep(self._tx_free - now - self._relay.queue_s)

    async def deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await self._queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()  # half-close, as the sender did
                return
            self._writer.write(data)
            await self._writer.drain()
            self._buffered -= len(data)
            if self._buffered < self._relay.max_buffer_bytes:
                self._room.set()
            stats = self._relay.stats
            setattr(stats, self._counter, getattr(stats, self._counter) + len(data))


class DelayRelay:
    """Forward TCP connections from ``listen_port`` to ``target_host:target_port``, each
    direction delayed by ``delay_s``; runs an asyncio loop in a thread of its own.

    ``listen_port`` 0 picks a free port (kept across stop/start; see :attr:`port`).
    ``delay_s`` and ``rate_bps`` may be changed while running (new chunks use the new values).
    ``rate_bps`` (bits per second, 0 = unlimited) is the rate of each direction;
    ``queue_s`` bounds the bottleneck queue under a rate limit, in seconds of backlog;
    ``max_buffer_bytes`` bounds what one direction holds in flight.
    """

    def __init__(self, listen_port: int, target_host: str, target_port: int, delay_s: float, *,
                 rate_bps: float = 0.0, listen_host: str = '127.0.0.1', queue_s: float = 0.25,
                 max_buffer_bytes: int = 32 * 1024 * 1024) -> None:
        if delay_s < 0 or rate_bps < 0 or queue_s < 0 or max_buffer_bytes <= 0:
            raise ValueError('delay_s, rate_bps and queue_s must be >= 0 and max_buffer_bytes > 0')
        self.delay_s = float(delay_s)
        self.rate_bps = float(rate_bps)
        self.queue_s = float(queue_s)
        self.max_buffer_bytes = int(max_buffer_bytes)
        self.listen_host = listen_host
        self.target_host = target_host
        self.target_port = int(target_port)
        self.stats = RelayStats()
        self._port = int(listen_port)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        """The listening port (the one picked, after the first start with port 0)."""
        return self._port

    @property
    def endpoint(self) -> str:
        """Zenoh endpoint of the relay, e.g. ``tcp/127.0.0.1:7448``."""
        return f'tcp/{self.listen_host}:{self._port}'

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return len(self._handlers)

    def start(self, timeout: float = 5.0) -> None:
        """Listen and relay, from a new thread; returns once the port is bound (no-op if running)."""
        if self.running:
            return
        started = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                asyncio.run(self._main(started))
            except BaseException as exc:  # reported to start(), or lost if start() returned already
                failure.append(exc)
                started.set()

        self._thread = threading.Thread(target=run, name=f'delay_relay:{self._port}', daemon=True)
        self._thread.start()
        if not started.wait(timeout):
            raise TimeoutError(f'delay relay did not start within {timeout} s')
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener and every connection (in-flight bytes are lost) and end the thread."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        if loop is not None and stop is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop ended on its own meanwhile
                loop.call_soon_threadsafe(stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise TimeoutError(f'delay relay did not stop within {timeout} s')
        self._thread = self._loop = self._stop = None

    close = stop

    def __enter__(self) -> DelayRelay:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    async def _main(self, started: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, self.listen_host, self._port)
        self._port = int(server.sockets[0].getsockname()[1])
        started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            # Each handler closes its own sockets when cancelled.
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.accepted += 1
        target_writer: asyncio.StreamWriter | None = None
        tasks: list[asyncio.Task[None]] = []
        clean = False
        try:
            try:
                target_reader, target_writer = await asyncio.open_connection(self.target_host, self.target_port)
            except OSError:
                self.stats.refused += 1
                return
            up = _Pipe(self, client_reader, target_writer, 'bytes_up')
            down = _Pipe(self, target_reader, client_writer, 'bytes_down')
            tasks = [asyncio.create_task(c) for c in (up.receive(), up.deliver(), down.receive(), down.deliver())]
            # Both directions delivered their end of stream: a clean close. Any error (a reset,
            # a write to a closed peer) ends the whole connection, as it would end a TCP session.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            clean = all(not t.cancelled() and t.exception() is None for t in done) and len(done) == len(tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for writer in (client_writer, target_writer):
                if writer is None:
                    continue
                if clean:
                    writer.close()
                else:
                    writer.transport.abort()  # no lingering FIN handshake with a broken peer
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            self._handlers.discard(task)


def _host_port(text: str, default_host: str = '127.0.0.1') -> tuple[str, int]:
    """'7448' or 'host:7448' (or 'tcp/host:7448', a Zenoh endpoint)."""
    text = text.removeprefix('tcp/')
    host, sep, port = text.rpartition(':')
    try:
        return (host.strip('[]') if sep and host else default_host), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected PORT or HOST:PORT, got {text!r}') from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='python -m sage_ros.bench.delay_relay', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--listen', type=_host_port, required=True, help='PORT or HOST:PORT to listen on')
    parser.add_argument('--target', type=_host_port, required=True, help='HOST:PORT to forward to')
    parser.add_argument('--delay-ms', type=float, default=100.0, help='one-way delay per direction (default 100)')
    parser.add_argument('--rate-kbit', type=float, default=0.0, help='rate limit per direction, kbit/s (0: none)')
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    (lhost, lport), (thost, tport) = args.listen, args.target
    relay = DelayRelay(lport, thost, tport, args.delay_ms / 1e3, rate_bps=args.rate_kbit * 1e3, listen_host=lhost)
    with relay:
        rate = f', {args.rate_kbit:g} kbit/s' if args.rate_kbit > 0 else ''
        print(f'delay relay {relay.listen_host}:{relay.port} -> {thost}:{tport}, {args.delay_ms:g} ms each way'
              f'{rate}; Ctrl-C stops', file=sys.stderr, flush=True)
        while not stop.wait(0.5) and relay.running:
            pass
    s = relay.stats
    print(f'delay relay: {s.accepted} connections, {s.bytes_up} B up, {s.bytes_down} B down', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
