"""Hostile or broken input on the policy port of a real daemon process.

Each abuse must get a bounded, logged outcome (the connection closed, or DUNNO), while a
well-behaved client on another connection keeps being served and counted exactly, no
row is corrupted, and the process's memory stays bounded. Idle Postfix connections are
kept at least as long as Postfix keeps them.
"""

from __future__ import annotations

import contextlib
import random
import socket
import time
import tomllib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimit_policyd.config import Settings
from tests.faultkit import Database, Load, MySQLDaemon, toml, wait_for_counts, wait_until
from tests.fixtures_mariadb import MariaDB, unavailable
from tests.policyclient import PolicyClient, request_bytes
from tests.test_daemon import DaemonProc

pytestmark = pytest.mark.timeout(90)

ROOT = Path(__file__).resolve().parent.parent
WITNESS = "witness@example.com"
MAX_REQUEST = 4096
#: smtpd_policy_service_max_idle: Postfix closes an idle policy connection after this.
POSTFIX_MAX_IDLE = 300


class Hostile:
    """The daemon under attack (MySQL) and a well-behaved client counted alongside."""

    def __init__(self, daemon: MySQLDaemon, db: Database) -> None:
        self.daemon = daemon
        self.db = db
        self.counted: Counter[str] = Counter()

    @property
    def port(self) -> int:
        return self.daemon.port

    def served(self, times: int = 3, key: str = WITNESS) -> None:
        """A good client still gets answers, and they are counted."""
        with PolicyClient(self.port) as c:
            for _ in range(times):
                assert c.ask(request_bytes(sasl_username=key)) == "DUNNO"
        self.counted[key] += times

    def exact(self) -> None:
        """The database holds exactly what the good clients were counted, nothing else."""
        wait_for_counts(self.db, self.counted)
        assert self.db.used() == dict(self.counted)


@pytest.fixture(scope="module")
def hostile(mariadb: MariaDB, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    db = Database.create(mariadb)
    config = {"server": {"max_request_bytes": MAX_REQUEST, "allowed_hosts": ["127.0.0.1"]}}
    d = MySQLDaemon(tmp_path_factory.mktemp("hostile"), db.url, "--flush-interval", "0.3",
                    "--default-quota", "100000", config=config)
    try:
        yield Hostile(d, db)
    finally:
        code = d.stop()
        mariadb.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
    assert code == 0


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProc]:
    """A daemon (SQLite) with short timeouts and few connections, to see them enforced."""
    tmp = tmp_path_factory.mktemp("edge")
    conf = tmp / "rl.conf"
    conf.write_text(toml({"server": {"idle_timeout": 1.5, "request_timeout": 0.5,
                                     "max_connections": 5}}))
    d = DaemonProc(tmp, "--flush-interval", "0.3", config=conf)
    yield d
    assert d.stop() == 0


