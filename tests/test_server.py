"""server + engine over real sockets, with the real SQLite storage and flusher."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ratelimit_policyd.cache import QuotaCache
from ratelimit_policyd.engine import Engine
from ratelimit_policyd.flusher import Flusher
from ratelimit_policyd.model import Period
from ratelimit_policyd.policy import Limits
from ratelimit_policyd.server import AccessList, PolicyServer, parse_listen, parse_networks
from ratelimit_policyd.storage import open_storage
from ratelimit_policyd.storage.base import Storage
from ratelimit_policyd.window import Calendar
from tests.fixtures_common import fixture_names, read_fixture
from tests.policyclient import PolicyClient, request_bytes

pytestmark = pytest.mark.timeout(60)


@dataclass
class Stack:
    server: PolicyServer
    engine: Engine
    cache: QuotaCache
    flusher: Flusher
    storage: Storage

    @property
    def port(self) -> int:
        return self.server.port

    def used(self, key: str) -> int:
        self.flusher.flush_once()
        row = self.storage.load([key]).get(key)
        return row.used if row else 0


def start_stack(tmp_path: Path, limits: Limits | None = None, **server_kw: Any) -> Stack:
    limits = limits or Limits(default_quota=5)
    storage = open_storage(f"sqlite:///{tmp_path}/db.sqlite3", create_schema=True)
    cache = QuotaCache(Calendar(limits.period, "UTC"), limits.default_quota)
    engine = Engine(limits, cache, storage)
    flusher = Flusher(cache, storage, 0.2, default_quota=lambda: engine.limits.default_quota)
    kw: dict[str, Any] = {"allowed": AccessList(parse_networks(["127.0.0.1", "::1"]))}
    kw.update(server_kw)
    server = PolicyServer(("127.0.0.1", 0), engine.handle, **kw)
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    ).start()
    flusher.start()
    return Stack(server, engine, cache, flusher, storage)


def stop_stack(st: Stack) -> None:
    st.server.shutdown()
    st.server.server_close()
    st.server.drain(2.0)
    st.flusher.close(5.0)
    st.storage.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    st = start_stack(tmp_path)
    yield st
    stop_stack(st)


def test_every_captured_request_gets_an_answer_on_one_connection(stack: Stack) -> None:
    with PolicyClient(stack.port) as c:
        for name in fixture_names():
            action = c.ask(read_fixture(name))
            assert action in ("DUNNO", "471 daily message quota exceeded"), (name, action)


def test_counts_and_over_quota_reply(stack: Stack) -> None:
    with PolicyClient(stack.port) as c:
        answers = [c.ask(request_bytes(sasl_username="Alice@Example.com")) for _ in range(7)]
    assert answers == ["DUNNO"] * 5 + ["471 daily message quota exceeded"] * 2
    # Attempts over quota are counted too, as in the Perl daemon.
    assert stack.used("alice@example.com") == 7


def test_unauthenticated_and_other_states_are_not_counted(stack: Stack) -> None:
    with PolicyClient(stack.port) as c:
        for _ in range(10):
            assert c.ask(request_bytes(sasl_username="")) == "DUNNO"
            assert c.ask(request_bytes(protocol_state="VRFY")) == "DUNNO"
    assert stack.used("alice@example.com") == 0


def test_data_counts_recipient_count(stack: Stack) -> None:
    data = read_fixture("data-sasl-alice-3rcpt.txt")
    with PolicyClient(stack.port) as c:
        assert c.ask(data) == "DUNNO"
        assert (
            c.ask(data.replace(b"instance=", b"instance=x")) == "471 daily message quota exceeded"
        )  # 6 > 5
    assert stack.used("alice@example.com") == 6


def test_postfix_retry_is_answered_the_same_and_not_counted_twice(stack: Stack) -> None:
    # Postfix re-sends the very same request when it did not get the reply.
    data = read_fixture("data-sasl-alice-3rcpt.txt")
    with PolicyClient(stack.port) as c:
        assert c.ask(data) == "DUNNO"
    with PolicyClient(stack.port) as c:  # the retry comes on a new connection
        assert c.ask(data) == "DUNNO"
        assert (
            c.ask(data.replace(b"instance=", b"instance=x")) == "471 daily message quota exceeded"
        )
    assert stack.used("alice@example.com") == 6


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_requests_split_and_pipelined(stack: Stack, chunk: int) -> None:
    stream = b"".join(
        read_fixture(n)
        for n in ("rcpt-sasl-bob-login-1.txt", "rcpt-unauth-1.txt", "rcpt-sasl-carol-1.txt")
    )
    with PolicyClient(stack.port) as c:
        for i in range(0, len(stream), chunk):
            c.send(stream[i : i + chunk])
        assert [c.read_reply() for _ in range(3)] == ["DUNNO"] * 3
    assert stack.used("bob@example.com") == 1
    assert stack.used("carol@other.org") == 1


def test_concurrent_connections_count_exactly(stack: Stack) -> None:
    stack.engine.set_limits(Limits(default_quota=10**6))
    stack.cache.reconfigure(Calendar(Period.DAILY, "UTC"), 10**6)
    per_conn, conns = 200, 12

    def run(i: int) -> None:
        with PolicyClient(stack.port) as c:
            for j in range(per_conn):
                assert c.ask(request_bytes(sasl_username=f"u{j % 4}@example.com")) == "DUNNO"

    threads = [threading.Thread(target=run, args=(i,)) for i in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(stack.used(f"u{k}@example.com") for k in range(4)) == per_conn * conns


def test_garbage_closes_only_that_connection(stack: Stack) -> None:
    with PolicyClient(stack.port) as good, PolicyClient(stack.port) as bad:
        bad.send(b"\x00\x01\x02 no equals sign here\n\n")
        assert bad.closed_by_server()
        assert good.ask(request_bytes()) == "DUNNO"


def test_oversized_request_closes_the_connection(tmp_path: Path) -> None:
    st = start_stack(tmp_path, max_request_bytes=4096)
    try:
        with PolicyClient(st.port) as c:
            c.send(b"name=" + b"x" * 10_000)
            assert c.closed_by_server()
        with PolicyClient(st.port) as c:
            assert c.ask(request_bytes()) == "DUNNO"
    finally:
        stop_stack(st)


def test_stalled_request_is_closed_after_request_timeout(tmp_path: Path) -> None:
    st = start_stack(tmp_path, request_timeout=0.5)
    try:
        with PolicyClient(st.port) as c:
            c.send(b"request=smtpd_access_policy\n")
            assert c.closed_by_server(wait=10)
    finally:
        stop_stack(st)


def test_client_outside_allowed_hosts_is_refused(tmp_path: Path) -> None:
    st = start_stack(tmp_path, allowed=AccessList(parse_networks(["10.0.0.0/8"])))
    try:
        with PolicyClient(st.port) as c:
            assert c.closed_by_server()
        assert st.server.rejected_total == 1
    finally:
        stop_stack(st)


def test_max_connections(tmp_path: Path) -> None:
    st = start_stack(tmp_path, max_connections=2)
    try:
        with PolicyClient(st.port) as a, PolicyClient(st.port) as b:
            assert a.ask(request_bytes()) == "DUNNO"
            assert b.ask(request_bytes()) == "DUNNO"
            with PolicyClient(st.port) as c:
                assert c.closed_by_server()
            assert a.ask(request_bytes()) == "DUNNO"
    finally:
        stop_stack(st)


def test_drain_answers_in_flight_and_closes_idle(stack: Stack) -> None:
    with PolicyClient(stack.port) as idle:
        assert idle.ask(request_bytes()) == "DUNNO"
        stack.server.shutdown()
        stack.server.server_close()
        assert stack.server.drain(5.0) == 0
        assert idle.closed_by_server()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", stack.port), timeout=1).close()


def test_ipv6_listen(tmp_path: Path) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this host")
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    limits = Limits(default_quota=5)
    storage = open_storage(f"sqlite:///{tmp_path}/db.sqlite3", create_schema=True)
    cache = QuotaCache(Calendar(limits.period, "UTC"), 5)
    engine = Engine(limits, cache, storage)
    server = PolicyServer(
        parse_listen("[::1]:0"), engine.handle, allowed=AccessList(parse_networks(["::1"]))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with PolicyClient(server.port, host="::1") as c:
            assert c.ask(request_bytes()) == "DUNNO"
    finally:
        server.shutdown()
        server.server_close()
        storage.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:10032", ("127.0.0.1", 10032)),
        ("[::1]:10032", ("::1", 10032)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
    ],
)
def test_parse_listen(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize("value", ["10032", "::1:10032", "host:", "host:99999", ":10032"])
def test_parse_listen_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        parse_listen(value)


def test_access_list_v4_mapped() -> None:
    acl = AccessList(parse_networks(["127.0.0.1", "10.0.0.0/8"]))
    assert acl.allows("127.0.0.1") and acl.allows("::ffff:10.1.2.3")
    assert not acl.allows("192.0.2.1") and not acl.allows("garbage")
