"""loader: misses read in batches by one thread, on a real SQLite database."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from ratelimit_policyd.loader import MissLoader
from ratelimit_policyd.model import Delta, Row
from ratelimit_policyd.storage import open_storage
from ratelimit_policyd.storage.base import StorageError

pytestmark = pytest.mark.timeout(60)
EXPIRY = 2_000_000_000


def test_concurrent_misses_are_read_together_and_handed_to_every_waiter(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path}/db.sqlite3", create_schema=True)
    storage.apply([Delta(f"k{i}", i, EXPIRY) for i in range(100)], 50)
    reads: list[int] = []
    real_load = storage.load

    def counting_load(keys):  # type: ignore[no-untyped-def]
        reads.append(len(keys))
        time.sleep(0.05)  # a database 50 ms away: misses pile up meanwhile
        return real_load(keys)

    storage.load = counting_load  # type: ignore[method-assign]
    loader = MissLoader(storage, 10.0)
    loader.start()
    got: dict[int, Row | None] = {}

    def miss(i: int) -> None:
        got[i] = loader.load(f"k{i % 120}")

    threads = [threading.Thread(target=miss, args=(i,)) for i in range(240)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    loader.stop()
    for i in range(240):
        row = got[i]
        if i % 120 < 100:
            assert row is not None and row.used == i % 120, i
        else:
            assert row is None, i  # no row yet: every waiter is told so
    assert sum(reads) == 120  # each key read once, however many threads missed it
    assert len(reads) < 20  # in batches, not one query per miss
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
