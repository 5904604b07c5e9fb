"""Wiring and lifecycle: build the parts, run them, stop them in the right order.

The main thread owns the signals. A handler only records the signal number and wakes
the main loop through a self-pipe (no logging, no locks in a handler); the loop then
calls ``handle_term`` / ``handle_hup`` / ``handle_usr1`` in normal thread context.
``serve_forever()`` runs in its own thread, since ``shutdown()`` would deadlock in it.
``bind()`` opens the sockets before any thread exists, so that ``daemonize`` can fork
and drop privileges between it and ``start()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import select
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ratelimit_policyd import __version__, spool
from ratelimit_policyd.cache import QuotaCache
from ratelimit_policyd.config import ConfigError, Settings, redact_url, reload
from ratelimit_policyd.control import ControlError, ControlServer, control_path
from ratelimit_policyd.engine import DUNNO, Engine
from ratelimit_policyd.flusher import Flusher
from ratelimit_policyd.loader import MissLoader
from ratelimit_policyd.logs import DecisionLog, build_handlers, install_handlers, setup_logging
from ratelimit_policyd.server import AccessList, PolicyServer, parse_networks
from ratelimit_policyd.storage import open_storage
from ratelimit_policyd.storage.base import Storage, StorageError

log = logging.getLogger(__name__)

#: Thread stack size for connection threads: hundreds of Postfix connections each hold
#: a thread, and the default 8 MiB of address space each is far more than they use.
THREAD_STACK_SIZE = 512 * 1024
#: File descriptors the daemon needs besides its Postfix connections and database pool:
#: stdio, the listening and control sockets (and a status client), the wake pipe, log
#: files and syslog, the pidfile, the spool, SQLite's files (two connections, -wal,
#: -shm), the reserve of the acceptor, and a few inherited ones. Measured at about 15.
FD_MARGIN = 64


class DescriptorLimitError(Exception):
    """``server.max_connections`` cannot fit in the limit of open files."""


def ensure_descriptors(settings: Settings) -> str | None:
    """Make room for ``server.max_connections`` in the limit of open files.

    A connection costs a descriptor; past the limit, accept() fails. Raises the soft
    limit (RLIMIT_NOFILE) up to the hard limit when it is too low (a SysV start from a
    shell inherits 1024) and returns what it did, to be logged; raises
    DescriptorLimitError when even the hard limit is too low.
    """
    s = settings
    needed = s.server.max_connections + s.database.pool_size + FD_MARGIN
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return None
    if hard != resource.RLIM_INFINITY and hard < needed:
        fits = hard - s.database.pool_size - FD_MARGIN
        raise DescriptorLimitError(
            f"server.max_connections = {s.server.max_connections} needs {needed} file "
            f"descriptors ({s.database.pool_size} for database.pool_size and {FD_MARGIN} "
            f"for logs, sockets and files), but the limit of open files is {soft} and "
            f"cannot be raised beyond {hard} (RLIMIT_NOFILE): "
            + (f"lower server.max_connections to {fits} at most, or " if fits > 0 else "")
            + "raise the limit (LimitNOFILE= in the systemd unit, ulimit -n in the "
            "init script)")
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
    except (OSError, ValueError) as exc:
        raise DescriptorLimitError(
            f"server.max_connections = {s.server.max_connections} needs {needed} file "
            f"descriptors, but the limit of open files ({soft}) could not be raised: "
            f"{exc}") from exc
    return (f"raised the limit of open files (RLIMIT_NOFILE) from {soft} to {needed} for "
            f"server.max_connections = {s.server.max_connections}")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about our state; a no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as exc:
        log.warning("sd_notify(%s) failed: %s", message, exc)


def warn_mixed_case_keys(storage: Storage) -> None:
    """One WARNING when rows have keys that are not lower case (the Perl daemon's):
    this daemon counts lower-case keys only. A database that cannot answer now is
    skipped (on MySQL it fails fast: check_schema has just found it unreachable)."""
    try:
        rows = storage.mixed_case_rows()
    except StorageError as exc:
        log.info("could not look for keys that are not lower case: %s", exc)
        return
    if rows:
        log.warning("%d row(s) have keys that are not lower case (e.g. %r), left by the Perl "
                    "daemon: keys are lower-cased (limits.lowercase_keys), so on a "
                    "case-sensitive table their quota and counts do not apply; run "
                    "`ratelimit-policyd migrate-keys` to see the merge, then with --apply",
                    len(rows), rows[0].sender)


class Daemon:
    """One running policy daemon."""

    def __init__(self, settings: Settings,
                 overrides: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.settings = settings
        self._overrides = overrides
        self.started = time.time()
        self._signals: deque[int] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop_requested = False
        self.storage: Storage | None = None
        self.server: PolicyServer | None = None
        self.flusher: Flusher | None = None
        self.control: ControlServer | None = None
        # What ensure_descriptors() did before logging was set up, logged by start().
        self._fd_note: str | None = None

    # -- start ----------------------------------------------------------------------

    def bind(self) -> None:
        """Open the policy port and the control socket, starting no thread.

        A port in use raises OSError here, while an operator still sees the terminal,
        and a ``max_connections`` beyond the limit of open files DescriptorLimitError.
        The control socket is optional: when it cannot be made, the error is logged and
        the daemon serves without ``status``.
        """
        s = self.settings
        self._fd_note = ensure_descriptors(s)
        # Requests wait in the listen backlog until start() installs the engine.
        self.server = PolicyServer(
            s.listen_address(), lambda attrs: DUNNO,
            allowed=AccessList(parse_networks(s.server.allowed_hosts)),
            max_connections=s.server.max_connections,
            max_request_bytes=s.server.max_request_bytes,
            idle_timeout=s.server.idle_timeout, request_timeout=s.server.request_timeout)
        path = control_path(s)
        try:
            self.control = ControlServer.bind(path)
        except (ControlError, OSError) as exc:
            log.error("control socket %s unavailable, `status` will not work: %s", path, exc)

    def fds_to_keep(self) -> list[int]:
        """File descriptors that must survive python-daemon closing every other one."""
        fds = [self._wake_r, self._wake_w]
        if self.server is not None:
            fds.append(self.server.fileno())
        if self.control is not None:
            fds.append(self.control.fileno())
        return fds

    def check_storage(self) -> None:
        """Open the database and check its schema; a missing schema raises StorageError."""
        s = self.settings
        storage = open_storage(s.db_url(), names=s.table_names(), password=s.db_password(),
                               pool_size=s.database.pool_size,
                               connect_timeout=s.database.connect_timeout,
                               read_timeout=s.database.read_timeout)
        self.storage = storage
        try:
            storage.check_schema()
        except StorageError as exc:
            if exc.transient:
                # The database being down must not keep mail from flowing: start, answer
                # from memory, write counts when it is back.
                log.error("database unreachable at start (%s); serving from memory", exc)
            else:
                storage.close()
                self.storage = None
                raise

    def release_storage(self) -> None:
        """Close the database before a fork (the child opens its own connections)."""
        if self.storage is not None:
            self.storage.close()
            self.storage = None

    def start(self) -> None:
        s = self.settings
        setup_logging(s.log)
        if self.storage is None:
            self.check_storage()
        storage = self.storage
        assert storage is not None
        limits = s.policy_limits()
        if limits.lowercase_keys:
            warn_mixed_case_keys(storage)
        cache = QuotaCache(s.calendar(), limits.default_quota,
                           max_entries=s.cache.max_entries, idle_ttl=s.cache.idle_ttl)
        self.cache = cache
        self.decision_log = DecisionLog()
        self.decision_log.start()
        self.engine = engine = Engine(limits, cache, storage,
                                      decision_sink=self.decision_log.append)
        engine.log_decisions = s.log.decisions
        self.loader = MissLoader(storage,
                                 s.database.connect_timeout + s.database.read_timeout + 1.0)
        self.loader.start()
        engine.loader = self.loader
        self.flusher = Flusher(cache, storage, s.cache.flush_interval,
                               default_quota=lambda: self.engine.limits.default_quota,
                               on_db_ok=engine.db_ok)
        self._replay_spool()
        if self.server is None:
            self.bind()
        assert self.server is not None
        self.server.handle_request_attrs = engine.handle
        # Opened now, not at bind(): python-daemon closes what it was not told to keep.
        self.server.reserve_descriptor()
        threading.stack_size(THREAD_STACK_SIZE)
        self.flusher.start()
        self._serve_thread = threading.Thread(target=self.server.serve_forever,
                                              kwargs={"poll_interval": 0.5},
                                              name="acceptor", daemon=True)
        self._serve_thread.start()
        host, port = self.server.server_address[:2]
        log.info("ratelimit-policyd %s listening on %s port %d; database %s; period %s, "
                 "default quota %d, key %s", __version__, host, port,
                 redact_url(s.db_url()), limits.period.value, limits.default_quota,
                 limits.key_type)
        if self._fd_note is not None:
            log.info("%s", self._fd_note)
        if self.control is not None:
            self.control.serve(self.status_lines)
            log.info("status on control socket %s", self.control.path)
        sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=listening on port {port}")

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only record and wake the main loop: no logging, no locks here.
        if signum in (signal.SIGTERM, signal.SIGINT) and self._stop_requested:
            os._exit(1)  # a second stop signal: terminate hard
        if signum in (signal.SIGTERM, signal.SIGINT):
            self._stop_requested = True
        self._signals.append(signum)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    # -- main loop ------------------------------------------------------------------

    def run(self) -> int:
        """Serve until a stop signal; returns the exit code.

        Never raises: whatever fails once the daemon serves, the counts in memory are
        still written by ``stop()`` (a failure here is not a failure to start).
        """
        code = os.EX_OK
        try:
            self._wait_for_stop()
        except Exception:
            log.critical("main loop failed; stopping with a final flush", exc_info=True)
            code = os.EX_SOFTWARE
        try:
            return self.stop() or code
        except Exception:
            log.critical("stop failed", exc_info=True)
            return os.EX_SOFTWARE

    def _wait_for_stop(self) -> None:
        while True:
            select.select([self._wake_r], [], [], 1.0)
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)
            while self._signals:
                signum = self._signals.popleft()
                name = signal.Signals(signum).name[3:].lower()
                if name in ("term", "int"):
                    return
                try:
                    getattr(self, f"handle_{name}")()
                except Exception:
                    # A failed reload or status dump must not take the daemon down:
                    # keep serving with what runs.
                    log.error("SIG%s failed; still serving", name.upper(), exc_info=True)

    def request_stop(self) -> None:
        """Ask the main loop to stop, as SIGTERM would (for tests and embedding)."""
        self._on_signal(signal.SIGTERM, None)

    def handle_hup(self) -> None:
        """Reload: re-read the config, apply what can change at run time, reopen logs.

        Everything that can fail is prepared first (the new log handlers opened, limits,
        calendar, access list built) while the running configuration is untouched; only
        then is it swapped in. A config that fails either way is rejected as a whole,
        logged on the handlers still open.
        """
        try:
            new = reload(self.settings, self._overrides)
        except ConfigError as exc:
            self._reject_reload(exc.errors)
            return
        try:
            note = ensure_descriptors(new)
        except DescriptorLimitError as exc:
            self._reject_reload([str(exc)])
            return
        try:
            handlers, log_warnings = build_handlers(new.log)
        except OSError as exc:
            where = f"log.file: cannot open {exc.filename}: " if exc.filename else "log: "
            self._reject_reload([f"{where}{exc.strerror or exc}"])
            return
        try:
            limits = new.policy_limits()
            calendar = new.calendar()
            allowed = AccessList(parse_networks(new.server.allowed_hosts))
        except ValueError as exc:
            self._reject_reload([str(exc)])
            for h in handlers:
                h.close()
            return
        except BaseException:
            for h in handlers:
                h.close()
            raise
        # Commit: nothing below can fail.
        old = self.settings
        install_handlers(handlers, new.log)
        for text in log_warnings:
            log.warning("%s", text)
        if note is not None:
            log.info("%s", note)
        self.engine.set_limits(limits)
        self.engine.log_decisions = new.log.decisions
        self.cache.reconfigure(calendar, limits.default_quota)
        self.cache.max_entries = new.cache.max_entries
        self.cache.idle_ttl = new.cache.idle_ttl
        assert self.flusher is not None and self.server is not None
        self.flusher.set_interval(new.cache.flush_interval)
        self.server.allowed = allowed
        self.server.max_connections = new.server.max_connections
        self.server.idle_timeout = new.server.idle_timeout
        self.server.request_timeout = new.server.request_timeout
        self.settings = new
        if new.server.listen != old.server.listen or new.db_url() != old.db_url():
            log.warning("listen address and database changes need a restart; kept the "
                        "running ones")
        log.info("configuration reloaded: period %s, default quota %d, key %s",
                 limits.period.value, limits.default_quota, limits.key_type)

    @staticmethod
    def _reject_reload(errors: list[str]) -> None:
        for err in errors:
            log.error("reload rejected: %s", err)
        log.error("reload rejected; keeping the running configuration")

    def handle_usr1(self) -> None:
        """Dump the cache and statistics to the log."""
        for line in self.status_lines():
            log.info("%s", line)

    def status_lines(self) -> list[str]:
        from ratelimit_policyd.status import render_status

        return render_status(self)

    # -- stop -----------------------------------------------------------------------

    def stop(self) -> int:
        """Graceful stop: stop accepting, answer in-flight requests, final flush."""
        sd_notify("STOPPING=1")
        log.info("stopping: no new connections; answering requests in flight")
        assert self.server is not None and self.flusher is not None
        timeout = self.settings.cache.shutdown_timeout
        self.server.shutdown()
        self.server.server_close()
        left = self.server.drain(min(5.0, timeout / 2))
        if left:
            log.warning("%d connections still open at stop", left)
        self.loader.stop()
        ok = self.flusher.close(timeout / 2)
        if not ok:
            self._write_spool()
        if self.storage is not None:
            self.storage.close()
        if self.control is not None:
            self.control.close()
        self.decision_log.close()
        log.info("stopped")
        return 0

    # -- spool: counts that could not be written at stop ----------------------------

    def _spool_path(self) -> Path:
        return self.settings.state_dir() / spool.SPOOL_NAME

    def _check_state_dir(self, directory: Path) -> None:
        # Warn, not refuse: refusing would lose the counts of a stop, and every file
        # operation of the spool is safe in such a directory anyway.
        problem = spool.check_dir(directory)
        if problem is not None:
            log.warning("state directory %s is %s: another user could delete or replace "
                        "the spooled counts; make it owned by the daemon's user, mode 0750",
                        directory, problem)

    def _write_spool(self) -> None:
        """The database is down at stop: keep the counts on disk for the next start."""
        assert self.flusher is not None
        sections = self.flusher.unwritten()
        if not sections:
            return
        path = self._spool_path()
        self._check_state_dir(path.parent)
        deltas = [d for section in sections for d in section.deltas]
        total = sum(d.n for d in deltas)
        keys = len({d.sender for d in deltas})
        try:
            aside = spool.write(path, sections)
        except OSError as exc:
            log.error("could not write %d pending counts to %s (%s); they are lost: %s",
                      total, path, exc, ", ".join(f"{d.sender}+{d.n}" for d in deltas[:50]))
            return
        if aside is not None:
            log.error("%s was not the daemon's own file: moved aside to %s, unread", path,
                      aside)
        log.warning("database unreachable at stop: %d pending counts of %d keys saved to %s; "
                    "they are written at the next start", total, keys, path)

    def _replay_spool(self) -> None:
        """Hand the last stop's spool to the flusher, and try to write it at once.

        The file stays until its counts are in the database: a crash, or a stop while
        the database is still down, keeps them; the flush log makes a second attempt
        after a crash write nothing twice.
        """
        assert self.flusher is not None
        path = self._spool_path()
        self._check_state_dir(path.parent)
        try:
            parsed = spool.load(path)
        except spool.UnsafeSpool as exc:
            log.error("spooled counts not read: %s; left in place (a spool must be a file "
                      "of the daemon's user, mode 0600)", exc)
            return
        except OSError as exc:
            log.error("cannot read spooled counts from %s: %s (left in place)", path, exc)
            return
        if parsed is None:
            return
        for bad in parsed.bad:
            log.error("%s line %d skipped: %s: %r", path, bad.number, bad.reason, bad.text)
        deltas = [d for section in parsed.sections for d in section.deltas]
        log.info("replaying %d spooled counts of %d keys from the last stop%s",
                 sum(d.n for d in deltas), len({d.sender for d in deltas}),
                 f" ({len(parsed.bad)} bad lines skipped)" if parsed.bad else "")
        self.flusher.adopt_spool(path, parsed.sections)
        if not self.flusher.write_spooled():
            log.warning("the spooled counts stay in %s until the database is reachable",
                        path)
