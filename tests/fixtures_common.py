"""Fixtures every layer uses: the captured Postfix requests."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Byte-exact requests captured from a real Postfix 3.7, shipped in the repo so the
#: suite does not depend on files outside it.
FIXTURES = Path(__file__).parent / "data" / "postfix"


def fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.txt"))


def read_fixture(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


@pytest.fixture(params=fixture_names())
def postfix_request(request: pytest.FixtureRequest) -> tuple[str, bytes]:
    """(file name, raw bytes) of each captured request."""
    return request.param, read_fixture(request.param)
