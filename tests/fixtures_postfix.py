"""A private, loopback-only Postfix instance for end-to-end tests (a pytest plugin).

Each instance has its own config, queue and data directories in a temp dir, smtpd on
127.0.0.1:<free port> with Cyrus SASL (sasldb), every transport set to discard, and a
`check_policy_service` placed at RCPT or DATA. It never touches /etc/postfix/main.cf.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

Placement = Literal["rcpt", "data"]

#: The restriction list that gets the policy check, per placement. "rcpt": with the default
#: smtpd_delay_reject=yes a check in smtpd_sender_restrictions runs once per RCPT.
PLACEMENT_PARAMETER: dict[Placement, str] = {
    "rcpt": "smtpd_sender_restrictions",
    "data": "smtpd_data_restrictions",
}

#: SASL users in the instance's sasldb: login name -> password.
USERS: dict[str, str] = {
    "alice@example.com": "alice-secret",
    "bob@example.com": "bob-secret",
    "carol@other.org": "carol-secret",
}

#: Unauthenticated clients may send to this domain (relay_domains); anything else needs AUTH.
RELAY_DOMAIN = "e2e.test"

#: What Postfix answers when the policy service cannot be reached (tests assert this text).
POLICY_DOWN_ACTION = "451 4.3.5 policy service down"

_READY_TIMEOUT = 30.0
_CI_HINT = "run tests/install-postfix.sh as root"

#: master.cf: only the services an smtpd-to-discard path needs, none chrooted (the chroot
#: column is `n`), so smtpd finds the sasldb and the config under the temp dir.
_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixUnavailable(Exception):
    """Postfix cannot be installed, configured or started on this machine."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(
    port: int, timeout: float = _READY_TIMEOUT, alive: Callable[[], bool] | None = None
) -> None:
    """Connect-retry until 127.0.0.1:port accepts; `alive` false aborts early (process died)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError as exc:
            if alive is not None and not alive():
                raise PostfixUnavailable(f"process for port {port} exited early") from exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing accepts connections on 127.0.0.1:{port}") from exc
            time.sleep(0.05)


def unavailable(reason: str) -> None:
    """Skip, or fail under CI=true where a missing Postfix must not pass silently."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"Postfix end-to-end tests cannot run under CI: {reason}", pytrace=False)
    pytest.skip(f"Postfix end-to-end tests need a local Postfix: {reason} ({_CI_HINT})")


def _run(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise PostfixUnavailable(
            f"{' '.join(argv)} exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()}"
        )
    return proc.stdout


@dataclass
class PostfixInstance:
    """One running private Postfix: where it lives, its SMTP port and its policy wiring."""

    root: Path
    smtp_port: int
    policy_port: int
    placement: Placement
    main_cf: dict[str, str] = field(default_factory=dict)

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def log_file(self) -> Path:
        return self.root / "maillog"

    def log_text(self) -> str:
        """Postfix's own log (maillog_file), for assertions and failure messages."""
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def smtp(self) -> smtplib.SMTP:
        """A connected SMTP client that has said EHLO (the caller closes it)."""
        client = smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.e2e.test",
                              timeout=60)
        client.ehlo()
        return client

    def master_pid(self) -> int | None:
        try:
            return int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (FileNotFoundError, ValueError, IndexError):
            return None


def main_cf_settings(root: Path, placement: Placement, policy_port: int) -> dict[str, str]:
    """Every main.cf line of the test instance (the README's example takes its lines from here)."""
    check = f"check_policy_service inet:127.0.0.1:{policy_port}"
    settings = {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "queue"),
        "data_directory": str(root / "data"),
        "mail_owner": "postfix",
        "setgid_group": "postdrop",
        # Postfix's own log in the temp dir (no syslog needed); postlogd writes it, and only
        # under a path listed in maillog_file_prefixes.
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "myhostname": "mx.e2e.test",
        "mydomain": RELAY_DOMAIN,
        "myorigin": "$myhostname",
        "mydestination": "",
        # Empty: 127.0.0.1 is not trusted, so only SASL clients may relay (as on a real MX).
        "mynetworks": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "relay_domains": RELAY_DOMAIN,
        "relay_recipient_maps": "",
        "local_recipient_maps": "",
        "alias_maps": "",
        "alias_database": "",
        # No mail leaves the machine.
        "default_transport": "discard:",
        "relay_transport": "discard:",
        "local_transport": "discard:",
        "virtual_transport": "discard:",
        "smtputf8_enable": "no",
        "biff": "no",
        "append_dot_mydomain": "no",
        "smtpd_tls_security_level": "none",
        "smtpd_sasl_auth_enable": "yes",
        "smtpd_sasl_type": "cyrus",
        "smtpd_sasl_path": "smtpd",
        # Debian's smtpd looks in $config_directory/sasl whatever this says; keep both equal.
        "cyrus_sasl_config_path": str(root / "etc" / "sasl"),
        "smtpd_sasl_security_options": "noanonymous",
        "smtpd_sasl_local_domain": "",
        "smtpd_relay_restrictions": "permit_sasl_authenticated, reject_unauth_destination",
        "smtpd_delay_reject": "yes",
        "smtpd_sender_restrictions": "",
        "smtpd_data_restrictions": "",
        "smtpd_policy_service_default_action": POLICY_DOWN_ACTION,
        # A stopped policy server costs about one retry_delay, not the 100 s default timeout.
        "smtpd_policy_service_timeout": "10s",
        "smtpd_policy_service_retry_delay": "1s",
        "smtpd_policy_service_try_limit": "2",
        # Tests provoke 4xx replies on purpose: no tarpit, no disconnect after errors.
        "smtpd_error_sleep_time": "0",
        "smtpd_soft_error_limit": "1000",
        "smtpd_hard_error_limit": "1000",
        "smtpd_client_connection_count_limit": "0",
        "smtpd_client_connection_rate_limit": "0",
    }
    settings[PLACEMENT_PARAMETER[placement]] = check
    return settings


