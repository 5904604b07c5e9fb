"""The merge rule of ``migrate-keys`` as a pure function (the backends run it on the rows
they lock; tests/test_storage_contract.py checks what they write)."""

from __future__ import annotations

import pytest

from ratelimit_policyd.model import Row
from ratelimit_policyd.storage.keymerge import group_by_target, plan_merge

NOW = 1_000_000
LIVE, ENDED = NOW + 60, NOW - 60


def test_groups_by_the_key_the_daemon_counts() -> None:
    rows = [Row(s, 1, 0, LIVE, False) for s in
            ("b@X", "a@x", "A@x", "A@X", "Example.ORG", "ÄRGER@x", "jörg@x")]
    assert group_by_target(rows) == {"a@x": ["A@X", "A@x"], "b@x": ["b@X"],
                                     "example.org": ["Example.ORG"], "ärger@x": ["ÄRGER@x"]}


def test_rows_of_ended_windows_count_nothing_and_leave_the_target_alone() -> None:
    target = Row("a@x", 10, 4, ENDED, False)
    plan = plan_merge("a@x", target, [Row("A@x", 10, 9, ENDED, False)], NOW)
    assert (plan.used_before, plan.added, plan.used_after, plan.expiry) == (0, 0, 4, ENDED)


def test_the_latest_current_window_is_kept() -> None:
    # The Perl daemon's hourly expiry is an hour after the first count, not the hour's
    # end: two rows of the current window may end at different times.
    target = Row("a@x", 10, 1, LIVE, False)
    plan = plan_merge("a@x", target, [Row("A@x", 10, 2, LIVE + 30, False)], NOW)
    assert (plan.used_after, plan.expiry) == (3, LIVE + 30)


def test_one_persistent_row_agrees_with_itself() -> None:
    plan = plan_merge("a@x", Row("a@x", 1000, 0, LIVE, False),
                      [Row("A@x", 7, 0, LIVE, True)], NOW)
    assert (plan.quota, plan.persist, plan.set_quota, plan.conflict) == (7, True, True, False)
    same = plan_merge("a@x", Row("a@x", 7, 0, LIVE, True), [Row("A@x", 7, 0, LIVE, True)], NOW)
    assert not same.set_quota and not same.conflict


def test_nothing_to_merge_is_an_error() -> None:
    with pytest.raises(ValueError):
        plan_merge("a@x", None, [], NOW)


def test_an_unlimited_persistent_quota_is_the_least_restrictive() -> None:
    # A NULL quota (a hand-made nullable Perl column) is unlimited: a limited persistent
    # row wins over it, and it wins over nothing else.
    plan = plan_merge("a@x", Row("a@x", None, 0, LIVE, True),
                      [Row("A@x", 5, 0, LIVE, True)], NOW)
    assert (plan.quota, plan.conflict) == (5, True)
    alone = plan_merge("a@x", None, [Row("A@x", None, 1, LIVE, True),
                                     Row("A@X", 0, 1, LIVE, True)], NOW)
    assert (alone.renamed, alone.quota) == ("A@X", 0)
