"""A trivial asyncio policy server: a generator-capacity check, not a competitor.

One event loop, a ``Protocol`` per connection that answers ``DUNNO`` whenever it sees
the empty line that ends a request; it parses nothing. If the load generator drives
this faster than the daemon, the generator is not what limits the daemon's numbers.
Usage: ``python benchmarks/ref_asyncio.py --port PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

REPLY = b"action=DUNNO\n\n"


class NullPolicy(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        # keep the last byte: a request's "\n\n" may straddle two reads
        chunk = self.tail + data
        ends = chunk.count(b"\n\n")
        self.tail = b"" if chunk.endswith(b"\n\n") else chunk[-1:]
        if ends and self.transport is not None:
            self.transport.write(REPLY * ends)


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(NullPolicy, host, port, backlog=1024)
    stopped = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.set)
    async with server:
        await stopped.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
