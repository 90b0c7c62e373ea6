"""Block device nodes loopdev makes: in ``/dev`` where nothing else does, or in a
directory of the caller's choosing.

Where udev is absent and /dev is not devtmpfs (containers), no node appears
for a loop device or its partitions. A node is trusted by its numbers, never
by its name: one left by a killed process may point at another device now
(partition minors under major 259 are shared with every disk on the host).
Anyone with a node reaches whatever device later gets the same numbers, so
loopdev removes the nodes it made before the device is released.
"""

from __future__ import annotations

import errno
import os
import stat

from loopdev import _native, sysfs
from loopdev.errors import DeviceNodeError

DevT = tuple[int, int]


def _device_name(rdev: int) -> str | None:
    """The block device that has ``rdev`` now (sysfs), or None."""
    try:
        link = os.readlink(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}")
    except OSError:
        return None
    return os.path.basename(link)


def is_loop_block(rdev: int) -> bool:
    """Whether block device ``rdev`` is a loop device or a partition of one (True where
    sysfs cannot tell: a caller refusing loop devices refuses it too)."""
    if os.major(rdev) == _native.LOOP_MAJOR:
        return True
    name = _device_name(rdev)
    return name is None or name.startswith("loop")


def _is_ours_to_replace(st: os.stat_result) -> bool:
    """A block node with numbers loop devices and their partitions get (majors 7 and
    259), for no device now or for a loop device or partition: loopdev's kind."""
    if not stat.S_ISBLK(st.st_mode):
        return False
    if os.major(st.st_rdev) not in (_native.LOOP_MAJOR, _native.BLOCK_EXT_MAJOR):
        return False
    name = _device_name(st.st_rdev)
    return name is None or name.startswith("loop")


def place_node(dir_fd: int, name: str, devt: DevT, mode: int = 0o600, *, where: str) -> bool:
    """Make block node ``name`` for ``devt`` in ``dir_fd`` with exactly ``mode``.

    Returns whether it was made (False: the right node was already there).
    A stale node of loopdev's kind (no device, or another loop device) is
    replaced; anything else in the way raises ``DeviceNodeError`` naming it.
    """
    want = os.makedev(*devt)
    path = os.path.join(where, name)
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISBLK(st.st_mode) and st.st_rdev == want:
            return False
        if not _is_ours_to_replace(st):
            raise DeviceNodeError(
                errno.EEXIST,
                f"{path} is in the way: it is not a node of a loop device; remove it",
                device=path,
            )
        os.unlink(name, dir_fd=dir_fd)
    try:
        os.mknod(name, stat.S_IFBLK | 0o600, want, dir_fd=dir_fd)
    except PermissionError as exc:
        raise DeviceNodeError(
            exc.errno or errno.EPERM,
            "cannot make a device node: this needs CAP_MKNOD; in a container run with "
            "--privileged, or mount devtmpfs on /dev (-v /dev:/dev)",
            device=path,
        ) from None
    os.chmod(name, stat.S_IMODE(mode), dir_fd=dir_fd)
    return True


def remove_node(dir_fd: int, name: str, devt: DevT | None = None) -> None:
    """Remove ``name`` from ``dir_fd`` if it is there (and, given ``devt``, is that node)."""
    if devt is not None:  # every caller gives it (no test without)
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(*devt):
            return  # replaced by someone else since: not ours any more
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:  # untested race: removed between stat and unlink
        pass


def mirror_node(dir_fd: int, name: str, devt: DevT, mode: int = 0o600) -> None:
    """Node ``name`` in ``dir_fd`` for ``devt`` with ``mode``; where ``mknod`` is not
    permitted (no CAP_MKNOD, as in most containers), a bind mount of ``/dev/NAME``
    if that is the device (needs CAP_SYS_ADMIN in the mount namespace only; it
    keeps the host node's mode, and is removed with umount)."""
    try:
        os.mknod(name, stat.S_IFBLK | 0o600, os.makedev(*devt), dir_fd=dir_fd)
    except PermissionError:
        _bind_host_node(dir_fd, name, devt)
        return
    os.chmod(name, stat.S_IMODE(mode), dir_fd=dir_fd)


def _bind_host_node(dir_fd: int, name: str, devt: DevT) -> None:
    host = f"/dev/{name}"
    st = os.stat(host)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(*devt):
        raise DeviceNodeError(
            errno.EPERM,
            f"cannot make a device node (no CAP_MKNOD) and {host} is not the device to "
            "bind-mount instead; run with --privileged or mount devtmpfs on /dev",
            device=host,
        )
    fd = os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    os.close(fd)
    try:
        _native.bind_mount(host, f"/proc/self/fd/{dir_fd}/{name}")
    except BaseException:  # untested: the loop ioctls before need CAP_SYS_ADMIN too
        os.unlink(name, dir_fd=dir_fd)
        raise


