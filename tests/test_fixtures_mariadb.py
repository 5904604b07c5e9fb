"""The private-MariaDB fixtures do what the other tests rely on."""

from __future__ import annotations

from collections.abc import Callable

import pymysql
import pytest

from tests import fixtures_mariadb
from tests.fixtures_mariadb import MariaDB


def test_missing_binaries_skip_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not found"):
        fixtures_mariadb.unavailable("mariadbd not found")


@pytest.mark.parametrize("value", ["true", "TRUE", " true"])
def test_missing_binaries_fail_under_ci(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("CI", value)
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        fixtures_mariadb.unavailable("mariadbd not found")


def test_binaries_are_looked_up_on_path_and_in_sbin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(fixtures_mariadb, "_SEARCH_DIRS", ("/nonexistent",))
    assert isinstance(fixtures_mariadb.binaries(), str)


@pytest.mark.mysql
def test_the_session_server_is_private(mariadb: MariaDB) -> None:
    assert mariadb.port != 3306
    assert mariadb.is_running()
    assert mariadb.execute("SELECT @@port, @@socket") == [(mariadb.port, mariadb.socket)]
    assert mariadb.url("db1") == f"mysql://root@127.0.0.1:{mariadb.port}/db1"
    assert mariadb.url("db1", "u", "p w") == f"mysql://u:p%20w@127.0.0.1:{mariadb.port}/db1"


@pytest.mark.mysql
def test_a_private_server_stops_and_restarts_with_its_data(
    private_mariadb: Callable[[], MariaDB], mariadb: MariaDB
) -> None:
    db = private_mariadb()
    assert db.port != mariadb.port and db.datadir != mariadb.datadir
    db.create_database("keep")
    db.execute("CREATE TABLE t (n INT); INSERT INTO t VALUES (7)", db="keep")
    db.stop()
    assert not db.is_running()
    with pytest.raises(pymysql.err.OperationalError):
        db.connect(connect_timeout=1, tcp=True).close()
    db.restart()
    assert db.is_running()
    assert db.execute("SELECT n FROM t", db="keep") == [(7,)]
    assert mariadb.is_running()  # the session server was not disturbed


@pytest.mark.mysql
def test_mysql_url_has_the_schema_and_only_the_perl_grants(
    mariadb: MariaDB, mysql_db: str, mysql_url: str
) -> None:
    tables = mariadb.execute("SHOW FULL TABLES", db=mysql_db)
    assert sorted(tables) == [("ratelimit", "BASE TABLE"), ("ratelimit_flushlog", "BASE TABLE"),
                              ("view_ratelimit", "VIEW")]
    user = mysql_url.split("//")[1].split(":")[0]
    grants = [g for (g,) in mariadb.execute(f"SHOW GRANTS FOR '{user}'@'%'")]
    assert any(f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{mysql_db}`.*" in g for g in grants)
    assert all("ALL PRIVILEGES" not in g and "CREATE" not in g for g in grants)
