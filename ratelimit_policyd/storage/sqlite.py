"""SQLite backend (stdlib ``sqlite3``): the zero-setup default.

One connection in WAL mode, guarded by a lock of this object, shared by every thread
of the daemon; other processes (admin commands) write to the same file meanwhile,
SQLite's busy timeout making each side wait for the other's short write transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from ratelimit_policyd.model import Delta, FlushId, Row
from ratelimit_policyd.storage.base import StorageError, TableNames
from ratelimit_policyd.storage.keymerge import KeyMerge, needs_lowering, plan_merge

log = logging.getLogger(__name__)

#: Senders per statement or IN list: SQLite before 3.32 allows 999 parameters.
CHUNK: Final = 500

# Primary result codes (sqlite3.h). Waiting and retrying may help with these ...
_TRANSIENT_CODES: Final = frozenset({5, 6, 7, 10, 13, 14, 15})  # BUSY LOCKED NOMEM IOERR ...
# ... and these come from the value itself: the same row fails again.
_DATA_CODES: Final = frozenset({18, 19, 20, 25})  # TOOBIG CONSTRAINT MISMATCH RANGE


def _q(name: str) -> str:
    """Quote an identifier (names are validated by config; quoting is the second guard)."""
    return '"' + name.replace('"', '""') + '"'


def schema_ddl(names: TableNames = TableNames()) -> list[str]:  # noqa: B008 -- frozen
    """The statements of sql/sqlite/001_ratelimit.sql, for the configured names."""
    t, s, p = _q(names.table), _q(names.sender), _q(names.persist)
    q, u, e, upd = _q(names.quota), _q(names.used), _q(names.expiry), _q(names.updated)
    return [
        f"CREATE TABLE IF NOT EXISTS {t} ("
        ' "id" INTEGER PRIMARY KEY,'
        f" {s} TEXT NOT NULL UNIQUE CHECK (length({s}) <= 255),"
        f" {p} INTEGER NOT NULL DEFAULT 0,"
        f" {q} INTEGER NOT NULL DEFAULT 0 CHECK ({q} BETWEEN 0 AND 4294967295),"
        f" {u} INTEGER NOT NULL DEFAULT 0 CHECK ({u} BETWEEN 0 AND 4294967295),"
        f" {upd} TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,"
        f" {e} INTEGER DEFAULT NULL CHECK ({e} BETWEEN 0 AND 4294967295))",
        f"CREATE VIEW IF NOT EXISTS {_q('view_' + names.table)} AS"
        f' SELECT "id", {s}, {p}, {q}, {u}, {upd},'
        f" datetime({e}, 'unixepoch', 'localtime') AS {e} FROM {t}",
        flushlog_ddl(names),
    ]


def flushlog_ddl(names: TableNames = TableNames()) -> str:  # noqa: B008 -- frozen
    """sql/sqlite/002_flushlog.sql: which spooled counts are written already."""
    return (
        f"CREATE TABLE IF NOT EXISTS {_q(names.table + '_flushlog')} ("
        ' "daemon" TEXT NOT NULL PRIMARY KEY,'
        ' "seq" INTEGER NOT NULL,'
        ' "updated" TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP)'
    )


class SQLiteStorage:
    """``Storage`` on one SQLite file; see ``storage.base.Storage`` for the contract."""

    def __init__(
        self,
        path: Path,
        *,
        names: TableNames = TableNames(),  # noqa: B008 -- frozen
        busy_timeout: float = 5.0,
    ) -> None:
        self.path = path
        self.names = names
        self._lock = threading.Lock()
        self._closed = False
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(
                f"cannot create directory {path.parent}: {exc}", transient=False
            ) from exc
        try:
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so that a write
            # transaction takes the write lock at its start (BEGIN IMMEDIATE) and never
            # fails half-way on a lock upgrade another process won.
            self._con = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise _wrap(exc, f"cannot open {path}") from exc
        try:
            # WAL lets admin commands read while the daemon writes, and is persistent.
            self._con.execute("PRAGMA journal_mode=WAL")
        except sqlite3.Error as exc:
            self._con.close()
            raise _wrap(exc, f"cannot switch {path} to WAL") from exc
        try:
            # A second connection for the request threads' reads (cache misses): in WAL
            # mode it reads the last committed state while the flusher's write
            # transaction runs on the first one, so a miss never waits for a flush.
            self._read_con = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            self._con.close()
            raise _wrap(exc, f"cannot open {path}") from exc
        self._read_lock = threading.Lock()
        self._build_sql()

    def _build_sql(self) -> None:
        n = self.names
        t, s, p = _q(n.table), _q(n.sender), _q(n.persist)
        q, u, e, upd = _q(n.quota), _q(n.used), _q(n.expiry), _q(n.updated)
        self._cols = f"{s}, {q}, {u}, {e}, {p}"
        # SET expressions all see the old row in SQLite; expiry is still assigned last
        # to read the same as the MySQL statement. NULLs of a hand-made nullable Perl
        # table read as that daemon meant them (model.Row): a NULL expiry is "expired"
        # (0), a NULL used is 0 (``used + n`` would stay NULL and swallow every count),
        # a NULL persist is 0, and a NULL quota (unlimited) is kept at a reset.
        self._upsert = (
            f"INSERT INTO {t} ({s}, {q}, {u}, {e}) VALUES (?, ?, ?, ?)"
            f" ON CONFLICT ({s}) DO UPDATE SET"
            f" {u} = CASE WHEN COALESCE({e}, 0) < excluded.{e}"
            f" THEN excluded.{u} ELSE COALESCE({u}, 0) + excluded.{u} END,"
            f" {q} = CASE WHEN COALESCE({e}, 0) < excluded.{e} AND NOT COALESCE({p}, 0)"
            f" AND {q} IS NOT NULL THEN excluded.{q} ELSE {q} END,"
            f" {upd} = CURRENT_TIMESTAMP,"
            f" {e} = MAX(COALESCE({e}, 0), excluded.{e})"
        )
        self._select = f"SELECT {self._cols} FROM {t} WHERE {s} IN "
        self._select_all = f"SELECT {self._cols} FROM {t} ORDER BY {s}"
        self._update_quota = (
            f"UPDATE {t} SET {q} = ?, {p} = COALESCE(?, {p}), {upd} = CURRENT_TIMESTAMP"
            f" WHERE {s} = ?"
        )
        self._insert_quota = f"INSERT INTO {t} ({s}, {q}, {u}, {e}, {p}) VALUES (?, ?, 0, ?, ?)"
        self._reset = f"UPDATE {t} SET {u} = 0, {upd} = CURRENT_TIMESTAMP WHERE {s} = ?"
        self._delete = f"DELETE FROM {t} WHERE {s} = ?"
        # lower() of SQLite folds ASCII only: any non-ASCII key (more bytes than
        # characters) is fetched too, and Python's str.lower(), the daemon's own, decides.
        self._mixed_case = (
            f"SELECT {self._cols} FROM {t} WHERE {s} <> lower({s})"
            f" OR length(CAST({s} AS BLOB)) <> length({s}) ORDER BY {s}"
        )
        self._rename = f"UPDATE {t} SET {s} = ?, {upd} = CURRENT_TIMESTAMP WHERE {s} = ?"
        # An increment, like the daemon's upsert: a count the daemon adds meanwhile is
        # kept. The target's own count restarts when its window has ended.
        self._merge_used = (
            f"UPDATE {t} SET {u} = CASE WHEN COALESCE({e}, 0) <= ? THEN ? ELSE {u} + ? END,"
            f" {e} = MAX(COALESCE({e}, 0), ?), {upd} = CURRENT_TIMESTAMP WHERE {s} = ?"
        )
        self._merge_quota = f"UPDATE {t} SET {q} = ?, {p} = 1 WHERE {s} = ?"
        fl = _q(n.table + "_flushlog")
        self._flushlog_create = flushlog_ddl(n)
        self._flushlog_select = f'SELECT "seq" FROM {fl} WHERE "daemon" = ?'
        self._flushlog_upsert = (
            f'INSERT INTO {fl} ("daemon", "seq") VALUES (?, ?) ON CONFLICT ("daemon")'
            ' DO UPDATE SET "seq" = excluded."seq", "updated" = CURRENT_TIMESTAMP'
        )
        self._flushlog_delete_in = f'DELETE FROM {fl} WHERE "daemon" IN '

    # -- schema ---------------------------------------------------------------------

    def has_table(self) -> bool:
        """Whether the configured table exists (open_storage creates it when not)."""
        with self._locked("look for the table") as con:
            found = con.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                (self.names.table,),
            ).fetchone()
        return found is not None

    def init_schema(self) -> None:
        with self._transaction("create the schema") as con:
            for statement in schema_ddl(self.names):
                con.execute(statement)

    def check_schema(self) -> None:
        n = self.names
        with self._locked("check the schema") as con:
            columns = {row[1] for row in con.execute(f"PRAGMA table_info({_q(n.table)})")}
            if not columns:
                raise StorageError(
                    f"table {n.table} not found in {self.path}: run `ratelimit-policyd init-db`"
                    " or apply sql/sqlite/001_ratelimit.sql",
                    transient=False,
                )
            wanted = (n.sender, n.quota, n.used, n.expiry, n.persist, n.updated)
            missing = [c for c in wanted if c not in columns]
            if missing:
                raise StorageError(
                    f"table {n.table} in {self.path} lacks column(s) {', '.join(missing)}"
                    " (compare with sql/sqlite/001_ratelimit.sql and the configured names)",
                    transient=False,
                )
            unique = False
            for index in con.execute(f"PRAGMA index_list({_q(n.table)})").fetchall():
                if index[2]:  # unique
                    cols = [r[2] for r in con.execute(f"PRAGMA index_info({_q(index[1])})")]
                    unique = unique or cols == [n.sender]
            if not unique:
                raise StorageError(
                    f"column {n.sender} of table {n.table} in {self.path} has no UNIQUE index,"
                    " which the atomic upsert needs: CREATE UNIQUE INDEX ... ON"
                    f" {n.table} ({n.sender})",
                    transient=False,
                )

    # -- the daemon's operations -----------------------------------------------------

    def load(self, senders: Sequence[str]) -> dict[str, Row]:
        unique = sorted(s for s in set(senders) if _encodable(s))
        rows: dict[str, Row] = {}
        with self._locked("load rows", read=True) as con:
            for start in range(0, len(unique), CHUNK):
                rows.update(self._select_rows(con, unique[start : start + CHUNK]))
        return rows

    def apply(self, deltas: Sequence[Delta], default_quota: int) -> dict[str, Row]:
        """See ``Storage.apply``. All deltas of the call commit in one transaction.

        Deltas run in sender order (stable, so several deltas of one sender keep their
        order); a delta the table refuses (CHECK: key longer than 255 characters, value
        out of range) is dropped and logged, and its sender left out of the result.
        """
        if not deltas:
            return {}
        ordered = sorted(deltas, key=lambda d: d.sender)
        with self._transaction("apply counts") as con:
            return self._apply(con, ordered, default_quota)

    def apply_once(self, deltas: Sequence[Delta], default_quota: int, flush: FlushId) -> bool:
        """See ``Storage.apply_once``. A COMMIT here cannot go unanswered, but a crash
        between writing spooled counts and removing the spool file can: the flush log
        table (created here for a file made before it existed) tells the next start."""
        if not deltas:
            return False
        ordered = sorted(deltas, key=lambda d: d.sender)
        with self._transaction("write spooled counts") as con:
            con.execute(self._flushlog_create)
            found = con.execute(self._flushlog_select, (flush.source,)).fetchone()
            if found is not None and int(found[0]) >= flush.seq:
                return False
            self._apply(con, ordered, default_quota)
            con.execute(self._flushlog_upsert, flush)
        return True

    def forget_flushes(self, sources: Sequence[str]) -> None:
        if not sources:
            return
        with self._transaction("forget flush log rows") as con:
            con.execute(self._flushlog_create)
            for start in range(0, len(sources), CHUNK):
                part = tuple(sources[start : start + CHUNK])
                con.execute(self._flushlog_delete_in + "(" + ", ".join("?" * len(part)) + ")",
                            part)

    def _apply(self, con: sqlite3.Connection, ordered: list[Delta],
               default_quota: int) -> dict[str, Row]:
        """The deltas, in sender order, inside the caller's transaction."""
        dropped: set[str] = set()
        # Fast path: one executemany (a C loop) inside a savepoint. Only if the table
        # refuses a value does it fall back to one statement per delta, to drop
        # just the refused ones.
        con.execute("SAVEPOINT bulk")
        try:
            con.executemany(self._upsert, [(d.sender, default_quota, d.n, d.expiry)
                                           for d in ordered])
        except (sqlite3.Error, OverflowError, UnicodeEncodeError) as exc:
            if not _is_data_error(exc):
                raise
            con.execute("ROLLBACK TO bulk")
            bulk_ok = False
        else:
            bulk_ok = True
        con.execute("RELEASE bulk")
        for delta in () if bulk_ok else ordered:
            try:
                con.execute(self._upsert, (delta.sender, default_quota, delta.n, delta.expiry))
            except (sqlite3.Error, OverflowError, UnicodeEncodeError) as exc:
                # SQLite undoes just the failed statement (ABORT); the transaction
                # and the other deltas go on.
                if not _is_data_error(exc):
                    raise
                _log_dropped(delta, exc)
                dropped.add(delta.sender)
        senders = sorted({d.sender for d in ordered} - dropped)
        rows: dict[str, Row] = {}
        for start in range(0, len(senders), CHUNK):
            rows.update(self._select_rows(con, senders[start : start + CHUNK]))
        return rows

    # -- admin operations ------------------------------------------------------------

    def iter_rows(self) -> list[Row]:
        with self._locked("list rows") as con:
            return [_row(r) for r in con.execute(self._select_all)]

    def set_quota(self, sender: str, quota: int, persist: bool | None, expiry: int) -> Row:
        flag = None if persist is None else int(persist)
        with self._transaction(f"set the quota of {sender!r}") as con:
            if con.execute(self._update_quota, (quota, flag, sender)).rowcount == 0:
                con.execute(self._insert_quota, (sender, quota, expiry, flag or 0))
            return self._select_rows(con, [sender])[sender]

    def reset(self, sender: str) -> Row | None:
        with self._transaction(f"reset {sender!r}") as con:
            if con.execute(self._reset, (sender,)).rowcount == 0:
                return None
            return self._select_rows(con, [sender])[sender]

    def delete(self, sender: str) -> bool:
        with self._transaction(f"delete {sender!r}") as con:
            return con.execute(self._delete, (sender,)).rowcount > 0

    def mixed_case_rows(self) -> list[Row]:
        with self._locked("look for keys that are not lower case") as con:
            found = [_row(r) for r in con.execute(self._mixed_case)]
        return [r for r in found if needs_lowering(r.sender)]

    def merge_keys(self, target: str, sources: Sequence[str], now: int, *,
                   apply: bool) -> KeyMerge | None:
        action = f"merge keys into {target!r}"
        if not apply:
            with self._locked(action, read=True) as con:
                return self._plan_merge(con, target, sources, now)
        # BEGIN IMMEDIATE holds the write lock from the first read: the daemon's flush
        # waits (its busy timeout) until the merge has committed.
        with self._transaction(action) as con:
            plan = self._plan_merge(con, target, sources, now)
            if plan is None:
                return None
            if plan.renamed is not None:
                con.execute(self._rename, (target, plan.renamed))
            live = [r for r in plan.merged if plan.live(r)]
            if live:
                con.execute(self._merge_used, (now, plan.added, plan.added,
                                               max(r.expiry for r in live), target))
            if plan.set_quota:
                con.execute(self._merge_quota, (plan.quota, target))
            for r in plan.merged:
                con.execute(self._delete, (r.sender,))
            return plan.with_after(self._select_rows(con, [target]).get(target))

    def _plan_merge(self, con: sqlite3.Connection, target: str, sources: Sequence[str],
                    now: int) -> KeyMerge | None:
        wanted = sorted({target, *sources})
        found = self._select_rows(con, wanted)
        # Exact matches only: under a NOCASE collation the lookup of one spelling may
        # also return another's row.
        rows = {k: r for k, r in found.items() if r.sender == k}
        present = [rows[s] for s in sorted(set(sources)) if s in rows and s != target]
        if not present:
            return None
        return plan_merge(target, rows.get(target), present, now)

    def close(self) -> None:
        with self._lock, self._read_lock:
            if not self._closed:
                self._closed = True
                self._con.close()
                self._read_con.close()

    # -- helpers ---------------------------------------------------------------------

    def _select_rows(self, con: sqlite3.Connection, senders: Sequence[str]) -> dict[str, Row]:
        if not senders:
            return {}
        sql = self._select + "(" + ", ".join("?" * len(senders)) + ")"
        return {r.sender: r for r in map(_row, con.execute(sql, tuple(senders)))}

    @contextmanager
    def _locked(self, action: str, read: bool = False) -> Iterator[sqlite3.Connection]:
        """A connection, held by this thread; sqlite3 errors become StorageError.

        ``read``: the read-only connection (never inside a write transaction).
        """
        with self._read_lock if read else self._lock:
            if self._closed:
                raise StorageError(f"cannot {action}: storage is closed", transient=False)
            try:
                yield self._read_con if read else self._con
            except (sqlite3.Error, OverflowError, ValueError) as exc:
                # ValueError: a non-numeric value an operator put in a numeric column.
                raise _wrap(exc, f"cannot {action} in {self.path}") from exc

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed on success, rolled back on any error."""
        with self._locked(action) as con:
            # IMMEDIATE takes the write lock now (waiting up to the busy timeout for
            # another process), so no statement inside can hit SQLITE_BUSY.
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.warning("rollback failed in %s", self.path, exc_info=True)
                raise


def _row(r: tuple[object, ...]) -> Row:
    sender, quota, used, expiry, persist = r
    if type(quota) is int and type(used) is int and type(sender) is str:
        # The common case, without the per-value checks (this runs for every row of
        # every flush).
        return Row(sender, quota, used, expiry if type(expiry) is int else _int(expiry),
                   bool(persist))
    return Row(
        sender=str(sender),
        quota=None if quota is None else _int(quota),  # NULL: unlimited
        used=_int(used),  # NULL (a nullable Perl column) reads as 0
        expiry=_int(expiry),  # NULL (rows of the Perl daemon) reads as 0: expired
        persist=bool(persist),
    )


def _int(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, int | float | str):
        return int(value)
    raise ValueError(f"unexpected value {value!r} in a numeric column")


def _primary_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _encodable(sender: str) -> bool:
    """False for a str no database can store (a lone surrogate: not UTF-8 text)."""
    try:
        sender.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_data_error(exc: BaseException) -> bool:
    """An error the same value will hit again (as opposed to a busy or broken DB)."""
    if isinstance(
        exc, OverflowError | UnicodeEncodeError | sqlite3.IntegrityError | sqlite3.DataError
    ):
        # Refused by the driver itself: an int beyond 64 bits, a str not UTF-8 text.
        return True
    return _primary_code(exc) in _DATA_CODES


def _wrap(exc: BaseException, context: str) -> StorageError:
    code = _primary_code(exc)
    if isinstance(exc, sqlite3.ProgrammingError | ValueError) or _is_data_error(exc):
        transient = False
    else:
        # Unknown codes count as transient: the flusher keeps the counts and retries.
        transient = code is None or code in _TRANSIENT_CODES
    return StorageError(f"{context}: {exc}", transient=transient)


def _log_dropped(delta: Delta, exc: BaseException) -> None:
    log.error(
        "dropped %d recipient(s) for key %.300r (expiry %d): the database refuses it: %s",
        delta.n,
        delta.sender,
        delta.expiry,
        exc,
    )
