"""The installed command as a real process: start, signals, counts in the database."""

from __future__ import annotations

import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimit_policyd.control import query
from tests.policyclient import (
    PolicyClient,
    free_port,
    request_bytes,
    sqlite_used,
    wait_for_port,
    wait_for_text,
)

pytestmark = pytest.mark.timeout(120)


class DaemonProc:
    def __init__(self, tmp: Path, *extra: str, config: Path | None = None) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.db = tmp / "db.sqlite3"
        self.log = tmp / "daemon.log"
        args = [sys.executable, "-m", "ratelimit_policyd", "run",
                "--listen", f"127.0.0.1:{self.port}", "--db", f"sqlite:///{self.db}",
                "--log-file", str(self.log), "--state-dir", str(tmp / "state"), *extra]
        if config is not None:
            args += ["--config", str(config)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            wait_for_port(self.port)
        except OSError:
            self.proc.kill()
            _out, err = self.proc.communicate()
            raise AssertionError(f"daemon did not start: {err.decode()}") from None

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.stdout:
                self.proc.stdout.close()
            if self.proc.stderr:
                self.proc.stderr.close()

    def used(self, key: str) -> int | None:
        return sqlite_used(self.db, key)

    def wait_log(self, needle: str, timeout: float = 15.0) -> str:
        return wait_for_text(self.log, needle, timeout)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path, "--default-quota", "3", "--flush-interval", "30")
    yield d
    d.stop()


def test_sigterm_flushes_every_count(daemon: DaemonProc) -> None:
    with PolicyClient(daemon.port) as c:
        replies = [c.ask(request_bytes()) for _ in range(5)]
    assert replies == ["DUNNO"] * 3 + ["471 daily message quota exceeded"] * 2
    # The flush interval is 30 s: only the final flush at SIGTERM can have written these.
    assert daemon.stop() == 0
    assert daemon.used("alice@example.com") == 5


def test_log_line_has_the_perl_format(daemon: DaemonProc) -> None:
    with PolicyClient(daemon.port) as c:
        c.ask(request_bytes(queue_id="ABC123", client_name="mx.example",
                            client_address="192.0.2.7"))
        for _ in range(3):
            c.ask(request_bytes(queue_id="ABC123"))
    text = daemon.wait_log("OVER_QUOTA")
    assert ("ABC123: client=mx.example[192.0.2.7], sasl_method=PLAIN, "
            "sasl_username=alice@example.com, recipient_count=1, curr_count=1/3, "
            "status=INSERT") in text
    assert "curr_count=2/3, status=UPDATE" in text
    assert "curr_count=4/3, status=OVER_QUOTA" in text


def test_usr1_dumps_the_cache(daemon: DaemonProc) -> None:
    with PolicyClient(daemon.port) as c:
        c.ask(request_bytes(sasl_username="dumped@example.com"))
    daemon.signal(signal.SIGUSR1)
    text = daemon.wait_log("stats: uptime")
    assert "dumped@example.com" in text


def test_hup_reloads_the_default_quota(tmp_path: Path) -> None:
    conf = tmp_path / "rl.conf"
    conf.write_text("[limits]\ndefault_quota = 1\n")
    d = DaemonProc(tmp_path, config=conf)
    try:
        with PolicyClient(d.port) as c:
            assert c.ask(request_bytes(sasl_username="a@x")) == "DUNNO"
            assert c.ask(request_bytes(sasl_username="a@x")) != "DUNNO"
            conf.write_text("[limits]\ndefault_quota = 4\n")
            d.signal(signal.SIGHUP)
            d.wait_log("configuration reloaded")
            assert [c.ask(request_bytes(sasl_username="b@x")) for _ in range(5)] == \
                ["DUNNO"] * 4 + ["471 daily message quota exceeded"]
            # An invalid config is rejected and the daemon keeps serving.
            conf.write_text("[limits]\nperiod = 'fortnightly'\n")
            d.signal(signal.SIGHUP)
            d.wait_log("reload rejected")
            assert c.ask(request_bytes(sasl_username="c@x")) == "DUNNO"
    finally:
        assert d.stop() == 0


