"""The "bare readline" baseline: the simplest threaded policy server one would write.

A stdlib ``socketserver.ThreadingTCPServer`` with a thread per connection that reads a
request line by line with ``readline``, builds a dict and answers ``DUNNO``. No quota,
no log, no database: the daemon, which does all of that, must still be at least as fast.
Usage: ``python benchmarks/ref_readline.py --port PORT``.
"""

from __future__ import annotations

import argparse
import signal
import socketserver
import threading
from types import FrameType


class ReadlineHandler(socketserver.StreamRequestHandler):
    """Serve requests on one persistent connection, as Postfix uses it."""

    def handle(self) -> None:
        attrs: dict[str, str] = {}
        while True:
            line = self.rfile.readline(4096)
            if not line:
                return
            if line == b"\n":
                attrs.clear()
                self.wfile.write(b"action=DUNNO\n\n")
                continue
            name, _, value = line.decode("utf-8", "replace").rstrip("\n").partition("=")
            attrs[name] = value


class ReadlineServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    server = ReadlineServer((args.host, args.port), ReadlineHandler)

    def stop(signum: int, frame: FrameType | None) -> None:
        # shutdown() blocks until serve_forever returns: call it from another thread
        threading.Thread(target=server.shutdown).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    server.server_close()


if __name__ == "__main__":
    main()
