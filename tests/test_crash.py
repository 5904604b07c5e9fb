"""Stops and crashes under load: SIGTERM loses nothing, SIGKILL at most the last interval.

A SIGTERM with the database down spools the counts to the state directory; the next
start writes them, and removes the file only once they are in the database: a crash
meanwhile, or another stop while the database is still down, keeps them, and a crash
after they are written counts nothing twice. A flush whose COMMIT went unanswered is
spooled with its flush log entry, and the next start writes it only if it did not
commit. A SIGKILL loses at most the counts made since the drain of the last flush that
completed: the flush interval plus the time of up to two flushes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ratelimit_policyd import spool
from tests.faultkit import (
    BASE_CONFIG,
    CommitCutter,
    Database,
    Load,
    MySQLDaemon,
    next_boundary,
    toml,
    wait_for_counts,
    wait_until,
)
from tests.fixtures_mariadb import MariaDB
from tests.policyclient import PolicyClient, free_port, request_bytes

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
    # daemon serves (counting in memory) until the database is back. The file stays
    # until its counts are in the database.
    d2 = MySQLDaemon(tmp_path, db.url, *args, config=config)
    try:
        d2.wait_log("replaying")
        assert spool.exists()
        third = Load([d2.port], KEYS, connections=2, max_requests=200, seed=3).start().join()
        db.server.start()
        expected = first.counted() + second.counted() + third.counted()
        wait_for_counts(db, expected)
        wait_until(lambda: not spool.exists(), 30, "the spool removed once written")
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


# -- the spool across crashes and repeated outages ---------------------------------------

SPOOL_ARGS = ("--flush-interval", "60", "--period", "monthly", "--default-quota", "1000000")
#: For the start that must end up with every count written: a short interval, so that
#: a version that writes spooled counts only at its first flush round is not failed
#: for that alone.
FINAL_ARGS = ("--flush-interval", "0.5", "--period", "monthly", "--default-quota", "1000000")


def spooled_counts(path: Path) -> Counter[str]:
    parsed = spool.parse(path.read_bytes())
    assert not parsed.bad
    out: Counter[str] = Counter()
    for section in parsed.sections:
        for d in section.deltas:
            out[d.sender] += d.n
    return out


def spool_with_database_down(db: Database, tmp: Path, seed: int = 1) -> Counter[str]:
    """A daemon counts, the database goes away, SIGTERM: the counts are spooled."""
    d = MySQLDaemon(tmp, db.url, *SPOOL_ARGS)
    load = Load([d.port], KEYS, connections=4, max_requests=100, seed=seed).start().join()
    assert not load.errors and not load.unanswered
    db.server.stop()
    assert d.stop() == 0
    assert "database unreachable at stop" in d.log_text()
    counted = load.counted()
    assert spooled_counts(tmp / "state" / spool.SPOOL_NAME) == counted
    return counted


@pytest.mark.parametrize("database", ["up", "down"])
def test_spooled_counts_survive_a_crash_of_the_start_that_replays_them(
    private_mariadb: Callable[[], MariaDB], tmp_path: Path, database: str
) -> None:
    db = Database.create(private_mariadb())
    expected = spool_with_database_down(db, tmp_path)
    if database == "up":
        db.server.start()
    # The next start takes the spool in, and is killed within its first flush interval
    # (60 s): with the database up, or during the rest of the outage.
    d2 = MySQLDaemon(tmp_path, db.url, *SPOOL_ARGS)
    d2.wait_log("replaying")
    d2.kill()
    if database == "down":
        assert (tmp_path / "state" / spool.SPOOL_NAME).exists()
        db.server.start()
    spool_left = (tmp_path / "state" / spool.SPOOL_NAME).exists()
    d3 = MySQLDaemon(tmp_path, db.url, *FINAL_ARGS)
    try:
        wait_for_counts(db, expected)
        wait_until(lambda: not (tmp_path / "state" / spool.SPOOL_NAME).exists(), 30,
                   "the spool removed once written")
    finally:
        assert d3.stop() == 0
    assert db.used() == expected
    rows = [r[0] for r in db.sql("SELECT daemon FROM ratelimit_flushlog")]
    if spool_left:
        assert rows == []
    else:
        # The kill landed after the file was removed and before its flush log rows were
        # deleted (the start writes the spool right after logging "replaying"): those
        # rows stay, small and harmless; nothing else may.
        assert all(r.startswith("spool-") for r in rows), rows
    print(f"spooled {sum(expected.values())} counts, SIGKILL after the replay "
          f"(database {database}): lost 0, counted twice 0")


def test_a_stop_with_the_database_still_down_keeps_the_replayed_spool(
    private_mariadb: Callable[[], MariaDB], tmp_path: Path
) -> None:
    db = Database.create(private_mariadb())
    first = spool_with_database_down(db, tmp_path)
    # A start and a stop during the rest of the outage, with counts of its own.
    d2 = MySQLDaemon(tmp_path, db.url, *SPOOL_ARGS)
    d2.wait_log("replaying")
    second = Load([d2.port], KEYS, connections=4, max_requests=50, seed=2).start().join()
    assert not second.errors and not second.unanswered
    assert d2.stop() == 0
    path = tmp_path / "state" / spool.SPOOL_NAME
    assert spooled_counts(path) == first + second.counted()
    db.server.start()
    d3 = MySQLDaemon(tmp_path, db.url, *FINAL_ARGS)
    try:
        wait_for_counts(db, first + second.counted())
        wait_until(lambda: not path.exists(), 30, "the spool removed once written")
    finally:
        assert d3.stop() == 0
    assert db.used() == first + second.counted()
    print(f"two stops during one outage: {sum((first + second.counted()).values())} counts "
          "spooled, all written once")


@pytest.mark.parametrize("lose", ["answer", "commit"])
def test_an_unanswered_commit_then_a_stop_with_the_database_unreachable_counts_once(
    mariadb: MariaDB, tmp_path: Path, lose: str
) -> None:
    # The scenario: a partition between an MX and its database begins exactly
    # as a flush's COMMIT is sent, and the daemon is restarted before it heals. With
    # lose="answer" the server committed; with lose="commit" it did not.
    db = Database.create(mariadb)
    proxy = CommitCutter((mariadb.host, mariadb.port), lose=lose, partition=True)
    keys = KEYS[:30]
    try:
        d = MySQLDaemon(tmp_path, proxy.url(db.url), "--flush-interval", "0.3", "--period",
                        "monthly", "--default-quota", "1000000")
        first = Load([d.port], keys, connections=3, max_requests=10).start().join()
        wait_for_counts(db, first.counted())
        proxy.arm()
        second = Load([d.port], keys, connections=3, max_requests=10, seed=2).start().join()
        wait_until(proxy.cut.is_set, 20, "a COMMIT cut")
        d.wait_log("outcome unknown")
        # Cached senders are answered from memory during the partition, and counted.
        third = Load([d.port], keys, connections=3, max_requests=10, seed=3).start().join()
        assert d.stop() == 0
    finally:
        proxy.close()
    assert "database unreachable at stop" in d.log_text()
    path = tmp_path / "state" / spool.SPOOL_NAME
    spooled = spool.parse(path.read_bytes()).sections
    expected = first.counted() + second.counted() + third.counted()
    # The partition heals; the daemon starts again.
    try:
        d2 = MySQLDaemon(tmp_path, db.url, *FINAL_ARGS)
        try:
            d2.wait_log("replaying")
            wait_for_counts(db, expected)
            wait_until(lambda: not path.exists(), 30, "the spool removed once written")
            if lose == "answer":
                assert "already in the database, not written again" in d2.log_text()
        finally:
            assert d2.stop() == 0
        assert db.used() == expected
        assert db.sql("SELECT COUNT(*) FROM ratelimit_flushlog") == [(0,)]
        # The unanswered flush was spooled under its daemon's name (a flush may have
        # begun while the second load ran), the rest under the spool's own.
        assert len(spooled) == 2
        assert not spooled[0].flush.source.startswith("spool-")
        assert spooled[1].flush.source.startswith("spool-")
        assert (sum(d.n for s in spooled for d in s.deltas)
                == second.total() + third.total())
    finally:
        mariadb.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
    print(f"COMMIT {lose} lost, then a stop with the database unreachable: "
          f"{sum(d.n for d in spooled[0].deltas)} counts in doubt of "
          f"{sum(expected.values())}; lost 0, counted twice 0")


def test_a_crash_after_the_spool_is_written_but_not_removed_counts_once(
    private_mariadb: Callable[[], MariaDB], tmp_path: Path
) -> None:
    db = Database.create(private_mariadb())
    expected = spool_with_database_down(db, tmp_path)
    db.server.start()
    # The next start writes the spooled counts and is killed (SIGKILL, by the spool's
    # test hook) just before it removes the file; it may die before its port accepts.
    conf = tmp_path / "rl.conf"
    conf.write_text(toml(BASE_CONFIG))
    crashing = subprocess.Popen(
        [sys.executable, "-m", "ratelimit_policyd", "run", "--listen",
         f"127.0.0.1:{free_port()}", "--db", db.url, "--log-file", str(tmp_path / "daemon.log"),
         "--state-dir", str(tmp_path / "state"), "--config", str(conf), *SPOOL_ARGS],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, spool.CRASH_AT_ENV: "before-remove"})
    assert crashing.wait(60) == -signal.SIGKILL
    path = tmp_path / "state" / spool.SPOOL_NAME
    assert path.exists()
    assert db.used() == expected  # written, file still there
    d3 = MySQLDaemon(tmp_path, db.url, *SPOOL_ARGS)
    try:
        d3.wait_log("already in the database, not written again")
        wait_until(lambda: not path.exists(), 30, "the spool removed")
    finally:
        assert d3.stop() == 0
    assert db.used() == expected
    assert db.sql("SELECT COUNT(*) FROM ratelimit_flushlog") == [(0,)]
    print(f"SIGKILL between writing {sum(expected.values())} spooled counts and removing "
          "the file: counted once after the restart")
