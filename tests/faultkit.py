"""Tools of the fault tests: daemon processes on a private MariaDB, and a Postfix-like load.

``Load`` runs worker threads that each hold one policy connection and send requests back
to back (optionally paced), recording every reply with its time, key and count, so a test
can compare the database with exactly what the daemons answered. ``MySQLDaemon`` is the
subprocess of ``tests.test_daemon`` pointed at MySQL with a config file of the test's own.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ratelimit_policyd.model import Period
from ratelimit_policyd.window import Calendar
from tests.fixtures_mariadb import MariaDB
from tests.policyclient import PolicyClient, request_bytes
from tests.test_daemon import DaemonProc

OVER = "471 {period} message quota exceeded"
DEFER = "451 4.3.0 Sender rate limit service temporarily unavailable"


# -- database --------------------------------------------------------------------------


@dataclass
class Database:
    """One database on a test server, with the shipped schema and a Perl-grants user."""

    server: MariaDB
    name: str
    url: str

    @classmethod
    def create(cls, server: MariaDB) -> Database:
        name = f"f_{secrets.token_hex(5)}"
        server.create_database(name)
        server.apply_schema(name)
        user, password = server.create_user(name)
        return cls(server, name, server.url(name, user, password))

    def sql(self, statement: str, args: Any = None) -> list[tuple[Any, ...]]:
        return self.server.execute(statement, db=self.name, args=args)

    def used(self) -> dict[str, int]:
        """``used`` of every row (what the daemons wrote)."""
        return {str(s): int(u) for s, u in self.sql("SELECT sender, used FROM ratelimit")}

    def row(self, sender: str) -> tuple[int, int, int, int] | None:
        """(quota, used, expiry, persist) of one row."""
        found = self.sql(
            "SELECT quota, used, COALESCE(expiry, 0), persist FROM ratelimit WHERE sender = %s",
            (sender,),
        )
        if not found:
            return None
        quota, used, expiry, persist = found[0]
        return int(quota), int(used), int(expiry), int(persist)

    def put(self, senders: Iterable[str], quota: int, used: int = 0, *, expiry: int,
            persist: bool = False) -> None:
        rows = [(s, quota, used, expiry, int(persist)) for s in senders]
        self.sql(
            "INSERT INTO ratelimit (sender, quota, used, expiry, persist) VALUES "
            + ", ".join(["(%s, %s, %s, %s, %s)"] * len(rows)),
            [v for r in rows for v in r],
        )


def next_boundary(period: str, now: float | None = None) -> int:
    """The expiry the daemons give a new window of ``period`` (local time zone)."""
    return Calendar(Period(period)).next_boundary(time.time() if now is None else now)


# -- daemon processes ------------------------------------------------------------------


def toml(sections: Mapping[str, Mapping[str, object]]) -> str:
    """A config file from {"section": {"key": value}} (str, int, float, bool, list)."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    out = []
    for section, items in sections.items():
        out.append(f"[{section}]")
        out += [f"{k} = {value(v)}" for k, v in items.items()]
    return "\n".join(out) + "\n"


#: Settings every fault test wants: short database timeouts, so that a dead or locked
#: database costs a request or a flush a second or two, and a short stop.
BASE_CONFIG: dict[str, dict[str, object]] = {
    "database": {"connect_timeout": 1.0, "read_timeout": 2.0},
    "cache": {"shutdown_timeout": 6.0},
}


