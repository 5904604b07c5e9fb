"""Benchmark ratelimit-policyd against reference policy servers, in one command.

Builds the C load generator (benchmarks/loadgen.c) with ``cc``, starts each server
(reference servers, the daemon on SQLite, the daemon on a private MariaDB), drives it
with N persistent Postfix-like connections, checks every reply, and prints a markdown
report; the full results go to benchmarks/results/*.json. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
FIXTURES = REPO / "tests" / "data" / "postfix"
TEMPLATES = {"RCPT": "rcpt-sasl-alice-1.txt", "DATA": "data-sasl-alice-3rcpt.txt"}

REFS = ("readline", "asyncio", "null")
DAEMONS = ("sqlite", "mysql")
#: Reference servers that only check the generator's capacity (not competitors).
CAPACITY_REFS = ("asyncio", "null")
#: Reply words that mean "over quota" (the daemon's default is "471 <period> ...").
OVER_QUOTA_WORDS = ("DEFER", "DEFER_IF_PERMIT", "REJECT", "HOLD")

Json = dict[str, Any]


class BenchError(Exception):
    """A server or tool did not behave; the message says which and why."""


# --------------------------------------------------------------------- plan ----


@dataclass(frozen=True)
class Plan:
    """Everything one invocation will do, derived from the command line."""

    refs: tuple[str, ...]
    backends: tuple[str, ...]
    conns: tuple[int, ...]
    duration: float
    warmup: float
    senders: int
    dist: str
    zipf_s: float
    state: str
    rcpts: int
    quota: int
    flush_interval: float
    db_delay: float | None
    cold_frac: float
    flush_senders: int | None
    quick: bool
    repeat: int
    matrix: bool
    keep: bool
    check_targets: bool
    extra_daemon_args: tuple[str, ...]

    @property
    def capacity_conns(self) -> tuple[int, ...]:
        """Connection counts at which the capacity references run."""
        return (max(self.conns),) if self.quick else self.conns


def parse_args(argv: Sequence[str] | None = None) -> Plan:
    p = argparse.ArgumentParser(
        prog="python benchmarks/run.py",
        description="Benchmark ratelimit-policyd against reference Postfix policy servers.",
    )
    p.add_argument("--quick", action="store_true",
                   help="short runs (3 s per cell, capacity references only at the top "
                        "connection count): the whole default run in under ~2 minutes")
    p.add_argument("--backends", default="sqlite,mysql",
                   help="daemon backends, comma-separated, from sqlite,mysql; '' for none "
                        "(default %(default)s)")
    p.add_argument("--refs", default=",".join(REFS),
                   help="reference servers from readline,asyncio,null (default %(default)s)")
    p.add_argument("--conns", default="1,10,50,200",
                   help="persistent connections per cell (default %(default)s)")
    p.add_argument("--duration", type=float, help="measured seconds per cell (10; quick 3)")
    p.add_argument("--warmup", type=float, help="warm-up seconds per cell (2; quick 0.7)")
    p.add_argument("--senders", type=int, default=10000,
                   help="distinct SASL senders; every daemon sees each of them once before "
                        "the first cell, so this is also the memory run: RSS is reported "
                        "after them (default %(default)s)")
    p.add_argument("--dist", default="uniform", choices=("uniform", "zipf"),
                   help="how senders are chosen in the measured cells (default %(default)s)")
    p.add_argument("--zipf-s", type=float, default=1.0, help="zipf exponent (default 1.0)")
    p.add_argument("--state", default="RCPT", choices=("RCPT", "DATA"),
                   help="protocol_state of the requests (default %(default)s)")
    p.add_argument("--rcpts", type=int, default=None,
                   help="recipients per message: RCPT sends that many requests per message, "
                        "DATA sends recipient_count=N (default: RCPT 1, DATA 3)")
    p.add_argument("--quota", type=int, default=1000,
                   help="the daemon's --default-quota (default %(default)s)")
    p.add_argument("--flush-interval", type=float, default=2.0,
                   help="the daemon's --flush-interval (default %(default)s)")
    p.add_argument("--db-delay", type=float, metavar="MS",
                   help="extra scenario: MariaDB behind a proxy delaying each response by MS; "
                        "p99 of cached senders is compared with a 0 ms proxy")
    p.add_argument("--cold-frac", type=float, default=0.02,
                   help="share of never-seen senders in the --db-delay runs (default 0.02)")
    p.add_argument("--flush-senders", type=int, metavar="N",
                   help="extra scenario: N dirty senders, then SIGTERM; reports the final "
                        "flush and the startup time on the filled database")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of the main table; each cell shows the round with the median "
                        "rate (all rounds are in the JSON) (default %(default)s)")
    p.add_argument("--no-matrix", action="store_true",
                   help="skip the main table; run only the extra scenarios asked for")
    p.add_argument("--daemon-arg", action="append", default=[],
                   help="extra argument passed to the daemon (repeatable)")
    p.add_argument("--check-targets", action="store_true",
                   help="exit 1 when a target is missed (errors always exit 1)")
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    a = p.parse_args(argv)

    def names(text: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
        items = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [x for x in items if x not in allowed]
        if bad:
            p.error(f"unknown {what}: {', '.join(bad)} (choose from {', '.join(allowed)})")
        return items

    try:
        conns = tuple(sorted({int(x) for x in a.conns.split(",") if x.strip()}))
    except ValueError:
        p.error(f"--conns: expected numbers, got {a.conns!r}")
    if not conns or min(conns) < 1:
        p.error("--conns: at least one positive number")
    if a.senders < 1:
        p.error("--senders must be positive")
    return Plan(
        refs=names(a.refs, REFS, "reference server"),
        backends=names(a.backends, DAEMONS, "backend"),
        conns=conns,
        duration=a.duration if a.duration is not None else (3.0 if a.quick else 10.0),
        warmup=a.warmup if a.warmup is not None else (0.7 if a.quick else 2.0),
        senders=a.senders,
        dist=a.dist,
        zipf_s=a.zipf_s,
        state=a.state,
        rcpts=a.rcpts if a.rcpts is not None else (3 if a.state == "DATA" else 1),
        quota=a.quota,
        flush_interval=a.flush_interval,
        db_delay=a.db_delay,
        cold_frac=a.cold_frac,
        flush_senders=a.flush_senders,
        quick=a.quick,
        repeat=max(1, a.repeat),
        matrix=not a.no_matrix,
        keep=a.keep,
        check_targets=a.check_targets,
        extra_daemon_args=tuple(a.daemon_arg),
    )


# ---------------------------------------------------------------- helpers ----


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (kB) and Threads of a live process; empty when it is gone."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "Threads"):
                out[key] = int(value.split()[0])
    return out


def cpu_ticks(pid: int) -> int:
    """utime + stime of a process (all threads), in clock ticks; 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0
    return int(fields[11]) + int(fields[12])


