"""Tests of the benchmark's own instrument: the C load generator and its reply checks.

Each test runs the real generator against a small in-process policy server that
behaves well or breaks the protocol in one specific way, and checks what the generator
reports. Run: ``python -m pytest benchmarks/test_loadgen.py -q`` (needs ``cc``).
"""

from __future__ import annotations

import json
import shutil
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import run

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")

Reply = Callable[[int, dict[str, str]], bytes | None]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run.build_loadgen(tmp_path_factory.mktemp("bin"))


class Recorder(socketserver.ThreadingTCPServer):
    """A policy server whose answers come from ``reply(n, request)``; None: hang up."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, reply: Reply) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.reply = reply
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()


class Handler(socketserver.StreamRequestHandler):
    server: Recorder

    def handle(self) -> None:
        n = 0
        attrs: dict[str, str] = {}
        while line := self.rfile.readline():
            if line != b"\n":
                name, _, value = line.decode().rstrip("\n").partition("=")
                attrs[name] = value
                continue
            with self.server.lock:
                self.server.requests.append(attrs)
            answer = self.server.reply(n, attrs)
            n += 1
            attrs = {}
            if answer is None:
                return
            if answer.startswith(b"SPLIT:"):  # one reply in two TCP segments
                head, tail = answer[6:].split(b"|", 1)
                self.wfile.write(head)
                time.sleep(0.01)
                self.wfile.write(tail)
            elif answer:
                self.wfile.write(answer)


@pytest.fixture
def serve() -> Iterator[Callable[[Reply], Recorder]]:
    servers: list[Recorder] = []

    def start(reply: Reply) -> Recorder:
        srv = Recorder(reply)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def drive(loadgen: Path, tmp_path: Path, srv: Recorder, *args: str, state: str = "RCPT",
          requests: int = 60, conns: int = 3) -> dict:
    template = run.make_template(tmp_path, state)
    argv = [str(loadgen), "run", "--port", str(srv.server_address[1]),
            "--template", str(template), "--conns", str(conns), "--requests", str(requests),
            "--warmup", "0", "--drain", "2", "--state", state, *args]
    res = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return json.loads(res.stdout)


def dunno(n: int, req: dict[str, str]) -> bytes:
    return b"action=DUNNO\n\n"


def test_requests_follow_the_captured_template(loadgen, tmp_path, serve):
    srv = serve(dunno)
    out = drive(loadgen, tmp_path, srv, "--senders", "25", "--dist", "seq", requests=100)
    captured = (run.FIXTURES / run.TEMPLATES["RCPT"]).read_text().splitlines()
    names = [line.partition("=")[0] for line in captured if line]
    assert out["window_replies"] == 100
    assert out["actions"] == {"DUNNO": 100}
    assert sum(out["errors"].values()) == 0
    reqs = srv.requests
    assert all(list(r) == names for r in reqs)  # same attributes, same order
    assert all(r["sasl_username"] == r["sender"] for r in reqs)
    assert all(r["protocol_state"] == "RCPT" and r["recipient_count"] == "0" for r in reqs)
    # seq: every one of the 25 senders, equally often
    counts: dict[str, int] = {}
    for r in reqs:
        counts[r["sasl_username"]] = counts.get(r["sasl_username"], 0) + 1
    assert len(counts) == 25
    assert set(counts.values()) == {len(reqs) // 25}
    # one recipient per message: every request is a new instance
    assert len({r["instance"] for r in reqs}) == len(reqs)
    assert len({r["recipient"] for r in reqs}) > len(reqs) // 2
    assert len({r["client_port"] for r in reqs}) > 1
    assert out["total_counted"] == out["total_replies"] == len(reqs)


def test_data_requests_carry_the_recipient_count(loadgen, tmp_path, serve):
    srv = serve(dunno)
    out = drive(loadgen, tmp_path, srv, "--rcpts", "3", state="DATA", requests=20)
    assert all(r["protocol_state"] == "DATA" and r["recipient_count"] == "3"
               for r in srv.requests)
    assert all(r["queue_id"] and r["recipient"] == "" for r in srv.requests)
    assert out["total_counted"] == 3 * out["total_replies"]


def test_rcpt_messages_with_several_recipients_share_sender_and_instance(
        loadgen, tmp_path, serve):
    srv = serve(dunno)
    drive(loadgen, tmp_path, srv, "--rcpts", "4", requests=40, conns=1)
    reqs = srv.requests
    for i in range(0, 40, 4):
        msg = reqs[i:i + 4]
        assert len({r["instance"] for r in msg}) == 1
        assert len({r["sasl_username"] for r in msg}) == 1
        assert len({r["recipient"] for r in msg}) == 4


def test_over_quota_replies_are_counted_apart(loadgen, tmp_path, serve):
    def reply(n: int, req: dict[str, str]) -> bytes:
        return b"action=471 daily message quota exceeded\n\n" if n % 2 else b"action=dunno\n\n"

    out = drive(loadgen, tmp_path, serve(reply), requests=60, conns=1)
    assert out["actions"] == {"DUNNO": 30, "471": 30}
    assert run.classify(out["actions"]) == (30, 30, 0)


def test_a_reply_split_across_segments_is_valid(loadgen, tmp_path, serve):
    out = drive(loadgen, tmp_path, serve(lambda n, r: b"SPLIT:action=DU|NNO\n\n"),
                requests=10, conns=2)
    assert out["actions"] == {"DUNNO": 10}
    assert sum(out["errors"].values()) == 0


@pytest.mark.parametrize("bad", [
    b"action=DUNNO\r\n\r\n",           # CR
    b"action=DUNNO\nfoo=bar\n\n",      # a second attribute
    b"action=\n\n",                    # empty action
    b"result=DUNNO\n\n",               # not action=
    b"action=DUNNO\n\naction=DUNNO\n\n",  # more than one reply
])
def test_malformed_replies_are_errors(loadgen, tmp_path, serve, bad):
    out = drive(loadgen, tmp_path, serve(lambda n, r: bad), requests=6, conns=2)
    assert out["errors"]["malformed"] >= 1
    assert out["bad_sample"]
    assert out["actions"] == {}  # nothing malformed is counted as a decision


def test_dropped_connections_are_errors_and_reconnected(loadgen, tmp_path, serve):
    out = drive(loadgen, tmp_path, serve(lambda n, r: None if n == 2 else b"action=DUNNO\n\n"),
                requests=30, conns=2)
    assert out["errors"]["closed"] >= 2
    assert out["actions"]["DUNNO"] >= 20  # it reconnected and went on


def test_unanswered_requests_time_out(loadgen, tmp_path, serve):
    out = drive(loadgen, tmp_path, serve(lambda n, r: b""), "--timeout-ms", "200",
                requests=4, conns=2)
    assert out["errors"]["timeout"] >= 2
    assert out["window_replies"] == 0


def test_cold_senders_are_new_and_measured_apart(loadgen, tmp_path, serve):
    srv = serve(dunno)
    out = drive(loadgen, tmp_path, srv, "--senders", "10", "--cold-frac", "0.5",
                "--cold-base", "5000", requests=200)
    cold = [r for r in srv.requests if int(r["sasl_username"][4:].split("@")[0]) >= 5000]
    assert len({r["sasl_username"] for r in cold}) == len(cold) > 50
    assert out["latency_cold"]["n"] + out["latency_hot"]["n"] == out["latency"]["n"]
    assert out["latency_cold"]["n"] > 50


def test_null_server_answers_every_request(loadgen, tmp_path):
    port = run.free_port()
    svc = run.Service("null", [str(loadgen), "serve", "--port", str(port)], tmp_path)
    svc.start(port)
    try:
        template = run.make_template(tmp_path, "RCPT")
        res = subprocess.run([str(loadgen), "run", "--port", str(port), "--template",
                              str(template), "--conns", "20", "--requests", "2000",
                              "--warmup", "0"], capture_output=True, text=True, timeout=60,
                             check=True)
        out = json.loads(res.stdout)
    finally:
        _, code = svc.stop(10)
    assert out["actions"] == {"DUNNO": out["latency"]["n"]}
    assert out["window_replies"] == 2000
    assert code == 0
