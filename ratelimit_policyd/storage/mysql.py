"""MySQL / MariaDB backend: PyMySQL connections in a DBUtils ``PooledDB``.

Works on the Perl daemon's table with only its grants (SELECT, INSERT, UPDATE, DELETE),
shared by several daemons: every count is one atomic upsert, never a value read earlier.
Imported only when a ``mysql://`` URL is configured. Sees only ``model`` and ``base``.
"""

from __future__ import annotations

import itertools
import logging
import random
import threading
import time
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, Protocol, TypeVar

import pymysql
from dbutils.pooled_db import PooledDB, PooledDBError
from pymysql.constants import CLIENT

from ratelimit_policyd.model import Delta, FlushId, Row
from ratelimit_policyd.storage.base import StorageError, TableNames
from ratelimit_policyd.storage.keymerge import KeyMerge, needs_lowering, plan_merge

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Rows per multi-row statement and per IN list (a few hundred kB of SQL at most).
CHUNK: Final = 1000
#: Attempts of a whole apply() when InnoDB picks it as a deadlock victim or a lock
#: wait times out (another daemon holds the rows); then StorageError(transient=True).
TX_ATTEMPTS: Final = 3
#: After the server was found unreachable, calls fail at once for this long, and then
#: one call at a time probes it (see _Breaker).
PROBE_INTERVAL: Final = 1.0
#: A pooled connection checked this recently is used without a ping (see ``_ping``).
PING_AFTER: Final = 5.0

# MySQL / MariaDB error numbers, by what the caller can do about them.
_CONNECTION_ERRORS: Final = frozenset(
    {0, 2002, 2003, 2006, 2013, 2014, 2055, 1053, 1927}  # refused, gone, lost, shutdown
)
_RETRY_ERRORS: Final = frozenset({1205, 1213, 1020, 1412})  # lock wait, deadlock, ...
_DATA_ERRORS: Final = frozenset(
    # null, duplicate, out of range, truncated, bad date, bad string, too long, CHECK,
    # a string the column's character set cannot represent ("illegal mix of collations")
    {1048, 1062, 1264, 1265, 1267, 1270, 1271, 1292, 1300, 1366, 1367, 1406, 1690, 3819, 4025}
)
_PERMANENT_ERRORS: Final = frozenset(
    # access denied, unknown db/column/table, syntax, command denied, bad view
    {1044, 1045, 1049, 1054, 1064, 1109, 1142, 1143, 1146, 1227, 1356, 1370, 1698}
)


class _Kind(Enum):
    CONNECTION = "connection"  # server unreachable or connection lost: transient
    RETRY = "retry"  # deadlock / lock wait: retry the transaction now
    DATA = "data"  # this value is refused: drop it, the rest goes on
    PERMANENT = "permanent"  # schema or grants: transient=False
    OTHER = "other"  # anything else: transient, the counts wait in memory


def _classify(exc: BaseException) -> _Kind:
    if isinstance(exc, UnicodeEncodeError):
        return _Kind.DATA  # a str that is not UTF-8 text, refused by the driver
    if isinstance(exc, pymysql.err.InterfaceError | OSError):
        return _Kind.CONNECTION
    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
    if code in _CONNECTION_ERRORS:
        return _Kind.CONNECTION
    if code in _RETRY_ERRORS:
        return _Kind.RETRY
    if code in _DATA_ERRORS:
        return _Kind.DATA
    if code in _PERMANENT_ERRORS:
        return _Kind.PERMANENT
    return _Kind.OTHER


def _describe(exc: BaseException) -> str:
    if len(exc.args) == 2 and isinstance(exc.args[0], int):
        return f"MySQL error {exc.args[0]}: {exc.args[1]}"
    return f"{type(exc).__name__}: {exc}"


_DRIVER_ERRORS: Final = (pymysql.err.Error, PooledDBError, OSError, UnicodeEncodeError)


class _FailFast(Exception):
    """Raised inside the pool instead of dialling while the breaker is open."""


class _Breaker:
    """Fail fast while the server is unreachable, letting one call at a time probe it.

    DBUtils pings and connects while holding the pool's lock, so against a server that
    does not answer, every waiting thread would pay a full timeout in turn. Once one
    call has found the server unreachable, others fail at once (the cache answers from
    memory), and every PROBE_INTERVAL a single call tries the server again.
    """

    def __init__(self, interval: float = PROBE_INTERVAL) -> None:
        self._lock = threading.Lock()
        self._interval = interval
        self._down_until: float | None = None
        self._probing = False
        self._reason = ""
        self._local = threading.local()

    def enter(self) -> None:
        """Before a call: return to go on, or raise StorageError to fail fast."""
        with self._lock:
            self._local.probe = False
            if self._down_until is None:
                return
            if self._probing or time.monotonic() < self._down_until:
                raise StorageError(
                    f"database unreachable ({self._reason}); not retried for a moment",
                    transient=True,
                )
            self._probing = True
            self._local.probe = True

    def leave(self, reachable: bool | None, reason: str = "") -> None:
        """After a call: whether it reached the server (None: it did not find out)."""
        with self._lock:
            if getattr(self._local, "probe", False):
                self._probing = False
                self._local.probe = False
            if reachable:
                self._down_until = None
            elif reachable is not None:
                self._down_until = time.monotonic() + self._interval
                self._reason = reason

    def holds_back(self) -> bool:
        """True when this thread must not do network I/O now (open, and not the probe)."""
        return self._down_until is not None and not getattr(self._local, "probe", False)


