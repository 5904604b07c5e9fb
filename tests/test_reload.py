"""Reload (SIGHUP) never stops the daemon: a new config that cannot be applied, its log
file included, is rejected as a whole on the logging still open, and the running one kept;
whatever fails once the daemon serves, the counts in memory are still written."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimit_policyd.config import load
from ratelimit_policyd.lifecycle import Daemon
from tests.policyclient import (
    PolicyClient,
    free_port,
    request_bytes,
    sqlite_used,
    wait_for_port,
    wait_for_text,
)

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "ratelimit_policyd"]


class ConfiguredDaemon:
    """A daemon process whose log settings come from its config file only (no
    --log-file flag, which would win over the file at every reload too)."""

    def __init__(self, tmp: Path, **sections: str) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.db = tmp / "db.sqlite3"
        self.log = tmp / "daemon.log"
        self.conf = tmp / "rl.conf"
        self.write_config(**sections)
        self.proc = subprocess.Popen(
            [*CLI, "run", "--config", str(self.conf)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_for_port(self.port)
        except OSError:
            self.proc.kill()
            raise AssertionError(f"daemon did not start: {self.proc.communicate()[1]}") from None

    def write_config(self, **sections: str) -> None:
        """The base config, with ``sections`` (name: TOML body) added or replacing."""
        base = {
            "server": f'listen = "127.0.0.1:{self.port}"',
            "database": f'url = "sqlite:///{self.db}"',
            # Only the final flush at stop can write the counts: none is lost on the way.
            "cache": "flush_interval = 600",
            "limits": "default_quota = 1000",
            "log": f'file = "{self.log}"',
            "daemon": f'state_dir = "{self.tmp / "state"}"',
        }
        base.update(sections)
        self.conf.write_text("".join(f"[{k}]\n{v}\n" for k, v in base.items()))

    def stop(self) -> tuple[int, str]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=60)
        return self.proc.returncode, err


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[ConfiguredDaemon]:
    d = ConfiguredDaemon(tmp_path)
    yield d
    d.stop()


def send(port: int, n: int, key: str = "a@x") -> list[str]:
    with PolicyClient(port) as c:
        return [c.ask(request_bytes(sasl_username=key)) for _ in range(n)]


@pytest.mark.parametrize("bad_log", ["missing-dir/daemon.log", "a-directory"])
def test_a_log_file_that_cannot_be_opened_is_rejected_and_nothing_is_lost(
        daemon: ConfiguredDaemon, bad_log: str) -> None:
    # The case: exit 71 "cannot start", every count since the last flush lost.
    (daemon.tmp / "a-directory").mkdir()
    assert send(daemon.port, 7) == ["DUNNO"] * 7
    bad = daemon.tmp / bad_log
    daemon.write_config(log=f'file = "{bad}"', limits="default_quota = 2")
    daemon.proc.send_signal(signal.SIGHUP)
    text = wait_for_text(daemon.log, "reload rejected; keeping the running configuration")
    assert f"reload rejected: log.file: cannot open {bad}" in text
    # Still serving, with the whole running configuration (quota 1000, not 2).
    assert send(daemon.port, 3) == ["DUNNO"] * 3
    wait_for_text(daemon.log, "curr_count=10/1000")
    # A good config is applied again afterwards.
    daemon.write_config(limits="default_quota = 1")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_text(daemon.log, "configuration reloaded")
    assert send(daemon.port, 2, "b@x") == ["DUNNO", "471 daily message quota exceeded"]
    code, err = daemon.stop()
    assert code == 0, err
    assert "cannot start" not in err
    # Every count, by the final flush.
    assert (sqlite_used(daemon.db, "a@x"), sqlite_used(daemon.db, "b@x")) == (10, 2)


def test_syslog_as_the_only_destination_unavailable_is_rejected(
        daemon: ConfiguredDaemon) -> None:
    # Valid (log.file = '' with syslog on), but the syslog socket is not there: applied,
    # it logged nothing at all from then on.
    assert send(daemon.port, 2) == ["DUNNO"] * 2
    missing = daemon.tmp / "no-syslog-here"
    daemon.write_config(log=f'file = ""\nsyslog = true\nsyslog_address = "{missing}"')
    daemon.proc.send_signal(signal.SIGHUP)
    text = wait_for_text(daemon.log, "reload rejected; keeping the running configuration")
    assert f"syslog at {missing} unavailable" in text
    assert send(daemon.port, 1) == ["DUNNO"]
    wait_for_text(daemon.log, "curr_count=3/1000")  # the old log still gets the lines
    code, err = daemon.stop()
    assert code == 0, err
    assert sqlite_used(daemon.db, "a@x") == 3


def test_check_config_refuses_a_log_file_that_cannot_be_opened(tmp_path: Path) -> None:
    (tmp_path / "a-directory").mkdir()
    conf = tmp_path / "rl.conf"
    for target, problem in (("missing-dir/x.log", "does not exist"),
                            ("a-directory", "is a directory")):
        conf.write_text(f'[log]\nfile = "{tmp_path / target}"\n')
        result = subprocess.run([*CLI, "check-config", "--config", str(conf)],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == os.EX_CONFIG, result.stdout
        assert "log.file: cannot open for appending" in result.stderr
        assert problem in result.stderr
    conf.write_text(f'[log]\nfile = ""\nsyslog = true\nsyslog_address = "{tmp_path / "x"}"\n')
    result = subprocess.run([*CLI, "check-config", "--config", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == os.EX_CONFIG, result.stdout
    assert "nothing could be logged" in result.stderr
    conf.write_text(f'[log]\nfile = "{tmp_path / "ok.log"}"\n')
    result = subprocess.run([*CLI, "check-config", "--config", str(conf)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "ok.log").exists()  # checked, not created


# -- in-process: failures of the main loop itself ------------------------------------


@contextlib.contextmanager
def in_process_daemon(tmp_path: Path) -> Iterator[tuple[Daemon, Path, Path]]:
    """A started Daemon in this process (no signal handlers), pytest's logging restored
    after it."""
    db, logfile = tmp_path / "db.sqlite3", tmp_path / "daemon.log"
    settings = load(None, {
        "server": {"listen": f"127.0.0.1:{free_port()}"},
        "database": {"url": f"sqlite:///{db}"},
        "cache": {"flush_interval": 600},
        "log": {"file": str(logfile)},
        "daemon": {"state_dir": str(tmp_path / "state")},
    })
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    daemon = Daemon(settings)
    try:
        daemon.start()
        yield daemon, db, logfile
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


def test_a_failing_signal_handler_does_not_end_the_daemon(tmp_path: Path) -> None:
    with in_process_daemon(tmp_path) as (daemon, db, logfile):
        assert daemon.server is not None
        port = daemon.server.server_address[1]
        # A status dump that fails (here: its output cannot be rendered).
        daemon.status_lines = lambda: [1 / 0]  # type: ignore[method-assign, list-item]
        result: list[int] = []
        runner = threading.Thread(target=lambda: result.append(daemon.run()))
        runner.start()
        assert send(port, 2) == ["DUNNO"] * 2
        daemon._on_signal(signal.SIGUSR1, None)
        text = wait_for_text(logfile, "SIGUSR1 failed; still serving")
        assert "ZeroDivisionError" in text  # with its traceback
        assert send(port, 1) == ["DUNNO"]
        daemon.request_stop()
        runner.join(60)
        assert result == [0]
        assert sqlite_used(db, "a@x") == 3


def test_a_failing_main_loop_still_writes_every_count(tmp_path: Path) -> None:
    with in_process_daemon(tmp_path) as (daemon, db, logfile):
        assert daemon.server is not None
        assert send(daemon.server.server_address[1], 4) == ["DUNNO"] * 4
        # Something the loop does not expect (a signal number it cannot name) makes it
        # fail: the final flush must still happen, and the exit is not 0.
        daemon._on_signal(9999, None)
        assert daemon.run() == os.EX_SOFTWARE
        assert "main loop failed; stopping with a final flush" in logfile.read_text()
        assert sqlite_used(db, "a@x") == 4


def test_a_reloaded_flush_interval_applies_at_once(daemon: ConfiguredDaemon) -> None:
    # 600 s -> 0.2 s: the counts must reach the database long before the old interval
    # could have run out (it took the whole old interval).
    assert send(daemon.port, 5) == ["DUNNO"] * 5
    daemon.write_config(cache="flush_interval = 0.2")
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for_text(daemon.log, "configuration reloaded")
    deadline = time.monotonic() + 30
    while sqlite_used(daemon.db, "a@x") != 5:
        assert time.monotonic() < deadline, "the new flush interval did not apply"
        time.sleep(0.05)
    assert daemon.proc.poll() is None  # written by the running daemon, not at a stop
