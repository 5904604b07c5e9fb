"""Calendar windows: fixed dates worked out by hand, DST edge cases in real zones, a
brute-force definition checked against the implementation, and properties over 2000..2037.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from itertools import pairwise
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ratelimit_policyd.model import Period
from ratelimit_policyd.window import Calendar, parse_week_start

HOURLY, DAILY, WEEKLY, MONTHLY = Period.HOURLY, Period.DAILY, Period.WEEKLY, Period.MONTHLY
MONDAY, SUNDAY = 0, 6

ZONES = [
    "UTC",
    "Europe/Zurich",
    "America/New_York",
    "Australia/Lord_Howe",  # DST shifts by 30 minutes
    "Asia/Kolkata",  # +05:30, no DST
    "America/Santiago",  # DST changes at midnight: midnight skipped in September
    "America/Havana",  # midnight skipped in March and shown twice in November
]

T2000 = int(datetime.fromisoformat("2000-01-01T00:00:00+00:00").timestamp())
T2037 = int(datetime.fromisoformat("2037-12-31T23:59:59+00:00").timestamp())


def ts(text: str) -> int:
    """Unix time of an ISO 8601 time with an explicit UTC offset."""
    parsed = datetime.fromisoformat(text)
    assert parsed.utcoffset() is not None, text
    return int(parsed.timestamp())


def wall(t: int, zone: str) -> str:
    """Local time of ``t`` in ``zone`` with its offset, for readable assertions."""
    return datetime.fromtimestamp(t, ZoneInfo(zone)).isoformat()


def boundaries(cal: Calendar, after: float, count: int) -> list[int]:
    result = []
    t = after
    for _ in range(count):
        b = cal.next_boundary(t)
        result.append(b)
        t = b
    return result


def chain(zone: str, period: Period, start: str, count: int, week_start: int = SUNDAY) -> list[str]:
    """The next ``count`` boundaries after local time ``start`` (with offset), as local times."""
    cal = Calendar(period, zone, week_start)
    return [wall(b, zone) for b in boundaries(cal, ts(start), count)]


@contextmanager
def local_zone(tz: str | None) -> Iterator[None]:
    """Make ``tz`` the C library's local zone (TZ variable), restoring the old one after."""
    saved = os.environ.get("TZ")
    try:
        if tz is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = tz
        time.tzset()
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def is_window_start(local: datetime, period: Period, week_start: int) -> bool:
    """The definition of a window-start wall time, written from datetime fields."""
    if (local.minute, local.second) != (0, 0):
        return False
    if period is HOURLY:
        return True
    if local.hour != 0:
        return False
    if period is WEEKLY:
        return local.weekday() == week_start
    if period is MONTHLY:
        return local.day == 1
    return True


def is_boundary_by_definition(t: int, zone: ZoneInfo, period: Period, week_start: int) -> bool:
    """A boundary shows a window-start wall time, or is the first instant after a gap of
    the wall clock that swallowed one."""
    here = datetime.fromtimestamp(t, zone)
    if is_window_start(here.replace(tzinfo=None), period, week_start):
        return True
    before = datetime.fromtimestamp(t - 1, zone)
    shown_next = before.replace(tzinfo=None) + timedelta(seconds=1)
    skipped = here.replace(tzinfo=None) - shown_next
    if skipped <= timedelta(0):
        return False
    # Every window-start wall time is a whole minute; step through the skipped minutes.
    minute = shown_next.replace(second=0) + (
        timedelta(0) if shown_next.second == 0 else timedelta(minutes=1)
    )
    while minute <= here.replace(tzinfo=None):
        if is_window_start(minute, period, week_start):
            return True
        minute += timedelta(minutes=1)
    return False


# -- parse_week_start ------------------------------------------------------------------

DAY_SPELLINGS = {
    "monday": 0, "Mon": 0, "tuesday": 1, "tue": 1, "Wednesday": 2, "wed": 2, "thursday": 3,
    "THU": 3, "friday": 4, "fri": 4, "saturday": 5, "sat": 5, "sunday": 6, "Sun": 6,
    " sunday\n": 6,
}  # fmt: skip


