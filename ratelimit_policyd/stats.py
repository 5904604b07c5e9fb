"""Exact request counters without a lock on the request path.

Each thread increments its own dictionary (no other thread writes it, so a plain
``+= 1`` is safe); readers sum them. A shared counter behind a lock made hundreds of
connection threads queue on that lock, and ``collections.Counter`` alone loses
increments between threads.
"""

from __future__ import annotations

import threading
from collections import Counter


class ThreadCounters:
    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards registration and folding, not counting
        self._threads: list[tuple[threading.Thread, dict[str, int]]] = []
        self._folded: Counter[str] = Counter()

    def incr(self, what: str) -> None:
        try:
            d: dict[str, int] = self._local.d
        except AttributeError:
            d = self._local.d = {}
            with self._lock:
                self._threads.append((threading.current_thread(), d))
        d[what] = d.get(what, 0) + 1

    def snapshot(self) -> dict[str, int]:
        """Totals; the counts of finished threads are folded into one dictionary."""
        with self._lock:
            total = Counter(self._folded)
            alive = []
            for thread, d in self._threads:
                if thread.is_alive():
                    alive.append((thread, d))
                    total.update(d)
                else:
                    self._folded.update(d)
                    total.update(d)
            self._threads = alive
        return dict(total)
