"""Kernel races: EBUSY from ``LOOP_CONFIGURE``/``LOOP_SET_FD`` made to happen (an
exclusive holder, allocators that do not take the loop-control lock) is retried; a
device another process reads is configured and changed under its reads.

``LOOPDEV_LONG=1`` runs longer contention.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from helpers import LONG, MiB, child, reap, wait_unbound
from images import make_image

from loopdev import DeviceBusy, Loop, LoopControl
from loopdev.device import attach


@pytest.mark.parametrize("api", ["compat", "attach"])
def test_exclusive_holder_busy_is_retried(
    tmp_path: Path,
    devices: None,
    configure_path: str,
    api: str,
    child_procs: list[subprocess.Popen[str]],
) -> None:
    """A process holds the next free minor with O_EXCL: LOOP_CONFIGURE / LOOP_SET_FD answer
    EBUSY until it lets go (0.3 s, so others on this machine just retry as well)."""
    image = make_image(tmp_path / "excl.img")
    holder = child("hold_exclusive", "0.3")
    child_procs.append(holder)
    assert holder.stdout is not None
    line = holder.stdout.readline().split()
    assert line, holder.stderr.read() if holder.stderr else ""
    held, released_at = int(line[0]), float(line[1])
    start = time.monotonic()
    if api == "compat":
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            lo = ctl.loop_for_fd(fd, autoclear=True)
            minor = lo.minor
            lo.close()
        finally:
            os.close(fd)
            ctl.close()
    else:
        with attach(image) as dev:
            minor = dev.index
    end = time.monotonic()
    holder.communicate(timeout=30)
    print(f"held loop{held} for 0.3 s; got loop{minor} after {end - start:.3f} s")
    if minor == held:
        # It got the minor that was busy: it must have been refused and retried until then.
        assert start < released_at <= end + 0.05
    assert wait_unbound(tmp_path) == []


def test_contending_allocators_never_fail(
    tmp_path: Path, devices: None, child_procs: list[subprocess.Popen[str]]
) -> None:
    """4 loopdev processes (2 through the LOOP_SET_FD fallback) against 2 allocators that do
    not take the loop-control lock: the EBUSY race really happens and loopdev retries it."""
    cycles = 400 if LONG else 100
    rogue_time = 10.0 if LONG else 2.5
    for i in range(2):
        rogue = child(
            "rogue_allocator", str(make_image(tmp_path / f"rogue{i}.img", MiB)), str(rogue_time)
        )
        child_procs.append(rogue)
    workers = []
    for i in range(4):
        env = dict(os.environ, LOOPDEV_FORCE_FALLBACK="1" if i % 2 else "0")
        path = make_image(tmp_path / f"w{i}.img", MiB)
        workers.append(child("contender", str(path), str(cycles), env=env))
        child_procs.append(workers[-1])
    reports = []
    for proc in workers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    busy = 0
    for proc in child_procs[:2]:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        busy += int(out.split()[0])
    assert [r["failures"] for r in reports] == [[]] * 4
    retries = sum(r["retries"] for r in reports)
    print(f"contention: {retries} loopdev retries, {busy} EBUSY seen by the rogue allocators")
    assert retries + busy > 0, "the race never happened: the test proved nothing"
    assert wait_unbound(tmp_path) == []


def test_configure_while_another_process_reads(
    tmp_path: Path,
    devices: None,
    configure_path: str,
    child_procs: list[subprocess.Popen[str]],
) -> None:
    """Bind (LOOP_CONFIGURE, or SET_FD + SET_STATUS64 + SET_BLOCK_SIZE in the fallback) a
    device that another process holds open and reads, then change offset and block size
    under its reads: where the kernel answers EAGAIN (5.x) it is retried, never surfaced."""
    image = make_image(tmp_path / "reader.img", 4 * MiB)
    ctl = LoopControl()
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(5):  # the free minor is shared with everyone on this machine
            lo = Loop(ctl.get_unbound())
            reader = child("reader", f"/dev/loop{lo.minor}", "1.0")
            child_procs.append(reader)
            assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
            try:
                lo.configure(fd, offset=4096, sizelimit=2 * MiB, blocksize=4096, autoclear=True)
                break
            except DeviceBusy:
                lo.close()
                reap(reader)
        else:
            pytest.fail("no free minor stayed free for a single configure")
        try:
            status = lo.get_status()
            assert (status.lo_offset, status.lo_sizelimit, status.autoclear) == (4096, 2 * MiB, 1)
            assert lo.is_bound_to(fd)
            for i in range(6):
                lo.set_status(offset=8192 if i % 2 else 4096)
                lo.set_block_size(512 if i % 2 else 4096)
            assert lo.get_status().lo_offset == 8192
        finally:
            lo.close()
        reader.communicate(timeout=30)
    finally:
        os.close(fd)
        ctl.close()
    assert wait_unbound(tmp_path) == []
