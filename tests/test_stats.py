"""stats: exact per-thread counters."""

from __future__ import annotations

import threading

from ratelimit_policyd.stats import ThreadCounters


def test_thread_counters_are_exact() -> None:
    tc = ThreadCounters()

    def work() -> None:
        for _ in range(20_000):
            tc.incr("dunno")
        tc.incr("over_quota")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    mid = tc.snapshot()
    assert mid.get("dunno", 0) <= 160_000
    for t in threads:
        t.join()
    assert tc.snapshot() == {"dunno": 160_000, "over_quota": 8}
    assert tc.snapshot() == {"dunno": 160_000, "over_quota": 8}  # folded once, not twice
