"""Pure policy decisions: which requests count, under which key, and the reply text.

No I/O, no locks, no clock: the engine passes in what it needs. Imports only the
standard library and ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, NamedTuple

from ratelimit_policyd.model import MAX_KEY_LENGTH, Period

#: Protocol states that carry a count, and how it is computed.
RCPT: Final = "RCPT"
DATA: Final = "DATA"
END_OF_MESSAGE: Final = "END-OF-MESSAGE"
COUNTABLE_STATES: Final = frozenset({RCPT, DATA, END_OF_MESSAGE})

DEFAULT_OVER_QUOTA_ACTION: Final = "471 {period} message quota exceeded"
DEFAULT_DEFER_ACTION: Final = "451 4.3.0 Sender rate limit service temporarily unavailable"


@dataclass(frozen=True, slots=True)
class Limits:
    """The decision settings; replaced as a whole on reload, never mutated."""

    default_quota: int = 1000
    period: Period = Period.DAILY
    key_type: str = "email"  # "email" | "domain"
    lowercase_keys: bool = True
    count_states: frozenset[str] = field(default_factory=lambda: COUNTABLE_STATES)
    #: ``{period}`` is replaced by the period name (the Perl daemon's text).
    over_quota_action: str = DEFAULT_OVER_QUOTA_ACTION
    #: What an unknown key gets while the database cannot be read: "dunno" or "defer".
    on_db_error: str = "dunno"
    defer_action: str = DEFAULT_DEFER_ACTION
    max_key_length: int = MAX_KEY_LENGTH

    @property
    def over_quota_reply(self) -> str:
        return self.over_quota_action.replace("{period}", self.period.value)


class Countable(NamedTuple):
    """A request that counts: ``n`` recipients charged to ``key`` (built per request)."""

    key: str
    n: int


class Skip:
    """Why a request is not counted; the reply is DUNNO."""

    UNAUTHENTICATED: Final = "unauthenticated"
    STATE: Final = "state not counted"
    KEY_TOO_LONG: Final = "key too long"
    BAD_COUNT: Final = "bad recipient_count"


def make_key(username: str, limits: Limits) -> str:
    """The counting key for a SASL username (``key_type`` email or domain)."""
    if limits.lowercase_keys:
        username = username.lower()
    if limits.key_type == "domain":
        # The part after the last '@'; a username without '@' is its own key.
        at = username.rfind("@")
        if at >= 0:
            return username[at + 1 :]
    return username


def classify(attrs: dict[str, str], limits: Limits) -> Countable | str:
    """A ``Countable`` for a request that counts, else a ``Skip`` reason."""
    username = attrs.get("sasl_username")
    if not username:
        return Skip.UNAUTHENTICATED
    state = attrs.get("protocol_state", "").upper()
    if state not in limits.count_states:
        return Skip.STATE
    if state == RCPT:
        n = 1
    else:
        raw = attrs.get("recipient_count", "")
        # Postfix sends a decimal; anything else is a broken client, not a reason to
        # count zero silently or to crash the handler.
        if not raw.isdigit() or len(raw) > 9:
            return Skip.BAD_COUNT
        n = int(raw)
    key = make_key(username.strip(), limits)
    if not key or len(key) > limits.max_key_length:
        return Skip.KEY_TOO_LONG
    return Countable(key, n)


def is_over(used_after: int, quota: int | None) -> bool:
    """``used + n > quota`` is over quota; ``quota = 0`` therefore blocks the key, and
    ``None`` (a NULL quota) never does."""
    return quota is not None and used_after > quota
