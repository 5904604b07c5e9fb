"""Admin subcommands as an operator runs them, against SQLite and the private MariaDB:
readable tables, clear errors with non-zero exits, changes reaching a running daemon."""

from __future__ import annotations

import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.policyclient import PolicyClient, free_port, request_bytes
from tests.test_daemon import DaemonProc

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "ratelimit_policyd"]
HEADER = ["SENDER", "QUOTA", "USED", "EXPIRY", "PERSIST"]


@dataclass
class Backend:
    name: str
    url: str
    execute: Callable[[str, tuple[Any, ...]], None]
    placeholder: str

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        command, *rest = args
        # --db on the command line keeps the test short; operators put it in the config.
        return subprocess.run([*CLI, command, "--db", self.url, *rest], capture_output=True,
                              text=True, timeout=60)

    def set_used(self, key: str, used: int) -> None:
        p = self.placeholder
        self.execute(f"UPDATE ratelimit SET used = {p} WHERE sender = {p}", (used, key))


def _table(stdout: str) -> list[list[str]]:
    """Rows of a printed table, cells split on whitespace (the expiry is 3 cells)."""
    return [line.split() for line in stdout.splitlines()]


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        db = tmp_path / "admin.sqlite3"

        def execute_sqlite(sql: str, args: tuple[Any, ...]) -> None:
            with sqlite3.connect(db) as con:
                con.execute(sql, args)

        b = Backend("sqlite", f"sqlite:///{db}", execute_sqlite, "?")
        created = b.run("init-db")
        assert created.returncode == 0, created.stderr
        return b
    mariadb = request.getfixturevalue("mariadb")
    name = request.getfixturevalue("mysql_db")
    url = request.getfixturevalue("mysql_url")  # only the Perl daemon's four grants

    def execute_mysql(sql: str, args: tuple[Any, ...]) -> None:
        mariadb.execute(sql, db=name, args=args)

    return Backend("mysql", url, execute_mysql, "%s")


def test_set_quota_show_list_reset_delete(backend: Backend) -> None:
    created = backend.run("set-quota", "Alice@Example.COM", "50", "--persist")
    assert created.returncode == 0, created.stderr
    rows = _table(created.stdout)
    assert rows[0] == HEADER
    # Keys are lower-cased like the daemon's; a new row starts empty in this window.
    assert rows[1][:3] == ["alice@example.com", "50", "0"] and rows[1][-1] == "yes"
    assert len(rows[1]) == 7, "expiry printed as date, time and zone"

    for key, quota in (("bob@example.com", "5"), ("blocked@example.com", "0")):
        assert backend.run("set-quota", key, quota).returncode == 0
    backend.set_used("bob@example.com", 4)
    backend.set_used("alice@example.com", 9)

    shown = backend.run("show", "ALICE@example.com")
    assert shown.returncode == 0
    assert _table(shown.stdout)[1][:3] == ["alice@example.com", "50", "9"]

    listed = _table(backend.run("list").stdout)
    assert listed[0] == HEADER
    assert [r[0] for r in listed[1:]] == ["alice@example.com", "blocked@example.com",
                                          "bob@example.com"]
    top = _table(backend.run("list", "--top", "2").stdout)
    assert [(r[0], r[2]) for r in top[1:]] == [("alice@example.com", "9"),
                                               ("bob@example.com", "4")]
    # quota 0 blocks the key: it is "over quota" with nothing sent.
    over = _table(backend.run("list", "--over-quota").stdout)
    assert [r[0] for r in over[1:]] == ["blocked@example.com"]
    backend.set_used("bob@example.com", 5)
    over = _table(backend.run("list", "--over-quota").stdout)
    assert [r[0] for r in over[1:]] == ["blocked@example.com", "bob@example.com"]

    # Changing the quota keeps the count and, without a flag, the persist setting.
    changed = backend.run("set-quota", "alice@example.com", "60")
    assert _table(changed.stdout)[1][:3] == ["alice@example.com", "60", "9"]
    assert _table(changed.stdout)[1][-1] == "yes"
    unpersisted = backend.run("set-quota", "alice@example.com", "60", "--no-persist")
    assert _table(unpersisted.stdout)[1][-1] == "no"

    reset = backend.run("reset", "alice@example.com")
    assert reset.returncode == 0
    assert _table(reset.stdout)[1][:3] == ["alice@example.com", "60", "0"]

    deleted = backend.run("delete", "alice@example.com")
    assert deleted.returncode == 0 and "alice@example.com: deleted" in deleted.stdout
    gone = backend.run("show", "alice@example.com")
    assert gone.returncode == 1
    assert "alice@example.com: no row (quota would be the default, 1000)" in gone.stderr