@pytest.mark.parametrize(
    ("value", "expected"),
    [*DAY_SPELLINGS.items(), (0, 0), (6, 6), ("0", 0), ("6", 6)],
)
def test_parse_week_start_accepts_names_and_numbers(value: str | int, expected: int) -> None:
    assert parse_week_start(value) == expected


@pytest.mark.parametrize("value", ["", "su", "sundays", "funday", "7", "-1", 7, -1, True, "1.0"])
def test_parse_week_start_rejects_everything_else(value: str | int) -> None:
    with pytest.raises(ValueError, match="week start"):
        parse_week_start(value)


# -- construction ------------------------------------------------------------------------


BAD_ZONES = ["Mars/Olympus_Mons", "", "utc", "/etc/localtime", "../etc/passwd"]


@pytest.mark.parametrize("zone", BAD_ZONES)
def test_unknown_zone_is_a_value_error_naming_it(zone: str) -> None:
    with pytest.raises(ValueError, match="unknown time zone"):
        Calendar(DAILY, zone)


@pytest.mark.parametrize("week_start", [-1, 7, True])
def test_bad_week_start_is_a_value_error(week_start: int) -> None:
    with pytest.raises(ValueError, match="week start"):
        Calendar(WEEKLY, "UTC", week_start)


def test_period_may_be_given_as_its_string_value() -> None:
    cal = Calendar("daily", "UTC")  # type: ignore[arg-type]
    assert cal.period is DAILY
    assert cal.next_boundary(ts("2024-05-05T10:00:00+00:00")) == ts("2024-05-06T00:00:00+00:00")


# -- plain calendar arithmetic (UTC) -----------------------------------------------------


@pytest.mark.parametrize(
    ("period", "now", "start", "end"),
    [
        (HOURLY, "2024-05-05T10:59:59", "2024-05-05T10:00:00", "2024-05-05T11:00:00"),
        (HOURLY, "2024-12-31T23:30:00", "2024-12-31T23:00:00", "2025-01-01T00:00:00"),
        (DAILY, "2024-05-05T10:00:00", "2024-05-05T00:00:00", "2024-05-06T00:00:00"),
        (DAILY, "2024-02-28T12:00:00", "2024-02-28T00:00:00", "2024-02-29T00:00:00"),
        (DAILY, "2024-02-29T12:00:00", "2024-02-29T00:00:00", "2024-03-01T00:00:00"),
        (DAILY, "2023-02-28T12:00:00", "2023-02-28T00:00:00", "2023-03-01T00:00:00"),
        (DAILY, "2024-12-31T23:59:59", "2024-12-31T00:00:00", "2025-01-01T00:00:00"),
        (MONTHLY, "2024-01-31T23:59:59", "2024-01-01T00:00:00", "2024-02-01T00:00:00"),
        (MONTHLY, "2024-02-29T08:00:00", "2024-02-01T00:00:00", "2024-03-01T00:00:00"),
        (MONTHLY, "2023-02-15T08:00:00", "2023-02-01T00:00:00", "2023-03-01T00:00:00"),
        (MONTHLY, "2024-04-30T23:00:00", "2024-04-01T00:00:00", "2024-05-01T00:00:00"),
        (MONTHLY, "2024-12-31T23:59:59", "2024-12-01T00:00:00", "2025-01-01T00:00:00"),
        (MONTHLY, "2025-01-01T00:00:01", "2025-01-01T00:00:00", "2025-02-01T00:00:00"),
    ],
)
def test_utc_windows(period: Period, now: str, start: str, end: str) -> None:
    cal = Calendar(period, "UTC")
    assert cal.window_start(ts(now + "+00:00")) == ts(start + "+00:00")
    assert cal.next_boundary(ts(now + "+00:00")) == ts(end + "+00:00")