class _Connector:
    """DBUtils creator: ``pymysql.connect`` that refuses to dial while held back."""

    dbapi = pymysql
    threadsafety = 1

    def __init__(self, breaker: _Breaker, kwargs: dict[str, Any]) -> None:
        self._breaker = breaker
        self._kwargs = kwargs

    def __call__(self) -> pymysql.connections.Connection[Any]:
        if self._breaker.holds_back():
            raise _FailFast
        return pymysql.connect(**self._kwargs)


@dataclass(frozen=True, slots=True)
class _TableInfo:
    """What information_schema says about the table, looked up once per storage."""

    autoinc: str | None  # the AUTO_INCREMENT column: `id` in the Perl table
    max_length: int | None  # of the sender column: 255 in the Perl table
    charset: str | None  # of the sender column: utf8 (3-byte) in the Perl table
    flushlog: bool = False  # the optional <table>_flushlog exists (idempotent flushes)

    def refuses(self, sender: str) -> str | None:
        """Why the sender column cannot hold this key, or None.

        Such a key is dropped before any SQL: sent in an IN list, a character the
        column's character set lacks makes the whole statement fail, and a refused
        multi-row upsert would be re-run row by row on every flush.
        """
        try:
            sender.encode("utf-8")
        except UnicodeEncodeError:
            return "not UTF-8 text (a lone surrogate)"
        if self.max_length is not None and len(sender) > self.max_length:
            return f"longer than the column's {self.max_length} characters"
        charset = (self.charset or "").lower()
        # isascii() first: a C-level check that settles almost every key at once.
        if (charset in ("utf8", "utf8mb3") and not sender.isascii()
                and any(ord(c) > 0xFFFF for c in sender)):
            return "a character beyond the column's 3-byte utf8 (utf8mb3)"
        if charset == "ascii" and not sender.isascii():
            return "not ASCII, as the column is"
        return None


class _Cursor(Protocol):
    rowcount: int

    def execute(self, query: str, args: Sequence[object] = ...) -> int: ...

    def fetchall(self) -> Sequence[tuple[Any, ...]]: ...

    def close(self) -> None: ...


def _q(name: str) -> str:
    """Quote an identifier (names are validated by config; quoting is the second guard)."""
    return "`" + name.replace("`", "``") + "`"


def _marks(count: int) -> str:
    return ", ".join(["%s"] * count)


def schema_ddl(names: TableNames = TableNames()) -> list[str]:  # noqa: B008 -- frozen
    """The statements of sql/mysql/001_ratelimit.sql, for the configured names."""
    t, s, p = _q(names.table), _q(names.sender), _q(names.persist)
    q, u, e, upd = _q(names.quota), _q(names.used), _q(names.expiry), _q(names.updated)
    return [
        f"CREATE TABLE IF NOT EXISTS {t} ("
        " `id` INT(11) NOT NULL AUTO_INCREMENT,"
        f" {s} VARCHAR(255) CHARACTER SET 'utf8' COLLATE 'utf8_bin' NOT NULL"
        " COMMENT 'sender address (SASL username)',"
        f" {p} TINYINT(1) NOT NULL DEFAULT '0'"
        " COMMENT 'Do not reset the given quota to the default value after expiry reached.',"
        f" {q} INT(10) UNSIGNED NOT NULL DEFAULT '0'"
        " COMMENT 'hourly|daily|weekly|monthly recipient quota limit',"
        f" {u} INT(10) UNSIGNED NOT NULL DEFAULT '0' COMMENT 'current recipient counter',"
        f" {upd} TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP"
        " COMMENT 'when used counter was last updated',"
        f" {e} INT(10) UNSIGNED DEFAULT NULL"
        " COMMENT 'expiry (Unix-timestamp) after which the counter gets reset',"
        f" PRIMARY KEY (`id`), UNIQUE INDEX `idx_sender` ({s} ASC)"
        ") ENGINE = InnoDB DEFAULT CHARACTER SET = utf8",
        f"CREATE OR REPLACE VIEW {_q('view_' + names.table)} AS"
        f" SELECT `id`, {s}, {p}, {q}, {u}, {upd}, FROM_UNIXTIME({e}) AS {e} FROM {t}",
        flushlog_ddl(names),
    ]


def flushlog_name(names: TableNames) -> str:
    return names.table + "_flushlog"


def flushlog_ddl(names: TableNames = TableNames()) -> str:  # noqa: B008 -- frozen
    """sql/mysql/002_flushlog.sql: the optional table that makes flushes idempotent."""
    return (
        f"CREATE TABLE IF NOT EXISTS {_q(flushlog_name(names))} ("
        " `daemon` VARCHAR(64) NOT NULL COMMENT 'one running daemon (random per start)',"
        " `seq` BIGINT UNSIGNED NOT NULL COMMENT 'its last committed flush',"
        " `updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,"
        " PRIMARY KEY (`daemon`)) ENGINE = InnoDB"
    )


