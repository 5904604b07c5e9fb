"""Three daemon processes on one MariaDB, as on three MX hosts sharing a database.

Counts must add up exactly across the daemons, a window must reset once however many
daemons see its end, an operator's quota change must reach every daemon within about
two flush intervals, and the overshoot of a quota must stay within the derived bound
(see ``overshoot_bound`` and /work/notes/readme-guarantees.md).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultkit import (
    Database,
    Load,
    MySQLDaemon,
    Reply,
    next_boundary,
    postfix_mix,
    wait_for_counts,
    wait_until,
)
from tests.fixtures_mariadb import MariaDB
from tests.policyclient import PolicyClient, request_bytes

pytestmark = [pytest.mark.mysql, pytest.mark.timeout(120)]

N = 3
FLUSH = 0.5  # flush_interval F of every daemon
DEFAULT_QUOTA = 10**6
OVER = "471 monthly message quota exceeded"


class Trio:
    def __init__(self, db: Database, daemons: list[MySQLDaemon]) -> None:
        self.db = db
        self.daemons = daemons

    @property
    def ports(self) -> list[int]:
        return [d.port for d in self.daemons]


@pytest.fixture(scope="module")
def trio(mariadb: MariaDB, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    db = Database.create(mariadb)
    base = tmp_path_factory.mktemp("trio")
    daemons: list[MySQLDaemon] = []
    try:
        for i in range(N):
            daemons.append(MySQLDaemon(base / f"mx{i}", db.url, "--period", "monthly",
                                       "--default-quota", str(DEFAULT_QUOTA),
                                       "--flush-interval", str(FLUSH)))
        yield Trio(db, daemons)
    finally:
        codes = [d.stop() for d in daemons]
        mariadb.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
    assert codes == [0] * N


def test_counts_add_up_exactly_across_three_daemons(trio: Trio) -> None:
    keys = [f"user{i}@example.{i % 7}.org" for i in range(150)]
    load = Load(trio.ports, keys, connections=6, maker=postfix_mix, max_requests=700, seed=2)
    load.start().join()
    assert not load.errors and not load.unanswered
    expected = load.counted()
    assert load.answered() == 6 * 700 and len(expected) == len(keys)
    wait_for_counts(trio.db, expected)
    used = trio.db.used()
    assert {k: used[k] for k in keys} == dict(expected)
    print(f"{load.summary()}; lost 0 of {sum(expected.values())}")


@pytest.mark.slow
def test_window_resets_once_when_every_daemon_sees_the_end(trio: Trio) -> None:
    """Rows whose window ends a few seconds from now (old counts 500, quota 5000, not
    persistent): every daemon caches them, counts, sees the end and rolls over by itself.
    The new window must hold exactly the counts made after the end."""
    keys = [f"reset{i}@example.com" for i in range(10)]
    end = int(time.time()) + 7
    trio.db.put(keys, quota=5000, used=500, expiry=end)
    before = Load(trio.ports, keys, connections=6, rate=40.0, seed=3).start()
    wait_until(lambda: time.time() >= end - 3.5, 10, "the load before the end")
    before.stop()
    assert not before.errors and not before.unanswered
    # Every count of the old window is in the database before it ends, so the new
    # window's figure is exact (see the README on counts that arrive late).
    wait_for_counts(trio.db, {k: 500 + n for k, n in before.counted().items()}, timeout=3)
    assert time.time() < end, "the old window's counts were not written before its end"
    assert all(r.at < end for r in before.replies)
    wait_until(lambda: time.time() >= end + 0.2, 10, "the window's end")
    after = Load(trio.ports, keys, connections=6, rate=40.0, seed=4).start()
    wait_until(lambda: after.answered() >= 300, 20, "the load after the end")
    after.stop()
    assert not after.errors and not after.unanswered
    assert set(after.actions()) == {"DUNNO"}
    expected = after.counted()
    wait_for_counts(trio.db, expected)
    new_expiry = next_boundary("monthly")
    for key in keys:
        # quota back to the default (not persistent), used = the new window only.
        assert trio.db.row(key) == (DEFAULT_QUOTA, expected[key], new_expiry, 0), key
    print(f"before the end: {before.summary()}; after: {after.summary()}")


def test_operator_quota_change_reaches_every_daemon(trio: Trio) -> None:
    key = "operator@example.com"
    trio.db.put([key], quota=DEFAULT_QUOTA, expiry=next_boundary("monthly"), persist=True)
    for port in trio.ports:  # cached by every daemon
        with PolicyClient(port) as c:
            assert c.ask(request_bytes(sasl_username=key)) == "DUNNO"
    changed = time.monotonic()
    trio.db.sql("UPDATE ratelimit SET quota = 0 WHERE sender = %s", (key,))
    seen: dict[int, float] = {}

    def poll(port: int) -> None:
        with PolicyClient(port) as c:
            while time.monotonic() - changed < 30:
                if c.ask(request_bytes(sasl_username=key)) == OVER:
                    seen[port] = time.monotonic() - changed
                    # ...and it stays applied.
                    if all(c.ask(request_bytes(sasl_username=key)) == OVER for _ in range(5)):
                        return
                    seen[port] = -1.0
                    return
                time.sleep(0.05)

    threads = [threading.Thread(target=poll, args=(p,)) for p in trio.ports]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(trio.ports), seen
    assert min(seen.values()) >= 0, seen
    # About two flush intervals (one to write, one to read back), plus generous slack
    # for a loaded 2-core machine.
    assert max(seen.values()) <= 2 * FLUSH + 2.0, seen
    print("quota change applied after " + ", ".join(f"{s:.2f} s" for s in seen.values())
          + f" (F = {FLUSH} s)")


def busiest_window(replies: list[Reply], length: float) -> int:
    """Most replies of one daemon (port) within any ``length`` seconds."""
    best = 0
    by_port: dict[int, list[float]] = {}
    for r in replies:
        by_port.setdefault(r.port, []).append(r.at)
    for times in by_port.values():
        times.sort()
        lo = 0
        for hi, t in enumerate(times):
            while t - times[lo] > length:
                lo += 1
            best = max(best, hi - lo + 1)
    return best


def overshoot_bound(n: int, quota: int, burst: int) -> int:
    """(N - 1) * min(Q, r * L): each other daemon may accept at most what it receives
    within the lag L before it sees the total, and never more than Q by itself."""
    return (n - 1) * min(quota, burst)


def test_overshoot_of_a_quota_stays_within_the_bound(trio: Trio) -> None:
    key = "burst@example.com"
    quota = 150
    trio.db.put([key], quota=quota, expiry=next_boundary("monthly"), persist=True)
    # One Postfix connection per daemon, each sending 20 requests a second for the key.
    load = Load(trio.ports, [key], connections=N, rate=20.0).start()

    def all_refuse() -> bool:
        last = load.last_actions(10)
        return len(last) == N and all(a == [OVER] * 10 for a in last.values())

    wait_until(all_refuse, 40, "every daemon refusing the key")
    load.stop()
    assert not load.errors and not load.unanswered
    accepted = load.actions()["DUNNO"]
    overshoot = accepted - quota
    # The lag L after which a daemon sees another's count: up to F until that daemon's
    # flush writes it, plus up to F until this daemon's next flush reads it back, plus
    # the time of those two flushes (1 s of slack covers them generously).
    lag = 2 * FLUSH + 1.0
    burst = busiest_window(load.replies, lag)
    bound = overshoot_bound(N, quota, burst)
    wait_for_counts(trio.db, {key: load.total()})
    print(f"quota {quota}, {N} daemons at 20 req/s each, F = {FLUSH} s: accepted {accepted}, "
          f"overshoot {overshoot}, bound (N-1)*min(Q, r*L) = {N - 1}*min({quota}, {burst}) "
          f"= {bound}")
    assert overshoot <= bound
    # Each daemon alone never accepts past the quota: its own counts are always seen.
    per_daemon: dict[int, int] = {}
    for r in load.replies:
        if r.action == "DUNNO":
            per_daemon[r.port] = per_daemon.get(r.port, 0) + 1
    assert max(per_daemon.values()) <= quota



@pytest.mark.slow
def test_late_counts_of_an_ended_window_are_bounded(
    mariadb: MariaDB, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A daemon with a long flush interval writes its last counts of a window after the
    window ended, when a faster daemon has already started the new one in the row. The
    storage adds such a late delta to the row rather than dropping it (model.Delta), so
    the new window may hold those counts: at most what the slow daemon counted in its
    last flush interval before the end. Never fewer than the new window's own counts:
    the reset happens once."""
    db = Database.create(mariadb)
    base = tmp_path_factory.mktemp("late")
    slow_flush = 3.0
    keys = [f"late{i}@example.com" for i in range(5)]
    end = int(time.time()) + 6
    db.put(keys, quota=5000, used=500, expiry=end)
    args = ("--period", "monthly", "--default-quota", str(DEFAULT_QUOTA))
    fast = MySQLDaemon(base / "fast", db.url, "--flush-interval", "0.2", *args)
    slow = MySQLDaemon(base / "slow", db.url, "--flush-interval", str(slow_flush), *args)
    try:
        ports = [fast.port, slow.port]
        before = Load(ports, keys, connections=4, rate=40.0, seed=5).start()
        wait_until(lambda: time.time() >= end - 0.3, 15, "the load before the end")
        before.stop()
        wait_until(lambda: time.time() >= end + 0.1, 10, "the window's end")
        after = Load(ports, keys, connections=4, rate=40.0, seed=6).start()
        # Long enough for the slow daemon's next flush, which carries its late counts.
        wait_until(lambda: time.time() >= end + slow_flush + 1.5, 15, "the slow flush")
        after.stop()
    finally:
        codes = [fast.stop(), slow.stop()]
    assert codes == [0, 0]
    for load in (before, after):
        assert not load.errors and not load.unanswered
    assert all(r.at < end for r in before.replies)
    new = after.counted()
    used = db.used()
    late = {k: used[k] - new[k] for k in keys}
    bound = {k: sum(r.n for r in before.replies if r.port == slow.port and r.key == k
                    and r.at > end - (slow_flush + 1.0)) for k in keys}
    print(f"new window {dict(new)}; late counts of the ended window in it {late}; "
          f"bound {bound}")
    for k in keys:
        assert 0 <= late[k] <= bound[k], k
    mariadb.execute(f"DROP DATABASE IF EXISTS `{db.name}`")
