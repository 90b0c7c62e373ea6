"""Partitions of a loop device: the kernel's scan, or ours through BLKPG.

The same result on every kernel: after :func:`ensure_registered` each
partition of the image is a block device with the table's start and size,
whether the kernel parsed the table itself or has no parser for it (like
this project's CI kernel) and loopdev registered it with BLKPG.
"""

from __future__ import annotations

import os
import stat
import time
from typing import NamedTuple

from loopdev import _native
from loopdev.errors import LoopError
from loopdev.parttable import read_table
from loopdev.sysfs import SYS_BLOCK, is_gone

SECTOR = 512  # sysfs start and size are in 512-byte sectors whatever the block size


class PartitionDevice(NamedTuple):
    """A registered partition: number, byte start and size, ``major:minor``, node."""

    number: int
    start: int
    size: int
    major: int
    minor: int
    name: str

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def list_partitions(name: str) -> list[PartitionDevice]:
    """The partitions sysfs lists for ``name`` (e.g. ``loop3``), by number."""
    base = f"{SYS_BLOCK}/{name}"
    found = []
    try:
        entries = os.listdir(base)
    except OSError as exc:
        if is_gone(exc):
            return []
        raise
    for entry in entries:
        if not entry.startswith(f"{name}p"):
            continue
        try:
            major, minor = _read(f"{base}/{entry}/dev").split(":")
            found.append(
                PartitionDevice(
                    number=int(_read(f"{base}/{entry}/partition")),
                    start=int(_read(f"{base}/{entry}/start")) * SECTOR,
                    size=int(_read(f"{base}/{entry}/size")) * SECTOR,
                    major=int(major),
                    minor=int(minor),
                    name=entry,
                )
            )
        except OSError as exc:
            if not is_gone(exc):
                raise
            continue  # deleted while we looked
    return sorted(found)


def ensure_registered(dev_fd: int, minor: int, backing: str | None = None) -> int:
    """Register the image's partitions with BLKPG where the kernel's scan found none.

    Returns how many loopdev registered. A malformed table raises
    :class:`~loopdev.errors.PartitionTableError` and registers nothing.
    """
    name = f"loop{minor}"
    if list_partitions(name):
        return 0  # the kernel's own scan found them
    device = f"/dev/{name}"
    size = _native.get_u64(dev_fd, _native.BLKGETSIZE64, device=device)
    sector = _native.logical_block_size(dev_fd, device=device)
    table = read_table(dev_fd, size, sector, path=backing or device)
    if table is None:
        return 0
    added = 0
    try:
        for part in table.partitions:
            _native.blkpg(
                dev_fd,
                _native.BLKPG_ADD_PARTITION,
                part.number,
                part.start,
                part.size,
                device=device,
            )
            added += 1
    except BaseException:
        _native.delete_partitions(dev_fd, minor)
        raise
    return added


def wait_for_nodes(parts: list[PartitionDevice], timeout: float = 5.0) -> None:
    """Wait until ``/dev`` has a node for each partition (devtmpfs adds them async)."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    for part in parts:
        while True:
            try:
                st = os.stat(part.path)
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(part.major, part.minor):
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() >= deadline:
                raise LoopError(
                    2,
                    f"no device node appeared for {part.name} within {timeout:g} s "
                    "(no devtmpfs? use a private node directory)",
                    device=part.path,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
