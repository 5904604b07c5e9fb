"""The database fails under load: the daemon keeps answering and loses no count.

A daemon process runs on a private MariaDB that the test stops, freezes or locks while
Postfix-like connections keep sending. Cached senders must be answered without waiting
on the database, unknown senders get the ``on_db_error`` answer and are still counted,
and once the database is back it holds exactly the counts that were answered.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faultkit import (
    DEFER,
    CommitCutter,
    Database,
    Load,
    MySQLDaemon,
    next_boundary,
    wait_for_counts,
    wait_until,
)
from tests.fixtures_mariadb import MariaDB
from tests.policyclient import PolicyClient, request_bytes

pytestmark = [pytest.mark.mysql, pytest.mark.timeout(150)]

CACHED = [f"cached{i}@example.com" for i in range(8)]
UNKNOWN = [f"new{i}@example.com" for i in range(4)]
OVER = "471 monthly message quota exceeded"
#: A reply for a cached sender must not wait on the database. The database timeouts
#: below are several times this, so a request stuck behind a dead or locked connection
#: would exceed it; the bound itself is generous for a shared 2-core machine.
CACHED_REPLY_BOUND = 1.5
SLOW_DB: dict[str, dict[str, object]] = {"database": {"connect_timeout": 3.0, "read_timeout": 4.0}}


@pytest.fixture
def db(private_mariadb: Callable[[], MariaDB]) -> Database:
    """A private server (the test stops it) with cached senders' rows (quota 10^6)."""
    database = Database.create(private_mariadb())
    database.put(CACHED, quota=10**6, expiry=next_boundary("monthly"), persist=True)
    return database


@pytest.fixture
def daemons() -> Iterator[list[MySQLDaemon]]:
    started: list[MySQLDaemon] = []
    yield started
    for d in started:
        d.stop()


def start_daemon(daemons: list[MySQLDaemon], tmp: Path, db: Database, on_db_error: str,
                 config: dict[str, dict[str, object]] | None = None) -> MySQLDaemon:
    d = MySQLDaemon(tmp, db.url, "--period", "monthly", "--default-quota", "3",
                    "--flush-interval", "0.5", "--on-db-error", on_db_error, config=config)
    daemons.append(d)
    return d


def ask_each(port: int, keys: list[str], times: int,
             latencies: list[float] | None = None) -> dict[str, list[str]]:
    """``times`` RCPT requests for each key on one connection; the answers per key."""
    answers: dict[str, list[str]] = {}
    with PolicyClient(port, timeout=60) as c:
        for k in keys:
            for _ in range(times):
                started = time.monotonic()
                answers.setdefault(k, []).append(c.ask(request_bytes(sasl_username=k)))
                if latencies is not None:
                    latencies.append(time.monotonic() - started)
    return answers


def ask_until(port: int, key: str, wanted: str, timeout: float = 20.0) -> int:
    """Ask for ``key`` until the answer is ``wanted``; the number of requests sent."""
    asked = 0

    def probe() -> bool:
        nonlocal asked
        asked += 1
        with PolicyClient(port) as c:
            return c.ask(request_bytes(sasl_username=key)) == wanted

    wait_until(probe, timeout, f"{key} answered {wanted!r}", interval=0.2)
    return asked


def progress(load: Load, more: int, timeout: float = 20.0) -> None:
    """Wait until the load has had ``more`` further answers."""
    target = load.answered() + more
    wait_until(lambda: load.answered() >= target, timeout, f"{more} more answers")


@pytest.mark.parametrize("on_db_error", ["dunno", "defer"])
def test_database_stopped_under_load(
    db: Database, daemons: list[MySQLDaemon], tmp_path: Path, on_db_error: str
) -> None:
    d = start_daemon(daemons, tmp_path, db, on_db_error, SLOW_DB)
    with Load([d.port], CACHED, connections=4, rate=500.0) as load:
        progress(load, 300)
        wait_until(lambda: sum(db.used().values()) > 0, 20, "a first flush")
        db.server.stop()
        progress(load, 300)  # cached senders are answered while the database is down
        # Unknown senders: the on_db_error answer, even past the default quota (3),
        # since their quota cannot be read; and they are counted.
        down_answers = ask_each(d.port, UNKNOWN, 5)
        d.wait_log("flush failed")
        progress(load, 300)
        db.server.start()
        d.wait_log("database reachable again")
        progress(load, 300)
    expected_answer = "DUNNO" if on_db_error == "dunno" else DEFER
    assert down_answers == {k: [expected_answer] * 5 for k in UNKNOWN}
    assert not load.errors and not load.unanswered
    assert set(load.actions()) == {"DUNNO"}
    expected = load.counted() + Counter(dict.fromkeys(UNKNOWN, 5))
    wait_for_counts(db, expected)
    # The rows written for the unknown senders carry the default quota: now over it.
    extra = ask_until(d.port, UNKNOWN[0], OVER)
    expected[UNKNOWN[0]] += extra
    assert d.stop() == 0
    assert db.used() == expected
    assert load.max_latency(CACHED) < CACHED_REPLY_BOUND, load.max_latency(CACHED)
    assert "database unavailable for 'new0@example.com'" in d.log_text()
    print(f"{load.summary()}; lost 0 of {sum(expected.values())}")


