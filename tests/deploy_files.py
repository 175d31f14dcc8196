"""What deploy/ and README.md's install steps say, parsed once for the tests that hold them true."""

from __future__ import annotations

import re
import shlex

from tests.helpers import ROOT

UNIT_PATH = ROOT / "deploy" / "dtmf-gateway.service"
README = ROOT / "README.md"


def unit_service() -> list[tuple[str, str]]:
    """The [Service] section of the unit as (key, value) pairs, in order (keys may repeat)."""
    pairs, section = [], None
    for line in UNIT_PATH.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            pairs.append((key.strip(), value.strip()))
    return pairs


def unit_value(key: str) -> str:
    (value,) = [v for k, v in unit_service() if k == key]
    return value


def parse_environment_file(text: str) -> dict[str, str]:
    """systemd's EnvironmentFile= rules for the lines README writes: KEY=VALUE, # comments, quotes."""
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        key, _, value = line.partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[key.strip()] = value
    return env


def readme_env_file() -> str:
    """The body of README's `cat > <EnvironmentFile> <<'EOF'` install step."""
    path = re.escape(unit_value("EnvironmentFile"))
    match = re.search(rf"cat > {path} <<'EOF'\n(.*?)\nEOF\n", README.read_text(), re.S)
    assert match, "README's install writes no env file at the unit's EnvironmentFile path"
    return match[1]


def readme_lines(pattern: str) -> list[str]:
    """README lines (inside code blocks or not) matching ``pattern``, comments cut off."""
    found = []
    for line in README.read_text().splitlines():
        if re.search(pattern, line):
            found.append(line.split("  #")[0].strip())
    return found


def readme_cli_function() -> str:
    """README's one definition of the shell function that runs the CLI with the unit's environment."""
    (line,) = readme_lines(r"^\s*dtmf\(\) \{")
    return line


def split(command: str) -> list[str]:
    return shlex.split(command)


def mapped(text: str, mapping: dict[str, str]) -> str:
    """Install paths moved to a test's own directories (longest first, so prefixes do not collide)."""
    for old in sorted(mapping, key=len, reverse=True):
        text = text.replace(old, mapping[old])
    return text
