"""Many processes and threads allocating at once: no failure, nothing left bound."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path

from helpers import wait_unbound

from loopdev import LoopControl

CYCLES = int(os.environ.get("LOOPDEV_STRESS_CYCLES", "200"))


def _cycles(path: str, cycles: int) -> int:
    """Attach and release ``cycles`` times; return the number of failures."""
    failures = 0
    ctl = LoopControl()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _ in range(cycles):
            try:
                lo = ctl.loop_for_fd(fd, autoclear=True)
            except OSError:
                failures += 1
                continue
            if not lo.is_bound_to(fd):
                failures += 1
            lo.close()
    finally:
        os.close(fd)
        ctl.close()
    return failures


def _images(tmp_path: Path, n: int) -> list[str]:
    paths = []
    for i in range(n):
        path = tmp_path / f"img{i}"
        with open(path, "wb") as f:
            f.truncate(1 << 20)
        paths.append(str(path))
    return paths


def test_eight_processes(tmp_path: Path, devices: None) -> None:
    paths = _images(tmp_path, 8)
    with multiprocessing.get_context("fork").Pool(8) as pool:
        failures = pool.starmap(_cycles, [(p, CYCLES) for p in paths])
    assert failures == [0] * 8
    assert wait_unbound(str(tmp_path)) == []


def test_eight_threads(tmp_path: Path, devices: None) -> None:
    paths = _images(tmp_path, 8)
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda p=p: results.append(_cycles(p, CYCLES))) for p in paths
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [0] * 8
    assert wait_unbound(str(tmp_path)) == []
