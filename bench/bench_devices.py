"""Time listing many bound loop devices: ``loopdev.devices()`` against ``losetup -J -l``.

Run as root: ``python bench/bench_devices.py [--count 256] [--runs 9] [--dir D] [--json]``.
Needs loopdev installed and ``losetup``; the defaults take a few seconds.

Binds ``--count`` small sparse files (in a temporary directory below ``--dir``)
to loop devices with autoclear, then times, ``--runs`` times each in rotated
order, listing every bound device with ``loopdev.devices()`` (sysfs), with
``losetup -J -l`` (a process, as a shell would run it), and finding one file's
devices with ``loopdev.find()``; prints the median, min and max. Every device is
detached and the directory removed at exit, on errors, Ctrl-C, SIGTERM and
SIGHUP too (and were the process killed outright, autoclear releases the devices
when the kernel closes its fds). Devices that the kernel created for the run
stay as unbound minors unless ``--remove-created`` is given: removing them can
race with other users' allocations on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

try:
    from loopdev import LoopControl
    from loopdev.device import LoopDevice, attach, devices, find, open_device
except ImportError as exc:  # the CFFI extension only exists in an installed copy
    sys.exit(f"bench_devices: cannot import loopdev ({exc}); pip install the package first")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(Exception):
    """A stop signal arrived; unwinds to the clean-up."""


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise Stopped(signal.Signals(signum).name)


def bound_under(root: str) -> list[str]:
    """Names of loop devices whose backing file lies below ``root``."""
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(root + "/"):
            found.append(name)
    return found


def loop_minors() -> set[int]:
    return {
        int(n[4:]) for n in os.listdir("/sys/block") if n.startswith("loop") and n[4:].isdigit()
    }


def _close_own_fds(names: set[str]) -> None:
    """Close fds of ours on these devices (an attach cut short by a signal may leave one)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if os.path.basename(target) in names:
            try:
                os.close(int(fd))
            except OSError:
                pass


def cleanup(root: str, attached: list[LoopDevice], created: set[int], remove: bool) -> list[str]:
    """Detach everything below ``root``; returns what could not be released."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        for dev in attached:
            try:
                dev.detach(timeout=5)
            except OSError as exc:
                print(f"bench_devices: detaching {dev.path}: {exc}", file=sys.stderr)
        left = bound_under(root)
        if left:  # not ours as LoopDevice objects (cut-short attach): sweep them
            _close_own_fds(set(left))
            for name in left:
                try:
                    with open_device(name, owned=True):
                        pass  # __exit__ detaches
                except OSError as exc:
                    print(f"bench_devices: detaching /dev/{name}: {exc}", file=sys.stderr)
        deadline = time.monotonic() + 5
        while bound_under(root) and time.monotonic() < deadline:
            time.sleep(0.01)
        left = bound_under(root)
        if remove and created:
            ctl = LoopControl()
            try:
                for minor in sorted(created):
                    try:
                        ctl.remove(minor)
                    except OSError:
                        pass  # in use again (someone else's now), or already gone
            finally:
                ctl.close()
        shutil.rmtree(root, ignore_errors=True)
        return left
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def timed(fn: Callable[[], int], runs: int) -> tuple[list[float], int]:
    times = []
    seen = 0
    for _ in range(runs):
        start = time.perf_counter()
        seen = fn()
        times.append(time.perf_counter() - start)
    return times, seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=256, help="devices to bind (256)")
    parser.add_argument("--runs", type=int, default=9, help="timed runs of each (9)")
    parser.add_argument("--dir", default=None, help="parent of the temporary directory")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--remove-created",
        action="store_true",
        help="LOOP_CTL_REMOVE the minors the kernel created for this run",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench_devices: needs root", file=sys.stderr)
        return 2
    losetup = shutil.which("losetup") or shutil.which("/usr/sbin/losetup") or "/sbin/losetup"

    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    root = os.path.realpath(tempfile.mkdtemp(prefix="bench_devices.", dir=args.dir))
    attached: list[LoopDevice] = []
    minors_before = loop_minors()
    status = 0
    results: dict[str, dict[str, float]] = {}
    try:
        paths = []
        for i in range(args.count):
            path = os.path.join(root, f"d{i:04d}.img")
            with open(path, "wb") as f:
                f.truncate(1 << 20)
            paths.append(path)
        start = time.perf_counter()
        for path in paths:
            attached.append(attach(path, direct_io=False))
        bind_s = time.perf_counter() - start

        def count_ours(backings: list[str]) -> int:
            return sum(1 for b in backings if b.startswith(root + "/"))

        def with_loopdev() -> int:
            return count_ours([d.backing_file for d in devices()])

        def with_losetup() -> int:
            out = subprocess.run([losetup, "-J", "-l"], capture_output=True, text=True, check=True)
            return count_ours([d["back-file"] for d in json.loads(out.stdout)["loopdevices"]])

        def with_find() -> int:
            return len(find(paths[len(paths) // 2]))

        scenarios = {
            "loopdev.devices()": with_loopdev,
            "losetup -J -l": with_losetup,
            "loopdev.find(one file)": with_find,
        }
        expected = {"loopdev.devices()": args.count, "losetup -J -l": args.count}
        expected["loopdev.find(one file)"] = 1
        samples: dict[str, list[float]] = {name: [] for name in scenarios}
        names = list(scenarios)
        for r in range(args.runs):  # rotated so that noise hits every scenario alike
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times, seen = timed(scenarios[name], 1)
                if seen != expected[name]:
                    raise RuntimeError(f"{name} saw {seen} of our devices, not {expected[name]}")
                samples[name] += times
        total = len(devices())
        for name, times in samples.items():
            results[name] = {
                "median_ms": statistics.median(times) * 1000,
                "min_ms": min(times) * 1000,
                "max_ms": max(times) * 1000,
            }
        start = time.perf_counter()
        for dev in attached:
            dev.detach()
        detach_s = time.perf_counter() - start
        attached.clear()
        info = {
            "ours": args.count,
            "bound_total": total,
            "loop_minors": len(loop_minors()),
            "bind_s": bind_s,
            "detach_s": detach_s,
            "runs": args.runs,
        }
        if args.json:
            print(json.dumps({"results": results, **info}, indent=2))
        else:
            print(
                f"{args.count} devices bound in {bind_s:.2f} s ({total} bound on the machine, "
                f"{info['loop_minors']} loop minors); {args.runs} runs each"
            )
            print(f"{'':24} {'median ms':>10} {'min ms':>10} {'max ms':>10}")
            for name, row in results.items():
                print(
                    f"{name:24} {row['median_ms']:10.2f} {row['min_ms']:10.2f} "
                    f"{row['max_ms']:10.2f}"
                )
            ratio = (
                results["losetup -J -l"]["median_ms"] / results["loopdev.devices()"]["median_ms"]
            )
            print(f"losetup -J -l / loopdev.devices(): {ratio:.1f}x; detached in {detach_s:.2f} s")
    except Stopped as exc:
        print(f"bench_devices: stopped by {exc}; cleaning up", file=sys.stderr)
        status = 130
    except Exception as exc:
        print(f"bench_devices: {exc}", file=sys.stderr)
        status = 1
    finally:
        created = loop_minors() - minors_before
        left = cleanup(root, attached, created, args.remove_created)
        if left:
            print(f"bench_devices: still bound after clean-up: {left}", file=sys.stderr)
            status = status or 1
    return status


if __name__ == "__main__":
    sys.exit(main())
