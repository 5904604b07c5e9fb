"""QuotaCache: counting, window roll-over, drain/confirm/restore, eviction, threads."""

from __future__ import annotations

import random
import threading

from ratelimit_policyd.cache import INSERT, OVER_QUOTA, UPDATE, CacheRow, QuotaCache
from ratelimit_policyd.model import Delta, Period, Row
from ratelimit_policyd.window import Calendar

HOURLY = Calendar(Period.HOURLY, "UTC")
T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
NEXT_HOUR = 1_700_002_800  # 23:00 UTC


def make(default_quota: int = 5, **kw: object) -> QuotaCache:
    return QuotaCache(HOURLY, default_quota, **kw)  # type: ignore[arg-type]


def test_miss_install_and_statuses() -> None:
    c = make(default_quota=2)
    assert c.charge("a", 1, T0) is None
    c.install("a", None, T0)
    first = c.charge("a", 1, T0)
    assert first is not None
    assert (first.used, first.quota, first.over, first.status, first.loaded) == (
        1,
        2,
        False,
        INSERT,
        True,
    )
    second = c.charge("a", 1, T0)
    assert second is not None and (second.used, second.status) == (2, UPDATE)
    third = c.charge("a", 1, T0)
    assert third is not None and (third.used, third.over, third.status) == (3, True, OVER_QUOTA)


def test_installed_row_is_used_as_is() -> None:
    c = make()
    c.install("a", Row("a", 100, 40, NEXT_HOUR, True), T0)
    ch = c.charge("a", 3, T0)
    assert ch is not None and (ch.used, ch.quota, ch.status) == (43, 100, UPDATE)


def test_expired_row_restarts_at_zero() -> None:
    c = make(default_quota=7)
    c.install("a", Row("a", 100, 99, int(T0) - 1, False), T0)
    ch = c.charge("a", 1, T0)
    assert ch is not None and (ch.used, ch.quota) == (1, 7)
    c.install("p", Row("p", 100, 99, int(T0) - 1, True), T0)
    ch = c.charge("p", 1, T0)
    assert ch is not None and (ch.used, ch.quota) == (1, 100)
    batch = c.drain()
    assert sorted(batch.deltas) == [Delta("a", 1, NEXT_HOUR), Delta("p", 1, NEXT_HOUR)]


def test_quota_zero_blocks() -> None:
    c = make()
    c.install("z", Row("z", 0, 0, NEXT_HOUR, True), T0)
    ch = c.charge("z", 1, T0)
    assert ch is not None and ch.over


def test_window_rollover_splits_deltas() -> None:
    c = make(default_quota=10)
    c.install("a", Row("a", 50, 20, NEXT_HOUR, False), T0)
    c.charge("a", 2, T0)
    ch = c.charge("a", 3, NEXT_HOUR + 5)  # the next window
    assert ch is not None and (ch.used, ch.quota) == (3, 10)  # quota back to default
    batch = c.drain()
    assert batch.deltas == [Delta("a", 2, NEXT_HOUR), Delta("a", 3, NEXT_HOUR + 3600)]
    assert batch.gens[0] == -1 and batch.gens[1] >= 0


def test_drain_keeps_counts_visible_and_restore_puts_them_back() -> None:
    c = make(default_quota=10)
    c.install("a", None, T0)
    c.charge("a", 4, T0)
    batch = c.drain()
    assert batch.deltas == [Delta("a", 4, NEXT_HOUR)]
    ch = c.charge("a", 1, T0)
    assert ch is not None and ch.used == 5  # in flight still counts
    c.restore(batch)
    again = c.drain()
    assert again.deltas == [Delta("a", 5, NEXT_HOUR)]
    assert c.pending_total() == 5
    c.confirm(again, {"a": Row("a", 10, 5, NEXT_HOUR, False)}, T0)
    assert c.pending_total() == 0
    ch = c.charge("a", 1, T0)
    assert ch is not None and ch.used == 6


def test_confirm_adopts_other_daemons_counts_and_operator_quota() -> None:
    c = make(default_quota=10)
    c.install("a", None, T0)
    c.charge("a", 1, T0)
    batch = c.drain()
    c.charge("a", 1, T0)  # made while the flush runs
    # Another daemon counted 7, an operator raised the quota to 500.
    c.confirm(batch, {"a": Row("a", 500, 8, NEXT_HOUR, True)}, T0)
    ch = c.charge("a", 1, T0)
    assert ch is not None and (ch.used, ch.quota) == (10, 500)


def test_restore_after_rollover_keeps_old_window_delta() -> None:
    c = make()
    c.install("a", None, T0)
    c.charge("a", 2, T0)
    batch = c.drain()
    c.charge("a", 1, NEXT_HOUR + 1)  # rolls while the flush is in flight
    c.restore(batch)
    again = c.drain()
    assert sorted(again.deltas) == [Delta("a", 1, NEXT_HOUR + 3600), Delta("a", 2, NEXT_HOUR)]
    ch = c.charge("a", 0, NEXT_HOUR + 2)
    assert ch is not None and ch.used == 1


