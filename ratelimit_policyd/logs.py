"""Logging setup: a log file (or stderr) and optionally syslog, facility mail.

The per-request decision line keeps the Perl daemon's text so existing log parsers
(fail2ban filters, reports) keep working. The file handler notices logrotate's rename
and reopens by itself, so rotation needs neither a restart nor a signal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import socket
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Final

from ratelimit_policyd.config import LogSettings

DECISIONS: Final = "ratelimit_policyd.decisions"
_FACILITIES: Final = {
    "mail": logging.handlers.SysLogHandler.LOG_MAIL,
    "daemon": logging.handlers.SysLogHandler.LOG_DAEMON,
    "user": logging.handlers.SysLogHandler.LOG_USER,
    **{f"local{i}": getattr(logging.handlers.SysLogHandler, f"LOG_LOCAL{i}") for i in range(8)},
}


class LineFormatter(logging.Formatter):
    """``<ctime> <message>`` for decisions (the Perl daemon's lines), level and source
    added for everything else. The timestamp is formatted once per second, not per line:
    this runs for every request."""

    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self._with_time = with_time
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.name != DECISIONS:
            msg = f"{record.levelname} {record.name}: {msg}"
            if record.exc_info:
                msg = f"{msg}\n{self.formatException(record.exc_info)}"
        if not self._with_time:
            return msg
        sec = int(record.created)
        if sec != self._second:
            # Perl's scalar localtime(), e.g. "Tue Nov 24 05:47:09 2026".
            self._stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(sec))
            self._second = sec
        return f"{self._stamp} {msg}"


class _Syslog(logging.handlers.SysLogHandler):
    """SysLogHandler that prefixes ``ident[pid]: `` like openlog(3) with LOG_PID."""

    def __init__(self, address: str, facility: int, ident: str) -> None:
        super().__init__(address=address, facility=facility, socktype=socket.SOCK_DGRAM)
        self.ident = f"{ident}[{os.getpid()}]: "


def probe_syslog(address: str) -> None:
    """OSError when nothing listens on the syslog socket ``address``.

    SysLogHandler ignores a failed connect (Python 3.11+) and then fails at every line,
    so the socket is asked first.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as probe:
        probe.connect(address)


def build_handlers(settings: LogSettings) -> tuple[list[logging.Handler], list[str]]:
    """The handlers ``settings`` asks for, opened but not installed, and warnings to log
    once they are; OSError when the log file cannot be opened, or when syslog cannot
    and it would be the only destination.

    Separate from installing them so that a reload opens the new log before closing the
    old one: a new log file that cannot be opened leaves the running logging alone.
    """
    handlers: list[logging.Handler] = []
    warnings: list[str] = []
    if settings.file == "-":
        handlers.append(logging.StreamHandler(sys.stderr))
    elif settings.file:
        handlers.append(logging.handlers.WatchedFileHandler(settings.file, encoding="utf-8"))
    for h in handlers:
        h.setFormatter(LineFormatter())
    if settings.syslog:
        try:
            probe_syslog(settings.syslog_address)
            sh = _Syslog(settings.syslog_address, _FACILITIES[settings.syslog_facility],
                         settings.syslog_ident)
        except OSError as exc:
            if not handlers:
                # log.file = '': nothing at all would be logged.
                raise OSError(exc.errno, f"syslog at {settings.syslog_address} unavailable "
                              f"({exc.strerror or exc}) and log.file is '': nothing could "
                              "be logged") from exc
            warnings.append(f"syslog at {settings.syslog_address} unavailable: {exc}")
        else:
            sh.setFormatter(LineFormatter(with_time=False))
            handlers.append(sh)
    return handlers, warnings


def log_problems(settings: LogSettings) -> list[str]:
    """Why the daemon could not log as ``settings`` say (``key: problem`` lines), for
    ``check-config``, so nothing is created. A missing log directory counts: ``run``
    makes it at a start, but a reload (which check-config also vets) does not."""
    problems: list[str] = []
    problem = _log_file_problem(settings.file)
    if problem:
        problems.append(f"log.file: cannot open for appending: {problem}")
    if settings.syslog and settings.file == "":
        try:
            probe_syslog(settings.syslog_address)
        except OSError as exc:
            problems.append(f"log.syslog_address: {settings.syslog_address} unavailable "
                            f"({exc.strerror or exc}) and log.file is '': nothing could "
                            "be logged")
    return problems


def _log_file_problem(file: str) -> str | None:
    if file in ("-", ""):
        return None
    path = Path(file)
    if path.is_dir():
        return f"{path} is a directory"
    if path.exists():
        return None if os.access(path, os.W_OK) else f"{path} is not writable"
    if not path.parent.is_dir():
        return f"directory {path.parent} does not exist (run creates it at a start, " \
               "a reload does not)"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"cannot create a file in {path.parent}"
    return None


def install_handlers(handlers: list[logging.Handler], settings: LogSettings) -> None:
    """Make ``handlers`` the root logger's, closing the ones they replace (cannot fail)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(settings.level.upper())
    logging.getLogger(DECISIONS).setLevel(logging.INFO if settings.decisions else logging.WARNING)


def setup_logging(settings: LogSettings) -> list[logging.Handler]:
    """(Re)configure the root logger from ``settings``; returns the handlers installed.

    The old handlers are closed only once the new ones are open (OSError otherwise).
    """
    handlers, warnings = build_handlers(settings)
    install_handlers(handlers, settings)
    for text in warnings:
        logging.getLogger(__name__).warning("%s", text)
    return handlers


class DecisionLog:
    """The per-request decision lines, written by one background thread.

    Request threads only append ``(time, text)`` to a deque (atomic, no lock); the
    writer formats a batch and writes it with one call per handler. With hundreds of
    connection threads, logging each line through ``logging`` made them queue on the
    handler lock and convoy on the GIL; this keeps the log line without that cost.
    Lines reach the file within ``interval`` seconds; ``close()`` writes the rest.
    """

    def __init__(self, interval: float = 0.2, max_lines: int = 200_000) -> None:
        # Bounded: if the log destination blocks (a full disk, a stuck syslog), the
        # oldest unwritten lines are dropped rather than memory growing with traffic.
        self._q: deque[tuple[float, str]] = deque(maxlen=max_lines)
        self.append = self._q.append
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="decision-log", daemon=True)
        self._lock = threading.Lock()  # one writer at a time (thread, or close())
        self._second = -1
        self._stamp = ""

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.write_pending()
            except Exception:  # never let the writer die: log lines would pile up
                logging.getLogger(__name__).exception("writing decision lines failed")

    def write_pending(self) -> int:
        with self._lock:
            q = self._q
            lines: list[str] = []
            plain: list[str] = []
            popleft = q.popleft
            second, stamp = self._second, self._stamp
            while q:
                created, text = popleft()
                sec = int(created)
                if sec != second:
                    stamp = time.strftime("%a %b %e %H:%M:%S %Y", time.localtime(sec))
                    second = sec
                lines.append(f"{stamp} {text}\n")
                plain.append(text)
            self._second, self._stamp = second, stamp
            if not lines:
                return 0
            self._emit(lines, plain)
            return len(lines)

    @staticmethod
    def _emit(lines: list[str], plain: list[str]) -> None:
        block = "".join(lines)
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.handlers.SysLogHandler):
                for text in plain:
                    h.handle(logging.LogRecord(DECISIONS, logging.INFO, __file__, 0, text,
                                               None, None))
            elif isinstance(h, logging.StreamHandler):
                h.acquire()
                try:
                    if isinstance(h, logging.handlers.WatchedFileHandler):
                        h.reopenIfNeeded()
                    if h.stream is not None:
                        h.stream.write(block)
                        h.flush()
                finally:
                    h.release()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        self.write_pending()
