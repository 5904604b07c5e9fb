"""MissLoader: reads the rows of cache misses in batches, on one thread of its own.

A request for a key the cache does not hold must wait for its row. Each request thread
querying the database itself made every miss pay a round trip and a share of the GIL
hand-overs of a busy daemon, one after another on a few pooled connections (misses
waited 0.6 s under load, 3 s with a database 50 ms away). Here the waiting threads
queue their keys and sleep; the loader reads every queued key in one query and hands
each waiter its row, so a burst of misses costs one round trip. The waiter caches the
row and counts in one step (``QuotaCache.charge_loaded``): rows installed here, a batch
at a time, could push each other out of a small cache before their requests count.
"""

from __future__ import annotations

import logging
import threading

from ratelimit_policyd.model import Row
from ratelimit_policyd.storage.base import Storage, StorageError

log = logging.getLogger(__name__)

#: Most keys read in one query.
BATCH = 500


class _Wait:
    __slots__ = ("done", "error", "row")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: StorageError | None = None
        self.row: Row | None = None


class MissLoader(threading.Thread):
    """``load(key)`` returns the key's row (None: it has none), read with other misses."""

    def __init__(self, storage: Storage, wait_limit: float) -> None:
        super().__init__(name="miss-loader", daemon=True)
        self._storage = storage
        self._wait_limit = wait_limit
        self._cv = threading.Condition()
        self._queue: dict[str, _Wait] = {}
        self._reading: dict[str, _Wait] = {}  # the batch being read now
        self._stopping = False

    def load(self, key: str) -> Row | None:
        """Wait for ``key``'s row; raise StorageError if it could not be read.

        Several threads missing the same key share one read.
        """
        with self._cv:
            wait = self._queue.get(key) or self._reading.get(key)
            if wait is None:
                wait = self._queue[key] = _Wait()
                self._cv.notify()
        if not wait.done.wait(self._wait_limit):
            raise StorageError(f"no answer from the database within {self._wait_limit:.0f} s")
        if wait.error is not None:
            raise wait.error
        return wait.row

    def run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                keys = list(self._queue)[:BATCH]
                waits = [self._queue.pop(k) for k in keys]
                self._reading = dict(zip(keys, waits, strict=True))
            try:
                rows = self._storage.load(keys)
            except StorageError as exc:
                self._finish(waits, exc)
                continue
            except Exception as exc:  # never leave waiters hanging
                log.exception("loading rows failed")
                self._finish(waits, StorageError(f"loading rows failed: {exc}"))
                continue
            for key, w in zip(keys, waits, strict=True):
                w.row = rows.get(key)
            self._finish(waits, None)

    def _finish(self, waits: list[_Wait], error: StorageError | None) -> None:
        with self._cv:
            self._reading = {}
        for w in waits:
            w.error = error
            w.done.set()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
