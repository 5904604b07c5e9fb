"""What only the MySQL backend has: grants, outages, timeouts, the view, URL details.

Outage tests run on their own private server (``private_mariadb``), so stopping or
freezing it disturbs no other test. Time bounds are generous upper limits that show a
timeout is honoured, not measurements.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import quote

import pytest

from ratelimit_policyd.model import Delta, Row
from ratelimit_policyd.storage import Storage, StorageError, open_storage
from tests.fixtures_mariadb import MariaDB

pytestmark = pytest.mark.mysql

E1 = 1_767_225_600
E2 = E1 + 3600


def row(sender: str, quota: int, used: int, expiry: int, persist: bool = False) -> Row:
    return Row(sender=sender, quota=quota, used=used, expiry=expiry, persist=persist)


@pytest.fixture
def opened() -> Iterator[Callable[..., Storage]]:
    """open_storage(), closing whatever the test opened at its end."""
    storages: list[Storage] = []

    def open_(url: str, **kwargs: Any) -> Storage:
        storage = open_storage(url, **kwargs)
        storages.append(storage)
        return storage

    yield open_
    for storage in storages:
        storage.close()


def eventually(call: Callable[[], object], within: float = 60.0) -> object:
    """Retry ``call`` while it raises a transient StorageError, up to a deadline."""
    deadline = time.monotonic() + within
    while True:
        try:
            return call()
        except StorageError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


@dataclass
class PrivateDB:
    server: MariaDB
    db: str
    url: str  # the Perl-grants user


@pytest.fixture
def private_db(private_mariadb: Callable[[], MariaDB]) -> PrivateDB:
    server = private_mariadb()
    server.create_database("policyd")
    server.apply_schema("policyd")
    user, password = server.create_user("policyd")
    return PrivateDB(server, "policyd", server.url("policyd", user, password))


# -- grants and schema -----------------------------------------------------------------


def test_the_daemon_needs_only_the_perl_grants(
    mariadb: MariaDB, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    user = mysql_url.split("//")[1].split(":")[0]
    grants = " ".join(r[0] for r in mariadb.execute(f"SHOW GRANTS FOR '{user}'@'%'"))
    assert "SELECT, INSERT, UPDATE, DELETE ON" in grants
    assert "CREATE" not in grants and "ALTER" not in grants

    storage = opened(mysql_url)
    storage.check_schema()
    assert storage.apply([Delta("a@x", 2, E1), Delta("a@x", 1, E2)], 10) == {
        "a@x": row("a@x", 10, 1, E2)
    }
    assert storage.set_quota("b@x", 5, True, E1) == row("b@x", 5, 0, E1, True)
    assert storage.reset("a@x") == row("a@x", 10, 0, E2)
    assert storage.delete("b@x") is True
    assert [r.sender for r in storage.iter_rows()] == ["a@x"]
    # Creating the schema is for init-db, run with more rights; the daemon never does.
    with pytest.raises(StorageError, match="denied") as info:
        storage.init_schema()
    assert info.value.transient is False


def test_check_schema_names_a_missing_grant(
    mariadb: MariaDB, mysql_db: str, opened: Callable[..., Storage]
) -> None:
    user, password = mariadb.create_user(mysql_db, grants="SELECT, UPDATE")
    try:
        storage = opened(mariadb.url(mysql_db, user, password))
        with pytest.raises(StorageError, match="may not INSERT on ratelimit") as info:
            storage.check_schema()
        assert info.value.transient is False
        assert "GRANT SELECT, INSERT, UPDATE, DELETE" in str(info.value)
    finally:
        mariadb.execute(f"DROP USER '{user}'@'%'")


def test_check_schema_names_a_missing_unique_index(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    mariadb.execute("ALTER TABLE ratelimit DROP INDEX idx_sender", db=mysql_db)
    with pytest.raises(StorageError, match=r"sender of table ratelimit .* no UNIQUE index"):
        opened(mysql_url).check_schema()


def test_wrong_credentials_and_unknown_database_are_permanent_errors(
    mariadb: MariaDB, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    bad_password = opened(mysql_url, password="wrong")
    with pytest.raises(StorageError, match="Access denied") as info:
        bad_password.load(["a@x"])
    assert info.value.transient is False
    unknown_db = opened(mariadb.url("no_such_db"))
    with pytest.raises(StorageError, match="Unknown database") as info:
        unknown_db.check_schema()
    assert info.value.transient is False


def test_the_view_shows_expiry_as_a_date(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    opened(mysql_url).apply([Delta("a@x", 3, E1)], 10)
    mariadb.execute("INSERT INTO ratelimit (sender, expiry) VALUES ('perl@x', NULL)", db=mysql_db)
    rows = mariadb.execute(
        "SELECT sender, used, expiry, expiry = FROM_UNIXTIME(%s) FROM view_ratelimit"
        " ORDER BY sender",
        db=mysql_db,
        args=(E1,),
    )
    assert [(r[0], r[1], r[3]) for r in rows] == [("a@x", 3, 1), ("perl@x", 0, None)]
    assert isinstance(rows[0][2], datetime)


def next_auto_increment(mariadb: MariaDB, db: str) -> int:
    found = mariadb.execute(
        "SELECT AUTO_INCREMENT FROM information_schema.TABLES"
        " WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'ratelimit'",
        db=db,
    )
    return int(found[0][0])


def test_updates_of_existing_rows_consume_no_auto_increment_ids(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    storage = opened(mysql_url)
    keys = [f"k{i:03d}@x" for i in range(50)]
    storage.apply([Delta(k, 1, E1) for k in keys], 10)

    before = next_auto_increment(mariadb, mysql_db)
    for _ in range(20):  # twenty flushes of fifty known keys, across a window change
        storage.apply([Delta(k, 1, E1) for k in keys] + [Delta(k, 1, E2) for k in keys], 10)
    storage.set_quota(keys[0], 99, True, E2)
    # The Perl table's id is a signed INT: an upsert that burnt an id per key and flush
    # would run out within weeks on a busy server.
    assert next_auto_increment(mariadb, mysql_db) == before
    # 1 at E1; then the first flush resets to 1 at E2, and each later one adds 2.
    assert storage.load(keys[:1]) == {keys[0]: row(keys[0], 99, 39, E2, True)}


def test_a_case_insensitive_perl_table_maps_rows_to_the_lowercase_key(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    # The Perl table's older schema compares senders with utf8_general_ci, and the Perl
    # daemon stored SASL usernames as given.
    mariadb.execute(
        "ALTER TABLE ratelimit MODIFY sender VARCHAR(255) CHARACTER SET utf8"
        " COLLATE utf8_general_ci NOT NULL",
        db=mysql_db,
    )
    mariadb.execute(
        "INSERT INTO ratelimit (sender, quota, used, expiry, persist)"
        " VALUES ('Alice@Example.COM', 500, 7, %s, 1)",
        db=mysql_db,
        args=(E1,),
    )
    storage = opened(mysql_url)

    assert storage.load(["alice@example.com"]) == {
        "alice@example.com": row("alice@example.com", 500, 7, E1, True)}
    before = next_auto_increment(mariadb, mysql_db)
    assert storage.apply([Delta("alice@example.com", 2, E1)], 10) == {
        "alice@example.com": row("alice@example.com", 500, 9, E1, True)}
    # The existing row was updated by its id.
    assert next_auto_increment(mariadb, mysql_db) == before
    assert list(mariadb.execute("SELECT sender, used FROM ratelimit", db=mysql_db)) == [
        ("Alice@Example.COM", 9)]


def _perl_table(mariadb: MariaDB, db: str, collation: str) -> None:
    """The Perl daemon's table as onlime/ratelimit-policyd creates it, with ``collation``."""
    mariadb.execute("DROP VIEW IF EXISTS view_ratelimit; DROP TABLE ratelimit", db=db)
    mariadb.execute(
        "CREATE TABLE ratelimit ("
        " `id` INT(11) NOT NULL AUTO_INCREMENT,"
        f" `sender` VARCHAR(255) CHARACTER SET 'utf8' COLLATE '{collation}' NOT NULL,"
        " `persist` TINYINT(1) NOT NULL DEFAULT '0',"
        " `quota` INT(10) UNSIGNED NOT NULL DEFAULT '0',"
        " `used` INT(10) UNSIGNED NOT NULL DEFAULT '0',"
        " `updated` TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP ON UPDATE CURRENT_TIMESTAMP,"
        " `expiry` INT(10) UNSIGNED DEFAULT NULL,"
        " PRIMARY KEY (`id`), UNIQUE INDEX `idx_sender` (`sender` ASC))"
        " ENGINE = InnoDB DEFAULT CHARACTER SET = utf8",
        db=db,
    )


