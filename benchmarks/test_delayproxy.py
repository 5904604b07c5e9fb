"""Tests of the benchmark's delay proxy (benchmarks/delayproxy.py), on real sockets.

The proxy must pass every byte, in order, in both directions; hold server-to-client
bytes for the delay while it is on (SIGUSR1) and not while it is off (SIGUSR2).
Run: ``python -m pytest benchmarks/test_delayproxy.py -q``.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import run


class Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxied(tmp_path: Path) -> Iterator[tuple[int, run.Service]]:
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    port = run.free_port()
    proxy = run.Service("proxy", [
        sys.executable, str(run.HERE / "delayproxy.py"), "--port", str(port), "--off",
        "--upstream", f"127.0.0.1:{upstream.server_address[1]}", "--delay-ms", "150"],
        tmp_path)
    proxy.start(port)
    yield port, proxy
    _, code = proxy.stop(10)
    upstream.shutdown()
    upstream.server_close()
    assert code == 0


def round_trip(port: int, payload: bytes) -> tuple[bytes, float]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got, time.monotonic() - t0


def test_bytes_pass_in_order_with_the_delay_on_and_off(proxied):
    port, proxy = proxied
    payload = b"".join(b"line %06d\n" % i for i in range(20000))
    assert round_trip(port, payload)[0] == payload
    proxy.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)  # let the proxy handle the signal before the next connection
    got, secs = round_trip(port, payload)
    assert got == payload
    assert secs >= 0.15  # a delay can only make it slower: a lower bound is safe
    proxy.proc.send_signal(signal.SIGUSR2)
    time.sleep(0.2)
    assert round_trip(port, payload)[0] == payload


def test_switching_off_mid_stream_keeps_the_order(proxied):
    port, proxy = proxied
    proxy.proc.send_signal(signal.SIGUSR1)
    time.sleep(0.2)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        sent = b""
        for i in range(200):
            msg = b"msg %04d\n" % i
            s.sendall(msg)
            sent += msg
            if i == 100:
                proxy.proc.send_signal(signal.SIGUSR2)
            time.sleep(0.002)
        got = b""
        while len(got) < len(sent):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    assert got == sent
