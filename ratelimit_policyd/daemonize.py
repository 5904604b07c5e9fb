"""How ``run`` becomes a service process: pidfile, privilege drop, detaching (python-daemon).

Whatever can fail is done while the terminal is still attached: the policy port and the
control socket are bound, the database checked and the log file opened before the fork,
so an operator (or an init script) sees the error and a non-zero exit code. The process
started from the terminal then waits on a pipe for the daemon's word, and exits 0 only
once the daemon serves with its pidfile written.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import importlib
import logging
import os
import pwd
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote, urlsplit

import daemon as python_daemon

from ratelimit_policyd.config import Settings
from ratelimit_policyd.lifecycle import Daemon, DescriptorLimitError
from ratelimit_policyd.logs import setup_logging
from ratelimit_policyd.storage.base import StorageError

log = logging.getLogger(__name__)

#: What the daemon's command line contains; a live pid without it is a reused pid.
PROCESS_MARK: Final = b"ratelimit"
#: Mode of files and directories the daemon creates once detached (python-daemon's
#: default would be 0, making every new file world-writable); logs hold usernames, so
#: they are not world-readable (the systemd unit uses UMask=0027 too).
UMASK: Final = 0o027


class StartError(Exception):
    """The daemon cannot start; ``str()`` is the operator's message, ``code`` the exit."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class AlreadyRunning(StartError):
    def __init__(self, pidfile: Path, pid: int) -> None:
        super().__init__(f"already running as pid {pid} (pidfile {pidfile}); "
                         "stop it first, or use another --pidfile", os.EX_CANTCREAT)
        self.pid = pid


@dataclass(frozen=True, slots=True)
class RunOptions:
    """How ``run`` was asked to run (flags win over the ``[daemon]`` section)."""

    detach: bool = False
    pidfile: str = ""  # "" = no pidfile
    user: str = ""
    group: str = ""


@dataclass(frozen=True, slots=True)
class Account:
    """The user and group the daemon runs as after binding."""

    name: str
    uid: int
    gid: int


# -- pidfile -------------------------------------------------------------------------


def read_pidfile(path: Path) -> int | None:
    """The pid in ``path``; None when there is no file or it holds no pid."""
    try:
        text = path.read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StartError(f"cannot read pidfile {path}: {exc}", os.EX_NOINPUT) from exc
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def is_running(pid: int) -> bool:
    """Whether ``pid`` is a live ratelimit-policyd process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    # After a crash and a reboot without a tmpfs /run, the pid may belong to some other
    # program by now: that is not an instance, and must not block the start forever.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # no /proc to ask: assume it is one
    return PROCESS_MARK in cmdline.lower()


def claim_pidfile(path: Path) -> None:
    """Refuse when the pidfile names a running instance; remove a stale one."""
    if not os.path.lexists(path):
        return
    pid = read_pidfile(path)
    # Our own pid in the file is stale too: in a container the daemon may well get the
    # same pid at every start.
    if pid is not None and pid != os.getpid() and is_running(pid):
        raise AlreadyRunning(path, pid)
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StartError(f"cannot remove stale pidfile {path}: {exc}", os.EX_CANTCREAT) from exc
    log.warning("removed stale pidfile %s (%s)", path,
                f"pid {pid} is not running" if pid else "it held no pid")


def write_pidfile(path: Path, pid: int) -> None:
    """Create ``path`` holding ``pid``; O_EXCL, so of two racing starts one fails."""
    for attempt in (1, 2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except FileExistsError:
            if attempt == 2:
                raise StartError(f"pidfile {path} keeps reappearing; another start is racing "
                                 "this one", os.EX_CANTCREAT) from None
            claim_pidfile(path)
            continue
        except OSError as exc:
            raise StartError(f"cannot create pidfile {path}: {exc}", os.EX_CANTCREAT) from exc
        try:
            os.write(fd, f"{pid}\n".encode())
        except OSError as exc:
            path.unlink()
            raise StartError(f"cannot write pidfile {path}: {exc}", os.EX_CANTCREAT) from exc
        finally:
            os.close(fd)
        return


def remove_pidfile(path: Path, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (never another instance's file)."""
    try:
        if read_pidfile(path) != pid:
            return
        path.unlink()
    except FileNotFoundError:
        pass
    except (OSError, StartError) as exc:
        log.warning("could not remove pidfile %s: %s", path, exc)


# -- user and group ------------------------------------------------------------------


def resolve_account(user: str, group: str) -> Account | None:
    """The account named by ``--user``/``--group`` (names or numbers); None if neither."""
    if not user and not group:
        return None
    try:
        pw = _getpw(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        raise StartError(f"unknown user {user!r} (daemon.user / --user)", os.EX_NOUSER) from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else \
                grp.getgrnam(group).gr_gid
        except KeyError:
            raise StartError(f"unknown group {group!r} (daemon.group / --group)",
                             os.EX_NOUSER) from None
    return Account(pw.pw_name, pw.pw_uid, gid)


def _getpw(user: str) -> pwd.struct_passwd:
    return pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)


