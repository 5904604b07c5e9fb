"""Local control socket: how ``ratelimit-policyd status`` reaches a running daemon.

A unix stream socket (mode 0600, owned by the daemon's user) served by one small thread
that answers only ``status``, read-only: file permissions are its whole access control.
The policy port never speaks this protocol (the Perl daemon answered ``printshm`` there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Final

from ratelimit_policyd.config import Settings

log = logging.getLogger(__name__)

SOCKET_NAME: Final = "control.sock"
#: sun_path holds 108 bytes on Linux, one of them the terminating NUL.
MAX_PATH_BYTES: Final = 107
#: A command is one short line; anything longer is not one of ours.
MAX_COMMAND_BYTES: Final = 64
COMMANDS: Final = ("status",)
#: A client that connects and says nothing holds the (single) control thread this long.
CLIENT_TIMEOUT: Final = 2.0


class ControlError(Exception):
    """The control socket cannot be used; the message is meant for an operator."""


class NotRunning(ControlError):
    """No daemon answers on the control socket."""


def control_path(settings: Settings) -> Path:
    """``server.control_socket``, or ``control.sock`` in the state directory."""
    configured = settings.server.control_socket
    # Absolute: a detached daemon changes to / before it removes the socket at stop.
    return Path(os.path.abspath(configured or settings.state_dir() / SOCKET_NAME))


def _check_length(path: Path) -> None:
    size = len(os.fsencode(path))
    if size > MAX_PATH_BYTES:
        raise ControlError(f"control socket path {path} is too long ({size} bytes; a unix "
                           f"socket path has at most {MAX_PATH_BYTES}): set "
                           "server.control_socket to a shorter path")


class ControlServer:
    """A bound, listening control socket; ``serve()`` starts its thread."""

    def __init__(self, path: Path, sock: socket.socket) -> None:
        self.path = path
        self._sock = sock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inode = os.stat(path).st_ino

    @classmethod
    def bind(cls, path: Path) -> ControlServer:
        """Create the socket file (mode 0600), replacing a stale one.

        Call it before any thread is started: the umask that makes the socket 0600 from
        its creation on (no window in which others may connect) is process-wide.
        """
        _check_length(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(os.fspath(path))
            finally:
                os.umask(old)
            os.chmod(path, 0o600)
            sock.listen(8)
            return cls(path, sock)
        except OSError:
            sock.close()
            raise

    def fileno(self) -> int:
        return self._sock.fileno()

    def chown(self, uid: int, gid: int) -> None:
        """Hand the socket to the user the daemon runs as after dropping root."""
        os.chown(self.path, uid, gid)

    def serve(self, status: Callable[[], list[str]]) -> None:
        """Answer commands in a daemon thread until ``close()``."""
        self._thread = threading.Thread(target=self._loop, args=(status,), name="control",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread, close the socket and remove its file (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(CLIENT_TIMEOUT * 2)
        self._sock.close()
        # Another instance may have replaced a socket it thought stale: leave that one.
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _loop(self, status: Callable[[], list[str]]) -> None:
        while not self._stop.is_set():
            try:
                # A short wait keeps the stop latency low without a wake-up pipe.
                ready, _, _ = select.select([self._sock], [], [], 0.5)
                if not ready:
                    continue
                conn, _ = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                log.exception("control socket %s: accept failed", self.path)
                continue
            with conn:
                self._answer(conn, status)

    def _answer(self, conn: socket.socket, status: Callable[[], list[str]]) -> None:
        try:
            conn.settimeout(CLIENT_TIMEOUT)
            data = b""
            while b"\n" not in data and len(data) <= MAX_COMMAND_BYTES:
                chunk = conn.recv(MAX_COMMAND_BYTES + 1)
                if not chunk:
                    break
                data += chunk
            command = data.split(b"\n", 1)[0].strip().decode("ascii", "replace")
            if command == "status":
                try:
                    reply = "\n".join(status()) + "\n"
                except Exception:
                    log.exception("control socket: status failed")
                    reply = "error: internal error while rendering the status (see the log)\n"
            else:
                shown = command if len(data) <= MAX_COMMAND_BYTES else command[:20] + "..."
                reply = f"error: unknown command {shown!r} (known: {', '.join(COMMANDS)})\n"
            conn.sendall(reply.encode("utf-8", "replace"))
        except OSError as exc:
            log.warning("control socket: client dropped: %s", exc)


def _remove_stale(path: Path) -> None:
    """Unlink a socket nobody listens on; refuse to touch a live one or a non-socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(CLIENT_TIMEOUT)
        probe.connect(os.fspath(path))
    except (ConnectionRefusedError, FileNotFoundError):
        # Left behind by a daemon that was killed: nothing listens any more.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    except OSError as exc:
        raise ControlError(f"cannot check the existing control socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise ControlError(f"another daemon is answering on the control socket {path}")


def query(path: Path, command: str = "status", timeout: float = 10.0) -> str:
    """Send ``command`` to the daemon behind ``path``; returns its text reply.

    Raises ``NotRunning`` when no daemon listens there, ``ControlError`` on other
    failures (permissions, timeouts, an error reply), each with an operator's message.
    """
    _check_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(os.fspath(path))
        except FileNotFoundError:
            raise NotRunning(f"no daemon running: control socket {path} does not exist "
                             "(or its state directory differs: --config / --state-dir / "
                             "--control-socket)") from None
        except ConnectionRefusedError:
            raise NotRunning(f"no daemon running: nothing listens on {path} "
                             "(a stale socket left by a killed daemon)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: run as root or as the "
                               "daemon's user") from None
        chunks: list[bytes] = []
        try:
            sock.sendall(command.encode("ascii") + b"\n")
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            raise ControlError(f"the daemon did not answer on {path} within "
                               f"{timeout:g} s") from None
        except OSError as exc:
            raise ControlError(f"control socket {path}: {exc}") from None
    finally:
        sock.close()
    reply = b"".join(chunks).decode("utf-8", "replace")
    if reply.startswith("error:"):
        raise ControlError(reply[len("error:"):].strip())
    if not reply:
        raise ControlError(f"the daemon closed {path} without an answer")
    return reply