class MySQLStorage:
    """``Storage`` on MySQL / MariaDB; see ``storage.base.Storage`` for the contract.

    A call on a dead server returns StorageError within about connect_timeout +
    read_timeout (one ping and one reconnect attempt), and at once while another call
    has just found the server unreachable (see _Breaker).
    """

    def __init__(
        self,
        *,
        host: str,
        port: int,
        user: str,
        password: str,
        database: str,
        unix_socket: str | None = None,
        charset: str = "utf8mb4",
        names: TableNames = TableNames(),  # noqa: B008 -- frozen
        pool_size: int = 8,
        connect_timeout: float = 3.0,
        read_timeout: float = 5.0,
    ) -> None:
        if pymysql.charset.charset_by_name(charset) is None:
            raise ValueError(f"unknown MySQL charset {charset!r}")
        self.names = names
        self.database = database
        self.where = f"{database} on {unix_socket or f'{host}:{port}'}"
        self._breaker = _Breaker()
        self._info: _TableInfo | None = None
        # Identifies this process's flushes in the optional flush log.
        self._daemon_id = uuid.uuid4().hex
        self._flush_seq = itertools.count(1)
        self._logged_flush = False
        # Sequences of flushes whose COMMIT went unanswered and that no resolve() has
        # settled yet: while there is one, this daemon's flush log row is still the
        # only witness of whether it committed (its counts may be spooled with it),
        # so close() must leave the row in place.
        self._doubtful: set[int] = set()
        self._closed = False
        connector = _Connector(
            self._breaker,
            {
                "host": host,
                "port": port,
                "user": user,
                # PyMySQL would encode a str password as latin-1; the server hashed the
                # UTF-8 bytes the operator typed in a UTF-8 client.
                "password": password.encode("utf-8"),
                "database": database,
                "unix_socket": unix_socket,
                "charset": charset,
                "connect_timeout": connect_timeout,
                "read_timeout": read_timeout,
                "write_timeout": read_timeout,
                "autocommit": False,
                # rowcount of UPDATE = rows matched, not rows changed: reset() of a row
                # already at 0 still finds it.
                "client_flag": CLIENT.FOUND_ROWS,
            },
        )
        # A lock wait must give up before the client's read timeout does, so that the
        # error is a clean "lock wait timeout" (retried) rather than a lost connection.
        lock_wait = max(1, int(read_timeout / 2))
        self._pool = PooledDB(
            creator=connector,
            mincached=0,  # connect on first use: the daemon starts while the DB is down
            maxcached=pool_size,
            maxshared=0,  # PyMySQL connections are not thread-safe: never shared
            maxconnections=pool_size,
            blocking=True,
            reset=False,  # every call ends its own transaction (see _run)
            ping=(1, self._ping),
            isfatal=lambda _error: False,  # no silent re-execution: _run decides
            setsession=[
                # READ COMMITTED: SELECT ... FOR UPDATE locks the rows it finds and no
                # gaps, so daemons inserting new keys do not deadlock on gap locks.
                "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
                # Strict mode, whatever the server's default: a value the column cannot
                # hold is an error (that delta is dropped and logged), never silently
                # truncated into another key or clamped.
                "SET SESSION sql_mode = 'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
                f"SET SESSION innodb_lock_wait_timeout = {lock_wait}",
            ],
        )
        self._build_sql()

    def _build_sql(self) -> None:
        n = self.names
        t, s, p = _q(n.table), _q(n.sender), _q(n.persist)
        q, u, e, upd = _q(n.quota), _q(n.used), _q(n.expiry), _q(n.updated)
        self._t, self._s = t, s
        self._cols = f"{s}, {q}, {u}, {e}, {p}"
        # MySQL evaluates single-table SET assignments left to right, each seeing the
        # values assigned before it: expiry must be assigned last, or the other two
        # would compare against the new expiry. COALESCE: the Perl daemon's rows may
        # hold a NULL expiry, which counts as expired; the other NULLs of a hand-made
        # nullable Perl table read as that daemon meant them (model.Row): a NULL used is
        # 0 (``used + n`` would stay NULL and swallow every count), a NULL persist is 0,
        # and a NULL quota (unlimited) is kept at a reset. VALUES(col) is the value the
        # row would have been inserted with; MySQL 8.0.20+ deprecates it in favour of
        # a row alias that MariaDB lacks, so VALUES() is what both understand.
        reset = f"COALESCE({e}, 0) < VALUES({e})"
        self._upsert_tail = (
            " ON DUPLICATE KEY UPDATE"
            f" {u} = IF({reset}, VALUES({u}), COALESCE({u}, 0) + VALUES({u})),"
            f" {q} = IF({reset} AND COALESCE({p}, 0) = 0 AND {q} IS NOT NULL,"
            f" VALUES({q}), {q}),"
            f" {upd} = NOW(),"
            f" {e} = GREATEST(COALESCE({e}, 0), VALUES({e}))"
        )
        self._upsert_head = f"INSERT INTO {t} ({s}, {q}, {u}, {e}) VALUES "
        self._select = f"SELECT {self._cols} FROM {t} WHERE {s} IN "
        self._select_all = f"SELECT {self._cols} FROM {t} ORDER BY {s}"
        self._update_quota = f"UPDATE {t} SET {q} = %s, {p} = COALESCE(%s, {p}) WHERE {s} = %s"
        self._insert_quota = (
            f"INSERT INTO {t} ({s}, {q}, {u}, {e}, {p}) VALUES (%s, %s, 0, %s, %s)"
            f" ON DUPLICATE KEY UPDATE {q} = VALUES({q}), {p} = COALESCE(%s, {p})"
        )
        self._reset = f"UPDATE {t} SET {u} = 0, {upd} = NOW() WHERE {s} = %s"
        self._delete = f"DELETE FROM {t} WHERE {s} = %s"
        # Compared as bytes, whatever the column's collation (under utf8_general_ci a
        # key equals its lower case). LOWER() and Python's str.lower() differ on a few
        # non-ASCII letters: any non-ASCII key is fetched too, and Python, the daemon's
        # own lower-casing, decides.
        self._mixed_case = (
            f"SELECT {self._cols} FROM {t} WHERE CAST({s} AS BINARY) <>"
            f" CAST(LOWER({s}) AS BINARY) OR OCTET_LENGTH({s}) <> CHAR_LENGTH({s})"
            f" ORDER BY {s}"
        )
        self._rename = f"UPDATE {t} SET {s} = %s, {upd} = NOW() WHERE {s} = %s"
        # An increment, like the daemon's upsert: a count the daemon adds meanwhile is
        # kept. The target's own count restarts when its window has ended. Expiry is
        # assigned last: MySQL's SET sees the values assigned before it.
        self._merge_used = (
            f"UPDATE {t} SET {u} = IF(COALESCE({e}, 0) <= %s, %s, {u} + %s),"
            f" {upd} = NOW(), {e} = GREATEST(COALESCE({e}, 0), %s) WHERE {s} = %s"
        )
        self._merge_quota = f"UPDATE {t} SET {q} = %s, {p} = 1 WHERE {s} = %s"
        fl = _q(flushlog_name(n))
        self._flushlog_upsert = (
            f"INSERT INTO {fl} (`daemon`, `seq`) VALUES (%s, %s)"
            " ON DUPLICATE KEY UPDATE `seq` = VALUES(`seq`)"
        )
        self._flushlog_select = f"SELECT `seq` FROM {fl} WHERE `daemon` = %s"
        self._flushlog_lock = self._flushlog_select + " FOR UPDATE"
        self._flushlog_delete = f"DELETE FROM {fl} WHERE `daemon` = %s"
        self._flushlog_delete_in = f"DELETE FROM {fl} WHERE `daemon` IN "

    # -- schema ---------------------------------------------------------------------

    def init_schema(self) -> None:
        """Create the table and view (needs CREATE and CREATE VIEW, unlike the daemon)."""

        def create(cur: _Cursor) -> None:
            for statement in schema_ddl(self.names):
                cur.execute(statement)

        self._run("create the schema", create)
        self._info = None

    def check_schema(self) -> None:
        """Verify the table, its columns, the UNIQUE key on the sender and the grants."""
        self._run("check the schema", self._check_schema)

    def _check_schema(self, cur: _Cursor) -> None:
        n = self.names
        cur.execute(
            "SELECT COLUMN_NAME FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (n.table,),
        )
        columns = {str(r[0]) for r in cur.fetchall()}
        if not columns:
            raise StorageError(
                f"table {n.table} not found in database {self.where} (or not readable by"
                " this user): run `ratelimit-policyd init-db` or apply"
                " sql/mysql/001_ratelimit.sql",
                transient=False,
            )
        wanted = (n.sender, n.quota, n.used, n.expiry, n.persist, n.updated)
        missing = [c for c in wanted if c not in columns]
        if missing:
            raise StorageError(
                f"table {n.table} in {self.where} lacks column(s) {', '.join(missing)}"
                " (compare with sql/mysql/001_ratelimit.sql and the configured names)",
                transient=False,
            )
        cur.execute(
            "SELECT INDEX_NAME, COLUMN_NAME FROM information_schema.STATISTICS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s AND NON_UNIQUE = 0"
            " ORDER BY INDEX_NAME, SEQ_IN_INDEX",
            (n.table,),
        )
        indexes: dict[str, list[str]] = {}
        for index, column in cur.fetchall():
            indexes.setdefault(str(index), []).append(str(column))
        if [n.sender] not in indexes.values():
            raise StorageError(
                f"column {n.sender} of table {n.table} in {self.where} has no UNIQUE index,"
                " which the atomic upsert needs: ALTER TABLE"
                f" {n.table} ADD UNIQUE INDEX idx_sender ({n.sender})",
                transient=False,
            )
        # The four grants of the Perl daemon, tried with statements that touch no row.
        t, s, u = self._t, self._s, _q(n.used)
        probes = [
            ("SELECT", f"SELECT {self._cols} FROM {t} WHERE 1 = 0"),
            ("INSERT", f"INSERT INTO {t} ({s}) SELECT {s} FROM {t} WHERE 1 = 0"),
            ("UPDATE", f"UPDATE {t} SET {u} = {u} WHERE 1 = 0"),
            ("DELETE", f"DELETE FROM {t} WHERE 1 = 0"),
        ]
        for grant, sql in probes:
            try:
                cur.execute(sql)
            except pymysql.err.Error as exc:
                if _classify(exc) is not _Kind.PERMANENT:
                    raise
                raise StorageError(
                    f"the database user may not {grant} on {n.table} in {self.where}"
                    f" ({_describe(exc)}): GRANT SELECT, INSERT, UPDATE, DELETE ON"
                    f" {self.database}.* TO the daemon's user",
                    transient=False,
                ) from exc

    # -- the daemon's operations -----------------------------------------------------

    def load(self, senders: Sequence[str]) -> dict[str, Row]:
        unique = sorted(set(senders))
        if not unique:
            return {}

        def select(cur: _Cursor) -> dict[str, Row]:
            info = self._table_info(cur)
            return self._select_rows(cur, [s for s in unique if info.refuses(s) is None])

        return self._run("load rows", select)

    def apply(self, deltas: Sequence[Delta], default_quota: int) -> dict[str, Row]:
        """See ``Storage.apply``. All deltas of the call commit in one transaction.

        In sender order (stable: several deltas of one sender keep their order), the
        rows that exist are locked (SELECT ... FOR UPDATE), then updated by multi-row
        ``INSERT ... ON DUPLICATE KEY UPDATE`` statements, each sender at most once per
        statement (a sender's second delta goes in the next statement). Existing rows
        are addressed by their AUTO_INCREMENT id: an upsert by sender alone consumes an
        id every time, even when it updates, and would exhaust the Perl table's INT id
        within weeks on a busy server (and then update the wrong row).

        A key the column cannot hold (too long, a character outside its character set)
        is dropped before any SQL; a statement the table refuses anyway (a count out of
        range) is re-run row by row and only the refused deltas are dropped. Both are
        logged, and their senders left out of the result. Deadlocks and lock wait
        timeouts retry the whole call.
        """
        if not deltas:
            return {}
        ordered = sorted(deltas, key=lambda d: d.sender)
        seq = next(self._flush_seq)

        def resolve() -> dict[str, Row] | None:
            # The COMMIT's answer was lost. With the flush log, the daemon's row there
            # says whether this transaction committed; without it nobody can tell, and
            # the batch is sent again (it may then count twice).
            if not self._logged_flush:
                return None

            def check(cur: _Cursor) -> bool:
                cur.execute(self._flushlog_select, (self._daemon_id,))
                found = cur.fetchall()
                return bool(found) and int(found[0][0]) >= seq

            committed = self._run("check a flush whose COMMIT was not answered", check)
            self._doubtful.discard(seq)
            if not committed:
                return None
            log.warning("the COMMIT of flush %d was not answered, but it committed: "
                        "not written again", seq)
            return self.load(sorted({d.sender for d in ordered}))

        mark = FlushId(self._daemon_id, seq)
        try:
            return self._run(
                "apply counts",
                lambda cur: self._apply(cur, ordered, default_quota, mark),
                write=True,
                attempts=TX_ATTEMPTS,
                on_commit_lost=resolve,
            )
        except StorageError as exc:
            if exc.resolve is not None and self._logged_flush:
                self._doubtful.add(seq)
                exc.flush = mark
            raise

    def apply_once(self, deltas: Sequence[Delta], default_quota: int, flush: FlushId) -> bool:
        """See ``Storage.apply_once``: check and write in one transaction.

        The flush log row of ``flush.source`` is read with FOR UPDATE, so a transaction
        that wrote it and is still finishing on the server (its client gone) is waited
        for rather than overtaken.
        """
        if not deltas:
            return False
        ordered = sorted(deltas, key=lambda d: d.sender)

        def work(cur: _Cursor) -> bool:
            if self._table_info(cur).flushlog:
                cur.execute(self._flushlog_lock, (flush.source,))
                found = cur.fetchall()
                if found and int(found[0][0]) >= flush.seq:
                    return False
            self._apply(cur, ordered, default_quota, flush)
            return True

        # No on_commit_lost: an unanswered COMMIT leaves the flush log to tell, and the
        # caller simply calls again.
        return self._run("write spooled counts", work, write=True, attempts=TX_ATTEMPTS)

    def forget_flushes(self, sources: Sequence[str]) -> None:
        if not sources:
            return

        def delete(cur: _Cursor) -> None:
            if self._table_info(cur).flushlog:
                cur.execute(self._flushlog_delete_in + "(" + _marks(len(sources)) + ")",
                            list(sources))

        self._run("forget flush log rows", delete, write=True)

    def _apply(self, cur: _Cursor, ordered: list[Delta], default_quota: int,
               mark: FlushId) -> dict[str, Row]:
        info = self._table_info(cur)
        self._logged_flush = info.flushlog
        if info.flushlog:
            # In the same transaction as the counts: this row says whether they committed.
            cur.execute(self._flushlog_upsert, mark)
        dropped: set[str] = set()
        for delta in ordered:
            reason = info.refuses(delta.sender)
            if reason is not None:
                _log_dropped(delta, reason)
                dropped.add(delta.sender)
        ordered = [d for d in ordered if d.sender not in dropped]
        senders = sorted({d.sender for d in ordered})
        ids: dict[str, int] = {}
        if info.autoinc is not None:
            # Lock the existing rows, in sender order, and learn their ids.
            lock = f"SELECT {_q(info.autoinc)}, {self._s} FROM {self._t} WHERE {self._s} IN "
            match = _Matcher(senders)
            for key, sender in self._select_in(cur, lock, senders, " FOR UPDATE"):
                requested = match(str(sender))
                if requested is not None:
                    ids[requested] = int(key)
        for wave in _waves(ordered):
            known = [d for d in wave if d.sender in ids]
            new = [d for d in wave if d.sender not in ids]
            for start in range(0, len(known), CHUNK):
                part = known[start : start + CHUNK]
                self._upsert(cur, part, default_quota, info.autoinc, ids, dropped)
            for start in range(0, len(new), CHUNK):
                self._upsert(cur, new[start : start + CHUNK], default_quota, None, ids, dropped)
        return self._select_rows(cur, [s for s in senders if s not in dropped])

    def _upsert(
        self,
        cur: _Cursor,
        deltas: Sequence[Delta],
        default_quota: int,
        autoinc: str | None,
        ids: dict[str, int],
        dropped: set[str],
    ) -> None:
        """One multi-row upsert; on a data error, the same deltas one by one.

        With ``autoinc``, the rows exist and are addressed by their id (``ids``).
        """
        try:
            cur.execute(*self._upsert_sql(deltas, default_quota, autoinc, ids))
            return
        except pymysql.err.Error as exc:
            if _classify(exc) is not _Kind.DATA:
                raise
            if len(deltas) == 1:
                _log_dropped(deltas[0], _describe(exc))
                dropped.add(deltas[0].sender)
                return
        # InnoDB undid only the failed statement; the transaction goes on.
        for delta in deltas:
            try:
                cur.execute(*self._upsert_sql([delta], default_quota, autoinc, ids))
            except pymysql.err.Error as exc:
                if _classify(exc) is not _Kind.DATA:
                    raise
                _log_dropped(delta, _describe(exc))
                dropped.add(delta.sender)

    def _upsert_sql(
        self,
        deltas: Sequence[Delta],
        default_quota: int,
        autoinc: str | None,
        ids: dict[str, int],
    ) -> tuple[str, list[object]]:
        # The VALUES list is built here rather than left to executemany(), whose
        # rewriting into one statement depends on matching the SQL with a regex.
        args: list[object] = []
        if autoinc is None:
            head = self._upsert_head
            for d in deltas:
                args += (d.sender, default_quota, d.n, d.expiry)
            width = 4
        else:
            head = self._upsert_head.replace(
                f"INSERT INTO {self._t} (", f"INSERT INTO {self._t} ({_q(autoinc)}, ", 1
            )
            for d in deltas:
                args += (ids[d.sender], d.sender, default_quota, d.n, d.expiry)
            width = 5
        values = ", ".join(["(" + _marks(width) + ")"] * len(deltas))
        return head + values + self._upsert_tail, args

    def _table_info(self, cur: _Cursor) -> _TableInfo:
        """The table's AUTO_INCREMENT column and what its sender column can hold."""
        if self._info is not None:
            return self._info
        cur.execute(
            "SELECT COLUMN_NAME, EXTRA, CHARACTER_MAXIMUM_LENGTH, CHARACTER_SET_NAME"
            " FROM information_schema.COLUMNS"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (self.names.table,),
        )
        found = cur.fetchall()
        autoinc = max_length = charset = None
        for name, extra, length, character_set in found:
            if "auto_increment" in str(extra).lower():
                autoinc = str(name)
            if str(name).lower() == self.names.sender.lower():
                max_length = None if length is None else int(length)
                charset = None if character_set is None else str(character_set)
        cur.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES"
            " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = %s",
            (flushlog_name(self.names),),
        )
        flushlog = bool(cur.fetchall()[0][0])
        info = _TableInfo(autoinc, max_length, charset, flushlog)
        if found:  # no table yet: look again next time (init-db may be running)
            self._info = info
        return info

    # -- admin operations ------------------------------------------------------------

    def iter_rows(self) -> list[Row]:
        def select(cur: _Cursor) -> list[Row]:
            cur.execute(self._select_all)
            return [_row(r) for r in cur.fetchall()]

        return self._run("list rows", select)

    def set_quota(self, sender: str, quota: int, persist: bool | None, expiry: int) -> Row:
        flag = None if persist is None else int(persist)

        def update(cur: _Cursor) -> Row:
            # UPDATE first: an upsert would consume an AUTO_INCREMENT id every time.
            if cur.execute(self._update_quota, (quota, flag, sender)) == 0:
                cur.execute(self._insert_quota, (sender, quota, expiry, flag or 0, flag))
            return self._select_rows(cur, [sender])[sender]

        return self._run(f"set the quota of {sender!r}", update, write=True)

    def reset(self, sender: str) -> Row | None:
        def update(cur: _Cursor) -> Row | None:
            if cur.execute(self._reset, (sender,)) == 0:
                return None
            return self._select_rows(cur, [sender]).get(sender)

        return self._run(f"reset {sender!r}", update, write=True)

    def delete(self, sender: str) -> bool:
        return self._run(
            f"delete {sender!r}", lambda cur: cur.execute(self._delete, (sender,)) > 0, write=True
        )

    def mixed_case_rows(self) -> list[Row]:
        def select(cur: _Cursor) -> list[Row]:
            cur.execute(self._mixed_case)
            return [r for r in map(_row, cur.fetchall()) if needs_lowering(r.sender)]

        return self._run("look for keys that are not lower case", select)

    def merge_keys(self, target: str, sources: Sequence[str], now: int, *,
                   apply: bool) -> KeyMerge | None:
        def merge(cur: _Cursor) -> KeyMerge | None:
            # FOR UPDATE: a daemon's flush of the target waits until the merge commits.
            plan = self._plan_merge(cur, target, sources, now, " FOR UPDATE" if apply else "")
            if plan is None or not apply:
                return plan
            if plan.renamed is not None:
                # On a case-insensitive table the source row IS the target's row (the
                # UNIQUE index allows no second spelling): this rename is the whole merge.
                cur.execute(self._rename, (target, plan.renamed))
            live = [r for r in plan.merged if plan.live(r)]
            if live:
                cur.execute(self._merge_used, (now, plan.added, plan.added,
                                               max(r.expiry for r in live), target))
            if plan.set_quota:
                cur.execute(self._merge_quota, (plan.quota, target))
            for r in plan.merged:
                # Several spellings of a key exist side by side only on a case-sensitive
                # table, where this WHERE matches exactly the one given.
                cur.execute(self._delete, (r.sender,))
            return plan.with_after(self._exact_rows(cur, [target], "").get(target))

        return self._run(f"merge keys into {target!r}", merge, write=apply,
                         attempts=TX_ATTEMPTS if apply else 1)

    def _plan_merge(self, cur: _Cursor, target: str, sources: Sequence[str], now: int,
                    tail: str) -> KeyMerge | None:
        rows = self._exact_rows(cur, sorted({target, *sources}), tail)
        present = [rows[s] for s in sorted(set(sources)) if s in rows and s != target]
        if not present:
            return None
        return plan_merge(target, rows.get(target), present, now)

    def _exact_rows(self, cur: _Cursor, senders: Sequence[str], tail: str) -> dict[str, Row]:
        """Rows stored under exactly these senders (a case-insensitive collation also
        returns other spellings, which are left out here)."""
        found = self._select_in(cur, self._select, senders, tail)
        wanted = set(senders)
        return {r.sender: r for r in map(_row, found) if r.sender in wanted}

    def close(self) -> None:
        if self._doubtful and not self._closed:
            log.info("flush log row %s kept: it tells the next start whether the spooled "
                     "flush %d committed", self._daemon_id, max(self._doubtful))
        elif self._logged_flush and not self._closed:
            try:  # this process's row in the flush log is of no use once it stops
                self._run("forget the flush log row",
                          lambda cur: cur.execute(self._flushlog_delete, (self._daemon_id,)),
                          write=True)
            except StorageError:
                log.debug("could not delete the flush log row", exc_info=True)
        self._closed = True
        self._pool.close()

    # -- helpers ---------------------------------------------------------------------

    def _select_rows(self, cur: _Cursor, senders: Sequence[str]) -> dict[str, Row]:
        found = self._select_in(cur, self._select, senders)
        match = _Matcher(senders)
        rows: dict[str, Row] = {}
        for r in map(_row, found):
            key = match(r.sender)
            if key is not None:
                rows[key] = r if key == r.sender else r._replace(sender=key)
        return rows

    def _select_in(
        self, cur: _Cursor, head: str, senders: Sequence[str], tail: str = ""
    ) -> list[tuple[Any, ...]]:
        """``head (%s, ...) tail`` for the senders, CHUNK of them per statement."""
        found: list[tuple[Any, ...]] = []
        for start in range(0, len(senders), CHUNK):
            chunk = senders[start : start + CHUNK]
            try:
                cur.execute(head + "(" + _marks(len(chunk)) + ")" + tail, chunk)
                found += cur.fetchall()
                continue
            except pymysql.err.Error as exc:
                if _classify(exc) is not _Kind.DATA:
                    raise
            # One key the column's character set cannot represent fails the whole IN
            # list. Such a key has no row: look the others up one by one.
            for sender in chunk:
                try:
                    cur.execute(head + "(%s)" + tail, (sender,))
                    found += cur.fetchall()
                except pymysql.err.Error as exc:
                    if _classify(exc) is not _Kind.DATA:
                        raise
                    log.warning("cannot look up key %.300r: %s", sender, _describe(exc))
        return found

    def _ping(self, con: pymysql.connections.Connection[Any]) -> bool:
        """DBUtils' check of a connection taken from the pool.

        DBUtils calls this while holding the pool's lock, so a round trip here
        serialises every cache miss behind one another (with a database 20 ms away,
        misses were answered at 45/s). A connection checked within PING_AFTER seconds
        is trusted without a round trip; if it died meanwhile, the call fails on its
        first statement and a read is retried once on a fresh connection (``_run``).
        """
        if self._breaker.holds_back():
            # Skip the round trip: _run fails fast before using the connection.
            return True
        now = time.monotonic()
        # ``open`` turns False when PyMySQL saw the connection fail: ping (and let
        # DBUtils reconnect) then, whatever the time.
        if con.open and now - getattr(con, "_rl_checked", 0.0) < PING_AFTER:
            return True
        con.ping(reconnect=False)
        con._rl_checked = now  # type: ignore[attr-defined]
        return True

    def _run(
        self,
        action: str,
        work: Callable[[_Cursor], T],
        *,
        write: bool = False,
        attempts: int = 1,
        on_commit_lost: Callable[[], dict[str, Row] | None] | None = None,
    ) -> T:
        """Run ``work`` in one transaction on a pooled connection; map every error.

        ``on_commit_lost``: the connection broke while the server answered the COMMIT,
        so the outcome is unknown; the StorageError raised then carries this function
        as ``resolve`` (see ``StorageError``).

        Commits on success (reads too: it ends the snapshot and releases metadata
        locks), rolls back on failure, and retries up to ``attempts`` times when InnoDB
        chose this transaction as a deadlock victim or a lock wait timed out.
        """
        if self._closed:
            raise StorageError(f"cannot {action}: storage is closed", transient=False)
        retried_connection = False
        # Reads get one spare try, for a pooled connection that died unnoticed.
        tries = attempts if write else attempts + 1
        for attempt in range(1, tries + 1):
            self._breaker.enter()
            con: Any = None
            reachable: bool | None = None  # None: this call did not find out
            reason = ""
            committing = False
            try:
                con = self._pool.connection()
                if self._breaker.holds_back():
                    raise _FailFast
                if write:
                    con.begin()
                cur = con.cursor()
                try:
                    result = work(cur)
                finally:
                    cur.close()
                committing = True
                con.commit()
                reachable = True
                return result
            except _FailFast:
                raise StorageError(
                    f"cannot {action}: database {self.where} unreachable", transient=True
                ) from None
            except StorageError:
                reachable = True  # raised by work() from what the server said
                _end(con, rollback=True)
                raise
            except _DRIVER_ERRORS as exc:
                kind = _classify(exc)
                reachable = kind is not _Kind.CONNECTION
                reason = _describe(exc)
                # A lost connection is not rolled back (nothing to talk to; the server
                # undoes the transaction itself), only marked finished for the pool.
                _end(con, rollback=reachable)
                if (kind is _Kind.CONNECTION and not write and not retried_connection
                        and attempt < tries and not _timed_out(exc)):
                    # A pooled connection that died since its last check (server
                    # restarted): one more try on a fresh one before calling it down.
                    # Not after a timeout: a server that did not answer one connection
                    # will not answer the next, and a miss would wait twice as long.
                    retried_connection = True
                    reachable = None
                    continue
                if committing and kind is _Kind.CONNECTION and on_commit_lost is not None:
                    raise StorageError(
                        f"cannot {action} in {self.where}: {_describe(exc)} while the"
                        " COMMIT was answered: outcome unknown",
                        transient=True, resolve=on_commit_lost,
                    ) from exc
                if kind is _Kind.RETRY and attempt < attempts:
                    log.info("%s: %s; retrying (%d/%d)", action, _describe(exc), attempt, attempts)
                    # Random jitter, so that two daemons do not collide again in step.
                    time.sleep(random.uniform(0.01, 0.05) * attempt)
                    continue
                raise StorageError(
                    f"cannot {action} in {self.where}: {_describe(exc)}",
                    transient=kind not in (_Kind.PERMANENT, _Kind.DATA),
                ) from exc
            finally:
                self._breaker.leave(reachable, f"{self.where}: {reason}")
                if con is not None:
                    try:
                        con.close()  # back to the pool
                    except _DRIVER_ERRORS:
                        log.debug("returning a connection to the pool failed", exc_info=True)
        raise AssertionError("unreachable")  # pragma: no cover -- the loop returns or raises