def test_bad_arguments_are_refused_before_the_database(backend: Backend) -> None:
    cases = {
        ("set-quota", "a@x", "-1"): "quota must be between 0 and 4294967295",
        ("set-quota", "a@x", str(2**32)): "quota must be between 0 and 4294967295",
        ("set-quota", "x" * 300, "5"): "a key has 1 to 255 characters, got 300",
        ("show", "  "): "a key has 1 to 255 characters, got 0",
    }
    for args, message in cases.items():
        result = backend.run(*args)
        assert result.returncode == os.EX_USAGE, args
        assert message in result.stderr
    for command in ("show", "reset", "delete"):
        result = backend.run(command, "nobody@example.com")
        assert result.returncode == 1
        assert "nobody@example.com: no row" in result.stderr
    usage = backend.run("list", "--top", "0")
    assert usage.returncode == 2 and "must be 1 or more" in usage.stderr
    assert _table(backend.run("list").stdout) == [HEADER]  # nothing was written


@pytest.mark.mysql
def test_init_db_on_mysql(mariadb: Any) -> None:
    name = f"t_{secrets.token_hex(6)}"
    mariadb.create_database(name)
    try:
        b = Backend("mysql", mariadb.url(name), lambda sql, args: None, "%s")
        missing = b.run("list")
        assert missing.returncode == os.EX_UNAVAILABLE
        assert "ratelimit" in missing.stderr and "Traceback" not in missing.stderr
        for _ in range(2):  # idempotent
            created = b.run("init-db")
            assert created.returncode == 0, created.stderr
            assert "schema ready" in created.stdout
        assert _table(b.run("list").stdout) == [HEADER]
        tables = {r[0] for r in mariadb.execute("SHOW FULL TABLES", db=name)}
        assert {"ratelimit", "view_ratelimit"} <= tables
    finally:
        mariadb.execute(f"DROP DATABASE `{name}`")


