"""Storage backends behind one factory: ``open_storage(url)``.

Parses the database URL and builds the backend it names. The MySQL backend (PyMySQL,
DBUtils) is imported only when a ``mysql://`` URL is used, so the SQLite default needs
nothing beyond the standard library. Sees only ``model`` and ``storage.base``.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

from ratelimit_policyd.storage.base import Storage, StorageError, TableNames

__all__ = [
    "DatabaseURL",
    "Storage",
    "StorageError",
    "TableNames",
    "URLError",
    "open_storage",
    "parse_url",
    "redact_url",
]

_MYSQL_SCHEMES: Final = ("mysql", "mariadb")
_MYSQL_QUERY_KEYS: Final = ("unix_socket", "charset")
_HOSTNAME: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]{0,252})")
_CHARSET: Final = re.compile(r"[A-Za-z0-9_]{1,32}")
_EXPECTED: Final = ("expected sqlite:///ABSOLUTE/PATH or "
                    "mysql://USER:PASSWORD@HOST[:PORT]/DATABASE")
#: How to write a password the URL cannot hold as it is.
_ENCODE_HINT: Final = ("a password with / ? # @ : must be percent-encoded (%2F %3F %23 %40 %3A) "
                       "or set in database.password or database.password_file, and an @ "
                       "after the host written %40")


class URLError(ValueError):
    """A database URL that cannot be used; the message shows it only redacted."""


@dataclass(frozen=True, slots=True)
class DatabaseURL:
    """A parsed, checked database URL (percent-decoded)."""

    scheme: str  # "sqlite" or "mysql" (mariadb:// is read as mysql)
    path: str = ""  # SQLite: the absolute file path
    user: str = ""
    password: str | None = field(default=None, repr=False)  # never in a log or traceback
    host: str = ""
    port: int | None = None
    database: str = ""
    unix_socket: str | None = None
    charset: str = "utf8mb4"


@dataclass(frozen=True, slots=True)
class _Split:
    """A URL cut into the parts that may hold a secret and those that cannot."""

    scheme: str
    slashes: bool  # "scheme://" rather than "scheme:"
    userinfo: str | None  # "user:password", raw; None without an @
    rest: str  # after the userinfo's @ (or the whole remainder): no secret in it


def _split(url: str) -> _Split:
    """The one rule that finds the password in a URL, used to parse and to redact.

    The userinfo runs up to the *last* @ (a password may contain one), as urllib's
    netloc parsing does; unlike urllib, a / ? or # before that @ does not end it, so that
    a password holding one is never taken for a host, port, path or query (and shown).
    ``scheme:///path`` (SQLite) has no userinfo, whatever its path holds.
    """
    scheme, _, remainder = url.partition(":")
    slashes = remainder.startswith("//")
    body = remainder[2:] if slashes else remainder
    if (slashes and body.startswith("/")) or "@" not in body:
        return _Split(scheme, slashes, None, body)
    userinfo, _, rest = body.rpartition("@")
    return _Split(scheme, slashes, userinfo, rest)


def redact_url(url: str) -> str:
    """``url`` without its password, for logs, ``print-config`` and error messages."""
    sp = _split(url)
    if not sp.slashes:
        # Not scheme://: no telling a user from a password, hide all before the @.
        return url if sp.userinfo is None else f"***@{sp.rest}"
    if sp.userinfo is None:
        host, sep, port = _authority(sp.rest).rpartition(":")
        if sep and not port.isdigit() and not port.endswith("]"):
            # "user:secret" with the @ and host forgotten reads as host:port.
            return f"{sp.scheme}://{host}:***{sp.rest[len(host) + 1 + len(port):]}"
        return url
    user, colon, _ = sp.userinfo.partition(":")
    return f"{sp.scheme}://{user}{':***' if colon else ''}@{sp.rest}"


def _authority(rest: str) -> str:
    """The host[:port] at the start of ``rest``."""
    return re.split(r"[/?#]", rest, maxsplit=1)[0]


def parse_url(url: str) -> DatabaseURL:
    """Check ``url`` completely and return its parts; URLError (message redacted) if
    it cannot be used. ``open_storage`` and the configuration check both use this."""
    sp = _split(url)
    shown = redact_url(url)
    scheme = sp.scheme.lower()
    if not sp.slashes or scheme not in ("sqlite", *_MYSQL_SCHEMES):
        raise URLError(f"unsupported database URL {shown!r}: {_EXPECTED}")
    if scheme == "sqlite":
        return _parse_sqlite(sp, shown)
    return _parse_mysql(sp, shown)


def _parse_sqlite(sp: _Split, shown: str) -> DatabaseURL:
    if sp.userinfo is not None or not sp.rest.startswith("/"):
        raise URLError(f"bad SQLite URL {shown!r}: use three slashes and an absolute path, "
                       "e.g. sqlite:///var/lib/ratelimit-policyd/ratelimit.sqlite3")
    parts = urlsplit(f"sqlite://{sp.rest}")
    if parts.query or parts.fragment:
        raise URLError(f"bad SQLite URL {shown!r}: no query or fragment is accepted")
    path = Path(unquote(parts.path))
    if not path.is_absolute() or path.name == "":
        raise URLError(f"bad SQLite URL {shown!r}: the path must be an absolute file path")
    # sqlite:////abs (a slash too many, common with f"sqlite:///{abs_path}") is /abs.
    return DatabaseURL("sqlite", path="/" + str(path).lstrip("/"))


def _parse_mysql(sp: _Split, shown: str) -> DatabaseURL:
    def bad(problem: str) -> URLError:
        return URLError(f"bad MySQL URL {shown!r}: {problem}")

    userinfo = sp.userinfo or ""
    if any(c in userinfo for c in "/?#"):
        raise bad(f"the user:password before the last @ holds a / ? or #; {_ENCODE_HINT}")
    raw_user, colon, raw_password = userinfo.partition(":")
    user = unquote(raw_user)
    if not user:
        raise bad("a user is required (mysql://USER:PASSWORD@HOST/DATABASE)")
    password = unquote(raw_password) if colon else None
    try:
        parts = urlsplit(f"//{sp.rest}")
        port = parts.port
    except ValueError:
        # Not urllib's message: it quotes the port, which may be part of a password.
        raise bad(f"the host or port cannot be read (a port is a number 1-65535); "
                  f"{_ENCODE_HINT}") from None
    if port == 0:
        raise bad("the port must be 1-65535")
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad("the host in [brackets] is not an IPv6 address") from None
    elif host and not _HOSTNAME.fullmatch(host):
        raise bad(f"not a host name: {host!r}")
    if not parts.path.startswith("/"):
        raise bad("name one database (mysql://USER:PASSWORD@HOST/DATABASE)")
    database = unquote(parts.path[1:])
    if not database or "/" in database or len(database) > 64:
        raise bad("name one database of 1 to 64 characters (mysql://USER@HOST/DATABASE)")
    if parts.fragment:
        raise bad(f"no fragment (#) is accepted; {_ENCODE_HINT}")
    try:
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise bad("malformed query string (?unix_socket=/PATH&charset=NAME)") from None
    unknown = sorted(set(query) - set(_MYSQL_QUERY_KEYS))
    if unknown:
        raise bad(f"unknown parameter(s) {', '.join(unknown)} "
                  f"(accepted: {', '.join(_MYSQL_QUERY_KEYS)})")
    unix_socket = query.get("unix_socket") or None
    if unix_socket is not None and not unix_socket.startswith("/"):
        raise bad("unix_socket must be an absolute path")
    charset = query.get("charset") or "utf8mb4"
    if not _CHARSET.fullmatch(charset) or not _known_charset(charset):
        raise bad(f"unknown MySQL charset {charset!r}")
    if not host and unix_socket is None:
        raise bad("a host or ?unix_socket=/PATH is required")
    return DatabaseURL("mysql", user=user, password=password, host=host, port=port,
                       database=database, unix_socket=unix_socket, charset=charset)


def _known_charset(name: str) -> bool:
    try:
        from pymysql.charset import charset_by_name
    except ImportError:  # no mysql extra: opening the database says so
        return True
    try:
        return charset_by_name(name) is not None
    except KeyError:
        return False


def open_storage(
    url: str,
    *,
    names: TableNames = TableNames(),  # noqa: B008 -- frozen, so one shared default is safe
    password: str | None = None,
    pool_size: int = 8,
    connect_timeout: float = 3.0,
    read_timeout: float = 5.0,
    create_schema: bool = False,
) -> Storage:
    """Open the database named by ``url``.

    * ``sqlite:///abs/path.sqlite3``: the file and its directory are created when
      missing, and so is the table (SQLite is the zero-setup default).
    * ``mysql://user[:password]@host[:port]/db[?unix_socket=/path&charset=utf8mb4]``
      (``mariadb://`` is accepted too): nothing is connected until first use, so the
      daemon starts while the database is down; the table is created only when
      ``create_schema`` is set (``init-db``), as the daemon's grants need not allow it.

    ``password``, when given, wins over one in the URL (so it can come from a file or
    the environment). URL parts are percent-decoded. A malformed URL raises URLError (a
    ValueError);
    a database failure while creating the schema raises StorageError.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size}")
    if connect_timeout <= 0 or read_timeout <= 0:
        raise ValueError("connect_timeout and read_timeout must be positive")
    db = parse_url(url)
    if db.scheme == "sqlite":
        return _open_sqlite(db, names, read_timeout, create_schema)
    return _open_mysql(db, names, password, pool_size, connect_timeout, read_timeout,
                       create_schema)


def _open_sqlite(db: DatabaseURL, names: TableNames, busy_timeout: float,
                 create: bool) -> Storage:
    from ratelimit_policyd.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(Path(db.path), names=names, busy_timeout=busy_timeout)
    try:
        if create or not storage.has_table():
            storage.init_schema()
    except BaseException:
        storage.close()
        raise
    return storage


def _open_mysql(
    db: DatabaseURL,
    names: TableNames,
    password: str | None,
    pool_size: int,
    connect_timeout: float,
    read_timeout: float,
    create: bool,
) -> Storage:
    from ratelimit_policyd.storage.mysql import MySQLStorage

    storage = MySQLStorage(
        host=db.host or "localhost",
        port=db.port or 3306,
        user=db.user,
        password=(db.password if password is None else password) or "",
        database=db.database,
        unix_socket=db.unix_socket,
        charset=db.charset,
        names=names,
        pool_size=pool_size,
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    if create:
        try:
            storage.init_schema()
        except BaseException:
            storage.close()
            raise
    return storage
