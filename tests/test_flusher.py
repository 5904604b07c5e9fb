"""flusher: the cache written through to a real SQLite database under concurrent load."""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ratelimit_policyd.cache import QuotaCache
from ratelimit_policyd.engine import DUNNO, Engine
from ratelimit_policyd.flusher import Flusher
from ratelimit_policyd.loader import MissLoader
from ratelimit_policyd.model import Period
from ratelimit_policyd.policy import Limits
from ratelimit_policyd.storage import open_storage
from ratelimit_policyd.window import Calendar

pytestmark = pytest.mark.timeout(120)
NOW = 1_700_000_000.0


def db_used(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as con:
        return dict(con.execute("SELECT sender, used FROM ratelimit").fetchall())


def test_concurrent_charges_with_a_running_flusher_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = open_storage(f"sqlite:///{path}", create_schema=True)
    cache = QuotaCache(Calendar(Period.DAILY, "UTC"), 10**9)
    flusher = Flusher(cache, storage, 0.01, default_quota=lambda: 10**9)
    flusher.start()
    keys = [f"u{i}@example.com" for i in range(50)]
    sent: dict[str, int] = {}
    lock = threading.Lock()

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        mine: dict[str, int] = {}
        for _ in range(3000):
            key = rnd.choice(keys)
            n = rnd.randint(1, 3)
            if cache.charge(key, n, NOW) is None:
                cache.install(key, storage.load([key]).get(key), NOW)
                assert cache.charge(key, n, NOW) is not None
            mine[key] = mine.get(key, 0) + n
        with lock:
            for k, v in mine.items():
                sent[k] = sent.get(k, 0) + v

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert flusher.close(10.0)
    storage.close()
    assert db_used(path) == sent
    assert flusher.stats.rounds > 1  # it really ran while the workers charged


def test_failed_flush_keeps_counts_and_writes_them_later(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    storage = open_storage(f"sqlite:///{path}", create_schema=True)
    cache = QuotaCache(Calendar(Period.DAILY, "UTC"), 100)
    flusher = Flusher(cache, storage, 3600, default_quota=lambda: 100)
    cache.install("a@x", None, NOW)
    cache.charge("a@x", 5, NOW)
    # Another process holds the write lock: the flush cannot write (busy), and must
    # put the counts back instead of losing them.
    blocker = sqlite3.connect(path, timeout=0)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        ok = flusher.flush_once()
    finally:
        blocker.rollback()
        blocker.close()
    if ok:
        pytest.fail("the flush should have failed while the database was locked")
    assert cache.pending_total() == 5
    assert not flusher.stats.last_ok
    cache.charge("a@x", 2, NOW)
    assert flusher.flush_once()
    storage.close()
    assert db_used(path) == {"a@x": 7}


def test_a_new_interval_applies_to_the_current_wait(tmp_path: Path) -> None:
    # A reload from a long flush interval to a short one must not wait for the long one
    # to run out (the crash bound is F). With F = 600 s, the counts written within 30 s
    # can only come from the new interval.
    path = tmp_path / "db.sqlite3"
    storage = open_storage(f"sqlite:///{path}", create_schema=True)
    cache = QuotaCache(Calendar(Period.DAILY, "UTC"), 100)
    flusher = Flusher(cache, storage, 600.0, default_quota=lambda: 100)
    flusher.start()
    try:
        # The real clock: the flusher evicts by it, and must keep this key cached.
        cache.install("a@x", None, time.time())
        assert cache.charge("a@x", 3, time.time()) is not None
        flusher.set_interval(0.2)
        deadline = time.monotonic() + 30
        while db_used(path) != {"a@x": 3}:
            assert time.monotonic() < deadline, "the new interval did not apply"
            time.sleep(0.05)
        assert flusher.interval == 0.2
        # And it keeps flushing at the new interval, not just once.
        assert cache.charge("a@x", 2, time.time()) is not None
        while db_used(path) != {"a@x": 5}:
            assert time.monotonic() < deadline, "no round after the first one"
            time.sleep(0.05)
    finally:
        assert flusher.close(10.0)
        storage.close()
def test_max_entries_holds_on_the_request_path_with_no_count_lost(tmp_path: Path) -> None:
    # The real path: Engine -> MissLoader (batched reads) -> QuotaCache -> Flusher ->
    # SQLite. 10,000 new senders and 2,500 returning (evicted, so re-read) ones, from 8
    # threads, into a cache of 100 flushed between bursts; a watcher samples its size
    # throughout. Before, a burst's misses were installed beyond the cap until the
    # next flush round evicted them.
    path = tmp_path / "db.sqlite3"
    storage = open_storage(f"sqlite:///{path}", create_schema=True)
    cache = QuotaCache(Calendar(Period.DAILY, "UTC"), 10**6, max_entries=100)
    engine = Engine(Limits(default_quota=10**6), cache, storage,
                    decision_sink=lambda _line: None)
    engine.loader = loader = MissLoader(storage, 10.0)
    loader.start()
    flusher = Flusher(cache, storage, 3600, default_quota=lambda: 10**6)
    sizes: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            sizes.append(len(cache))
            time.sleep(0.0005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    sent: dict[str, int] = {}
    rnd = random.Random(7)
    for burst in range(125):
        keys = [f"u{burst * 80 + i}@example.com" for i in range(80)]
        keys += rnd.sample(sorted(sent), 20) if sent else []
        for key in keys:
            sent[key] = sent.get(key, 0) + 1
        parts = [keys[i::8] for i in range(8)]

        def work(part: list[str]) -> None:
            for key in part:
                assert engine.handle({"protocol_state": "RCPT", "sasl_username": key,
                                      "recipient": "r@remote.example"}) == DUNNO

        threads = [threading.Thread(target=work, args=(p,)) for p in parts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(cache) <= 100, burst
        assert flusher.flush_once()
    done.set()
    watcher.join()
    loader.stop()
    storage.close()
    assert max(sizes) <= 100 and len(sizes) > 1000
    assert len(sent) == 10_000 and sum(sent.values()) == 12_480
    assert db_used(path) == sent