class _Matcher:
    """Which requested key a row the database returned belongs to.

    With a case- or accent-insensitive collation (the Perl table's older schema uses
    utf8_general_ci), ``WHERE sender IN ('alice@example.com')`` also finds a row the
    Perl daemon stored as ``Alice@Example.com``. The row must count for the key that
    was asked for, or the daemon would take it for missing and insert it again.
    """

    def __init__(self, requested: Sequence[str]) -> None:
        self._exact = set(requested)
        self._folded: dict[str, str] | None = None
        self._requested = requested

    def __call__(self, sender: str) -> str | None:
        if sender in self._exact:
            return sender
        if self._folded is None:
            self._folded = {_fold(k): k for k in self._requested}
        return self._folded.get(_fold(sender))


def _fold(text: str) -> str:
    """Case and accents removed, trailing spaces ignored: how general_ci compares."""
    decomposed = unicodedata.normalize("NFKD", text.rstrip(" "))
    return "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()


def _timed_out(exc: BaseException) -> bool:
    """Whether the driver error comes from a socket timeout (the server did not answer),
    rather than a connection refused or reset. PyMySQL raises its error while handling
    the socket's, so the timeout is on the ``__context__`` chain."""
    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, TimeoutError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _end(con: Any, *, rollback: bool) -> None:
    """Finish the connection's transaction before it goes back to the pool."""
    if con is None:
        return
    try:
        if rollback:
            con.rollback()
        else:
            # DBUtils' cancel() only forgets the transaction, without a round trip.
            con.cancel()
    except _DRIVER_ERRORS:
        log.debug("ending a failed transaction failed", exc_info=True)


