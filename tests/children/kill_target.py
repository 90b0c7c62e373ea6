"""Attach with autoclear and hold, or attach/detach in a loop, until killed.

argv: API (compat|attach) MODE (hold|attach-loop) PATH PARTSCAN (1|0).
Prints each minor it got, one a line ("GO" first in attach-loop mode).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import loopdev

api, mode, path, partscan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"

once: Callable[[], tuple[int, Callable[[], None]]]
if api == "compat":
    ctl = loopdev.LoopControl()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def once() -> tuple[int, Callable[[], None]]:
        lo = ctl.loop_for_fd(fd, autoclear=True, partscan=partscan)
        return lo.minor, lo.close
else:

    def once() -> tuple[int, Callable[[], None]]:
        dev = loopdev.attach(path, partscan=partscan)
        return dev.index, dev.detach


if mode == "hold":
    minor, _ = once()
    os.write(1, b"%d\n" % minor)
    time.sleep(120)
else:
    os.write(1, b"GO\n")
    while True:
        minor, release = once()
        os.write(1, b"%d\n" % minor)
        release()
