"""QuotaCache: the daemon's only shared mutable state, behind one lock.

Request threads charge counts here; the flusher drains them to the database and feeds
back the rows it reads. The lock guards dictionary work only: every database call
happens outside it (a miss is loaded by the caller, then installed), so a slow or dead
database never stalls requests for cached keys. Imports only the stdlib, ``model`` and
``window``.

Critical sections are short, straight-line dictionary work: no I/O, no loop, objects
(Charge, Delta, Entry) built outside them; the flusher's bulk operations take the lock
once per key. A thread can still lose the GIL inside one (CPython may switch threads
after any call), so threads that find the lock taken yield the GIL to its holder
instead of sleeping on it (``_take``): a sleeping waiter is handed the lock and then
holds it while it waits for the GIL, every other thread queues behind it, and under
load that convoy sustains itself (it cut throughput by half at 200 connections).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Final, NamedTuple

from ratelimit_policyd.model import Delta, Row
from ratelimit_policyd.window import Calendar

UPDATE: Final = "UPDATE"
INSERT: Final = "INSERT"
OVER_QUOTA: Final = "OVER_QUOTA"

#: Postfix re-sends a request whose reply it did not get (``smtpd_policy_service_timeout``,
#: 100 s by default, then ``retry_delay``): a repeat within this many seconds is a retry.
RETRY_WINDOW: Final = 300.0
#: Requests remembered for retry detection (about 0.7 KB each with their strings).
#: Postfix retries after a lost reply within seconds (retry_delay), so at most this many
#: and at most RETRY_WINDOW seconds' worth are kept.
MAX_RECENT: Final = 20_000
#: Yields before a contended acquire blocks (see ``QuotaCache._take``).
SPINS: Final = 1000
#: Least recently used entries looked at when a new key needs room (see ``_add``).
EVICT_TRIES: Final = 8


class Entry:
    """One cached key. ``used`` as seen by requests is ``base + inflight + pending``.

    * ``base``: ``used`` of the row as last read from the database (all daemons' counts);
    * ``inflight``: counts handed to the flusher and not yet confirmed written;
    * ``pending``: counts made since the last drain;
    * ``gen``: bumped when the window rolls over locally, so that a flush of the old
      window that completes later is not mistaken for the new one.
    """

    __slots__ = ("base", "expiry", "gen", "inflight", "known", "loaded", "pending", "persist",
                 "quota", "seen")

    def __init__(self, quota: int | None, persist: bool, expiry: int, base: int, known: bool,
                 loaded: bool, now: float) -> None:
        self.quota = quota
        self.persist = persist
        self.expiry = expiry
        self.base = base
        self.inflight = 0
        self.pending = 0
        self.gen = 0
        self.known = known  # a row exists (or will: a count for it is pending)
        self.loaded = loaded  # the row was read from the database, not assumed
        self.seen = now


class Charge(NamedTuple):
    """The outcome of charging ``n`` to a key; ``used`` includes ``n``."""

    used: int
    quota: int | None  # None: unlimited (a NULL quota)
    over: bool
    status: str  # UPDATE | INSERT | OVER_QUOTA (the Perl daemon's log statuses)
    loaded: bool  # False: the database could not be read; quota is the default


class Batch(NamedTuple):
    """What one flush writes. ``gens[i]`` is -1 for a delta of an already rolled window."""

    deltas: list[Delta]
    gens: list[int]


@dataclass(frozen=True, slots=True)
class CacheRow:
    """A read-only view of an entry, for status output."""

    key: str
    quota: int | None
    used: int
    expiry: int
    persist: bool
    pending: int
    loaded: bool


class QuotaCache:
    """Thread-safe quota cache; the lock never leaves this class."""

    def __init__(self, calendar: Calendar, default_quota: int, *, max_entries: int = 200_000,
                 idle_ttl: float = 300.0) -> None:
        self._lock = threading.Lock()
        # Ordered by last use (least recent first) so eviction pops from the front.
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._dirty: set[str] = set()
        # (sender, n, expiry) of windows that rolled over before they were flushed.
        self._rolled: list[tuple[str, int, int]] = []
        # Recent request tokens -> (time, answer), in insertion order.
        self._recent: OrderedDict[object, tuple[float, tuple[int, int | None, bool, bool]]] = (
            OrderedDict())
        self._calendar = calendar
        self._default_quota = default_quota
        self.max_entries = max_entries
        self.idle_ttl = idle_ttl
        #: Entries evicted to make room for new keys (status output).
        self.evictions = 0

    def _take(self) -> None:
        """Acquire the lock, yielding the GIL rather than sleeping while it is taken.

        With a blocking acquire, a waiter is woken owning the lock but not the GIL, and
        every thread that reaches the cache meanwhile queues behind it. Trying again
        after ``time.sleep(0)`` lets the holder (which needs the GIL to finish its few
        statements) run first. A blocking acquire remains as the last resort.
        """
        lock = self._lock
        if lock.acquire(False):
            return
        for _ in range(SPINS):
            time.sleep(0)  # releases the GIL: let the holder run
            if lock.acquire(False):
                return
        lock.acquire()

    # -- request path ---------------------------------------------------------------

    def charge(self, key: str, n: int, now: float, token: object = None,
               fill: Entry | None = None) -> Charge | None:
        """Count ``n`` for ``key`` and say whether it went over; None on a miss.

        ``token`` identifies the request (Postfix's instance, state and recipient): a
        request seen again within ``RETRY_WINDOW`` seconds is a retry of one whose reply
        was lost, and gets the same answer without being counted twice.

        ``fill``: the entry to cache when the key is absent (see ``charge_loaded``), so
        that a miss is installed and counted in one lock hold: with a hard cap, an entry
        installed first and charged later could be evicted in between.
        """
        # Computed before the lock (cached by Calendar): the start of the next window,
        # in case this key's window is over.
        next_expiry = self._calendar.next_boundary(now)
        if not self._lock.acquire(False):  # the common case inline; see _take
            self._take()
        try:
            e = self._entries.get(key)
            if e is None and fill is None:
                return None
            recent = self._recent
            seen = recent.get(token) if token is not None else None
            if seen is not None and now - seen[0] < RETRY_WINDOW:
                result = seen[1]
            else:
                if e is None:
                    e = fill
                    assert e is not None  # for mypy: checked above
                    self._add(key, e)
                else:
                    self._entries.move_to_end(key)
                e.seen = now
                if now >= e.expiry:
                    # The window is over: start a new one locally (the database
                    # follows when this count is flushed). Counts of the old window
                    # are written as a delta of their own.
                    if e.pending:
                        self._rolled.append((key, e.pending, e.expiry))
                        e.pending = 0
                    e.gen += 1
                    e.base = 0
                    e.inflight = 0
                    e.expiry = next_expiry
                    if not e.persist and e.quota is not None:  # NULL stays unlimited
                        e.quota = self._default_quota
                e.pending += n
                self._dirty.add(key)
                result = (e.base + e.inflight + e.pending, e.quota, e.known, e.loaded)
                e.known = True
                if token is not None:
                    recent[token] = (now, result)
                    if len(recent) > MAX_RECENT:
                        # Oldest first. (On a plain dict, next(iter()) after many
                        # deletions from the front scans the holes they leave.)
                        recent.popitem(last=False)
                    elif now - recent[next(iter(recent))][0] >= RETRY_WINDOW:
                        recent.popitem(last=False)  # expired: one out per one in
        finally:
            self._lock.release()
        used, quota, known, loaded = result
        over = quota is not None and used > quota  # None: a NULL quota, unlimited
        return Charge(used, quota, over, OVER_QUOTA if over else UPDATE if known else INSERT,
                      loaded)

    def charge_loaded(self, key: str, row: Row | None, n: int, now: float,
                      token: object = None) -> Charge:
        """``charge`` after a miss: ``row`` as loaded, or None when the key has no row.

        Insert-if-absent: when two threads missed the same key, the first one's entry
        wins and the other's (equally fresh) row is dropped, so no count is lost.
        """
        charged = self.charge(key, n, now, token, self._entry_from_row(row, now))
        assert charged is not None  # a filled charge always counts
        return charged

    def charge_unloaded(self, key: str, n: int, now: float, token: object = None) -> Charge:
        """``charge`` after a miss whose row could not be read (database down).

        The key gets the default quota; counts made meanwhile are flushed when the
        database is back, and the row the flush returns replaces the assumed quota and
        count.
        """
        charged = self.charge(key, n, now, token, self._unloaded_entry(now))
        assert charged is not None  # a filled charge always counts
        return charged

    def install(self, key: str, row: Row | None, now: float) -> None:
        """Cache a key without counting (``row`` as loaded; None: it has no row)."""
        self._insert_if_absent(key, self._entry_from_row(row, now))

    def install_unloaded(self, key: str, now: float) -> None:
        """Cache a key whose row could not be read, without counting."""
        self._insert_if_absent(key, self._unloaded_entry(now))

    def _insert_if_absent(self, key: str, entry: Entry) -> None:
        self._take()
        try:
            if key not in self._entries:
                self._add(key, entry)
        finally:
            self._lock.release()

    def _add(self, key: str, entry: Entry) -> None:
        """Insert a new key (lock held), first evicting to stay within ``max_entries``.

        The victim is the least recently used entry without unwritten (pending or in
        flight) counts; one holding some is never evicted, as its counts would vanish
        from the key's view. Every charge moves its key to the end, and an entry holds
        unwritten counts only from its last charge until the flush that writes them,
        so such entries gather at the recent end: when the first EVICT_TRIES entries
        all hold some, (nearly) every entry does, and the new key is cached anyway.
        The cache then holds more than ``max_entries`` keys only while more keys than
        that hold unwritten counts (a database that cannot be written, or more new
        keys per flush interval than the cap), and the flusher's ``evict`` trims it
        once they are written. Bounded work per insert: never a scan.
        """
        entries = self._entries
        if len(entries) >= self.max_entries:
            dirty = self._dirty
            # From the least recently used end: O(1) per step on an OrderedDict (a
            # linked list), where a plain dict would first skip its deleted slots.
            for old, e in islice(entries.items(), EVICT_TRIES):
                if not (e.pending or e.inflight or old in dirty):
                    del entries[old]
                    self.evictions += 1
                    break
        entries[key] = entry

    # -- flusher side ---------------------------------------------------------------

    def drain(self) -> Batch:
        """Take every pending count for writing; they stay visible as ``inflight``.

        Each key moves from pending to in-flight under one short lock hold.
        """
        self._take()
        try:
            rolled = self._rolled
            self._rolled = []
            dirty = list(self._dirty)
            self._dirty = set()
        finally:
            self._lock.release()
        entries = self._entries
        taken: list[tuple[str, int, int, int]] = []
        for key in dirty:
            self._take()
            try:
                e = entries.get(key)
                if e is not None and e.pending:
                    taken.append((key, e.pending, e.expiry, e.gen))
                    e.inflight += e.pending
                    e.pending = 0
            finally:
                self._lock.release()
        deltas = [Delta(k, n, x) for k, n, x in rolled]
        gens = [-1] * len(deltas)
        for key, n, expiry, gen in taken:
            deltas.append(Delta(key, n, expiry))
            gens.append(gen)
        return Batch(deltas, gens)

    def restore(self, batch: Batch) -> None:
        """A flush failed: put its counts back so the next flush retries them."""
        entries = self._entries
        for delta, gen in zip(batch.deltas, batch.gens, strict=True):
            key, n, expiry = delta
            self._take()
            try:
                e = entries.get(key)
                if gen < 0 or e is None or e.gen != gen:
                    # Its window has rolled since: keep it as a delta of that window.
                    self._rolled.append((key, n, expiry))
                else:
                    e.inflight -= n
                    e.pending += n
                    self._dirty.add(key)
            finally:
                self._lock.release()

    def confirm(self, batch: Batch, rows: dict[str, Row], now: float) -> None:
        """A flush succeeded: drop its counts from ``inflight``, adopt the rows read back.

        Per key, both happen under one lock hold: a request must never see the counts
        gone from ``inflight`` before they are in ``base``.
        """
        written: dict[str, int] = {}
        gens: dict[str, int] = {}
        for (key, n, _expiry), gen in zip(batch.deltas, batch.gens, strict=True):
            if gen >= 0:  # a key has at most one delta of its current generation
                written[key] = n
                gens[key] = gen
        self._adopt_rows(list(written.keys() | rows.keys()), rows, now, written, gens)

    def refresh_candidates(self, now: float, limit: int) -> list[str]:
        """Recently used keys to re-read, most recent first (at most ``limit``).

        Keys charged since the last flush are refreshed by the flush itself; the others
        are re-read so that an operator's change (or another daemon's counts) is seen.
        Only the key list is copied under the lock (a C-level copy); the scan reads
        entries without it: a stale answer only changes which keys get re-read.
        """
        cutoff = now - self.idle_ttl
        self._take()
        try:
            order = list(self._entries)
            dirty = self._dirty
        finally:
            self._lock.release()
        entries = self._entries
        keys: list[str] = []
        for key in reversed(order):
            e = entries.get(key)
            if e is None:
                continue
            if e.seen < cutoff or len(keys) >= limit:
                break
            if key not in dirty and not e.inflight and not e.pending:
                keys.append(key)
        return keys

    def refresh(self, keys: Iterable[str], rows: dict[str, Row], now: float) -> None:
        """Adopt re-read rows; a key whose row was deleted is forgotten when clean."""
        self._adopt_rows(list(keys), rows, now, {}, {}, forget_missing=True)

    def evict(self, now: float) -> int:
        """Drop least recently used clean entries: idle ones, and any over the cap."""
        cutoff = now - self.idle_ttl
        evicted = 0
        skipped = 0
        entries = self._entries
        while skipped < 1000:
            self._take()
            try:
                if not entries:
                    break
                key, e = next(iter(entries.items()))
                if e.seen >= cutoff and len(entries) <= self.max_entries:
                    break
                if e.pending or e.inflight or key in self._dirty:
                    # Unwritten counts (database down): keep, look further.
                    entries.move_to_end(key)
                    skipped += 1
                else:
                    del entries[key]
                    evicted += 1
            finally:
                self._lock.release()
        return evicted

    def reconfigure(self, calendar: Calendar, default_quota: int) -> None:
        """New period/default quota (reload): applies from each key's next window."""
        self._take()
        try:
            self._calendar = calendar
            self._default_quota = default_quota
        finally:
            self._lock.release()

    # -- introspection (reads without the lock: status output only) -----------------

    def __len__(self) -> int:
        return len(self._entries)

    def pending_total(self) -> int:
        self._take()
        try:
            items = list(self._entries.values())
            rolled = list(self._rolled)
        finally:
            self._lock.release()
        return sum(e.pending + e.inflight for e in items) + sum(r[1] for r in rolled)

    def snapshot(self) -> list[CacheRow]:
        self._take()
        try:
            items = list(self._entries.items())
        finally:
            self._lock.release()
        return [CacheRow(k, e.quota, e.base + e.inflight + e.pending, e.expiry, e.persist,
                         e.pending + e.inflight, e.loaded) for k, e in items]

    def peek(self, key: str) -> CacheRow | None:
        self._take()
        try:
            e = self._entries.get(key)
        finally:
            self._lock.release()
        if e is None:
            return None
        return CacheRow(key, e.quota, e.base + e.inflight + e.pending, e.expiry, e.persist,
                        e.pending + e.inflight, e.loaded)

    # -- internals ------------------------------------------------------------------

    def _unloaded_entry(self, now: float) -> Entry:
        return Entry(self._default_quota, False, self._calendar.next_boundary(now), 0,
                     known=True, loaded=False, now=now)

    def _entry_from_row(self, row: Row | None, now: float) -> Entry:
        if row is None:
            return Entry(self._default_quota, False, self._calendar.next_boundary(now), 0,
                         known=False, loaded=True, now=now)
        if row.expiry <= now:
            # The row's window is over; the database resets it with our first count
            # (a NULL quota stays: the storage keeps it at a reset, see model.Row).
            quota = row.quota if row.persist or row.quota is None else self._default_quota
            return Entry(quota, row.persist, self._calendar.next_boundary(now), 0,
                         known=True, loaded=True, now=now)
        return Entry(row.quota, row.persist, row.expiry, row.used, known=True, loaded=True,
                     now=now)

    def _adopt_rows(self, keys: list[str], rows: dict[str, Row], now: float,
                    written: dict[str, int], gens: dict[str, int],
                    forget_missing: bool = False) -> None:
        """Take the database's view of each key, one lock hold per key.

        ``written[key]`` counts of generation ``gens[key]`` are now in the row: they
        leave ``inflight``. Our view may be a window ahead of the row's.
        """
        entries = self._entries
        for key in keys:
            row = rows.get(key)
            n = written.get(key, 0)
            gen = gens.get(key, -1)
            self._take()
            try:
                e = entries.get(key)
                if e is None:
                    continue
                if n and e.gen == gen:
                    e.inflight -= n
                    if row is None:
                        # Written, yet no row came back: the database refused this key
                        # (e.g. a character its column cannot hold; logged by the
                        # storage). Keep the counts here so its quota still holds
                        # while the key stays cached.
                        e.base += n
                if row is None:
                    if (forget_missing and e.loaded and not e.pending and not e.inflight
                            and key not in self._dirty):
                        # Deleted by an operator: the next request starts it afresh.
                        del entries[key]
                    continue
                _sender, quota, used, expiry, persist = row
                e.persist = persist
                e.known = True
                e.loaded = True
                if expiry < e.expiry:
                    # We rolled over locally and the database has not seen a count of
                    # the new window yet: its ``used`` belongs to the old window. Only a
                    # persistent or NULL (unlimited) quota carries over.
                    if persist or quota is None:
                        e.quota = quota
                else:
                    # Same window, or another daemon (or an operator) moved it forward.
                    e.expiry = expiry
                    e.quota = quota
                    e.base = used
            finally:
                self._lock.release()