def check_can_switch(acct: Account) -> None:
    """Without root, the only account one can switch to is one's own."""
    if os.geteuid() != 0 and (os.geteuid(), os.getegid()) != (acct.uid, acct.gid):
        raise StartError(f"--user/--group need root to switch to {acct.name} "
                         f"(running as uid {os.geteuid()})", os.EX_NOPERM)


def drop_privileges(acct: Account) -> None:
    """Become ``acct``: supplementary groups, then group, then user (that order, as
    only root may change groups)."""
    check_can_switch(acct)
    if os.geteuid() != 0:
        return  # already running as acct
    try:
        os.setgroups(os.getgrouplist(acct.name, acct.gid))
        os.setgid(acct.gid)
        os.setuid(acct.uid)
    except OSError as exc:
        raise StartError(f"cannot switch to user {acct.name}: {exc}", os.EX_NOPERM) from exc
    if acct.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise StartError("root could be regained after dropping privileges; refusing to run",
                         os.EX_SOFTWARE)


def _own(path: Path, acct: Account | None) -> None:
    if acct is not None and os.geteuid() == 0:
        os.chown(path, acct.uid, acct.gid)


def _ensure_dir(path: Path, acct: Account | None) -> None:
    """Create ``path`` (owned by ``acct``) when missing; an existing one is left alone."""
    if path.is_dir():
        return
    path.mkdir(parents=True, mode=0o755)
    _own(path, acct)


def prepare_paths(settings: Settings, acct: Account | None, pidfile: Path | None) -> None:
    """Directories and files the daemon writes, made before (and owned by the user of)
    the privilege drop: the state dir, the log file, the pidfile's directory, and an
    SQLite database a root-run daemon may have created earlier."""
    try:
        state = settings.state_dir()
        _ensure_dir(state, acct)
        _own(state, acct)
        if settings.log.file not in ("-", ""):
            logfile = Path(settings.log.file)
            _ensure_dir(logfile.parent, acct)
            with logfile.open("a", encoding="utf-8"):
                pass
            _own(logfile, acct)
        if pidfile is not None:
            _ensure_dir(pidfile.parent, acct)
        url = settings.db_url()
        if acct is not None and url.startswith("sqlite:"):
            db = Path("/" + unquote(urlsplit(url).path).lstrip("/"))
            for p in (db, Path(f"{db}-wal"), Path(f"{db}-shm"), Path(f"{db}-journal")):
                if p.exists():
                    _own(p, acct)
    except OSError as exc:
        raise StartError(f"cannot prepare {exc.filename or 'a path'}: {exc.strerror or exc}",
                         os.EX_CANTCREAT) from exc


def _preload(settings: Settings) -> None:
    """Import now what the daemon would import later: once privileges are dropped the
    Python installation may not be readable any more (a root-only virtualenv or pyenv)."""
    importlib.import_module("ratelimit_policyd.status")
    if settings.db_url().startswith("sqlite:"):
        importlib.import_module("ratelimit_policyd.storage.sqlite")
    else:
        importlib.import_module("ratelimit_policyd.storage.mysql")
        importlib.import_module("encodings.idna")  # socket name lookups use it


# -- run -----------------------------------------------------------------------------


def serve(settings: Settings, overrides: dict[str, dict[str, Any]], opts: RunOptions) -> int:
    """Run the daemon as ``opts`` asks; returns the exit code (raises StartError)."""
    # The state dir is resolved once, as the starting user: its default depends on the
    # uid, which changes with --user, and a reload must keep the same directory.
    state_dir = str(settings.state_dir().absolute())
    overrides = {**overrides, "daemon": {**overrides.get("daemon", {}), "state_dir": state_dir}}
    settings = replace(settings, daemon=replace(settings.daemon, state_dir=state_dir))
    if opts.detach and settings.log.file == "-" and not settings.log.syslog:
        raise StartError("--daemon needs a log: standard error is /dev/null once detached; "
                         "set log.file (--log-file) or log.syslog = true", os.EX_CONFIG)
    pidfile = Path(opts.pidfile).absolute() if opts.pidfile else None
    if pidfile is not None:
        claim_pidfile(pidfile)
    acct = resolve_account(opts.user, opts.group)
    if acct is not None:
        check_can_switch(acct)  # before anything is created or bound
    elif os.geteuid() == 0:
        log.warning("running as root: set daemon.user (--user) to drop privileges")
    prepare_paths(settings, acct, pidfile)
    daemon = Daemon(settings, overrides)
    if not opts.detach:
        daemon.install_signal_handlers()
        setup_logging(settings.log)
    _bind(daemon, settings)
    if acct is not None:
        if daemon.control is not None:
            daemon.control.chown(acct.uid, acct.gid)
        _preload(settings)
        drop_privileges(acct)
    if opts.detach:
        _check_as_user(daemon, settings)
        return _detach(daemon, pidfile)
    if pidfile is not None:
        write_pidfile(pidfile, os.getpid())
    try:
        daemon.start()
        return daemon.run()
    finally:
        if pidfile is not None:
            remove_pidfile(pidfile, os.getpid())