def _waves(ordered: Sequence[Delta]) -> list[list[Delta]]:
    """Split sorted deltas so that each sender appears at most once per wave.

    Wave k holds the k-th delta of every sender that has one; waves run in order,
    so a sender's old-window delta is applied before its new-window one. (MariaDB
    also applies the rows of one multi-row upsert in order, but the result then rests
    on each server's handling of a key repeated within a statement; the split costs
    a statement only when a key has deltas of two windows, around a boundary.)
    """
    waves: list[list[Delta]] = []
    seen: dict[str, int] = {}
    for delta in ordered:
        k = seen.get(delta.sender, 0)
        seen[delta.sender] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append(delta)
    return waves


def _row(r: Sequence[Any]) -> Row:
    sender, quota, used, expiry, persist = r
    return Row(
        sender=str(sender),
        quota=None if quota is None else int(quota),  # NULL: unlimited
        used=int(used or 0),  # NULL (a nullable Perl column) reads as 0
        expiry=int(expiry or 0),  # NULL (rows of the Perl daemon) reads as 0: expired
        persist=bool(persist),
    )


def _log_dropped(delta: Delta, reason: str) -> None:
    log.error(
        "dropped %d recipient(s) for key %.300r (expiry %d): the database refuses it: %s",
        delta.n,
        delta.sender,
        delta.expiry,
        reason,
    )
