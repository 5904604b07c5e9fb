"""The shipped service files: the systemd unit (checked by systemd-analyze, and its
readiness protocol against a real daemon), the SysV script's shell and LSB header, its
messages and LSB exit codes against a real daemon (its full start/reload/restart/stop
cycle is in test_daemonize.py), and the logrotate file as logrotate reads it."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimit_policyd.cli import build_parser
from ratelimit_policyd.config import Settings, load
from tests.policyclient import PolicyClient, free_port, request_bytes
from tests.test_daemonize import InitScript, Setup, pid_gone

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "init" / "ratelimit-policyd.service"
SYSV = ROOT / "init" / "ratelimit-policyd"
LOGROTATE = ROOT / "logrotate" / "ratelimit-policyd"
SHIPPED_CONFIG = ROOT / "init" / "ratelimit-policyd.conf"


def unit_settings() -> dict[str, list[str]]:
    """``[Section]Key`` -> values (systemd allows a key more than once)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"[{section}]{key.strip()}", []).append(value.strip())
    return out


def seconds(value: str) -> float:
    """A systemd time span like '60s', '1min 30s' or '90'."""
    units = {"": 1, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


# -- systemd unit ------------------------------------------------------------------------


def test_unit_runs_the_foreground_daemon_as_systemd_expects() -> None:
    u = unit_settings()
    assert u["[Service]Type"] == ["notify"]
    exec_start = shlex.split(u["[Service]ExecStart"][0])
    ns = build_parser().parse_args(exec_start[1:])
    assert ns.command == "run" and not ns.daemon, "systemd runs the foreground mode"
    assert ns.config == "/etc/ratelimit-policyd/ratelimit-policyd.conf"
    assert u["[Service]ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert u["[Service]Restart"] == ["on-failure"]
    assert u["[Service]User"][0] not in ("", "root", "0")
    assert u["[Service]StateDirectory"] == ["ratelimit-policyd"]
    assert u["[Service]RuntimeDirectory"] == ["ratelimit-policyd"]
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                       ("ProtectHome", "yes"), ("PrivateTmp", "yes")):
        assert u[f"[Service]{key}"] == [value], key


def test_unit_stop_timeout_outlasts_the_final_flush() -> None:
    stop = seconds(unit_settings()["[Service]TimeoutStopSec"][0])
    for settings in (Settings(), load(str(SHIPPED_CONFIG))):
        assert stop > settings.cache.shutdown_timeout + 10
    script_timeout = re.search(r'STOP_TIMEOUT="\$\{STOP_TIMEOUT:-(\d+)\}"', SYSV.read_text())
    assert script_timeout is not None
    assert int(script_timeout.group(1)) > Settings().cache.shutdown_timeout + 10


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart exists: point it at the command installed here.
    command = shutil.which("ratelimit-policyd") or sys.executable
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ratelimit-policyd",
                                             os.path.realpath(command)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                            timeout=60)
    # verify exits 0 on unknown keys and bad values too, and only warns: no output at all.
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    # A short directory of our own: unix socket paths are limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="rlp-notify-"))
    path = str(base / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(30)
    yield sock, path
    sock.close()
    shutil.rmtree(base, ignore_errors=True)


def test_readiness_is_notified_once_the_port_is_bound(
        notify_socket: tuple[socket.socket, str], tmp_path: Path) -> None:
    sock, path = notify_socket
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ratelimit_policyd", "run", "--listen", f"127.0.0.1:{port}",
         "--state-dir", str(tmp_path / "state"), "--log-file", str(tmp_path / "log")],
        env={**os.environ, "NOTIFY_SOCKET": path}, stderr=subprocess.PIPE)
    try:
        ready = sock.recv(4096).decode()
        assert "READY=1" in ready.splitlines()
        assert f"MAINPID={proc.pid}" in ready.splitlines()
        # No connect-retry here: READY=1 promises the port is bound and served.
        with PolicyClient(port) as c:
            assert c.ask(request_bytes()) == "DUNNO"
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in sock.recv(4096).decode().splitlines()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()


