"""Time listing many bound loop devices: ``loopdev.devices()`` and ``loopdev.find()``
against a ``losetup -J -l`` process.

Run as root: ``python bench/bench_devices.py [--count 256] [--runs 9] [--dir D] [--json]``;
part of ``bench_attach.py``'s one run too. Binds ``--count`` small sparse files
(in a temporary directory below ``--dir``) with autoclear, then times, ``--runs``
times each in rotated order, listing every bound device with ``loopdev.devices()``
(sysfs), with ``losetup -J -l`` (a process, as a shell runs it), and finding one
file's device with ``loopdev.find()``; prints median, min and max. Every device is
detached at the end, and the minors the kernel had to add for the run are removed
again (LOOP_CTL_REMOVE, where still unbound).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import TypedDict

from benchlib import (
    Interrupted,
    bound_under,
    ignoring_signals,
    loop_minors,
    make_files,
    median,
    release_under,
    remove_added,
    stop_on_signals,
)

import loopdev
from loopdev import LoopDevice


class Listing(TypedDict):
    """Milliseconds per call, by scenario; and how the binding went."""

    times_ms: dict[str, list[float]]
    count: int
    bound_total: int
    bind_s: float
    detach_s: float
    minors_removed: int


LOSETUP = "losetup -J -l"
DEVICES = "loopdev.devices()"
FIND = "loopdev.find(one file)"


def measure(root: str, count: int, runs: int) -> Listing:
    """Bind ``count`` files below ``root``, time the listings, detach everything."""
    losetup = shutil.which("losetup") or "/sbin/losetup"
    minors_before = loop_minors()
    paths = make_files(root, (f"d{i:04d}.img" for i in range(count)))
    attached: list[LoopDevice] = []
    try:
        start = time.perf_counter()
        for path in paths:
            attached.append(loopdev.attach(path, direct_io=False))
        bind_s = time.perf_counter() - start

        def ours(backings: list[str]) -> int:
            return sum(1 for b in backings if b.startswith(root + "/"))

        def with_devices() -> int:
            return ours([d.backing_file for d in loopdev.devices()])

        def with_losetup() -> int:
            out = subprocess.run([losetup, "-J", "-l"], capture_output=True, check=True)
            listed = json.loads(out.stdout.decode("utf-8", "surrogateescape"))
            return ours([d["back-file"] for d in listed["loopdevices"]])

        def with_find() -> int:
            return len(loopdev.find(paths[len(paths) // 2]))

        scenarios: dict[str, tuple[Callable[[], int], int]] = {
            DEVICES: (with_devices, count),
            LOSETUP: (with_losetup, count),
            FIND: (with_find, 1),
        }
        times: dict[str, list[float]] = {name: [] for name in scenarios}
        names = list(scenarios)
        for r in range(runs):  # rotated so that noise hits every scenario alike
            for name in names[r % len(names) :] + names[: r % len(names)]:
                fn, expected = scenarios[name]
                start = time.perf_counter()
                seen = fn()
                times[name].append((time.perf_counter() - start) * 1000)
                if seen != expected:
                    raise RuntimeError(f"{name} saw {seen} of our devices, not {expected}")
        bound_total = len(loopdev.devices())
        start = time.perf_counter()
        while attached:
            attached.pop().detach()
        detach_s = time.perf_counter() - start
    finally:
        with ignoring_signals():
            for dev in attached:
                try:
                    dev.detach(timeout=5)
                except OSError as exc:
                    print(f"bench_devices: detaching {dev.path}: {exc}", file=sys.stderr)
            release_under(root)
            removed = remove_added(loop_minors() - minors_before)
    return Listing(
        times_ms=times,
        count=count,
        bound_total=bound_total,
        bind_s=bind_s,
        detach_s=detach_s,
        minors_removed=removed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=256, help="devices to bind (256)")
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each (9)")
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("attaching loop devices needs root")
    stop_on_signals()
    root = os.path.realpath(tempfile.mkdtemp(prefix="bench_devices.", dir=args.dir))
    try:
        listing = measure(root, args.count, args.runs)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"bench_devices: interrupted ({exc or 'SIGINT'}); cleaned up", file=sys.stderr)
        return 130
    finally:
        with ignoring_signals():
            left = bound_under(root)
            shutil.rmtree(root, ignore_errors=True)
        if left:
            print(f"bench_devices: still bound after clean-up: {left}", file=sys.stderr)
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    print(
        f"{listing['count']} devices bound in {listing['bind_s']:.2f} s "
        f"({listing['bound_total']} bound on the machine); {args.runs} runs each"
    )
    print(f"{'':24} {'median ms':>10} {'min ms':>10} {'max ms':>10}")
    for name, ms in listing["times_ms"].items():
        print(f"{name:24} {median(ms):10.2f} {min(ms):10.2f} {max(ms):10.2f}")
    print(
        f"detached in {listing['detach_s']:.2f} s; "
        f"{listing['minors_removed']} added minors removed again"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