def test_months_have_their_own_lengths() -> None:
    cal = Calendar(MONTHLY, "UTC")
    ends = boundaries(cal, ts("2023-12-15T00:00:00+00:00"), 14)
    days = [(b - a) // 86400 for a, b in pairwise(ends)]
    #        Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec Jan  (2024 is a leap year)
    assert days == [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31, 31]


@pytest.mark.parametrize(
    ("week_start", "start", "end"),
    [
        # Wednesday 2024-01-03 lies in the week that crosses the year end.
        (SUNDAY, "2023-12-31T00:00:00", "2024-01-07T00:00:00"),
        (MONDAY, "2024-01-01T00:00:00", "2024-01-08T00:00:00"),
        (2, "2024-01-03T00:00:00", "2024-01-10T00:00:00"),  # on the boundary's own day
        (3, "2023-12-28T00:00:00", "2024-01-04T00:00:00"),
    ],
)
def test_weekly_windows_start_on_the_configured_day(week_start: int, start: str, end: str) -> None:
    cal = Calendar(WEEKLY, "UTC", week_start)
    now = ts("2024-01-03T15:00:00+00:00")
    assert cal.window_start(now) == ts(start + "+00:00")
    assert cal.next_boundary(now) == ts(end + "+00:00")


def test_weekly_default_is_sunday() -> None:
    cal = Calendar(WEEKLY, "UTC")
    b = cal.next_boundary(ts("2024-06-12T12:00:00+00:00"))
    assert datetime.fromtimestamp(b, ZoneInfo("UTC")).weekday() == SUNDAY


@pytest.mark.parametrize("period", list(Period))
@pytest.mark.parametrize("zone", ZONES)
def test_now_exactly_on_a_boundary(period: Period, zone: str) -> None:
    cal = Calendar(period, zone)
    b = cal.next_boundary(ts("2024-03-09T12:34:56+00:00"))
    assert cal.window_start(b) == b
    assert cal.next_boundary(b) > b
    assert cal.next_boundary(b - 0.5) == b  # fractional seconds just before
    assert cal.window_start(b - 0.5) < b
    assert cal.window_start(b + 0.5) == b
    assert cal.window_start(cal.next_boundary(b) - 1) == b


# -- DST and odd offsets ---------------------------------------------------------------


def test_zurich_days_of_23_and_25_hours() -> None:
    cal = Calendar(DAILY, "Europe/Zurich")
    spring = ts("2024-03-31T12:00:00+02:00")
    autumn = ts("2024-10-27T12:00:00+01:00")
    assert cal.next_boundary(spring) - cal.window_start(spring) == 23 * 3600
    assert cal.next_boundary(autumn) - cal.window_start(autumn) == 25 * 3600
    assert wall(cal.window_start(spring), "Europe/Zurich") == "2024-03-31T00:00:00+01:00"
    assert wall(cal.next_boundary(autumn), "Europe/Zurich") == "2024-10-28T00:00:00+01:00"


def test_zurich_hourly_across_both_changes() -> None:
    assert chain("Europe/Zurich", HOURLY, "2024-03-31T00:30:00+01:00", 3) == [
        "2024-03-31T01:00:00+01:00",
        "2024-03-31T03:00:00+02:00",  # 02:00 does not exist: one hour after 01:00
        "2024-03-31T04:00:00+02:00",
    ]
    assert chain("Europe/Zurich", HOURLY, "2024-10-27T01:30:00+02:00", 4) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",  # 02:00 is shown twice: both are boundaries
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]


def test_new_york_fall_back_hour_is_two_windows() -> None:
    cal = Calendar(HOURLY, "America/New_York")
    first = ts("2024-11-03T01:30:00-04:00")
    second = ts("2024-11-03T01:30:00-05:00")  # the same wall time an hour later
    assert cal.window_start(first) == ts("2024-11-03T01:00:00-04:00")
    assert cal.next_boundary(first) == ts("2024-11-03T01:00:00-05:00")
    assert cal.window_start(second) == ts("2024-11-03T01:00:00-05:00")
    assert cal.next_boundary(second) == ts("2024-11-03T02:00:00-05:00")


