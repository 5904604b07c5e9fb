"""The Storage contract, one suite run on every backend (SQLite and a real MariaDB).

Each test talks to a fresh database built from the shipped sql/ file (MySQL, with a user
holding only the Perl daemon's grants) or created by open_storage (SQLite). "Operator"
changes go through a separate raw connection, as an admin's SQL would.
"""

from __future__ import annotations

import logging
import random
import re
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ratelimit_policyd.model import Delta, Row
from ratelimit_policyd.storage import Storage, StorageError, TableNames, open_storage
from tests.fixtures_mariadb import MariaDB

E1 = 1_767_225_600  # an hour boundary; the storage never looks at the clock
E2 = E1 + 3600
E3 = E2 + 3600
ROOT = Path(__file__).resolve().parent.parent

#: Keys that must reach the database as values, byte for byte.
TRICKY_KEYS = [
    "o'brien@example.org",
    'say "hi"@example.org',
    "back\\slash@example.org",
    "robert'); DROP TABLE ratelimit; --@example.org",
    "`tick`@example.org",
    "pct%_wild%@example.org",
    "semi;colon=eq@example.org",
    "jörg.müller@bücher.example",
    "пользователь@пример.рф",
    "用户@例子.中国",
]


class Backend:
    """An open Storage plus raw SQL access to the same database, per backend."""

    kind: str

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._opened: list[Storage] = [storage]

    def open(self, **kwargs: Any) -> Storage:
        """Another Storage on the same database: a second daemon, or an admin command."""
        storage = self._open(**kwargs)
        self._opened.append(storage)
        return storage

    def close_all(self) -> None:
        for storage in self._opened:
            storage.close()

    def _open(self, **kwargs: Any) -> Storage:
        raise NotImplementedError

    @property
    def admin_url(self) -> str:
        """URL for a user that may create tables (what init-db runs with)."""
        raise NotImplementedError

    def sql(self, statement: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        """Raw SQL, written with %s placeholders."""
        raise NotImplementedError

    def columns(self, table: str) -> list[tuple[Any, ...]]:
        """What the database says about a table's columns, for comparing schemas."""
        raise NotImplementedError


class SQLiteBackend(Backend):
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(open_storage(self.url))

    @property
    def url(self) -> str:
        return f"sqlite://{self.path}"

    @property
    def admin_url(self) -> str:
        return self.url

    def _open(self, **kwargs: Any) -> Storage:
        return open_storage(kwargs.pop("url", self.url), **kwargs)

    def sql(self, statement: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(self.path, timeout=10)
        try:
            with con:
                return con.execute(statement.replace("%s", "?"), tuple(args)).fetchall()
        finally:
            con.close()

    def columns(self, table: str) -> list[tuple[Any, ...]]:
        return self.sql(f'PRAGMA table_info("{table}")')

    def indexes(self) -> list[tuple[Any, ...]]:
        found = self.sql('PRAGMA index_list("ratelimit")')
        return [(unique, self.sql(f'PRAGMA index_info("{name}")')) for _, name, unique, *_ in found]


class MySQLBackend(Backend):
    kind = "mysql"

    def __init__(self, server: MariaDB, db: str, url: str) -> None:
        self.server, self.db, self.url = server, db, url
        super().__init__(open_storage(url))

    def _open(self, **kwargs: Any) -> Storage:
        return open_storage(kwargs.pop("url", self.url), **kwargs)

    def sql(self, statement: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        return self.server.execute(statement, db=self.db, args=tuple(args) or None)

    def columns(self, table: str) -> list[tuple[Any, ...]]:
        return self.sql(
            "SELECT COLUMN_NAME, ORDINAL_POSITION, COLUMN_DEFAULT, IS_NULLABLE, COLUMN_TYPE,"
            " CHARACTER_SET_NAME, COLLATION_NAME, COLUMN_KEY, EXTRA, COLUMN_COMMENT"
            " FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()"
            " AND TABLE_NAME = %s ORDER BY ORDINAL_POSITION",
            (table,),
        )

    @property
    def admin_url(self) -> str:
        return self.server.url(self.db)  # root: init-db needs CREATE


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        b: Backend = SQLiteBackend(tmp_path / "db" / "ratelimit.sqlite3")
    else:
        b = MySQLBackend(
            request.getfixturevalue("mariadb"),
            request.getfixturevalue("mysql_db"),
            request.getfixturevalue("mysql_url"),
        )
    try:
        yield b
    finally:
        b.close_all()


@pytest.fixture
def storage(backend: Backend) -> Storage:
    return backend.storage


def row(sender: str, quota: int | None, used: int, expiry: int, persist: bool = False) -> Row:
    return Row(sender=sender, quota=quota, used=used, expiry=expiry, persist=persist)


def put(
    backend: Backend, sender: str, *, quota: int, used: int, expiry: int | None, persist: int = 0
) -> None:
    """Insert a row the way the Perl daemon or an operator would, bypassing Storage."""
    backend.sql(
        "INSERT INTO ratelimit (sender, quota, used, expiry, persist) VALUES (%s, %s, %s, %s, %s)",
        (sender, quota, used, expiry, persist),
    )


# -- apply: the update rule ----------------------------------------------------------------


def test_first_delta_inserts_a_row_with_the_default_quota(storage: Storage) -> None:
    got = storage.apply([Delta("alice@example.org", 3, E1)], default_quota=100)
    assert got == {"alice@example.org": row("alice@example.org", 100, 3, E1)}
    assert storage.load(["alice@example.org"]) == got


def test_deltas_in_the_same_window_add_up(storage: Storage) -> None:
    storage.apply([Delta("a@x", 2, E1)], default_quota=100)
    got = storage.apply([Delta("a@x", 3, E1)], default_quota=500)
    # No reset, so the quota the row has stays (the new default applies at the reset).
    assert got["a@x"] == row("a@x", 100, 5, E1)


@pytest.mark.parametrize(("persist", "quota_after"), [(0, 100), (1, 7)])
def test_a_newer_expiry_resets_used_and_non_persistent_quota(
    backend: Backend, storage: Storage, persist: int, quota_after: int
) -> None:
    put(backend, "a@x", quota=7, used=50, expiry=E1, persist=persist)
    got = storage.apply([Delta("a@x", 2, E2)], default_quota=100)
    assert got["a@x"] == row("a@x", quota_after, 2, E2, bool(persist))


def test_old_then_new_window_deltas_of_one_key_in_one_batch(
    backend: Backend, storage: Storage
) -> None:
    put(backend, "old@x", quota=7, used=10, expiry=E1)
    batch = [
        Delta("old@x", 3, E1),  # counted before the boundary: adds to the old window
        Delta("zed@x", 1, E1),
        Delta("new@x", 5, E1),  # a key with no row yet, also across the boundary
        Delta("old@x", 4, E2),  # after the boundary: resets
        Delta("new@x", 6, E2),
        Delta("mid@x", 9, E2),
        Delta("late@x", 4, E2),  # new window first, then a late old-window delta
        Delta("late@x", 3, E1),
    ]
    got = storage.apply(batch, default_quota=100)
    assert got == {
        "old@x": row("old@x", 100, 4, E2),
        "new@x": row("new@x", 100, 6, E2),
        "zed@x": row("zed@x", 100, 1, E1),
        "mid@x": row("mid@x", 100, 9, E2),
        "late@x": row("late@x", 100, 7, E2),
    }


def test_an_older_expiry_adds_without_moving_expiry_back(
    backend: Backend, storage: Storage
) -> None:
    put(backend, "a@x", quota=7, used=5, expiry=E2)
    got = storage.apply([Delta("a@x", 2, E1)], default_quota=100)
    assert got["a@x"] == row("a@x", 7, 7, E2)


@pytest.mark.parametrize("expiry", [None, 0])
@pytest.mark.parametrize(("persist", "quota_after"), [(0, 100), (1, 7)])
def test_rows_without_expiry_from_the_perl_daemon_count_as_expired(
    backend: Backend, storage: Storage, expiry: int | None, persist: int, quota_after: int
) -> None:
    put(backend, "perl@x", quota=7, used=50, expiry=expiry, persist=persist)
    assert storage.load(["perl@x"]) == {"perl@x": row("perl@x", 7, 50, 0, bool(persist))}
    got = storage.apply([Delta("perl@x", 1, E1)], default_quota=100)
    assert got["perl@x"] == row("perl@x", quota_after, 1, E1, bool(persist))


def make_columns_nullable(backend: Backend) -> None:
    """The table as an operator may have made it by hand for the Perl daemon: quota,
    used and persist without NOT NULL (expiry is nullable in the shipped schema too)."""
    if isinstance(backend, MySQLBackend):
        backend.sql(
            "ALTER TABLE ratelimit MODIFY persist TINYINT(1) NULL DEFAULT NULL,"
            " MODIFY quota INT(10) UNSIGNED NULL DEFAULT NULL,"
            " MODIFY used INT(10) UNSIGNED NULL DEFAULT NULL"
        )
    else:  # SQLite cannot alter a column: the same table, made again
        backend.sql("DROP VIEW view_ratelimit")
        backend.sql("DROP TABLE ratelimit")
        backend.sql(
            "CREATE TABLE ratelimit (id INTEGER PRIMARY KEY, sender TEXT NOT NULL UNIQUE,"
            " persist INTEGER, quota INTEGER, used INTEGER,"
            " updated TEXT DEFAULT CURRENT_TIMESTAMP, expiry INTEGER)"
        )
    backend.storage.check_schema()


def put_nullable(
    backend: Backend, sender: str, quota: int | None, used: int | None,
    expiry: int | None, persist: int | None,
) -> None:
    backend.sql(
        "INSERT INTO ratelimit (sender, quota, used, expiry, persist) VALUES (%s, %s, %s, %s, %s)",
        (sender, quota, used, expiry, persist),
    )


def test_a_null_used_reads_as_zero_and_takes_every_count(
    backend: Backend, storage: Storage
) -> None:
    # Before, ``used + n`` stayed NULL: every count of the key was swallowed.
    make_columns_nullable(backend)
    put_nullable(backend, "u@x", quota=7, used=None, expiry=E1, persist=0)
    assert storage.load(["u@x"]) == {"u@x": row("u@x", 7, 0, E1)}
    assert storage.apply([Delta("u@x", 3, E1)], default_quota=100) == {
        "u@x": row("u@x", 7, 3, E1)
    }
    storage.apply([Delta("u@x", 2, E1), Delta("v@x", 1, E1)], default_quota=100)
    assert backend.sql("SELECT used FROM ratelimit WHERE sender = %s", ("u@x",)) == [(5,)]


@pytest.mark.parametrize("persist", [None, 0, 1])
def test_a_null_quota_is_unlimited_and_stays_so_across_resets(
    backend: Backend, storage: Storage, persist: int | None
) -> None:
    # The Perl daemon's lookup (``WHERE quota > 0``) never found such a row: it never
    # refused the key, nor reset its quota. Before, it read as 0, which blocks.
    make_columns_nullable(backend)
    put_nullable(backend, "q@x", quota=None, used=5, expiry=E1, persist=persist)
    flag = bool(persist)
    assert storage.load(["q@x"]) == {"q@x": row("q@x", None, 5, E1, flag)}
    assert storage.apply([Delta("q@x", 2, E1)], 100)["q@x"] == row("q@x", None, 7, E1, flag)
    # A new window: used restarts, the quota stays NULL whatever persist says.
    assert storage.apply([Delta("q@x", 1, E2)], 100)["q@x"] == row("q@x", None, 1, E2, flag)
    assert list(storage.iter_rows()) == [row("q@x", None, 1, E2, flag)]


def test_a_null_persist_is_not_persistent_and_all_nulls_read_as_the_perl_daemon_meant(
    backend: Backend, storage: Storage
) -> None:
    make_columns_nullable(backend)
    put_nullable(backend, "p@x", quota=7, used=50, expiry=E1, persist=None)
    put_nullable(backend, "n@x", quota=None, used=None, expiry=None, persist=None)
    assert storage.load(["p@x", "n@x"]) == {
        "p@x": row("p@x", 7, 50, E1),
        "n@x": row("n@x", None, 0, 0),
    }
    got = storage.apply([Delta("p@x", 1, E2), Delta("n@x", 4, E2)], default_quota=100)
    assert got == {"p@x": row("p@x", 100, 1, E2), "n@x": row("n@x", None, 4, E2)}
    assert storage.reset("n@x") == row("n@x", None, 0, E2)
    assert storage.set_quota("n@x", 9, None, E2) == row("n@x", 9, 0, E2)


def test_a_batch_of_thousands_of_keys(backend: Backend, storage: Storage) -> None:
    existing = [f"old{i:05d}@example.org" for i in range(700)]
    for sender in existing[:3]:
        put(backend, sender, quota=7, used=1, expiry=E1, persist=1)
    storage.apply([Delta(s, 1, E1) for s in existing], default_quota=50)
    fresh = [f"new{i:05d}@example.org" for i in range(2800)]
    batch = [Delta(s, 2, E1) for s in fresh + existing]
    random.Random(1).shuffle(batch)
    got = storage.apply(batch, default_quota=50)
    assert len(got) == 3500
    assert all(got[s] == row(s, 50, 2, E1) for s in fresh)
    assert got[existing[0]] == row(existing[0], 7, 4, E1, True)
    assert all(got[s] == row(s, 50, 3, E1) for s in existing[3:])
    assert storage.load(fresh + existing) == got


def test_apply_and_load_of_nothing(storage: Storage) -> None:
    assert storage.apply([], default_quota=10) == {}
    assert storage.load([]) == {}


def test_load_leaves_absent_keys_out(storage: Storage) -> None:
    storage.apply([Delta("here@x", 1, E1)], default_quota=10)
    assert storage.load(["absent@x", "here@x", "here@x"]) == {"here@x": row("here@x", 10, 1, E1)}
    assert storage.load(["absent@x", "also-absent@x"]) == {}


def test_keys_are_compared_byte_for_byte(storage: Storage) -> None:
    # The daemon normalises case itself; the table must not merge keys behind its back.
    got = storage.apply([Delta("Alice@x", 1, E1), Delta("alice@x", 2, E1)], default_quota=10)
    assert got == {"Alice@x": row("Alice@x", 10, 1, E1), "alice@x": row("alice@x", 10, 2, E1)}


@pytest.mark.parametrize("sender", TRICKY_KEYS)
def test_keys_with_sql_metacharacters_and_utf8_round_trip(storage: Storage, sender: str) -> None:
    other = "plain@example.org"
    got = storage.apply([Delta(sender, 2, E1), Delta(other, 1, E1)], default_quota=10)
    assert got == {sender: row(sender, 10, 2, E1), other: row(other, 10, 1, E1)}
    assert storage.load([sender]) == {sender: row(sender, 10, 2, E1)}
    assert [r.sender for r in storage.iter_rows()] == sorted([sender, other])


def test_a_key_too_long_for_the_column_is_dropped_and_logged_the_rest_applied(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ratelimit_policyd.storage")
    too_long = "x" * 250 + "@long.example"
    limit = "y" * 255  # exactly the column's size: accepted
    storage.apply([Delta("b@x", 1, E1)], default_quota=10)
    batch = [Delta("a@x", 1, E1), Delta(too_long, 5, E1), Delta("b@x", 2, E1), Delta(limit, 1, E1)]
    got = storage.apply(batch, default_quota=10)
    assert got == {
        "a@x": row("a@x", 10, 1, E1),
        "b@x": row("b@x", 10, 3, E1),
        limit: row(limit, 10, 1, E1),
    }
    assert storage.load([too_long]) == {}
    dropped = [r for r in caplog.records if r.levelno == logging.ERROR and "dropped" in r.message]
    assert len(dropped) == 1
    assert "xxxxxxxx" in dropped[0].getMessage()


def test_a_count_out_of_range_for_the_column_is_dropped_and_logged_the_rest_applied(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    # The database itself refuses this one (INT UNSIGNED; a CHECK in SQLite), inside a
    # batch: only that delta is lost, the others of the same statement are applied.
    caplog.set_level(logging.ERROR, logger="ratelimit_policyd.storage")
    storage.apply([Delta("a@x", 1, E1), Delta("big@x", 1, E1)], default_quota=10)
    batch = [Delta("a@x", 1, E1), Delta("big@x", 2**32, E1), Delta("c@x", 1, E1)]
    got = storage.apply(batch, default_quota=10)
    assert got == {"a@x": row("a@x", 10, 2, E1), "c@x": row("c@x", 10, 1, E1)}
    assert storage.load(["big@x"]) == {"big@x": row("big@x", 10, 1, E1)}
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1


def test_a_key_that_is_not_unicode_text_is_dropped_and_logged(
    storage: Storage, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="ratelimit_policyd.storage")
    bad = "lone\udc80surrogate@x"
    got = storage.apply([Delta(bad, 1, E1), Delta("ok@x", 1, E1)], default_quota=10)
    assert got == {"ok@x": row("ok@x", 10, 1, E1)}
    assert storage.load([bad, "ok@x"]) == {"ok@x": row("ok@x", 10, 1, E1)}
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1
    # An admin command given such a key (argv is decoded with surrogateescape) gets a
    # StorageError, not a driver's exception.
    for call in (
        lambda: storage.set_quota(bad, 5, True, E1),
        lambda: storage.reset(bad),
        lambda: storage.delete(bad),
    ):
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.transient is False


def test_an_operator_update_is_seen_by_the_next_apply_and_load(
    backend: Backend, storage: Storage
) -> None:
    storage.apply([Delta("a@x", 1, E1), Delta("b@x", 1, E1)], default_quota=10)
    backend.sql("UPDATE ratelimit SET quota = 500, persist = 1 WHERE sender = %s", ("a@x",))
    backend.sql("UPDATE ratelimit SET used = 0 WHERE sender = %s", ("b@x",))
    assert storage.load(["a@x"]) == {"a@x": row("a@x", 500, 1, E1, True)}
    got = storage.apply([Delta("a@x", 1, E1), Delta("b@x", 1, E1)], default_quota=10)
    assert got == {"a@x": row("a@x", 500, 2, E1, True), "b@x": row("b@x", 10, 1, E1)}


# -- concurrency -------------------------------------------------------------------------


def _apply_until_done(storage: Storage, deltas: list[Delta], default_quota: int) -> None:
    """What the flusher does: on a transient error nothing was applied, so send again."""
    for _ in range(20):
        try:
            storage.apply(deltas, default_quota)
            return
        except StorageError as exc:
            if not exc.transient:
                raise
    raise AssertionError("apply kept failing")


def test_concurrent_daemons_and_threads_lose_no_count_and_reset_once(
    backend: Backend,
) -> None:
    daemons = [backend.storage, backend.open()]  # two daemons on one database
    keys = [f"user{i:02d}@example.org" for i in range(15)]
    workers, rounds = 4, 20

    def run_phase(expiry: int) -> dict[str, int]:
        expected = dict.fromkeys(keys, 0)
        plans: list[list[list[Delta]]] = []
        for w in range(workers):
            rng = random.Random(w * 1000 + expiry)
            plan = []
            for _ in range(rounds):
                batch = [Delta(k, rng.randint(1, 3), expiry) for k in keys]
                rng.shuffle(batch)
                for d in batch:
                    expected[d.sender] += d.n
                plan.append(batch)
            plans.append(plan)
        start = threading.Barrier(workers)

        def work(w: int) -> None:
            start.wait()
            for batch in plans[w]:
                _apply_until_done(daemons[w % 2], batch, default_quota=100)

        with ThreadPoolExecutor(workers) as pool:
            for future in [pool.submit(work, w) for w in range(workers)]:
                future.result()
        return expected

    expected = run_phase(E1)  # every key new: concurrent inserts of the same keys
    rows = backend.storage.load(keys)
    assert {k: r.used for k, r in rows.items()} == expected
    backend.sql("UPDATE ratelimit SET quota = 999 WHERE sender = %s", (keys[0],))
    backend.sql("UPDATE ratelimit SET quota = 5, persist = 1 WHERE sender = %s", (keys[1],))

    expected = run_phase(E2)  # every key crosses into a new window at once
    rows = daemons[1].load(keys)
    # Exact sums of the new window alone: exactly one reset per key, no lost update.
    assert {k: r.used for k, r in rows.items()} == expected
    assert {r.expiry for r in rows.values()} == {E2}
    assert rows[keys[0]].quota == 100
    assert rows[keys[1]].quota == 5


# -- admin operations ----------------------------------------------------------------------


def test_set_quota_inserts_an_absent_key(storage: Storage) -> None:
    got = storage.set_quota("vip@x", 5000, True, E1)
    assert got == row("vip@x", 5000, 0, E1, True)
    assert storage.load(["vip@x"]) == {"vip@x": got}
    assert storage.set_quota("plain@x", 20, None, E1) == row("plain@x", 20, 0, E1, False)


def test_set_quota_of_an_existing_key_keeps_its_counts(storage: Storage) -> None:
    storage.apply([Delta("a@x", 4, E1)], default_quota=10)
    assert storage.set_quota("a@x", 50, None, E3) == row("a@x", 50, 4, E1, False)
    assert storage.set_quota("a@x", 60, True, E3) == row("a@x", 60, 4, E1, True)
    assert storage.set_quota("a@x", 70, None, E3) == row("a@x", 70, 4, E1, True)
    assert storage.set_quota("a@x", 0, False, E3) == row("a@x", 0, 4, E1, False)


def test_reset_sets_used_to_zero(storage: Storage) -> None:
    storage.apply([Delta("a@x", 4, E1)], default_quota=10)
    assert storage.reset("a@x") == row("a@x", 10, 0, E1)
    assert storage.reset("a@x") == row("a@x", 10, 0, E1)  # already 0: still found
    assert storage.reset("absent@x") is None


def test_delete_removes_the_row(storage: Storage) -> None:
    storage.apply([Delta("a@x", 4, E1), Delta("b@x", 1, E1)], default_quota=10)
    assert storage.delete("a@x") is True
    assert storage.delete("a@x") is False
    assert storage.load(["a@x", "b@x"]) == {"b@x": row("b@x", 10, 1, E1)}
    # A deleted key starts again from the default.
    assert storage.apply([Delta("a@x", 1, E1)], 10)["a@x"] == row("a@x", 10, 1, E1)


def test_iter_rows_lists_every_row_in_key_order(backend: Backend, storage: Storage) -> None:
    assert list(storage.iter_rows()) == []
    put(backend, "perl@x", quota=3, used=1, expiry=None, persist=1)
    storage.apply([Delta("b@x", 2, E1), Delta("a@x", 1, E2)], default_quota=10)
    assert list(storage.iter_rows()) == [
        row("a@x", 10, 1, E2),
        row("b@x", 10, 2, E1),
        row("perl@x", 3, 1, 0, True),
    ]


def test_admin_changes_from_another_process_are_seen_by_the_daemon(backend: Backend) -> None:
    daemon, admin = backend.storage, backend.open()
    daemon.apply([Delta("a@x", 4, E1)], default_quota=10)
    admin.set_quota("a@x", 99, True, E1)
    assert daemon.apply([Delta("a@x", 1, E1)], 10)["a@x"] == row("a@x", 99, 5, E1, True)


# -- migrate-keys: rows the Perl daemon stored with mixed-case keys ---------------------

NOW = E1 - 600  # E1 ends the current window; E0 ended before NOW
E0 = E1 - 3600


def rows_of(backend: Backend) -> list[tuple[Any, ...]]:
    return sorted(backend.sql("SELECT sender, quota, used, expiry, persist FROM ratelimit"))


def test_mixed_case_rows_are_the_ones_the_daemon_never_reads(
    backend: Backend, storage: Storage
) -> None:
    for sender in ("Mixed@Example.com", "lower@example.com", "Example.ORG",
                   "ÄRGER@bücher.example", "jörg@bücher.example", "o'Brien@x"):
        put(backend, sender, quota=5, used=1, expiry=E1)
    # Python's str.lower() decides, as for the daemon's keys: non-ASCII letters included.
    assert sorted(r.sender for r in storage.mixed_case_rows()) == sorted(
        ["Mixed@Example.com", "Example.ORG", "ÄRGER@bücher.example", "o'Brien@x"])


def test_merge_sums_the_current_window_and_keeps_the_smallest_persistent_quota(
    backend: Backend, storage: Storage
) -> None:
    # The case: the operator's persistent quota 3 on the Perl daemon's row, and
    # the lower-case row this daemon created meanwhile with the default quota.
    put(backend, "Mixed@Example.com", quota=3, used=5, expiry=E1, persist=1)
    put(backend, "MIXED@example.com", quota=10, used=7, expiry=E0, persist=1)  # window over
    put(backend, "mixed@example.com", quota=1000, used=2, expiry=E1)
    before = rows_of(backend)
    sources = ["MIXED@example.com", "Mixed@Example.com"]

    plan = storage.merge_keys("mixed@example.com", sources, NOW, apply=False)
    assert plan is not None and plan.after is None
    assert rows_of(backend) == before, "a dry run changes nothing"
    assert (plan.used_before, plan.added, plan.used_after) == (2, 5, 7)
    assert (plan.quota, plan.persist, plan.conflict) == (3, True, True)
    assert "most restrictive" in plan.quota_reason and plan.renamed is None

    done = storage.merge_keys("mixed@example.com", sources, NOW, apply=True)
    assert done is not None
    assert done.after == row("mixed@example.com", 3, 7, E1, True)
    assert rows_of(backend) == [("mixed@example.com", 3, 7, E1, 1)]
    assert storage.mixed_case_rows() == []
    assert storage.merge_keys("mixed@example.com", sources, NOW, apply=True) is None


def test_quota_zero_is_the_most_restrictive_persistent_quota(
    backend: Backend, storage: Storage
) -> None:
    put(backend, "Blocked@x", quota=0, used=0, expiry=E1, persist=1)
    put(backend, "blocked@x", quota=50, used=4, expiry=E1, persist=1)
    done = storage.merge_keys("blocked@x", ["Blocked@x"], NOW, apply=True)
    assert done is not None and done.conflict
    assert rows_of(backend) == [("blocked@x", 0, 4, E1, 1)]


def test_without_persistent_rows_the_lowercase_rows_quota_stays(
    backend: Backend, storage: Storage
) -> None:
    put(backend, "Bob@x", quota=20, used=3, expiry=E1)
    put(backend, "bob@x", quota=1000, used=4, expiry=E1)
    done = storage.merge_keys("bob@x", ["Bob@x"], NOW, apply=True)
    assert done is not None and not done.conflict and not done.persist
    assert rows_of(backend) == [("bob@x", 1000, 7, E1, 0)]


def test_without_a_lowercase_row_one_source_is_renamed_and_the_others_merged(
    backend: Backend, storage: Storage
) -> None:
    put(backend, "Carol@x", quota=8, used=1, expiry=E1, persist=1)
    put(backend, "CAROL@x", quota=1000, used=2, expiry=E1)
    put(backend, "Solo@Y", quota=40, used=6, expiry=E0)
    carol = storage.merge_keys("carol@x", ["CAROL@x", "Carol@x"], NOW, apply=True)
    solo = storage.merge_keys("solo@y", ["Solo@Y"], NOW, apply=True)
    # The persistent row is the one kept (renamed); the other's count is added to it.
    assert carol is not None and carol.renamed == "Carol@x"
    assert solo is not None and solo.renamed == "Solo@Y"
    assert rows_of(backend) == [("carol@x", 8, 3, E1, 1), ("solo@y", 40, 6, E0, 0)]


def test_an_ended_lowercase_window_restarts_with_the_current_counts(
    backend: Backend, storage: Storage
) -> None:
    put(backend, "Dave@x", quota=9, used=4, expiry=E1, persist=1)
    put(backend, "dave@x", quota=1000, used=900, expiry=E0)
    done = storage.merge_keys("dave@x", ["Dave@x"], NOW, apply=True)
    assert done is not None and done.used_before == 0
    assert rows_of(backend) == [("dave@x", 9, 4, E1, 1)]


def test_a_count_the_daemon_adds_after_the_dry_run_is_kept(
    backend: Backend, storage: Storage
) -> None:
    # The merge re-reads the rows in its own transaction and adds to the target: the
    # count a running daemon flushed since the dry run is neither lost nor doubled.
    put(backend, "Eve@x", quota=3, used=2, expiry=E1, persist=1)
    daemon = storage
    admin = backend.open()
    daemon.apply([Delta("eve@x", 1, E1)], default_quota=1000)
    plan = admin.merge_keys("eve@x", ["Eve@x"], NOW, apply=False)
    assert plan is not None and plan.used_after == 3
    daemon.apply([Delta("eve@x", 4, E1)], default_quota=1000)
    done = admin.merge_keys("eve@x", ["Eve@x"], NOW, apply=True)
    assert done is not None and done.after == row("eve@x", 3, 7, E1, True)
    # And the daemon's next flush adds to the merged row, under the persistent quota.
    assert daemon.apply([Delta("eve@x", 1, E1)], default_quota=1000) == {
        "eve@x": row("eve@x", 3, 8, E1, True)}


# -- schema ----------------------------------------------------------------------------


def test_check_schema_accepts_the_shipped_schema(storage: Storage) -> None:
    storage.check_schema()


def test_check_schema_names_a_missing_table(backend: Backend, storage: Storage) -> None:
    backend.sql("DROP VIEW view_ratelimit")
    backend.sql("DROP TABLE ratelimit")
    with pytest.raises(StorageError, match="table ratelimit not found") as info:
        storage.check_schema()
    assert info.value.transient is False
    assert "init-db" in str(info.value)


def test_check_schema_names_a_missing_column(backend: Backend) -> None:
    other = backend.open(names=TableNames(persist="keep"))
    with pytest.raises(StorageError, match=r"lacks column.*keep") as info:
        other.check_schema()
    assert info.value.transient is False


def test_init_schema_and_the_shipped_file_make_the_same_table(
    backend: Backend, tmp_path: Path
) -> None:
    # The backend's table came from the shipped file (MySQL) or from init_schema
    # (SQLite); build the other kind and compare what the database reports.
    if isinstance(backend, MySQLBackend):
        db = f"{backend.db}_init"
        backend.server.create_database(db)
        try:
            open_storage(backend.server.url(db), create_schema=True).close()
            other = MySQLBackend(backend.server, db, backend.server.url(db))
            other.close_all()
            for table in ("ratelimit", "view_ratelimit"):
                assert other.columns(table) == backend.columns(table)
            show = "SHOW CREATE TABLE ratelimit"
            assert other.sql(show) == backend.sql(show)
        finally:
            backend.server.execute(f"DROP DATABASE `{db}`")
    else:
        assert isinstance(backend, SQLiteBackend)
        path = tmp_path / "from-file.sqlite3"
        con = sqlite3.connect(path)
        con.executescript((ROOT / "sql" / "sqlite" / "001_ratelimit.sql").read_text())
        con.close()
        from_file = SQLiteBackend(path)  # the table exists: open_storage leaves it alone
        from_file.close_all()
        for table in ("ratelimit", "view_ratelimit"):
            assert from_file.columns(table) == backend.columns(table)
        assert from_file.indexes() == backend.indexes()


def test_configured_table_and_column_names(backend: Backend) -> None:
    names = TableNames(
        table="quota_rows",
        sender="email",
        quota="max_rcpt",
        used="tally",
        expiry="resets_at",
        persist="keep",
        updated="touched",
    )
    custom = backend.open(url=backend.admin_url, names=names, create_schema=True)
    custom.check_schema()
    got = custom.apply([Delta("a@x", 2, E1), Delta("a@x", 3, E2)], default_quota=10)
    assert got == {"a@x": row("a@x", 10, 3, E2)}
    assert custom.set_quota("a@x", 20, True, E1) == row("a@x", 20, 3, E2, True)
    assert list(custom.iter_rows()) == [row("a@x", 20, 3, E2, True)]
    assert backend.sql("SELECT email, tally FROM quota_rows") == [("a@x", 3)]
    assert backend.sql("SELECT COUNT(*) FROM ratelimit") == [(0,)]


def test_a_closed_storage_refuses_work(backend: Backend) -> None:
    other = backend.open()
    other.close()
    with pytest.raises(StorageError) as info:
        other.load(["a@x"])
    assert info.value.transient is False


# -- open_storage for SQLite ---------------------------------------------------------------


def test_sqlite_creates_its_directory_and_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "rl.sqlite3"
    storage = open_storage(f"sqlite://{path}")
    try:
        storage.check_schema()
        assert storage.apply([Delta("a@x", 1, E1)], 5) == {"a@x": row("a@x", 5, 1, E1)}
    finally:
        storage.close()
    assert path.exists()
    con = sqlite3.connect(path)
    try:
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert con.execute("SELECT sender, used FROM view_ratelimit").fetchall() == [("a@x", 1)]
    finally:
        con.close()


def test_sqlite_url_is_percent_decoded(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite://{tmp_path}/with%20space.sqlite3")
    storage.close()
    assert (tmp_path / "with space.sqlite3").exists()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://relative/path.sqlite3", "three slashes"),
        ("sqlite:///", "absolute file path"),
        ("sqlite:///tmp/x.sqlite3?mode=ro", "no query"),
        ("postgres://u@h/db", "unsupported database URL"),
        ("/var/lib/ratelimit.sqlite3", "unsupported database URL"),
        ("", "unsupported database URL"),
        ("mysql://h/db", "a user is required"),
        ("mysql://u@h/", "name one database"),
        ("mysql://u@h/a/b", "name one database"),
        ("mysql://u:secret@h:99999/db", "port is a number 1-65535"),
        ("mysql://u:secret@h:x/db", "port is a number 1-65535"),
        ("mysql://u@h:0/db", "port must be 1-65535"),
        ("mysql://u:secret@[::1/db", "the host or port cannot be read"),
        ("mysql://u@h/db?unix_socket", "malformed query string"),
        ("mysql://u:secret@h/db?timeout=3", "unknown parameter"),
        ("mysql://u@/db", "a host or ?unix_socket"),
        ("mysql://u@h/db?charset=klingon", "charset"),
    ],
)
def test_bad_urls_are_refused_with_a_clear_message(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        open_storage(url)
    assert "secret" not in str(info.value)


def test_bad_pool_and_timeout_settings_are_refused(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/x.sqlite3"
    bad: list[Callable[[], Storage]] = [
        lambda: open_storage(url, pool_size=0),
        lambda: open_storage(url, connect_timeout=0),
        lambda: open_storage(url, read_timeout=-1),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()


def test_sqlite_reports_an_unusable_path(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError) as info:
        open_storage(f"sqlite://{blocker}/sub/rl.sqlite3")
    assert info.value.transient is False


# -- apply_once: spooled counts written exactly once -----------------------------------


def test_apply_once_writes_a_flush_once_and_a_later_sequence_again(
    backend: Backend, storage: Storage
) -> None:
    from ratelimit_policyd.model import FlushId

    mark = FlushId("spool-" + "5" * 32, 3)
    deltas = [Delta("b@x", 1, E1), Delta("a@x", 2, E1), Delta("a@x", 1, E2)]
    assert storage.apply_once(deltas, 100, mark) is True
    # Again (a crash before the spool file was removed): nothing is written.
    assert storage.apply_once(deltas, 100, mark) is False
    assert storage.apply_once(deltas, 100, mark._replace(seq=2)) is False  # older
    assert storage.load(["a@x", "b@x"]) == {"a@x": row("a@x", 100, 1, E2),
                                            "b@x": row("b@x", 100, 1, E1)}
    assert backend.sql("SELECT daemon, seq FROM ratelimit_flushlog") == [(mark.source, 3)]
    # A later flush of the same source (a daemon's next batch) is written.
    assert storage.apply_once([Delta("b@x", 4, E1)], 100, mark._replace(seq=4)) is True
    assert storage.load(["b@x"])["b@x"].used == 5
    other = FlushId("0" * 32, 1)
    assert storage.apply_once([Delta("b@x", 1, E1)], 100, other) is True
    storage.forget_flushes([mark.source, "never-seen"])
    assert backend.sql("SELECT daemon, seq FROM ratelimit_flushlog") == [(other.source, 1)]
    storage.forget_flushes([])
