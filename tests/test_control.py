"""The control socket (real unix sockets) and ``ratelimit-policyd status`` against a
running daemon: the same table and statistics as the SIGUSR1 dump."""

from __future__ import annotations

import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ratelimit_policyd.control import (
    MAX_PATH_BYTES,
    ControlError,
    ControlServer,
    NotRunning,
    query,
)
from tests.policyclient import PolicyClient, request_bytes
from tests.test_daemon import DaemonProc

pytestmark = pytest.mark.timeout(60)

CLI = [sys.executable, "-m", "ratelimit_policyd"]


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    return tmp_path / "ctl" / "control.sock"


@pytest.fixture
def serving(sock_path: Path) -> Iterator[Callable[[Callable[[], list[str]]], ControlServer]]:
    servers: list[ControlServer] = []

    def start(status: Callable[[], list[str]]) -> ControlServer:
        srv = ControlServer.bind(sock_path)
        srv.serve(status)
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        srv.close()


def test_status_is_answered_and_the_socket_is_private(
        serving: Callable[[Callable[[], list[str]]], ControlServer], sock_path: Path) -> None:
    srv = serving(lambda: ["cache:", "  KEY  QUOTA", "stats: uptime 3 s"])
    assert stat.S_ISSOCK(sock_path.stat().st_mode)
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    assert query(sock_path) == "cache:\n  KEY  QUOTA\nstats: uptime 3 s\n"
    # One thread serves every client, one after the other.
    assert query(sock_path) == query(sock_path)
    srv.close()
    assert not sock_path.exists()
    with pytest.raises(NotRunning, match="does not exist"):
        query(sock_path)


def test_only_status_is_understood(
        serving: Callable[[Callable[[], list[str]]], ControlServer], sock_path: Path) -> None:
    serving(lambda: ["ok"])
    with pytest.raises(ControlError, match="unknown command 'reset'"):
        query(sock_path, "reset")
    # A line longer than any command, without a newline: answered and closed.
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        s.sendall(b"x" * 10_000)
        assert s.recv(4096).startswith(b"error: unknown command")
    assert query(sock_path) == "ok\n"


def test_a_silent_client_does_not_block_status_for_good(
        serving: Callable[[Callable[[], list[str]]], ControlServer], sock_path: Path) -> None:
    serving(lambda: ["ok"])
    with socket.socket(socket.AF_UNIX) as silent:
        silent.connect(str(sock_path))
        # The silent client is dropped after CLIENT_TIMEOUT; the query then gets through.
        assert query(sock_path, timeout=20) == "ok\n"


def test_a_failing_status_is_an_error_reply_not_a_dead_thread(
        serving: Callable[[Callable[[], list[str]]], ControlServer], sock_path: Path) -> None:
    calls: list[int] = []

    def status() -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return ["fine"]

    serving(status)
    with pytest.raises(ControlError, match="internal error"):
        query(sock_path)
    assert query(sock_path) == "fine\n"


def test_a_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(sock_path))  # left behind, as by a killed daemon
    with pytest.raises(NotRunning, match="nothing listens"):
        query(sock_path)
    srv = ControlServer.bind(sock_path)
    try:
        srv.serve(lambda: ["new"])
        assert query(sock_path) == "new\n"
    finally:
        srv.close()


def test_a_live_socket_or_a_plain_file_is_not_replaced(
        serving: Callable[[Callable[[], list[str]]], ControlServer], sock_path: Path,
        tmp_path: Path) -> None:
    serving(lambda: ["first"])
    with pytest.raises(ControlError, match="another daemon"):
        ControlServer.bind(sock_path)
    assert query(sock_path) == "first\n"
    plain = tmp_path / "plain"
    plain.write_text("keep me")
    with pytest.raises(ControlError, match="not a socket"):
        ControlServer.bind(plain)
    assert plain.read_text() == "keep me"


def test_an_overlong_path_is_refused_with_the_reason(tmp_path: Path) -> None:
    long_path = tmp_path / ("d" * (MAX_PATH_BYTES + 1)) / "control.sock"
    with pytest.raises(ControlError, match="too long"):
        ControlServer.bind(long_path)
    with pytest.raises(ControlError, match="too long"):
        query(long_path)