def test_confirm_of_old_window_does_not_touch_new_window() -> None:
    c = make()
    c.install("a", None, T0)
    c.charge("a", 2, T0)
    batch = c.drain()
    c.charge("a", 1, NEXT_HOUR + 1)
    c.confirm(batch, {"a": Row("a", 5, 2, NEXT_HOUR, False)}, NEXT_HOUR + 1)
    ch = c.charge("a", 0, NEXT_HOUR + 2)
    assert ch is not None and ch.used == 1


def test_unloaded_entry_is_flagged_until_a_row_arrives() -> None:
    c = make(default_quota=3)
    c.install_unloaded("a", T0)
    ch = c.charge("a", 1, T0)
    assert ch is not None and not ch.loaded and ch.quota == 3
    batch = c.drain()
    c.confirm(batch, {"a": Row("a", 1000, 41, NEXT_HOUR, True)}, T0)
    ch = c.charge("a", 1, T0)
    assert ch is not None and ch.loaded and (ch.used, ch.quota) == (42, 1000)


def test_refresh_and_deleted_rows() -> None:
    c = make(idle_ttl=60.0)
    c.install("a", Row("a", 9, 1, NEXT_HOUR, False), T0)
    c.install("b", Row("b", 9, 1, NEXT_HOUR, False), T0)
    keys = c.refresh_candidates(T0 + 1, 100)
    assert sorted(keys) == ["a", "b"]
    c.refresh(keys, {"a": Row("a", 77, 5, NEXT_HOUR, True)}, T0 + 1)
    row = c.peek("a")
    assert row is not None and (row.quota, row.used) == (77, 5)
    assert c.peek("b") is None  # its row was deleted by an operator
    assert c.refresh_candidates(T0 + 1000, 100) == []  # idle keys are not re-read


def test_eviction_keeps_unwritten_counts() -> None:
    c = make(idle_ttl=10.0, max_entries=1000)
    for i in range(5):
        c.install(f"k{i}", None, T0)
    c.charge("k0", 1, T0)  # dirty: must stay
    assert c.evict(T0 + 100) == 4
    assert len(c) == 1 and c.peek("k0") is not None


def test_eviction_enforces_the_cap_lru_first() -> None:
    c = make(idle_ttl=1e9, max_entries=100)
    for i in range(150):
        c.install(f"k{i}", None, T0 + i)
        c.charge(f"k{i}", 0, T0 + i)
    c.drain()  # n=0 deltas are dropped
    c.charge("k0", 0, T0 + 200)
    c.drain()
    c.evict(T0 + 201)
    assert len(c) == 100
    assert c.peek("k0") is not None and c.peek("k1") is None and c.peek("k149") is not None


