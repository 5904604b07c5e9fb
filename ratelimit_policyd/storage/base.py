"""The storage contract every backend implements.

Backends own their SQL text and paramstyle; callers see only ``model`` values. Every
method may be called from any thread: a backend guards its own connections (a pool or
a lock of its own), never the quota cache's lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ratelimit_policyd.model import Delta, FlushId, Row
from ratelimit_policyd.storage.keymerge import KeyMerge


class StorageError(Exception):
    """Any failure of the database: unreachable, timed out, refused a statement.

    ``transient`` is True when retrying later may succeed (connection lost, lock wait
    timeout, deadlock, server gone); False for an error that the same input will hit
    again (data too long, missing table or column, access denied).
    """

    def __init__(self, message: str, *, transient: bool = True,
                 resolve: Callable[[], dict[str, Row] | None] | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        #: Set when a write's outcome is unknown (the connection broke while the server
        #: answered its COMMIT): call it later to learn the truth. It returns the rows
        #: written if the write committed, None if it did not (send it again), and
        #: raises StorageError while that cannot be known yet.
        self.resolve = resolve
        #: With ``resolve``, when the write was recorded in the flush log: its entry
        #: there. A daemon that must stop before it could resolve the write spools the
        #: counts with it, and the next start asks ``apply_once`` to write them only if
        #: they did not commit.
        self.flush: FlushId | None = None


@dataclass(frozen=True, slots=True)
class TableNames:
    """Table and column names, configurable as in the Perl daemon's config section.

    Names are validated by ``config`` (``[A-Za-z_][A-Za-z0-9_]*``) before they reach a
    backend, which then quotes them; values always travel as query parameters.
    """

    table: str = "ratelimit"
    sender: str = "sender"
    quota: str = "quota"
    used: str = "used"
    expiry: str = "expiry"
    persist: str = "persist"
    updated: str = "updated"


class Storage(Protocol):
    """What the daemon and the admin commands need from a database."""

    def init_schema(self) -> None:
        """Create the table and its view ``view_<table>`` if absent (idempotent).

        On MySQL this needs CREATE and CREATE VIEW, which the daemon's own grants
        (SELECT, INSERT, UPDATE, DELETE) lack: it is for ``init-db``.
        """

    def check_schema(self) -> None:
        """Raise StorageError(transient=False) naming what is missing or wrong."""

    def load(self, senders: Sequence[str]) -> dict[str, Row]:
        """Rows for these senders; absent senders are absent from the result.

        A key the table cannot hold (too long, unrepresentable) is simply absent.
        """

    def apply(self, deltas: Sequence[Delta], default_quota: int) -> dict[str, Row]:
        """Apply the deltas atomically (see ``model.Delta``); return the rows after.

        All deltas of one call commit in one transaction (the SQL is chunked, the
        transaction is not): when StorageError is raised, none of them was applied,
        so the caller keeps them and sends the same deltas again later; a caller that
        wants smaller transactions calls apply() once per slice. Rows are locked in
        sorted sender order so that several daemons on one database do not deadlock
        each other (a deadlock or lock wait timeout that happens anyway is retried
        inside). Several deltas of one sender are applied in the order given.

        A delta that fails on its own (data error: a key longer than the column, a
        character the column cannot hold, a count out of range) is dropped with a
        logged error, and its sender left out of the result, so that one bad key cannot
        block the others forever.
        """

    def apply_once(self, deltas: Sequence[Delta], default_quota: int, flush: FlushId) -> bool:
        """Apply the deltas as ``apply`` does, unless ``flush`` is in the flush log.

        In one transaction: when the flush log holds ``flush.source`` with a sequence of
        ``flush.seq`` or more, the deltas are in the database already and nothing is
        written (False); otherwise they are applied and ``flush`` is recorded with them
        (True). Calling it again after a crash, or after a COMMIT whose answer was
        lost, therefore never counts twice. Without a flush log table (a MySQL schema
        without sql/mysql/002_flushlog.sql) the deltas are applied every time.
        """

    def forget_flushes(self, sources: Sequence[str]) -> None:
        """Delete these sources' rows from the flush log (once nothing refers to them)."""

    def iter_rows(self) -> Iterable[Row]:
        """Every row, for the admin ``list`` command."""

    def set_quota(self, sender: str, quota: int, persist: bool | None, expiry: int) -> Row:
        """Set a key's quota (insert with ``used = 0`` and ``expiry`` if absent)."""

    def reset(self, sender: str) -> Row | None:
        """Set ``used = 0``; None when the key has no row."""

    def delete(self, sender: str) -> bool:
        """Remove a key's row; False when it had none."""

    def mixed_case_rows(self) -> list[Row]:
        """Rows whose sender is not lower case (``sender != sender.lower()``), by sender.

        The daemon lower-cases keys (``limits.lowercase_keys``): on a case-sensitive
        table it never reads these rows (see ``migrate-keys``).
        """

    def merge_keys(self, target: str, sources: Sequence[str], now: int, *,
                   apply: bool) -> KeyMerge | None:
        """Merge the rows of ``sources`` into the lower-case key ``target``.

        In one transaction: the rows are locked and read, ``keymerge.plan_merge`` decides,
        then (with ``apply``) counts are added to the target as increments (``used = used
        + n``, so that a daemon counting the same key meanwhile loses nothing), the
        quota is set, and the sources are deleted (or, with no target row, one is renamed
        to it). Without ``apply`` nothing is written: the plan is returned as a dry run.
        None when none of the sources has a row (any more).
        """

    def close(self) -> None:
        """Release connections."""