def test_readiness_on_an_abstract_notify_socket(tmp_path: Path) -> None:
    name = f"rlp-test-{os.getpid()}-{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(30)
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "ratelimit_policyd", "run", "--listen",
             f"127.0.0.1:{port}", "--state-dir", str(tmp_path / "state"), "--log-file",
             str(tmp_path / "log")],
            env={**os.environ, "NOTIFY_SOCKET": "@" + name})
        try:
            assert "READY=1" in sock.recv(4096).decode().splitlines()
        finally:
            proc.terminate()
            assert proc.wait(30) == 0


# -- SysV script -------------------------------------------------------------------------


def test_sysv_script_is_valid_sh_with_an_lsb_header() -> None:
    assert os.access(SYSV, os.X_OK), "the init script must be executable"
    text = SYSV.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert subprocess.run(["sh", "-n", str(SYSV)], timeout=30).returncode == 0
    header = text[text.index("### BEGIN INIT INFO"):text.index("### END INIT INFO")]
    for field in ("Provides: ratelimit-policyd", "Default-Start: 2 3 4 5",
                  "Default-Stop: 0 1 6", "Required-Start:", "Short-Description:"):
        name, _, value = field.partition(":")
        assert re.search(rf"^# {name}:\s+{re.escape(value.strip())}", header, re.M), field
    shellcheck = shutil.which("shellcheck")
    if shellcheck is not None:
        result = subprocess.run([shellcheck, "-s", "sh", str(SYSV)], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stdout


def test_sysv_script_usage_and_not_installed() -> None:
    env = {"PATH": os.environ["PATH"], "RATELIMIT_POLICYD_DEFAULTS": "/nonexistent",
           "DAEMON": "/bin/true"}
    usage = subprocess.run(["sh", str(SYSV), "frobnicate"], env=env, capture_output=True,
                           text=True, timeout=30)
    assert usage.returncode == 3 and "Usage:" in usage.stderr
    env["DAEMON"] = "/nonexistent/ratelimit-policyd"
    missing = subprocess.run(["sh", str(SYSV), "start"], env=env, capture_output=True,
                             text=True, timeout=30)
    assert missing.returncode == 5 and "not installed" in missing.stderr  # LSB


STARTING = "Starting sender rate-limit policy daemon: ratelimit-policyd"


def sysv(init: InitScript, action: str) -> subprocess.CompletedProcess[str]:
    """Run the script with stdout and stderr in one stream, as a terminal shows them."""
    return subprocess.run(["sh", str(SYSV), action], env=init.env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=90)


def test_sysv_second_start_says_it_is_already_running(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    init = InitScript(s, "")
    try:
        first = sysv(init, "start")
        assert first.returncode == 0, first.stdout
        assert first.stdout.startswith(STARTING)
        pid = s.pid()
        again = sysv(init, "start")
        # LSB: start on a running service succeeds; the message must not pretend to start.
        assert again.returncode == 0, again.stdout
        assert f"ratelimit-policyd is already running (pid {pid})" in again.stdout
        assert "Starting" not in again.stdout
        assert s.pid() == pid
        with PolicyClient(s.port) as c:
            assert c.ask(request_bytes()) == "DUNNO"
    finally:
        s.stop()


def test_sysv_failed_start_shows_its_reason_on_a_line_of_its_own(tmp_path: Path) -> None:
    s = Setup(tmp_path)
    init = InitScript(s, "")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", s.port))
        busy.listen()
        result = sysv(init, "start")
    assert result.returncode == 1, result.stdout
    lines = result.stdout.splitlines()
    # The status line is complete, then the daemon's reason (once glued to its end:
    # "...: ratelimit-policydratelimit-policyd: cannot listen ...").
    assert lines[0].startswith(STARTING) and lines[0].endswith("failed!"), lines
    assert any(line.startswith(f"ratelimit-policyd: cannot listen on 127.0.0.1 port {s.port}")
               for line in lines[1:]), lines
    assert not s.pidfile.exists()


def test_sysv_lsb_actions_and_exit_codes(tmp_path: Path) -> None:
    """Exit codes as LSB defines them: 0 success, 1 failure or (status) dead with a
    pidfile, 3 (status) not running, 7 (reload) not running."""
    s = Setup(tmp_path)
    init = InitScript(s, "")
    try:
        # (Debian's /lib/lsb/init-functions end a message with "." or "... failed!".)
        status = sysv(init, "status")
        assert status.returncode == 3, status.stdout
        assert status.stdout.startswith("ratelimit-policyd is not running")
        stop = sysv(init, "stop")  # stopping a stopped service is a success
        assert stop.returncode == 0, stop.stdout
        assert stop.stdout.startswith("ratelimit-policyd is not running")
        for action in ("reload", "force-reload"):
            result = sysv(init, action)
            assert result.returncode == 7, (action, result.stdout)
            assert "ratelimit-policyd is not running" in result.stdout
        try_restart = sysv(init, "try-restart")  # nothing to restart: a success
        assert try_restart.returncode == 0, try_restart.stdout
        assert sysv(init, "status").returncode == 3

        restart = sysv(init, "restart")  # restart starts a stopped service
        assert restart.returncode == 0, restart.stdout
        pid = s.pid()
        status = sysv(init, "status")
        assert status.returncode == 0 and f"running (pid {pid})" in status.stdout

        s.config.write_text(s.config.read_text().replace(
            "[limits]\n", "[limits]\nperiod = 'fortnightly'\n"))
        refused = sysv(init, "reload")
        assert refused.returncode == 1, refused.stdout
        lines = refused.stdout.splitlines()
        assert lines[0].endswith("failed!"), lines
        assert "ratelimit-policyd: invalid configuration:" in lines[1:], lines
        assert any("limits.period" in line for line in lines), lines
        s.write_config(quota=3)
        assert sysv(init, "reload").returncode == 0

        stopped = sysv(init, "stop")
        assert stopped.returncode == 0, stopped.stdout
        assert pid_gone(pid) and not s.pidfile.exists()

        # A pidfile left by a daemon that died: status 1; start replaces it.
        gone = subprocess.Popen(["true"])
        gone.wait()
        s.pidfile.write_text(f"{gone.pid}\n")
        dead = sysv(init, "status")
        assert dead.returncode == 1, dead.stdout
        assert "not running, but its pidfile" in dead.stdout
        started = sysv(init, "start")
        assert started.returncode == 0, started.stdout
        assert s.pid() != gone.pid
    finally:
        s.stop()


# -- logrotate ---------------------------------------------------------------------------


def test_logrotate_reads_the_file_without_errors(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or \
        next((p for p in ("/usr/sbin/logrotate",) if os.access(p, os.X_OK)), None)
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    text = LOGROTATE.read_text()
    directives = {line.split()[0] for line in text.splitlines()
                  if line.strip() and not line.strip().startswith("#")}
    # The daemon reopens the renamed file itself: nothing that restarts, signals or
    # copies it (see the comments in the file).
    assert not directives & {"copytruncate", "postrotate", "prerotate", "create"}
    assert {"nocreate", "delaycompress", "missingok"} <= directives
    # The shipped `su` user may not exist on a test machine: rotate as root here.
    conf = tmp_path / "logrotate.conf"
    conf.write_text(re.sub(r"(?m)^(\s*)su .*$", r"\1su root root",
                           text.replace("/var/log/ratelimit-policyd", str(tmp_path))))
    (tmp_path / "ratelimit-policyd.log").write_text("a line\n")
    result = subprocess.run([logrotate, "--debug", "--state", str(tmp_path / "state"),
                             str(conf)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "error" not in (result.stdout + result.stderr).lower()
