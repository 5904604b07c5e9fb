"""Private MariaDB servers for the tests; the system server on 3306 is never touched.

``mariadb`` (session): one server on a free loopback port and a unix socket in a temp
dir. ``private_mariadb`` (function): a factory of separate servers for tests that stop,
pause or restart their database. ``mysql_url``: a fresh database with the shipped schema
and a user holding only the Perl daemon's grants. Without the binaries the tests are
skipped, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pymysql
import pytest
from pymysql.constants import CLIENT

#: The schema the tests apply: the file operators apply, not a copy of it.
SCHEMA_FILE = Path(__file__).resolve().parent.parent / "sql" / "mysql" / "001_ratelimit.sql"

#: The grants of the Perl daemon's documentation, and all our daemon may need.
PERL_GRANTS = "SELECT, INSERT, UPDATE, DELETE"

_SERVER_NAMES = ("mariadbd", "mysqld")
_INSTALL_NAMES = ("mariadb-install-db", "mysql_install_db")
_SEARCH_DIRS = ("/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin")

# Options that make a throwaway server start in well under a second: small buffers and
# logs, no binary log, no fsync per commit, no name lookups. Durability is not wanted.
_SERVER_OPTIONS = (
    "--bind-address=127.0.0.1",
    "--user=root",  # the tests run as root; mariadbd refuses root without this
    "--skip-log-bin",
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=64M",
    "--innodb-log-file-size=8M",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--innodb-use-native-aio=0",  # io_uring/aio may be unavailable in containers
    "--character-set-server=utf8mb4",
    "--max-connections=200",
)


def _find(names: tuple[str, ...]) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
        for directory in _SEARCH_DIRS:
            candidate = Path(directory) / name
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def binaries() -> tuple[str, str] | str:
    """(mariadbd, mariadb-install-db), or the reason they cannot be used."""
    server, install = _find(_SERVER_NAMES), _find(_INSTALL_NAMES)
    if server is None or install is None:
        return (
            "MariaDB server binaries not found (need mariadbd and mariadb-install-db; "
            "Debian: apt-get install mariadb-server)"
        )
    return server, install


def unavailable(reason: str) -> None:
    """Skip, or fail when CI=true: the MySQL tests must never be skipped silently in CI."""
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{reason} -- CI=true, so the MySQL tests must run", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent() -> None:  # pragma: no cover -- runs in the child
    """Kill the server when the test process dies (a killed pytest leaves no orphan)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class MariaDB:
    """One private mariadbd: datadir and socket in a temp dir, port on 127.0.0.1."""

    host = "127.0.0.1"

    def __init__(self, server: str, datadir: Path, rundir: Path) -> None:
        self._server = server
        self.datadir = datadir
        self.rundir = rundir
        self.socket = str(rundir / "mysqld.sock")
        self.log = rundir / "error.log"
        self.port = free_port()
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False

    # -- life cycle ------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections (or raise)."""
        if self.is_running():
            return
        for _attempt in range(3):
            if self._spawn_and_wait(timeout):
                return
            # Most likely another process took the free port between our probe and
            # the server's bind: try another one.
            self.port = free_port()
        raise RuntimeError(f"mariadbd did not start; see {self.log}:\n{self._log_tail()}")

    def _spawn_and_wait(self, timeout: float) -> bool:
        command = [
            self._server,
            "--no-defaults",  # must come first
            f"--datadir={self.datadir}",
            f"--socket={self.socket}",
            f"--port={self.port}",
            f"--pid-file={self.rundir / 'mariadbd.pid'}",
            f"--log-error={self.log}",
            f"--tmpdir={self.rundir}",
            *_SERVER_OPTIONS,
        ]
        with open(self.log, "ab") as log:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # PDEATHSIG follows the thread that forks, not the process: only tie the
                # server to the main thread, which lives as long as the test run.
                preexec_fn=_die_with_parent
                if sys.platform == "linux" and threading.current_thread() is threading.main_thread()
                else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if not self._accepting():
                time.sleep(0.05)  # connect-retry until the deadline
                continue
            try:
                # Ready means: answers on the socket AND on the TCP port the URLs use.
                self.connect(connect_timeout=1).close()
                self.connect(connect_timeout=1, tcp=True).close()
                return True
            except pymysql.err.OperationalError:
                time.sleep(0.05)  # connect-retry until the deadline
        self.stop()
        raise RuntimeError(f"mariadbd not ready after {timeout}s; see {self.log}")

    def _accepting(self) -> bool:
        """Whether the unix socket takes connections yet.

        Probed with a plain socket first: PyMySQL leaks its socket object when a unix
        socket connect fails, which would surface as a ResourceWarning (an error here).
        """
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            try:
                probe.connect(self.socket)
            except OSError:
                return False
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Shut the server down cleanly (SIGTERM), killing it after ``timeout``."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._paused:
            proc.send_signal(signal.SIGCONT)
            self._paused = False
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def discard(self) -> None:
        """Stop, and delete the datadir (26 MB a copy); the error log stays for reading."""
        self.stop()
        shutil.rmtree(self.datadir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again, on the same port (unless another process took it)."""
        self.stop()
        self.start()

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung server)."""
        assert self._proc is not None and self.is_running(), "server not running"
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._proc is not None, "server not running"
        self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    # -- access ----------------------------------------------------------------------

    def url(self, db: str, user: str = "root", password: str = "") -> str:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
        return f"mysql://{auth}@{self.host}:{self.port}/{quote(db, safe='')}"

    def connect(
        self, db: str | None = None, *, connect_timeout: float = 10, tcp: bool = False
    ) -> pymysql.connections.Connection[Any]:
        """A root connection (autocommit, multi-statement) for test setup and checks."""
        where: dict[str, Any] = (
            {"host": self.host, "port": self.port} if tcp else {"unix_socket": self.socket}
        )
        return pymysql.connect(
            **where,
            user="root",
            database=db,
            autocommit=True,
            charset="utf8mb4",
            connect_timeout=connect_timeout,
            read_timeout=60,
            client_flag=CLIENT.MULTI_STATEMENTS,
        )

    def execute(self, sql: str, db: str | None = None, args: Any = None) -> list[tuple[Any, ...]]:
        """Run SQL (one statement or a script) as root; the rows of the last result."""
        con = self.connect(db)
        try:
            with con.cursor() as cur:
                cur.execute(sql, args)
                rows = list(cur.fetchall())
                while cur.nextset():
                    rows = list(cur.fetchall())
                return rows
        finally:
            con.close()

    def create_database(self, name: str) -> None:
        self.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")

    def apply_schema(self, db: str, path: Path | None = None) -> None:
        """Apply a shipped SQL file to ``db``, as an operator would (default: every
        file of sql/mysql/, in order)."""
        for file in [path] if path is not None else sorted(SCHEMA_FILE.parent.glob("*.sql")):
            self.execute(file.read_text(encoding="utf-8"), db=db)

    def create_user(self, db: str, grants: str = PERL_GRANTS) -> tuple[str, str]:
        """A user with ``grants`` on ``db``.* only; returns (user, password)."""
        user, password = f"u_{secrets.token_hex(6)}", secrets.token_hex(12)
        self.execute(
            f"CREATE USER '{user}'@'%' IDENTIFIED BY '{password}';"
            f" GRANT {grants} ON `{db}`.* TO '{user}'@'%'"
        )
        return user, password

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _mariadb_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """An initialised datadir, made once; every server starts on a copy of it."""
    found = binaries()
    if isinstance(found, str):
        unavailable(found)
        raise AssertionError("unreachable")  # pragma: no cover
    server, install = found
    datadir = tmp_path_factory.mktemp("mariadb-template") / "data"
    result = subprocess.run(
        [
            install,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",  # root without password
            "--skip-test-db",
            "--user=root",
            "--innodb-log-file-size=8M",
            "--innodb-buffer-pool-size=64M",
        ],
        capture_output=True,
        timeout=180,
        check=False,
    )
    if result.returncode != 0:
        output = (result.stdout + result.stderr).decode(errors="replace")[-3000:]
        pytest.fail(f"mariadb-install-db failed ({result.returncode}):\n{output}", pytrace=False)
    return server, datadir


def _new_server(template: tuple[str, Path], factory: pytest.TempPathFactory) -> MariaDB:
    server, datadir = template
    # The socket path must stay under ~107 bytes: use a short temp dir of our own.
    rundir = Path(factory.mktemp("mdb", numbered=True))
    if len(str(rundir / "mysqld.sock")) > 100:
        rundir = Path(tempfile.mkdtemp(prefix="mdb-"))
    copy = rundir / "data"
    shutil.copytree(datadir, copy)
    return MariaDB(server, copy, rundir)


@pytest.fixture(scope="session")
def mariadb(
    _mariadb_template: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MariaDB]:
    """The session's MariaDB server; tests must not stop it (use private_mariadb)."""
    db = _new_server(_mariadb_template, tmp_path_factory)
    db.start()
    try:
        yield db
    finally:
        db.discard()


@pytest.fixture
def private_mariadb(
    _mariadb_template: tuple[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[], MariaDB]]:
    """Factory of separate, started servers, stopped at the end of the test."""
    started: list[MariaDB] = []

    def start() -> MariaDB:
        db = _new_server(_mariadb_template, tmp_path_factory)
        started.append(db)
        db.start()
        return db

    try:
        yield start
    finally:
        for db in started:
            db.discard()


@pytest.fixture
def mysql_db(mariadb: MariaDB) -> Iterator[str]:
    """A fresh database on the session server with the shipped schema applied."""
    name = f"t_{secrets.token_hex(6)}"
    mariadb.create_database(name)
    mariadb.apply_schema(name)
    try:
        yield name
    finally:
        mariadb.execute(f"DROP DATABASE IF EXISTS `{name}`")


@pytest.fixture
def mysql_url(mariadb: MariaDB, mysql_db: str) -> Iterator[str]:
    """URL of ``mysql_db`` for a user holding only the Perl daemon's four grants."""
    user, password = mariadb.create_user(mysql_db)
    try:
        yield mariadb.url(mysql_db, user, password)
    finally:
        mariadb.execute(f"DROP USER IF EXISTS '{user}'@'%'")
