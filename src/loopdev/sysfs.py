"""Loop-device state read from sysfs, where ioctls truncate or need an open."""

from __future__ import annotations

import errno
import os
import time

from loopdev._native import LOOP_MAJOR

# Reading an attribute of a device unbound (or removed) under us answers
# ENODEV or ENXIO on 6.x, not only ENOENT.
_GONE = (errno.ENOENT, errno.ENOTDIR, errno.ENODEV, errno.ENXIO)


def is_gone(exc: OSError) -> bool:
    """Whether ``exc`` means the device went away while we read it."""
    return exc.errno in _GONE


SYS_BLOCK = "/sys/block"
SYS_CLASS_BLOCK = "/sys/class/block"
_MAX_PART = "/sys/module/loop/parameters/max_part"
_part_shift: int | None = None


def minor_shift() -> int:
    """The loop module's minor shift: loopN is minor ``N << part_shift``.

    ``loop.max_part=M`` reserves minors for M partitions per device
    (drivers/block/loop.c: part_shift = fls(max_part)); read once per process.
    """
    global _part_shift
    if _part_shift is None:
        try:
            with open(_MAX_PART, "rb") as f:
                max_part = int(f.read().strip() or 0)
        except (OSError, ValueError):
            max_part = 0  # built without the parameter: one minor per device
        _part_shift = max_part.bit_length() if max_part > 0 else 0
    return _part_shift


def loop_devt(index: int, part_shift: int | None = None) -> tuple[int, int]:
    """``(major, minor)`` of ``loop{index}``, as the loop module numbers it."""
    return LOOP_MAJOR, index << (minor_shift() if part_shift is None else part_shift)


def devt(name: str) -> tuple[int, int] | None:
    """``(major, minor)`` of block device ``name`` from sysfs; None when it is gone."""
    try:
        with open(f"{SYS_CLASS_BLOCK}/{name}/dev", "rb") as f:
            major, minor = f.read().split(b":")
    except OSError as exc:
        if is_gone(exc):
            return None
        raise
    return int(major), int(minor)


def backing_file(name: str) -> str | None:
    """Full backing path of ``loopN`` (the ioctl cuts it at 64 bytes); None when unbound.

    The kernel appends " (deleted)" when the file was unlinked; that stays.
    For display: a name cannot tell files apart (a live file may be called
    "x (deleted)"); ``_engine.backing_id`` can.
    """
    try:
        fd = os.open(f"{SYS_BLOCK}/{name}/loop/backing_file", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if is_gone(exc):
            return None
        raise
    try:
        raw = os.read(fd, 8192)
    except OSError as exc:
        if is_gone(exc):
            return None
        raise
    finally:
        os.close(fd)
    # The kernel adds one newline; more belong to the name.
    return os.fsdecode(raw[:-1] if raw.endswith(b"\n") else raw) or None


def diskseq(name: str) -> int | None:
    """The disk sequence number of ``name`` (unique per attachment; 5.15+), or None."""
    try:
        return read_int(name, "diskseq")
    except (OSError, ValueError):
        return None


def read_int(name: str, attr: str) -> int:
    """An integer attribute below ``/sys/block/NAME`` (e.g. ``loop/offset``)."""
    with open(f"{SYS_BLOCK}/{name}/{attr}", "rb") as f:
        return int(f.read().strip() or 0)


def _bound_to(name: str, st: os.stat_result | None, seq: int | None = None) -> bool:
    path = backing_file(name)
    if path is None:
        return False
    if seq is not None:
        now = diskseq(name)
        if now is not None:
            return now == seq  # exact: another binding has another sequence number
    if st is None:
        return True
    try:
        other = os.stat(path)
    except OSError:
        # Unlinked or unreachable from here: cannot prove it is another file.
        return True
    return (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino)


# The release usually completes well within a millisecond of the last close;
# polling at most this far apart keeps waiters within about that of it.
_POLL_MAX = 0.001


def wait_released(
    name: str, st: os.stat_result | None, timeout: float, seq: int | None = None
) -> None:
    """Wait until ``name`` is unbound, or bound anew: with another ``diskseq`` than
    ``seq`` where both are known, else to a file other than ``st``'s (by the name
    sysfs shows, which an unlinked file makes ambiguous).

    Polls sysfs (first after 0.2 ms, then every 1 ms at most): the kernel
    sends no event we could wait on without udev or a netlink socket.
    """
    deadline = time.monotonic() + timeout
    delay = 0.0002
    while _bound_to(name, st, seq):
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"/dev/{name} still bound after {timeout:g} s: another process holds it open"
            )
        time.sleep(min(delay, deadline - now))
        delay = min(delay * 2, _POLL_MAX)
