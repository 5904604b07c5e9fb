"""loader: misses read in batches by one thread, on a real SQLite database."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from ratelimit_policyd.loader import MissLoader
from ratelimit_policyd.model import Delta, Row
from ratelimit_policyd.storage import open_storage
from ratelimit_policyd.storage.base import StorageError

pytestmark = pytest.mark.timeout(60)
EXPIRY = 2_000_000_000


def test_concurrent_misses_are_read_together_and_handed_to_every_waiter(
        tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/db.sqlite3", create_schema=True)
    storage.apply([Delta(f"k{i}", i, EXPIRY) for i in range(100)], 50)
    reads: list[list[str]] = []
    real_load = storage.load

    def counting_load(keys):  # type: ignore[no-untyped-def]
        reads.append(list(keys))
        time.sleep(0.05)  # a database 50 ms away: misses pile up meanwhile
        return real_load(keys)

    storage.load = counting_load  # type: ignore[method-assign]
    loader = MissLoader(storage, 10.0)
    loader.start()
    errors: list[BaseException] = []
    got: dict[int, Row | None] = {}

    def miss(n: int) -> None:
        try:
            got[n] = loader.load(f"k{n % 120}")
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    # Every key is missed twice, 120 threads apart.
    threads = [threading.Thread(target=miss, args=(n,)) for n in range(240)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loader.stop()
    assert errors == []
    for n in range(240):  # every waiter gets its key's row (None: no row yet)
        i = n % 120
        row = got[n]
        assert (row.used if row else None) == (i if i < 100 else None), n
    for keys in reads:
        assert len(keys) == len(set(keys)), "a key queued twice went into one read"
    # Whether a key's second miss finds its first read still queued or in flight (and
    # shares it) or comes after it finished (and is read again: the loader does not look
    # in the cache, the engine does before it calls load) depends on the scheduling, so
    # each key is read once or twice, never more often than it was missed.
    # test_a_miss_shares_the_read_in_flight_... pins the sharing down deterministically.
    times_read = Counter(key for keys in reads for key in keys)
    assert set(times_read) == {f"k{i}" for i in range(120)}
    assert set(times_read.values()) <= {1, 2}
    assert len(reads) < 20  # in batches, not one query per miss
    storage.close()


def test_a_miss_shares_the_read_in_flight_and_queued_misses_are_read_together(
        tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/db.sqlite3", create_schema=True)
    storage.apply([Delta(f"k{i}", i, EXPIRY) for i in range(100)], 50)
    reads: list[list[str]] = []
    reading, go_on = threading.Event(), threading.Event()
    real_load = storage.load

    answered: list[dict[str, Row]] = []

    def held_load(keys):  # type: ignore[no-untyped-def]
        reads.append(list(keys))
        reading.set()
        go_on.wait(30)  # the database answers when the test says so
        rows = real_load(keys)
        answered.append(rows)
        return rows

    storage.load = held_load  # type: ignore[method-assign]
    # A wait limit of 0: load() registers the miss and returns at once (with the error a
    # timed-out miss gets), so this one thread decides exactly when each miss happens
    # relative to the reads; no sleeping, no racing threads.
    loader = MissLoader(storage, 0.0)
    loader.start()

    def miss(key: str) -> None:
        with pytest.raises(StorageError, match="no answer from the database"):
            loader.load(key)

    miss("k0")
    assert reading.wait(30), "the loader never read k0"
    # k0 is being read now: a second miss shares that read. The other keys, each missed
    # twice, queue meanwhile and are read together in one query once k0's read is done.
    miss("k0")
    for _ in range(2):
        for i in range(1, 120):
            miss(f"k{i}")
    go_on.set()
    deadline = time.monotonic() + 30
    while len(answered) < 2:
        assert time.monotonic() < deadline, f"not every miss was read: {reads}"
        time.sleep(0.01)
    assert reads[0] == ["k0"]
    assert len(reads) == 2, reads
    assert sorted(reads[1]) == sorted(f"k{i}" for i in range(1, 120))
    rows = answered[0] | answered[1]
    assert {k: r.used for k, r in rows.items()} == {f"k{i}": i for i in range(100)}
    # Once its read has finished, a key missed again is read again (the engine looks
    # in the cache first, so a cached key does not miss).
    miss("k0")
    while len(reads) < 3:
        assert time.monotonic() < deadline, reads
        time.sleep(0.01)
    assert reads[2] == ["k0"]
    loader.stop()
    loader.join(30)
    assert len(reads) == 3
    storage.close()


def test_a_failed_read_is_raised_to_every_waiter(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/db.sqlite3", create_schema=True)

    def failing_load(keys):  # type: ignore[no-untyped-def]
        raise StorageError("database unreachable")

    storage.load = failing_load  # type: ignore[method-assign]
    loader = MissLoader(storage, 10.0)
    loader.start()
    errors: list[str] = []

    def miss(key: str) -> None:
        try:
            loader.load(key)
        except StorageError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=miss, args=(f"k{i}",)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loader.stop()
    assert errors == ["database unreachable"] * 10
    storage.close()
