"""config: defaults, the shipped example, flag precedence, and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ratelimit_policyd.config import ConfigError, Settings, describe, load

EXAMPLE = Path(__file__).resolve().parent.parent / "init" / "ratelimit-policyd.conf"


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "c.conf"
    p.write_text(text)
    return str(p)


def test_defaults_match_the_documented_ones() -> None:
    s = load(None)
    assert s.server.listen == "127.0.0.1:10032"
    assert s.limits.default_quota == 1000
    assert s.limits.period == "daily"
    assert s.limits.key_type == "email"
    assert s.db_url().startswith("sqlite:///") and s.db_url().endswith("ratelimit.sqlite3")


def test_shipped_example_is_valid_and_complete() -> None:
    s = load(str(EXAMPLE))
    assert s == Settings(source=str(EXAMPLE))  # it shows every default, unchanged
    text = EXAMPLE.read_text()
    sections = re.findall(r"^\[(\w+)\]", text, re.M)
    for path, _default in describe():
        section, key = path.split(".")
        assert section in sections
        assert re.search(rf"^{key} = ", text, re.M), f"{path} missing from the example"


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[limits]\ndefault_quota = 5\nperiod = "hourly"\n')
    s = load(path, {"limits": {"default_quota": 9}})
    assert (s.limits.default_quota, s.limits.period) == (9, "hourly")


def test_every_error_is_reported_with_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, """
[server]
listen = "127.0.0.1"
allowed_hosts = ["not-an-ip"]
bogus = 1
[limits]
default_quota = "lots"
period = "fortnightly"
key_type = "user"
over_quota_action = "450"
count_states = ["MAIL"]
timezone = "Mars/Olympus"
[database]
url = "postgres://x"
table = "rate; DROP TABLE x"
[cache]
flush_interval = 0
[nosuch]
x = 1
""")
    with pytest.raises(ConfigError) as ei:
        load(path)
    text = str(ei.value)
    for key in ("server.listen", "server.allowed_hosts", "server.bogus: unknown setting",
                "limits.default_quota", "limits.period", "limits.key_type",
                "limits.over_quota_action", "limits.count_states", "limits.timezone",
                "database.url", "database.table", "cache.flush_interval",
                "nosuch: unknown section"):
        assert key in text, key


def test_bad_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(write(tmp_path, "[server\n"))
    with pytest.raises(ConfigError, match="not found"):
        load(str(tmp_path / "nope.conf"))


def test_password_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATELIMIT_POLICYD_DB_PASSWORD", raising=False)
    assert load(None).db_password() is None
    monkeypatch.setenv("RATELIMIT_POLICYD_DB_PASSWORD", "fromenv")
    assert load(None).db_password() == "fromenv"
    pw = tmp_path / "pw"
    pw.write_text("fromfile\n")
    s = load(write(tmp_path, f'[database]\npassword_file = "{pw}"\n'))
    assert s.db_password() == "fromfile"


def test_list_settings_accept_comma_strings() -> None:
    s = load(None, {"server": {"allowed_hosts": "127.0.0.1, 10.0.0.0/8"}})
    assert s.server.allowed_hosts == ("127.0.0.1", "10.0.0.0/8")


def test_ipv6_listen() -> None:
    s = load(None, {"server": {"listen": "[::1]:10032"}})
    assert s.listen_address() == ("::1", 10032)