def _write_sasl(root: Path) -> None:
    sasl = root / "etc" / "sasl"
    sasl.mkdir(mode=0o755)
    db = sasl / "sasldb2"
    for login, password in USERS.items():
        user, realm = login.rsplit("@", 1)
        proc = subprocess.run(
            ["saslpasswd2", "-f", str(db), "-p", "-c", "-u", realm, user],
            input=password, capture_output=True, text=True, timeout=30, check=False,
        )
        if proc.returncode != 0:
            raise PostfixUnavailable(f"saslpasswd2 failed: {proc.stderr.strip()}")
    # smtpd reads the sasldb after dropping privileges to mail_owner; `postfix check` wants
    # files in the config directory owned by root.
    shutil.chown(db, user="root", group="postfix")
    db.chmod(0o640)
    (sasl / "smtpd.conf").write_text(
        "pwcheck_method: auxprop\n"
        "auxprop_plugin: sasldb\n"
        "mech_list: PLAIN LOGIN\n"
        f"sasldb_path: {db}\n"
    )


def _check_prerequisites() -> None:
    if os.geteuid() != 0:
        raise PostfixUnavailable("starting a Postfix master needs root")
    for tool in ("postfix", "postconf", "saslpasswd2"):
        if shutil.which(tool) is None:
            raise PostfixUnavailable(f"`{tool}` is not installed")
    for name, lookup in (("user postfix", "passwd"), ("group postdrop", "group")):
        if subprocess.run(["getent", lookup, name.split()[1]], capture_output=True,
                          check=False).returncode != 0:
            raise PostfixUnavailable(f"the {name} does not exist")


def _wait_for_banner(instance: PostfixInstance) -> None:
    """Ready when smtpd itself answers 220 (master listening alone is not enough)."""
    deadline = time.monotonic() + _READY_TIMEOUT
    while True:
        try:
            with socket.create_connection(("127.0.0.1", instance.smtp_port), timeout=5) as s:
                if s.makefile("rb").readline().startswith(b"220 "):
                    s.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise PostfixUnavailable(
                f"smtpd on port {instance.smtp_port} never answered; log:\n{instance.log_text()}"
            )
        time.sleep(0.05)


def start_postfix(placement: Placement, policy_port: int) -> PostfixInstance:
    """Write a private config under a new temp dir and start its master."""
    _check_prerequisites()
    # Not under pytest's basetemp: that is mode 0700, and smtpd (user postfix) must read
    # its sasldb and config here.
    root = Path(tempfile.mkdtemp(prefix="rlpd-postfix-"))
    root.chmod(0o755)
    smtp_port = free_port()
    while smtp_port == policy_port:
        smtp_port = free_port()
    instance = PostfixInstance(root, smtp_port, policy_port, placement)
    try:
        config_dir = instance.config_dir
        config_dir.mkdir(mode=0o755)
        (root / "queue").mkdir(mode=0o755)
        instance.main_cf = main_cf_settings(root, placement, policy_port)
        (config_dir / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in instance.main_cf.items())
        )
        (config_dir / "master.cf").write_text(
            _MASTER_CF.format(listen=f"127.0.0.1:{instance.smtp_port}")
        )
        _write_sasl(root)
        # `postfix check` creates the queue and data directories with the ownerships Postfix
        # insists on (queue subdirectories owned by postfix, maildrop/public by postdrop).
        _run("postfix", "-c", str(config_dir), "check")
        _run("postfix", "-c", str(config_dir), "start")
        _wait_for_banner(instance)
    except BaseException:
        stop_postfix(instance)
        raise
    return instance


def stop_postfix(instance: PostfixInstance) -> None:
    """Stop the master, kill anything of its session that outlived it, remove the temp dir."""
    pid = instance.master_pid()
    with contextlib.suppress(PostfixUnavailable, subprocess.TimeoutExpired):
        _run("postfix", "-c", str(instance.config_dir), "stop")
    if pid is not None:
        # The master is a session leader (setsid); its children share its session id.
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                sid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[3])
            except (OSError, ValueError, IndexError):
                continue
            if sid == pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)
    shutil.rmtree(instance.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postfix_factory() -> Iterator[Callable[[Placement], PostfixInstance]]:
    """get(placement) -> the session's running PostfixInstance with the policy check there.

    One instance per placement, started on first use and stopped at session end; each has its
    own `policy_port` where the test starts the policy server. Skips (fails under CI=true)
    when Postfix is not installed or will not start.
    """
    instances: dict[Placement, PostfixInstance] = {}
    failure: list[str] = []

    def get(placement: Placement) -> PostfixInstance:
        if failure:
            unavailable(failure[0])
        if placement not in instances:
            try:
                instances[placement] = start_postfix(placement, free_port())
            except PostfixUnavailable as exc:
                failure.append(str(exc))
                unavailable(str(exc))
        return instances[placement]

    yield get
    for instance in instances.values():
        stop_postfix(instance)
