"""The database password never shows: not in log lines, print-config, check-config or
error messages, whatever characters it holds; a URL that cannot be used is refused by
check-config as by run, with the same one-line error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ratelimit_policyd.config import ConfigError, load
from ratelimit_policyd.storage import URLError, open_storage, parse_url, redact_url
from tests.policyclient import free_port, wait_for_text

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "ratelimit_policyd"]
#: Raw in the URL: usable (the userinfo runs to the last @, the password from the first :).
USABLE = ["@", ":", "%40", "%2F", "%23", "%3F"]
#: Raw in the URL: they end the host part for any URL parser, so the URL is refused.
REFUSED = ["/", "#", "?"]


def url_with(char: str, port: int = 3306) -> str:
    return f"mysql://policyd:Pa55{char}w0rd@127.0.0.1:{port}/ratelimit"


def assert_no_password(text: str) -> None:
    # Either half of the password would be a leak.
    assert "Pa55" not in text and "w0rd" not in text, text


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RATELIMIT_POLICYD_DB_PASSWORD"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, env=env)


@pytest.mark.parametrize("char", USABLE + REFUSED)
def test_redaction_hides_every_password(char: str) -> None:
    shown = redact_url(url_with(char))
    assert_no_password(shown)
    assert shown == "mysql://policyd:***@127.0.0.1:3306/ratelimit"


@pytest.mark.parametrize("char", USABLE)
def test_the_parser_takes_the_whole_password(char: str) -> None:
    # The redaction hides exactly what the parser takes as the password: one splitter.
    db = parse_url(url_with(char))
    decoded = {"%40": "@", "%2F": "/", "%23": "#", "%3F": "?"}.get(char, char)
    assert (db.user, db.password, db.host, db.port, db.database) == \
        ("policyd", f"Pa55{decoded}w0rd", "127.0.0.1", 3306, "ratelimit")


@pytest.mark.parametrize("url", [
    "mysql://policyd:Pa55w0rd",  # the @host forgotten: the password reads as a port
    "mysql:policyd:Pa55w0rd@db/x",  # the // forgotten
    "policyd:Pa55w0rd@db/x",  # no scheme
    "sqlite://policyd:Pa55w0rd@db/x",
    "mysql://policyd:Pa55w0rd@db/x?unix_socket=/run/a@b",  # an @ after the host
    "mysql://policyd:Pa55/w0rd@db:3306/x",
])
def test_refused_urls_never_quote_the_password(url: str) -> None:
    assert_no_password(redact_url(url))
    with pytest.raises(URLError) as info:
        parse_url(url)
    assert_no_password(str(info.value))
    with pytest.raises(ConfigError) as cinfo:
        load(None, {"database": {"url": url}})
    assert_no_password(str(cinfo.value))
    assert str(cinfo.value).startswith("database.url: ")


@pytest.mark.parametrize("char", REFUSED)
def test_check_config_and_run_refuse_a_password_that_splits_the_url(
        char: str, tmp_path: Path) -> None:
    # `mysql://policyd:Pa55/w0rd@host/db` passed check-config, then `run` died with a
    # traceback quoting "Pa55" as a port.
    conf = tmp_path / "rl.conf"
    conf.write_text(f'[database]\nurl = "{url_with(char)}"\n')
    for command in (["check-config"], ["print-config"],
                    ["run", "--listen", f"127.0.0.1:{free_port()}",
                     "--state-dir", str(tmp_path / "state")]):
        result = cli(*command, "--config", str(conf))
        out = result.stdout + result.stderr
        assert result.returncode == os.EX_CONFIG, (command, out)
        assert "database.url: bad MySQL URL 'mysql://policyd:***@127.0.0.1:3306/ratelimit'" \
            in result.stderr, out
        assert "percent-encoded" in result.stderr and "database.password" in result.stderr
        assert "Traceback" not in out
        assert_no_password(out)


@pytest.mark.parametrize("char", ["@", "%40", ":"])
def test_outputs_of_a_usable_url_hide_the_password(char: str, tmp_path: Path) -> None:
    conf = tmp_path / "rl.conf"
    # Nothing listens on this port: the daemon starts anyway (serving from memory) and
    # logs the database in its start line and in its connection errors.
    conf.write_text(f'[database]\nurl = "{url_with(char, free_port())}"\nconnect_timeout = 1\n')
    check = cli("check-config", "--config", str(conf))
    assert check.returncode == 0, check.stderr
    printed = cli("print-config", "--config", str(conf))
    assert printed.returncode == 0 and "url = \"mysql://policyd:***@127.0.0.1:" in printed.stdout
    log = tmp_path / "daemon.log"
    proc = subprocess.Popen([*CLI, "run", "--config", str(conf), "--log-file", str(log),
                             "--listen", f"127.0.0.1:{free_port()}",
                             "--state-dir", str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        text = wait_for_text(log, "listening on", timeout=60)
        assert "database mysql://policyd:***@127.0.0.1:" in text
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    for text in (check.stdout + check.stderr, printed.stdout + printed.stderr, out, err,
                 log.read_text()):
        assert_no_password(text)


def test_open_storage_refuses_what_the_config_check_refuses(tmp_path: Path) -> None:
    # One parser for both: a URL load() accepts is one open_storage opens.
    url = f"sqlite:///{tmp_path}/a%40b.sqlite3"
    assert load(None, {"database": {"url": url}}).db_url() == url
    open_storage(url).close()
    assert (tmp_path / "a@b.sqlite3").exists()
    with pytest.raises(URLError, match="unknown parameter"):
        open_storage("mysql://u:Pa55w0rd@h/db?ssl=1")
    with pytest.raises(ConfigError, match="unknown parameter"):
        load(None, {"database": {"url": "mysql://u:Pa55w0rd@h/db?ssl=1"}})


@pytest.mark.parametrize("char", USABLE)
def test_reprs_hide_the_password(char: str) -> None:
    # A settings object or a parsed URL in a log line or a traceback.
    settings = load(None, {"database": {"url": url_with(char), "password": "Pa55-w0rd"}})
    assert_no_password(repr(settings))
    assert_no_password(repr(parse_url(url_with(char))))
