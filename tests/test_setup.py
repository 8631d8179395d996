"""The README's set-up: `.ci/run` runs exactly its test command (torch==2.13.0 first), and that command installs
Debian's chromium when it is missing (checked with stand-in `apt-get`/`sudo` on a PATH without chromium)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set up and run", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)]


def test_the_readme_has_exactly_two_commands_and_ci_runs_the_second():
    commands = readme_commands()[:2]  # the set-up commands; the section's later blocks are examples
    assert commands[0].startswith("python3 -m venv .venv") and commands[1].startswith("python3 -m venv .venv")
    assert all("\n" not in c for c in commands), commands
    test_command = commands[1]
    assert test_command.index("pip install torch==2.13.0") < test_command.index('pip install -e ".[test]"')
    assert test_command.endswith("python -m pytest -q")
    printed = subprocess.run([str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == test_command


def chromium_step() -> str:
    command = readme_commands()[1]
    start = command.index("{ command -v chromium")
    return command[start:command.index("&& python -m pytest")].strip()


def fake_bin(tmp_path: Path, *, sudo: bool, chromium: bool) -> Path:
    """A PATH with recording stand-ins: apt-get (and sudo, chromium when asked) plus `env`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    scripts = {"apt-get": f'echo "apt-get $*" >> {log}'}
    if sudo:
        scripts["sudo"] = f'echo "sudo $1" >> {log}; "$@"'
    if chromium:
        scripts["chromium"] = "exit 0"
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    (bin_dir / "env").symlink_to("/usr/bin/env")
    return bin_dir


@pytest.mark.parametrize("sudo,chromium,expected", [
    (True, False, ["sudo apt-get", "apt-get update -qq", "sudo env", "apt-get install -y -qq chromium"]),
    (False, False, ["apt-get update -qq", "apt-get install -y -qq chromium"]),  # root on a bare image: no sudo
    (True, True, []),  # already there: nothing installed
])
def test_the_test_command_installs_chromium_when_missing(tmp_path, sudo, chromium, expected):
    bin_dir = fake_bin(tmp_path, sudo=sudo, chromium=chromium)
    res = subprocess.run(["/bin/bash", "-c", f"set -e; {chromium_step()} && echo ok"], capture_output=True, text=True,
                         env={"PATH": str(bin_dir)})
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    log = tmp_path / "calls.log"
    assert (log.read_text().splitlines() if log.exists() else []) == expected
