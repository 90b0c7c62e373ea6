"""How the broker hands a device over: descriptors of nodes it can make useless.

Each node is root's, made in the broker's root-only directory, opened and
unlinked at once, then given mode 0666 (0444 for a read-only device). The
client (and its children, through ``/proc/PID/fd/N``) reopens it; nobody but
root can chmod it, so a read-only grant stays read-only. Before the device is
released, ``Grant.revoke()`` sets mode 0 through the broker's ``O_PATH``
reference: a reference the client kept (``O_PATH``, a ``/proc`` link) then
opens nothing, whatever gets that device number later.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import re
import stat
import tempfile

from loopdev import _native, _varlink
from loopdev.errors import LoopError

_PREFIX = ".loopdev-broker."
# A live broker holds an exclusive flock on its node directory. Directories
# of brokers from before that rule have no "<pid>." in their names and are
# left alone: nothing tells whether they are still in use.
_LOCKED_NAME = re.compile(r"\.loopdev-broker\.[0-9]+\.[a-z0-9_]+")


class Grant:
    """The nodes handed over for one device, and the power to make them useless.

    The broker also holds every partition open while the device is the
    client's: a rescan (``LOOP_CHANGE_FD`` on a read-only device rereads the
    table) then fails with EBUSY instead of dropping partitions whose minors
    (major 259, shared with every disk) would go to other devices.
    """

    def __init__(self, read_only: bool) -> None:
        self.read_only = read_only
        self.mode = 0o444 if read_only else 0o666
        self._refs: list[int] = []  # O_PATH, one per node: the device's first
        self._held: list[int] = []  # our own descriptors of the partitions
        self._revoked = False

    def add(self, ref: int) -> None:
        self._refs.append(ref)

    def revoke(self) -> None:
        """Before the device can be released: no node of it opens any more."""
        if not self._revoked:
            for ref in self._refs:
                os.chmod(f"/proc/self/fd/{ref}", 0)
            self._revoked = True
        _varlink.close_fds(self._held)  # BLKPG refuses to delete an open partition
        self._held = []

    def restore(self) -> None:
        """The device stays the client's after all (a refused Detach)."""
        for ref in self._refs:
            os.chmod(f"/proc/self/fd/{ref}", self.mode)
        self._revoked = False
        self.hold_partitions()

    def hold_partitions(self) -> None:
        for ref in self._refs[1:]:
            self._held.append(os.open(f"/proc/self/fd/{ref}", os.O_RDONLY | os.O_CLOEXEC))

    def close(self) -> None:
        """Revoke and forget: the device is being released."""
        self.revoke()
        _varlink.close_fds(self._refs)
        self._refs = []


class NodeDir:
    """The broker's root-only (0700) directory for making nodes, locked while it lives.

    Root-only: the client never reaches a node by path, not even in the
    instant between mknod and unlink.
    """

    def __init__(self, parent: str) -> None:
        if os.statvfs(parent).f_flag & os.ST_NODEV:
            raise LoopError(
                errno.EACCES,
                "the node directory is on a file system mounted nodev; "
                "give loopdev serve --node-dir a directory on one without (e.g. /dev)",
                backing=parent,
            )
        self.path, self._fd = _make_locked_dir(parent)
        self.removed = _remove_dead_dirs(parent)
        self._ids = itertools.count(1)

    def hand_over(self, rdev: int, grant: Grant) -> int:
        """An open descriptor of device ``rdev`` on a new node of ``grant``, linked nowhere."""
        name = f"{os.major(rdev)}.{os.minor(rdev)}.{next(self._ids)}"
        # Mode 0 until it is unlinked and ours alone; root opens it anyway.
        os.mknod(name, stat.S_IFBLK, rdev, dir_fd=self._fd)
        fd = -1
        try:
            grant.add(os.open(name, _native.O_PATH | os.O_CLOEXEC, dir_fd=self._fd))
            access = os.O_RDONLY if grant.read_only else os.O_RDWR
            fd = os.open(name, access | os.O_CLOEXEC, dir_fd=self._fd)
            os.fchmod(fd, grant.mode)  # root stays the owner: the client cannot chmod it
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            os.unlink(name, dir_fd=self._fd)
        return fd

    def close(self) -> None:
        try:
            os.rmdir(self.path)  # still locked: no other broker touches it meanwhile
        except OSError:
            pass
        os.close(self._fd)


def _make_locked_dir(parent: str) -> tuple[str, int]:
    """A new node directory and its descriptor, locked before it gets the name other
    brokers look for, so that none of them takes it for a dead one."""
    staged = tempfile.mkdtemp(prefix=".loopdev-broker-new.", dir=parent)
    fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = os.path.join(parent, f"{_PREFIX}{os.getpid()}.{os.path.basename(staged)[-8:]}")
        os.rename(staged, path)
    except BaseException:
        os.close(fd)
        os.rmdir(staged)
        raise
    return path, fd


def _remove_dead_dirs(parent: str) -> list[str]:
    """Remove the node directories of brokers that died (SIGKILL leaves them)."""
    removed = []
    for name in os.listdir(parent):
        if not _LOCKED_NAME.fullmatch(name):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for node in os.listdir(fd):  # a broker killed between mknod and unlink
                os.unlink(node, dir_fd=fd)
            os.rmdir(path)
            removed.append(name)
        except OSError:
            pass  # locked: its broker is alive
        finally:
            os.close(fd)
    return removed
