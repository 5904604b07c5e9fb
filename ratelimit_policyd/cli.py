"""The ``ratelimit-policyd`` command: ``run`` the daemon, and admin subcommands.

Admin commands work on the database directly with the daemon's configuration; a running
daemon sees their changes at its next refresh (within about two flush intervals).
``status`` asks a running daemon over its control socket. Exit codes follow ``os.EX_*``
(``status``: the LSB codes, 3 when no daemon runs).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from ratelimit_policyd import __version__
from ratelimit_policyd.config import (
    CONFIG_ENV,
    DEFAULT_CONFIG_PATH,
    ConfigError,
    Settings,
    load,
    redact_url,
)
from ratelimit_policyd.model import Row
from ratelimit_policyd.status import rows_table
from ratelimit_policyd.storage.base import Storage
from ratelimit_policyd.storage.keymerge import KeyMerge

#: LSB exit codes of ``status`` (and of init scripts' ``status``).
STATUS_NOT_RUNNING = 3
STATUS_UNKNOWN = 4
#: Largest quota the schema's unsigned INT column holds.
MAX_QUOTA = 4_294_967_295


def _abspath(value: str | None) -> str | None:
    """Paths from the command line are made absolute now: ``run --daemon`` changes to
    ``/``, and a reload re-reads them from there."""
    return os.path.abspath(value) if value else value


def _run_overrides(ns: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line flags as config overrides (flags win over the file)."""
    o: dict[str, dict[str, Any]] = {}

    def put(section: str, key: str, value: Any) -> None:
        if value is not None:
            o.setdefault(section, {})[key] = value

    put("server", "listen", getattr(ns, "listen", None))
    put("server", "allowed_hosts", getattr(ns, "allowed_hosts", None))
    put("database", "url", getattr(ns, "db", None))
    put("limits", "default_quota", getattr(ns, "default_quota", None))
    put("limits", "period", getattr(ns, "period", None))
    put("limits", "key_type", getattr(ns, "key_type", None))
    put("limits", "over_quota_action", getattr(ns, "over_quota_action", None))
    put("limits", "on_db_error", getattr(ns, "on_db_error", None))
    put("cache", "flush_interval", getattr(ns, "flush_interval", None))
    put("log", "file", getattr(ns, "log_file", None))
    put("log", "level", getattr(ns, "log_level", None))
    put("daemon", "state_dir", _abspath(getattr(ns, "state_dir", None)))
    put("daemon", "pidfile", _abspath(getattr(ns, "pidfile", None)))
    put("daemon", "user", getattr(ns, "user", None))
    put("daemon", "group", getattr(ns, "group", None))
    put("server", "control_socket", _abspath(getattr(ns, "control_socket", None)))
    return o


def _config_path(ns: argparse.Namespace) -> tuple[str | None, bool]:
    """The config file to read, and whether it must exist (it must when named)."""
    if ns.config:
        return os.path.abspath(ns.config), True
    env = os.environ.get(CONFIG_ENV)
    if env:
        return os.path.abspath(env), True
    if os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH, True
    return None, False


