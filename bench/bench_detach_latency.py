"""How soon a release returns after the last other holder closes the device.

Run as root: ``python bench/bench_detach_latency.py [--rounds N]``; part of
``bench_attach.py``'s one run too. Another process holds the device open and
closes it 20 to 60 ms after the release began; the latency is from the moment
that process called ``close()`` (CLOCK_MONOTONIC is the same in every process)
to the return of ``LoopDevice.detach()`` or compat ``clear_fd_wait(fd, 30)``
(with the default poll cap and with ``wait=1``). Prints median and maximum.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from benchlib import (
    ignoring_signals,
    make_files,
    median,
    release_under,
    stop_on_signals,
)

import loopdev
from loopdev import LoopControl

HOLD_MIN, HOLD_MAX = 0.020, 0.060


def _holder(conn: Connection) -> None:
    """Serve ("open", path) -> "held", and ("close", delay) -> the close's monotonic ns."""
    fd = -1
    try:
        while True:
            what, arg = conn.recv()
            if what == "open":
                fd = os.open(arg, os.O_RDONLY | os.O_CLOEXEC)
                conn.send("held")
            elif what == "close":
                time.sleep(arg)
                stamp = time.monotonic_ns()
                os.close(fd)
                fd = -1
                conn.send(stamp)
            else:
                return
    except EOFError:  # the parent went away
        return
    finally:
        if fd >= 0:
            os.close(fd)


def _detach(image: str, hold: Callable[[str, float], None]) -> None:
    dev = loopdev.attach(image)
    try:
        hold(dev.path, random.uniform(HOLD_MIN, HOLD_MAX))
    finally:
        dev.detach(timeout=10)


def _clear_fd_wait(wait: float | None) -> Callable[[str, Callable[[str, float], None]], None]:
    def release(image: str, hold: Callable[[str, float], None]) -> None:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            lo = ctl.loop_for_fd(fd, autoclear=True)
            try:
                hold(f"/dev/loop{lo.minor}", random.uniform(HOLD_MIN, HOLD_MAX))
                if wait is None:
                    lo.clear_fd_wait(fd, 30)
                else:
                    lo.clear_fd_wait(fd, 30, wait)
            finally:
                lo.close()
        finally:
            os.close(fd)
            ctl.close()

    return release


VARIANTS: dict[str, Callable[[str, Callable[[str, float], None]], None]] = {
    "LoopDevice.detach()": _detach,
    "compat clear_fd_wait(fd, 30)": _clear_fd_wait(None),
    "compat clear_fd_wait(fd, 30, 1.0)": _clear_fd_wait(1.0),
}


def measure(root: str, rounds: int) -> dict[str, list[float]]:
    """Latencies in ms of each variant, ``rounds`` each, interleaved."""
    (image,) = make_files(root, ["latency.img"])
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_holder, args=(child,), daemon=True)
    proc.start()
    child.close()
    results: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for _ in range(rounds):
            for name, release in VARIANTS.items():

                def hold(path: str, delay: float) -> None:
                    parent.send(("open", path))
                    if parent.recv() != "held":
                        raise RuntimeError("the holder could not open the device")
                    parent.send(("close", delay))  # closes after delay: the release waits

                release(image, hold)
                returned = time.monotonic_ns()
                results[name].append((returned - parent.recv()) / 1e6)
    finally:
        parent.send(("quit", None))
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        parent.close()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=20, help="releases of each kind (20)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("attaching loop devices needs root")
    stop_on_signals()
    root = tempfile.mkdtemp(prefix="bench_detach_latency.")
    try:
        results = measure(root, args.rounds)
    finally:
        with ignoring_signals():
            left = release_under(root)
            shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"bench_detach_latency: still bound: {left}", file=sys.stderr)
    for name, ms in results.items():
        print(f"{name:36} median {median(ms):7.2f} ms, max {max(ms):7.2f} ms ({len(ms)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
