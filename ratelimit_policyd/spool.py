"""The spool: counts kept on disk across a stop while the database is unreachable.

Reads, parses and writes ``<state_dir>/pending-counts.jsonl`` at an explicit path;
``parse`` and ``format_lines`` are pure. Each line is one count of one *section*: counts
that go to the database in one transaction, named by a flush log entry (``FlushId``) so
that ``Storage.apply_once`` writes a section exactly once, across crashes. Imports only
the stdlib and ``model``; logging is the caller's.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import stat
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Final, NamedTuple

from ratelimit_policyd.model import Delta, FlushId

SPOOL_NAME: Final = "pending-counts.jsonl"
#: Characters of a rejected line shown in the log.
SHOWN: Final = 200
#: Test hook for the process-level crash tests: when this environment variable names a
#: step (``before-remove``: the spooled counts are in the database, the file is not yet
#: removed), the process SIGKILLs itself there, so a test can show that a crash at that
#: exact step counts nothing twice. Unset in production; read nowhere else.
CRASH_AT_ENV: Final = "RATELIMIT_POLICYD_TEST_CRASH_AT"

#: A flush log ``daemon`` value (VARCHAR(64)): daemon ids are 32 hex digits.
_SOURCE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
#: Counts and expiries must fit the drivers' 64-bit integers.
_MAX_INT: Final = 2**63 - 1


class Section(NamedTuple):
    """Counts written together: all in the database, or none (see ``FlushId``)."""

    flush: FlushId
    deltas: list[Delta]


class BadLine(NamedTuple):
    """A line that was skipped: 1-based number, why, and its text (shortened)."""

    number: int
    reason: str
    text: str


class Parsed(NamedTuple):
    sections: list[Section]
    bad: list[BadLine]


class UnsafeSpool(Exception):
    """The spool path is not a file this daemon wrote: it is neither read nor removed."""


def new_flush_id() -> FlushId:
    """A fresh name for the section of counts spooled at this stop."""
    return FlushId("spool-" + uuid.uuid4().hex, 1)


# -- pure parts ------------------------------------------------------------------------


def parse(data: bytes, origin: str = "") -> Parsed:
    """Every complete, valid line, grouped into sections in order of first appearance.

    A line that is cut short (a stop killed while writing, a full disk), not JSON or not
    a count is skipped and reported; the others are kept. Lines without a section name
    (written by versions before it existed) form one section, named after ``origin``
    (which host's which file) and their content, so that every start gives it the same
    name and two hosts' identical files different ones.
    """
    by_flush: dict[FlushId, list[Delta]] = {}
    legacy: list[Delta] = []
    legacy_text: list[bytes] = []
    bad: list[BadLine] = []
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            flush, delta = _parse_line(raw)
        except ValueError as exc:
            reason = str(exc)
            if number == len(lines):
                reason += "; the last line, without its newline: cut short"
            bad.append(BadLine(number, reason, raw[:SHOWN].decode("utf-8", "replace")))
            continue
        if flush is None:
            legacy.append(delta)
            legacy_text.append(raw)
        else:
            by_flush.setdefault(flush, []).append(delta)
    sections = [Section(f, d) for f, d in by_flush.items()]
    if legacy:
        digest = hashlib.sha256(origin.encode("utf-8", "surrogateescape") + b"\0"
                                + b"\n".join(legacy_text)).hexdigest()[:32]
        sections.insert(0, Section(FlushId("spool-" + digest, 1), legacy))
    return Parsed(sections, bad)


def _parse_line(raw: bytes) -> tuple[FlushId | None, Delta]:
    try:
        item = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(item, dict):
        raise ValueError("not a JSON object")
    sender = item.get("sender")
    if not isinstance(sender, str) or not sender:
        raise ValueError("no sender")
    n = _int_field(item, "n", 1, "no positive count n")
    expiry = _int_field(item, "expiry", 0, "no expiry")
    flush: FlushId | None = None
    if "flush" in item:
        source = item["flush"]
        if not isinstance(source, str) or not _SOURCE.fullmatch(source):
            raise ValueError("bad section name (flush)")
        flush = FlushId(source, _int_field(item, "seq", 1, "bad section sequence (seq)"))
    return flush, Delta(sender, n, expiry)


def _int_field(item: dict[str, object], name: str, low: int, error: str) -> int:
    value = item.get(name)
    # bool is an int to Python, not to the spool.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= _MAX_INT:
        raise ValueError(error)
    return value


def format_lines(sections: Sequence[Section]) -> bytes:
    """The file's content: one JSON object per count, each with its section's name."""
    out: list[str] = []
    for flush, deltas in sections:
        for d in deltas:
            # ensure_ascii (the default): a key that is not UTF-8 text (a lone
            # surrogate) is still written, escaped, and read back the same.
            out.append(json.dumps({"flush": flush.source, "seq": flush.seq,
                                   "sender": d.sender, "n": d.n, "expiry": d.expiry},
                                  separators=(",", ":")))
    return "".join(line + "\n" for line in out).encode("ascii")


# -- files -----------------------------------------------------------------------------


def unsafe(st: os.stat_result) -> str | None:
    """Why a file with this status is not one the daemon wrote for itself, or None."""
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not the daemon's uid {os.geteuid()}"
    if st.st_mode & 0o022:
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    if st.st_nlink != 1:
        # A hard link planted to another file of the same owner (root's, say).
        return f"{st.st_nlink} hard links"
    return None


def check_dir(directory: Path) -> str | None:
    """Why other users could tamper with files in ``directory``, or None.

    Every open here is safe in such a directory (no symbolic link followed, the spool
    read only when it is the daemon's own file), but another user could still delete a
    spool, or plant a file that makes it unreadable.
    """
    try:
        st = os.stat(directory)
    except OSError:
        return None  # made with the right mode when the spool is written
    if st.st_uid not in (os.geteuid(), 0):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o022:
        return f"writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def load(path: Path) -> Parsed | None:
    """Read and parse the spool; None when there is none.

    Raises UnsafeSpool when the path is a symbolic link, not a regular file, not owned
    by this process's user, writable by others or hard-linked: such a file is not read
    (it could be any file of the system, planted as a link). OSError otherwise.
    """
    try:
        # O_NONBLOCK: a FIFO planted here must not block the open; it is refused below.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeSpool(f"{path} is a symbolic link") from None
        raise
    try:
        problem = unsafe(os.fstat(fd))
        if problem is not None:
            raise UnsafeSpool(f"{path} is {problem}")
        chunks: list[bytes] = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return parse(b"".join(chunks), f"{socket.gethostname()}:{path}")


def write(path: Path, sections: Sequence[Section]) -> Path | None:
    """Replace the spool with these sections, atomically and durably.

    A new file is written beside it (O_EXCL, O_NOFOLLOW, mode 0600), fsync'ed, renamed
    over the old one, and the directory fsync'ed: a crash leaves the old file or the
    new one, never a mix, and nothing is ever appended behind a cut-short line. An entry
    at ``path`` that is not the daemon's own file is renamed aside first (never opened,
    never followed); its new path is returned. Raises OSError.
    """
    directory = path.parent
    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    aside = _move_aside_if_unsafe(path)
    data = format_lines(sections)
    tmp = directory / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)
    return aside


def remove(path: Path) -> None:
    """Remove the spool once its counts are in the database (durably: the directory is
    fsync'ed, so a power loss cannot bring the file back). Raises OSError."""
    crash_point("before-remove")
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


def crash_point(step: str) -> None:
    """The test hook of ``CRASH_AT_ENV``."""
    if os.environ.get(CRASH_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def _move_aside_if_unsafe(path: Path) -> Path | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if unsafe(st) is None:
        return None
    # rename() moves the directory entry itself: a symbolic link stays a link.
    aside = path.with_name(f"{path.name}.refused-{time.strftime('%Y%m%dT%H%M%S')}"
                           f"-{secrets.token_hex(3)}")
    os.rename(path, aside)
    return aside


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
