"""Tests of the benchmark's delay proxy (benchmarks/delayproxy.py), on real sockets.

The proxy must pass every byte, in order, in both directions, including bytes a client
sends the moment it connects; hold server-to-client bytes for the delay while it is on
(SIGUSR1) and not while it is off (SIGUSR2); and handle its signals from the moment its
port accepts connections. Run: ``python -m pytest benchmarks/test_delayproxy.py -q``.
"""

from __future__ import annotations

import signal
import socket
import socketserver
import subprocess
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
def echo_port() -> Iterator[int]:
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    yield upstream.server_address[1]
    upstream.shutdown()
    upstream.server_close()


@pytest.fixture
def proxied(tmp_path: Path, echo_port: int) -> Iterator[tuple[int, run.Service]]:
    port = run.free_port()
    proxy = run.Service("proxy", [
        sys.executable, str(run.HERE / "delayproxy.py"), "--port", str(port), "--off",
        "--upstream", f"127.0.0.1:{echo_port}", "--delay-ms", "150"],
        tmp_path)
    proxy.start(port)
    yield port, proxy
    _, code = proxy.stop(10)
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


def test_bytes_sent_the_moment_a_client_connects_are_not_lost(proxied):
    """A client may write before the proxy has its upstream connection (an echo client
    does; so does any protocol where the client speaks first). On Python 3.11.2 the old
    proxy's pause_reading() in connection_made() was ignored and those bytes dropped."""
    port, _ = proxied
    for i in range(20):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            payload = b"first bytes %02d\n" % i
            s.sendall(payload)  # at once: the proxy cannot have reached the upstream yet
            got = b""
            while len(got) < len(payload):
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert got == payload, i


# Runs delayproxy.py with listen() held open: the port accepts connections (what
# run.Service takes for readiness) but the proxy goes no further until the test writes a
# line to its stdin. A signal sent in that pause must find the proxy's handlers in place.
HOLD_AFTER_LISTEN = """
import runpy, socket, sys
real_listen = socket.socket.listen
def listen(self, *args):
    real_listen(self, *args)
    sys.stdin.readline()
socket.socket.listen = listen
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_a_signal_right_at_readiness_is_handled(tmp_path: Path, echo_port: int,
                                                sig: signal.Signals) -> None:
    port = run.free_port()
    with (tmp_path / "proxy.out").open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD_AFTER_LISTEN, str(run.HERE / "delayproxy.py"),
             "--port", str(port), "--upstream", f"127.0.0.1:{echo_port}",
             "--delay-ms", "150", "--off"],
            stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    assert proc.stdin is not None
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "proxy.out").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=5).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the proxy never listened"
                time.sleep(0.01)
        # Ready by the port; the proxy is held in listen(), so this signal arrives
        # before it could run another line of its own.
        proc.send_signal(sig)
        proc.stdin.write(b"go\n")
        proc.stdin.close()
        if sig == signal.SIGTERM:
            assert proc.wait(30) == 0, (tmp_path / "proxy.out").read_text()
            return
        # SIGUSR1 was not fatal, and it switched the delay on (the proxy began --off).
        payload = b"after the signal\n"
        try:
            got, secs = round_trip(port, payload)
        except OSError as exc:
            pytest.fail(f"the proxy is gone (exit {proc.wait(30)}): {exc}")
        assert proc.poll() is None, (tmp_path / "proxy.out").read_text()
        assert got == payload
        assert secs >= 0.15  # a delay can only make it slower: a lower bound is safe
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
