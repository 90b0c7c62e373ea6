"""Threads: 8 threads of one process, half compat ``loop_for_fd`` (one shared
``LoopControl``) and half ``attach()``; no failure, nothing bound, no fd left.

Real devices. ``LOOPDEV_LONG=1`` runs 200 cycles per thread instead of 50.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from helpers import LONG, MiB, open_fds, wait_unbound
from images import make_image

from loopdev import LoopControl
from loopdev.device import attach

THREAD_CYCLES = 200 if LONG else 50


def test_eight_threads_both_apis(tmp_path: Path, devices: None) -> None:
    """4 threads compat (one shared LoopControl) + 4 threads attach(), concurrently."""
    paths = [str(make_image(tmp_path / f"t{i}.img", 1 * MiB)) for i in range(8)]
    before = open_fds()
    failures: list[str] = []
    record = failures.append  # list.append is atomic under the GIL
    barrier = threading.Barrier(8)
    ctl = LoopControl()

    def compat_worker(path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            barrier.wait()
            for _ in range(THREAD_CYCLES):
                try:
                    lo = ctl.loop_for_fd(fd, autoclear=True)
                    try:
                        if not lo.is_bound_to(fd):
                            record(f"compat loop{lo.minor} not bound to {path}")
                    finally:
                        lo.close()
                except Exception as exc:
                    record(f"compat: {exc!r}")
        finally:
            os.close(fd)

    def attach_worker(path: str) -> None:
        barrier.wait()
        for _ in range(THREAD_CYCLES):
            try:
                with attach(path) as dev:
                    if dev.info().backing_file != path:
                        record(f"attach {dev.path} not bound to {path}")
            except Exception as exc:
                record(f"attach: {exc!r}")

    threads = [
        threading.Thread(target=compat_worker if i % 2 else attach_worker, args=(p,))
        for i, p in enumerate(paths)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ctl.close()
    assert failures == []
    assert wait_unbound(tmp_path) == []
    assert open_fds() == before
