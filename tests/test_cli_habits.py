"""losetup habits the CLI keeps, on real devices: read-only fallback with a warning,
detach that returns at once (``--wait`` to wait), losetup's wording for tiny and
empty files, messages in flag terms."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import bound_under, wait_unbound
from helpers import run_cli as run

from loopdev import cli
from loopdev.errors import BackingFileError


def make_file(path: Path, size: int = 4 << 20) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@pytest.fixture
def read_only_dir(tmp_path: Path, devices: None) -> Iterator[Path]:
    """A read-only bind mount of a directory holding ``disk.img``."""
    src = tmp_path / "src"
    src.mkdir()
    make_file(src / "disk.img")
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        for name in bound_under(str(tmp_path)):
            run("detach", "--wait=5", f"/dev/{name}")
        subprocess.run(["umount", str(ro)], check=True)


def test_read_only_file_system_attaches_read_only(read_only_dir: Path) -> None:
    image = read_only_dir / "disk.img"
    out = run("attach", "--show", str(image))
    assert out.returncode == 0, out.stderr
    assert "write-protected, attaching read-only" in out.stderr
    dev = out.stdout.strip()
    with open(f"/sys/block/{os.path.basename(dev)}/ro") as f:
        assert f.read().strip() == "1"
    assert run("detach", "--wait", dev).returncode == 0


def test_python_api_keeps_its_error(read_only_dir: Path) -> None:
    import loopdev

    with pytest.raises(loopdev.BackingFileError, match="read_only=True"):
        loopdev.attach(read_only_dir / "disk.img")


def test_detach_returns_at_once_and_wait_waits(tmp_path: Path, devices: None) -> None:
    """While another process holds the device: ``detach`` returns at once (exit 0, the
    kernel releases at the last close), ``detach --wait=S`` fails after S seconds."""
    image = make_file(tmp_path / "held.img")
    for wait in ([], ["--wait=0.5"]):
        dev = run("attach", "--show", str(image)).stdout.strip()
        holder = subprocess.Popen(
            [sys.executable, "-c", f"import os, time; os.open({dev!r}, os.O_RDONLY); time.sleep(3)"]
        )
        try:
            time.sleep(0.2)
            start = time.monotonic()
            out = run("detach", *wait, dev)
            elapsed = time.monotonic() - start
        finally:
            holder.kill()
            holder.wait()
        if wait:
            assert out.returncode == 1 and "still held open" in out.stderr, out
            assert 0.5 <= elapsed < 3, elapsed
        else:
            assert out.returncode == 0, out.stderr
            assert elapsed < 2, elapsed  # a Python start-up, not a 10 s wait
        assert wait_unbound(str(tmp_path)) == []


def test_tiny_and_empty_files_like_losetup(tmp_path: Path, devices: None) -> None:
    image = make_file(tmp_path / "zero.img", 0)
    out = run("attach", "--show", str(image))
    assert out.returncode == 0, out.stderr
    assert "file is smaller than 512 bytes; the loop device may be useless" in out.stderr
    assert run("detach", "--wait", out.stdout.strip()).returncode == 0
    out = run("attach", "")
    assert out.returncode == 1
    assert out.stderr.startswith("loopdev: ") and "No such file or directory" in out.stderr


def test_messages_name_the_flags() -> None:
    """A library message that names a keyword argument names the flag in the CLI."""
    exc = BackingFileError(13, "backing file has no write permission; pass read_only=True")
    text = cli._message(exc)
    assert "--read-only" in text and "read_only=True" not in text, text
    exc = BackingFileError(22, "direct I/O was required; use direct_io='auto' or False")
    assert "--direct-io=auto or off" in cli._message(exc)
