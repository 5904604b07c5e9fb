"""Human-readable tables: the cache dump (SIGUSR1, ``status``) and the admin listings."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from ratelimit_policyd.model import Row

if TYPE_CHECKING:
    from ratelimit_policyd.lifecycle import Daemon


def fmt_time(ts: float) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Left-aligned columns separated by two spaces."""
    cells = [[str(c) for c in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in cells]


def fmt_quota(quota: int | None) -> str:
    """A quota as shown to operators; None is a NULL quota, which never refuses."""
    return "unlimited" if quota is None else str(quota)


def rows_table(rows: Iterable[Row]) -> list[str]:
    return table(("SENDER", "QUOTA", "USED", "EXPIRY", "PERSIST"),
                 ((r.sender, fmt_quota(r.quota), r.used, fmt_time(r.expiry),
                   "yes" if r.persist else "no") for r in rows))


def render_status(d: Daemon) -> list[str]:
    """The cache table and the daemon's statistics."""
    lines = ["cache:"]
    snap = sorted(d.cache.snapshot(), key=lambda r: r.key)
    lines += ["  " + ln for ln in table(
        ("KEY", "QUOTA", "USED", "EXPIRY", "PERSIST", "PENDING"),
        ((r.key, fmt_quota(r.quota), r.used, fmt_time(r.expiry), "yes" if r.persist else "no",
          r.pending if r.loaded else f"{r.pending} (db unread)") for r in snap))]
    srv, fl, eng = d.server, d.flusher, d.engine
    st = fl.stats if fl else None
    decided = dict(sorted(eng.stats.snapshot().items()))
    lines.append(
        f"stats: uptime {int(time.time() - d.started)} s, "
        f"connections open {srv.connections() if srv else 0}, "
        f"connections total {srv.connections_total if srv else 0}, "
        f"refused {srv.rejected_total if srv else 0}, threads {threading.active_count()}, "
        f"requests {sum(decided.values())}, decisions {decided}, cached keys {len(snap)} "
        f"(max_entries {d.cache.max_entries}, evicted for new keys {d.cache.evictions}), "
        f"pending counts {d.cache.pending_total()}")
    if st is not None:
        lines.append(
            f"flush: last {fmt_time(st.last_time)} "
            f"{'ok' if st.last_ok else 'FAILED: ' + st.last_error}, "
            f"{st.last_written} keys in {st.last_seconds:.3f} s, rounds {st.rounds}, "
            f"failures {st.failures}, interval {fl.interval if fl else 0:g} s")
    return lines