@pytest.mark.slow
def test_frozen_database_under_load(
    db: Database, daemons: list[MySQLDaemon], tmp_path: Path
) -> None:
    """A server that accepts connections but answers nothing (SIGSTOP): the worst case
    for timeouts, since nothing fails fast."""
    d = start_daemon(daemons, tmp_path, db, "defer", SLOW_DB)
    with Load([d.port], CACHED, connections=4, rate=500.0) as load:
        progress(load, 300)
        wait_until(lambda: sum(db.used().values()) > 0, 20, "a first flush")
        db.server.pause()
        try:
            progress(load, 300)
            latencies: list[float] = []
            down_answers = ask_each(d.port, UNKNOWN, 3, latencies)
            d.wait_log("flush failed", timeout=30)
            progress(load, 300)
        finally:
            db.server.resume()
        d.wait_log("database reachable again", timeout=30)
        progress(load, 200)
    assert down_answers == {k: [DEFER] * 3 for k in UNKNOWN}
    # One read of an unknown key waits for the database, within connect_timeout +
    # read_timeout (3 s + 4 s; 2 s of slack); the others are answered at once while the
    # daemon knows the database is down.
    latencies.sort()
    assert latencies[-1] < 3 + 4 + 2, latencies
    assert latencies[-2] < CACHED_REPLY_BOUND, latencies
    assert not load.errors and not load.unanswered
    expected = load.counted() + Counter(dict.fromkeys(UNKNOWN, 3))
    wait_for_counts(db, expected, timeout=40)
    assert d.stop() == 0
    assert db.used() == expected
    assert load.max_latency(CACHED) < CACHED_REPLY_BOUND, load.max_latency(CACHED)
    print(f"{load.summary()}; lost 0 of {sum(expected.values())}")


def test_a_miss_on_a_frozen_database_waits_one_timeout(
    db: Database, daemons: list[MySQLDaemon], tmp_path: Path
) -> None:
    """The one request that meets the frozen server first is answered within
    connect_timeout + read_timeout: a connection that timed out is not retried on
    another, which would only time out again."""
    d = MySQLDaemon(tmp_path, db.url, "--flush-interval", "60", "--on-db-error", "defer",
                    config={"database": {"connect_timeout": 1.0, "read_timeout": 4.0}})
    daemons.append(d)
    ask_each(d.port, CACHED, 1)  # loaded rows: pooled connections in use
    db.server.pause()
    try:
        latencies: list[float] = []
        answers = ask_each(d.port, UNKNOWN[:2], 1, latencies)
    finally:
        db.server.resume()
    assert answers == {UNKNOWN[0]: [DEFER], UNKNOWN[1]: [DEFER]}
    assert latencies[0] < 1 + 4 + 1.5, latencies  # 1.5 s of slack
    assert latencies[1] < CACHED_REPLY_BOUND, latencies  # the database is known down


@pytest.mark.slow
@pytest.mark.parametrize("lock", ["rows", "table"])
def test_locked_table_under_load(
    db: Database, daemons: list[MySQLDaemon], tmp_path: Path, lock: str
) -> None:
    """A slow database: another session holds the rows (SELECT ... FOR UPDATE) or the
    whole table (LOCK TABLES ... WRITE) for a few seconds while the load runs."""
    d = start_daemon(daemons, tmp_path, db, "dunno")
    locker = db.server.connect(db.name)
    locked = threading.Event()
    try:
        with Load([d.port], CACHED, connections=4, rate=500.0) as load:
            progress(load, 300)
            wait_until(lambda: sum(db.used().values()) > 0, 20, "a first flush")
            with locker.cursor() as cur:
                if lock == "rows":
                    cur.execute("BEGIN")
                    cur.execute("SELECT * FROM ratelimit FOR UPDATE")
                else:
                    cur.execute("LOCK TABLES ratelimit WRITE")
            locked.set()
            held_since = time.monotonic()
            down_answers = ask_each(d.port, UNKNOWN, 5)
            d.wait_log("flush failed", timeout=30)
            progress(load, 300)
            # Hold the lock a few seconds, with the load running all along.
            wait_until(lambda: time.monotonic() - held_since > 4, 10, "the lock held 4 s")
            with locker.cursor() as cur:
                cur.execute("ROLLBACK" if lock == "rows" else "UNLOCK TABLES")
            d.wait_log("database reachable again", timeout=30)
            progress(load, 200)
    finally:
        locker.close()
    assert not load.errors and not load.unanswered
    if lock == "rows":
        # Reads are not blocked by row locks: unknown senders are read and limited.
        assert down_answers == {k: ["DUNNO"] * 3 + [OVER] * 2 for k in UNKNOWN}
    else:
        # A table lock blocks reads too: on_db_error (dunno), past the default quota.
        assert down_answers == {k: ["DUNNO"] * 5 for k in UNKNOWN}
    expected = load.counted() + Counter(dict.fromkeys(UNKNOWN, 5))
    wait_for_counts(db, expected, timeout=40)
    assert d.stop() == 0
    assert db.used() == expected
    assert load.max_latency(CACHED) < CACHED_REPLY_BOUND, load.max_latency(CACHED)
    print(f"{load.summary()}; lost 0 of {sum(expected.values())}")


def test_connection_lost_during_commit_counts_once(
    mariadb: MariaDB, daemons: list[MySQLDaemon], tmp_path: Path
) -> None:
    db = Database.create(mariadb)
    proxy = CommitCutter((mariadb.host, mariadb.port))
    try:
        d = MySQLDaemon(tmp_path, proxy.url(db.url), "--flush-interval", "0.3")
        daemons.append(d)
        key = "commit@example.com"
        ask_each(d.port, [key], 10)
        wait_for_counts(db, {key: 10})
        proxy.arm()
        ask_each(d.port, [key], 5)
        wait_until(proxy.cut.is_set, 20, "a COMMIT answer lost")
        d.wait_log("flush failed")
        d.wait_log("database reachable again")
        assert d.stop() == 0
        assert db.used() == {key: 15}
    finally:
        proxy.close()
        mariadb.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
