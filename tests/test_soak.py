"""Soak: two daemons under sustained Postfix-like load while their database restarts.

At the end the database must hold exactly the recipients counted per sender. The CI
version runs about 30 seconds; a longer one is the same test with a duration:

    RATELIMIT_SOAK_SECONDS=1800 python -m pytest tests/test_soak.py -m slow -p no:timeout
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.faultkit import (
    Database,
    Load,
    MySQLDaemon,
    env_seconds,
    next_boundary,
    postfix_mix,
    wait_for_counts,
    wait_until,
)
from tests.fixtures_mariadb import MariaDB

SECONDS = env_seconds("RATELIMIT_SOAK_SECONDS", 30.0)

pytestmark = [pytest.mark.mysql, pytest.mark.slow, pytest.mark.timeout(SECONDS * 2 + 120)]


def test_soak_with_database_restarts(
    private_mariadb: Callable[[], MariaDB], tmp_path: Path
) -> None:
    db = Database.create(private_mariadb())
    limited = [f"limited{i}@example.org" for i in range(10)]
    db.put(limited, quota=50, expiry=next_boundary("monthly"), persist=True)
    keys = limited + [f"soak{i}@example{i % 5}.net" for i in range(400)]
    daemons = [
        MySQLDaemon(tmp_path / f"mx{i}", db.url, "--flush-interval", "0.5", "--period",
                    "monthly", "--default-quota", "100000", "--on-db-error", "dunno")
        for i in range(2)
    ]
    rss_start = [d.rss_kib() for d in daemons]
    load = Load([d.port for d in daemons], keys, connections=16, maker=postfix_mix,
                rate=100.0, retry_share=0.02, reconnect=True).start()
    faults: list[str] = []
    try:
        started = time.monotonic()
        segment = SECONDS / 6
        # Alternate a clean restart and a frozen server, with load running throughout.
        while time.monotonic() - started < SECONDS - segment:
            time.sleep(segment)  # load against a healthy database
            if len(faults) % 2 == 0:
                db.server.stop()
                time.sleep(min(3.0, segment / 2))
                db.server.start()
                faults.append("restart")
            else:
                db.server.pause()
                time.sleep(min(3.0, segment / 2))
                db.server.resume()
                faults.append("freeze")
        wait_until(lambda: time.monotonic() - started >= SECONDS, SECONDS, "the soak's end")
    finally:
        load.stop()
    assert not load.errors, load.errors[:5]
    assert not load.unanswered
    counted = load.counted()
    wait_for_counts(db, counted, timeout=60)
    rss_end = [d.rss_kib() for d in daemons]
    assert [d.stop() for d in daemons] == [0, 0]
    used = db.used()
    assert {k: v for k, v in used.items() if v} == dict(counted)
    actions = load.actions()
    print(f"{SECONDS:.0f} s, faults {faults}: {load.summary()}; replies {dict(actions)}; "
          f"lost 0 of {sum(counted.values())}; VmRSS {rss_start} -> {rss_end} KiB")
    assert len(faults) >= 4
    assert actions["471 monthly message quota exceeded"] > 0  # the limited senders
    # Memory is bounded by the cache and retry-memo caps, not by the number of requests.
    assert max(rss_end) < 400 * 1024
