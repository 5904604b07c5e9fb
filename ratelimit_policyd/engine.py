"""The request path: one decoded Postfix request in, one encoded reply out.

Wires the pure ``policy`` rules to the ``cache`` and, on a miss, to ``storage`` (outside
the cache lock). Writes the Perl daemon's per-request log line. Never raises: any
unexpected error is logged and answered with DUNNO (fail open), so Postfix always gets
an answer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from ratelimit_policyd.cache import Charge, QuotaCache
from ratelimit_policyd.codec import encode_reply
from ratelimit_policyd.loader import MissLoader
from ratelimit_policyd.policy import Countable, Limits, Skip, classify
from ratelimit_policyd.stats import ThreadCounters
from ratelimit_policyd.storage.base import Storage, StorageError

log = logging.getLogger(__name__)
#: The per-request decision line goes to its own logger so operators can route it.
decisions = logging.getLogger("ratelimit_policyd.decisions")

DUNNO: Final = encode_reply("DUNNO")

#: After a failed read, misses go straight to ``on_db_error`` for this long instead of
#: each waiting for a connect timeout of its own.
DB_RETRY_AFTER: Final = 2.0


class Engine:
    """Decides requests. ``limits`` may be replaced at any time (reload)."""

    def __init__(self, limits: Limits, cache: QuotaCache, storage: Storage,
                 clock: Callable[[], float] = time.time,
                 decision_sink: Callable[[tuple[float, str]], None] | None = None) -> None:
        """``decision_sink`` takes ``(time, line)`` for each decision line (see
        ``logs.DecisionLog``); without one, lines go through ``logging`` directly."""
        self.cache = cache
        self._sink = decision_sink
        #: Reads the rows of missed keys in batches (``loader.MissLoader``); without
        #: one, each miss reads its row itself.
        self.loader: MissLoader | None = None
        self.log_decisions = True
        self.storage = storage
        self._clock = clock
        self._db_down_until = 0.0
        self.stats = ThreadCounters()
        self._count = self.stats.incr
        self.set_limits(limits)

    def set_limits(self, limits: Limits) -> None:
        # One attribute swap: request threads see either the old or the new settings.
        self._state = (limits, encode_reply(limits.over_quota_reply),
                       encode_reply(limits.defer_action) if limits.on_db_error == "defer"
                       else DUNNO)

    @property
    def limits(self) -> Limits:
        return self._state[0]

    def db_ok(self) -> None:
        """The flusher reached the database: misses may try it again."""
        self._db_down_until = 0.0

    def handle(self, attrs: dict[str, str]) -> bytes:
        try:
            return self._handle(attrs)
        except Exception:
            log.exception("internal error while deciding a request; answering DUNNO")
            self._count("error")
            return DUNNO

    def _handle(self, attrs: dict[str, str]) -> bytes:
        limits, over_reply, db_error_reply = self._state
        what = classify(attrs, limits)
        if not isinstance(what, Countable):
            if what in (Skip.KEY_TOO_LONG, Skip.BAD_COUNT):
                # Not what a sane Postfix sends: say why it is not counted (bounded text).
                user = attrs.get("sasl_username", "")
                log.warning("request not counted (%s), answered DUNNO: sasl_username=%.100r "
                            "(%d characters), recipient_count=%.20r", what, user, len(user),
                            attrs.get("recipient_count", ""))
            self._count("dunno")
            return DUNNO
        now = self._clock()
        cache = self.cache
        instance = attrs.get("instance")
        # A retried request carries the same instance, state and recipient.
        token = (instance, attrs.get("protocol_state"), attrs.get("recipient"), what.key) \
            if instance else None
        charge = cache.charge(what.key, what.n, now, token)
        if charge is None:
            charge = self._charge_miss(what.key, what.n, now, token)
        if not charge.loaded:
            reply = db_error_reply
            action = "db_error"
        elif charge.over:
            reply = over_reply
            action = "over_quota"
        else:
            reply = DUNNO
            action = "dunno"
        self._count(action)
        if self.log_decisions:
            # The Perl daemon's line, field for field (recipient_count is what was counted).
            get = attrs.get
            line = (f"{get('queue_id', '')}: client={get('client_name', '')}"
                    f"[{get('client_address', '')}], sasl_method={get('sasl_method', '')}, "
                    f"sasl_username={get('sasl_username', '')}, recipient_count={what.n}, "
                    f"curr_count={charge.used}/"
                    f"{'unlimited' if charge.quota is None else charge.quota}, "
                    f"status={charge.status}")
            if self._sink is not None:
                self._sink((now, line))
            else:
                decisions.info("%s", line)
        return reply

    def _charge_miss(self, key: str, n: int, now: float, token: object) -> Charge:
        """Read a missed key's row (outside the cache lock), then cache it and count.

        Caching and counting are one cache operation: with the cache at its cap, an
        entry cached first could be evicted by other misses before it is counted.
        """
        if now < self._db_down_until:
            return self.cache.charge_unloaded(key, n, now, token)
        try:
            if self.loader is not None:
                row = self.loader.load(key)  # batched with other misses
            else:
                row = self.storage.load([key]).get(key)
        except StorageError as exc:
            self._db_down_until = now + DB_RETRY_AFTER
            log.warning("database unavailable for %r (%s): answering per on_db_error and "
                        "counting in memory until it is back", key, exc)
            return self.cache.charge_unloaded(key, n, now, token)
        return self.cache.charge_loaded(key, row, n, now, token)
