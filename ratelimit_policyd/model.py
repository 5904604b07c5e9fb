"""Value objects shared by every layer.

Pure data: no I/O, no locks. ``storage`` sees only this module; ``codec``, ``policy``,
``window`` and ``cache`` import only the standard library and each other.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final, NamedTuple

#: Longest key the Perl daemon's table can hold (``sender VARCHAR(255)``).
MAX_KEY_LENGTH: Final = 255

class Period(StrEnum):
    """Length of the counting window; windows are aligned to the calendar."""

    HOURLY = "hourly"
    DAILY = "daily"
    WEEKLY = "weekly"
    MONTHLY = "monthly"

class Row(NamedTuple):
    """One row of the quota table as the database holds it.

    ``expiry`` is the Unix time at which ``used`` restarts at 0 (0 when the Perl
    daemon left it NULL). ``persist`` keeps ``quota`` across resets.

    A hand-made table of the Perl daemon may have nullable columns; NULLs read as that
    daemon meant them: ``quota`` None is unlimited (its lookup, ``quota > 0``, never
    found such a row, so it never refused nor reset it), ``used`` NULL is 0, ``persist``
    NULL is false, ``expiry`` NULL is 0 (expired).
    """

    sender: str
    quota: int | None  # None: unlimited
    used: int
    expiry: int
    persist: bool

    # NamedTuples, not frozen dataclasses: the flusher builds one per key and row every
    # round, and a frozen dataclass costs three times as much to construct.

class Delta(NamedTuple):
    """Counts to add to one key, all made inside the window ending at ``expiry``.

    Applied by the storage as one atomic upsert:

    * no row: insert ``(sender, quota=default_quota, used=n, expiry)``;
    * row whose ``expiry`` is older than this one (its window ended before these
      counts were made): reset ``used = n``, ``expiry = expiry``, and
      ``quota = default_quota`` unless ``persist``;
    * otherwise: ``used = used + n`` (never an absolute value read earlier).

    ``expiry`` of the row only ever moves forward, so a reset happens once even when
    several daemons share the table.
    """

    sender: str
    n: int
    expiry: int


class FlushId(NamedTuple):
    """Names one write in the flush log table: ``source`` (a daemon's random id, or a
    spool section's) and its sequence number there.

    The write records ``(source, seq)`` in the same transaction as its counts, so the
    row says afterwards whether they committed: they did when the row holds ``seq`` or
    more. That is how a write whose COMMIT went unanswered, or spooled counts a crash
    may already have written, are counted exactly once.
    """

    source: str
    seq: int
