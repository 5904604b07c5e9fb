"""Merging rows whose key is not lower case into the lower-case key (``migrate-keys``).

The Perl daemon stored SASL usernames as given; this daemon lower-cases keys, so on a
case-sensitive table (``utf8_bin``, SQLite's default) a ``Mixed@Example.com`` row is
never read again. The rule that decides what the merged row holds is written once here,
as a pure function of the rows a backend has locked; each backend runs it inside its own
transaction and owns the SQL. Sees only ``model``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

from ratelimit_policyd.model import Row


def lowered(sender: str) -> str:
    """The key this daemon counts for ``sender`` (``policy.make_key`` lower-cases so)."""
    return sender.lower()


def needs_lowering(sender: str) -> bool:
    return sender != lowered(sender)


def group_by_target(rows: Iterable[Row]) -> dict[str, list[str]]:
    """Mixed-case senders by the lower-case key they merge into, both sorted."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        if needs_lowering(r.sender):
            groups.setdefault(lowered(r.sender), []).append(r.sender)
    return {t: sorted(groups[t]) for t in sorted(groups)}


@dataclass(frozen=True, slots=True)
class KeyMerge:
    """What merging one group does (or did): the plan a dry run prints, and applies.

    ``used`` counts only the current window: a row whose expiry is not after ``now``
    would restart at 0 at its next count, so its ``used`` is history, not usage.
    """

    target: str
    target_row: Row | None  # the lower-case key's row as found (None: it has none)
    sources: tuple[Row, ...]  # the mixed-case rows, as found
    now: int
    renamed: str | None  # with no lower-case row, this source becomes it (renamed in place)
    merged: tuple[Row, ...]  # sources whose counts go into the target, then deleted
    added: int  # their used, summed over the rows still in the current window
    expiry: int  # the merged row's expiry: the latest current window's end
    used_before: int  # the lower-case key's count in the current window (0 if none)
    used_after: int  # its count after the merge (in the window ending at ``expiry``)
    quota: int | None  # the merged row's quota (None: unlimited, a NULL column)
    persist: bool
    set_quota: bool  # whether the quota and persist columns are written
    quota_reason: str
    conflict: bool  # persistent rows with different quotas: the smallest was kept
    after: Row | None = None  # the row read back after applying (None in a dry run)

    def live(self, row: Row) -> bool:
        return row.expiry > self.now

    def with_after(self, row: Row | None) -> KeyMerge:
        return replace(self, after=row)


def restrictiveness(quota: int | None) -> tuple[bool, int]:
    """Sort key: most restrictive first. ``0`` blocks; NULL (None) is unlimited, the
    least restrictive (a hand-made nullable Perl column; see ``model.Row``)."""
    return (quota is None, quota or 0)


def plan_merge(target: str, target_row: Row | None, sources: Sequence[Row], now: int) -> KeyMerge:
    """The merge of ``sources`` (mixed-case rows, at least one) into ``target``.

    * ``used``: summed over the rows still in their window (``expiry > now``). Windows are
      aligned to the calendar, so every such row is counting the window ``now`` lies in,
      even when its expiry differs (the Perl daemon's hourly expiry is one hour after the
      row's first count, not the top of the hour); the merged row takes the latest expiry.
    * quota: if any row has ``persist = 1``, the merged row is persistent with the
      smallest quota of the persistent rows (``quota = 0`` blocks: the most restrictive);
      a disagreement is flagged. Otherwise the lower-case row keeps its quota, which
      resets to the default at the window's end, as it would have.
    * with no lower-case row, one source is renamed to the lower-case key, so that the
      row (and its id) is kept rather than re-created: a persistent one with the smallest
      quota first, else the one with the latest expiry. On a case-insensitive table this
      is always the case, and the rename is the whole merge.
    """
    if not sources:
        raise ValueError("nothing to merge")
    renamed: str | None = None
    if target_row is None:
        base = min(sources, key=lambda r: (not r.persist,
                                           restrictiveness(r.quota if r.persist else 0),
                                           -r.expiry, r.sender))
        renamed = base.sender
        base_row = base._replace(sender=target)
        merged = tuple(r for r in sources if r.sender != base.sender)
    else:
        base_row, merged = target_row, tuple(sources)
    live = [r for r in merged if r.expiry > now]
    added = sum(r.used for r in live)
    base_live = base_row.expiry > now
    used_before = base_row.used if base_live else 0
    expiry = max([base_row.expiry, *(r.expiry for r in live)])
    if base_live:
        used_after = base_row.used + added
    elif live:
        used_after = added  # the target's count is from an ended window: it restarts
    else:
        used_after = base_row.used  # nothing current anywhere: the row is left as it is
    everyone = ([target_row] if target_row is not None else []) + list(sources)
    persistent = [r for r in everyone if r.persist]
    conflict = False
    if persistent:
        quota = min((r.quota for r in persistent), key=restrictiveness)
        quotas = ", ".join(f"{r.sender} {r.quota}" for r in persistent)
        if len({r.quota for r in persistent}) > 1:
            conflict = True
            reason = (f"persistent quotas disagree ({quotas}): kept the most restrictive, "
                      f"{quota}")
        else:
            reason = f"persistent quota kept ({quotas})"
        set_quota = not (base_row.persist and base_row.quota == quota)
        persist = True
    else:
        quota, persist, set_quota = base_row.quota, base_row.persist, False
        whose = f"{renamed}'s" if renamed else "the lower-case row's"
        reason = (f"no persistent row: {whose} quota {quota} stays until the window ends, "
                  "then the default applies")
    return KeyMerge(target=target, target_row=target_row, sources=tuple(sources), now=now,
                    renamed=renamed, merged=merged, added=added, expiry=expiry,
                    used_before=used_before, used_after=used_after, quota=quota,
                    persist=persist, set_quota=set_quota, quota_reason=reason,
                    conflict=conflict)
