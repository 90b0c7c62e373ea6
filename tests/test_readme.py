"""The README's Python examples run as written, on a real device."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if README.exists() else []


@pytest.mark.skipif(not BLOCKS, reason="README.md not beside the tests")
@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_example(
    code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, devices: None
) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    sfdisk = shutil.which("sfdisk")
    if sfdisk:
        script = "label: gpt\nsize=4M\nsize=4M\n"
        subprocess.run([sfdisk, "-q", str(image)], input=script, text=True, check=True)
    monkeypatch.chdir(tmp_path)
    exec(compile("import os\n" + code, "README.md", "exec"), {"os": os})
