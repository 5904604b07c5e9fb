"""The spool: parsing (pure), safe files (no link followed, no foreign file read), and a
real daemon on SQLite that keeps every complete line and writes nothing twice.

The process tests make the database unusable at a stop the way an operator can, with
an exclusive lock on the SQLite file, so that the daemon spools.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from ratelimit_policyd import spool
from ratelimit_policyd.model import Delta, FlushId
from ratelimit_policyd.storage import open_storage
from tests.faultkit import toml, wait_until
from tests.policyclient import PolicyClient, free_port, request_bytes
from tests.test_daemon import DaemonProc

pytestmark = pytest.mark.timeout(120)

E1 = 1_767_225_600
A = FlushId("spool-" + "a" * 32, 1)
B = FlushId("0123456789abcdef0123456789abcdef", 7)


def line(sender: str, n: int, flush: FlushId | None = A, expiry: int = E1) -> bytes:
    item: dict[str, object] = {"sender": sender, "n": n, "expiry": expiry}
    if flush is not None:
        item |= {"flush": flush.source, "seq": flush.seq}
    return json.dumps(item).encode() + b"\n"


# -- parse: pure -------------------------------------------------------------------------


def test_a_cut_short_last_line_is_skipped_and_every_complete_line_kept() -> None:
    whole = line("a@x", 1) + line("b@x", 2) + line("c@x", 3)
    cut = whole + line("d@x", 4)[:17]
    parsed = spool.parse(cut)
    assert parsed.sections == [spool.Section(A, [Delta("a@x", 1, E1), Delta("b@x", 2, E1),
                                                 Delta("c@x", 3, E1)])]
    [bad] = parsed.bad
    assert bad.number == 4
    assert "cut short" in bad.reason
    assert bad.text == line("d@x", 4)[:17].decode()


def test_a_garbled_line_in_the_middle_is_reported_with_its_own_number() -> None:
    data = (line("a@x", 1) + b"\x00\x00garbage\n" + line("b@x", 2, B) + b"[1, 2]\n"
            + line("c@x", 3) + b'{"sender": "d@x", "n": true, "expiry": 1}\n'
            + b'{"sender": "e@x", "n": 1, "expiry": 1, "flush": "x y", "seq": 1}\n'
            + b'\xff\xfe{"sender": "f@x"}\n' + line("g@x", 4, B))
    parsed = spool.parse(data)
    assert parsed.sections == [
        spool.Section(A, [Delta("a@x", 1, E1), Delta("c@x", 3, E1)]),
        spool.Section(B, [Delta("b@x", 2, E1), Delta("g@x", 4, E1)]),
    ]
    assert [(b.number, b.reason) for b in parsed.bad] == [
        (2, "not JSON (Expecting value at column 1)"),
        (4, "not a JSON object"),
        (6, "no positive count n"),
        (7, "bad section name (flush)"),
        (8, "not UTF-8 text"),
    ]


def test_lines_of_the_older_format_form_one_section_named_after_their_content() -> None:
    old = line("a@x", 1, None) + line("b@x", 2, None)
    first, again = spool.parse(old), spool.parse(old)
    assert first == again  # the same name at every start: written once across crashes
    [section] = first.sections
    assert section.deltas == [Delta("a@x", 1, E1), Delta("b@x", 2, E1)]
    assert section.flush.source.startswith("spool-") and section.flush.seq == 1
    assert spool.parse(old + line("c@x", 1, None)).sections[0].flush != section.flush
    # The same content on another host (sharing the database) is another section.
    assert spool.parse(old, "mx2:/var/lib/x").sections[0].flush != section.flush


def test_format_and_parse_round_trip_any_key() -> None:
    keys = ["o'brien@x", 'say "hi"@x', "jörg@bücher.example", "用户@例子.中国", "\ud800@x",
            "new\nline@x", "back\\slash@x"]
    sections = [spool.Section(A, [Delta(k, i + 1, E1 + i) for i, k in enumerate(keys)]),
                spool.Section(B, [Delta("z@x", 2**40, 2**33)])]
    data = spool.format_lines(sections)
    assert data.count(b"\n") == len(keys) + 1
    assert spool.parse(data) == spool.Parsed(sections, [])


def test_an_empty_or_blank_spool_has_nothing() -> None:
    assert spool.parse(b"") == spool.Parsed([], [])
    assert spool.parse(b"\n  \n") == spool.Parsed([], [])


# -- files -------------------------------------------------------------------------------


def test_write_replaces_the_file_atomically_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "state" / spool.SPOOL_NAME
    path.parent.mkdir(mode=0o750)
    path.write_bytes(line("old@x", 5)[:20])  # a cut-short line from an older stop
    sections = [spool.Section(B, [Delta("a@x", 1, E1)])]
    assert spool.write(path, sections) is None
    # Replaced as a whole: nothing appended behind the broken line.
    assert path.read_bytes() == spool.format_lines(sections)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [spool.SPOOL_NAME]
    assert spool.load(path) == spool.Parsed(sections, [])
    spool.remove(path)
    assert not path.exists()
    spool.remove(path)  # already gone: fine


def test_a_planted_symlink_is_neither_read_nor_written_through(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(line("planted@x", 1000))
    path = state / spool.SPOOL_NAME
    path.symlink_to(victim)
    with pytest.raises(spool.UnsafeSpool, match="symbolic link"):
        spool.load(path)
    aside = spool.write(path, [spool.Section(B, [Delta("a@x", 1, E1)])])
    assert aside is not None and aside.is_symlink()  # moved aside as a link, unfollowed
    assert victim.read_bytes() == line("planted@x", 1000)
    assert not path.is_symlink() and spool.load(path) is not None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = tmp_path / spool.SPOOL_NAME
    path.write_bytes(line("a@x", 1))
    os.chmod(path, 0o600)
    os.chown(path, 65534, 65534)
    with pytest.raises(spool.UnsafeSpool, match="owned by uid 65534"):
        spool.load(path)


@pytest.mark.parametrize("mode", [0o602, 0o620, 0o666])
def test_a_file_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / spool.SPOOL_NAME
    path.write_bytes(line("a@x", 1))
    os.chmod(path, mode)
    with pytest.raises(spool.UnsafeSpool, match="writable by other users"):
        spool.load(path)


def test_a_hard_link_and_a_fifo_are_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(line("a@x", 1))
    os.chmod(other, 0o600)
    path = tmp_path / spool.SPOOL_NAME
    os.link(other, path)
    with pytest.raises(spool.UnsafeSpool, match="2 hard links"):
        spool.load(path)
    path.unlink()
    os.mkfifo(path, 0o600)
    with pytest.raises(spool.UnsafeSpool, match="not a regular file"):
        spool.load(path)  # and without blocking on the FIFO


def test_a_state_directory_others_may_write_is_reported(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o750)
    os.chmod(state, 0o750)
    assert spool.check_dir(state) is None
    os.chmod(state, 0o777)
    assert spool.check_dir(state) == "writable by other users (mode 0777)"


# -- the daemon on SQLite ----------------------------------------------------------------


class SQLiteDaemon(DaemonProc):
    """A daemon on SQLite with short timeouts, so that a locked file fails a stop fast."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        conf = tmp / "rl.conf"
        conf.write_text(toml({"database": {"read_timeout": 0.5},
                              "cache": {"shutdown_timeout": 2.0}}))
        super().__init__(tmp, "--flush-interval", "60", "--period", "monthly",
                         "--default-quota", "1000000", *extra, config=conf)

    def spool_path(self) -> Path:
        return self.tmp / "state" / spool.SPOOL_NAME

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def all_used(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        return {str(s): int(u) for s, u in con.execute("SELECT sender, used FROM ratelimit")}


@contextmanager
def locked(db: Path) -> Iterator[None]:
    """An operator holding the SQLite file's write lock: every flush fails meanwhile."""
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        con.execute("ROLLBACK")
        con.close()


def send(port: int, counts: dict[str, int]) -> None:
    with PolicyClient(port) as c:
        for key, n in counts.items():
            for _ in range(n):
                assert c.ask(request_bytes(sasl_username=key)) == "DUNNO"


def expiry_now() -> int:
    from tests.faultkit import next_boundary

    return next_boundary("monthly")


def test_daemon_keeps_complete_lines_and_reports_a_cut_one(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    path = state / spool.SPOOL_NAME
    e = expiry_now()
    path.write_bytes(line("a@x", 3, None, e) + line("b@x", 4, None, e)
                     + b'{"sender": "c@x", "n": 5, "exp')
    os.chmod(path, 0o600)
    d = SQLiteDaemon(tmp_path)
    try:
        d.wait_log("spooled counts written")
        text = d.text()
        assert ("replaying 7 spooled counts of 2 keys from the last stop "
                "(1 bad lines skipped)") in text
        assert "line 3 skipped" in text and '{"sender": "c@x", "n": 5, "exp' in text
        assert all_used(d.db) == {"a@x": 3, "b@x": 4}
        wait_until(lambda: not path.exists(), 10, "the spool removed once written")
    finally:
        assert d.stop() == 0
    assert all_used(d.db) == {"a@x": 3, "b@x": 4}


def test_daemon_does_not_read_a_planted_symlink(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    victim = tmp_path / "victim.conf"
    victim.write_bytes(line("planted@x", 1000, None, expiry_now()))
    before = victim.read_bytes()
    path = state / spool.SPOOL_NAME
    path.symlink_to(victim)
    d = SQLiteDaemon(tmp_path)
    try:
        send(d.port, {"a@x": 2})
    finally:
        assert d.stop() == 0
    assert all_used(d.db) == {"a@x": 2}  # nothing read through the link
    assert "is a symbolic link; left in place" in d.text()
    assert path.is_symlink() and victim.read_bytes() == before


def test_daemon_does_not_write_through_a_symlink_planted_while_it_runs(tmp_path: Path) -> None:
    victim = tmp_path / "victim.conf"
    victim.write_text("# a file the daemon's user may write\n")
    before = victim.read_bytes()
    d = SQLiteDaemon(tmp_path)
    try:
        send(d.port, {"a@x": 2})
        d.spool_path().symlink_to(victim)  # a local user, in a state directory too open
        with locked(d.db):  # the stop must spool
            assert d.stop() == 0
    finally:
        d.stop()
    assert victim.read_bytes() == before  # nothing appended to the link's target
    assert "moved aside" in d.text()
    state = sorted(d.spool_path().parent.glob(spool.SPOOL_NAME + "*"))
    assert [p.is_symlink() for p in state] == [False, True]  # the spool; the link, aside
    assert spool.load(d.spool_path()) is not None
    d2 = SQLiteDaemon(tmp_path)
    try:
        d2.wait_log("spooled counts written")
    finally:
        assert d2.stop() == 0
    assert all_used(d2.db) == {"a@x": 2}
    assert victim.read_bytes() == before


def test_a_crash_after_the_spool_is_written_but_not_removed_counts_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = SQLiteDaemon(tmp_path)
    send(d.port, {"a@x": 3, "b@x": 1})
    with locked(d.db):
        assert d.stop() == 0
    assert d.spool_path().exists() and not all_used(d.db)
    # The next start writes the spool, then dies (SIGKILL) before removing the file.
    # (Started by hand: it may die before its port ever accepts.)
    monkeypatch.setenv(spool.CRASH_AT_ENV, "before-remove")
    crashing = subprocess.Popen(
        [sys.executable, "-m", "ratelimit_policyd", "run", "--listen",
         f"127.0.0.1:{free_port()}", "--db", f"sqlite:///{d.db}", "--log-file", str(d.log),
         "--state-dir", str(tmp_path / "state"), "--config", str(tmp_path / "rl.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert crashing.wait(60) == -signal.SIGKILL
    assert all_used(d.db) == {"a@x": 3, "b@x": 1}
    assert d.spool_path().exists()
    monkeypatch.delenv(spool.CRASH_AT_ENV)
    d3 = SQLiteDaemon(tmp_path)
    try:
        d3.wait_log("already in the database, not written again")
        wait_until(lambda: not d.spool_path().exists(), 10, "the spool removed")
    finally:
        assert d3.stop() == 0
    assert all_used(d.db) == {"a@x": 3, "b@x": 1}
    with sqlite3.connect(d.db) as con:  # the flush log row went with the file
        assert con.execute("SELECT COUNT(*) FROM ratelimit_flushlog").fetchone() == (0,)


def test_apply_once_on_sqlite_writes_a_section_once(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    try:
        deltas = [Delta("a@x", 2, E1), Delta("b@x", 1, E1)]
        assert storage.apply_once(deltas, 100, A) is True
        assert storage.apply_once(deltas, 100, A) is False
        assert storage.apply_once(deltas, 100, A._replace(seq=2)) is True
        assert {r.sender: r.used for r in storage.iter_rows()} == {"a@x": 4, "b@x": 2}
        storage.forget_flushes([A.source])
        assert storage.apply_once(deltas, 100, A) is True  # forgotten: written again
    finally:
        storage.close()