def test_a_missing_sqlite_database_is_not_created_by_a_typo(tmp_path: Path) -> None:
    path = tmp_path / "typo" / "ratelimit.sqlite3"
    result = subprocess.run([*CLI, "list", "--db", f"sqlite:///{path}"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == os.EX_NOINPUT
    assert f"no database at {path}" in result.stderr
    assert not path.exists() and not path.parent.exists()


def test_an_unreachable_database_is_a_one_line_error() -> None:
    url = f"mysql://rl:s3cret-pw@127.0.0.1:{free_port()}/ratelimit"
    result = subprocess.run([*CLI, "show", "a@x", "--db", url], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == os.EX_UNAVAILABLE
    assert result.stderr.startswith("ratelimit-policyd: database:")
    assert "Traceback" not in result.stderr and "s3cret-pw" not in result.stderr


def test_print_config_hides_passwords(tmp_path: Path) -> None:
    conf = tmp_path / "rl.conf"
    conf.write_text('[database]\nurl = "mysql://rl:s3cret-pw@db.example/rl"\n'
                    'password = "other-secret"\n')
    result = subprocess.run([*CLI, "print-config", "--config", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "s3cret-pw" not in result.stdout and "other-secret" not in result.stdout
    assert 'url = "mysql://rl:***@db.example/rl"' in result.stdout


def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    conf = tmp_path / "rl.conf"
    conf.write_text("[limits]\ndefault_quota = 'many'\n")
    result = subprocess.run([*CLI, "check-config", "--config", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == os.EX_CONFIG
    assert "limits.default_quota: expected an integer" in result.stderr


def test_list_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    db = tmp_path / "many.sqlite3"
    assert subprocess.run([*CLI, "init-db", "--db", f"sqlite:///{db}"], timeout=30,
                          capture_output=True).returncode == 0
    with sqlite3.connect(db) as con:
        con.executemany("INSERT INTO ratelimit (sender, quota, used, expiry) "
                        "VALUES (?, 10, 1, 0)", [(f"user{i:05d}@example.com",)
                                                 for i in range(5000)])
    proc = subprocess.Popen([*CLI, "list", "--db", f"sqlite:///{db}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().decode().split() == HEADER
    proc.stdout.close()  # like `| head -1`
    err = proc.stderr.read()
    proc.stderr.close()
    proc.wait(30)
    assert b"Traceback" not in err and b"BrokenPipe" not in err


# -- changes reaching a running daemon ----------------------------------------------------


@pytest.fixture
def running(backend: Backend, tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, "--db", backend.url, "--default-quota", "2",
                   "--flush-interval", "0.5")
    yield d
    assert d.stop() == 0


def _daemon_row(d: DaemonProc, key: str) -> list[str] | None:
    """The key's row in the running daemon's cache, as ``status`` prints it."""
    result = subprocess.run([*CLI, "status", "--state-dir", str(d.tmp / "state")],
                            capture_output=True, text=True, timeout=30)
    for line in result.stdout.splitlines():
        cells = line.split()
        if cells and cells[0] == key:
            return cells
    return None


def _wait_row(d: DaemonProc, key: str, quota: str, used: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    row = None
    while time.monotonic() < deadline:
        row = _daemon_row(d, key)
        if row is not None and row[1:3] == [quota, used]:
            return
        time.sleep(0.1)
    raise AssertionError(f"daemon never showed {key} quota {quota} used {used}: {row}")


def _wait_db(backend: Backend, key: str, quota: str, used: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    rows: list[list[str]] = []
    while time.monotonic() < deadline:
        rows = _table(backend.run("list").stdout)
        if any(r[:3] == [key, quota, used] for r in rows):
            return
        time.sleep(0.1)
    raise AssertionError(f"database never showed {key} quota {quota} used {used}: {rows}")


def test_changes_reach_a_running_daemon(backend: Backend, running: DaemonProc) -> None:
    over = "471 daily message quota exceeded"
    with PolicyClient(running.port) as c:
        assert [c.ask(request_bytes()) for _ in range(3)] == ["DUNNO", "DUNNO", over]
        _wait_db(backend, "alice@example.com", "2", "3")  # the next flush wrote them

        raised = backend.run("set-quota", "alice@example.com", "10", "--persist")
        assert raised.returncode == 0, raised.stderr
        _wait_row(running, "alice@example.com", "10", "3")
        assert c.ask(request_bytes()) == "DUNNO"
        # (Reset only once that count is written, or the flush would add it after.)
        _wait_db(backend, "alice@example.com", "10", "4")

        reset = backend.run("reset", "alice@example.com")
        assert reset.returncode == 0, reset.stderr
        _wait_row(running, "alice@example.com", "10", "0")
        assert [c.ask(request_bytes()) for _ in range(10)] == ["DUNNO"] * 10
        assert c.ask(request_bytes()) == over

        blocked = backend.run("set-quota", "bob@example.com", "0")
        assert blocked.returncode == 0
        # A key the daemon has not cached yet is read on its first request.
        assert c.ask(request_bytes(sasl_username="bob@example.com")) == over


# -- migrate-keys: the Perl daemon's mixed-case rows ---------------------------------------


def _window_end() -> int:
    """The end of the daemon's current window (daily, local time: the defaults)."""
    from ratelimit_policyd.config import Settings

    return Settings().calendar().next_boundary(time.time())


def _insert(backend: Backend, sender: str, quota: int, used: int, expiry: int,
            persist: int) -> None:
    p = backend.placeholder
    backend.execute("INSERT INTO ratelimit (sender, quota, used, expiry, persist) "
                    f"VALUES ({p}, {p}, {p}, {p}, {p})", (sender, quota, used, expiry, persist))


def test_migrate_keys_merges_into_the_key_a_running_daemon_counts(
    backend: Backend, running: DaemonProc
) -> None:
    # The case: the Perl daemon's row with the operator's persistent quota 3 ...
    end = _window_end()
    _insert(backend, "Alice@Example.com", 3, 1, end, 1)
    _insert(backend, "ALICE@example.com", 9, 40, end - 2 * 86400, 1)  # an ended window
    with PolicyClient(running.port) as c:
        # ... is not read: the lower-case key gets a row with the default quota (2).
        assert [c.ask(request_bytes()) for _ in range(2)] == ["DUNNO", "DUNNO"]
        _wait_db(backend, "alice@example.com", "2", "2")

        dry = backend.run("migrate-keys")
        assert dry.returncode == 0, dry.stderr
        assert "alice@example.com <- ALICE@example.com, Alice@Example.com" in dry.stdout
        assert "used in the current window: 2 before, 3 after" in dry.stdout
        assert ("persistent quotas disagree (ALICE@example.com 9, Alice@Example.com 3): "
                "kept the most restrictive, 3") in dry.stdout
        assert "CONFLICT" in dry.stdout
        assert "dry run: nothing was changed" in dry.stdout
        assert [r[0] for r in _table(backend.run("list").stdout)[1:]] == [
            "ALICE@example.com", "Alice@Example.com", "alice@example.com"]

        # With the daemon running: the merge adds to the row the daemon writes to.
        applied = backend.run("migrate-keys", "--apply")
        assert applied.returncode == 0, applied.stderr
        assert "done: add 1 to alice@example.com, then delete ALICE@example.com, " \
               "Alice@Example.com" in applied.stdout
        listed = _table(backend.run("list").stdout)
        assert [(r[0], r[1], r[2], r[-1]) for r in listed[1:]] == [
            ("alice@example.com", "3", "3", "yes")]
        _wait_row(running, "alice@example.com", "3", "3")
        assert c.ask(request_bytes()) == "471 daily message quota exceeded"

    again = backend.run("migrate-keys", "--apply")
    assert again.returncode == 0 and "nothing to migrate" in again.stdout


def test_migrate_keys_with_case_sensitive_keys_configured_does_nothing(
    backend: Backend, tmp_path: Path
) -> None:
    _insert(backend, "Kept@Example.com", 3, 1, _window_end(), 1)
    conf = tmp_path / "case.conf"
    conf.write_text("[limits]\nlowercase_keys = false\n")
    result = backend.run("migrate-keys", "--apply", "--config", str(conf))
    assert result.returncode == 0, result.stderr
    assert "nothing to migrate" in result.stdout
    assert _table(backend.run("list").stdout)[1][0] == "Kept@Example.com"


def _sqlite_with_mixed_rows(tmp_path: Path) -> Path:
    db = tmp_path / "db.sqlite3"  # where DaemonProc points the daemon
    assert subprocess.run([*CLI, "init-db", "--db", f"sqlite:///{db}"], timeout=30,
                          capture_output=True).returncode == 0
    with sqlite3.connect(db) as con:
        con.executemany("INSERT INTO ratelimit (sender, quota, used, expiry, persist) "
                        "VALUES (?, 3, 0, 0, 1)", [("Mixed@Example.com",), ("Other@X",),
                                                   ("lower@x",)])
    return db


def test_the_daemon_warns_at_start_about_mixed_case_keys(tmp_path: Path) -> None:
    _sqlite_with_mixed_rows(tmp_path)
    d = DaemonProc(tmp_path)
    try:
        text = d.wait_log("listening on")
    finally:
        assert d.stop() == 0
    warnings = [ln for ln in text.splitlines() if "migrate-keys" in ln]
    assert len(warnings) == 1, text
    assert "WARNING" in warnings[0] and "2 row(s) have keys that are not lower case" in \
        warnings[0] and "`ratelimit-policyd migrate-keys`" in warnings[0]


def test_no_warning_when_keys_are_case_sensitive_by_configuration(tmp_path: Path) -> None:
    _sqlite_with_mixed_rows(tmp_path)
    conf = tmp_path / "case.conf"
    conf.write_text("[limits]\nlowercase_keys = false\n")
    d = DaemonProc(tmp_path, config=conf)
    try:
        text = d.wait_log("listening on")
    finally:
        assert d.stop() == 0
    assert "migrate-keys" not in text and "not lower case" not in text


@pytest.mark.mysql
def test_the_start_check_is_skipped_while_the_database_is_down(
    tmp_path: Path, private_mariadb: Callable[[], Any]
) -> None:
    server = private_mariadb()
    server.create_database("policyd")
    server.apply_schema("policyd")
    server.execute("INSERT INTO ratelimit (sender, quota, expiry) VALUES ('Mixed@X', 3, 0)",
                   db="policyd")
    user, password = server.create_user("policyd")
    url = server.url("policyd", user, password)
    server.stop()
    d = DaemonProc(tmp_path, "--db", url)
    try:
        text = d.wait_log("listening on")
        with PolicyClient(d.port) as c:  # and it answers, from memory
            assert c.ask(request_bytes()) == "DUNNO"
    finally:
        assert d.stop() == 0
    assert "INFO ratelimit_policyd.lifecycle: could not look for keys that are not lower " \
           "case" in text
    assert "migrate-keys" not in text
