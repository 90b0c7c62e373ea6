"""Loop-device state read from sysfs, where ioctls truncate or need an open."""

from __future__ import annotations

import errno
import os
import time

# Reading an attribute of a device unbound (or removed) under us answers
# ENODEV or ENXIO on 6.x, not only ENOENT.
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ENXIO)


def is_gone(exc: OSError) -> bool:
    """Whether ``exc`` means the device went away while we read it."""
    return exc.errno in _GONE


SYS_BLOCK = "/sys/block"


def backing_file(name: str) -> str | None:
    """Full backing path of ``loopN`` (the ioctl cuts it at 64 bytes); None when unbound.

    The kernel appends " (deleted)" when the file was unlinked; that stays.
    """
    try:
        with open(f"{SYS_BLOCK}/{name}/loop/backing_file", "rb") as f:
            raw = f.read()
    except OSError as exc:
        if is_gone(exc):
            return None
        raise
    return os.fsdecode(raw.rstrip(b"\n")) or None


def read_int(name: str, attr: str) -> int:
    """An integer attribute below ``/sys/block/NAME`` (e.g. ``loop/offset``)."""
    with open(f"{SYS_BLOCK}/{name}/{attr}", "rb") as f:
        return int(f.read().strip() or 0)


def _bound_to(name: str, st: os.stat_result | None) -> bool:
    path = backing_file(name)
    if path is None:
        return False
    if st is None:
        return True
    try:
        other = os.stat(path)
    except OSError:
        # Unlinked or unreachable from here: cannot prove it is another file.
        return True
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


def wait_released(name: str, st: os.stat_result | None, timeout: float, interval: float) -> None:
    """Wait until ``name`` is unbound, or bound to a file other than ``st``'s.

    Polls sysfs with a short interval that grows to ``interval``: the kernel
    sends no event we could wait on without udev or a netlink socket, and the
    release usually completes within a millisecond of the last close.
    """
    deadline = time.monotonic() + timeout
    delay = min(0.0005, interval) if interval > 0 else 0.0005
    while _bound_to(name, st):
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"/dev/{name} still bound after {timeout:g} s: another process holds it open"
            )
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, max(interval, 0.0005))
