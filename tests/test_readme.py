"""The README's examples run as written, on real devices: every Python block, and
every shell block except the lines that install the package or run this suite
(``pip ...``, ``python -m pytest ...``), which is what CI itself does first.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import brokerlib
import pytest
from helpers import register_backing, run_example, wait_unbound
from images import SFDISK, MiB, make_image, sfdisk_image

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text() if README.exists() else ""
PYTHON = re.findall(r"```python\n(.*?)```", TEXT, re.S)
SHELL = re.findall(r"```sh\n(.*?)```", TEXT, re.S)
SETUP = re.compile(r"^(pip |python -m pytest)")


def _gpt_image(path: Path) -> None:
    """The README's disk.img: a GPT with two partitions, or blank without sfdisk."""
    if SFDISK is None:
        make_image(path, 16 * MiB)
    else:
        sfdisk_image(path, "label: gpt\nsize=4M\nsize=4M\n", 16 * MiB)


@pytest.mark.skipif(not PYTHON, reason="README.md not beside the tests")
@pytest.mark.parametrize("code", PYTHON, ids=[f"python{i}" for i in range(len(PYTHON))])
def test_readme_python(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: None
) -> None:
    _gpt_image(tmp_path / "disk.img")
    monkeypatch.chdir(tmp_path)
    exec(compile("import os\n" + code, "README.md", "exec"), {"os": os})


@pytest.fixture
def shared_dir(devices: None) -> Iterator[Path]:
    """A fresh directory other users can reach (the broker example runs a client as
    ``nobody``); pytest's own tmp_path lies below a root-only directory."""
    path = Path(tempfile.mkdtemp(prefix="loopdev-readme-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        _detach_under(path)
        shutil.rmtree(path)


@pytest.mark.skipif(not SHELL, reason="README.md not beside the tests")
@pytest.mark.parametrize("block", SHELL, ids=[f"sh{i}" for i in range(len(SHELL))])
def test_readme_shell(block: str, shared_dir: Path) -> None:
    """Each block in a fresh directory, with this interpreter's ``loopdev`` and
    ``python`` first on PATH; a non-zero status fails the test."""
    lines = [line for line in block.splitlines() if not SETUP.match(line)]
    if not any(line.strip() for line in lines):
        pytest.skip("only installs or runs the tests")
    if "--reuid=nobody" in block:
        brokerlib.require_unprivileged()
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    try:
        run_example(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], shared_dir, env)
    finally:
        if (shared_dir / "disk.img").exists():
            register_backing(shared_dir / "disk.img")  # outside tmp_path: tell the leak check
        _detach_under(shared_dir)  # loopdev attach outlives its command
    assert wait_unbound(str(shared_dir)) == []


def _detach_under(directory: Path) -> None:
    for image in directory.glob("*.img"):
        subprocess.run(
            [sys.executable, "-m", "loopdev", "detach", "--wait=5", str(image)],
            capture_output=True,
            check=False,
        )