def test_a_case_sensitive_perl_tables_mixed_case_row_applies_again_after_migrate_keys(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    _perl_table(mariadb, mysql_db, "utf8_bin")
    mariadb.execute(
        "INSERT INTO ratelimit (sender, quota, used, expiry, persist)"
        " VALUES ('Mixed@Example.com', 3, 2, %s, 1)",
        db=mysql_db, args=(E2,),
    )
    daemon, admin = opened(mysql_url), opened(mysql_url)
    # The gap: byte for byte, the daemon's lower-case key has no row, so its first count
    # creates one with the default quota and the operator's limit of 3 is gone.
    assert daemon.load(["mixed@example.com"]) == {}
    assert daemon.apply([Delta("mixed@example.com", 1, E2)], 1000) == {
        "mixed@example.com": row("mixed@example.com", 1000, 1, E2)}
    assert [r.sender for r in admin.mixed_case_rows()] == ["Mixed@Example.com"]

    ids = dict(mariadb.execute("SELECT sender, id FROM ratelimit", db=mysql_db))
    done = admin.merge_keys("mixed@example.com", ["Mixed@Example.com"], E1, apply=True)
    assert done is not None and done.renamed is None
    assert daemon.load(["mixed@example.com"]) == {
        "mixed@example.com": row("mixed@example.com", 3, 3, E2, True)}
    assert mariadb.execute("SELECT sender, id FROM ratelimit", db=mysql_db) == (
        [("mixed@example.com", ids["mixed@example.com"])])
    # The daemon's later counts add to the merged row, whose persistent quota stays.
    assert daemon.apply([Delta("mixed@example.com", 1, E2)], 1000) == {
        "mixed@example.com": row("mixed@example.com", 3, 4, E2, True)}


def test_on_a_case_insensitive_perl_table_migrate_keys_renames_the_row_in_place(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    # Here the daemon already uses the row (see the test above); migrate-keys only makes
    # the stored key what the daemon writes, keeping the row, its id and its counts.
    _perl_table(mariadb, mysql_db, "utf8_general_ci")
    mariadb.execute(
        "INSERT INTO ratelimit (sender, quota, used, expiry, persist)"
        " VALUES ('Alice@Example.COM', 500, 7, %s, 1)",
        db=mysql_db, args=(E2,),
    )
    storage = opened(mysql_url)
    (found,) = storage.mixed_case_rows()
    assert found.sender == "Alice@Example.COM"
    plan = storage.merge_keys("alice@example.com", ["Alice@Example.COM"], E1, apply=False)
    assert plan is not None and plan.renamed == "Alice@Example.COM" and plan.merged == ()
    before = mariadb.execute("SELECT id, sender FROM ratelimit", db=mysql_db)
    assert before[0][1] == "Alice@Example.COM", "a dry run changes nothing"

    storage.merge_keys("alice@example.com", ["Alice@Example.COM"], E1, apply=True)
    assert mariadb.execute("SELECT id, sender, quota, used, persist FROM ratelimit",
                           db=mysql_db) == [(before[0][0], "alice@example.com", 500, 7, 1)]
    assert storage.mixed_case_rows() == []


# -- locks -------------------------------------------------------------------------------


def _wait_for_lock_wait(mariadb: MariaDB, within: float = 30.0) -> None:
    """Until some transaction waits for a row lock (the storage's, in these tests)."""
    deadline = time.monotonic() + within
    query = "SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE trx_state = 'LOCK WAIT'"
    while mariadb.execute(query)[0][0] == 0:
        assert time.monotonic() < deadline, "the storage never waited for the lock"
        time.sleep(0.02)


def test_a_deadlock_victim_is_retried_and_counts_once(
    mariadb: MariaDB,
    mysql_db: str,
    mysql_url: str,
    opened: Callable[..., Storage],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ratelimit_policyd.storage.mysql")
    storage = opened(mysql_url)
    storage.apply([Delta("a@x", 1, E1), Delta("z@x", 1, E1)], 10)
    mariadb.execute("CREATE TABLE weight (n INT) ENGINE=InnoDB", db=mysql_db)
    operator = mariadb.connect(mysql_db)
    try:
        operator.autocommit(False)
        with operator.cursor() as cur:
            # Heavier than the storage's transaction, so InnoDB picks the storage's as
            # the deadlock victim.
            cur.execute("INSERT INTO weight VALUES " + ", ".join(["(1)"] * 200))
            cur.execute("SELECT used FROM ratelimit WHERE sender = 'z@x' FOR UPDATE")
            with ThreadPoolExecutor(1) as pool:
                # Locks a@x, then waits for z@x ...
                future = pool.submit(storage.apply, [Delta("a@x", 2, E1), Delta("z@x", 3, E1)], 10)
                _wait_for_lock_wait(mariadb)
                # ... while the operator now wants a@x: a deadlock.
                cur.execute("SELECT used FROM ratelimit WHERE sender = 'a@x' FOR UPDATE")
                operator.commit()
                got = future.result(timeout=60)
    finally:
        operator.close()
    assert got == {"a@x": row("a@x", 10, 3, E1), "z@x": row("z@x", 10, 4, E1)}
    assert any(
        "Deadlock" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records
    )


def test_a_lock_held_too_long_fails_the_apply_with_nothing_applied(
    mariadb: MariaDB, mysql_db: str, mysql_url: str, opened: Callable[..., Storage]
) -> None:
    storage = opened(mysql_url, read_timeout=2)  # lock waits give up after 1 s
    storage.apply([Delta("a@x", 1, E1), Delta("z@x", 1, E1)], 10)
    operator = mariadb.connect(mysql_db)
    try:
        operator.autocommit(False)
        with operator.cursor() as cur:
            # In REPEATABLE READ, locking a key that has no row locks the gap where it
            # would go: the storage updates a@x and z@x, then waits to insert n@x.
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            cur.execute("SELECT used FROM ratelimit WHERE sender = 'n@x' FOR UPDATE")
            with pytest.raises(StorageError, match="Lock wait timeout") as info:
                storage.apply([Delta("a@x", 5, E1), Delta("z@x", 5, E1), Delta("n@x", 5, E1)], 10)
            assert info.value.transient is True
        operator.rollback()
    finally:
        operator.close()
    # The updates of a@x and z@x made before the wait were rolled back with the rest,
    # so sending the same deltas again (as the flusher does) counts them exactly once.
    assert storage.load(["a@x", "z@x", "n@x"]) == {
        "a@x": row("a@x", 10, 1, E1),
        "z@x": row("z@x", 10, 1, E1),
    }
    storage.apply([Delta("a@x", 5, E1), Delta("z@x", 5, E1), Delta("n@x", 5, E1)], 10)
    assert {k: r.used for k, r in storage.load(["a@x", "z@x", "n@x"]).items()} == {
        "a@x": 6,
        "z@x": 6,
        "n@x": 5,
    }


# -- values ------------------------------------------------------------------------------


@pytest.mark.parametrize("prefilter", [True, False])
def test_a_key_the_utf8mb3_column_cannot_hold_is_dropped_and_logged(
    mysql_url: str,
    opened: Callable[..., Storage],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    prefilter: bool,
) -> None:
    # The Perl table is utf8 (3 bytes): a 4-byte character cannot be stored, nor even
    # compared with the column. The backend drops such a key before any SQL; without
    # that check (a character set it does not know), the database's own errors must
    # lead to the same result.
    if not prefilter:
        monkeypatch.setattr(
            "ratelimit_policyd.storage.mysql._TableInfo.refuses", lambda self, sender: None
        )
    caplog.set_level(logging.ERROR, logger="ratelimit_policyd.storage.mysql")
    storage = opened(mysql_url)
    storage.apply([Delta("plain@x", 1, E1)], 10)
    emoji = "emoji\U0001f600@x"
    batch = [Delta(emoji, 1, E1), Delta("plain@x", 2, E1), Delta("new@x", 1, E1)]
    got = storage.apply(batch, 10)
    assert got == {"plain@x": row("plain@x", 10, 3, E1), "new@x": row("new@x", 10, 1, E1)}
    assert storage.load([emoji, "plain@x"]) == {"plain@x": row("plain@x", 10, 3, E1)}
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].startswith("dropped 1 recipient(s) for key 'emoji")
    # Refused up front, or by the server (error 1366, incorrect string value).
    assert ("3-byte utf8" in errors[0]) is prefilter
    assert ("MySQL error 1366" in errors[0]) is not prefilter


def test_strict_mode_is_set_by_the_client_whatever_the_server_default(
    private_db: PrivateDB, opened: Callable[..., Storage]
) -> None:
    private_db.server.execute("SET GLOBAL sql_mode = ''")
    storage = opened(private_db.url)
    storage.apply([Delta("big@x", 1, E1)], 10)
    # Out of range for INT UNSIGNED: refused, where a lax server would store 4294967295.
    got = storage.apply([Delta("big@x", 2**32, E1), Delta("ok@x", 1, E1)], 10)
    assert got == {"ok@x": row("ok@x", 10, 1, E1)}
    assert storage.load(["big@x"]) == {"big@x": row("big@x", 10, 1, E1)}


# -- URLs --------------------------------------------------------------------------------


def test_url_parts_are_percent_decoded_and_the_password_argument_wins(
    mariadb: MariaDB, mysql_db: str, opened: Callable[..., Storage]
) -> None:
    password = "p@ss:w/rd%?#é"
    mariadb.execute(
        f"CREATE USER 'odd user'@'%%' IDENTIFIED BY %s;"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON `{mysql_db}`.* TO 'odd user'@'%%'",
        args=(password,),
    )
    try:
        host = f"{mariadb.host}:{mariadb.port}/{mysql_db}"
        encoded = f"mysql://odd%20user:{quote(password, safe='')}@{host}"
        opened(encoded).check_schema()
        opened(f"mysql://odd%20user:wrong@{host}", password=password).check_schema()
        opened(f"mysql://odd%20user@{host}", password=password).check_schema()
        over_socket = f"mysql://odd%20user@localhost/{mysql_db}?unix_socket={mariadb.socket}"
        storage = opened(over_socket + "&charset=utf8mb4", password=password)
        assert storage.apply([Delta("a@x", 1, E1)], 3) == {"a@x": row("a@x", 3, 1, E1)}
    finally:
        mariadb.execute("DROP USER 'odd user'@'%'")


def test_localhost_is_tcp_unless_a_unix_socket_is_given(
    mariadb: MariaDB, mysql_db: str, opened: Callable[..., Storage]
) -> None:
    # The Perl daemon's DBI (libmysqlclient) took "localhost" to mean the unix socket, and
    # its documentation grants to policyd@localhost. PyMySQL connects to localhost over
    # TCP, which such an account does not match (the test server, like many, resolves
    # no names): the URL must name the socket.
    user, password = f"u_{secrets.token_hex(6)}", secrets.token_hex(12)
    mariadb.execute(
        f"CREATE USER '{user}'@'localhost' IDENTIFIED BY '{password}';"
        f" GRANT SELECT, INSERT, UPDATE, DELETE ON `{mysql_db}`.* TO '{user}'@'localhost'"
    )
    try:
        base = f"mysql://{user}:{password}@localhost"
        with pytest.raises(StorageError, match="Access denied") as info:
            opened(f"{base}:{mariadb.port}/{mysql_db}").check_schema()
        assert info.value.transient is False
        opened(f"{base}/{mysql_db}?unix_socket={quote(str(mariadb.socket))}").check_schema()
    finally:
        mariadb.execute(f"DROP USER '{user}'@'localhost'")


def test_opening_connects_to_nothing_so_the_daemon_starts_while_the_db_is_down(
    private_db: PrivateDB, opened: Callable[..., Storage]
) -> None:
    private_db.server.stop()
    storage = opened(private_db.url, connect_timeout=1, read_timeout=1)
    with pytest.raises(StorageError) as info:
        storage.load(["a@x"])
    assert info.value.transient is True
    private_db.server.start()
    eventually(storage.check_schema)


# -- outages -----------------------------------------------------------------------------


def test_a_stopped_server_gives_transient_errors_and_work_resumes_after_restart(
    private_db: PrivateDB, opened: Callable[..., Storage]
) -> None:
    storage = opened(private_db.url, connect_timeout=1, read_timeout=2)
    storage.apply([Delta("a@x", 1, E1)], 10)
    private_db.server.stop()

    for call in (
        lambda: storage.load(["a@x"]),
        lambda: storage.apply([Delta("a@x", 5, E1)], 10),
        lambda: storage.set_quota("a@x", 1, True, E1),
    ):
        started = time.monotonic()
        with pytest.raises(StorageError) as info:
            call()
        assert info.value.transient is True
        assert time.monotonic() - started < 20  # connect timeout 1 s: no hang

    private_db.server.start()
    # The counts the failed apply carried are sent again, as the flusher does.
    got = eventually(lambda: storage.apply([Delta("a@x", 5, E1)], 10))
    assert got == {"a@x": row("a@x", 10, 6, E1)}
    assert storage.load(["a@x"]) == got

    private_db.server.restart()  # pooled connections are now dead: replaced unseen
    assert eventually(lambda: storage.load(["a@x"])) == got


def test_a_frozen_server_fails_every_thread_within_the_timeouts(
    private_db: PrivateDB, opened: Callable[..., Storage]
) -> None:
    storage = opened(private_db.url, connect_timeout=1, read_timeout=1, pool_size=4)
    storage.apply([Delta(f"k{i}@x", 1, E1) for i in range(10)], 10)
    for i in range(4):  # several pooled connections that will all be dead
        storage.load([f"k{i}@x"])
    private_db.server.pause()  # accepts TCP connections, answers nothing
    try:

        def attempt(i: int) -> tuple[bool, float]:
            started = time.monotonic()
            try:
                storage.load([f"k{i}@x"])
            except StorageError as exc:
                return exc.transient, time.monotonic() - started
            return False, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(attempt, range(16)))
    finally:
        private_db.server.resume()
    assert all(transient for transient, _ in results)
    # One ping and one connect attempt at most, never a queue of them: with 1 s
    # timeouts every thread is answered in a few seconds (20 is a generous bound).
    assert max(elapsed for _, elapsed in results) < 20
    got = eventually(lambda: storage.apply([Delta("k0@x", 1, E1)], 10))
    assert got == {"k0@x": row("k0@x", 10, 2, E1)}


def test_more_threads_than_pooled_connections_wait_their_turn(
    mysql_url: str, opened: Callable[..., Storage]
) -> None:
    storage = opened(mysql_url, pool_size=2)
    keys = [f"k{i}@x" for i in range(6)]

    def work(i: int) -> None:
        for _ in range(10):
            storage.apply([Delta(keys[i % 6], 1, E1)], 10)
            storage.load(keys)

    with ThreadPoolExecutor(8) as pool:
        for future in [pool.submit(work, i) for i in range(12)]:
            future.result()
    assert {k: r.used for k, r in storage.load(keys).items()} == dict.fromkeys(keys, 20)


def test_an_unanswered_commit_keeps_its_flush_log_row_for_the_next_start(
    mariadb: MariaDB, mysql_db: str
) -> None:
    # The daemon stops before it could learn whether the flush committed (its counts
    # are spooled with the flush's entry): closing the storage must not delete the
    # row that the next start reads to tell.
    from tests.faultkit import CommitCutter

    url = mariadb.url(mysql_db)
    proxy = CommitCutter((mariadb.host, mariadb.port))
    try:
        storage = open_storage(proxy.url(url), connect_timeout=1.0, read_timeout=2.0)
        storage.apply([Delta("a@x", 1, E1)], default_quota=10)
        proxy.arm()
        with pytest.raises(StorageError) as info:
            storage.apply([Delta("a@x", 2, E1)], default_quota=10)
        flush = info.value.flush
        assert info.value.resolve is not None and flush is not None
        # The database answers again by the time the daemon closes its storage.
        eventually(lambda: storage.load(["a@x"]))
        storage.close()
    finally:
        proxy.close()
    assert mariadb.execute("SELECT daemon, seq FROM ratelimit_flushlog", db=mysql_db) == [
        (flush.source, flush.seq)]
    again = open_storage(url)
    try:
        assert again.apply_once([Delta("a@x", 2, E1)], 10, flush) is False
        assert again.load(["a@x"])["a@x"].used == 3
    finally:
        again.close()