def _bind(daemon: Daemon, settings: Settings) -> None:
    try:
        daemon.bind()
    except DescriptorLimitError as exc:
        raise StartError(str(exc), os.EX_CONFIG) from exc
    except OSError as exc:
        host, port = settings.listen_address()
        hint = " (is another ratelimit-policyd running?)" if exc.errno == errno.EADDRINUSE else ""
        raise StartError(f"cannot listen on {host} port {port}: {exc.strerror or exc}{hint}",
                         os.EX_OSERR) from exc


def _check_as_user(daemon: Daemon, settings: Settings) -> None:
    """Before detaching: the database and the log file, as the user the daemon runs as."""
    try:
        daemon.check_storage()
    except StorageError as exc:
        raise StartError(f"database: {exc}", os.EX_UNAVAILABLE) from exc
    finally:
        # The detached process opens its own connections; these would be closed under
        # the pool's feet by python-daemon.
        daemon.release_storage()
    if settings.log.file not in ("-", ""):
        try:
            with open(settings.log.file, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise StartError(f"cannot write the log file {settings.log.file}: "
                             f"{exc.strerror or exc}", os.EX_CANTCREAT) from exc


def _detach(daemon: Daemon, pidfile: Path | None) -> int:
    """Fork; this process waits for the daemon's word, the child becomes the daemon.

    python-daemon's detaching forks twice and ends each parent at once, which would
    leave the terminal with exit code 0 before the daemon has even started; our own
    fork in front of it keeps a process that can report the real outcome.
    """
    read_end, write_end = os.pipe()
    child = os.fork()
    if child:
        os.close(write_end)
        os.waitpid(child, 0)  # exits as soon as python-daemon has forked again
        return _await_word(read_end)
    os.close(read_end)
    try:
        context = python_daemon.DaemonContext(
            detach_process=True, working_directory="/", umask=UMASK,
            # Our handlers are installed after the fork; python-daemon's default would
            # map SIGTERM to raising SystemExit in whatever frame happens to run.
            signal_map={},
            files_preserve=[write_end, *daemon.fds_to_keep()])
        context.open()
    except BaseException as exc:  # a forked child must never return into the caller here
        _say(write_end, f"error {os.EX_OSERR} cannot detach: {exc}")
        os._exit(os.EX_OSERR)
    return _daemon_main(daemon, pidfile, write_end)


def _say(fd: int, word: str) -> None:
    with contextlib.suppress(OSError):
        os.write(fd, word.encode("utf-8", "replace") + b"\n")


def _await_word(fd: int) -> int:
    """Read the daemon's word: ``ready PID`` or ``error CODE MESSAGE``; EOF means it died."""
    data = b""
    try:
        while chunk := os.read(fd, 4096):
            data += chunk
    finally:
        os.close(fd)
    word = data.decode("utf-8", "replace").strip()
    if word.startswith("ready "):
        return os.EX_OK
    if word.startswith("error "):
        code, _, message = word[len("error "):].partition(" ")
        print(f"ratelimit-policyd: {message}", file=sys.stderr)
        return int(code) if code.isdigit() else 1
    print("ratelimit-policyd: the daemon exited while starting; see its log", file=sys.stderr)
    return 1


def _daemon_main(daemon: Daemon, pidfile: Path | None, word_fd: int) -> int:
    """The detached process: pidfile, signals, start, tell the waiting parent, serve."""
    pid = os.getpid()
    try:
        daemon.install_signal_handlers()
        if pidfile is not None:
            write_pidfile(pidfile, pid)
        daemon.start()
    except BaseException as exc:
        code = exc.code if isinstance(exc, StartError) else \
            os.EX_UNAVAILABLE if isinstance(exc, StorageError) else os.EX_SOFTWARE
        log.exception("start failed")
        _say(word_fd, f"error {code} {exc}")
        if pidfile is not None:
            remove_pidfile(pidfile, pid)
        return code
    _say(word_fd, f"ready {pid}")
    os.close(word_fd)
    try:
        return daemon.run()
    finally:
        if pidfile is not None:
            remove_pidfile(pidfile, pid)
