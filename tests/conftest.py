"""Shared fixtures. Each concern lives in its own plugin module under tests/."""

pytest_plugins = [
    "tests.fixtures_common",
    "tests.fixtures_mariadb",
    "tests.fixtures_postfix",
]
