"""A minimal Postfix-like policy client for tests: one persistent connection,
one request in flight, replies read up to the empty line."""

from __future__ import annotations

import itertools
import socket
import time
from pathlib import Path

_instances = itertools.count(1)


def request_bytes(**attrs: object) -> bytes:
    """A Postfix-shaped request; each call gets a new ``instance`` (a new message)
    unless one is given, so that it is not taken for a retry of the previous one."""
    base: dict[str, object] = {
        "request": "smtpd_access_policy",
        "protocol_state": "RCPT",
        "protocol_name": "ESMTP",
        "client_address": "192.0.2.10",
        "client_name": "client.example",
        "queue_id": "",
        "instance": f"test.{next(_instances)}",
        "recipient_count": 0,
        "sasl_method": "PLAIN",
        "sasl_username": "alice@example.com",
        "sender": "alice@example.com",
        "recipient": "r@remote.example",
    }
    base.update(attrs)
    return "".join(f"{k}={v}\n" for k, v in base.items()).encode() + b"\n"


class PolicyClient:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_reply(self) -> str:
        """The action of the next reply; '' when the server closed the connection."""
        while b"\n\n" not in self._buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                return ""
            self._buf += chunk
        reply, _, self._buf = self._buf.partition(b"\n\n")
        text = reply.decode()
        assert text.startswith("action="), text
        return text[len("action=") :]

    def ask(self, data: bytes) -> str:
        self.send(data)
        return self.read_reply()

    def closed_by_server(self, wait: float = 5.0) -> bool:
        """True once the server has closed (EOF or reset) within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for_port(port: int, host: str = "127.0.0.1", timeout: float = 20.0) -> None:
    """Connect-retry until the port accepts (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_text(path: Path, needle: str, timeout: float = 15.0) -> str:
    """The file's text once it contains ``needle``; AssertionError at the deadline."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} not in {path}:\n{text}")


def sqlite_used(db: Path, key: str) -> int | None:
    """``used`` of a key's row in a daemon's SQLite database (None: no row)."""
    import sqlite3

    with sqlite3.connect(db) as con:
        row = con.execute("SELECT used FROM ratelimit WHERE sender = ?", (key,)).fetchone()
    return None if row is None else int(row[0])
