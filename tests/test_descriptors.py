"""File descriptors: ``max_connections`` against the limit of open files, and a daemon
that runs out of descriptors while serving. Real daemon processes, with their
RLIMIT_NOFILE set before exec (a SysV start from a shell inherits 1024) or lowered while
they run."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.policyclient import PolicyClient, free_port, request_bytes, wait_for_text

pytestmark = pytest.mark.timeout(120)

_SOFT, HARD = resource.getrlimit(resource.RLIMIT_NOFILE)
#: server.max_connections in these tests; with database.pool_size 8 and the daemon's
#: margin of 64 it needs 272 descriptors.
MAX_CONNECTIONS = 200
NEEDED = MAX_CONNECTIONS + 8 + 64


def start(tmp: Path, limit: tuple[int, int] | None,
          max_connections: int = MAX_CONNECTIONS) -> tuple[subprocess.Popen[bytes], int, Path]:
    """A daemon whose RLIMIT_NOFILE is ``limit`` from its start (None: inherited)."""
    port = free_port()
    log = tmp / "daemon.log"
    conf = tmp / "rl.conf"
    conf.write_text(f"[server]\nmax_connections = {max_connections}\n")
    preexec: Callable[[], None] | None = None
    if limit is not None:
        def preexec() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, limit)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ratelimit_policyd", "run", "--config", str(conf),
         "--listen", f"127.0.0.1:{port}", "--db", f"sqlite:///{tmp / 'db.sqlite3'}",
         "--log-file", str(log), "--state-dir", str(tmp / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=preexec)
    return proc, port, log


def serving(proc: subprocess.Popen[bytes], port: int, timeout: float = 30.0) -> None:
    """Wait until the daemon answers a request (or fail with its stderr)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with PolicyClient(port, timeout=5) as c:
                assert c.ask(request_bytes(sasl_username="probe@example.com")) == "DUNNO"
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                _out, err = proc.communicate()
                raise AssertionError(f"daemon not serving: {err.decode()}") from None
            time.sleep(0.05)


def stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.terminate()
    try:
        return proc.wait(30)
    finally:
        proc.communicate()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.communicate()


def ask_or_refused(c: PolicyClient) -> str:
    """The reply; '' when the daemon closed the connection (a reset included: it may
    close it with the request unread)."""
    try:
        return c.ask(request_bytes())
    except (ConnectionResetError, BrokenPipeError):
        return ""


def send_or_refused(c: PolicyClient) -> None:
    with contextlib.suppress(ConnectionResetError, BrokenPipeError):
        c.send(request_bytes())


def soft_limit(pid: int) -> int:
    text = Path(f"/proc/{pid}/limits").read_text()
    found = re.search(r"Max open files\s+(\d+)", text)
    assert found, text
    return int(found.group(1))


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid``, from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_max_connections_beyond_a_hard_limit_refuses_to_start(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # Before, it started, and connections past the limit were neither served nor closed.
    proc, _port, _log = start(tmp_path, (64, 64))
    procs.append(proc)
    try:
        _out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("the daemon started although max_connections cannot fit in 64 descriptors")
    assert proc.returncode == os.EX_CONFIG
    text = err.decode()
    assert "server.max_connections = 200" in text and "limit of open files is 64" in text
    assert "lower server.max_connections" not in text  # 64 fits no connection at all
    assert "LimitNOFILE=" in text


@pytest.mark.skipif(HARD != resource.RLIM_INFINITY and HARD < NEEDED,
                    reason="the hard limit of open files is too low to raise the soft one")
def test_a_low_soft_limit_is_raised_and_every_connection_served(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc, port, log = start(tmp_path, (64, HARD))
    procs.append(proc)
    serving(proc, port)
    assert soft_limit(proc.pid) == NEEDED
    wait_for_text(log, "raised the limit of open files (RLIMIT_NOFILE) from 64 to 272")
    # Far more connections than 64 descriptors allow, all open at once, all answered.
    with ExitStack() as stack:
        clients = [stack.enter_context(PolicyClient(port, timeout=20)) for _ in range(150)]
        for i, c in enumerate(clients):
            c.send(request_bytes(sasl_username=f"c{i}@example.com"))
        assert [c.read_reply() for c in clients] == ["DUNNO"] * 150
    assert stop(proc) == 0


def test_out_of_descriptors_refuses_at_once_logs_and_does_not_spin(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    # The limit is lowered while the daemon runs (prlimit --pid), leaving room for 3
    # more connections. Before, the acceptor retried accept() in a busy loop (31-99 %
    # of a core), said nothing, and the extra connections waited for Postfix's timeout.
    proc, port, log = start(tmp_path, None, max_connections=50)
    procs.append(proc)
    serving(proc, port)
    open_fds = sorted(int(fd) for fd in os.listdir(f"/proc/{proc.pid}/fd"))
    limit = len(open_fds) + 3
    while sum(fd < limit for fd in open_fds) > limit - 3:  # inherited high descriptors
        limit += 1
    resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (limit, HARD))
    with ExitStack() as stack:
        # Connections up to the limit are served (about 3: the probe's descriptor may
        # not have been closed yet when they were counted); the next one is not.
        served: list[PolicyClient] = []
        while True:
            c = stack.enter_context(PolicyClient(port, timeout=10))
            try:
                if ask_or_refused(c) != "DUNNO":
                    break
            except TimeoutError:  # neither served nor closed (before)
                break
            served.append(c)
            assert len(served) <= 6, "the lowered limit was not reached"
        assert served
        extra = [stack.enter_context(PolicyClient(port, timeout=20)) for _ in range(6)]
        for c in extra:
            send_or_refused(c)
        # Refusing, yet idle: no busy loop on the listening socket.
        before, started = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(3)
        share = (cpu_seconds(proc.pid) - before) / (time.monotonic() - started)
        assert share < 0.5, f"the daemon used {share:.0%} of a core while out of descriptors"
        # Each one closed at once (Postfix retries, or applies its default action).
        assert [c.closed_by_server(wait=10) for c in extra] == [True] * 6
        wait_for_text(log, "out of file descriptors")
        # The connections that were served still are.
        for c in served:
            assert c.ask(request_bytes()) == "DUNNO"
        for c in served:
            c.close()
        # Once they are gone, new connections are served again.
        deadline = time.monotonic() + 30
        while True:
            with PolicyClient(port, timeout=20) as c:
                if ask_or_refused(c) == "DUNNO":
                    break
            assert time.monotonic() < deadline, "never served again"
            time.sleep(0.1)
    text = log.read_text()
    assert text.count("out of file descriptors") == 1, text  # rate-limited
    assert stop(proc) == 0


def test_a_reload_raises_the_limit_or_is_rejected_when_max_connections_cannot_fit(
    tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    proc, port, log = start(tmp_path, (130, 400), max_connections=50)  # needs 122
    procs.append(proc)
    serving(proc, port)
    assert soft_limit(proc.pid) == 130
    conf = tmp_path / "rl.conf"
    conf.write_text("[server]\nmax_connections = 200\n")  # needs 272: raised
    proc.send_signal(signal.SIGHUP)
    wait_for_text(log, "raised the limit of open files (RLIMIT_NOFILE) from 130 to 272")
    assert soft_limit(proc.pid) == 272
    conf.write_text("[server]\nmax_connections = 400\n")  # needs 472: beyond the hard 400
    proc.send_signal(signal.SIGHUP)
    text = wait_for_text(log, "reload rejected; keeping the running configuration")
    assert "server.max_connections = 400 needs 472 file descriptors" in text
    assert "lower server.max_connections to 328 at most" in text
    serving(proc, port)
    assert stop(proc) == 0