def eof_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes; (closed in time, everything it sent)."""
    sock.settimeout(0.2)
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


# -- the policy port: size, garbage, encoding ------------------------------------------


@pytest.mark.mysql
def test_overlong_line_and_request_close_only_that_connection(hostile: Hostile) -> None:
    with PolicyClient(hostile.port) as good:
        assert good.ask(request_bytes(sasl_username=WITNESS)) == "DUNNO"
        hostile.counted[WITNESS] += 1
        for junk in (
            b"sasl_username=" + b"x" * (MAX_REQUEST * 3),  # one endless line
            b"a=b\n" * 300,  # more lines than a request may have (256), in 1200 bytes
            request_bytes(sasl_username=WITNESS, ccert_subject="y" * MAX_REQUEST),  # whole
        ):
            with PolicyClient(hostile.port) as bad:
                bad.send(junk)
                assert bad.closed_by_server()
        assert good.ask(request_bytes(sasl_username=WITNESS)) == "DUNNO"
        hostile.counted[WITNESS] += 1
    text = hostile.daemon.wait_log("attribute lines, limit 256; closing the connection")
    assert text.count(f"limit {MAX_REQUEST}; closing the connection") >= 2
    hostile.exact()


@pytest.mark.mysql
def test_binary_garbage_gets_dunno_or_a_close_and_counts_nothing(hostile: Hostile) -> None:
    rng = random.Random(4)
    for i in range(60):
        size = rng.choice([1, 17, 512, 3000, 9000])
        junk = bytes(rng.getrandbits(8) for _ in range(size))
        if i % 3 == 0:  # garbage that looks like attributes at first
            junk = b"request=smtpd_access_policy\nsasl_username=" + junk
        with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as s:
            try:
                s.sendall(junk)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already closed by the server: fine
            closed, sent = eof_within(s, 10)
        assert closed
        # Whatever parsed as a request without a SASL user is answered DUNNO.
        assert sent.replace(b"action=DUNNO\n\n", b"") == b""
    hostile.served()
    hostile.exact()  # no row for anything in the garbage


@pytest.mark.mysql
def test_non_utf8_bytes_are_replaced_not_fatal(hostile: Hostile) -> None:
    with PolicyClient(hostile.port) as c:
        for _ in range(3):  # three requests (each its own instance, so not retries)
            raw = request_bytes(sasl_username="PLACEHOLDER", client_name="PLACEHOLDER2")
            raw = raw.replace(b"PLACEHOLDER2", b"\xc3\x28\xa0\xa1").replace(
                b"PLACEHOLDER", b"bad\xff\xfename@example.com")
            assert c.ask(raw) == "DUNNO"
    # Invalid bytes become U+FFFD (the codec's documented decoding): one key, counted.
    hostile.counted["bad\ufffd\ufffdname@example.com"] += 3
    hostile.served()
    hostile.exact()


# -- usernames -------------------------------------------------------------------------


@pytest.mark.mysql
def test_usernames_longer_than_the_sender_column_are_not_counted(hostile: Hostile) -> None:
    fits = "a" * 243 + "@example.com"  # 255 characters: the column's width
    wide = "é" * 243 + "@example.com"  # 255 characters, 498 bytes: still fits
    too_long = "b" * 244 + "@example.com"  # 256
    huge = "c" * 3000 + "@example.com"
    with PolicyClient(hostile.port) as c:
        for key in (fits, wide, too_long, huge):
            for _ in range(2):
                assert c.ask(request_bytes(sasl_username=key)) == "DUNNO"
    hostile.counted[fits] += 2
    hostile.counted[wide] += 2
    hostile.served()
    hostile.exact()
    hostile.daemon.wait_log("request not counted (key too long)")


SQL_NASTIES = [
    "o'brien@example.com",
    "o''brien@example.com",
    'quote"double@example.com',
    "x'); DROP TABLE ratelimit; --@evil.example",
    "x' OR '1'='1@evil.example",
    "back\\slash@example.com",
    "back\\'slash@example.com",
    "percent%_under@example.com",
    "`tick`@example.com",
    "semi;colon /* comment */@example.com",
    "nul\x00byte@example.com",
    "tab\there@example.com",
    "\u2603 snowman@example.com",
]


@pytest.mark.mysql
def test_sql_metacharacters_in_usernames_are_plain_data(hostile: Hostile) -> None:
    with PolicyClient(hostile.port) as c:
        for i, key in enumerate(SQL_NASTIES):
            for _ in range(i + 1):  # a different count per key, to catch any mix-up
                assert c.ask(request_bytes(sasl_username=key)) == "DUNNO"
            hostile.counted[key.lower()] += i + 1  # keys are lower-cased by default
    hostile.served()
    hostile.exact()
    assert hostile.db.sql("SELECT COUNT(*) FROM ratelimit")[0][0] == len(hostile.counted)


# -- connections -----------------------------------------------------------------------


@pytest.mark.mysql
def test_client_outside_allowed_hosts_is_closed_and_logged(hostile: Hostile) -> None:
    try:
        s = socket.create_connection(("127.0.0.1", hostile.port), timeout=5,
                                     source_address=("127.0.0.2", 0))
    except OSError as exc:
        unavailable(f"no second loopback address 127.0.0.2 here: {exc}")  # fails in CI
        return
    with s:
        with contextlib.suppress(OSError):  # closed before the request went out: fine
            s.sendall(request_bytes(sasl_username="outsider@example.com"))
        closed, sent = eof_within(s, 10)
    assert closed and sent == b""
    hostile.daemon.wait_log("client 127.0.0.2 not in allowed_hosts")
    hostile.served()
    hostile.exact()  # the outsider was not counted


@pytest.mark.mysql
def test_silent_client_does_not_hold_up_others(hostile: Hostile) -> None:
    with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as silent:
        hostile.served()
        with socket.create_connection(("127.0.0.1", hostile.port), timeout=5) as partial:
            partial.sendall(b"request=smtpd_access_policy\nsasl_username=half@example.com\n")
            hostile.served()
        silent.settimeout(0.5)
        with pytest.raises(TimeoutError):
            silent.recv(1)  # still open: the default idle timeout is far away
    hostile.exact()


@pytest.mark.mysql
def test_idle_connection_with_default_settings_still_works(hostile: Hostile) -> None:
    with PolicyClient(hostile.port) as c:
        assert c.ask(request_bytes(sasl_username=WITNESS)) == "DUNNO"
        time.sleep(4)  # idle, as Postfix leaves a policy connection between mails
        assert c.ask(request_bytes(sasl_username=WITNESS)) == "DUNNO"
    hostile.counted[WITNESS] += 2
    hostile.exact()


def test_default_idle_timeout_outlasts_postfix() -> None:
    """Postfix closes idle policy connections itself after smtpd_policy_service_max_idle
    (300 s); the daemon must not close them first, in the code or the shipped file."""
    assert Settings().server.idle_timeout >= POSTFIX_MAX_IDLE
    shipped = tomllib.loads((ROOT / "init" / "ratelimit-policyd.conf").read_text())
    assert shipped["server"]["idle_timeout"] >= POSTFIX_MAX_IDLE


def test_idle_timeout_closes_only_after_it_expires(edge: DaemonProc) -> None:
    with PolicyClient(edge.port) as c:
        assert c.ask(request_bytes(sasl_username="idle@example.com")) == "DUNNO"
        time.sleep(0.5)  # well within idle_timeout (1.5 s): kept
        assert c.ask(request_bytes(sasl_username="idle@example.com")) == "DUNNO"
        assert c.closed_by_server(wait=15)
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as silent:
        closed, sent = eof_within(silent, 15)  # connects and never says anything
    assert closed and sent == b""
    edge.wait_log("idle for")


def test_one_byte_per_second_is_closed(edge: DaemonProc) -> None:
    request = request_bytes(sasl_username="slow@example.com")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        closed = False
        for i in range(8):  # request_timeout is 0.5 s
            try:
                s.sendall(request[i : i + 1])
            except OSError:
                closed = True
                break
            time.sleep(1)
        if not closed:
            closed, _ = eof_within(s, 5)
    assert closed
    edge.wait_log("sent an incomplete request")


def test_a_trickled_request_is_closed_after_request_timeout(edge: DaemonProc) -> None:
    request = request_bytes(sasl_username="trickle@example.com")
    with socket.create_connection(("127.0.0.1", edge.port), timeout=5) as s:
        s.settimeout(0.2)
        started = time.monotonic()
        closed = False
        # A byte every 0.2 s, faster than request_timeout (0.5 s): the request would take
        # two minutes to arrive. It must be closed long before 5 s.
        for i in range(len(request)):
            if time.monotonic() - started > 5:
                break
            try:
                s.sendall(request[i : i + 1])
                closed = s.recv(1) == b""  # waits 0.2 s, or sees the close
            except TimeoutError:
                continue
            except OSError:
                closed = True
            if closed:
                break
    assert closed


def test_more_connections_than_max_are_refused_and_logged(edge: DaemonProc) -> None:
    def fill() -> list[PolicyClient]:
        clients = [PolicyClient(edge.port) for _ in range(5)]
        try:
            for c in clients:
                if c.ask(request_bytes(sasl_username="many@example.com")) != "DUNNO":
                    raise OSError("refused")
        except (OSError, AssertionError):
            for c in clients:
                c.close()
            return []
        return clients

    # Connections of earlier tests may take a moment to be noticed as closed.
    clients = wait_until(fill, 15, "five connections served")
    try:
        with PolicyClient(edge.port) as sixth:
            assert sixth.closed_by_server()
        edge.wait_log("max_connections")
        assert clients[0].ask(request_bytes(sasl_username="many@example.com")) == "DUNNO"
    finally:
        for c in clients:
            c.close()
    # Once a slot is free, a new client is served again.
    served = wait_until(lambda: _serve_once(edge.port), 15, "a freed slot")
    assert served


def _serve_once(port: int) -> bool:
    try:
        with PolicyClient(port) as c:
            return c.ask(request_bytes(sasl_username="later@example.com")) == "DUNNO"
    except OSError:
        return False


# -- memory ----------------------------------------------------------------------------


@pytest.mark.mysql
def test_memory_stays_bounded_under_a_flood(hostile: Hostile) -> None:
    """Hundreds of connections holding partial requests, over-long requests, garbage and
    a burst of good traffic: RSS grows by a bounded amount and does not keep growing."""

    def flood(seed: int) -> None:
        rng = random.Random(seed)
        held = []
        for _ in range(200):  # partial requests just under the limit, kept open
            s = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
            s.sendall(b"request=smtpd_access_policy\nsasl_username=" + b"p" * (MAX_REQUEST - 100))
            held.append(s)
        for _ in range(200):  # over-long and garbage, each closed by the server
            with socket.create_connection(("127.0.0.1", hostile.port), timeout=10) as s:
                with contextlib.suppress(OSError):
                    s.sendall(bytes(rng.getrandbits(8) for _ in range(64)) + b"z" * MAX_REQUEST)
                eof_within(s, 10)
        # Others are served while those connections are held.
        load = Load([hostile.port], [WITNESS], connections=4, max_requests=50, seed=seed)
        load.start().join()
        assert not load.errors and not load.unanswered
        hostile.counted.update(load.counted())
        for s in held:
            s.close()
        hostile.served()

    pid_rss = hostile.daemon.rss_kib
    before = pid_rss()
    flood(1)
    after_one = pid_rss()
    flood(2)
    flood(3)
    after_three = pid_rss()
    print(f"VmRSS {before} KiB before, {after_one} KiB after one flood, {after_three} KiB "
          f"after three")
    # The first flood grows thread stacks and malloc arenas; the daemon then reuses them.
    assert after_one - before < 64 * 1024
    # A leak per hostile connection would show as growth with every flood.
    assert after_three - after_one < 16 * 1024
    hostile.exact()
