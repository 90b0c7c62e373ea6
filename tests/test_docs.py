"""The documentation site's examples run as written, on real devices: every
``code-block`` (Python and shell) of ``docs/*.rst``, each in a fresh directory
other users can reach, with this interpreter's ``loopdev`` and ``python``
first on PATH. (The site itself is built by ``.ci/docs`` with warnings as
errors.)
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import brokerlib
import pytest
from helpers import register_backing, run_example, wait_unbound

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCK = re.compile(r"^\.\. code-block:: (python|sh)\n\n((?:(?:   .*)?\n)+)", re.M)


def examples() -> list[tuple[str, str, str]]:
    """(id, language, code) of every example of the site."""
    found = []
    for page in sorted(DOCS.glob("*.rst")):
        for i, m in enumerate(BLOCK.finditer(page.read_text())):
            found.append((f"{page.stem}-{i}", m.group(1), textwrap.dedent(m.group(2))))
    return found


EXAMPLES = examples()


def test_the_site_has_examples() -> None:
    if not DOCS.exists():
        pytest.skip("docs/ not beside the tests")
    pages = {e[0].rsplit("-", 1)[0] for e in EXAMPLES}
    assert {"tutorial", "container", "unprivileged", "compat", "losetup"} <= pages


@pytest.fixture
def shared_dir(devices: None) -> Iterator[Path]:
    """A fresh directory ``nobody`` can reach (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="loopdev-docs-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for image in path.glob("*.img"):
            register_backing(image)  # outside tmp_path: tell the leak check
            subprocess.run(
                [sys.executable, "-m", "loopdev", "detach", "--wait=5", str(image)],
                capture_output=True,
                check=False,
            )
        left = wait_unbound(str(path))
        shutil.rmtree(path)
        assert left == [], f"the example left devices bound: {left}"


@pytest.mark.parametrize(
    ("language", "code"), [e[1:] for e in EXAMPLES], ids=[e[0] for e in EXAMPLES]
)
def test_example(language: str, code: str, shared_dir: Path) -> None:
    if "--reuid=nobody" in code:
        brokerlib.require_unprivileged()
    if "sfdisk" in code and shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (util-linux) not installed")
    bindir = os.path.dirname(sys.executable)
    env = dict(os.environ, PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    if language == "python":
        argv = [sys.executable, "-c", code]
    else:
        argv = ["bash", "-euo", "pipefail", "-c", code]
    run_example(argv, shared_dir, env)
