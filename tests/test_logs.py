"""logs: the decision writer and the Perl daemon's line format."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from ratelimit_policyd.config import LogSettings
from ratelimit_policyd.logs import DecisionLog, setup_logging


@contextlib.contextmanager
def logging_set_up(settings: LogSettings) -> Iterator[None]:
    """The daemon's logging for the duration, then pytest's handlers back."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    installed = setup_logging(settings)
    try:
        yield
    finally:
        for h in installed:
            root.removeHandler(h)
            h.close()
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


@pytest.fixture
def logfile(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "daemon.log"
    with logging_set_up(LogSettings(file=str(path))):
        yield path


def test_decision_lines_are_written_in_order_with_perl_timestamps(logfile: Path) -> None:
    dl = DecisionLog(interval=3600)
    for i in range(1000):
        dl.append((1_700_000_000.0 + i / 100, f"Q{i}: client=x[1.2.3.4], status=UPDATE"))
    assert dl.write_pending() == 1000
    lines = logfile.read_text().splitlines()
    assert [ln.split(" ", 5)[5].split(":")[0] for ln in lines] == [f"Q{i}" for i in range(1000)]
    # Perl's scalar localtime(): "Tue Nov 14 22:13:20 2023"
    assert len(lines[0].split(" ")[0]) == 3


def test_lines_follow_a_renamed_file(logfile: Path) -> None:
    dl = DecisionLog(interval=3600)
    dl.append((1_700_000_000.0, "first"))
    dl.write_pending()
    logfile.rename(logfile.with_suffix(".1"))
    dl.append((1_700_000_001.0, "second"))
    dl.write_pending()
    assert "first" in logfile.with_suffix(".1").read_text()
    assert "second" in logfile.read_text()


def test_the_queue_is_bounded() -> None:
    dl = DecisionLog(interval=3600, max_lines=10)
    for i in range(100):
        dl.append((1.0, str(i)))
    assert len(dl._q) == 10


def test_decisions_reach_syslog_with_ident_and_facility_mail(tmp_path: Path) -> None:
    import socket

    address = tmp_path / "log.sock"  # a stand-in for /dev/log: a unix datagram socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(address))
        server.settimeout(5)
        with logging_set_up(LogSettings(file="", syslog=True, syslog_address=str(address),
                                        syslog_ident="ratelimit-policyd")):
            dl = DecisionLog(interval=3600)
            dl.append((1_700_000_000.0, "Q1: client=x[1.2.3.4], sasl_method=PLAIN, "
                                        "sasl_username=a@b, recipient_count=1, "
                                        "curr_count=1/5, status=INSERT"))
            dl.write_pending()
            datagram = server.recv(4096).decode()
    # <22> = facility mail (2) * 8 + severity info (6); ident[pid]: then the Perl line.
    assert datagram.startswith("<22>ratelimit-policyd[")
    assert datagram.rstrip("\x00").endswith(
        "]: Q1: client=x[1.2.3.4], sasl_method=PLAIN, sasl_username=a@b, recipient_count=1, "
        "curr_count=1/5, status=INSERT")
