"""Settings: defaults < TOML config file < command-line flags, validated in one pass.

``load()`` returns frozen ``Settings`` or raises one ``ConfigError`` listing every problem
with its key (``limits.period: expected one of hourly, daily, weekly, monthly``), so a
bad config stops the start (or a reload) with a message an operator can act on.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Final

from ratelimit_policyd.codec import validate_action
from ratelimit_policyd.model import MAX_KEY_LENGTH, Period
from ratelimit_policyd.policy import (
    COUNTABLE_STATES,
    DEFAULT_DEFER_ACTION,
    DEFAULT_OVER_QUOTA_ACTION,
    Limits,
)
from ratelimit_policyd.server import parse_listen, parse_networks
from ratelimit_policyd.storage import URLError, parse_url
from ratelimit_policyd.storage import redact_url as redact_url  # for cli and lifecycle
from ratelimit_policyd.storage.base import TableNames
from ratelimit_policyd.window import Calendar, parse_week_start

DEFAULT_CONFIG_PATH: Final = "/etc/ratelimit-policyd/ratelimit-policyd.conf"
PASSWORD_ENV: Final = "RATELIMIT_POLICYD_DB_PASSWORD"
CONFIG_ENV: Final = "RATELIMIT_POLICYD_CONFIG"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
SYSLOG_FACILITIES: Final = ("mail", "daemon", "user", "local0", "local1", "local2", "local3",
                            "local4", "local5", "local6", "local7")


class ConfigError(Exception):
    """Every problem found in a configuration, one per line."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def default_state_dir() -> Path:
    """Where the embedded SQLite database lives by default."""
    # systemd's StateDirectory= announces the directory it made for the unit.
    announced = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if announced:
        return Path(announced)
    if os.geteuid() == 0:
        return Path("/var/lib/ratelimit-policyd")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "ratelimit-policyd"


def default_db_url() -> str:
    return f"sqlite://{default_state_dir() / 'ratelimit.sqlite3'}"


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: str = "127.0.0.1:10032"
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "::1")
    max_connections: int = 1000
    max_request_bytes: int = 64 * 1024
    idle_timeout: float = 600.0
    request_timeout: float = 30.0
    control_socket: str = ""


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    default_quota: int = 1000
    period: str = "daily"
    key_type: str = "email"
    lowercase_keys: bool = True
    count_states: tuple[str, ...] = ("RCPT", "DATA", "END-OF-MESSAGE")
    timezone: str = "local"
    week_start: str = "sunday"
    over_quota_action: str = DEFAULT_OVER_QUOTA_ACTION
    on_db_error: str = "dunno"
    defer_action: str = DEFAULT_DEFER_ACTION
    max_key_length: int = MAX_KEY_LENGTH


@dataclass(frozen=True, slots=True)
class DatabaseSettings:
    url: str = ""  # empty: SQLite in the state directory
    # Not in repr(): a settings object in a log line or a traceback must not show it
    # (the URL is redacted by __repr__ below).
    password: str = field(default="", repr=False)
    password_file: str = ""
    pool_size: int = 8
    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    table: str = "ratelimit"
    sender_column: str = "sender"
    quota_column: str = "quota"
    used_column: str = "used"
    expiry_column: str = "expiry"
    persist_column: str = "persist"
    updated_column: str = "updated"

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
                          if f.repr and f.name != "url")
        return f"DatabaseSettings(url={redact_url(self.url)!r}, {shown})"


@dataclass(frozen=True, slots=True)
class CacheSettings:
    flush_interval: float = 2.0
    idle_ttl: float = 300.0
    max_entries: int = 200_000
    shutdown_timeout: float = 20.0


@dataclass(frozen=True, slots=True)
class LogSettings:
    file: str = "-"
    level: str = "info"
    decisions: bool = True
    syslog: bool = False
    syslog_ident: str = "ratelimit-policyd"
    syslog_facility: str = "mail"
    syslog_address: str = "/dev/log"


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    pidfile: str = "/run/ratelimit-policyd/ratelimit-policyd.pid"
    user: str = ""
    group: str = ""
    state_dir: str = ""