def test_new_york_spring_forward() -> None:
    assert chain("America/New_York", HOURLY, "2024-03-10T00:10:00-05:00", 3) == [
        "2024-03-10T01:00:00-05:00",
        "2024-03-10T03:00:00-04:00",
        "2024-03-10T04:00:00-04:00",
    ]
    cal = Calendar(DAILY, "America/New_York")
    assert cal.next_boundary(ts("2024-03-10T12:00:00-04:00")) == ts("2024-03-11T00:00:00-04:00")
    assert cal.window_start(ts("2024-03-10T12:00:00-04:00")) == ts("2024-03-10T00:00:00-05:00")


def test_lord_howe_half_hour_shifts() -> None:
    # October: 02:00 (+10:30) becomes 02:30 (+11). 02:00 is skipped, so the window
    # starting at 01:00 ends at the jump, half an hour of real time later.
    assert chain("Australia/Lord_Howe", HOURLY, "2024-10-06T00:30:00+10:30", 3) == [
        "2024-10-06T01:00:00+10:30",
        "2024-10-06T02:30:00+11:00",
        "2024-10-06T03:00:00+11:00",
    ]
    # April: 02:00 (+11) becomes 01:30 (+10:30). No whole hour repeats, so the window
    # starting at 01:00 lasts an hour and a half.
    assert chain("Australia/Lord_Howe", HOURLY, "2024-04-07T00:30:00+11:00", 3) == [
        "2024-04-07T01:00:00+11:00",
        "2024-04-07T02:00:00+10:30",
        "2024-04-07T03:00:00+10:30",
    ]
    daily = Calendar(DAILY, "Australia/Lord_Howe")
    spring = ts("2024-10-06T12:00:00+11:00")
    assert daily.next_boundary(spring) - daily.window_start(spring) == 23 * 3600 + 1800


def test_kolkata_half_hour_offset() -> None:
    hourly = Calendar(HOURLY, "Asia/Kolkata")
    now = ts("2024-07-01T10:15:00+00:00")  # 15:45 local
    assert hourly.window_start(now) == ts("2024-07-01T09:30:00+00:00")
    assert hourly.next_boundary(now) == ts("2024-07-01T10:30:00+00:00")
    daily = Calendar(DAILY, "Asia/Kolkata")
    assert daily.next_boundary(now) == ts("2024-07-01T18:30:00+00:00")
    monthly = Calendar(MONTHLY, "Asia/Kolkata")
    assert monthly.window_start(now) == ts("2024-06-30T18:30:00+00:00")


def test_santiago_missing_midnight() -> None:
    # 2024-09-08 00:00 (-04) does not exist: the clock goes from 23:59:59 to 01:00 (-03).
    assert chain("America/Santiago", DAILY, "2024-09-07T12:00:00-04:00", 2) == [
        "2024-09-08T01:00:00-03:00",
        "2024-09-09T00:00:00-03:00",
    ]
    cal = Calendar(DAILY, "America/Santiago")
    assert cal.window_start(ts("2024-09-08T12:00:00-03:00")) == ts("2024-09-08T01:00:00-03:00")
    # The hourly window before the jump ends at the jump as well.
    assert chain("America/Santiago", HOURLY, "2024-09-07T23:30:00-04:00", 2) == [
        "2024-09-08T01:00:00-03:00",
        "2024-09-08T02:00:00-03:00",
    ]


