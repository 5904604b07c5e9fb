"""The flusher thread: writes pending counts through to the database.

Each round: drain the cache, apply the deltas as atomic increments (one transaction per
chunk), feed the rows read back into the cache, re-read recently used clean keys (so an
operator's quota change or another daemon's counts are seen), evict idle entries. A
failed write puts the counts back into the cache; nothing is dropped. Counts spooled at
the last stop are written first, each section exactly once (``Storage.apply_once``), and
their file removed only then; at a stop with the database unreachable, ``unwritten()``
hands back everything not known to be written, for the spool.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ratelimit_policyd import spool
from ratelimit_policyd.cache import Batch, QuotaCache
from ratelimit_policyd.model import Delta, FlushId, Row
from ratelimit_policyd.storage.base import Storage, StorageError

log = logging.getLogger(__name__)

#: Most clean keys re-read per round; bounds the flusher's database load when many
#: keys are cached. Keys charged in the round are refreshed by the write itself.
REFRESH_LIMIT = 20_000


@dataclass(slots=True)
class FlushStats:
    rounds: int = 0
    last_time: float = 0.0
    last_ok: bool = True
    last_error: str = ""
    last_written: int = 0
    last_seconds: float = 0.0
    failures: int = 0


class _Alarm:
    """The flusher's stop flag and sleep, as ``threading.Event`` (``set``, ``is_set``,
    ``wait``) plus ``ring()``, which cuts a sleep short without stopping: an Event's
    wait cannot be woken without setting it, and a reloaded interval must apply at once."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._set = False

    def set(self) -> None:
        with self._cond:
            self._set = True
            self._cond.notify_all()

    def is_set(self) -> bool:
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        with self._cond:
            if not self._set:
                self._cond.wait(timeout)
            return self._set

    def ring(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def sleep_until(self, due: Callable[[], float]) -> bool:
        """Sleep until the monotonic time ``due()`` (re-read after each ring); True when
        stopped instead."""
        with self._cond:
            while not self._set:
                remaining = due() - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True


class Flusher(threading.Thread):
    """``flush_once()`` every ``interval`` seconds; ``close()`` does the final flush.

    ``set_interval()`` (a reload) applies at once: the next round is due one new interval
    after the end of the last one, immediately if that is already past.
    """

    def __init__(self, cache: QuotaCache, storage: Storage, interval: float,
                 default_quota: Callable[[], int], on_db_ok: Callable[[], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(name="flusher", daemon=True)
        self.cache = cache
        self.storage = storage
        self._interval = interval
        self._last_end = time.monotonic()  # when the last round of run() ended
        self._default_quota = default_quota
        self._on_db_ok = on_db_ok or (lambda: None)
        self._clock = clock
        self._stop_event = _Alarm()
        # flush_once runs in this thread and, for the final flush, in the stopping one.
        self._flush_lock = threading.Lock()
        self.stats = FlushStats()
        # A batch whose COMMIT was not answered, how to learn whether it committed, and
        # its flush log entry (None without a flush log: nobody can tell then).
        self._in_doubt: (
            tuple[Batch, Callable[[], dict[str, Row] | None], FlushId | None] | None) = None
        # The spool file of the last stop and its sections, each with whether it is
        # written: the file stays until all are (guarded by _flush_lock).
        self._spool_path: Path | None = None
        self._spooled: list[tuple[spool.Section, bool]] = []

    @property
    def interval(self) -> float:
        return self._interval

    def set_interval(self, seconds: float) -> None:
        """A new flush interval, effective for the current sleep already."""
        # Assigned before the ring: a sleeper that missed the ring reads the new value.
        self._interval = seconds
        self._stop_event.ring()

    def _next_round(self) -> float:
        return self._last_end + self._interval

    def run(self) -> None:
        self._last_end = time.monotonic()
        while not self._stop_event.sleep_until(self._next_round):
            try:
                self.flush_once()
            except Exception:
                log.exception("flusher round failed; counts stay pending")
            self._last_end = time.monotonic()

    def flush_once(self) -> bool:
        """One round; True when every pending count was written."""
        with self._flush_lock:
            return self._flush_once()

    def _flush_once(self) -> bool:
        started = time.monotonic()
        cache = self.cache
        ok = True
        written = 0
        if self._spool_path is not None and not self._write_spooled():
            ok = False
        if self._in_doubt is not None:
            # A write whose COMMIT was not answered: learn its outcome before writing
            # anything else, so that it is neither lost nor written twice. Its counts
            # stay visible (in flight) meanwhile.
            doubtful, resolve, _flush = self._in_doubt
            try:
                resolved = resolve()
            except StorageError as exc:
                self._failed(exc, len(doubtful.deltas))
                return self._finish_round(started, False, 0)
            self._in_doubt = None
            if resolved is None:
                cache.restore(doubtful)
            else:
                cache.confirm(doubtful, resolved, self._clock())
                written += len(doubtful.deltas)
        batch = cache.drain()
        if batch.deltas:
            try:
                rows = self.storage.apply(batch.deltas, self._default_quota())
            except StorageError as exc:
                if exc.resolve is not None:
                    self._in_doubt = (batch, exc.resolve, exc.flush)
                else:
                    cache.restore(batch)
                ok = False
                self._failed(exc, len(batch.deltas))
            else:
                cache.confirm(batch, rows, self._clock())
                written += len(batch.deltas)
        if ok:
            keys = cache.refresh_candidates(self._clock(), REFRESH_LIMIT)
            if keys:
                try:
                    rows = self.storage.load(keys)
                except StorageError as exc:
                    ok = False
                    self._failed(exc, 0)
                else:
                    cache.refresh(keys, rows, self._clock())
        cache.evict(self._clock())
        return self._finish_round(started, ok, written)

    def _finish_round(self, started: float, ok: bool, written: int) -> bool:
        st = self.stats
        st.rounds += 1
        st.last_time = self._clock()
        st.last_seconds = time.monotonic() - started
        st.last_written = written
        if ok:
            if not st.last_ok:
                log.info("database reachable again; pending counts written")
            st.last_ok = True
            st.last_error = ""
            self._on_db_ok()
            if written:
                # A slow round is worth an operator's attention; routine ones are not.
                log.log(logging.INFO if st.last_seconds >= 1.0 else logging.DEBUG,
                        "flushed %d keys in %.3f s", written, st.last_seconds)
        return ok

    def _failed(self, exc: StorageError, n: int, where: str = "in memory") -> None:
        st = self.stats
        st.failures += 1
        if st.last_ok or str(exc) != st.last_error:
            log.error("flush failed (%s); %d keys keep their counts %s and are "
                      "retried every %.1f s", exc, n, where, self.interval)
        st.last_ok = False
        st.last_error = str(exc)

    # -- the spool of the last stop --------------------------------------------------

    def adopt_spool(self, path: Path, sections: list[spool.Section]) -> None:
        """Counts spooled at the last stop (read from ``path``), to write before
        anything else; the file is removed once every section is in the database."""
        with self._flush_lock:
            self._spool_path = path
            self._spooled = [(section, False) for section in sections]

    def write_spooled(self) -> bool:
        """Try to write the spooled counts now; True when none is left to write."""
        with self._flush_lock:
            return self._spool_path is None or self._write_spooled()

    def _write_spooled(self) -> bool:
        path = self._spool_path
        assert path is not None
        for i, (section, done) in enumerate(self._spooled):
            if done:
                continue
            try:
                applied = self.storage.apply_once(section.deltas, self._default_quota(),
                                                  section.flush)
            except StorageError as exc:
                self._failed(exc, len(section.deltas), f"in {path}")
                return False
            self._spooled[i] = (section, True)
            n = sum(d.n for d in section.deltas)
            if applied:
                log.info("spooled counts written: %d counts of %d keys (%s)", n,
                         len(section.deltas), section.flush.source)
            else:
                log.warning("spooled counts already in the database, not written again: "
                            "%d counts of %d keys (%s; written before a crash, or by a "
                            "COMMIT whose answer was lost)", n, len(section.deltas),
                            section.flush.source)
        sources = [section.flush.source for section, _done in self._spooled]
        self._spool_path = None
        self._spooled = []
        try:
            spool.remove(path)
        except OSError as exc:
            # The flush log rows stay, so the next start finds these counts written
            # and tries the removal again; forgetting them now would count them twice.
            log.error("spooled counts written, but %s cannot be removed: %s", path, exc)
            return True
        try:
            self.storage.forget_flushes(sources)
        except StorageError as exc:
            log.warning("could not delete the flush log rows of the written spool (%s); "
                        "they are small and harmless", exc)
        return True

    def unwritten(self) -> list[spool.Section]:
        """Every count not known to be in the database, as spool sections, for a stop
        whose final flush failed; the flusher lets go of them.

        Spooled sections written meanwhile are kept too: their flush log rows stay
        until a file no longer names them, so the next start skips them. A batch whose
        COMMIT went unanswered keeps its flush log entry, so the next start writes it
        only if it did not commit.
        """
        with self._flush_lock:
            sections = [section for section, _done in self._spooled]
            self._spool_path = None
            self._spooled = []
            fresh: list[Delta] = []
            if self._in_doubt is not None:
                batch, _resolve, flush = self._in_doubt
                self._in_doubt = None
                if flush is not None:
                    sections.append(spool.Section(flush, batch.deltas))
                else:
                    # No flush log: nobody can tell, and the next flush would send it
                    # again; so does the next start.
                    fresh += batch.deltas
            fresh += self.cache.drain().deltas
            if fresh:
                sections.append(spool.Section(spool.new_flush_id(), fresh))
            return sections

    def close(self, timeout: float) -> bool:
        """Stop the thread and flush what is left, retrying until ``timeout``.

        Returns True when everything was written.
        """
        deadline = time.monotonic() + timeout
        self._stop_event.set()
        if self.is_alive():
            self.join(max(0.0, deadline - time.monotonic()))
        while True:
            if self.flush_once() and not self.cache.pending_total():
                log.info("final flush: flushed %d keys in %.3f s", self.stats.last_written,
                         self.stats.last_seconds)
                return True
            if time.monotonic() + 0.5 >= deadline:
                return False
            time.sleep(0.5)