def merged(*configs: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for config in configs:
        for section, items in config.items():
            out.setdefault(section, {}).update(items)
    return out


class MySQLDaemon(DaemonProc):
    """``python -m ratelimit_policyd run`` on a MySQL URL, with its own directory."""

    def __init__(self, tmp: Path, url: str, *extra: str,
                 config: Mapping[str, Mapping[str, object]] | None = None) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        conf = tmp / "rl.conf"
        conf.write_text(toml(merged(BASE_CONFIG, config or {})))
        super().__init__(tmp, "--db", url, *extra, config=conf)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_kib(self) -> int:
        """Resident set size (VmRSS) of the daemon process."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def kill(self) -> None:
        """SIGKILL: no final flush, no spool."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self.stop()  # closes the pipes

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


# -- waiting ---------------------------------------------------------------------------


def wait_until(probe: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.1) -> Any:
    """Poll ``probe`` until it returns something true; its value, or AssertionError."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what} (last: {last!r})")
        time.sleep(interval)


def wait_for_counts(db: Database, expected: Mapping[str, int], timeout: float = 30.0) -> None:
    """Poll until the database holds ``expected`` for those keys (then compare exactly)."""

    def probe() -> bool:
        used = db.used()
        return all(used.get(k, 0) == n for k, n in expected.items())

    try:
        wait_until(probe, timeout, "the database to hold every count", interval=0.2)
    except AssertionError:
        used = db.used()
        diff = {k: (n, used.get(k, 0)) for k, n in expected.items() if used.get(k, 0) != n}
        raise AssertionError(f"(expected, in the database) differ for {len(diff)} keys: "
                             f"{dict(list(diff.items())[:20])}") from None


# -- load ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One answered request."""

    at: float  # time.time() when the reply arrived (the daemons' clock)
    latency: float  # seconds from the request's first byte to the reply
    worker: int
    port: int
    key: str  # counting key; "" for a request that does not count
    n: int  # recipients the request counts (0 for a retry of an answered request)
    action: str


#: A request maker: (random source, key) -> (request bytes, recipients it counts).
Maker = Callable[[random.Random, str], tuple[bytes, int]]


def rcpt(_rng: random.Random, key: str) -> tuple[bytes, int]:
    """One RCPT-stage request of a SASL user: counts 1."""
    return request_bytes(sasl_username=key), 1


def postfix_mix(rng: random.Random, key: str) -> tuple[bytes, int]:
    """What a busy Postfix sends: mostly RCPT, some DATA with several recipients, and
    requests that do not count (unauthenticated clients, a VRFY)."""
    roll = rng.random()
    if roll < 0.70:
        return request_bytes(sasl_username=key), 1
    if roll < 0.90:
        k = rng.randint(1, 5)
        return request_bytes(sasl_username=key, protocol_state="DATA", recipient="",
                             recipient_count=k), k
    if roll < 0.97:
        return request_bytes(sasl_username=""), 0
    return request_bytes(sasl_username=key, protocol_state="VRFY"), 0


@dataclass
class Load:
    """Worker threads, one policy connection each, spread over ``ports``.

    Each worker sends a request, waits for the reply, and goes on until ``stop()``;
    with ``rate`` it sends at most that many requests per second. A request whose
    connection breaks is recorded in ``unanswered`` (it may or may not have been
    counted); the worker reconnects when ``reconnect`` is set, else it ends.
    ``retry_share`` of the requests are sent a second time at once, as Postfix re-sends
    a request whose reply it lost: the daemon must answer the same and count it once.
    """

    ports: Sequence[int]
    keys: Sequence[str]
    connections: int = 4
    maker: Maker = rcpt
    rate: float | None = None
    reconnect: bool = False
    retry_share: float = 0.0
    seed: int = 1
    max_requests: int | None = None  # per worker
    replies: list[Reply] = field(default_factory=list)
    unanswered: list[tuple[str, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, args=(i,), name=f"load-{i}", daemon=True)
            for i in range(self.connections)
        ]

    def start(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float = 30.0) -> Load:
        self._stop.set()
        return self.join(timeout)

    def join(self, timeout: float = 60.0) -> Load:
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, f"load workers still running: {alive}"
        return self

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- results ----------------------------------------------------------------

    def counted(self) -> Counter[str]:
        """Recipients counted per key, from the answered requests."""
        out: Counter[str] = Counter()
        with self._lock:
            for r in self.replies:
                if r.n:
                    out[r.key] += r.n
        return out

    def total(self) -> int:
        return sum(self.counted().values())

    def actions(self) -> Counter[str]:
        with self._lock:
            return Counter(r.action for r in self.replies)

    def answered(self) -> int:
        with self._lock:
            return len(self.replies)

    def last_actions(self, n: int) -> dict[int, list[str]]:
        """The last ``n`` answers of each daemon (by port)."""
        by_port: dict[int, list[str]] = {}
        with self._lock:
            for r in self.replies:
                by_port.setdefault(r.port, []).append(r.action)
        return {port: actions[-n:] for port, actions in by_port.items()}

    def max_latency(self, keys: Iterable[str] | None = None) -> float:
        wanted = None if keys is None else set(keys)
        with self._lock:
            return max((r.latency for r in self.replies
                        if wanted is None or r.key in wanted), default=0.0)

    def summary(self) -> str:
        """One line of figures for the test's output (``pytest -rP`` shows it)."""
        return (f"{self.answered()} requests answered, {self.total()} recipients counted, "
                f"{len(self.unanswered)} unanswered, max latency {self.max_latency():.3f} s")

    # -- the worker --------------------------------------------------------------

    def _connect(self, port: int) -> PolicyClient | None:
        while not self._stop.is_set():
            try:
                return PolicyClient(port)
            except OSError:
                if not self.reconnect:
                    raise
                time.sleep(0.1)  # the daemon is restarting: try again
        return None

    def _work(self, i: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + i)
        port = self.ports[i % len(self.ports)]
        try:
            client = self._connect(port)
            sent = 0
            started = time.monotonic()
            while client is not None and not self._stop.is_set():
                if self.max_requests is not None and sent >= self.max_requests:
                    break
                if self.rate:
                    delay = started + sent / self.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                key = rng.choice(self.keys)
                data, n = self.maker(rng, key)
                sent += 1
                action = self._ask(client, data, key, n, i, port)
                if action is None:
                    client.close()
                    client = self._connect(port) if self.reconnect else None
                    continue
                if self.retry_share and rng.random() < self.retry_share:
                    again = self._ask(client, data, key, 0, i, port)
                    if again is None:
                        client.close()
                        client = self._connect(port) if self.reconnect else None
                    elif again != action:
                        self.errors.append(f"retry of {key} answered {again!r}, "
                                           f"first {action!r}")
            if client is not None:
                client.close()
        except Exception as exc:  # the test reports it; a thread must not die silently
            self.errors.append(f"worker {i}: {type(exc).__name__}: {exc}")

    def _ask(self, client: PolicyClient, data: bytes, key: str, n: int, worker: int,
             port: int) -> str | None:
        sent_at = time.monotonic()
        try:
            client.send(data)
            action = client.read_reply()
        except OSError:
            action = ""
        if not action:
            with self._lock:
                self.unanswered.append((key, n))
            return None
        now = time.monotonic()
        counted_key = key if n else ""
        with self._lock:
            self.replies.append(Reply(time.time(), now - sent_at, worker, port, counted_key,
                                      n, action))
        return action


def env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    return float(raw) if raw.strip() else default


# -- a database connection lost at the worst moment ------------------------------------


class CommitCutter:
    """A TCP proxy to MariaDB that, once armed, loses the reply to the COMMIT of one
    write transaction: the server commits, the client sees its connection drop.

    It reads the client's MySQL packets (3-byte length, sequence number, payload) to
    spot a COM_QUERY (0x03) ``COMMIT`` that follows an ``INSERT`` or ``UPDATE`` on the
    same connection; everything else passes through unchanged.

    ``lose="commit"`` drops the COMMIT itself instead, so the server rolls the
    transaction back; the client sees the same thing. ``partition``: from the cut on,
    every connection through the proxy is closed, new ones at once (a network partition
    between the daemon and its database).
    """

    def __init__(self, upstream: tuple[str, int], *, lose: str = "answer",
                 partition: bool = False) -> None:
        assert lose in ("answer", "commit")
        self.lose = lose
        self.partition = partition
        self.partitioned = threading.Event()
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="proxy", daemon=True).start()

    def arm(self) -> None:
        self.cut.clear()
        self.armed.set()

    def url(self, url: str) -> str:
        """``url`` with the proxy's port in place of the server's."""
        return url.replace(f":{self.upstream[1]}/", f":{self.port}/", 1)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.partitioned.is_set():
                client.close()
                continue
            server = socket.create_connection(self.upstream)
            with self._lock:
                self._socks += [client, server]
            state = {"wrote": False, "cutting": False}
            threading.Thread(target=self._up, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._down, args=(server, client, state),
                             daemon=True).start()

    def _up(self, client: socket.socket, server: socket.socket, state: dict[str, bool]) -> None:
        buf = b""
        try:
            while data := client.recv(65536):
                buf += data
                while len(buf) >= 4:
                    size = int.from_bytes(buf[:3], "little") + 4
                    if len(buf) < size:
                        break
                    packet, buf = buf[:size], buf[size:]
                    payload = packet[4:]
                    if payload[:1] == b"\x03":
                        query = payload[1:20].lstrip().upper()
                        if query.startswith((b"INSERT", b"UPDATE")):
                            state["wrote"] = True
                        elif query.startswith(b"COMMIT"):
                            if state["wrote"] and self.armed.is_set():
                                self.armed.clear()
                                state["cutting"] = True
                                if self.lose == "commit":
                                    # The server never sees the COMMIT; the closed
                                    # connection makes it roll back.
                                    self._cut(client, server)
                                    return
                            state["wrote"] = False
                    server.sendall(packet)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            server.shutdown(socket.SHUT_WR)

    def _down(self, server: socket.socket, client: socket.socket,
              state: dict[str, bool]) -> None:
        try:
            while data := server.recv(65536):
                if state["cutting"]:
                    # The server's answer to the COMMIT: it has committed. Drop the
                    # answer and the connection, as a network failure would.
                    self._cut(client, server)
                    return
                client.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_WR)

    def _cut(self, client: socket.socket, server: socket.socket) -> None:
        for s in (client, server):
            # shutdown() first: close() alone neither wakes the other thread blocked in
            # recv() on it nor sends the FIN while that thread holds it; the server
            # must see the connection end (and roll back an uncommitted transaction).
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        if self.partition:
            self.partitioned.set()
            with self._lock:
                for s in self._socks:
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                    with contextlib.suppress(OSError):
                        s.close()
        self.cut.set()
