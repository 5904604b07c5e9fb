"""A TCP proxy that delays every server-to-client chunk by a fixed time.

Put in front of MariaDB, it turns each database round trip into a slow one, so the
benchmark can show whether a cache miss (which must go to the database) holds up the
requests of senders that are already cached. Client-to-server bytes pass at once;
server-to-client chunks keep their order and each leaves ``--delay-ms`` after it arrived.
SIGUSR1 switches the delay on, SIGUSR2 off (``--off`` starts with it off).
Usage: ``python benchmarks/delayproxy.py --port P --upstream HOST:PORT --delay-ms N [--off]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import signal


class Knob:
    """The delay now in force, shared by every connection; signals turn it on and off."""

    def __init__(self, delay: float, on: bool) -> None:
        self.configured = delay
        self.delay = delay if on else 0.0


class Delayed:
    """Writes chunks to a transport, each one ``knob.delay`` seconds after it came."""

    def __init__(self, loop: asyncio.AbstractEventLoop, out: asyncio.Transport, knob: Knob):
        self.loop, self.out, self.knob = loop, out, knob
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None

    def push(self, data: bytes) -> None:
        if self.knob.delay <= 0 and not self.queue:
            self.out.write(data)
            return
        # due times never go backwards, so switching the delay off cannot reorder bytes
        due = self.loop.time() + self.knob.delay
        if self.queue:
            due = max(due, self.queue[-1][0])
        self.queue.append((due, data))
        if self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._release)

    def _release(self) -> None:
        # one timer per direction at a time keeps the chunks in order (timers that
        # fall due at the same instant have no defined order in asyncio's heap)
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now + 1e-6:
            if not self.out.is_closing():
                self.out.write(self.queue.popleft()[1])
            else:
                self.queue.popleft()
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._release)

    def close_after(self) -> None:
        """Close the output once everything queued has been written."""
        if self.queue:
            deadline = self.queue[-1][0]
            self.loop.call_at(deadline + 0.001, self.out.close)
        else:
            self.out.close()


class Upstream(asyncio.Protocol):
    """The proxy's connection to the real server: its bytes go back delayed."""

    def __init__(self, downstream: Downstream) -> None:
        self.down = downstream
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.down.delayed.push(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.delayed.close_after()


class Downstream(asyncio.Protocol):
    """A client of the proxy (the daemon's database connection)."""

    def __init__(self, upstream: tuple[str, int], knob: Knob) -> None:
        self.upstream_addr, self.knob = upstream, knob
        # What the client sends before the upstream connection is made. Reading is not
        # paused meanwhile: pause_reading() in connection_made() is not honoured by
        # Python 3.11.0-3.11.3 (CPython gh-103607), whose transports start reading
        # after connection_made() anyway, so those bytes would arrive here and be lost.
        self.pending: list[bytes] = []
        self.up: Upstream | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        loop = asyncio.get_running_loop()
        self.delayed = Delayed(loop, transport, self.knob)
        self.connecting = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            up_transport, up = await loop.create_connection(
                lambda: Upstream(self), *self.upstream_addr)
        except OSError:
            self.transport.close()
            return
        if self.closed:  # the client left while we connected
            up_transport.close()
            return
        # Everything runs on the loop's one thread: the pending bytes go out before
        # any that data_received() passes on from now, so the order is kept.
        if self.pending:
            up_transport.write(b"".join(self.pending))
            self.pending.clear()
        self.up = up

    def data_received(self, data: bytes) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pending.clear()
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


async def serve(port: int, upstream: tuple[str, int], knob: Knob) -> None:
    loop = asyncio.get_running_loop()
    # The handlers come before the port listens: whoever starts the proxy takes an
    # accepted connection as "ready" and may signal at once; before the handlers a
    # SIGUSR1 or SIGTERM would kill the process with the default action.
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(knob, "delay", knob.configured))
    loop.add_signal_handler(signal.SIGUSR2, lambda: setattr(knob, "delay", 0.0))
    server = await loop.create_server(
        lambda: Downstream(upstream, knob), "127.0.0.1", port, backlog=256
    )
    async with server:
        await stopped.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--off", action="store_true", help="start with the delay off")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    knob = Knob(args.delay_ms / 1000.0, on=not args.off)
    asyncio.run(serve(args.port, (host, int(port)), knob))


if __name__ == "__main__":
    main()
