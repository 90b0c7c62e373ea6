"""How the broker hands a device over: descriptors of nodes it can make useless.

Each node is root's, made in the broker's root-only directory, opened and
unlinked at once, then given mode 0666 (0444 for a read-only device). The
client (and its children, through ``/proc/PID/fd/N``) reopens it; nobody but
root can chmod it, so a read-only grant stays read-only. Before the device is
released, ``Grant.revoke()`` sets mode 0 through the broker's ``O_PATH``
reference: a reference the client kept (``O_PATH``, a ``/proc`` link) then
opens nothing, whatever gets that device number later.

A refused Detach (a partition in use) must change nothing: deleting the
other partitions and adding them back would give them new minors (major
259 minors are freed only after an RCU grace period, measured on 6.18),
while the client's nodes keep the old numbers, free for the next disk.
``Grant.drop_partitions()`` asks first, and ``Grant.restore()`` opens a node
again only where its number still is that partition.
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
from loopdev.errors import DeviceBusy, LoopError

# _IO(0x12, 95) in <linux/fs.h>: reread the partition table; EBUSY, with
# nothing changed, while a partition is open (disk_scan_partitions,
# block/genhd.c: "if (disk->open_partitions) return -EBUSY").
BLKRRPART = 0x125F

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
        self._names: list[str] = []  # the kernel's name of each (loop3, loop3p1)
        self._held: list[int] = []  # our own descriptors of the partitions
        self._revoked = False

    def add(self, ref: int, name: str) -> None:
        self._refs.append(ref)
        self._names.append(name)

    def revoke(self) -> None:
        """Before the device can be released: no node of it opens any more."""
        if not self._revoked:
            for ref in self._refs:
                os.chmod(f"/proc/self/fd/{ref}", 0)
            self._revoked = True
        _varlink.close_fds(self._held)  # BLKPG refuses to delete an open partition
        self._held = []

    def drop_partitions(self) -> None:
        """After ``revoke()``: drop the partitions, or ``DeviceBusy`` with nothing
        changed if one is open (the client's descriptor, a mount, anyone's).

        ``BLKRRPART`` on an exclusive descriptor checks every partition before
        it touches any. Where someone else holds the device exclusively it
        cannot be asked; the release then deletes them one by one, and
        ``restore()`` copes with any that come back under new numbers.
        """
        if len(self._refs) < 2:
            return  # no partitions handed over: nothing to check
        try:
            fd = os.open(f"/proc/self/fd/{self._refs[0]}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.ioctl(fd, BLKRRPART)
        except OSError as exc:
            if exc.errno == errno.EBUSY:
                raise DeviceBusy(
                    errno.EBUSY,
                    "a partition is in use (mounted or open); nothing changed",
                    device=f"/dev/{self._names[0]}",
                ) from None
            # Anything else (no partscan any more): the release deletes them.
        finally:
            os.close(fd)

    def restore(self) -> list[str]:
        """The device stays the client's after all (a refused Detach): its nodes open
        again, except those of partitions that are no longer under their number
        (deleted and added back, or rescanned): these stay useless, as the number
        may go to any disk. Returns their names."""
        self._revoked = False  # from the first chmod on, revoke() must undo them all
        lost = []
        for ref, name in zip(self._refs[1:], self._names[1:], strict=True):
            held = _open_if_named(ref, name)
            if held < 0:
                lost.append(name)
                continue
            self._held.append(held)
            os.chmod(f"/proc/self/fd/{ref}", self.mode)
        os.chmod(f"/proc/self/fd/{self._refs[0]}", self.mode)  # ours open: still the device
        return lost

    def hold_partitions(self) -> None:
        for ref in self._refs[1:]:
            self._held.append(os.open(f"/proc/self/fd/{ref}", os.O_RDONLY | os.O_CLOEXEC))

    def close(self) -> None:
        """Revoke and forget: the device is being released."""
        self.revoke()
        _varlink.close_fds(self._refs)
        self._refs = []
        self._names = []


def _open_if_named(ref: int, name: str) -> int:
    """A descriptor of the node ``ref`` if its number is block device ``name``'s, else -1.

    Asked before the open (not to open someone else's disk, even for an
    instant) and after it (held open, a partition cannot be deleted, so its
    number cannot change any more).
    """
    rdev = os.stat(f"/proc/self/fd/{ref}").st_rdev
    link = f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"

    def named() -> bool:
        try:
            return os.path.basename(os.readlink(link)) == name
        except OSError:
            return False

    if not named():
        return -1
    try:
        fd = os.open(f"/proc/self/fd/{ref}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1  # ENXIO: gone meanwhile
    if not named():
        os.close(fd)
        return -1
    return fd


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

    def hand_over(self, rdev: int, name: str, grant: Grant) -> int:
        """An open descriptor of block device ``name`` (number ``rdev``) on a new node of
        ``grant``, linked nowhere."""
        node = f"{os.major(rdev)}.{os.minor(rdev)}.{next(self._ids)}"
        # Mode 0 until it is unlinked and ours alone; root opens it anyway.
        os.mknod(node, stat.S_IFBLK, rdev, dir_fd=self._fd)
        fd = -1
        try:
            grant.add(os.open(node, _native.O_PATH | os.O_CLOEXEC, dir_fd=self._fd), name)
            access = os.O_RDONLY if grant.read_only else os.O_RDWR
            fd = os.open(node, access | os.O_CLOEXEC, dir_fd=self._fd)
            os.fchmod(fd, grant.mode)  # root stays the owner: the client cannot chmod it
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            os.unlink(node, dir_fd=self._fd)
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
