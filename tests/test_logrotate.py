"""Log rotation under load: the log file is renamed (by hand, then by logrotate with the
shipped file) while requests flow; the daemon keeps running, continues in a new file,
and every decision line is somewhere: one line per request, none lost."""

from __future__ import annotations

import gzip
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.policyclient import PolicyClient, request_bytes
from tests.test_daemon import DaemonProc

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
LOGROTATE = ROOT / "logrotate" / "ratelimit-policyd"
DECISION = "sasl_username="


def decision_lines(*files: Path) -> int:
    total = 0
    for f in files:
        data = gzip.decompress(f.read_bytes()) if f.suffix == ".gz" else f.read_bytes()
        total += data.decode().count(DECISION)
    return total


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Traffic:
    """Connections sending requests until told to stop; counts what was answered."""

    def __init__(self, port: int, connections: int = 2) -> None:
        self.port = port
        self.sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.errors: list[BaseException] = []
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(connections)]
        for t in self._threads:
            t.start()

    def _run(self, i: int) -> None:
        try:
            with PolicyClient(self.port) as c:
                while not self._stop.is_set():
                    assert c.ask(request_bytes(sasl_username=f"user{i}@example.com"))
                    with self._lock:
                        self.sent += 1
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def stop(self) -> int:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not self.errors, self.errors
        return self.sent


def test_renaming_the_log_under_load_loses_no_line(tmp_path: Path) -> None:
    d = DaemonProc(tmp_path, "--default-quota", "100000", "--flush-interval", "30")
    rotated: list[Path] = []
    try:
        traffic = Traffic(d.port)
        for i in range(4):
            # Rename only once the daemon has written to the current file: that shows it
            # reopened after the previous rename.
            wait_until(lambda: d.log.exists() and DECISION in d.log.read_text(),
                       f"decision lines in the log after rotation {i}")
            target = tmp_path / f"daemon.log.{i + 1}"
            d.log.rename(target)
            rotated.append(target)
        wait_until(lambda: d.log.exists() and DECISION in d.log.read_text(),
                   "lines continuing in the new file")
        sent = traffic.stop()
        assert d.proc.poll() is None, "rotation needs no restart"
    finally:
        assert d.stop() == 0  # writes the last batch of decision lines
    assert all(DECISION in f.read_text() for f in rotated)
    assert decision_lines(d.log, *rotated) == sent


def test_logrotate_with_the_shipped_file(tmp_path: Path) -> None:
    logrotate = shutil.which("logrotate") or \
        ("/usr/sbin/logrotate" if Path("/usr/sbin/logrotate").exists() else None)
    if logrotate is None:
        pytest.skip("logrotate is not installed")
    logdir = tmp_path / "log"
    logdir.mkdir()
    # The shipped file, for this directory; its `su` user may not exist here.
    conf = tmp_path / "logrotate.conf"
    conf.write_text(re.sub(r"(?m)^(\s*)su .*$", r"\1su root root",
                           LOGROTATE.read_text().replace("/var/log/ratelimit-policyd",
                                                         str(logdir))))
    d = DaemonProc(tmp_path, "--default-quota", "100000", "--flush-interval", "30",
                   "--log-file", str(logdir / "ratelimit-policyd.log"))
    log = logdir / "ratelimit-policyd.log"
    pid = d.proc.pid
    sent = 0

    def burst(n: int) -> None:
        nonlocal sent
        with PolicyClient(d.port) as c:
            for _ in range(n):
                c.ask(request_bytes())
        sent += n

    def rotate() -> None:
        result = subprocess.run(
            [logrotate, "--force", "--state", str(tmp_path / "logrotate.status"), str(conf)],
            capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr

    try:
        traffic = Traffic(d.port)  # rotation while requests flow, as in production
        burst(50)
        wait_until(lambda: log.exists() and DECISION in log.read_text(), "first lines")
        rotate()
        burst(50)
        wait_until(lambda: log.exists() and DECISION in log.read_text(), "a new file")
        rotate()  # .1 is compressed now (delaycompress), the current file becomes .1
        burst(50)
        wait_until(lambda: log.exists() and DECISION in log.read_text(), "a third file")
        sent += traffic.stop()
        assert d.proc.poll() is None and d.proc.pid == pid, "no restart"
    finally:
        assert d.stop() == 0
    files = sorted(p.name for p in logdir.iterdir())
    assert files == ["ratelimit-policyd.log", "ratelimit-policyd.log.1",
                     "ratelimit-policyd.log.2.gz"]
    assert decision_lines(*(logdir / f for f in files)) == sent
