"""``run --daemon`` and the SysV init script as real processes: pidfile, detaching,
start errors reported on the terminal, privilege drop, start/stop/reload/status."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.policyclient import (
    PolicyClient,
    free_port,
    request_bytes,
    sqlite_used,
    wait_for_port,
    wait_for_text,
)

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
INIT_SCRIPT = ROOT / "init" / "ratelimit-policyd"
CLI = [sys.executable, "-m", "ratelimit_policyd"]


def pid_gone(pid: int, timeout: float = 30.0) -> bool:
    """Wait until ``pid`` has exited (it is not our child: poll, with a deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        # A zombie (its parent has not reaped it yet) has exited too.
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        time.sleep(0.05)
    return False


def wait_file(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


class Setup:
    """A config, a database and paths in one directory, for detached daemons."""

    def __init__(self, base: Path, *, quota: int = 3) -> None:
        self.base = base
        self.port = free_port()
        self.log = base / "log" / "daemon.log"
        self.pidfile = base / "run" / "rl.pid"
        self.state = base / "state"
        self.db = self.state / "ratelimit.sqlite3"  # the default database
        self.config = base / "rl.conf"
        self.write_config(quota)

    def write_config(self, quota: int, extra: str = "") -> None:
        self.config.write_text(
            f'[server]\nlisten = "127.0.0.1:{self.port}"\n'
            f'[limits]\ndefault_quota = {quota}\n'
            f'[cache]\nflush_interval = 30.0\n'
            f'[log]\nfile = "{self.log}"\n'
            f'[daemon]\nstate_dir = "{self.state}"\n{extra}')

    def start(self, *extra: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "run", "--daemon", "--config", str(self.config), "--pidfile",
             str(self.pidfile), *extra],
            capture_output=True, text=True, timeout=60, cwd=cwd)

    def pid(self) -> int:
        return int(self.pidfile.read_text())

    def stop(self) -> None:
        if not self.pidfile.exists():
            return
        pid = self.pid()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        assert pid_gone(pid), f"daemon {pid} did not stop"

    def used(self, key: str) -> int | None:
        return sqlite_used(self.db, key)

    def wait_log(self, needle: str, timeout: float = 15.0) -> str:
        return wait_for_text(self.log, needle, timeout)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    s = Setup(tmp_path)
    yield s
    s.stop()


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


# -- run --daemon ------------------------------------------------------------------------


def test_daemon_detaches_serves_and_stops_cleanly(setup: Setup) -> None:
    result = setup.start()
    # The command returns only once the daemon serves, with its pidfile written.
    assert result.returncode == 0, result.stderr
    pid = setup.pid()
    assert "ratelimit_policyd" in _cmdline(pid)
    # A new session without a controlling terminal, and (second fork) not its leader.
    assert os.getsid(pid) not in (os.getsid(0), pid)
    assert Path(f"/proc/{pid}/cwd").resolve() == Path("/")
    with PolicyClient(setup.port) as c:
        replies = [c.ask(request_bytes()) for _ in range(4)]
    assert replies == ["DUNNO"] * 3 + ["471 daily message quota exceeded"]
    os.kill(pid, signal.SIGTERM)
    assert pid_gone(pid)
    assert not setup.pidfile.exists(), "the pidfile is removed at stop"
    assert not (setup.state / "control.sock").exists()
    # Flush interval 30 s: only the final flush can have written the four counts.
    assert setup.used("alice@example.com") == 4
    assert "stopped" in setup.log.read_text()


def test_second_instance_is_refused(setup: Setup) -> None:
    assert setup.start().returncode == 0
    first = setup.pid()
    again = setup.start()
    assert again.returncode == os.EX_CANTCREAT
    assert f"already running as pid {first}" in again.stderr
    assert setup.pid() == first
    with PolicyClient(setup.port) as c:
        assert c.ask(request_bytes()) == "DUNNO"


@pytest.mark.parametrize("content", ["dead", "garbage", "foreign"])
def test_stale_pidfile_is_replaced(setup: Setup, content: str) -> None:
    setup.pidfile.parent.mkdir(parents=True)
    foreign: subprocess.Popen[bytes] | None = None
    if content == "dead":
        gone = subprocess.Popen(["true"])
        gone.wait()
        setup.pidfile.write_text(f"{gone.pid}\n")
    elif content == "garbage":
        setup.pidfile.write_text("not a pid\n")
    else:
        # A live process that is not ratelimit-policyd: the pid was reused.
        foreign = subprocess.Popen(["sleep", "60"])
        setup.pidfile.write_text(f"{foreign.pid}\n")
    try:
        result = setup.start()
        assert result.returncode == 0, result.stderr
        assert "removed stale pidfile" in result.stderr
        assert "ratelimit_policyd" in _cmdline(setup.pid())
    finally:
        if foreign is not None:
            foreign.kill()
            foreign.wait()


def test_port_in_use_is_reported_on_the_terminal(setup: Setup) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", setup.port))
        busy.listen()
        result = setup.start()
    assert result.returncode == os.EX_OSERR
    assert f"cannot listen on 127.0.0.1 port {setup.port}" in result.stderr
    assert "Address already in use" in result.stderr
    assert not setup.pidfile.exists()


def test_broken_schema_is_reported_before_detaching(setup: Setup) -> None:
    setup.state.mkdir()
    with sqlite3.connect(setup.db) as con:
        con.execute("CREATE TABLE ratelimit (sender TEXT)")  # columns missing
    result = setup.start()
    assert result.returncode == os.EX_UNAVAILABLE, result.stderr
    assert "database:" in result.stderr and "ratelimit" in result.stderr
    assert not setup.pidfile.exists()


def test_daemon_needs_a_log_destination(setup: Setup) -> None:
    result = setup.start("--log-file", "-")
    assert result.returncode == os.EX_CONFIG
    assert "set log.file" in result.stderr


def test_relative_paths_survive_the_chdir_to_root(setup: Setup) -> None:
    """The daemon changes to /; a relative --config must still be re-read on SIGHUP."""
    result = subprocess.run(
        [*CLI, "run", "--daemon", "--config", setup.config.name, "--pidfile", "run/rl.pid"],
        capture_output=True, text=True, timeout=60, cwd=setup.base)
    assert result.returncode == 0, result.stderr
    setup.write_config(quota=1)
    os.kill(setup.pid(), signal.SIGHUP)
    setup.wait_log("configuration reloaded: period daily, default quota 1,")
    with PolicyClient(setup.port) as c:
        assert [c.ask(request_bytes(sasl_username="new@x")) for _ in range(2)] == \
            ["DUNNO", "471 daily message quota exceeded"]


def test_unknown_user_is_refused(setup: Setup) -> None:
    result = setup.start("--user", "no-such-user-rlp")
    assert result.returncode == os.EX_NOUSER
    assert "unknown user 'no-such-user-rlp'" in result.stderr


def _nobody() -> pwd.struct_passwd:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' on this system")
    raise AssertionError("unreachable")


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory the unprivileged user can reach (pytest's tmp dirs are root-only)."""
    path = Path(tempfile.mkdtemp(prefix="rlp-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_root_start_drops_privileges_after_binding(open_dir: Path) -> None:
    nobody = _nobody()
    s = Setup(open_dir)
    try:
        result = s.start("--user", "nobody")
        assert result.returncode == 0, result.stderr
        pid = s.pid()
        ids = {line.split(":")[0]: line.split()[1:]
               for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith(("Uid:", "Gid:", "Groups:"))}
        assert ids["Uid"] == [str(nobody.pw_uid)] * 4  # real, effective, saved, fs
        assert ids["Gid"] == [str(nobody.pw_gid)] * 4
        assert ids["Groups"] in ([], [str(nobody.pw_gid)])  # root's groups are gone
        for path in (s.log, s.state, s.pidfile, s.state / "control.sock", s.db):
            assert path.stat().st_uid == nobody.pw_uid, path
        assert stat.S_IMODE((s.state / "control.sock").stat().st_mode) == 0o600
        with PolicyClient(s.port) as c:
            assert c.ask(request_bytes()) == "DUNNO"
        status = subprocess.run([*CLI, "status", "--config", str(s.config)],
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert "alice@example.com" in status.stdout
        os.kill(pid, signal.SIGTERM)
        assert pid_gone(pid)
        assert not s.pidfile.exists(), "the unprivileged daemon removes its own pidfile"
        assert s.used("alice@example.com") == 1
    finally:
        s.stop()


# -- the SysV init script ----------------------------------------------------------------


class InitScript:
    """``init/ratelimit-policyd`` pointed at a temporary directory through env vars."""

    def __init__(self, s: Setup, user: str) -> None:
        self.s = s
        wrapper = s.base / "ratelimit-policyd"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m ratelimit_policyd "$@"\n')
        wrapper.chmod(0o755)
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "RATELIMIT_POLICYD_DEFAULTS": str(s.base / "default"),
            "DAEMON": str(wrapper),
            "CONFIG": str(s.config),
            "PIDFILE": str(s.pidfile),
            "DAEMON_USER": user,
            "LOGFILE": str(s.log),
            "STOP_TIMEOUT": "30",
        }

    def __call__(self, action: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["sh", str(INIT_SCRIPT), action], env=self.env,
                              capture_output=True, text=True, timeout=90)


@pytest.mark.parametrize("user", ["", "nobody"], ids=["root", "nobody"])
def test_sysv_script_start_status_reload_restart_stop(user: str, tmp_path: Path,
                                                      open_dir: Path) -> None:
    if user:
        _nobody()
    s = Setup(open_dir if user else tmp_path, quota=2)
    init = InitScript(s, user)
    try:
        assert init("status").returncode == 3  # LSB: not running
        started = init("start")
        assert started.returncode == 0, started.stdout + started.stderr
        pid = s.pid()
        running = init("status")
        assert running.returncode == 0 and f"running (pid {pid})" in running.stdout
        # start on a running daemon: success, and still the same process (LSB)
        assert init("start").returncode == 0
        assert s.pid() == pid

        with PolicyClient(s.port) as c:
            assert [c.ask(request_bytes(sasl_username="a@x")) for _ in range(3)] == \
                ["DUNNO", "DUNNO", "471 daily message quota exceeded"]
            s.write_config(quota=5)
            reloaded = init("reload")
            assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
            s.wait_log("default quota 5,")
            assert c.ask(request_bytes(sasl_username="b@x")) == "DUNNO"
            # An invalid config is refused by reload itself, on the terminal.
            s.config.write_text(s.config.read_text().replace(
                "[limits]\n", "[limits]\nperiod = 'fortnightly'\n"))
            rejected = init("reload")
            assert rejected.returncode != 0
            assert "period" in rejected.stderr
            assert c.ask(request_bytes(sasl_username="c@x")) == "DUNNO"
        s.write_config(quota=5)

        restarted = init("restart")
        assert restarted.returncode == 0, restarted.stdout + restarted.stderr
        assert pid_gone(pid)
        assert s.pid() != pid
        # Counts survive the restart (written at the stop).
        assert s.used("a@x") == 3

        stopped = init("stop")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not s.pidfile.exists()
        assert init("status").returncode == 3
        assert init("stop").returncode == 0  # stopping a stopped daemon is success (LSB)
        with pytest.raises(OSError):
            wait_for_port(s.port, timeout=0.2)
    finally:
        s.stop()


def test_sysv_script_reports_a_failed_start(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    init = InitScript(s, "")
    s.config.write_text(s.config.read_text().replace("default_quota = 3", "default_quota = -1"))
    result = init("start")
    assert result.returncode == 1
    assert "limits.default_quota" in result.stderr
    assert not s.pidfile.exists()


def test_sysv_script_reads_the_defaults_file(tmp_path: Path) -> None:
    """/etc/default/ratelimit-policyd wins over the built-in values."""
    s = Setup(tmp_path)
    init = InitScript(s, "")
    other = tmp_path / "other.pid"
    (tmp_path / "default").write_text(f'PIDFILE="{other}"\n')
    try:
        assert init("start").returncode == 0
        assert other.exists() and not s.pidfile.exists()
    finally:
        init("stop")
    assert not other.exists()
