"""Private device nodes: block nodes in a directory of the caller's choosing.

Where udev is absent or /dev is not devtmpfs (containers), no node appears
for a loop device or its partitions; builders make their own. Anyone with
such a node reaches whatever device later gets the same numbers, so nodes
are removed before the device is released.
"""

from __future__ import annotations

import os
import stat


def make_node(dir_fd: int, name: str, major: int, minor: int, mode: int = 0o600) -> None:
    """A block node ``name`` in ``dir_fd`` with exactly ``mode`` (umask ignored)."""
    os.mknod(name, stat.S_IFBLK | 0o600, os.makedev(major, minor), dir_fd=dir_fd)
    os.chmod(name, stat.S_IMODE(mode), dir_fd=dir_fd)


def remove_node(dir_fd: int, name: str) -> None:
    """Remove ``name`` from ``dir_fd`` if it is there."""
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
