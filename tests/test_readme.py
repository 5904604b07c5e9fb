"""The README's Postfix lines are the ones the end-to-end tests run Postfix with."""

from __future__ import annotations

import re
from pathlib import Path

from tests.fixtures_postfix import main_cf_settings

README = Path(__file__).resolve().parent.parent / "README.md"


def postfix_section_lines() -> list[tuple[str, str]]:
    text = README.read_text()
    section = text[text.index("## Postfix configuration"):]
    section = section[:section.index("\n## ", 5)]
    lines: list[tuple[str, str]] = []
    for block in re.findall(r"```\n(.*?)```", section, re.S):
        for line in block.splitlines():
            m = re.match(r"^(\w+) = (.*)$", line)
            if m:
                lines.append((m.group(1), m.group(2).strip()))
    return lines


def test_every_postfix_line_in_the_readme_is_tested(tmp_path: Path) -> None:
    lines = postfix_section_lines()
    assert len(lines) >= 4
    tested = [main_cf_settings(tmp_path, placement, 10032)  # type: ignore[arg-type]
              for placement in ("rcpt", "data")]
    for key, value in lines:
        assert any(cfg.get(key) == value for cfg in tested), f"{key} = {value} is not tested"


def _perl_variables(text: str) -> set[str]:
    """``$name`` / ``@name`` tokens (not the ``@`` inside an address or a URL)."""
    return set(re.findall(r"(?<![\w.:])[$@][A-Za-z_]\w*", text))


def test_the_migration_section_and_the_example_config_map_the_same_perl_variables() -> None:
    text = README.read_text()
    section = text[text.index("## Migrating from the Perl daemon"):]
    section = section[:section.index("\n## ", 5)]
    conf = (README.parent / "init" / "ratelimit-policyd.conf").read_text()
    in_readme, in_conf = _perl_variables(section), _perl_variables(conf)
    # The Perl configuration section's variables, including those issue 9 found missing.
    assert {"$port", "$listen_address", "$PIDFILE", "$LOG_LEVEL", "$LOGFILE", "$dsn",
            "@allowedhosts", "$db_persistcol"} <= in_readme
    assert in_readme == in_conf
    assert "?unix_socket=/run/mysqld/mysqld.sock" in section
    assert "ratelimit-policyd migrate-keys" in section