def settle(pids: Sequence[int], limit: float = 10.0) -> tuple[float, float]:
    """Wait until these processes are quiet (< 5% of a CPU over 200 ms).

    Work a server defers (a flush, a log writer catching up) must not run into the next
    cell unseen. Returns (seconds waited, CPU seconds they used meanwhile).
    """
    hz = os.sysconf("SC_CLK_TCK")
    t0, start = time.monotonic(), sum(cpu_ticks(p) for p in pids)
    prev = start
    while time.monotonic() - t0 < limit:
        time.sleep(0.2)
        now = sum(cpu_ticks(p) for p in pids)
        if (now - prev) / hz < 0.01:
            break
        prev = now
    return time.monotonic() - t0, (prev - start) / hz


def count_lines(path: Path) -> int:
    n = 0
    with contextlib.suppress(OSError), path.open("rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


def tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def machine_busy(seconds: float = 1.0) -> float:
    """CPUs' worth of busy time on the machine over ``seconds`` (before we start)."""

    def ticks() -> tuple[int, int]:
        v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return sum(v) - v[3] - v[4], sum(v)

    b0, t0 = ticks()
    time.sleep(seconds)
    b1, t1 = ticks()
    return (b1 - b0) / max(t1 - t0, 1) * (os.cpu_count() or 1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class Service:
    """A process the benchmark starts, watches through /proc and stops by its pid."""

    live: list[Service] = []  # noqa: RUF012 -- every started process, for cleanup

    def __init__(self, name: str, argv: list[str], workdir: Path,
                 env: dict[str, str] | None = None) -> None:
        self.name, self.argv = name, argv
        self.out = workdir / f"{name}.out"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, port: int, timeout: float = 60.0) -> float:
        """Start; return seconds from exec to the first accepted TCP connection."""
        with self.out.open("ab") as out:
            t0 = time.monotonic()
            self.proc = subprocess.Popen(
                self.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, cwd=REPO)
        Service.live.append(self)
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode} at start:\n"
                                 f"{tail(self.out)}")
            with socket.socket() as s:
                s.settimeout(1.0)
                try:
                    s.connect(("127.0.0.1", port))
                except OSError:
                    pass
                else:
                    return time.monotonic() - t0
            if time.monotonic() > deadline:
                self.stop(5)
                raise BenchError(f"{self.name} not accepting on port {port} after {timeout} s:\n"
                                 f"{tail(self.out)}")
            time.sleep(0.002)

    def stop(self, timeout: float = 60.0) -> tuple[float, int | None]:
        """SIGTERM, wait; SIGKILL after ``timeout``. Returns (seconds, exit code)."""
        if self.proc is None or self.proc.poll() is not None:
            return 0.0, None if self.proc is None else self.proc.returncode
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code: int | None = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            code = None  # killed: reported as such
        with contextlib.suppress(ValueError):
            Service.live.remove(self)
        return time.monotonic() - t0, code


# -------------------------------------------------------------- generator ----


