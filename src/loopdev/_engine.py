"""The one path from an API call to the kernel, shared by both faces.

The compatible API (``Loop``/``LoopControl``) and the high-level API
(``attach()``/``LoopDevice``) only map their arguments onto these functions:
open loop-control, open and check a device, attach (native loop, then
partitions, with one abort path), configure an open device, release.
"""

from __future__ import annotations

import errno
import os
import stat

from loopdev import _native, errors, nodes, partitions, parttable, sysfs

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable

DEV = "/dev"


def flags(read_only: int | None, autoclear: int | None, partscan: int | None) -> int:
    """``LO_FLAGS_*`` for the three settable flags (each true, false or None)."""
    return (
        (_native.LO_FLAGS_READ_ONLY if read_only else 0)
        | (_native.LO_FLAGS_AUTOCLEAR if autoclear else 0)
        | (_native.LO_FLAGS_PARTSCAN if partscan else 0)
    )


def device_path(index: int) -> str:
    """The name messages use for ``loop{index}``."""
    return f"{DEV}/loop{index}"


class Control:
    """``loop-control`` and the directory the attach loop opens devices in.

    ``dir_fd`` None: ``/dev``, where a missing or wrong ``loopN`` node is
    reached through a private node instead (containers). A caller's
    directory is used as it is (a wrong node there is ``UnexpectedDevice``).
    """

    __slots__ = ("_scratch", "dev_dir", "fd", "part_shift", "plain", "private_nodes")

    def __init__(self, dir_fd: int | None = None) -> None:
        self.fd = -1
        self._scratch: str | None = None
        path = "loop-control" if dir_fd is not None else f"{DEV}/loop-control"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise errors.ControlMissing(
                errno.ENOENT,
                "loop-control is missing: load the loop module (modprobe loop); in a "
                "container, pass it in (--device /dev/loop-control) or use --privileged",
                device=path,
            ) from None
        except PermissionError as exc:
            raise errors.ControlDenied(
                exc.errno or errno.EACCES,
                "loop-control may not be opened: loop devices need root (CAP_SYS_ADMIN), "
                "or ask a broker (loopdev serve)",
                device=path,
            ) from None
        try:
            self.dev_dir = (
                dir_fd
                if dir_fd is not None
                else os.open(DEV, _native.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            )
        except BaseException:  # untested: /dev unopenable where loop-control opened
            os.close(fd)
            raise
        self.private_nodes = dir_fd is None
        self.part_shift = sysfs.minor_shift()
        global _devtmpfs
        _devtmpfs = nodes.dev_is_devtmpfs()  # asked once per process
        self.fd = fd
        self.plain = _native.plain_request(fd, self.dev_dir, self.private_nodes, self.part_shift)

    def close(self) -> None:
        """Idempotent; closes the directory only if we opened it."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
            if self.private_nodes:
                os.close(self.dev_dir)
            if self._scratch is not None:
                os.rmdir(self._scratch)
                self._scratch = None

    def use_scratch(self, prefer: str | os.PathLike[str] | None) -> None:
        """Private nodes from now on in a fresh root-only directory in
        :func:`scratch_dir` (for a read-only /dev); only in /dev mode."""
        where = _private_dir(scratch_dir(prefer))
        try:
            new = os.open(where, _native.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except BaseException:
            os.rmdir(where)
            raise
        os.close(self.dev_dir)
        self.dev_dir, self._scratch = new, where
        self.plain = _native.plain_request(self.fd, new, self.private_nodes, self.part_shift)


# attach()'s loop-control and /dev, opened by the first attach() and kept for
# the process (O_CLOEXEC), as a LoopControl keeps its own: opening and closing
# them were 4 system calls and ~8 us of each attach() (issue 17). The /dev
# handle stays with the /dev it opened when another is mounted over it later:
# devices still open through it (where it has no node, through a private node
# made in it), and nodes are published by path, in the /dev of the moment
# (test_dev_mounted_after_first_attach). A forked child closes its copies and
# opens its own at its first attach().
_shared: dict[str, Control] = {}


def shared_control() -> Control:
    """The process's :class:`Control` for /dev (see above), made on first use."""
    control = _shared.get("control")
    if control is None:
        mine = Control()
        # Two threads' first attach() may meet here: setdefault keeps one (atomic).
        control = _shared.setdefault("control", mine)
        if control is not mine:
            mine.close()
    return control


def shared_fds() -> tuple[int, ...]:
    """The descriptors the process's Control holds (none before the first attach())."""
    control = _shared.get("control")
    return () if control is None else (control.fd, control.dev_dir)


def _forget_shared() -> None:
    control = _shared.pop("control", None)
    if control is not None:
        control.close()


os.register_at_fork(after_in_child=_forget_shared)


def _private_dir(parent: str) -> str:
    """A new root-only directory below ``parent`` (not tempfile: costly to import,
    and nothing may be imported on the attach path, see test_fork_during_first_attach)."""
    for serial in range(1000):
        where = os.path.join(parent, f".loopdev-{os.getpid()}-s{serial}")
        try:
            os.mkdir(where, 0o700)
        except FileExistsError:
            continue
        return where
    raise errors.DeviceNodeError(errno.EEXIST, "no private directory could be made", device=parent)


# Where /dev is read-only, private nodes are made below the first of these
# that allows device nodes (writable, not nodev); a caller's node_dir and
# $TMPDIR come first.
_SCRATCH = ("/tmp", "/run", "/var/tmp", "/dev/shm")


def scratch_dir(prefer: str | os.PathLike[str] | None = None) -> str:
    """A writable directory on a file system that allows device nodes."""
    for where in (prefer, os.environ.get("TMPDIR"), *_SCRATCH):
        if not where:
            continue
        try:
            flags = os.statvfs(where).f_flag
        except OSError:
            continue
        if not flags & (os.ST_RDONLY | os.ST_NODEV) and os.access(where, os.W_OK):
            return os.fspath(where)
    raise errors.DeviceNodeError(
        errno.EROFS,
        "/dev is read-only and no writable directory allows device nodes (all nodev or "
        "read-only): give a node directory on a file system without nodev",
        device=DEV,
    )


_DIR_FLAGS = _native.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


def open_device(
    index: int, dir_fd: int | None = None, *, private_nodes: bool = False, read_only: bool = False
) -> int:
    """Open ``loop{index}`` below ``dir_fd`` (default /dev), read-write unless
    ``read_only``, and check it: ``_native.open_device``, the attach loop's own check.

    ``UnexpectedDevice`` when the node is not that loop device; errors of the
    open itself are ``os.open``'s. With ``private_nodes`` a missing or wrong
    node in /dev is passed by through a private node (in a scratch directory
    where /dev is read-only).
    """
    path = f"loop{index}" if dir_fd is not None else device_path(index)
    where = dir_fd if dir_fd is not None else os.open(DEV, _DIR_FLAGS)
    try:
        return _native.open_device(
            where,
            index,
            sysfs.minor_shift(),
            private_nodes=private_nodes,
            read_only=read_only,
            device=path,
        )
    except errors.DeviceNodeError as exc:
        if exc.stage != "node" or exc.errno != errno.EROFS:
            raise
    finally:
        if dir_fd is None:
            os.close(where)
    # The C helper makes its own root-only directory below this one.
    scratch = os.open(scratch_dir(), _DIR_FLAGS)
    try:
        return _native.open_private(scratch, index, sysfs.minor_shift(), read_only=read_only)
    finally:
        os.close(scratch)


def open_node(path: str, index: int) -> int:
    """``path`` (a node outside /dev) opened read-write and checked to be ``loop{index}``."""
    try:
        first = os.stat(path)
        if not stat.S_ISBLK(first.st_mode):  # a FIFO would block the open
            raise errors.UnexpectedDevice(index, first.st_rdev, first.st_mode)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise errors.DeviceNodeError(errno.ENOENT, "no such device node", device=path) from None
    try:
        _native.check_node(fd, index, sysfs.minor_shift())
    except BaseException:
        os.close(fd)
        raise
    return fd


def backing_id(index: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of ``loop{index}``'s backing file as the kernel holds it
    (``lo_device``, ``lo_inode`` of LOOP_GET_STATUS64); None when unbound.

    The one exact way to tell which file backs a device: names are for display
    (sysfs appends " (deleted)" to an unlinked file's, and a name may end in
    newlines). A brief read-only open; a missing or wrong node in /dev is
    passed by through a private node.
    Where the device cannot be opened at all (no permission, no CAP_MKNOD),
    the file sysfs names is all there is: it is stat()ed instead.
    """
    name = f"loop{index}"
    if sysfs.backing_file(name) is None:
        return None  # unbound: not worth an open (and attachers race for those)
    try:
        fd = open_device(index, private_nodes=True, read_only=True)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENXIO, errno.ENODEV):
            return None  # removed meanwhile (sysfs has no loopN either), or in rundown
        return _id_by_name(name)
    try:
        info = _native.get_status(fd, device=device_path(index))
    except errors.LoopError as exc:
        if exc.errno == errno.ENXIO:
            return None
        raise
    finally:
        os.close(fd)
    return info.lo_device, info.lo_inode


def _id_by_name(name: str) -> tuple[int, int] | None:
    path = sysfs.backing_file(name)
    try:
        st = os.stat(path) if path is not None else None
    except OSError:
        return None  # unlinked (" (deleted)") or unreachable from here
    return None if st is None else (st.st_dev, st.st_ino)


def attach(
    control: Control,
    backing_fd: int,
    config: _native.Config,
    *,
    lock: bool = False,
    on_open: Callable[[int, int], None] | None = None,
    on_discard: Callable[[int], None] | None = None,
    node_mode: int = 0o600,
    node_dir: str | os.PathLike[str] | None = None,
) -> tuple[int, int]:
    """Bind a free device to ``backing_fd``; returns ``(index, fd)``.

    With hooks, ``on_open`` adopts each device fd the loop opens and
    ``on_discard`` closes one that is given up (also after a failure here).
    A failure leaves nothing bound and no partition registered. Where /dev
    is read-only and has no node for the device, the private node is made
    in a scratch directory (``node_dir`` first) instead.
    """
    config = _block_size_for_table(backing_fd, config)

    def run(control: Control) -> _native.Attached:
        return _native.attach(
            control.fd,
            control.dev_dir,
            backing_fd,
            config,
            lock=lock,
            on_open=on_open,
            on_discard=on_discard,
            private_nodes=control.private_nodes,
            part_shift=control.part_shift,
        )

    try:
        got = run(control)
    except errors.DeviceNodeError as exc:
        # Nothing is bound: the node stage comes before configure.
        if exc.errno != errno.EROFS or not control.private_nodes or control._scratch:
            raise
        if control is not _shared.get("control"):
            control.use_scratch(node_dir)
            got = run(control)
        else:  # not the process's: its scratch directory would outlive this call
            scratch = Control()
            try:
                scratch.use_scratch(node_dir)
                got = run(scratch)
            finally:
                scratch.close()
    if not config.flags & _native.LO_FLAGS_PARTSCAN and nodes.dev_is_devtmpfs():
        return got.index, got.fd  # no partitions to register, the kernel made the node
    try:
        register_partitions(got.fd, got.index, config)
        publish_nodes(got.index, config, node_mode)
    except BaseException:
        abort(got.fd, got.index)
        if on_discard is not None:
            on_discard(got.fd)
        else:
            os.close(got.fd)
        raise
    return got.index, got.fd


_PARTSCAN = _native.LO_FLAGS_PARTSCAN
# Numbers attach_plain's calls, so that an interrupted one releases only its own
# device (_native.claim). A global: cheaper than itertools.count(), and CPython
# makes the += atomic.
_token = 0
# Whether /dev is a devtmpfs, once a Control asked (nodes caches it per process):
# attach_plain() and release() read it without a call.
_devtmpfs: bool | None = None


def attach_plain(
    control: Control,
    backing_fd: int,
    flags: int,
    offset: int = 0,
    sizelimit: int = 0,
    block_size: int = 0,
    lock: bool = False,
    direct_io: int = _native.DIRECT_IO_OFF,
    file_name: str | None = None,
    node_mode: int = 0o600,
    node_dir: str | os.PathLike[str] | None = None,
) -> int:
    """:func:`attach` without hooks, for both faces; ``(index << 32) | fd``.

    Where there is nothing to do after the native loop (no partscan, the
    kernel makes the nodes): one C call with scalar arguments, instead of two
    structs filled field by field and three Python layers (issue 17).
    """
    if flags & _PARTSCAN or not _devtmpfs:
        config = _native.Config(offset, sizelimit, block_size, flags, direct_io, file_name)
        return _attach_packed(control, backing_fd, config, lock, node_mode, node_dir)
    global _token
    _token += 1
    token = _token  # the same for a call again after an interruption (C resumes)
    while True:
        try:
            if offset or sizelimit or block_size or lock or direct_io or file_name is not None:
                got = _native.attach_plain_raw(
                    control.plain,
                    backing_fd,
                    flags,
                    offset,
                    sizelimit,
                    block_size,
                    lock,
                    direct_io,
                    _native.NULL if file_name is None else os.fsencode(file_name),
                    token,
                )
            else:
                got = _native.attach_flags_raw(control.plain, backing_fd, flags, token)
        except OverflowError:  # raised before the call: nothing was done
            config = _native.Config(offset, sizelimit, block_size, flags, direct_io, file_name)
            error = _native.out_of_range(config, backing_fd)
            if error is None:
                raise
            raise error from None
        except BaseException:
            _native.claim(token)
            raise
        if got >= 0:
            return got
        try:
            _native.attach_plain_failed(got, backing_fd, file_name)  # True: go on
        except errors.DeviceNodeError as exc:
            # As in attach(): nothing is bound, the node stage comes before configure.
            if exc.errno != errno.EROFS or not control.private_nodes or control._scratch:
                raise
            config = _native.Config(offset, sizelimit, block_size, flags, direct_io, file_name)
            return _attach_packed(control, backing_fd, config, lock, node_mode, node_dir)


def _attach_packed(
    control: Control,
    backing_fd: int,
    config: _native.Config,
    lock: bool,
    node_mode: int,
    node_dir: str | os.PathLike[str] | None,
) -> int:
    index, fd = attach(
        control, backing_fd, config, lock=lock, node_mode=node_mode, node_dir=node_dir
    )
    return index << 32 | fd


def configure(dev_fd: int, index: int, backing_fd: int, config: _native.Config) -> None:
    """Bind an open device (stale partitions go first) and register its partitions."""
    config = _block_size_for_table(backing_fd, config)
    _native.bind(dev_fd, index, backing_fd, config, device=device_path(index))
    try:
        register_partitions(dev_fd, index, config)
        publish_nodes(index, config)
    except BaseException:
        abort(dev_fd, index)
        raise


def _block_size_for_table(backing_fd: int, config: _native.Config) -> _native.Config:
    """With partscan and no block size given, the sector size the image's GPT was
    written for (512 or 4096), as systemd does; an explicit block size always wins."""
    if config.block_size or not config.flags & _native.LO_FLAGS_PARTSCAN:
        return config
    try:
        st = os.fstat(backing_fd)
        whole = (
            _native.get_u64(backing_fd, _native.BLKGETSIZE64)
            if stat.S_ISBLK(st.st_mode)
            else st.st_size
        )
    except OSError:  # untested: a bad fd with partscan (bad-input tests go without)
        return config  # the kernel will say what is wrong with this fd
    size = whole - config.offset
    if config.sizelimit:
        size = min(size, config.sizelimit)
    found = parttable.gpt_sector_size(backing_fd, config.offset, size)
    if found is not None and found != 512:
        return config.with_block_size(found)
    return config


def register_partitions(dev_fd: int, index: int, config: _native.Config) -> None:
    """Where partscan was asked for: the image's partitions, if the kernel found none."""
    if config.flags & _native.LO_FLAGS_PARTSCAN:
        partitions.ensure_registered(dev_fd, index, config.file_name)


def publish_nodes(index: int, config: _native.Config, mode: int = 0o600) -> None:
    """Nodes for ``loop{index}`` and its partitions in /dev, so that their paths open.

    On a devtmpfs the kernel makes them (we wait for the partitions'). Elsewhere
    (a container's static tmpfs) loopdev makes them as devtmpfs would, marked
    as its own so that whoever releases the device removes them. A read-only
    /dev gets none: the device fd works, its path does not (use node_dir).
    """
    partscan = config.flags & _native.LO_FLAGS_PARTSCAN
    parts = partitions.list_partitions(f"loop{index}") if partscan else []
    if nodes.dev_is_devtmpfs():
        partitions.wait_for_nodes(parts)
        return
    entries = [(f"loop{index}", sysfs.loop_devt(index))] + [
        (p.name, (p.major, p.minor)) for p in parts
    ]
    try:
        nodes.remove_stale_marked(DEV)
        made = nodes.NodeSet(DEV)
    except OSError:  # untested: /dev was opened for the attach just before
        return
    try:
        for name, devt in entries:
            made.add(name, devt, mode, mark=True)
    except OSError as exc:
        made.remove()
        if exc.errno != errno.EROFS:
            raise
        errors.warn(f"/dev is read-only: no nodes for loop{index}")
    finally:
        made.close()


def renew_nodes(index: int) -> None:
    """After partitions of ``loop{index}`` were deleted and added back (new minors):
    the /dev nodes loopdev made for them follow."""
    if not nodes.dev_is_devtmpfs():
        nodes.renew_marked(DEV, f"loop{index}")


def unpublish_nodes(index: int) -> None:
    """Remove the /dev nodes loopdev made for ``loop{index}`` and its partitions."""
    if not nodes.dev_is_devtmpfs():
        nodes.remove_marked(DEV, f"loop{index}")


# A failed write-back with less free space than this left on the backing
# file's file system is put down to a full file system: one loop request
# (max_sectors_kb, 1280 KiB by default) did not fit.
_FULL = 2 << 20


def write_back(dev_fd: int, index: int, fate: str) -> None:
    """Write back the device, so that what was written through it is in the backing file.

    ``WriteBackError`` when that failed (the data is lost; ``fate`` says what
    became of the device). ``BLKFLSBUF`` and the kernel's flush at the last
    close drop write-back errors; the wait (``sync_file_range``, which reports
    them as ``fsync`` does, without ``fsync``'s flush of the backing file:
    ``ld_write_back`` in csrc/loopdev.c) reports each one once, also one that
    happened before this fd was opened. The block layer turns every
    failed write into EIO (the loop driver's ENOSPC shows only in the kernel
    log as "critical space allocation error"), so a full file system under
    the backing file is recognised from its free space.
    """
    err = -_native.write_back_raw(dev_fd)  # an fsync without the backing file's (issue 17)
    if not err:
        return
    backing = sysfs.backing_file(f"loop{index}")
    if err == errno.EIO and backing is not None and _backing_full(dev_fd, backing):
        err = errno.ENOSPC
    cause = "its file system is full" if err == errno.ENOSPC else os.strerror(err)
    name = errno.errorcode.get(err, str(err))
    raise errors.WriteBackError(
        err,
        f"writing back to the backing file failed ({name}: {cause}); data written through "
        f"the device is lost; {fate}",
        device=device_path(index),
        backing=backing,
    )


def _backing_full(dev_fd: int, path: str) -> bool:
    """Whether ``path`` is the device's backing file (by the kernel's device and inode)
    and its file system is (almost) out of space."""
    try:
        if not _native.get_status(dev_fd).is_bound_to(os.stat(path)):
            return False
        vfs = os.statvfs(path)
    except OSError:
        return False  # unlinked (" (deleted)"), renamed, or not reachable from here
    return vfs.f_bfree * vfs.f_frsize < _FULL


def abort(dev_fd: int, index: int) -> None:
    """Undo a half-done attach (the caller closes the fd); the original error matters."""
    try:
        _native.delete_partitions(dev_fd, index)
        unpublish_nodes(index)
    except OSError:  # untested: a partition opened within the failed attach
        pass
    _native.clear_fd_quietly(dev_fd)


def release(
    dev_fd: int,
    index: int,
    before_clear: Callable[[], None] | None = None,
    *,
    bound: bool = False,
    lazy: bool = False,
) -> None:
    """Delete the device's partitions, then ``LOOP_CLR_FD``.

    Partitions first: BLKPG partitions outlive the binding on kernels without
    a partition parser and would point into the next file bound to this
    minor. If one is in use this raises before anything changed, unless
    ``lazy`` and the device has partscan: then the kernel drops them itself
    when it releases the device at the last close (``bdev_disk_changed`` in
    ``__loop_clr_fd``, drivers/block/loop.c), as after ``losetup -d``.
    ``before_clear`` runs between the two (nodes go before the device).
    ``bound``: the caller attached the device and has not released it.
    """
    if before_clear is None and not lazy:
        release_plain(dev_fd, index, bound)  # one C call where /dev is a devtmpfs
    else:
        _release_steps(dev_fd, index, before_clear, bound, lazy)


def _release_steps(
    dev_fd: int, index: int, before_clear: Callable[[], None] | None, bound: bool, lazy: bool
) -> None:
    try:
        _native.delete_partitions(dev_fd, index, bound=bound)
    except errors.DeviceBusy:
        renew_nodes(index)  # those deleted before the busy one came back renumbered
        if not lazy or not _native.get_status(dev_fd).lo_flags & _native.LO_FLAGS_PARTSCAN:
            raise
    if before_clear is not None:
        before_clear()
    unpublish_nodes(index)
    _native.ioctl(dev_fd, _native.LOOP_CLR_FD, device=device_path(index))


def release_plain(dev_fd: int, index: int, bound: bool) -> None:
    """:func:`release` with nothing between the two steps, for the compat face: one
    C call where /dev is a devtmpfs (no nodes of ours to remove)."""
    if not _devtmpfs:
        _release_steps(dev_fd, index, None, bound, False)
        return
    err = _native.release_raw(dev_fd, index, bound)
    if err < 0:
        raise _native.release_failed(err, index)


def set_status(dev_fd: int, index: int, info: _native.LoopInfo, old: tuple[int, int, int]) -> None:
    """``LOOP_SET_STATUS64``; where the offset or size limit changed on a device with
    partscan, its partitions are read again from the new span. ``old``: the offset,
    size limit and flags before.

    The kernel rescans only when partscan is newly turned on (loop_set_status
    in drivers/block/loop.c); partitions loopdev registered would otherwise
    keep pointing at the old offsets. All or nothing: the partitions go first
    (BLKPG deletes none while one is open: EBUSY, and nothing has changed),
    and a table refused at the new span puts the old span and its partitions
    back before the error is raised. Only partscan stays on where this call
    turned it on: the kernel clears no flag but autoclear.
    """
    device = device_path(index)
    old_offset, old_sizelimit, old_flags = old
    moved = (info.lo_offset, info.lo_sizelimit) != (old_offset, old_sizelimit)
    if not (moved and info.lo_flags & _native.LO_FLAGS_PARTSCAN):
        _native.set_status(dev_fd, info, device=device)
        return
    _native.delete_partitions(dev_fd, index)
    changed = False
    try:
        try:
            _native.set_status(dev_fd, info, device=device)
            changed = True
            partitions.ensure_registered(dev_fd, index, None)
        except BaseException:
            if changed:  # info is the caller's copy: it gets the old values back too
                info.lo_offset, info.lo_sizelimit, info.lo_flags = old
                _native.set_status(dev_fd, info, device=device)
            if old_flags & _native.LO_FLAGS_PARTSCAN:
                partitions.ensure_registered(dev_fd, index, None)
            raise
    finally:
        renew_nodes(index)  # the partitions have new minors, or are gone
