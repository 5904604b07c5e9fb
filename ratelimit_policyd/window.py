"""Calendar-aligned counting windows: where the current window started and when it ends.

Pure arithmetic on Unix seconds in one configured time zone (an IANA zone or the C
library's local zone); no I/O besides reading zone data once, and no locks.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import date, datetime
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ratelimit_policyd.model import Period

__all__ = ["Calendar", "parse_week_start"]

_HOUR: Final = 3600
_DAY: Final = 86400
_WEEK: Final = 7 * _DAY
#: 1970-01-01 was a Thursday (Monday = 0).
_EPOCH_WEEKDAY: Final = 3
_EPOCH_ORDINAL: Final = date(1970, 1, 1).toordinal()

#: Offset changes are searched for by sampling the offset at this stride and bisecting.
#: That is exact as long as two changes of a zone's UTC offset are more than a stride
#: apart; the closest pair in tzdata since 1970 is a week apart (Brazil, October 2000).
_STRIDE: Final = _DAY

_DAY_NAMES: Final = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")

#: (start, end) of a window: ``start <= now < end``. The first value never matches.
_Window = tuple[int, int]
_NO_WINDOW: Final[_Window] = (0, 0)


def parse_week_start(value: str | int) -> int:
    """Day a weekly window starts on, 0 = Monday .. 6 = Sunday.

    Accepts an integer 0..6 (also as a string) or an English day name, full or
    abbreviated to three letters, in any case. Raises ``ValueError`` otherwise.
    """
    if isinstance(value, bool):  # bool is an int, but True/False is never a day
        raise ValueError(f"invalid week start {value!r}: expected a day name or 0..6")
    if isinstance(value, int):
        day = value
    else:
        text = value.strip().lower()
        if text.isdecimal():
            day = int(text)
        else:
            for index, name in enumerate(_DAY_NAMES):
                if text in (name, name[:3]):
                    return index
            raise ValueError(
                f"invalid week start {value!r}: expected a day name such as 'sunday' or 'mon',"
                " or 0..6 (0 = Monday)"
            )
    if not 0 <= day <= 6:
        raise ValueError(f"invalid week start {value!r}: day numbers are 0..6 (0 = Monday)")
    return day


def _local_offset(t: int) -> int:
    # The C library's view of the local zone (TZ, else /etc/localtime), including
    # POSIX TZ rule strings that zoneinfo cannot load.
    return time.localtime(t).tm_gmtoff


def _utc_offset(t: int) -> int:
    return 0


def _zone_offset_function(name: str) -> Callable[[int], int]:
    if name == "local":
        return _local_offset
    if name == "UTC":  # no zone data needed, and the common case is the fastest
        return _utc_offset
    try:
        zone = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise ValueError(
            f"unknown time zone {name!r}: expected 'local', 'UTC' or an IANA zone name"
            " such as 'Europe/Zurich'"
        ) from exc

    def offset(t: int) -> int:
        delta = datetime.fromtimestamp(t, zone).utcoffset()
        assert delta is not None  # a ZoneInfo always knows its offset
        return delta.days * _DAY + delta.seconds

    return offset


class Calendar:
    """Window boundaries for one configuration. Immutable; cheap to call from many threads.

    A boundary is an instant at which the local wall clock shows the start of a window
    (minute 0 of an hour; midnight; midnight of ``week_start``; midnight of the 1st).
    A wall time shown twice (the clock is set back) gives two boundaries, so a window
    never spans more wall-clock time than its period. A wall time that is skipped (the
    clock is set forward over it) gives a boundary at the first instant after the gap.
    """

    __slots__ = ("_offset", "_period", "_timezone", "_week_start", "_window")

    def __init__(self, period: Period, timezone: str = "local", week_start: int = 6) -> None:
        self._period = Period(period)
        if isinstance(week_start, bool) or not isinstance(week_start, int):
            raise ValueError(f"invalid week start {week_start!r}: expected 0..6 (0 = Monday)")
        if not 0 <= week_start <= 6:
            raise ValueError(f"invalid week start {week_start!r}: expected 0..6 (0 = Monday)")
        self._week_start = week_start
        self._timezone = timezone
        self._offset = _zone_offset_function(timezone)
        # The last window computed. Replaced as a whole by one attribute store, so a
        # reader in another thread sees either the old or the new pair, never a mix.
        self._window: _Window = _NO_WINDOW

    @property
    def period(self) -> Period:
        return self._period

    @property
    def timezone(self) -> str:
        return self._timezone

    @property
    def week_start(self) -> int:
        return self._week_start

    def __repr__(self) -> str:
        return (
            f"Calendar(period={self._period.value!r}, timezone={self._timezone!r},"
            f" week_start={self._week_start})"
        )

    def next_boundary(self, now: float) -> int:
        """The first window boundary strictly after ``now`` (Unix seconds)."""
        return self._current(now)[1]

    def window_start(self, now: float) -> int:
        """The last window boundary at or before ``now``: the start of the current window."""
        return self._current(now)[0]

    def _current(self, now: float) -> _Window:
        window = self._window
        if window[0] <= now < window[1]:
            return window
        # Boundaries are whole seconds, so comparing with the second ``now`` falls in
        # is the same as comparing with ``now``.
        second = int(now // 1)
        window = (self._start_at_or_before(second), self._boundary_after(second))
        self._window = window
        return window

    # -- wall-clock arithmetic ---------------------------------------------------------
    # A wall time is the local date and time as seconds since 1970-01-01 00:00 *local*,
    # i.e. ``t + offset(t)``; on it the calendar is plain integer arithmetic.

    def _wall_floor(self, wall: int) -> int:
        """The last window-start wall time at or before ``wall``."""
        period = self._period
        if period is Period.HOURLY:
            return wall - wall % _HOUR
        day = wall // _DAY
        if period is Period.DAILY:
            return day * _DAY
        if period is Period.WEEKLY:
            back = (day + _EPOCH_WEEKDAY - self._week_start) % 7
            return (day - back) * _DAY
        first = date.fromordinal(_EPOCH_ORDINAL + day).replace(day=1)
        return (first.toordinal() - _EPOCH_ORDINAL) * _DAY

    def _wall_after(self, wall: int) -> int:
        """The first window-start wall time strictly after ``wall``."""
        floor = self._wall_floor(wall)
        period = self._period
        if period is Period.HOURLY:
            return floor + _HOUR
        if period is Period.DAILY:
            return floor + _DAY
        if period is Period.WEEKLY:
            return floor + _WEEK
        first = date.fromordinal(_EPOCH_ORDINAL + floor // _DAY)
        if first.month == 12:
            following = first.replace(year=first.year + 1, month=1)
        else:
            following = first.replace(month=first.month + 1)
        return (following.toordinal() - _EPOCH_ORDINAL) * _DAY

    # -- offset changes ----------------------------------------------------------------

    def _first_change(self, lo: int, hi: int, offset: int) -> int | None:
        """The first instant in ``(lo, hi]`` whose UTC offset is not ``offset``.

        The offset at ``lo`` is ``offset``. None when it holds throughout.
        """
        offset_at = self._offset
        a = lo
        while a < hi:
            b = min(a + _STRIDE, hi)
            if offset_at(b) != offset:
                while b - a > 1:  # invariant: offset_at(a) == offset != offset_at(b)
                    middle = (a + b) // 2
                    if offset_at(middle) == offset:
                        a = middle
                    else:
                        b = middle
                return b
            a = b
        return None

    def _run_start(self, lo: int, hi: int, offset: int) -> int | None:
        """The earliest instant in ``(lo, hi]`` from which the offset is ``offset`` up to ``hi``.

        The offset at ``hi`` is ``offset``. None when it holds on all of ``[lo, hi]``.
        """
        offset_at = self._offset
        b = hi
        while b > lo:
            a = max(b - _STRIDE, lo)
            if offset_at(a) != offset:
                while b - a > 1:  # invariant: offset_at(a) != offset == offset_at(b)
                    middle = (a + b) // 2
                    if offset_at(middle) == offset:
                        b = middle
                    else:
                        a = middle
                return b
            b = a
        return None

    # -- boundaries --------------------------------------------------------------------
    # Between two offset changes the wall clock runs in step with absolute time, so the
    # next (previous) boundary is found from the wall time alone; an offset change in
    # between is located and the search continues from it. Each step moves past one
    # change, so the loops run once or twice in practice.

    def _boundary_after(self, t: int) -> int:
        offset_at = self._offset
        offset = offset_at(t)
        while True:
            wall = self._wall_after(t + offset)
            candidate = wall - offset
            change = self._first_change(t, candidate, offset)
            if change is None:
                return candidate
            new_offset = offset_at(change)
            if new_offset > offset:
                # The clock jumps from change + offset to change + new_offset. ``wall`` is
                # the first window start at or after change + offset (candidate >= change),
                # so a window start is skipped or landed on exactly when it is in the jump.
                if wall <= change + new_offset:
                    return change
            elif self._wall_floor(change + new_offset) == change + new_offset:
                return change  # set back onto a window start: it is shown a second time
            t, offset = change, new_offset

    def _start_at_or_before(self, t: int) -> int:
        offset_at = self._offset
        offset = offset_at(t)
        while True:
            wall = self._wall_floor(t + offset)
            candidate = wall - offset
            change = self._run_start(candidate, t, offset)
            if change is None:
                return candidate
            old_offset = offset_at(change - 1)
            # ``wall`` is the last window start before change + offset (candidate < change).
            # When the clock jumped forward over it, the window started at the jump. (A
            # jump back cannot land on a window start here: ``wall`` would be later.)
            if old_offset < offset and wall >= change + old_offset:
                return change
            t, offset = change - 1, old_offset
