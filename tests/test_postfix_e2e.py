"""End to end: a real Postfix smtpd asks the policy service, smtplib is the mail client.

First what Postfix itself does (a recording policy server written here), then the daemon as
a subprocess: quotas, the 4xx reply the client sees, per-message counting, and Postfix's
behaviour while the daemon is stopped or restarted. The Postfix instance is private
(tests/fixtures_postfix.py); every message goes to the discard transport.
"""

from __future__ import annotations

import contextlib
import signal
import smtplib
import socket
import socketserver
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fixtures_postfix import (
    POLICY_DOWN_ACTION,
    RELAY_DOMAIN,
    USERS,
    Placement,
    PostfixInstance,
    wait_for_port,
)

pytestmark = [pytest.mark.postfix, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parent.parent
OVER_QUOTA = "471 daily message quota exceeded"

ALICE, BOB, CAROL = USERS


# --- SMTP client helpers ----------------------------------------------------------------

def message(sender: str, recipients: list[str]) -> str:
    return (
        f"From: <{sender}>\r\nTo: {', '.join(recipients)}\r\nSubject: e2e\r\n\r\nhello\r\n"
    )


def remote(n: int) -> list[str]:
    """n recipients outside relay_domains: Postfix relays them only for SASL clients."""
    return [f"r{i}@remote.example" for i in range(1, n + 1)]


def login(postfix: PostfixInstance, user: str) -> smtplib.SMTP:
    client = postfix.smtp()
    client.login(user, USERS[user])
    return client


def send(client: smtplib.SMTP, sender: str, recipients: list[str]) -> None:
    """One message; raises if any recipient or the DATA command is refused."""
    refused = client.sendmail(sender, recipients, message(sender, recipients))
    assert refused == {}, refused


def refusal(client: smtplib.SMTP, sender: str, recipients: list[str]) -> tuple[int, str]:
    """Send a message that Postfix must refuse entirely; (code, text) of the refusal.

    At RCPT every recipient gets the same reply (smtplib raises SMTPRecipientsRefused);
    at DATA the DATA command is refused (SMTPDataError).
    """
    try:
        client.sendmail(sender, recipients, message(sender, recipients))
    except smtplib.SMTPRecipientsRefused as exc:
        replies = set(exc.recipients.values())
        assert len(replies) == 1, replies
        code, text = replies.pop()
        return code, text.decode()
    except smtplib.SMTPDataError as exc:
        # smtplib leaves the transaction open when DATA itself is refused.
        client.rset()
        error = exc.smtp_error
        return exc.smtp_code, error.decode() if isinstance(error, bytes) else error
    raise AssertionError(f"message from {sender} to {recipients} was accepted")


def over_quota_reply(postfix: PostfixInstance, user: str) -> tuple[int, str]:
    """What the SMTP client sees for `action=471 daily message quota exceeded`.

    Postfix adds the enhanced status code 4.7.1 and names what it refused.
    """
    if postfix.placement == "rcpt":
        return 471, f"4.7.1 <{user}>: Sender address rejected: daily message quota exceeded"
    return 471, "4.7.1 <DATA>: Data command rejected: daily message quota exceeded"


def policy_down_reply(postfix: PostfixInstance, user: str) -> tuple[int, str]:
    """What the client sees when Postfix applies smtpd_policy_service_default_action."""
    code, dsn, text = POLICY_DOWN_ACTION.split(" ", 2)
    what = f"<{user}>: Sender address rejected" if postfix.placement == "rcpt" else (
        "<DATA>: Data command rejected")
    return int(code), f"{dsn} {what}: {text}"


def send_as(postfix: PostfixInstance, user: str, count: int) -> None:
    """`count` one-recipient messages from `user` in one authenticated session."""
    with contextlib.closing(login(postfix, user)) as client:
        for _ in range(count):
            send(client, user, remote(1))


# --- a recording policy server (tests what Postfix sends; no daemon involved) ----------

class RecordingPolicyServer(socketserver.ThreadingTCPServer):
    """Answers every request with `action=<action>` and keeps the attributes it got."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self, port: int, action: str) -> None:
        self.action = action
        self.requests: list[dict[str, str]] = []
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        super().__init__(("127.0.0.1", port), _RecordingHandler)

    def close_all(self) -> None:
        # Postfix keeps policy connections open; end them so the next test starts clean.
        self.shutdown()
        with self.lock:
            for conn in self.connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        self.server_close()


class _RecordingHandler(socketserver.StreamRequestHandler):
    server: RecordingPolicyServer

    def handle(self) -> None:
        with self.server.lock:
            self.server.connections.add(self.connection)
        attrs: dict[str, str] = {}
        for raw in self.rfile:
            line = raw.decode().rstrip("\n")
            if line:
                name, _, value = line.partition("=")
                attrs[name] = value
                continue
            with self.server.lock:
                self.server.requests.append(attrs)
            self.wfile.write(f"action={self.server.action}\n\n".encode())
            attrs = {}


@contextlib.contextmanager
def recording_server(postfix: PostfixInstance, action: str) -> Iterator[RecordingPolicyServer]:
    server = RecordingPolicyServer(postfix.policy_port, action)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.close_all()
        thread.join()


# --- the daemon under test, as a subprocess ---------------------------------------------

class PolicyDaemon:
    """`python -m ratelimit_policyd run` on the Postfix instance's policy port."""

    def __init__(self, port: int, workdir: Path, quota: int) -> None:
        self.port = port
        self.db = workdir / "ratelimit.sqlite3"
        self.log = workdir / "policyd.log"
        self.output = workdir / "policyd.out"
        # An empty config file: neither /etc nor $RATELIMIT_POLICYD_CONFIG leaks into the test.
        self.config = workdir / "policyd.conf"
        self.config.touch()
        self.quota = quota
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "ratelimit_policyd", "run",
            "--config", str(self.config),
            "--listen", f"127.0.0.1:{self.port}",
            "--db", f"sqlite:///{self.db}",
            "--default-quota", str(self.quota),
            "--period", "daily",
            "--flush-interval", "1",
            "--log-file", str(self.log),
        ]
        with self.output.open("ab") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, stdout=out,
                                         stderr=subprocess.STDOUT)
        proc = self.proc
        try:
            wait_for_port(self.port, alive=lambda: proc.poll() is None)
        except Exception:
            self.kill()
            pytest.fail(f"daemon did not start: {argv}\n{self.output.read_text()}")

    def stop(self) -> None:
        """SIGTERM: graceful stop with a final flush; it must exit 0."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        finally:
            self.kill()
        assert code == 0, f"daemon exited {code}:\n{self.output.read_text()}"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def used(self) -> dict[str, int]:
        """sender -> used, read from the SQLite file (call after stop())."""
        assert self.proc is None, "read the database after the daemon stopped"
        with contextlib.closing(sqlite3.connect(self.db)) as db:
            return dict(db.execute("SELECT sender, used FROM ratelimit").fetchall())


@pytest.fixture(scope="module", params=["rcpt", "data"])
def postfix(
    request: pytest.FixtureRequest, postfix_factory: Callable[[Placement], PostfixInstance]
) -> PostfixInstance:
    """Postfix with the policy check per RCPT (sender restrictions) or per message (DATA)."""
    placement: Placement = request.param
    return postfix_factory(placement)


@pytest.fixture
def daemon(postfix: PostfixInstance, tmp_path: Path) -> Iterator[Callable[[int], PolicyDaemon]]:
    """start(quota) -> a running daemon with a fresh SQLite db; killed at teardown if left."""
    started: list[PolicyDaemon] = []

    def start(quota: int) -> PolicyDaemon:
        d = PolicyDaemon(postfix.policy_port, tmp_path, quota)
        d.start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.kill()


# --- what Postfix sends and does (recording server) -------------------------------------

def test_rcpt_placement_asks_once_per_recipient(
    postfix_factory: Callable[[Placement], PostfixInstance],
) -> None:
    postfix = postfix_factory("rcpt")
    with (
        recording_server(postfix, "DUNNO") as server,
        contextlib.closing(login(postfix, ALICE)) as client,
    ):
        send(client, ALICE, remote(3))
    states = [(r["protocol_state"], r["sasl_username"], r["recipient"]) for r in server.requests]
    assert states == [("RCPT", ALICE, rcpt) for rcpt in remote(3)]
    assert {r["recipient_count"] for r in server.requests} == {"0"}


def test_data_placement_asks_once_per_message(
    postfix_factory: Callable[[Placement], PostfixInstance],
) -> None:
    postfix = postfix_factory("data")
    with (
        recording_server(postfix, "DUNNO") as server,
        contextlib.closing(login(postfix, BOB)) as client,
    ):
        send(client, BOB, remote(3))
        send(client, BOB, remote(1))
    seen = [(r["protocol_state"], r["sasl_username"], r["recipient_count"])
            for r in server.requests]
    assert seen == [("DATA", BOB, "3"), ("DATA", BOB, "1")]


def test_unauthenticated_request_has_empty_sasl_username(postfix: PostfixInstance) -> None:
    with (
        recording_server(postfix, "DUNNO") as server,
        contextlib.closing(postfix.smtp()) as client,
    ):
        send(client, ALICE, [f"u1@{RELAY_DOMAIN}"])
    assert len(server.requests) == 1
    assert server.requests[0]["sasl_username"] == ""
    assert server.requests[0]["sender"] == ALICE


def test_policy_4xx_action_reaches_the_client(postfix: PostfixInstance) -> None:
    with (
        recording_server(postfix, OVER_QUOTA) as server,
        contextlib.closing(login(postfix, CAROL)) as client,
    ):
        first = refusal(client, CAROL, remote(1))
        # The session survives a refusal: the client may try again later on it.
        second = refusal(client, CAROL, remote(1))
    assert first == second == over_quota_reply(postfix, CAROL)
    assert len(server.requests) == 2


def test_policy_service_down_gives_default_action(postfix: PostfixInstance) -> None:
    # Nothing listens on the policy port: Postfix tries try_limit times, then gives up.
    with contextlib.closing(login(postfix, ALICE)) as client:
        assert refusal(client, ALICE, remote(1)) == policy_down_reply(postfix, ALICE)


# --- the daemon --------------------------------------------------------------------------

def test_quota_then_4xx_reply(
    postfix: PostfixInstance, daemon: Callable[[int], PolicyDaemon]
) -> None:
    policyd = daemon(3)
    with contextlib.closing(login(postfix, ALICE)) as client:
        for _ in range(3):
            send(client, ALICE, remote(1))
        assert refusal(client, ALICE, remote(1)) == over_quota_reply(postfix, ALICE)
        assert refusal(client, ALICE, remote(1)) == over_quota_reply(postfix, ALICE)
    policyd.stop()
    # Refused attempts count too (as in the Perl daemon): 3 sent + 2 refused.
    assert policyd.used() == {ALICE: 5}
    log = policyd.log.read_text()
    assert f"sasl_username={ALICE}, recipient_count=" in log
    assert "curr_count=5/3, status=OVER_QUOTA" in log


def test_message_with_three_recipients_counts_three(
    postfix: PostfixInstance, daemon: Callable[[int], PolicyDaemon]
) -> None:
    policyd = daemon(4)
    with contextlib.closing(login(postfix, BOB)) as client:
        send(client, BOB, remote(3))
        send(client, BOB, remote(1))
        assert refusal(client, BOB, remote(1)) == over_quota_reply(postfix, BOB)
    policyd.stop()
    assert policyd.used() == {BOB: 5}


def test_rcpt_placement_refuses_only_the_recipients_over_quota(
    postfix_factory: Callable[[Placement], PostfixInstance], tmp_path: Path
) -> None:
    postfix = postfix_factory("rcpt")
    policyd = PolicyDaemon(postfix.policy_port, tmp_path, 2)
    policyd.start()
    try:
        with contextlib.closing(login(postfix, ALICE)) as client:
            refused = client.sendmail(ALICE, remote(3), message(ALICE, remote(3)))
    finally:
        policyd.stop()
    # Per RCPT, the message still goes to the first two; the third is deferred.
    assert refused == {remote(3)[2]: (471, over_quota_reply(postfix, ALICE)[1].encode())}
    assert policyd.used() == {ALICE: 3}


def test_data_placement_refuses_the_whole_message_over_quota(
    postfix_factory: Callable[[Placement], PostfixInstance], tmp_path: Path
) -> None:
    postfix = postfix_factory("data")
    policyd = PolicyDaemon(postfix.policy_port, tmp_path, 2)
    policyd.start()
    try:
        with contextlib.closing(login(postfix, ALICE)) as client:
            assert refusal(client, ALICE, remote(3)) == over_quota_reply(postfix, ALICE)
    finally:
        policyd.stop()
    # One request for the whole message, counting its recipient_count.
    assert policyd.used() == {ALICE: 3}


def test_users_are_counted_independently(
    postfix: PostfixInstance, daemon: Callable[[int], PolicyDaemon]
) -> None:
    policyd = daemon(2)
    send_as(postfix, ALICE, 2)
    with contextlib.closing(login(postfix, ALICE)) as client:
        assert refusal(client, ALICE, remote(1)) == over_quota_reply(postfix, ALICE)
    # Alice at her limit does not touch Bob's or Carol's quota.
    send_as(postfix, BOB, 2)
    send_as(postfix, CAROL, 1)
    with contextlib.closing(login(postfix, BOB)) as client:
        assert refusal(client, BOB, remote(1)) == over_quota_reply(postfix, BOB)
    policyd.stop()
    assert policyd.used() == {ALICE: 3, BOB: 3, CAROL: 1}


def test_unauthenticated_mail_is_neither_counted_nor_blocked(
    postfix: PostfixInstance, daemon: Callable[[int], PolicyDaemon]
) -> None:
    policyd = daemon(1)
    local = [f"u{i}@{RELAY_DOMAIN}" for i in range(1, 3)]
    with contextlib.closing(postfix.smtp()) as client:
        # MAIL FROM a user's address does not make it that user's mail: no AUTH, no count.
        for _ in range(3):
            send(client, ALICE, local)
        send(client, "", local[:1])
    # Alice's own quota is untouched by the unauthenticated mail in her name.
    send_as(postfix, ALICE, 1)
    policyd.stop()
    assert policyd.used() == {ALICE: 1}


def test_daemon_down_gives_default_action_and_restart_keeps_counts(
    postfix: PostfixInstance, daemon: Callable[[int], PolicyDaemon]
) -> None:
    policyd = daemon(3)
    send_as(postfix, ALICE, 1)
    policyd.stop()
    assert policyd.used() == {ALICE: 1}
    with contextlib.closing(login(postfix, ALICE)) as client:
        assert refusal(client, ALICE, remote(1)) == policy_down_reply(postfix, ALICE)
    policyd.start()  # same database
    # 1 counted before the stop, none while down: exactly 2 more fit in the quota of 3.
    send_as(postfix, ALICE, 2)
    with contextlib.closing(login(postfix, ALICE)) as client:
        assert refusal(client, ALICE, remote(1)) == over_quota_reply(postfix, ALICE)
    policyd.stop()
    assert policyd.used() == {ALICE: 4}


def test_restart_between_messages_of_one_session_counts_each_once(
    postfix: PostfixInstance, daemon: Callable[[int], PolicyDaemon]
) -> None:
    policyd = daemon(10)
    with contextlib.closing(login(postfix, BOB)) as client:
        send(client, BOB, remote(2))
        # smtpd still holds its policy connection to the stopped daemon: it finds it closed,
        # waits retry_delay, reconnects to the new daemon and asks once.
        policyd.stop()
        policyd.start()
        send(client, BOB, remote(1))
        send(client, BOB, remote(1))
    policyd.stop()
    assert policyd.used() == {BOB: 4}