def test_santiago_repeated_hour_before_midnight() -> None:
    # 2024-04-07 00:00 (-03) becomes 2024-04-06 23:00 (-04): 23:00 is shown twice,
    # midnight once. The Saturday lasts 25 hours.
    assert chain("America/Santiago", HOURLY, "2024-04-06T22:30:00-03:00", 3) == [
        "2024-04-06T23:00:00-03:00",
        "2024-04-06T23:00:00-04:00",
        "2024-04-07T00:00:00-04:00",
    ]
    cal = Calendar(DAILY, "America/Santiago")
    saturday = ts("2024-04-06T12:00:00-03:00")
    assert cal.next_boundary(saturday) == ts("2024-04-07T00:00:00-04:00")
    assert cal.next_boundary(saturday) - cal.window_start(saturday) == 25 * 3600


def test_havana_midnight_missing_and_repeated() -> None:
    # March: midnight (-05) is skipped to 01:00 (-04).
    assert chain("America/Havana", DAILY, "2024-03-09T12:00:00-05:00", 2) == [
        "2024-03-10T01:00:00-04:00",
        "2024-03-11T00:00:00-04:00",
    ]
    # November: 01:00 (-04) is set back to 00:00 (-05), so midnight is shown twice.
    # Both are boundaries; the first window of the day is one hour long.
    assert chain("America/Havana", DAILY, "2024-11-02T12:00:00-04:00", 3) == [
        "2024-11-03T00:00:00-04:00",
        "2024-11-03T00:00:00-05:00",
        "2024-11-04T00:00:00-05:00",
    ]


def test_monthly_first_of_month_midnight_missing_or_repeated() -> None:
    # Paraguay started DST at midnight on Sunday 2023-10-01.
    assert chain("America/Asuncion", MONTHLY, "2023-09-15T12:00:00-04:00", 2) == [
        "2023-10-01T01:00:00-03:00",
        "2023-11-01T00:00:00-03:00",
    ]
    # Cuba ends DST at 01:00 -> 00:00 on Sunday 2026-11-01.
    assert chain("America/Havana", MONTHLY, "2026-10-15T12:00:00-04:00", 3) == [
        "2026-11-01T00:00:00-04:00",
        "2026-11-01T00:00:00-05:00",
        "2026-12-01T00:00:00-05:00",
    ]


def test_weekly_across_dst_change_in_the_week() -> None:
    # The week of the spring change in Zurich is 167 hours long, for both week starts.
    for week_start, first in ((SUNDAY, "2024-03-31"), (MONDAY, "2024-03-25")):
        cal = Calendar(WEEKLY, "Europe/Zurich", week_start)
        now = ts("2024-03-31T12:00:00+02:00")
        assert wall(cal.window_start(now), "Europe/Zurich")[:10] == first
        assert cal.next_boundary(now) - cal.window_start(now) == 167 * 3600


# -- the definition, checked minute by minute around real changes ----------------------

AROUND_CHANGES = [
    ("Europe/Zurich", "2024-03-30T12:00:00+01:00"),
    ("Europe/Zurich", "2024-10-26T12:00:00+02:00"),
    ("America/New_York", "2024-11-02T12:00:00-04:00"),
    ("Australia/Lord_Howe", "2024-04-06T12:00:00+11:00"),
    ("Australia/Lord_Howe", "2024-10-05T12:00:00+10:30"),
    ("America/Santiago", "2024-04-06T00:00:00-03:00"),
    ("America/Santiago", "2024-09-07T00:00:00-04:00"),
    ("America/Havana", "2024-03-09T12:00:00-05:00"),
    ("America/Havana", "2026-10-31T00:00:00-04:00"),
    ("America/Asuncion", "2023-09-30T00:00:00-04:00"),
]


@pytest.mark.parametrize("period", list(Period))
@pytest.mark.parametrize(("zone", "start"), AROUND_CHANGES)
def test_boundaries_match_the_definition_minute_by_minute(
    zone: str, start: str, period: Period
) -> None:
    # Offsets and changes of these zones are whole minutes, so every boundary is too.
    tz = ZoneInfo(zone)
    first, last = ts(start), ts(start) + 2 * 86400
    week_start = datetime.fromtimestamp(first + 86400, tz).weekday()  # a week start inside
    expected = [
        t for t in range(first, last, 60) if is_boundary_by_definition(t, tz, period, week_start)
    ]
    cal = Calendar(period, zone, week_start)
    found = [b for b in boundaries(cal, first - 1, len(expected) + 1) if b < last]
    assert [wall(b, zone) for b in found] == [wall(b, zone) for b in expected]
    if period is not MONTHLY:  # only two cases have a 1st of the month in their two days
        assert expected


