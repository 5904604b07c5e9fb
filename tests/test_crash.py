"""Stops and crashes under load: SIGTERM loses nothing, SIGKILL at most the last interval.

A SIGTERM with the database down spools the counts to the state directory; the next
start writes them. A SIGKILL loses at most the counts made since the drain of the last
flush that completed: the flush interval plus the time of up to two flushes.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faultkit import Database, Load, MySQLDaemon, next_boundary, wait_for_counts, wait_until
from tests.fixtures_mariadb import MariaDB
from tests.policyclient import PolicyClient, request_bytes

pytestmark = [pytest.mark.mysql, pytest.mark.timeout(120)]

KEYS = [f"user{i}@example.com" for i in range(40)]


@pytest.fixture
def shared_db(mariadb: MariaDB) -> Iterator[Database]:
    db = Database.create(mariadb)
    yield db
    mariadb.execute(f"DROP DATABASE IF EXISTS `{db.name}`")


def unanswered(load: Load) -> Counter[str]:
    out: Counter[str] = Counter()
    for key, n in load.unanswered:
        out[key] += n
    return out


def test_sigterm_mid_load_loses_no_answered_count(shared_db: Database, tmp_path: Path) -> None:
    # No periodic flush within the test: only the final flush at SIGTERM writes.
    d = MySQLDaemon(tmp_path, shared_db.url, "--flush-interval", "60", "--period", "monthly",
                    "--default-quota", "1000000")
    load = Load([d.port], KEYS, connections=8).start()
    wait_until(lambda: load.answered() >= 5000, 30, "5000 answers")
    d.signal(signal.SIGTERM)
    assert d.proc.wait(30) == 0
    load.join()
    d.stop()
    assert not load.errors
    counted, maybe = load.counted(), unanswered(load)
    used = shared_db.used()
    # Every answered request is in the database; a request in flight when the
    # connection closed may or may not have been counted, never twice.
    for key in KEYS:
        assert counted[key] <= used.get(key, 0) <= counted[key] + maybe[key], key
    print(f"{load.summary()}; lost 0 of {sum(counted.values())} "
          f"({sum(maybe.values())} in flight at the stop)")


def test_sigterm_with_database_down_spools_and_next_start_writes(
    private_mariadb: Callable[[], MariaDB], tmp_path: Path
) -> None:
    db = Database.create(private_mariadb())
    cached = KEYS[:10]
    db.put(cached, quota=10**6, expiry=next_boundary("monthly"), persist=True)
    args = ("--flush-interval", "0.5", "--period", "monthly", "--default-quota", "1000000")
    config = {"cache": {"shutdown_timeout": 3.0}}
    d = MySQLDaemon(tmp_path, db.url, *args, config=config)
    first = Load([d.port], cached, connections=4, max_requests=500).start().join()
    wait_for_counts(db, first.counted())
    db.server.stop()
    # Cached and new senders, all counted in memory only.
    second = Load([d.port], KEYS, connections=4, max_requests=500, seed=2).start().join()
    assert d.stop() == 0
    text = d.log_text()
    assert "database unreachable at stop" in text
    spool = tmp_path / "state" / "pending-counts.jsonl"
    spooled: Counter[str] = Counter()
    for line in spool.read_text().splitlines():
        item = json.loads(line)
        spooled[item["sender"]] += item["n"]
    assert spooled == second.counted()

    # Start again while the database is still down: the spool is taken in, and the
    # daemon serves (counting in memory) until the database is back.
    d2 = MySQLDaemon(tmp_path, db.url, *args, config=config)
    try:
        d2.wait_log("replaying")
        assert not spool.exists()
        third = Load([d2.port], KEYS, connections=2, max_requests=200, seed=3).start().join()
        db.server.start()
        expected = first.counted() + second.counted() + third.counted()
        wait_for_counts(db, expected)
        for load in (first, second, third):
            assert not load.errors and not load.unanswered
    finally:
        assert d2.stop() == 0
    assert db.used() == expected
    print(f"spooled {sum(spooled.values())} counts of {len(spooled)} senders; "
          f"lost 0 of {sum(expected.values())}")


@pytest.mark.slow
def test_sigkill_mid_load_loses_at_most_the_last_flush_interval(
    shared_db: Database, tmp_path: Path
) -> None:
    flush = 1.0
    d = MySQLDaemon(tmp_path, shared_db.url, "--flush-interval", str(flush), "--period",
                    "monthly", "--default-quota", "1000000")
    load = Load([d.port], KEYS, connections=4, rate=300.0).start()
    wait_until(lambda: load.answered() >= 300, 20, "the load running")
    started = time.time()
    wait_until(lambda: time.time() - started >= 5 * flush, 20, "five flush intervals of load")
    killed_at = time.time()
    d.kill()
    load.join()
    assert not load.errors
    answered = load.total()
    used = sum(shared_db.used().values())
    lost = answered - used
    # Lost: the counts charged after the drain of the last completed flush round. That
    # drain began at most F + 2 * (flush duration) before the kill; 1 s of slack covers
    # the flush durations. A reply arrives after its count was made.
    window = flush + 1.0
    bound = sum(r.n for r in load.replies if r.at > killed_at - window)
    print(f"{load.summary()}; SIGKILL lost {lost} counts; bound (answered in the last "
          f"{window:.1f} s) {bound}")
    assert lost <= bound
    # ...and nothing was counted twice: at most the requests in flight come on top.
    assert used <= answered + sum(n for _, n in load.unanswered)
    # The daemon was killed, not stopped: a fresh start serves and counts on.
    before = shared_db.used()[KEYS[0]]
    d2 = MySQLDaemon(tmp_path, shared_db.url, "--flush-interval", str(flush))
    try:
        with PolicyClient(d2.port) as c:
            assert c.ask(request_bytes(sasl_username=KEYS[0])) == "DUNNO"
    finally:
        assert d2.stop() == 0
    assert shared_db.used()[KEYS[0]] == before + 1