def test_bad_config_stops_the_start_naming_the_key(tmp_path: Path) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text("[limits]\nperiod = 'fortnightly'\n")
    p = subprocess.run([sys.executable, "-m", "ratelimit_policyd", "run", "--config", str(conf)],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == os.EX_CONFIG
    assert "limits.period" in p.stderr


def test_version() -> None:
    p = subprocess.run([sys.executable, "-m", "ratelimit_policyd", "--version"],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "ratelimit-policyd" in p.stdout


def _status_numbers(d: DaemonProc) -> tuple[int, int]:
    """(cached keys, pending counts) from the daemon's ``status``."""
    text = query(d.tmp / "state" / "control.sock", "status")
    cached = re.search(r"cached keys (\d+)", text)
    pending = re.search(r"pending counts (\d+)", text)
    assert cached and pending, text
    return int(cached.group(1)), int(pending.group(1))


def test_max_entries_is_never_exceeded_and_no_count_is_lost(tmp_path: Path) -> None:
    # Bursts of 60 new senders and 20 returning (evicted, so re-read) ones into a cache
    # of 100, each burst fewer keys than the cap: the cache must hold at most 100 at
    # every look. Before, each burst's new keys stayed cached on top of the 100 until
    # the next flush round evicted them.
    conf = tmp_path / "rl.conf"
    conf.write_text("[cache]\nmax_entries = 100\nflush_interval = 0.5\n")
    d = DaemonProc(tmp_path, "--default-quota", "1000", config=conf)
    sent: dict[str, int] = {}
    rnd = random.Random(3)
    looks: list[int] = []
    try:
        with PolicyClient(d.port) as c:
            for burst in range(20):
                keys = [f"s{burst * 60 + i}@example.com" for i in range(60)]
                keys += rnd.sample(sorted(sent), 20) if sent else []
                for key in keys:
                    assert c.ask(request_bytes(sasl_username=key)) == "DUNNO"
                    sent[key] = sent.get(key, 0) + 1
                cached, _pending = _status_numbers(d)
                looks.append(cached)
                deadline = time.monotonic() + 30
                while _status_numbers(d)[1]:  # the burst is written: all clean again
                    assert time.monotonic() < deadline, "counts never flushed"
                    time.sleep(0.05)
                looks.append(_status_numbers(d)[0])
    finally:
        assert d.stop() == 0
    assert max(looks) <= 100, looks
    assert looks[-1] == 100
    with sqlite3.connect(d.db) as con:
        used = dict(con.execute("SELECT sender, used FROM ratelimit").fetchall())
    assert used == sent and sum(sent.values()) == 20 * 60 + 19 * 20


def test_null_columns_of_a_hand_made_perl_table(tmp_path: Path) -> None:
    # Nullable quota/used/persist, as a hand-made table for the Perl daemon may have
    # them: a NULL quota is unlimited (the Perl daemon never refused such a key), a NULL
    # used counts from 0 (``used + n`` would stay NULL and swallow every count).
    db = tmp_path / "db.sqlite3"
    with sqlite3.connect(db) as con:
        con.execute("CREATE TABLE ratelimit (id INTEGER PRIMARY KEY, sender TEXT NOT NULL"
                    " UNIQUE, persist INTEGER, quota INTEGER, used INTEGER,"
                    " updated TEXT DEFAULT CURRENT_TIMESTAMP, expiry INTEGER)")
        con.executemany("INSERT INTO ratelimit (sender, quota, used, expiry, persist)"
                        " VALUES (?, ?, ?, ?, NULL)",
                        [("free@example.com", None, 7, 2**31), ("nul@example.com", 3, None,
                                                                 2**31)])
    d = DaemonProc(tmp_path, "--default-quota", "2", "--flush-interval", "0.2")
    try:
        with PolicyClient(d.port) as c:
            assert {c.ask(request_bytes(sasl_username="free@example.com"))
                    for _ in range(10)} == {"DUNNO"}
            assert [c.ask(request_bytes(sasl_username="nul@example.com"))
                    for _ in range(4)] == ["DUNNO"] * 3 + ["471 daily message quota exceeded"]
        d.wait_log("curr_count=17/unlimited, status=UPDATE")
    finally:
        assert d.stop() == 0
    assert d.used("free@example.com") == 17
    assert d.used("nul@example.com") == 4
    cli = [sys.executable, "-m", "ratelimit_policyd"]
    show = subprocess.run([*cli, "show", "free@example.com", "--db", f"sqlite:///{db}"],
                          capture_output=True, text=True, timeout=30)
    assert show.returncode == 0 and show.stdout.splitlines()[1].split()[:3] == \
        ["free@example.com", "unlimited", "17"], show.stdout + show.stderr
    over = subprocess.run([*cli, "list", "--over-quota", "--db", f"sqlite:///{db}"],
                          capture_output=True, text=True, timeout=30)
    assert over.returncode == 0, over.stderr
    assert [line.split()[0] for line in over.stdout.splitlines()[1:]] == ["nul@example.com"]