# -- "local": the C library's zone -------------------------------------------------------


@pytest.mark.parametrize("period", list(Period))
@pytest.mark.parametrize("zone", ZONES)
def test_local_zone_follows_tz_variable(zone: str, period: Period) -> None:
    named = Calendar(period, zone)
    instants = range(ts("2024-01-01T00:00:00+00:00"), ts("2025-01-01T00:00:00+00:00"), 7919 * 7)
    with local_zone(zone):
        local = Calendar(period, "local")
        for now in instants:
            assert local.next_boundary(now) == named.next_boundary(now), wall(now, zone)
            assert local.window_start(now) == named.window_start(now), wall(now, zone)


def test_local_zone_understands_posix_rule_strings() -> None:
    # zoneinfo cannot load this; the C library can, and since 2007 it equals New York.
    named = Calendar(HOURLY, "America/New_York")
    with local_zone("EST5EDT,M3.2.0,M11.1.0"):
        local = Calendar(HOURLY, "local")
        start = ts("2024-11-02T23:30:00-04:00")
        assert boundaries(local, start, 6) == boundaries(named, start, 6)


def utc(text: str) -> int:
    return ts(text + "+00:00")


def test_jump_landing_exactly_on_a_window_start() -> None:
    # Rule strings make cases no real zone has had since 1970. Here the clock jumps
    # from 01:30 (+1) to 02:00 (+1:30): nothing is skipped, but the jump lands on 02:00.
    with local_zone("AAA-1BBB-1:30,M3.5.0/1:30,M10.5.0/3"):
        cal = Calendar(HOURLY, "local")
        assert boundaries(cal, utc("2024-03-30T23:40:00"), 3) == [
            utc("2024-03-31T00:00:00"),  # 01:00 AAA
            utc("2024-03-31T00:30:00"),  # 02:00 BBB, half an hour later
            utc("2024-03-31T01:30:00"),  # 03:00 BBB
        ]
        assert cal.window_start(utc("2024-03-31T00:30:00")) == utc("2024-03-31T00:30:00")
        assert cal.window_start(utc("2024-03-31T00:29:59")) == utc("2024-03-31T00:00:00")


def test_short_dst_inside_one_window_is_not_missed() -> None:
    # DST from Tuesday 2024-10-01 00:00 to Monday 2024-10-07 00:30: both changes fall in
    # one Monday-to-Monday week and cancel out, yet Monday 00:00 is shown twice (in DST,
    # then again after the clock goes back from 00:30 to Sunday 23:30).
    with local_zone("STD4DST,M10.1.2/0,M10.1.1/0:30"):
        cal = Calendar(WEEKLY, "local", MONDAY)
        assert boundaries(cal, utc("2024-09-30T03:00:00"), 4) == [
            utc("2024-09-30T04:00:00"),  # Monday 00:00 STD
            utc("2024-10-07T03:00:00"),  # Monday 00:00 DST
            utc("2024-10-07T04:00:00"),  # Monday 00:00 STD
            utc("2024-10-14T04:00:00"),
        ]
        assert cal.window_start(utc("2024-10-07T03:59:59")) == utc("2024-10-07T03:00:00")
        assert cal.window_start(utc("2024-10-06T12:00:00")) == utc("2024-09-30T04:00:00")


