"""Child of tests/test_faults.py: one attach under injected faults, reported as JSON.

Run with ``LD_PRELOAD`` set to the fault library. ``argv[1]`` is a JSON object:
``api`` ("attach" or "compat"), ``image`` (opened ``O_RDWR``) and the settings
``sizelimit``, ``block_size``, ``partscan``, ``autoclear`` (each optional).
Prints one JSON line: on success ``{"ok": true, "minor", "elapsed", "sysfs"}``
(the device's sysfs attributes while attached; the device is released before
exit), on a failure ``{"ok": false, "types", "errno", "elapsed", "failed_ns"}``
(``failed_ns``: ``time.monotonic_ns()`` when the error arrived).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import loopdev

SYSFS = {
    "sizelimit": "loop/sizelimit",
    "autoclear": "loop/autoclear",
    "partscan": "loop/partscan",
    "ro": "ro",
    "block_size": "queue/logical_block_size",
}


def attach(spec: dict[str, Any], fd: int) -> tuple[int, Callable[[], None]]:
    sizelimit = int(spec.get("sizelimit", 0))
    block_size = int(spec.get("block_size", 0))
    partscan = bool(spec.get("partscan", False))
    autoclear = bool(spec.get("autoclear", False))
    if spec["api"] == "attach":
        dev = loopdev.attach(
            fd,
            sizelimit=sizelimit,
            block_size=block_size or None,
            partscan=partscan,
            autoclear=autoclear,
        )
        return dev.index, dev.detach
    ctl = loopdev.LoopControl()
    lo = ctl.loop_for_fd(
        fd, sizelimit=sizelimit, blocksize=block_size, partscan=partscan, autoclear=autoclear
    )

    def release() -> None:
        lo.clear_fd()
        lo.close()
        ctl.close()

    return lo.minor, release


def sysfs(minor: int) -> dict[str, int]:
    values = {}
    for key, attr in SYSFS.items():
        with open(f"/sys/block/loop{minor}/{attr}") as f:
            values[key] = int(f.read())
    return values


def main() -> None:
    spec = json.loads(sys.argv[1])
    fd = os.open(spec["image"], os.O_RDWR | os.O_CLOEXEC)
    start = time.monotonic()
    try:
        minor, release = attach(spec, fd)
    except OSError as exc:
        failed_ns = time.monotonic_ns()
        result = {
            "ok": False,
            "types": [cls.__name__ for cls in type(exc).__mro__],
            "errno": exc.errno,
            "elapsed": time.monotonic() - start,
            "failed_ns": failed_ns,
        }
        print(json.dumps(result))
        return
    elapsed = time.monotonic() - start
    try:
        state = sysfs(minor)
    finally:
        release()
    print(json.dumps({"ok": True, "minor": minor, "elapsed": elapsed, "sysfs": state}))


if __name__ == "__main__":
    main()