def build_loadgen(workdir: Path) -> Path:
    exe = workdir / "loadgen"
    cc = os.environ.get("CC", "cc")
    cmd = [cc, "-O2", "-std=gnu11", "-Wall", "-Wextra", "-o", str(exe),
           str(HERE / "loadgen.c"), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise BenchError(f"cannot build the load generator ({' '.join(cmd)}):\n{res.stderr}")
    return exe


def make_template(workdir: Path, state: str) -> Path:
    """A captured Postfix request with its per-request values replaced by markers."""
    src = FIXTURES / TEMPLATES[state]
    markers = {"sender": "@USER@", "sasl_username": "@USER@", "client_port": "@PORT@",
               "instance": "@INST@", "recipient": "@RCPT@", "queue_id": "@QID@",
               "recipient_count": "@RCOUNT@"}
    lines = []
    for line in src.read_text().split("\n"):
        if not line:
            continue
        name, _, value = line.partition("=")
        # keep empty values empty and recipient_count=0 at RCPT, as Postfix sends them
        if name in markers and value not in ("", "0"):
            line = f"{name}={markers[name]}"
        lines.append(line)
    text = "\n".join(lines) + "\n\n"
    if "@USER@" not in text:
        raise BenchError(f"{src} has no sasl_username to vary")
    dst = workdir / f"template-{state}.txt"
    dst.write_text(text)
    return dst


@dataclass
class Generator:
    exe: Path
    template: Path
    plan: Plan
    runs: int = 0

    def run(self, port: int, *, conns: int, label: str, pids: Sequence[int] = (),
            duration: float | None = None, warmup: float | None = None,
            requests: int | None = None, dist: str | None = None, senders: int | None = None,
            cold_frac: float = 0.0) -> Json:
        plan = self.plan
        self.runs += 1
        argv = [str(self.exe), "run", "--port", str(port), "--template", str(self.template),
                "--conns", str(conns), "--label", label, "--state", plan.state,
                "--rcpts", str(plan.rcpts), "--senders", str(senders or plan.senders),
                "--dist", dist or plan.dist, "--zipf-s", str(plan.zipf_s),
                "--seed", str(self.runs * 7919), "--timeout-ms", "10000",
                # never-seen senders of each run are distinct from every other run's
                "--cold-base", str(10**8 + self.runs * 10**7), "--cold-frac", str(cold_frac)]
        if requests is not None:
            argv += ["--requests", str(requests), "--warmup", "0", "--progress", "10"]
        else:
            argv += ["--duration", str(duration or plan.duration),
                     "--warmup", str(plan.warmup if warmup is None else warmup)]
        for pid in pids:
            argv += ["--pid", str(pid)]
        limit = 120 + (duration or plan.duration) + (requests or 0) / 500
        # a long prime prints progress lines: let them through to the terminal
        try:
            res = subprocess.run(argv, stdout=subprocess.PIPE, text=True, timeout=limit,
                                 stderr=None if requests and requests >= 100000
                                 else subprocess.PIPE, check=False)
        except subprocess.TimeoutExpired:
            raise BenchError(f"loadgen {label} did not finish within {limit:.0f} s") from None
        if res.returncode != 0 or not res.stdout.strip():
            raise BenchError(f"loadgen failed ({res.returncode}): {(res.stderr or '').strip()}")
        out: Json = json.loads(res.stdout)
        out["stderr"] = (res.stderr or "").strip()[-2000:]
        return out


# ---------------------------------------------------------------- MariaDB ----


class MariaDB:
    """A private mariadbd in a temporary directory, on a free loopback port."""

    user, password, database = "bench", "bench", "ratelimit"

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / "mariadb"
        self.sock = self.dir / "mysqld.sock"
        self.port = free_port()
        self.service: Service | None = None

    def start(self) -> float:
        for exe in ("mariadb-install-db", "mariadbd"):
            if not shutil.which(exe) and not Path(f"/usr/sbin/{exe}").exists():
                raise BenchError(f"{exe} not found (apt-get install mariadb-server)")
        data = self.dir / "data"
        data.mkdir(parents=True)
        t0 = time.monotonic()
        res = subprocess.run(
            [_which("mariadb-install-db"), "--no-defaults", f"--datadir={data}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise BenchError(f"mariadb-install-db failed:\n{res.stdout}\n{res.stderr}")
        self.service = Service("mariadbd", [
            _which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={data}",
            f"--socket={self.sock}", f"--port={self.port}", "--bind-address=127.0.0.1",
            f"--pid-file={self.dir / 'mysqld.pid'}", "--skip-name-resolve",
            "--innodb-buffer-pool-size=256M", "--max-connections=500",
        ], self.dir)
        self.service.start(self.port, timeout=120)
        with self.root() as cur:
            cur.execute(f"CREATE USER '{self.user}'@'127.0.0.1' IDENTIFIED BY '{self.password}'")
            cur.execute(f"GRANT ALL ON `{self.database}`.* TO '{self.user}'@'127.0.0.1'")
        return time.monotonic() - t0

    @contextlib.contextmanager
    def root(self, database: str | None = None) -> Iterator[Any]:
        import pymysql  # only needed when MariaDB is benchmarked
        from pymysql.constants import CLIENT

        conn = pymysql.connect(unix_socket=str(self.sock), user="root", database=database,
                               autocommit=True, client_flag=CLIENT.MULTI_STATEMENTS)
        try:
            with conn.cursor() as cur:
                yield cur
        finally:
            conn.close()

    def reset(self) -> str:
        """A fresh database with the repo's schema; returns what was applied."""
        with self.root() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")
            cur.execute(f"CREATE DATABASE `{self.database}`")
        schema = sorted((REPO / "sql" / "mysql").glob("*.sql"))
        with self.root(self.database) as cur:
            if schema:
                for path in schema:
                    cur.execute(path.read_text())
                    while cur.nextset():
                        pass
                return ", ".join(str(p.relative_to(REPO)) for p in schema)
            # the repo's schema file is not there yet: the Perl daemon's columns
            cur.execute(
                "CREATE TABLE ratelimit (id INT AUTO_INCREMENT PRIMARY KEY, "
                "sender VARCHAR(255) CHARACTER SET utf8 COLLATE utf8_bin NOT NULL UNIQUE, "
                "persist TINYINT(1) NOT NULL DEFAULT 0, quota INT UNSIGNED NOT NULL DEFAULT 0, "
                "used INT UNSIGNED NOT NULL DEFAULT 0, updated TIMESTAMP NOT NULL DEFAULT "
                "CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP, expiry INT UNSIGNED NULL)")
            return "built-in CREATE TABLE (sql/mysql/*.sql missing)"

    def totals(self) -> tuple[int, int]:
        with self.root(self.database) as cur:
            cur.execute("SELECT COUNT(*), COALESCE(SUM(used), 0) FROM ratelimit")
            rows, used = cur.fetchone()
        return int(rows), int(used)

    def url(self, port: int | None = None) -> str:
        return f"mysql://{self.user}@127.0.0.1:{port or self.port}/{self.database}"

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop(60)


def _which(exe: str) -> str:
    return shutil.which(exe) or f"/usr/sbin/{exe}"


# ------------------------------------------------------------ the servers ----


@dataclass
class Server:
    """One server under test, with what the benchmark learnt about it."""

    name: str
    kind: str  # "ref" or "daemon"
    service: Service
    port: int
    watch: list[tuple[str, int]] = field(default_factory=list)  # (role, pid) for CPU
    log_file: Path | None = None
    db_totals: Any = None  # callable returning (rows, sum(used)) after the stop
    info: Json = field(default_factory=dict)


class Bench:
    """Runs the plan; collects a JSON-able record of everything measured."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan, self.workdir = plan, workdir
        self.gen = Generator(build_loadgen(workdir), make_template(workdir, plan.state), plan)
        self.mariadb: MariaDB | None = None
        self.daemon_ok, self.daemon_why = self._probe_daemon()
        self.record: Json = {
            "meta": self._meta(),
            "servers": [],
            "cells": [],
            "scenarios": {},
            "problems": [],
        }

    # -- environment ------------------------------------------------------------

    def _meta(self) -> Json:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=False).stdout.strip()
        # the daemon runs from the working tree, which may hold uncommitted edits: name
        # them and hash the package source so that a result can be traced to its code
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--",
                                "ratelimit_policyd", "sql"],
                               capture_output=True, text=True, check=False).stdout.split("\n")
        digest = hashlib.sha256()
        for path in sorted((REPO / "ratelimit_policyd").rglob("*.py")):
            digest.update(path.relative_to(REPO).as_posix().encode() + b"\0")
            digest.update(path.read_bytes())
        return {
            "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git": rev or None,
            "uncommitted": [line[3:] for line in dirty if line.strip()],
            "source_sha256": digest.hexdigest()[:12],
            "python": platform.python_version(),
            "kernel": platform.release(),
            "ncpu": os.cpu_count(),
            "plan": {k: v for k, v in self.plan.__dict__.items()},
            "template": TEMPLATES[self.plan.state],
            "daemon_available": None,
        }

    def _probe_daemon(self) -> tuple[bool, str]:
        res = subprocess.run(
            [sys.executable, "-m", "ratelimit_policyd", "run", "--help"],
            capture_output=True, text=True, cwd=REPO, env=self._env(), check=False)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            return False, f"`python -m ratelimit_policyd run --help` failed: {last}"
        self.daemon_help = res.stdout
        return True, ""

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("RATELIMIT_POLICYD_CONFIG", None)
        return env

    def problem(self, text: str) -> None:
        log(f"PROBLEM: {text}")
        self.record["problems"].append(text)

    # -- starting servers -----------------------------------------------------

    def start_ref(self, name: str) -> Server:
        port = free_port()
        if name == "null":
            argv = [str(self.gen.exe), "serve", "--port", str(port)]
        else:
            argv = [sys.executable, str(HERE / f"ref_{name}.py"), "--port", str(port)]
        svc = Service(f"ref-{name}", argv, self.workdir)
        startup = svc.start(port)
        srv = Server(name, "ref", svc, port, watch=[("server", svc.pid)])
        srv.info.update(startup_s=startup, rss_start_kb=proc_status(svc.pid).get("VmRSS"))
        return srv

    def ensure_mariadb(self) -> MariaDB:
        if self.mariadb is None:
            log("starting a private mariadbd")
            self.mariadb = MariaDB(self.workdir)
            secs = self.mariadb.start()
            self.record["meta"]["mariadb_start_s"] = round(secs, 2)
        return self.mariadb

    def start_daemon(self, backend: str, *, tag: str = "", db_port: int | None = None,
                     flush_interval: float | None = None, log_level: str = "info",
                     fresh: bool = True) -> Server:
        name = f"{backend}{tag}"
        port = free_port()
        env = self._env()
        logf = self.workdir / f"daemon-{name}.log"
        state = self.workdir / f"state-{name}"
        state.mkdir(exist_ok=True)
        watch: list[tuple[str, int]] = []
        if backend == "sqlite":
            dbfile = self.workdir / f"{name}.sqlite3"
            if fresh:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{dbfile}{suffix}").unlink(missing_ok=True)
            url = f"sqlite://{dbfile}"
            schema = "created by the daemon"

            def totals() -> tuple[int, int]:
                with contextlib.closing(sqlite3.connect(dbfile)) as db:
                    rows, used = db.execute(
                        "SELECT COUNT(*), COALESCE(SUM(used), 0) FROM ratelimit").fetchone()
                return int(rows), int(used)
        else:
            maria = self.ensure_mariadb()
            schema = maria.reset() if fresh else "kept"
            url = maria.url(db_port)
            env["RATELIMIT_POLICYD_DB_PASSWORD"] = maria.password
            assert maria.service is not None
            watch.append(("mariadbd", maria.service.pid))
            totals = maria.totals
        argv = [sys.executable, "-m", "ratelimit_policyd", "run",
                "--listen", f"127.0.0.1:{port}", "--db", url,
                "--default-quota", str(self.plan.quota),
                "--log-file", str(logf), "--log-level", log_level,
                "--flush-interval", str(flush_interval or self.plan.flush_interval),
                "--state-dir", str(state), *self.plan.extra_daemon_args]
        svc = Service(f"daemon-{name}", argv, self.workdir, env=env)
        startup = svc.start(port)
        srv = Server(name, "daemon", svc, port, watch=[("server", svc.pid), *watch],
                     log_file=logf, db_totals=totals)
        srv.info.update(startup_s=startup, schema=schema, url=url,
                        rss_start_kb=proc_status(svc.pid).get("VmRSS"))
        return srv

    def stop(self, srv: Server, timeout: float = 120.0) -> None:
        status = proc_status(srv.service.pid)
        srv.info["rss_end_kb"] = status.get("VmRSS")
        srv.info["hwm_kb"] = status.get("VmHWM")
        secs, code = srv.service.stop(timeout)
        srv.info.update(stop_s=secs, exit_code=code)
        if code != 0:
            self.problem(f"{srv.name}: exit code {code} after SIGTERM"
                         + (" (killed after timeout)" if code is None else ""))
        if srv.log_file is not None:
            srv.info["log_lines"] = count_lines(srv.log_file)

    # -- measuring ------------------------------------------------------------

    def measure(self, srv: Server, conns: int, *, label: str | None = None,
                cold_frac: float = 0.0, scenario: str = "matrix") -> Json:
        pids = [pid for _, pid in srv.watch]
        # the other servers started for the interleaved table sit idle meanwhile; what
        # they still use (a flusher's rounds) is measured, not blamed on other jobs
        bystanders = [p.pid for p in Service.live
                      if p.proc is not None and p.pid not in pids and p.proc.poll() is None]
        idle0 = sum(cpu_ticks(p) for p in bystanders)
        out = self.gen.run(srv.port, conns=conns, label=label or f"{srv.name}-c{conns}",
                           pids=pids, cold_frac=cold_frac)
        idle_cpu = (sum(cpu_ticks(p) for p in bystanders) - idle0) / os.sysconf("SC_CLK_TCK")
        cell = summarize(out, srv, scenario)
        cell["bystander_cpu_pct"] = round(100 * idle_cpu / out["window_s"], 1)
        cell["foreign_cpu_pct"] = round(max(0.0, cell["foreign_cpu_pct"]
                                            - cell["bystander_cpu_pct"]), 1)
        cell["settle_s"], cell["settle_cpu_s"] = settle([pid for _, pid in srv.watch])
        status = proc_status(srv.service.pid)
        cell.update(rss_kb=status.get("VmRSS"), hwm_kb=status.get("VmHWM"),
                    threads=status.get("Threads"))
        srv.info.setdefault("counted", 0)
        srv.info["counted"] += out["total_counted"]
        srv.info.setdefault("unanswered_counted", 0)
        srv.info["unanswered_counted"] += out["total_sent"] - out["total_replies"]
        if cell["errors"]:
            self.problem(f"{cell['label']}: {cell['errors']} errors {out['errors']} "
                         f"{out['bad_sample']!r}")
        if cell["other"]:
            self.problem(f"{cell['label']}: {cell['other']} replies neither DUNNO nor over quota: "
                         f"{out['actions']}")
        log(f"{cell['label']}: {cell['rate']:.0f}/s p99 {cell['p99_ms']:.2f} ms "
            f"p99.9 {cell['p999_ms']:.2f} ms, server CPU {cell['server_cpu_us']} us/decision, "
            f"loadgen CPU {cell['loadgen_cpu_pct']:.0f}%")
        return cell

    def prime(self, srv: Server, senders: int, *, conns: int = 50) -> Json:
        """Send one request for each of ``senders`` distinct senders, in order."""
        before = proc_status(srv.service.pid).get("VmRSS")
        out = self.gen.run(srv.port, conns=min(conns, senders), label=f"{srv.name}-prime",
                           pids=[pid for _, pid in srv.watch], requests=senders, dist="seq",
                           senders=senders)
        srv.info.setdefault("counted", 0)
        srv.info["counted"] += out["total_counted"]
        srv.info.setdefault("unanswered_counted", 0)
        srv.info["unanswered_counted"] += out["total_sent"] - out["total_replies"]
        errors = sum(v for k, v in out["errors"].items() if k != "unanswered_at_end")
        if errors:
            self.problem(f"{srv.name} prime: {errors} errors {out['errors']} "
                         f"{out['bad_sample']!r}")
        after = proc_status(srv.service.pid).get("VmRSS")
        res = {"senders": senders, "rate": out["rate"], "errors": errors,
               "p99_ms": out["latency"]["p99_us"] / 1000, "rss_before_kb": before,
               "rss_after_kb": after,
               "bytes_per_sender": (round((after - before) * 1024 / senders)
                                    if before and after else None)}
        log(f"{srv.name}: primed {senders} senders at {out['rate']:.0f}/s, "
            f"RSS {before} -> {after} kB")
        return res

    def check_db(self, srv: Server, expect_rows: int | None = None) -> Json:
        """After the stop: every counted recipient must be in the table, once."""
        rows, used = srv.db_totals()
        lo = srv.info.get("counted", 0)
        hi = lo + srv.info.get("unanswered_counted", 0) * self.plan.rcpts
        ok = lo <= used <= hi and (expect_rows is None or rows == expect_rows)
        res = {"rows": rows, "sum_used": used, "expected_used": lo, "ok": ok}
        if expect_rows is not None:
            res["expected_rows"] = expect_rows
        if not ok:
            self.problem(f"{srv.name}: database holds rows={rows} sum(used)={used}, expected "
                         f"used={lo}" + (f"..{hi}" if hi != lo else "")
                         + (f" rows={expect_rows}" if expect_rows is not None else "")
                         + " (a window reset during the run also explains a lower sum)")
        return res

    # -- the matrix -----------------------------------------------------------

    def run_matrix(self) -> None:
        """Start every server, then measure them interleaved, one connection count at a
        time, so that a change in the machine's background load hits all of them alike
        (the box is shared) instead of skewing one server's column."""
        plan = self.plan
        servers: list[Server] = []
        starters: list[tuple[str, Any, bool]] = [
            (name, lambda name=name: self.start_ref(name), False) for name in plan.refs]
        for backend in plan.backends:
            if not self.daemon_ok:
                self.problem(f"daemon on {backend}: N/A, {self.daemon_why}")
                continue
            starters.append((backend, lambda b=backend: self.start_daemon(b), True))
        try:
            for name, start, prime in starters:
                try:
                    srv: Server = start()
                    log(f"{srv.name}: accepting after {srv.info['startup_s']:.3f} s")
                    servers.append(srv)
                    if prime:
                        srv.info["prime"] = self.prime(srv, plan.senders)
                except BenchError as exc:
                    self.problem(f"{name}: {exc}")
            broken: set[str] = set()
            for rnd in range(plan.repeat):
                for conns in plan.conns:
                    for srv in servers:
                        if srv.name in broken or (srv.name in CAPACITY_REFS
                                                  and conns not in plan.capacity_conns):
                            continue
                        try:
                            cell = self.measure(srv, conns)
                        except BenchError as exc:
                            self.problem(f"{srv.name}: {exc}")
                            broken.add(srv.name)
                            continue
                        cell["round"] = rnd
                        self.record["cells"].append(cell)
        finally:
            for srv in servers:
                self.stop(srv)
                if srv.kind == "daemon":
                    try:
                        srv.info["db"] = self.check_db(srv)
                    except Exception as exc:  # the report must still be written
                        self.problem(f"{srv.name}: cannot read the database: {exc}")
                self.record["servers"].append({"name": srv.name, "kind": srv.kind, **srv.info})

    # -- extra scenarios ------------------------------------------------------

    def run_db_delay(self) -> None:
        """Cached senders' latency while misses wait on a slow database."""
        plan = self.plan
        assert plan.db_delay is not None
        if not self.daemon_ok or "mysql" not in plan.backends:
            self.record["scenarios"]["db_delay"] = {
                "status": "N/A: needs the daemon and the mysql backend"}
            return
        runs = []
        hot = min(plan.senders, 10000)
        conns = max(plan.conns)
        maria = self.ensure_mariadb()
        pport = free_port()
        # one daemon for both runs, behind a proxy whose delay is off while the hot
        # senders are primed (a slow prime proves nothing) and for the first run
        proxy = Service("delayproxy", [
            sys.executable, str(HERE / "delayproxy.py"), "--port", str(pport), "--off",
            "--upstream", f"127.0.0.1:{maria.port}", "--delay-ms", str(plan.db_delay)],
            self.workdir)
        try:
            proxy.start(pport)
            srv = self.start_daemon("mysql", tag="-delayproxy", db_port=pport)
        except BenchError as exc:
            proxy.stop(10)
            self.problem(f"db-delay: {exc}")
            self.record["scenarios"]["db_delay"] = {"status": f"failed: {exc}"}
            return
        srv.watch.append(("delayproxy", proxy.pid))
        try:
            prime = self.prime(srv, hot)
            assert proxy.proc is not None
            for delay in (0.0, plan.db_delay):
                proxy.proc.send_signal(signal.SIGUSR1 if delay else signal.SIGUSR2)
                cell = self.measure(srv, conns, label=f"mysql-delay{delay:g}ms-c{conns}",
                                    cold_frac=plan.cold_frac, scenario="db_delay")
                cell.update(delay_ms=delay, hot_senders=hot, prime_rate=prime["rate"])
                runs.append(cell)
        except (BenchError, subprocess.TimeoutExpired) as exc:
            self.problem(f"db-delay: {exc}")
        finally:
            self.stop(srv)
            proxy.stop(10)
        db = None
        with contextlib.suppress(Exception):
            db = self.check_db(srv)
        self.record["scenarios"]["db_delay"] = {"status": "ok", "runs": runs, "db": db,
                                                "cold_frac": plan.cold_frac}

    def run_flush(self) -> None:
        """N dirty senders, SIGTERM: the final flush; then a start on the filled table."""
        plan = self.plan
        n = plan.flush_senders
        assert n is not None
        out: list[Json] = []
        for backend in plan.backends:
            if not self.daemon_ok:
                out.append({"backend": backend, "status": f"N/A: {self.daemon_why}"})
                continue
            try:
                # a flush interval of an hour keeps every count pending until the stop;
                # debug level makes the flusher log "flushed N keys in S s"
                srv = self.start_daemon(backend, tag="-flush", flush_interval=3600,
                                        log_level="debug")
            except BenchError as exc:
                self.problem(f"flush scenario on {backend}: {exc}")
                continue
            res: Json = {"backend": backend, "senders": n}
            try:
                res["prime"] = self.prime(srv, n)
            except (BenchError, subprocess.TimeoutExpired) as exc:
                self.problem(f"flush scenario on {backend}: {exc}")
            finally:
                self.stop(srv, timeout=600)
            res["stop_s"] = srv.info["stop_s"]
            res["exit_code"] = srv.info["exit_code"]
            res["flush_log"] = flush_lines(srv.log_file)
            with contextlib.suppress(Exception):
                res["db"] = self.check_db(srv, expect_rows=n)
            # startup on a table that now holds n rows
            try:
                again = self.start_daemon(backend, tag="-flush", fresh=False)
                res["startup_filled_s"] = again.info["startup_s"]
                self.stop(again)
            except BenchError as exc:
                self.problem(f"restart on the filled {backend} table: {exc}")
            out.append(res)
        self.record["scenarios"]["flush"] = {"status": "ok", "runs": out}


def flush_lines(path: Path | None) -> Json:
    """What the daemon's log says about its flushes (N/A when it says nothing)."""
    if path is None:
        return {"status": "N/A"}
    pat = re.compile(r"flushed (\d+) keys in ([\d.]+) ?s")
    found = []
    with contextlib.suppress(OSError), path.open(errors="replace") as f:
        for line in f:
            if "flush" in line and (m := pat.search(line)):
                found.append((int(m.group(1)), float(m.group(2))))
    if not found:
        return {"status": "N/A: no 'flushed N keys in S s' line in the daemon's log"}
    biggest = max(found)
    return {"status": "ok", "rounds": len(found), "largest_keys": biggest[0],
            "largest_s": biggest[1], "last_keys": found[-1][0], "last_s": found[-1][1]}


def classify(actions: dict[str, int]) -> tuple[int, int, int]:
    """(DUNNO, over quota, other) counts from the generator's first-word histogram."""
    dunno = over = other = 0
    for word, n in actions.items():
        if word == "DUNNO":
            dunno += n
        elif re.fullmatch(r"[45]\d\d", word) or word in OVER_QUOTA_WORDS:
            over += n
        else:
            other += n
    return dunno, over, other


def summarize(out: Json, srv: Server, scenario: str) -> Json:
    n = out["window_replies"] or 1
    win = out["window_s"]
    cpu = {role: w["cpu_s"] for (role, _), w in zip(srv.watch, out["watched"], strict=True)}
    dunno, over, other = classify(out["actions"])
    lat = out["latency"]
    errors = sum(v for k, v in out["errors"].items() if k != "unanswered_at_end")
    cell: Json = {
        "scenario": scenario, "server": srv.name, "kind": srv.kind, "label": out["label"],
        "conns": out["conns"], "rate": out["rate"], "window_s": win, "ramp_s": out["ramp_s"],
        "decisions": out["window_replies"],
        **{f"{k}_ms": round(lat[f"{k}_us"] / 1000, 4)
           for k in ("p50", "p90", "p99", "p999", "max", "mean")},
        "hot": out["latency_hot"], "cold": out["latency_cold"],
        "server_cpu_us": (round(cpu["server"] * 1e6 / n, 1) if cpu.get("server", -1) >= 0
                          else None),
        "server_cpu_pct": (round(100 * cpu["server"] / win, 1) if cpu.get("server", -1) >= 0
                           else None),
        "loadgen_cpu_pct": out["loadgen_cpu_pct"],
        "loadgen_cpu_us": out["loadgen_cpu_us_per_req"],
        "machine_busy_pct": out["machine_busy_pct"],
        "dunno": dunno, "over_quota": over, "other": other, "actions": out["actions"],
        "errors": errors, "error_detail": out["errors"], "bad_sample": out["bad_sample"],
    }
    # CPU of the whole machine used neither by the processes measured here nor by
    # interrupts (loopback TCP runs partly in softirq, charged to no process): other
    # jobs on a shared box. A noise indicator, in percent of one CPU.
    ours = sum(max(v, 0.0) for v in cpu.values()) + out["loadgen_cpu_s"]
    busy = ((out["machine_busy_pct"] - out["machine_intr_pct"] - out["machine_steal_pct"])
            / 100 * out["ncpu"] * win)
    cell["foreign_cpu_pct"] = round(max(0.0, busy - ours) * 100 / win, 1)
    for role, secs in cpu.items():
        if role != "server":
            cell[f"{role}_cpu_us"] = round(secs * 1e6 / n, 1) if secs >= 0 else None
    return cell


# ---------------------------------------------------------------- report ----


def fmt(v: Any, spec: str = ".2f") -> str:
    if v is None:
        return "N/A"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def median_cells(record: Json) -> list[Json]:
    """One cell per (server, conns): the round with the median rate, with the spread."""
    groups: dict[tuple[str, int], list[Json]] = {}
    for c in record["cells"]:
        if c["scenario"] == "matrix":
            groups.setdefault((c["server"], c["conns"]), []).append(c)
    order = {name: i for i, name in enumerate(REFS + DAEMONS)}
    out = []
    for key in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1])):
        rounds = sorted(groups[key], key=lambda c: c["rate"])
        cell = dict(rounds[(len(rounds) - 1) // 2])
        cell["rounds"] = len(rounds)
        cell["rate_min"], cell["rate_max"] = rounds[0]["rate"], rounds[-1]["rate"]
        out.append(cell)
    return out


def render(record: Json) -> str:
    plan = record["meta"]["plan"]
    cells = median_cells(record)
    L: list[str] = []
    meta = record["meta"]
    L.append(f"# ratelimit-policyd benchmark ({meta['started']}, git {meta['git'] or 'none'}"
             + (f" + {len(meta['uncommitted'])} uncommitted files" if meta.get("uncommitted")
                else "") + f", source {meta.get('source_sha256', '?')})")
    L.append("")
    L.append(f"{record['meta']['ncpu']} CPUs, Python {record['meta']['python']}; "
             f"{plan['state']} requests ({record['meta']['template']}), "
             f"{plan['senders']} senders ({plan['dist']}), quota {plan['quota']}, "
             f"flush interval {plan['flush_interval']} s, per-request log line on; "
             f"{plan['duration']} s per cell after {plan['warmup']} s warm-up"
             + (f", median of {plan['repeat']} rounds (min-max in brackets)"
                if plan.get("repeat", 1) > 1 else "") + ". "
             "Servers are measured interleaved at each connection count. "
             "Latency: request written to reply read, closed loop, one request in flight "
             "per connection.")
    L.append("")
    if cells:
        L.extend(render_matrix(cells))
    daemons = [s for s in record["servers"] if s["kind"] == "daemon"]
    if daemons:
        L.extend(render_daemons(daemons))
    if cells:
        L.extend(render_targets(cells, plan))
    L.extend(render_scenarios(record))
    refs_started = [s for s in record["servers"] if s["kind"] == "ref"]
    if refs_started or daemons:
        L.append("Startup (exec to first accepted connection): " + ", ".join(
            f"{s['name']} {s['startup_s']:.3f} s" for s in refs_started + daemons) + ".")
        L.append("")
    if record["problems"]:
        L.append("## Problems")
        L.extend(f"- {p}" for p in record["problems"])
    else:
        L.append("No errors: every reply was `action=...` followed by an empty line, no "
                 "connection was dropped, and the database sums matched the counted requests.")
    return "\n".join(L) + "\n"


def render_matrix(cells: list[Json]) -> list[str]:
    L: list[str] = []
    L.append("| server | conns | decisions/s | vs readline | p50 ms | p99 ms | p99.9 ms | max ms "
             "| server CPU us/dec | server CPU % | DB CPU us/dec | loadgen CPU % "
             "| other jobs CPU % | RSS MB (peak) | DUNNO | over quota | other | errors |")
    L.append("|" + "---|" * 18)
    base = {c["conns"]: c["rate"] for c in cells if c["server"] == "readline"}
    for c in cells:
        ratio = (f"{c['rate'] / base[c['conns']]:.2f}x"
                 if c["server"] != "readline" and base.get(c["conns"]) else "")
        rss = (f"{c['rss_kb'] / 1024:.0f} ({c['hwm_kb'] / 1024:.0f})"
               if c.get("rss_kb") and c.get("hwm_kb") else "N/A")
        rate = f"{c['rate']:.0f}"
        if c["rounds"] > 1:
            rate += f" ({c['rate_min']:.0f}-{c['rate_max']:.0f})"
        L.append(f"| {c['server']} | {c['conns']} | {rate} | {ratio} "
                 f"| {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | {c['p999_ms']:.2f} "
                 f"| {c['max_ms']:.1f} | {fmt(c['server_cpu_us'], '.0f')} "
                 f"| {fmt(c['server_cpu_pct'], '.0f')} | {fmt(c.get('mariadbd_cpu_us'), '.0f')} "
                 f"| {c['loadgen_cpu_pct']:.0f} | {c['foreign_cpu_pct']:.0f} | {rss} "
                 f"| {c['dunno']} | {c['over_quota']} "
                 f"| {c['other']} | {c['errors']} |")
    L.append("")
    slow = [c for c in cells if c["ramp_s"] < 0 or c["ramp_s"] > 0.5]
    if slow:
        L.append("Connection ramp (the window opens once every connection has had a reply; "
                 "a small listen backlog delays a burst of connects): " + ", ".join(
                     f"{c['server']} {c['conns']} conns "
                     + (f"{c['ramp_s']:.1f} s" if c["ramp_s"] >= 0 else "never complete")
                     for c in slow) + ".")
        L.append("")

    # generator capacity: the fastest cell of all, against a trivial server
    refs = [c for c in cells if c["server"] in CAPACITY_REFS]
    others = [c for c in cells if c["server"] not in CAPACITY_REFS]
    if refs:
        top = max(refs, key=lambda c: c["rate"])
        L.append(f"**Generator ceiling:** {top['rate']:.0f} decisions/s against the trivial "
                 f"`{top['server']}` server at {top['conns']} connections, with the generator "
                 f"at {top['loadgen_cpu_pct']:.0f}% of one CPU "
                 f"({top['loadgen_cpu_us']:.1f} us CPU per request, i.e. about "
                 f"{1e6 / max(top['loadgen_cpu_us'], 0.01):.0f} requests/s per CPU).")
        if others:
            fastest = max(others, key=lambda c: c["rate"])
            L.append(f"The fastest measured server cell ({fastest['server']}, "
                     f"{fastest['conns']} conns, {fastest['rate']:.0f}/s) is "
                     f"{100 * fastest['rate'] / top['rate']:.0f}% of that ceiling; in it the "
                     f"generator used {fastest['loadgen_cpu_pct']:.0f}% of one CPU.")
        L.append("")
    return L


def render_daemons(daemons: list[Json]) -> list[str]:
    L: list[str] = []
    if daemons:
        L.append("| daemon | startup s | senders primed | prime rate/s | RSS after start MB "
                 "| RSS after senders MB | bytes/sender | peak RSS MB | stop s | log lines "
                 "| DB rows | DB sum(used) = counted |")
        L.append("|" + "---|" * 12)
        for s in daemons:
            pr, db = s.get("prime", {}), s.get("db", {})
            L.append(
                f"| {s['name']} | {s['startup_s']:.3f} | {pr.get('senders', 'N/A')} "
                f"| {fmt(pr.get('rate'), '.0f')} | {fmt(_mb(s.get('rss_start_kb')))} "
                f"| {fmt(_mb(pr.get('rss_after_kb')))} | {fmt(pr.get('bytes_per_sender'))} "
                f"| {fmt(_mb(s.get('hwm_kb')))} | {fmt(s.get('stop_s'))} "
                f"| {s.get('log_lines', 'N/A')} | {db.get('rows', 'N/A')} "
                f"| {db.get('sum_used', 'N/A')} = {db.get('expected_used', 'N/A')} "
                f"{'ok' if db.get('ok') else 'MISMATCH' if db else ''} |")
        L.append("")
    return L


def _mb(kb: int | None) -> float | None:
    return None if kb is None else kb / 1024


def render_targets(cells: list[Json], plan: Json) -> list[str]:
    base = {c["conns"]: c["rate"] for c in cells if c["server"] == "readline"}
    L = ["## Targets", ""]
    for backend in DAEMONS:
        mine = {c["conns"]: c for c in cells if c["server"] == backend}
        if not mine:
            L.append(f"- {backend}: not measured")
            continue
        for conns in (50, 200):
            c = mine.get(conns)
            if c is None or conns not in base:
                L.append(f"- {backend} at {conns} conns vs bare readline: not measured")
                continue
            ratio = c["rate"] / base[conns]
            L.append(f"- {backend} at {conns} conns: {c['rate']:.0f}/s = {ratio:.2f}x bare "
                     f"readline ({base[conns]:.0f}/s), target >= 1.0x: "
                     f"{'PASS' if ratio >= 1.0 else 'FAIL'}")
        c = mine.get(200)
        if c is not None:
            L.append(f"- {backend} at 200 conns: p99 {c['p99_ms']:.2f} ms (target < 5 ms: "
                     f"{'PASS' if c['p99_ms'] < 5 else 'FAIL'}), p99.9 {c['p999_ms']:.2f} ms "
                     f"(target < 20 ms: {'PASS' if c['p999_ms'] < 20 else 'FAIL'})")
    if plan["senders"] != 10000 or plan["state"] != "RCPT":
        L.append("- (the targets are defined for 10000 senders, RCPT; this run differs)")
    L.append("")
    return L


def render_scenarios(record: Json) -> list[str]:
    L: list[str] = []
    sc = record["scenarios"]
    if "db_delay" in sc:
        d = sc["db_delay"]
        L += ["## Slow database (delay proxy in front of MariaDB)", ""]
        if d["status"] != "ok":
            L += [d["status"], ""]
        else:
            L.append(f"{100 * d['cold_frac']:g}% of requests are for never-seen senders "
                     "(each a cache miss that must read the database); the rest for primed, "
                     "cached senders.")
            L.append("")
            L.append("| DB delay ms | conns | decisions/s | cached p50 ms | cached p99 ms "
                     "| cached p99.9 ms | cached max ms | miss p50 ms | miss p99 ms | misses "
                     "| errors |")
            L.append("|" + "---|" * 11)
            for r in d["runs"]:
                h, m = r["hot"], r["cold"]
                L.append(f"| {r['delay_ms']:g} | {r['conns']} | {r['rate']:.0f} "
                         f"| {h['p50_us'] / 1000:.2f} | {h['p99_us'] / 1000:.2f} "
                         f"| {h['p999_us'] / 1000:.2f} | {h['max_us'] / 1000:.1f} "
                         f"| {m['p50_us'] / 1000:.2f} | {m['p99_us'] / 1000:.2f} | {m['n']} "
                         f"| {r['errors']} |")
            L.append("")
    if "flush" in sc:
        L += ["## Flush of dirty senders (SIGTERM with every count pending)", ""]
        L.append("| backend | dirty senders | SIGTERM to exit s | flush time from log s "
                 "| DB rows | DB sum(used) | startup on filled table s |")
        L.append("|" + "---|" * 7)
        for r in sc["flush"]["runs"]:
            if "status" in r:
                L.append(f"| {r['backend']} | {r['status']} | | | | | |")
                continue
            fl, db = r.get("flush_log", {}), r.get("db", {})
            flog = (f"{fl['last_s']:.3f} ({fl['last_keys']} keys)" if fl.get("status") == "ok"
                    else fl.get("status", "N/A"))
            L.append(f"| {r['backend']} | {r['senders']} | {fmt(r.get('stop_s'), '.2f')} "
                     f"| {flog} | {db.get('rows', 'N/A')} | {db.get('sum_used', 'N/A')} "
                     f"| {fmt(r.get('startup_filled_s'), '.3f')} |")
        L.append("")
    return L


# ------------------------------------------------------------------ main ----


def main(argv: Sequence[str] | None = None) -> int:
    plan = parse_args(argv)
    t0 = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="ratelimit-bench-"))
    RESULTS.mkdir(exist_ok=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    bench: Bench | None = None
    try:
        bench = Bench(plan, workdir)
        bench.record["meta"]["daemon_available"] = bench.daemon_ok or bench.daemon_why
        idle_busy = machine_busy()
        bench.record["meta"]["busy_cpus_before_start"] = round(idle_busy, 2)
        if idle_busy > 0.3:
            log(f"warning: the machine is already busy ({idle_busy:.1f} CPUs) before the "
                "benchmark starts; numbers will be noisy (see 'other jobs CPU %')")
        if not bench.daemon_ok and plan.backends:
            log(f"daemon not available: {bench.daemon_why}")
        if plan.matrix:
            bench.run_matrix()
        if plan.db_delay is not None:
            bench.run_db_delay()
        if plan.flush_senders:
            bench.run_flush()
    except BenchError as exc:
        log(f"error: {exc}")
        if bench is None:
            return 2
        bench.problem(str(exc))
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        for svc in list(Service.live):  # children we started, by pid, never by name
            svc.stop(10)
        if bench is not None and bench.mariadb is not None:
            bench.mariadb.stop()
        if plan.keep:
            log(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    record = bench.record
    record["meta"]["total_s"] = round(time.monotonic() - t0, 1)
    report = render(record)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"bench-{stamp}.json").write_text(json.dumps(record, indent=1) + "\n")
    (RESULTS / f"bench-{stamp}.md").write_text(report)
    print(report)
    log(f"done in {record['meta']['total_s']} s; results in "
        f"{(RESULTS / f'bench-{stamp}.json').relative_to(REPO)}")
    if record["problems"]:
        return 1
    if plan.check_targets and "FAIL" in "\n".join(render_targets(
            median_cells(record), record["meta"]["plan"])):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
