"""policy: which requests count, under which key, and how much."""

from __future__ import annotations

import pytest

from ratelimit_policyd.codec import PolicyDecoder
from ratelimit_policyd.model import Period
from ratelimit_policyd.policy import Countable, Limits, Skip, classify, is_over, make_key
from tests.fixtures_common import fixture_names, read_fixture


def attrs_of(name: str) -> dict[str, str]:
    (req,) = PolicyDecoder().feed(read_fixture(name))
    return req


# What each captured request must give with the default limits: (key, n) or a Skip.
EXPECTED: dict[str, tuple[str, int] | str] = {
    "rcpt-sasl-alice-1.txt": ("alice@example.com", 1),
    "rcpt-sasl-alice-3rcpt-1.txt": ("alice@example.com", 1),
    "rcpt-sasl-alice-3rcpt-2.txt": ("alice@example.com", 1),
    "rcpt-sasl-alice-3rcpt-3.txt": ("alice@example.com", 1),
    "rcpt-sasl-alice-2msgs-1.txt": ("alice@example.com", 1),
    "rcpt-sasl-alice-2msgs-2.txt": ("alice@example.com", 1),
    "rcpt-sasl-alice-sender-other.txt": ("alice@example.com", 1),
    "rcpt-sasl-bob-login-1.txt": ("bob@example.com", 1),
    "rcpt-sasl-carol-1.txt": ("carol@other.org", 1),
    "recipient-restrictions-sasl-alice-1.txt": ("alice@example.com", 1),
    "data-sasl-alice-1rcpt.txt": ("alice@example.com", 1),
    "data-sasl-alice-3rcpt.txt": ("alice@example.com", 3),
    "data-sasl-alice-2msgs-1.txt": ("alice@example.com", 1),
    "data-sasl-alice-2msgs-2.txt": ("alice@example.com", 1),
    "data-sasl-alice-bdat-2rcpt.txt": ("alice@example.com", 2),
    "data-sasl-bob-login-2rcpt.txt": ("bob@example.com", 2),
    "eod-sasl-alice-3rcpt.txt": ("alice@example.com", 3),
    "vrfy-sasl-alice.txt": Skip.STATE,
}


@pytest.mark.parametrize("name", fixture_names())
def test_every_captured_request(name: str) -> None:
    got = classify(attrs_of(name), Limits())
    want = EXPECTED.get(name, Skip.UNAUTHENTICATED)
    if isinstance(want, tuple):
        assert got == Countable(*want)
    else:
        assert got == want


def test_every_expectation_names_a_fixture() -> None:
    assert set(EXPECTED) <= set(fixture_names())


def test_count_states_select_the_stage() -> None:
    rcpt_only = Limits(count_states=frozenset({"RCPT"}))
    assert classify(attrs_of("data-sasl-alice-3rcpt.txt"), rcpt_only) == Skip.STATE
    assert classify(attrs_of("rcpt-sasl-alice-1.txt"), rcpt_only) == Countable(
        "alice@example.com", 1)
    data_only = Limits(count_states=frozenset({"DATA"}))
    assert classify(attrs_of("rcpt-sasl-alice-1.txt"), data_only) == Skip.STATE
    assert classify(attrs_of("eod-sasl-alice-3rcpt.txt"), data_only) == Skip.STATE


@pytest.mark.parametrize(("user", "key_type", "lower", "key"), [
    ("Alice@Example.COM", "email", True, "alice@example.com"),
    ("Alice@Example.COM", "email", False, "Alice@Example.COM"),
    ("Alice@Example.COM", "domain", True, "example.com"),
    ("a@b@Sub.Example.org", "domain", True, "sub.example.org"),
    ("localuser", "domain", True, "localuser"),
    ("localuser", "email", True, "localuser"),
])
def test_make_key(user: str, key_type: str, lower: bool, key: str) -> None:
    assert make_key(user, Limits(key_type=key_type, lowercase_keys=lower)) == key


@pytest.mark.parametrize("count", ["", "-1", "x", "1e3", "9999999999"])
def test_broken_recipient_count_is_not_counted(count: str) -> None:
    attrs = {"protocol_state": "DATA", "sasl_username": "a@b", "recipient_count": count}
    assert classify(attrs, Limits()) == Skip.BAD_COUNT


def test_key_longer_than_the_column_is_not_counted() -> None:
    attrs = {"protocol_state": "RCPT", "sasl_username": "x" * 250 + "@example.com"}
    assert classify(attrs, Limits()) == Skip.KEY_TOO_LONG
    assert classify(attrs, Limits(key_type="domain")) == Countable("example.com", 1)


def test_protocol_state_is_case_insensitive_and_missing_state_skips() -> None:
    assert classify({"protocol_state": "rcpt", "sasl_username": "a@b"}, Limits()) == \
        Countable("a@b", 1)
    assert classify({"sasl_username": "a@b"}, Limits()) == Skip.STATE


def test_over_quota_rule() -> None:
    assert not is_over(10, 10)
    assert is_over(11, 10)
    assert is_over(1, 0)  # quota 0 blocks
    assert not is_over(0, 0)


def test_over_quota_reply_names_the_period() -> None:
    assert Limits(period=Period.HOURLY).over_quota_reply == "471 hourly message quota exceeded"
    assert Limits(over_quota_action="DEFER slow down").over_quota_reply == "DEFER slow down"