def _settings(ns: argparse.Namespace) -> Settings:
    path, must = _config_path(ns)
    return load(path, _run_overrides(ns), must_exist=must)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML config file (default {DEFAULT_CONFIG_PATH} if it exists, "
                        f"or ${CONFIG_ENV})")
    p.add_argument("--db", metavar="URL",
                   help="sqlite:///ABS/PATH.sqlite3 or mysql://USER:PASSWORD@HOST:PORT/DB "
                        "(password also from the config file or $RATELIMIT_POLICYD_DB_PASSWORD)")
    p.add_argument("--state-dir", metavar="DIR", help="directory of the default SQLite database")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratelimit-policyd",
        description="Sender rate-limit policy daemon for Postfix.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon (foreground unless --daemon)")
    _add_common(run)
    run.add_argument("--listen", metavar="HOST:PORT", help="default 127.0.0.1:10032")
    run.add_argument("--default-quota", type=int, metavar="N", help="default 1000")
    run.add_argument("--period", choices=["hourly", "daily", "weekly", "monthly"],
                     help="default daily")
    run.add_argument("--key-type", choices=["email", "domain"], help="default email")
    run.add_argument("--flush-interval", type=float, metavar="SECONDS", help="default 2")
    run.add_argument("--log-file", metavar="PATH", help="'-' for stderr (default)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--allowed-hosts", metavar="LIST",
                     help="comma-separated addresses/networks (default 127.0.0.1,::1)")
    run.add_argument("--over-quota-action", metavar="ACTION",
                     help="reply over quota (default '471 {period} message quota exceeded')")
    run.add_argument("--on-db-error", choices=["dunno", "defer"])
    run.add_argument("--daemon", action="store_true",
                     help="detach into the background (SysV init); writes the pidfile")
    run.add_argument("--pidfile", metavar="PATH",
                     help="pidfile (default daemon.pidfile with --daemon; none in the "
                          "foreground unless given)")
    run.add_argument("--user", metavar="USER",
                     help="switch to this user after binding (when started as root)")
    run.add_argument("--group", metavar="GROUP", help="and this group (default: the user's)")
    run.add_argument("--control-socket", metavar="PATH",
                     help="unix socket for `status` (default STATE_DIR/control.sock)")

    p = sub.add_parser("status", help="print a running daemon's cache and statistics")
    _add_common(p)
    p.add_argument("--control-socket", metavar="PATH",
                   help="the daemon's control socket (default STATE_DIR/control.sock)")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long to wait for the answer (default 10)")

    p = sub.add_parser("check-config", help="validate the configuration and exit")
    _add_common(p)
    p = sub.add_parser("print-config", help="print every setting with its value")
    _add_common(p)
    p = sub.add_parser("init-db", help="create the table (and view) if missing")
    _add_common(p)
    p = sub.add_parser("show", help="show one key's row")
    _add_common(p)
    p.add_argument("key")
    p = sub.add_parser("set-quota", help="set a key's quota")
    _add_common(p)
    p.add_argument("key")
    p.add_argument("quota", type=int)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--persist", action="store_true", default=None,
                   help="keep this quota across window resets")
    g.add_argument("--no-persist", dest="persist", action="store_false",
                   help="reset to the default quota at the next window")
    p = sub.add_parser("reset", help="set a key's used counter to 0")
    _add_common(p)
    p.add_argument("key")
    p = sub.add_parser("delete", help="remove a key's row")
    _add_common(p)
    p.add_argument("key")
    p = sub.add_parser("list", help="list keys")
    _add_common(p)
    p.add_argument("--over-quota", action="store_true", help="only keys at or over quota")
    p.add_argument("--top", type=_positive_int, metavar="N",
                   help="the N keys with the highest usage")
    p = sub.add_parser("migrate-keys",
                       help="merge rows whose key is not lower case (the Perl daemon's) into "
                            "the lower-case key; a dry run unless --apply")
    _add_common(p)
    p.add_argument("--apply", action="store_true",
                   help="do the merge (default: print what would be done, change nothing)")
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    try:
        settings = _settings(ns)
    except ConfigError as exc:
        print("ratelimit-policyd: invalid configuration:", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return os.EX_CONFIG
    try:
        return _dispatch(ns, settings)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `ratelimit-policyd list | head`: the reader left; no traceback for that.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _dispatch(ns: argparse.Namespace, settings: Settings) -> int:
    cmd = ns.command
    if cmd == "run":
        return _cmd_run(ns, settings)
    if cmd == "status":
        return _cmd_status(ns, settings)
    if cmd == "check-config":
        from ratelimit_policyd.logs import log_problems

        # Not in load(): admin commands, run by other users, need not write the log.
        problems = log_problems(settings.log)
        if problems:
            print("ratelimit-policyd: invalid configuration:", file=sys.stderr)
            for problem in problems:
                print(f"  {problem}", file=sys.stderr)
            return os.EX_CONFIG
        print(f"configuration OK ({settings.source or 'built-in defaults'})")
        return os.EX_OK
    if cmd == "print-config":
        from dataclasses import fields

        for section in ("server", "limits", "database", "cache", "log", "daemon"):
            obj = getattr(settings, section)
            print(f"[{section}]")
            for f in fields(obj):
                value = getattr(obj, f.name)
                if f.name == "password" and value:
                    value = "***"
                elif f.name == "url" and value:
                    value = redact_url(value)
                print(f"{f.name} = {_toml(value)}")
            print()
        return os.EX_OK
    return _cmd_admin(ns, settings)


def _migrate_keys(storage: Storage, *, apply: bool) -> int:
    """``migrate-keys``: one transaction per lower-case key; a report per key."""
    from ratelimit_policyd.storage.base import StorageError
    from ratelimit_policyd.storage.keymerge import group_by_target

    groups = group_by_target(storage.mixed_case_rows())
    if not groups:
        print("no key that is not lower case: nothing to migrate")
        return os.EX_OK
    now = int(time.time())
    done = rows = conflicts = failed = 0
    for target, sources in groups.items():
        try:
            plan = storage.merge_keys(target, sources, now, apply=apply)
        except StorageError as exc:
            print(f"ratelimit-policyd: database: {target}: {exc}", file=sys.stderr)
            if exc.transient:
                print(f"ratelimit-policyd: stopped after {done} of {len(groups)} keys; "
                      "run the command again", file=sys.stderr)
                return os.EX_UNAVAILABLE
            failed += 1
            continue
        if plan is None:  # merged or deleted since they were listed
            continue
        done += 1
        rows += len(plan.sources)
        conflicts += plan.conflict
        for line in _merge_report(plan, apply):
            print(line)
        print()
    verb = "merged" if apply else "would merge"
    print(f"{verb} {rows} row(s) into {done} lower-case "
          f"key(s); {conflicts} quota conflict(s)"
          + (f"; {failed} key(s) failed (see above)" if failed else ""))
    if not apply:
        print("dry run: nothing was changed; run `ratelimit-policyd migrate-keys --apply` "
              "to merge")
    return os.EX_DATAERR if failed else os.EX_OK


def _merge_report(plan: KeyMerge, apply: bool) -> list[str]:
    from ratelimit_policyd.status import fmt_quota, fmt_time, table

    def window(r: Row) -> str:
        return "current" if plan.live(r) else "ended: not counted"

    rows = ([plan.target_row] if plan.target_row is not None else []) + list(plan.sources)
    lines = [f"{plan.target} <- {', '.join(r.sender for r in plan.sources)}"]
    lines += ["  " + ln for ln in table(
        ("SENDER", "QUOTA", "USED", "EXPIRY", "PERSIST", "WINDOW"),
        ((r.sender, fmt_quota(r.quota), r.used, fmt_time(r.expiry), "yes" if r.persist else "no",
          window(r)) for r in rows))]
    steps = []
    if plan.renamed is not None:
        steps.append(f"rename {plan.renamed} to {plan.target} (no lower-case row)")
    if plan.merged:
        steps.append(f"add {plan.added} to {plan.target}, then delete "
                     + ", ".join(r.sender for r in plan.merged))
    lines.append(("  done: " if apply else "  plan: ") + "; ".join(steps))
    after = plan.after
    used_after = after.used if after is not None else plan.used_after
    lines.append(f"  used in the current window: {plan.used_before} before, {used_after} after"
                 f" (window ends {fmt_time(after.expiry if after else plan.expiry)})")
    persist = "persistent" if plan.persist else "not persistent"
    lines.append(f"  quota: {plan.quota}, {persist}: {plan.quota_reason}")
    if plan.conflict:
        lines.append(f"  CONFLICT: persistent quotas disagree; {plan.quota} kept; check it "
                     f"with `ratelimit-policyd set-quota {plan.target} N --persist`")
    return lines


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _cmd_run(ns: argparse.Namespace, settings: Settings) -> int:
    from ratelimit_policyd.daemonize import RunOptions, StartError, serve
    from ratelimit_policyd.storage.base import StorageError

    d = settings.daemon
    opts = RunOptions(detach=ns.daemon, pidfile=d.pidfile if ns.daemon or ns.pidfile else "",
                      user=d.user, group=d.group)
    try:
        return serve(settings, _run_overrides(ns), opts)
    except StartError as exc:
        print(f"ratelimit-policyd: {exc}", file=sys.stderr)
        return exc.code
    except StorageError as exc:
        print(f"ratelimit-policyd: database: {exc}", file=sys.stderr)
        return os.EX_UNAVAILABLE
    except OSError as exc:
        print(f"ratelimit-policyd: cannot start: {exc}", file=sys.stderr)
        return os.EX_OSERR


def _cmd_status(ns: argparse.Namespace, settings: Settings) -> int:
    from ratelimit_policyd.control import ControlError, NotRunning, control_path, query

    path = control_path(settings)
    try:
        reply = query(path, "status", timeout=ns.timeout)
    except NotRunning as exc:
        print(f"ratelimit-policyd: {exc}", file=sys.stderr)
        return STATUS_NOT_RUNNING
    except ControlError as exc:
        print(f"ratelimit-policyd: {exc}", file=sys.stderr)
        return STATUS_UNKNOWN
    sys.stdout.write(reply)
    return os.EX_OK


def _cmd_admin(ns: argparse.Namespace, settings: Settings) -> int:
    from ratelimit_policyd.storage import open_storage, parse_url
    from ratelimit_policyd.storage.base import StorageError

    url = settings.db_url()
    if ns.command != "init-db" and url.startswith("sqlite:"):
        # Opening an SQLite file creates it: a wrong --db/--state-dir would otherwise
        # show an empty table instead of an error (and leave a stray database behind).
        path = parse_url(url).path  # checked by load(): a valid URL
        if not os.path.exists(path):
            print(f"ratelimit-policyd: no database at {path} (start the daemon once or run "
                  "init-db; check --config, --db and --state-dir)", file=sys.stderr)
            return os.EX_NOINPUT
    limits = settings.policy_limits()
    if ns.command == "set-quota" and not 0 <= ns.quota <= MAX_QUOTA:
        print(f"ratelimit-policyd: quota must be between 0 and {MAX_QUOTA}, got {ns.quota}",
              file=sys.stderr)
        return os.EX_USAGE
    if ns.command == "migrate-keys" and not limits.lowercase_keys:
        print("limits.lowercase_keys is false: keys are counted as stored, so every row is "
              "in use; nothing to migrate")
        return os.EX_OK
    key = getattr(ns, "key", None)
    if key is not None:
        key = key.strip()
        key = key.lower() if limits.lowercase_keys else key
        if not key or len(key) > limits.max_key_length:
            print(f"ratelimit-policyd: a key has 1 to {limits.max_key_length} characters, "
                  f"got {len(key)}", file=sys.stderr)
            return os.EX_USAGE
    try:
        storage = open_storage(url, names=settings.table_names(),
                               password=settings.db_password(), pool_size=1,
                               connect_timeout=settings.database.connect_timeout,
                               read_timeout=settings.database.read_timeout)
    except (StorageError, ValueError) as exc:
        print(f"ratelimit-policyd: database: {exc}", file=sys.stderr)
        return os.EX_UNAVAILABLE
    except OSError as exc:  # the password file
        print(f"ratelimit-policyd: {exc}", file=sys.stderr)
        return os.EX_NOINPUT
    try:
        if ns.command == "init-db":
            storage.init_schema()
            storage.check_schema()
            print("schema ready")
            return os.EX_OK
        storage.check_schema()
        if ns.command == "list":
            rows = list(storage.iter_rows())
            if ns.over_quota:
                now = time.time()
                rows = [r for r in rows
                        if r.quota is not None and r.used >= r.quota and r.expiry > now]
            rows.sort(key=lambda r: (-r.used, r.sender) if ns.top else (r.sender,))
            if ns.top:
                rows = rows[: ns.top]
            for line in rows_table(rows):
                print(line)
            return os.EX_OK
        if ns.command == "migrate-keys":
            return _migrate_keys(storage, apply=ns.apply)
        assert key is not None
        if ns.command == "show":
            row = storage.load([key]).get(key)
            if row is None:
                print(f"{key}: no row (quota would be the default, {limits.default_quota})",
                      file=sys.stderr)
                return 1
            for line in rows_table([row]):
                print(line)
            return os.EX_OK
        if ns.command == "set-quota":
            row = storage.set_quota(key, ns.quota, ns.persist,
                                    settings.calendar().next_boundary(time.time()))
            for line in rows_table([row]):
                print(line)
            return os.EX_OK
        if ns.command == "reset":
            reset_row = storage.reset(key)
            if reset_row is None:
                print(f"{key}: no row", file=sys.stderr)
                return 1
            for line in rows_table([reset_row]):
                print(line)
            return os.EX_OK
        if ns.command == "delete":
            if not storage.delete(key):
                print(f"{key}: no row", file=sys.stderr)
                return 1
            print(f"{key}: deleted")
            return os.EX_OK
        raise AssertionError(ns.command)
    except StorageError as exc:
        print(f"ratelimit-policyd: database: {exc}", file=sys.stderr)
        return os.EX_UNAVAILABLE
    finally:
        storage.close()