# Nodes loopdev made in /dev carry this mark, so that a later process (the
# CLI's detach) removes what an attach made and nothing else.
_MARK = "trusted.loopdev"


def _loop_node_name(name: str) -> bool:
    """``loopN`` or ``loopNpM`` (no ``re``: it costs ``import loopdev`` milliseconds)."""
    if not name.startswith("loop"):
        return False
    index, sep, part = name[4:].partition("p")
    return index.isdigit() and (part.isdigit() or not sep)


_devtmpfs: bool | None = None


def dev_is_devtmpfs() -> bool:
    """Whether /dev is a devtmpfs (the kernel makes and removes the nodes itself)."""
    global _devtmpfs
    if _devtmpfs is None:
        _devtmpfs = False
        with open("/proc/self/mountinfo", "rb") as f:
            for line in f:
                fields = line.split()
                if fields[4] == b"/dev":  # the last mount on /dev wins
                    _devtmpfs = fields[fields.index(b"-") + 1] == b"devtmpfs"
    return _devtmpfs


class NodeSet:
    """Nodes made for one device in one directory, removed together."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.where = os.fspath(directory)
        self.dir_fd = os.open(self.where, _native.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.made: list[tuple[str, DevT]] = []

    def add(self, name: str, devt: DevT, mode: int, *, mark: bool = False) -> None:
        """Make (or keep, if it is already right) the node ``name``.

        Marked nodes (in /dev) are removed only if made here: a right one that
        was there already belongs to whoever made it. In a private directory a
        right one is a leftover of ours (a killed process) and goes too.
        """
        # A whole-device node the container had, with wrong numbers: replaced by a
        # right one that stays (unmarked) when the device goes, so /dev keeps its loopN.
        kept = mark and name[4:].isdigit() and _exists(self.dir_fd, name)
        made = place_node(self.dir_fd, name, devt, mode, where=self.where)
        if kept:
            return
        if made or not mark:
            self.made.append((name, devt))
        if made and mark:
            try:
                os.setxattr(f"{self.where}/{name}", _MARK, b"1", follow_symlinks=False)
            except OSError:  # untested: devtmpfs and tmpfs have trusted xattrs
                pass  # no xattrs there: a later process will not remove it

    def remove(self) -> None:
        """Remove the nodes made (only those still pointing where we made them)."""
        for name, devt in self.made:
            remove_node(self.dir_fd, name, devt)
        self.made.clear()

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def remove_stale_marked(directory: str) -> None:
    """Remove the nodes loopdev made in ``directory`` (they carry the mark) whose
    numbers are no longer those sysfs gives their name: those of a process killed
    before it could remove them. A partition's minor under major 259 goes to the
    next partition of any disk, so such a node could reach another device.
    """
    for name in os.listdir(directory):
        if not _loop_node_name(name):
            continue
        path = f"{directory}/{name}"
        try:
            st = os.stat(path, follow_symlinks=False)
            if not stat.S_ISBLK(st.st_mode):
                continue
            now = sysfs.devt(name)
            if now is not None and os.makedev(*now) == st.st_rdev:
                continue  # right for the device that has the name now
            os.getxattr(path, _MARK, follow_symlinks=False)
            os.unlink(path)
        except OSError:
            continue  # gone meanwhile, or not ours


def remove_marked(directory: str, device: str) -> None:
    """Remove the nodes of ``device`` (``loopN``) and its partitions (``loopNpM``) in
    ``directory`` that loopdev made (they carry the mark)."""
    prefix = f"{device}p"
    for name in os.listdir(directory):
        if name != device and not (name.startswith(prefix) and name[len(prefix) :].isdigit()):
            continue
        path = f"{directory}/{name}"
        try:
            os.getxattr(path, _MARK, follow_symlinks=False)
            os.unlink(path)
        except OSError:
            continue  # gone meanwhile, or not ours


def renew_marked(directory: str, device: str) -> None:
    """Point the partition nodes of ``device`` that loopdev made in ``directory`` at
    the numbers sysfs gives their names now; remove those whose partition is gone.

    For after the kernel renumbered partitions: a release refused for a busy
    partition adds back those it deleted before it, under new minors, and
    a node left at an old minor would reach whatever disk gets it next.
    """
    prefix = f"{device}p"
    made = NodeSet(directory)
    try:
        for name in os.listdir(directory):
            if not (name.startswith(prefix) and name[len(prefix) :].isdigit()):
                continue
            try:
                st = os.stat(name, dir_fd=made.dir_fd, follow_symlinks=False)
                os.getxattr(f"{directory}/{name}", _MARK, follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile, or not ours
            now = sysfs.devt(name)
            if now is None:
                remove_node(made.dir_fd, name, (os.major(st.st_rdev), os.minor(st.st_rdev)))
            elif os.makedev(*now) != st.st_rdev:
                made.add(name, now, stat.S_IMODE(st.st_mode), mark=True)
    finally:
        made.close()