@dataclass(frozen=True, slots=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    log: LogSettings = field(default_factory=LogSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    source: str = ""  # the config file it came from, if any

    # -- derived values -------------------------------------------------------------

    def db_url(self) -> str:
        return self.database.url or f"sqlite://{self.state_dir() / 'ratelimit.sqlite3'}"

    def state_dir(self) -> Path:
        return Path(self.daemon.state_dir) if self.daemon.state_dir else default_state_dir()

    def db_password(self) -> str | None:
        """From the config, else a password file, else the environment; None if unset."""
        if self.database.password:
            return self.database.password
        if self.database.password_file:
            return Path(self.database.password_file).read_text().strip()
        return os.environ.get(PASSWORD_ENV) or None

    def table_names(self) -> TableNames:
        d = self.database
        return TableNames(d.table, d.sender_column, d.quota_column, d.used_column,
                          d.expiry_column, d.persist_column, d.updated_column)

    def policy_limits(self) -> Limits:
        lim = self.limits
        return Limits(default_quota=lim.default_quota, period=Period(lim.period),
                      key_type=lim.key_type, lowercase_keys=lim.lowercase_keys,
                      count_states=frozenset(lim.count_states),
                      over_quota_action=lim.over_quota_action, on_db_error=lim.on_db_error,
                      defer_action=lim.defer_action, max_key_length=lim.max_key_length)

    def calendar(self) -> Calendar:
        return Calendar(Period(self.limits.period), self.limits.timezone,
                        parse_week_start(self.limits.week_start))

    def listen_address(self) -> tuple[str, int]:
        return parse_listen(self.server.listen)


_SECTIONS: Final[dict[str, type[Any]]] = {
    "server": ServerSettings,
    "limits": LimitsSettings,
    "database": DatabaseSettings,
    "cache": CacheSettings,
    "log": LogSettings,
    "daemon": DaemonSettings,
}


def _coerce(path: str, value: Any, default: Any, errors: list[str]) -> Any:
    """Check a TOML value against the type of its default."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        errors.append(f"{path}: expected true or false, got {value!r}")
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        errors.append(f"{path}: expected an integer, got {value!r}")
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        errors.append(f"{path}: expected a number of seconds, got {value!r}")
    elif isinstance(default, tuple):
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return tuple(value)
        errors.append(f"{path}: expected a list of strings, got {value!r}")
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        errors.append(f"{path}: expected a string, got {value!r}")
    return default


def _merge(base: Settings, data: Mapping[str, Any], errors: list[str], origin: str) -> Settings:
    sections: dict[str, Any] = {}
    for name, section in data.items():
        cls = _SECTIONS.get(name)
        if cls is None or not isinstance(section, dict):
            errors.append(f"{origin}{name}: unknown section (known: {', '.join(_SECTIONS)})")
            continue
        current = getattr(base, name)
        known = {f.name for f in fields(cls)}
        changes: dict[str, Any] = {}
        for key, value in section.items():
            if key not in known:
                errors.append(f"{origin}{name}.{key}: unknown setting")
                continue
            changes[key] = _coerce(f"{origin}{name}.{key}", value, getattr(current, key), errors)
        sections[name] = replace(current, **changes)
    return replace(base, **sections)


def _check(s: Settings, errors: list[str]) -> None:
    """Semantic validation of a merged configuration."""

    def bad(path: str, problem: str) -> None:
        errors.append(f"{path}: {problem}")

    def positive(path: str, value: float, minimum: float = 0.0) -> None:
        if value <= minimum:
            bad(path, f"must be greater than {minimum:g}, got {value!r}")

    try:
        parse_listen(s.server.listen)
    except ValueError as exc:
        bad("server.listen", str(exc))
    try:
        parse_networks(s.server.allowed_hosts)
    except ValueError as exc:
        bad("server.allowed_hosts", str(exc))
    positive("server.max_connections", s.server.max_connections)
    if s.server.max_request_bytes < 1024:
        bad("server.max_request_bytes", "must be at least 1024")
    positive("server.idle_timeout", s.server.idle_timeout)
    positive("server.request_timeout", s.server.request_timeout)

    lim = s.limits
    if lim.default_quota < 0:
        bad("limits.default_quota", f"must be 0 or more, got {lim.default_quota}")
    if lim.period not in {p.value for p in Period}:
        bad("limits.period", "expected one of hourly, daily, weekly, monthly, "
            f"got {lim.period!r}")
    if lim.key_type not in ("email", "domain"):
        bad("limits.key_type", f"expected email or domain, got {lim.key_type!r}")
    unknown = [st for st in lim.count_states if st not in COUNTABLE_STATES]
    if unknown or not lim.count_states:
        bad("limits.count_states", "expected a non-empty list of RCPT, DATA, END-OF-MESSAGE, "
            f"got {list(lim.count_states)!r}")
    try:
        parse_week_start(lim.week_start)
    except ValueError as exc:
        bad("limits.week_start", str(exc))
    try:
        Calendar(Period.DAILY, lim.timezone, 6)
    except ValueError as exc:
        bad("limits.timezone", str(exc))
    for path, action in (("limits.over_quota_action",
                          lim.over_quota_action.replace("{period}", "daily")),
                         ("limits.defer_action", lim.defer_action)):
        try:
            validate_action(action)
        except ValueError as exc:
            bad(path, str(exc))
    if lim.on_db_error not in ("dunno", "defer"):
        bad("limits.on_db_error", f"expected dunno or defer, got {lim.on_db_error!r}")
    if not 1 <= lim.max_key_length <= 4096:
        bad("limits.max_key_length", "must be between 1 and 4096")

    db = s.database
    if db.url:
        try:
            # The parser open_storage uses: what passes here opens (short of the
            # database being reachable), and errors never quote the password.
            parse_url(db.url)
        except URLError as exc:
            bad("database.url", str(exc))
    if db.password_file and not Path(db.password_file).is_file():
        bad("database.password_file", f"no such file: {db.password_file}")
    positive("database.pool_size", db.pool_size)
    positive("database.connect_timeout", db.connect_timeout)
    positive("database.read_timeout", db.read_timeout)
    for name in ("table", "sender_column", "quota_column", "used_column", "expiry_column",
                 "persist_column", "updated_column"):
        value = getattr(db, name)
        if not _IDENT.fullmatch(value):
            bad(f"database.{name}", f"not a plain SQL identifier: {value!r}")

    c = s.cache
    if not 0.05 <= c.flush_interval <= 3600:
        bad("cache.flush_interval",
            f"must be between 0.05 and 3600 seconds, got {c.flush_interval}")
    positive("cache.idle_ttl", c.idle_ttl)
    positive("cache.max_entries", c.max_entries, 99)
    positive("cache.shutdown_timeout", c.shutdown_timeout)

    lg = s.log
    if lg.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        bad("log.level", f"expected debug, info, warning or error, got {lg.level!r}")
    if lg.syslog_facility not in SYSLOG_FACILITIES:
        bad("log.syslog_facility", f"expected one of {', '.join(SYSLOG_FACILITIES)}")
    if lg.file not in ("-", "") and not Path(lg.file).is_absolute():
        bad("log.file", f"must be an absolute path, '-' (stderr) or '' (none), got {lg.file!r}")
    if lg.file == "" and not lg.syslog:
        bad("log.file", "'' (no log file) needs log.syslog = true, or nothing is logged")


def load(path: str | None = None, overrides: Mapping[str, Mapping[str, Any]] | None = None,
         *, must_exist: bool = True) -> Settings:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides`` (CLI flags)."""
    errors: list[str] = []
    settings = Settings()
    if path:
        p = Path(path)
        try:
            with p.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            if must_exist:
                raise ConfigError([f"{path}: config file not found"]) from None
            data = {}
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{path}: not valid TOML: {exc}"]) from None
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc}"]) from None
        settings = _merge(settings, data, errors, "")
        settings = replace(settings, source=str(p))
    if overrides:
        settings = _merge(settings, overrides, errors, "")
    _check(settings, errors)
    if errors:
        raise ConfigError(errors)
    return settings


def reload(settings: Settings, overrides: Mapping[str, Mapping[str, Any]] | None) -> Settings:
    """Re-read the file a running daemon was started with (flags still win)."""
    return load(settings.source or None, overrides)


def describe() -> list[tuple[str, Any]]:
    """Every setting with its default, for ``print-config`` and the docs."""
    out: list[tuple[str, Any]] = []
    defaults = Settings()
    for name in _SECTIONS:
        section = getattr(defaults, name)
        for f in fields(section):
            out.append((f"{name}.{f.name}", getattr(section, f.name)))
    return out

