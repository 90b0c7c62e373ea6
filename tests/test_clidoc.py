"""The man page, the CLI reference and the completions are generated from the command table
(``python -m loopdev._clidoc --write``) and checked in: they must be current, and
work with their tools (man, bash, zsh)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from loopdev import __version__, _clidoc

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "data" / "loopdev.8"
BASH = ROOT / "data" / "completions" / "loopdev"
ZSH = ROOT / "data" / "completions" / "_loopdev"

pytestmark = pytest.mark.skipif(not MAN.exists(), reason="not run from a checkout")


@pytest.mark.parametrize("path", sorted(_clidoc.OUTPUTS))
def test_generated_files_are_current(path: str) -> None:
    text = _clidoc.generated()[path]
    assert (ROOT / path).read_text() == text, (
        f"{path} is out of date: run python -m loopdev._clidoc --write"
    )


def test_every_command_and_option_documented() -> None:
    from loopdev import losetup

    page = MAN.read_text().replace("\\-", "-")
    _, commands = _clidoc.commands()
    names = [c.name for c in commands]
    for cmd in commands:
        assert f".SS {cmd.name}" in page
        for option in losetup.OPTIONS if cmd.name == "losetup" else cmd.args:
            for name in option.names:
                assert name in page, (cmd.name, name)
    assert {"attach", "detach", "list", "find", "resize", "serve", "losetup"} <= set(names)
    assert f'"loopdev {__version__}"' in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man not installed")
def test_man_renders() -> None:
    out = subprocess.run(
        ["man", "--warnings", "-l", str(MAN)],
        capture_output=True,
        text=True,
        env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    assert "LOOPDEV(8)" in out.stdout and "losetup" in out.stdout


def complete_bash(*words: str) -> list[str]:
    script = (
        f"source {BASH}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        "COMP_CWORD=$((${#COMP_WORDS[@]} - 1))\n"
        "_loopdev\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_bash_completion() -> None:
    assert complete_bash("loopdev", "at") == ["attach"]
    assert complete_bash("loopdev", "attach", "--sh") == ["--show"]
    assert complete_bash("loopdev", "--debug", "detach", "--w") == ["--wait"]
    assert complete_bash("loopdev", "losetup", "--part") == ["--partscan"]
    assert complete_bash("loopdev", "serve", "--max-") == ["--max-per-client", "--max-devices"]
    # After an option that takes a number nothing is offered.
    assert complete_bash("loopdev", "attach", "--offset", "") == []


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh not installed")
def test_zsh_completion_parses() -> None:
    out = subprocess.run(["zsh", "-n", str(ZSH)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert ZSH.read_text().startswith("#compdef loopdev\n")