# -- `ratelimit-policyd status` against the daemon ------------------------------------


def wait_status(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run ``status`` until it answers (the daemon binds, then starts serving)."""
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run([*CLI, "status", *args], capture_output=True, text=True,
                                timeout=30)
        if result.returncode == 0 or time.monotonic() > deadline:
            return result
        time.sleep(0.1)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, "--default-quota", "2", "--flush-interval", "30")
    yield d
    d.stop()


def _cache_rows(lines: list[str]) -> list[str]:
    """The rows of the cache table: the lines between 'cache:' and 'stats:'."""
    start = next(i for i, ln in enumerate(lines) if ln.endswith("cache:"))
    end = next(i for i, ln in enumerate(lines) if "stats: uptime" in ln)
    return [ln.split("INFO ratelimit_policyd.lifecycle: ", 1)[-1]
            for ln in lines[start + 1:end]]


def test_status_prints_the_usr1_table_of_the_running_daemon(daemon: DaemonProc) -> None:
    state = ["--state-dir", str(daemon.tmp / "state")]
    with PolicyClient(daemon.port) as c:
        for user in ("alice@example.com", "bob@example.com", "bob@example.com",
                     "bob@example.com"):
            c.ask(request_bytes(sasl_username=user))
    result = wait_status(*state)
    assert result.returncode == 0, result.stderr
    out = result.stdout.splitlines()
    rows = _cache_rows(out)
    assert rows[0].split() == ["KEY", "QUOTA", "USED", "EXPIRY", "PERSIST", "PENDING"]
    alice = next(r.split() for r in rows if "alice@example.com" in r)
    bob = next(r.split() for r in rows if "bob@example.com" in r)
    assert (alice[1], alice[2], bob[1], bob[2]) == ("2", "1", "2", "3")
    # Expiry as a readable time (midnight of the next day, local time).
    assert bob[3].count("-") == 2 and bob[4].count(":") == 2
    stats = next(ln for ln in out if ln.startswith("stats:"))
    for needle in ("uptime", "connections open", "threads", "requests 4",
                   "pending counts 4"):
        assert needle in stats
    assert any(ln.startswith("flush: last") for ln in out)

    daemon.signal(signal.SIGUSR1)
    logged = daemon.wait_log("stats: uptime").splitlines()
    assert _cache_rows(logged) == rows, "status and SIGUSR1 show the same table"


def test_status_without_a_daemon_says_so(tmp_path: Path) -> None:
    result = subprocess.run([*CLI, "status", "--state-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3  # LSB: not running
    assert "no daemon running" in result.stderr
    assert str(tmp_path / "control.sock") in result.stderr


def test_a_configured_control_socket_is_used(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere.sock"
    d = DaemonProc(tmp_path, "--control-socket", str(path))
    try:
        result = wait_status("--control-socket", str(path))
        assert result.returncode == 0, result.stderr
        assert "stats: uptime" in result.stdout
        assert not (tmp_path / "state" / "control.sock").exists()
    finally:
        assert d.stop() == 0
    assert not path.exists(), "the daemon removes its socket at stop"


def test_a_killed_daemon_leaves_a_socket_the_next_one_replaces(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path)
    state = ["--state-dir", str(tmp_path / "state")]
    assert wait_status(*state).returncode == 0
    d.signal(signal.SIGKILL)
    d.stop()
    dead = subprocess.run([*CLI, "status", *state], capture_output=True, text=True,
                          timeout=30)
    assert dead.returncode == 3 and "nothing listens" in dead.stderr
    d2 = DaemonProc(tmp_path)
    try:
        assert wait_status(*state).returncode == 0
    finally:
        assert d2.stop() == 0


def test_control_socket_is_optional(tmp_path: Path) -> None:
    """A socket path that cannot work is logged; the policy service still starts."""
    bad = tmp_path / ("d" * 120) / "c.sock"
    d = DaemonProc(tmp_path, "--control-socket", str(bad))
    try:
        with PolicyClient(d.port) as c:
            assert c.ask(request_bytes()) == "DUNNO"
        assert d.proc.poll() is None
        d.wait_log("`status` will not work: control socket path")
    finally:
        assert d.stop() == 0