def test_local_zone_without_tz_is_etc_localtime() -> None:
    if not os.path.exists("/etc/localtime"):
        pytest.skip("no /etc/localtime on this system")
    with open("/etc/localtime", "rb") as file:
        system = ZoneInfo.from_file(file)
    with local_zone(None):
        local = Calendar(DAILY, "local")
        for now in range(ts("2024-03-01T00:00:00+00:00"), ts("2024-12-01T00:00:00+00:00"), 86399):
            b = local.next_boundary(now)
            assert datetime.fromtimestamp(b, system).time().isoformat() == "00:00:00"
            assert b - 27 * 3600 < now < b


# -- the cached window -------------------------------------------------------------------


def test_cache_does_not_leak_between_windows() -> None:
    cal = Calendar(DAILY, "Europe/Zurich")
    monday, tuesday = ts("2024-06-03T12:00:00+02:00"), ts("2024-06-04T12:00:00+02:00")
    for _ in range(3):
        assert cal.next_boundary(monday) == ts("2024-06-04T00:00:00+02:00")
        assert cal.window_start(tuesday) == ts("2024-06-04T00:00:00+02:00")
        assert cal.next_boundary(tuesday) == ts("2024-06-05T00:00:00+02:00")
        assert cal.window_start(monday) == ts("2024-06-03T00:00:00+02:00")


def test_shared_calendar_gives_right_answers_under_threads() -> None:
    cal = Calendar(HOURLY, "America/New_York")
    fresh = Calendar(HOURLY, "America/New_York")
    instants = list(range(ts("2024-11-02T20:00:00-04:00"), ts("2024-11-03T06:00:00-05:00"), 317))
    expected = {now: (fresh.window_start(now), fresh.next_boundary(now)) for now in instants}
    wrong: list[int] = []

    def worker(offset: int) -> None:
        for i in range(2000):
            now = instants[(i * 7 + offset) % len(instants)]
            if (cal.window_start(now), cal.next_boundary(now)) != expected[now]:
                wrong.append(now)

    threads = [threading.Thread(target=worker, args=(k * 13,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []


# -- properties over 2000..2037 ----------------------------------------------------------

#: Longest real duration of a window: its wall-clock length plus a DST shift.
LONGEST = {HOURLY: 2 * 3600, DAILY: 26 * 3600, WEEKLY: 7 * 86400 + 3600, MONTHLY: 31 * 86400 + 3600}


@settings(max_examples=400, deadline=None)
@given(
    now=st.floats(min_value=T2000, max_value=T2037, allow_nan=False),
    period=st.sampled_from(list(Period)),
    zone=st.sampled_from(ZONES),
    week_start=st.integers(0, 6),
)
def test_window_properties(now: float, period: Period, zone: str, week_start: int) -> None:
    cal = Calendar(period, zone, week_start)
    start, end = cal.window_start(now), cal.next_boundary(now)
    assert start <= now < end
    assert end - start <= LONGEST[period]
    assert cal.window_start(end) == end
    assert cal.next_boundary(end - 1) == end  # consecutive windows chain
    assert cal.next_boundary(start) == end
    assert cal.window_start(end - 1) == start  # nothing starts inside the window
    tz = ZoneInfo(zone)
    for b in (start, end):
        assert is_boundary_by_definition(b, tz, period, week_start), wall(b, zone)
        local = datetime.fromtimestamp(b, tz)
        if not is_window_start(local.replace(tzinfo=None), period, week_start):
            # Only where the window-start wall time did not exist, right after a jump.
            assert tz.utcoffset(local) > datetime.fromtimestamp(b - 1, tz).utcoffset()  # type: ignore[operator]


@settings(max_examples=150, deadline=None)
@given(
    now=st.integers(min_value=T2000, max_value=T2037),
    period=st.sampled_from(list(Period)),
    zone=st.sampled_from(ZONES),
)
def test_local_matches_named_zone(now: int, period: Period, zone: str) -> None:
    named = Calendar(period, zone)
    with local_zone(zone):
        local = Calendar(period, "local")
        assert local.window_start(now) == named.window_start(now)
        assert local.next_boundary(now) == named.next_boundary(now)