def test_concurrent_charges_are_exact() -> None:
    c = make(default_quota=10**9)
    keys = [f"user{i}@example.com" for i in range(20)]
    for k in keys:
        c.install(k, None, T0)
    per_thread = 5000
    written: dict[str, int] = {}
    stop = threading.Event()

    def writer() -> None:
        # A flusher stand-in that "writes" by summing what it drains.
        while not stop.is_set():
            batch = c.drain()
            rows = {}
            for d in batch.deltas:
                written[d.sender] = written.get(d.sender, 0) + d.n
            for d in batch.deltas:
                rows[d.sender] = Row(d.sender, 10**9, written[d.sender], d.expiry, False)
            c.confirm(batch, rows, T0)

    def worker(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(per_thread):
            c.charge(rnd.choice(keys), 1, T0)

    w = threading.Thread(target=writer)
    w.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    w.join()
    final = c.drain()
    for d in final.deltas:
        written[d.sender] = written.get(d.sender, 0) + d.n
    assert sum(written.values()) == 8 * per_thread
    for k in keys:
        row = c.peek(k)
        assert row is not None and row.used == written.get(k, 0)


def test_retried_request_is_answered_the_same_and_counted_once() -> None:
    c = make(default_quota=1)
    c.install("a", None, T0)
    token = ("inst1", "RCPT", "r@x", "a")
    first = c.charge("a", 1, T0, token)
    again = c.charge("a", 1, T0 + 1, token)
    assert first == again and first is not None and not first.over
    other = c.charge("a", 1, T0 + 1, ("inst1", "RCPT", "s@x", "a"))
    assert other is not None and other.over and other.used == 2
    late = c.charge("a", 1, T0 + 1000, token)  # long after: a new request
    assert late is not None and late.used == 3
    assert sum(d.n for d in c.drain().deltas) == 3



def _flush(c: QuotaCache, written: dict[str, int], now: float) -> None:
    """A flusher stand-in: "writes" what it drains and confirms it."""
    batch = c.drain()
    for d in batch.deltas:
        written[d.sender] = written.get(d.sender, 0) + d.n
    c.confirm(batch, {d.sender: Row(d.sender, 10**9, written[d.sender], d.expiry, False)
                      for d in batch.deltas}, now)


def test_max_entries_is_a_hard_cap_at_every_insert() -> None:
    # 10,000 new keys into a cache of 100, flushed every 50 keys: before, the cache
    # grew by every key added between two flush rounds (the flusher's evict trimmed it).
    c = make(default_quota=10**9, max_entries=100, idle_ttl=1e9)
    written: dict[str, int] = {}
    for i in range(10_000):
        key = f"k{i}"
        now = T0 + i
        if c.charge(key, 1, now) is None:
            c.install(key, None, now)
            assert c.charge(key, 1, now) is not None
        assert len(c) <= 100, i
        if i % 50 == 49:
            _flush(c, written, now)
    _flush(c, written, T0 + 10_000)
    assert written == {f"k{i}": 1 for i in range(10_000)}  # no count lost
    assert len(c) == 100
    # The least recently used went first: the cache holds the last 100 keys.
    assert c.peek("k9899") is None and c.peek("k9900") is not None


def test_a_full_cache_evicts_the_least_recently_used_entry_without_unwritten_counts() -> None:
    c = make(default_quota=10**9, max_entries=100, idle_ttl=1e9)
    written: dict[str, int] = {}
    for i in range(100):
        c.install(f"k{i}", None, T0 + i)
        c.charge(f"k{i}", 1, T0 + i)
    _flush(c, written, T0 + 100)
    c.charge("k0", 1, T0 + 101)  # k0 now holds an unwritten count, and is recent
    c.charge_loaded("new1", None, 1, T0 + 102)
    assert len(c) == 100 and c.peek("k1") is None and c.peek("k0") is not None
    c.drain()  # k0's count is now in flight: still never evicted
    c.charge_loaded("new2", None, 1, T0 + 103)
    assert c.peek("k2") is None and c.peek("k0") is not None


def test_when_every_entry_holds_unwritten_counts_a_new_key_is_still_cached_and_counted() -> None:
    # The database cannot be written: no entry may go, or its counts would vanish from
    # its key's view. The cap yields to them, and comes back once they are written.
    c = make(default_quota=10**9, max_entries=100, idle_ttl=1e9)
    for i in range(100):
        c.charge_unloaded(f"k{i}", 1, T0 + i)
    got = c.charge_unloaded("one-more", 1, T0 + 100)
    assert got.used == 1
    assert len(c) == 101
    assert c.pending_total() == 101
    written: dict[str, int] = {}
    _flush(c, written, T0 + 101)
    assert sum(written.values()) == 101
    c.evict(T0 + 102)
    assert len(c) == 100 and c.peek("k0") is None and c.peek("one-more") is not None


def test_a_miss_is_cached_and_counted_in_one_step() -> None:
    # Two threads missing one key: the first entry wins, both counts land in it.
    c = make(default_quota=10)
    first = c.charge_loaded("a", Row("a", 10, 4, NEXT_HOUR, False), 1, T0)
    second = c.charge_loaded("a", Row("a", 10, 4, NEXT_HOUR, False), 1, T0)
    assert (first.used, first.status, second.used) == (5, UPDATE, 6)
    retried = c.charge_loaded("b", None, 1, T0, token="t")
    c.evict(T0 + 10_000)
    assert c.peek("b") is not None  # unwritten: kept
    assert c.charge_loaded("b", None, 1, T0 + 1, token="t") == retried
    assert c.pending_total() == 3


def test_a_null_quota_is_never_refused_and_stays_unlimited_in_a_new_window() -> None:
    # A NULL quota of a hand-made Perl table: unlimited (see model.Row).
    c = make(default_quota=5)
    c.install("u", Row("u", None, 10**6, NEXT_HOUR, False), T0)
    for _ in range(20):
        got = c.charge("u", 1, T0)
        assert got is not None and not got.over and got.quota is None
    rolled = c.charge("u", 1, NEXT_HOUR + 1)  # the window rolls over in the cache
    assert rolled is not None and (rolled.used, rolled.quota, rolled.over) == (1, None, False)
    # An expired row, and a row read back from the old window, keep it too.
    c.install("x", Row("x", None, 99, int(T0) - 1, False), T0)
    assert c.peek("x") == CacheRow("x", None, 0, NEXT_HOUR, False, 0, True)
    c.charge("x", 1, T0)
    batch = c.drain()
    c.confirm(batch, {"x": Row("x", None, 50, int(T0) - 1, False)}, T0)
    got = c.charge("x", 1, T0)
    assert got is not None and got.quota is None and not got.over
