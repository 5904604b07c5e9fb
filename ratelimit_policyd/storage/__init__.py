"""Storage backends behind one factory: ``open_storage(url)``.

Parses the database URL and builds the backend it names. The MySQL backend (PyMySQL,
DBUtils) is imported only when a ``mysql://`` URL is used, so the SQLite default needs
nothing beyond the standard library. Sees only ``model`` and ``storage.base``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from ratelimit_policyd.storage.base import Storage, StorageError, TableNames

__all__ = ["Storage", "StorageError", "TableNames", "open_storage"]

_MYSQL_SCHEMES = ("mysql", "mariadb")
_MYSQL_QUERY_KEYS = ("unix_socket", "charset")


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
    the environment). URL parts are percent-decoded. A malformed URL raises ValueError;
    a database failure while creating the schema raises StorageError.
    """
    if pool_size < 1:
        raise ValueError(f"pool_size must be at least 1, not {pool_size}")
    if connect_timeout <= 0 or read_timeout <= 0:
        raise ValueError("connect_timeout and read_timeout must be positive")
    try:
        parts = urlsplit(url)
        _ = parts.port  # parses the port: a bad one raises here
    except ValueError as exc:
        # Not echoing the URL: it may hold a password.
        raise ValueError(f"malformed database URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "sqlite":
        return _open_sqlite(url, names, read_timeout, create_schema)
    if scheme in _MYSQL_SCHEMES:
        return _open_mysql(
            url, names, password, pool_size, connect_timeout, read_timeout, create_schema
        )
    raise ValueError(
        f"unsupported database URL {_redact(url)!r}: expected sqlite:///path/to/file.sqlite3 "
        "or mysql://user:password@host:port/database"
    )


def _open_sqlite(url: str, names: TableNames, busy_timeout: float, create: bool) -> Storage:
    parts = urlsplit(url)
    if parts.netloc:
        raise ValueError(
            f"bad SQLite URL {url!r}: use three slashes and an absolute path, "
            "e.g. sqlite:///var/lib/ratelimit-policyd/ratelimit.sqlite3"
        )
    if parts.query or parts.fragment:
        raise ValueError(f"bad SQLite URL {url!r}: no query or fragment is accepted")
    path = Path(unquote(parts.path))
    if not path.is_absolute() or path.name == "":
        raise ValueError(f"bad SQLite URL {url!r}: the path must be an absolute file path")

    from ratelimit_policyd.storage.sqlite import SQLiteStorage

    storage = SQLiteStorage(path, names=names, busy_timeout=busy_timeout)
    try:
        if create or not storage.has_table():
            storage.init_schema()
    except BaseException:
        storage.close()
        raise
    return storage


def _open_mysql(
    url: str,
    names: TableNames,
    password: str | None,
    pool_size: int,
    connect_timeout: float,
    read_timeout: float,
    create: bool,
) -> Storage:
    parts = urlsplit(url)
    shown = _redact(url)
    port = parts.port
    if port == 0:
        raise ValueError(f"bad MySQL URL {shown!r}: the port must be 1-65535")
    user = unquote(parts.username or "")
    if not user:
        raise ValueError(f"bad MySQL URL {shown!r}: a user is required (mysql://user@host/db)")
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError(f"bad MySQL URL {shown!r}: name one database (mysql://user@host/db)")
    if parts.fragment:
        raise ValueError(f"bad MySQL URL {shown!r}: no fragment is accepted")
    try:
        query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True))
    except ValueError:
        raise ValueError(f"bad MySQL URL {shown!r}: malformed query string") from None
    unknown = sorted(set(query) - set(_MYSQL_QUERY_KEYS))
    if unknown:
        raise ValueError(
            f"bad MySQL URL {shown!r}: unknown parameter(s) {', '.join(unknown)} "
            f"(accepted: {', '.join(_MYSQL_QUERY_KEYS)})"
        )
    unix_socket = query.get("unix_socket") or None
    host = parts.hostname or ""
    if not host and unix_socket is None:
        raise ValueError(f"bad MySQL URL {shown!r}: a host or ?unix_socket=/path is required")
    if password is None and parts.password is not None:
        password = unquote(parts.password)

    from ratelimit_policyd.storage.mysql import MySQLStorage

    storage = MySQLStorage(
        host=host or "localhost",
        port=port or 3306,
        user=user,
        password=password or "",
        database=database,
        unix_socket=unix_socket,
        charset=query.get("charset") or "utf8mb4",
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


def _redact(url: str) -> str:
    """The URL without its password, for error messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
