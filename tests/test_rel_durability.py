"""Durability: blocks written through a device or a partition are in the file after
detach, also when another process held the device at detach time; a busy partition
makes detach refuse and change nothing.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import MiB, backing_of, bound_under, child, partitions_of, wait_node, wait_unbound
from images import GPT_PARTS, gpt_image, make_image

from loopdev import DeviceBusy, LoopControl
from loopdev.device import attach


def digest(path: str | Path, spans: list[tuple[int, int]]) -> str:
    """sha256 over the bytes of ``path`` at each (offset, length), in order."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for offset, length in spans:
            data = os.pread(fd, length, offset)
            assert len(data) == length
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def random_blocks(rng: random.Random, area: int, count: int, block: int = 4096) -> list[int]:
    """``count`` distinct block-aligned offsets within ``area`` bytes."""
    return sorted(b * block for b in rng.sample(range(area // block), count))


def write_blocks(fd: int, offsets: list[int], rng: random.Random, block: int = 4096) -> str:
    """Write random blocks at ``offsets``; returns the sha256 of what was written."""
    h = hashlib.sha256()
    for offset in offsets:
        data = rng.randbytes(block)
        assert os.pwrite(fd, data, offset) == block
        h.update(data)
    return h.hexdigest()


def _attach_partscan(api: str, image: Path) -> tuple[int, Callable[[], None], int]:
    """Attach with partscan; (minor, release, the library's own device fd)."""
    if api == "compat":
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
        finally:
            os.close(fd)
            ctl.close()
        return lo.minor, lo.close, lo.fd
    dev = attach(image, partscan=True)
    return dev.index, dev.detach, dev.fd


@pytest.mark.parametrize("target", ["device", "partition"])
@pytest.mark.parametrize("api", ["compat", "attach"])
def test_writes_are_in_the_file_after_detach(
    tmp_path: Path, devices: None, api: str, target: str
) -> None:
    image = gpt_image(tmp_path / "dur.img")
    rng = random.Random()
    minor, release, dev_fd = _attach_partscan(api, image)
    try:
        if target == "device":
            base = 0
            offsets = random_blocks(rng, 16 * MiB, 64)
            # Through the library's own fd, not flushed by us: release must do it.
            expected = write_blocks(dev_fd, offsets, rng)
        else:
            base, area = GPT_PARTS[0]
            offsets = random_blocks(rng, area, 64)
            part = f"/dev/loop{minor}p1"
            wait_node(part)
            pfd = os.open(part, os.O_RDWR | os.O_CLOEXEC)
            try:
                expected = write_blocks(pfd, offsets, rng)
            finally:
                os.close(pfd)
    finally:
        release()
    assert wait_unbound(tmp_path) == []
    assert partitions_of(minor) == [] or backing_of(minor) is not None
    assert digest(image, [(base + o, 4096) for o in offsets]) == expected


def _hold(path: str, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = child("hold_open", path)
    procs.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held", proc.stderr.read() if proc.stderr else ""
    return proc


def _let_go(proc: subprocess.Popen[str]) -> None:
    proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("how", ["attach-timeout", "attach-waits", "compat-close", "compat-wait"])
def test_writes_survive_a_reader_holding_the_device(
    tmp_path: Path, devices: None, how: str, child_procs: list[subprocess.Popen[str]]
) -> None:
    """Another process holds the device read-only while we detach: the data still lands."""
    image = make_image(tmp_path / "held.img", 8 * MiB)
    rng = random.Random()
    offsets = random_blocks(rng, 8 * MiB, 64)
    if how.startswith("attach"):
        dev = attach(image)
        expected = write_blocks(dev.fd, offsets, rng)
        holder = _hold(dev.path, child_procs)
        if how == "attach-timeout":
            start = time.monotonic()
            with pytest.raises(DeviceBusy) as exc:
                dev.detach(timeout=0.3)
            assert 0.3 <= time.monotonic() - start < 5
            assert exc.value.errno == errno.EBUSY and exc.value.device == dev.path
            assert bound_under(str(tmp_path)) == [dev.name]  # still held, still bound
            _let_go(holder)
        else:
            letting_go = threading.Timer(0.3, lambda: _let_go(holder))
            letting_go.start()
            start = time.monotonic()
            dev.detach(timeout=10)
            assert time.monotonic() - start >= 0.25
            # The holder closed the device; let it finish exiting before the
            # fixture's teardown kills what is left (CI saw it killed: -9).
            letting_go.join()
            assert holder.returncode == 0
    else:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True)
        expected = write_blocks(lo.fd, offsets, rng)
        holder = _hold(f"/dev/loop{lo.minor}", child_procs)
        try:
            if how == "compat-wait":
                with pytest.raises(TimeoutError):
                    lo.clear_fd_wait(fd, 0.3, 0.01)
                assert lo.is_bound_to(fd)
            else:
                lo.clear_fd()
        finally:
            lo.close()
            os.close(fd)
            ctl.close()
        assert bound_under(str(tmp_path)) != []  # the holder keeps it bound
        _let_go(holder)
    assert wait_unbound(tmp_path) == []
    assert digest(image, [(o, 4096) for o in offsets]) == expected


@pytest.mark.parametrize("api", ["compat", "attach"])
def test_busy_partition_refuses_detach_and_changes_nothing(
    tmp_path: Path, devices: None, api: str
) -> None:
    """One partition is open: detach (compat clear_fd) raises DeviceBusy and the device keeps
    every partition, not only the busy one (README: "nothing changed then")."""
    image = gpt_image(tmp_path / "busy.img")
    release: Callable[[], None]
    again: Callable[[], None]
    if api == "attach":
        dev = attach(image, partscan=True)
        minor, release, again = dev.index, dev.detach, dev.detach
    else:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
        minor, release = lo.minor, lo.clear_fd

        def close_all() -> None:
            lo.close()
            os.close(fd)
            ctl.close()

        again = close_all

    wait_node(f"/dev/loop{minor}p2")
    before = partitions_of(minor)
    assert len(before) == 2
    holder = os.open(f"/dev/loop{minor}p2", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(DeviceBusy) as exc:
            release()
        assert exc.value.errno == errno.EBUSY
        assert backing_of(minor) == str(image)
        assert partitions_of(minor) == before  # "nothing changed then"
    finally:
        os.close(holder)
        again()
    assert wait_unbound(tmp_path) == []
