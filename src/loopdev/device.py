"""The high-level API: ``attach()`` a file, get a ``LoopDevice``, detach on exit."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from loopdev import _engine, _native, nodes, partitions, sysfs
from loopdev._record import Record
from loopdev.errors import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    DeviceNodeError,
    LoopError,
    WriteBackError,
)

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from types import TracebackType
    from typing import Literal, Protocol, TypeAlias, TypedDict

    Backing: TypeAlias = "str | os.PathLike[str] | int"
    DirectIO: TypeAlias = "bool | Literal['auto']"

    class AttachOptions(TypedDict, total=False):
        """The keyword arguments of ``attach()``, for the functions that pass them on."""

        offset: int
        sizelimit: int
        read_only: bool
        partscan: bool
        direct_io: DirectIO
        block_size: int | None
        autoclear: bool
        lock: bool
        node_dir: str | os.PathLike[str] | None
        node_mode: int

    class Lease(Protocol):
        """Who else releases a device: a ``LoopDevice`` that has one asks it instead
        (the broker's devices, ``loopdev.broker_client.BrokerLease``)."""

        path: str

        def partitions(self) -> list[partitions.PartitionDevice]: ...
        def detach(self, fd: int, timeout: float) -> None: ...
        def close(self, fd: int) -> None: ...


__all__ = ["DeviceInfo", "LoopDevice", "attach", "devices", "find", "open_device"]

_BLOCK_SIZES = (512, 1024, 2048, 4096)
_DIO = {
    False: _native.DIRECT_IO_OFF,
    "auto": _native.DIRECT_IO_TRY,
    True: _native.DIRECT_IO_REQUIRED,
}


class DeviceInfo(Record):
    """One bound loop device, read from sysfs (the backing path in full). Read-only."""

    __slots__ = ()
    __match_args__ = (
        "name",
        "index",
        "backing_file",
        "offset",
        "sizelimit",
        "read_only",
        "autoclear",
        "partscan",
        "direct_io",
        "block_size",
        "size",
    )

    name: str
    index: int
    """The N of ``loopN`` (not the minor number once ``max_part`` > 0)."""
    backing_file: str
    offset: int
    sizelimit: int
    read_only: bool
    autoclear: bool
    partscan: bool
    direct_io: bool
    block_size: int
    size: int

    def __init__(
        self,
        *,
        name: str,
        index: int,
        backing_file: str,
        offset: int,
        sizelimit: int,
        read_only: bool,
        autoclear: bool,
        partscan: bool,
        direct_io: bool,
        block_size: int,
        size: int,
    ) -> None:
        values = (name, index, backing_file, offset, sizelimit, read_only, autoclear, partscan)
        self._values = (*values, direct_io, block_size, size)

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"

    @property
    def minor(self) -> int:
        """Deprecated alias of ``index``."""
        _minor_deprecated("DeviceInfo")
        return self.index


def _minor_deprecated(cls: str) -> None:
    # Imported here, off the attach path (see loopdev/__init__.py): 0.5 ms of
    # every import loopdev otherwise, for a deprecated name.
    import warnings

    warnings.warn(
        f"{cls}.minor is deprecated: use {cls}.index (the N of loopN, which is not the"
        " minor number once max_part > 0)",
        DeprecationWarning,
        stacklevel=3,
    )


def device_info(name: str) -> DeviceInfo | None:
    """What sysfs says of ``name``; None when it is not bound."""
    got = _native.sysfs_info(name)
    return None if got is None else DeviceInfo._from_values((name, int(name[4:]), *got))


def _loop_names() -> list[str]:
    found = [int(n[4:]) for n in os.listdir(sysfs.SYS_BLOCK) if n[:4] == "loop" and n[4:].isdigit()]
    return [f"loop{i}" for i in sorted(found)]


def devices() -> list[DeviceInfo]:
    """Every bound loop device, by index."""
    found = []
    for name in _loop_names():
        info = device_info(name)
        if info is not None:
            found.append(info)
    return found


def find(path: str | os.PathLike[str], offset: int | None = None) -> list[DeviceInfo]:
    """Devices backed by ``path`` (same device and inode), optionally at ``offset``.

    The kernel's device and inode of each bound device's file
    (LOOP_GET_STATUS64, a brief read-only open), never its name: a name may
    end in a newline or in " (deleted)", and a hard link has another.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BackingFileError(
            exc.errno or errno.ENOENT, "cannot use the backing file", backing=os.fspath(path)
        ) from None
    want = (st.st_dev, st.st_ino)
    found = []
    for name in _loop_names():
        if _engine.backing_id(int(name[4:])) != want:
            continue
        info = device_info(name)
        if info is not None and (offset is None or info.offset == offset):
            found.append(info)
    return found


class LoopDevice:
    """An attached (or opened) loop device. Leaving ``with`` detaches what we attached."""

    # Slots: attach() makes one per call (issue 17); __dict__ keeps callers' own attributes.
    __slots__ = (
        "__dict__",
        "__weakref__",
        "_autoclear",
        "_backing_st",
        "_bound",
        "_fd",
        "_lease",
        "_nodes",
        "diskseq",
        "index",
        "name",
        "owned",
        "path",
    )

    def __init__(
        self,
        index: int,
        fd: int,
        *,
        owned: bool,
        backing_st: os.stat_result | None = None,
        lease: Lease | None = None,
        autoclear: bool = False,
        bound: bool = False,
    ) -> None:
        """``autoclear``: closing our fd releases the device (then /dev nodes go
        too). ``bound``: attached by us, so release need not ask the kernel."""
        self._fd = -1  # first: __del__ looks at it even if __init__ failed
        self.index = index  # the N of loopN (not the minor number once max_part > 0)
        self.name = f"loop{index}"
        self.path = _engine.device_path(index) if lease is None else lease.path
        self.owned = owned
        self._lease = lease
        self._fd = fd
        self._backing_st = backing_st
        self._nodes: list[nodes.NodeSet] = []
        self._autoclear = autoclear
        self._bound = bound

        seq = _native.diskseq_raw(fd)
        self.diskseq: int | None = seq if seq >= 0 else None  # None: kernels before 5.15

    @property
    def minor(self) -> int:
        """Deprecated alias of ``index``."""
        _minor_deprecated("LoopDevice")
        return self.index

    def __del__(self) -> None:
        # An fd left to the garbage collector would hold the device open and
        # make a later detach() wait for it.
        if self._fd >= 0:
            self.close()

    @property
    def fd(self) -> int:
        """The open device fd; -1 once detached or closed."""
        return self._fd

    def info(self) -> DeviceInfo:
        """Current state from sysfs; ``LoopError(ENXIO)`` when not bound."""
        info = device_info(self.name)
        if info is None:
            raise LoopError(errno.ENXIO, "device is not bound", device=self.path)
        return info

    @property
    def partitions(self) -> list[partitions.PartitionDevice]:
        """Registered partitions (kernel-scanned or added by loopdev), by number."""
        if self._lease is not None:
            return self._lease.partitions() if self._fd >= 0 else []
        return partitions.list_partitions(self.name)

    @property
    def nodes(self) -> list[str]:
        """Names of the private nodes made by ``attach(node_dir=...)``."""
        return [name for made in self._nodes for name, _ in made.made]

    def resize(self) -> int:
        """Re-read the backing file's size (after it grew); returns the new size."""
        _native.ioctl(self._live_fd(), _native.LOOP_SET_CAPACITY, device=self.path)
        return _native.get_u64(self._fd, _native.BLKGETSIZE64, device=self.path)

    def detach(self, timeout: float = 10.0, *, lazy: bool = False) -> None:
        """Write back, delete partitions, remove nodes loopdev made, unbind, and wait
        until released.

        ``DeviceBusy`` if a partition is in use (nothing changed then) or if
        another process still holds the device after ``timeout`` seconds (the
        kernel releases it when they close it); ``timeout=0`` does not wait.
        ``WriteBackError`` if data written through the device could not be
        written to the backing file (e.g. ENOSPC): that data is lost, and the
        device is detached all the same (``released`` is True), unless a busy
        partition kept it bound (``released`` False, as with ``DeviceBusy``).
        ``lazy=True`` (what ``loopdev detach`` does, like ``losetup -d``): a
        partition in use does not stop it; the kernel releases the device and
        drops its partitions when the last holder closes (a device without
        partscan, whose partitions the kernel would keep, still raises).
        """
        if self._fd < 0:
            return
        if self._lease is not None:
            fd, self._fd = self._fd, -1
            self._lease.detach(fd, timeout)
            return
        lost: WriteBackError | None = None
        try:
            _engine.write_back(self._fd, self.index, "the device was detached")
        except WriteBackError as exc:
            lost = exc
            lost.released = True
        try:
            _engine.release(
                self._fd,
                self.index,
                # None without nodes of ours: one C call releases (issue 17).
                before_clear=self._remove_nodes if self._nodes else None,
                bound=self._bound,
                lazy=lazy,
            )
        except OSError as exc:
            if lost is None:
                raise
            if exc.errno != errno.ENXIO:  # ENXIO: unbound meanwhile, as good as detached
                raise _still_bound(lost, exc) from exc
        fd, self._fd = self._fd, -1
        os.close(fd)
        if lost is not None:
            raise lost
        if timeout <= 0:
            return
        try:
            sysfs.wait_released(self.name, self._backing_st, timeout, self.diskseq)
        except TimeoutError:
            raise DeviceBusy(
                errno.EBUSY,
                f"still held open by another process after {timeout:g} s; the kernel "
                "releases it when the last holder closes it",
                device=self.path,
            ) from None

    def close(self) -> None:
        """Close our fd without detaching (an autoclear device is released then)."""
        if self._fd >= 0 and self._lease is not None:
            fd, self._fd = self._fd, -1
            self._lease.close(fd)
        elif self._fd >= 0:
            self._remove_nodes()
            if self._autoclear:
                _engine.unpublish_nodes(self.index)
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> LoopDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.owned:
            self.detach()
        else:
            self.close()

    def __repr__(self) -> str:
        return f"<LoopDevice {self.path} fd={self._fd}>"

    def _live_fd(self) -> int:
        if self._fd < 0:
            raise LoopError(errno.EBADF, "device was detached or closed", device=self.path)
        return self._fd

    def _make_nodes(self, node_dir: str | os.PathLike[str], mode: int) -> None:
        made = nodes.NodeSet(node_dir)
        self._nodes.append(made)
        made.add(self.name, sysfs.loop_devt(self.index), mode)
        for p in self.partitions:
            made.add(p.name, (p.major, p.minor), mode)

    def _remove_nodes(self) -> None:
        for made in self._nodes:
            made.remove()
            made.close()
        self._nodes.clear()

    def _abort(self) -> None:
        """Undo a half-finished attach; the original error matters, not ours."""
        try:
            self._remove_nodes()
        except OSError:
            pass
        _engine.abort(self._fd, self.index)
        fd, self._fd = self._fd, -1
        os.close(fd)


def _still_bound(lost: WriteBackError, why: OSError) -> WriteBackError:
    """``lost`` for a device that the release after it left bound."""
    text = str(lost.strerror).replace("the device was detached", "the device is still bound")
    again = WriteBackError(
        lost.errno or errno.EIO,
        f"{text} ({why.strerror})",
        device=lost.device,
        backing=lost.backing,
    )
    again.released = False
    return again


def _validate(
    offset: int, sizelimit: int, block_size: int | None, direct_io: DirectIO, where: str | None
) -> None:
    """Input errors known before any device is touched."""
    if type(offset) is not int or type(sizelimit) is not int or block_size is not None:
        # Types first: "1MiB" < 0 would be a TypeError. Exact ints skip the loop.
        numbers = (("offset", offset), ("size limit", sizelimit), ("block size", block_size))
        for name, value in numbers:
            if value is not None and (type(value) is bool or not isinstance(value, int)):
                raise ConfigureError(
                    errno.EINVAL, f"{name} must be an int, not {value!r}", backing=where
                )
    if offset < 0:
        raise ConfigureError(errno.EINVAL, f"offset {offset} is negative", backing=where)
    if sizelimit < 0 or sizelimit % 512:
        raise ConfigureError(
            errno.EINVAL,
            f"size limit {sizelimit} is not a non-negative multiple of 512",
            backing=where,
        )
    if block_size is not None and block_size not in _BLOCK_SIZES:
        raise ConfigureError(
            errno.EINVAL,
            f"block size {block_size} is not a power of two in 512..4096",
            backing=where,
        )
    if direct_io not in _DIO:
        raise ConfigureError(
            errno.EINVAL,
            f"direct_io must be True, False or 'auto', not {direct_io!r}",
            backing=where,
        )


def _open_backing(backing: Backing, read_only: bool) -> tuple[int, str | None, bool]:
    """The backing fd, its path (None for a caller's fd: see below), and whether we
    opened it."""
    if isinstance(backing, bool):
        raise BackingFileError(
            errno.EINVAL, f"backing must be a path or a file descriptor, not {backing!r}"
        )
    if isinstance(backing, int):
        if backing < 0:
            raise BackingFileError(errno.EBADF, f"invalid file descriptor {backing}")
        # Its path is read where needed: for messages (_named), and for
        # lo_file_name by the C side, which keeps it per file; a readlink of
        # /proc/self/fd/N here cost ~5 us of every attach() (issue 17).
        return backing, None, False
    if not os.fspath(backing):
        # abspath("") would be the working directory; losetup's wording.
        raise BackingFileError(errno.ENOENT, "failed to use backing file", backing="")
    path = os.path.abspath(os.fspath(backing))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BackingFileError(
            exc.errno or errno.ENOENT, "cannot use the backing file", backing=path
        ) from None
    # Checked before open: opening a FIFO would block.
    _check_kind(st, path)
    try:
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except OSError as exc:
        hint = "" if read_only else "; pass read_only=True for a read-only file"
        raise BackingFileError(
            exc.errno or errno.EACCES, f"cannot open the backing file{hint}", backing=path
        ) from None
    return fd, path, True


def _check_kind(st: os.stat_result, path: str | None) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise BackingFileError(errno.EISDIR, "backing file is a directory", backing=path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BackingFileError(
            errno.EINVAL, "backing file is not a regular file or block device", backing=path
        )


def _named(fd: int, path: str | None) -> str | None:
    """``path``, or where it is None (a caller's fd) the fd's path, for a message."""
    return path if path is not None else _native.fd_path(fd)


def _check_backing(
    fd: int, path: str | None, offset: int, read_only: bool, opened: bool = True
) -> os.stat_result:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF and not opened:
            raise BackingFileError(errno.EBADF, f"file descriptor {fd} is not open") from None
        raise BackingFileError(
            exc.errno or errno.EBADF, "cannot stat", backing=_named(fd, path)
        ) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        _check_kind(st, _named(fd, path))
    size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
    # A 0-byte file attaches (as with losetup, which only warns).
    if offset and offset >= size:
        raise BackingFileError(
            errno.EINVAL,
            f"offset {offset} is at or past the end of the file ({size} bytes)",
            backing=_named(fd, path),
        )
    mode = fcntl.fcntl(fd, fcntl.F_GETFL)
    if mode & _native.O_PATH:
        raise BackingFileError(
            errno.EBADF,
            "backing fd is an O_PATH handle, which cannot be read; open the file for reading "
            "(and writing)",
            backing=_named(fd, path),
        )
    if not read_only:
        if mode & os.O_ACCMODE == os.O_RDONLY:
            raise BackingFileError(
                errno.EBADF,
                "backing fd is open read-only; pass read_only=True",
                backing=_named(fd, path),
            )
        # Root opens a 0444 file read-write: refused for a path (a file marked
        # read-only is not written by accident), not for a caller's read-write
        # fd (its opener chose to write, as losetup does for root).
        if opened and stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222:
            raise BackingFileError(
                errno.EACCES,
                "backing file has no write permission; pass read_only=True",
                backing=_named(fd, path),
            )
    return st


def attach(
    backing: Backing,
    *,
    offset: int = 0,
    sizelimit: int = 0,
    read_only: bool = False,
    partscan: bool = False,
    direct_io: DirectIO = "auto",
    block_size: int | None = None,
    autoclear: bool = True,
    lock: bool = False,
    node_dir: str | os.PathLike[str] | None = None,
    node_mode: int = 0o600,
) -> LoopDevice:
    """Attach ``backing`` (a path or an open fd) to a free loop device.

    ``partscan`` registers the image's partitions (the kernel's scan, or
    loopdev's where the kernel finds none). ``direct_io="auto"`` uses direct
    I/O where the file supports it. ``node_dir`` gets private block nodes for
    the device and its partitions, removed on detach. This process attaches;
    ``loopdev.attach()`` also goes through a broker.
    """
    where = None if isinstance(backing, int) else os.fspath(backing)
    _validate(offset, sizelimit, block_size, direct_io, where)
    if node_dir is not None and not os.path.isdir(node_dir):
        exists = os.path.lexists(node_dir)
        raise DeviceNodeError(
            errno.ENOTDIR if exists else errno.ENOENT,
            "node directory is not a directory" if exists else "node directory does not exist",
            device=os.fspath(node_dir),
        )
    fd, path, opened = _open_backing(backing, read_only)
    try:
        st = _check_backing(fd, path, offset, read_only, opened)
        got = _engine.attach_plain(
            _engine.shared_control(),
            fd,
            _engine.flags(read_only, autoclear, partscan),
            offset,
            sizelimit,
            block_size or 0,
            lock,
            _DIO[direct_io],
            path,
            node_mode,
            node_dir,
        )
        dev = LoopDevice(
            got >> 32, got & 0xFFFFFFFF, owned=True, backing_st=st, autoclear=autoclear, bound=True
        )
        if node_dir is not None:
            try:
                dev._make_nodes(node_dir, node_mode)
            except BaseException:
                dev._abort()
                raise
        return dev
    finally:
        if opened:
            os.close(fd)


def open_device(name_or_minor: str | int, *, owned: bool = False) -> LoopDevice:
    """Wrap an existing device (``3``, ``"loop3"`` or ``"/dev/loop3"``); not detached on exit
    unless ``owned``. A node elsewhere (``"nodes/loop3"``) is opened as it is, and must
    be that device."""
    if isinstance(name_or_minor, bool):
        raise LoopError(errno.EINVAL, f"not a loop device name or number: {name_or_minor!r}")
    if isinstance(name_or_minor, int):
        index = name_or_minor
        if index < 0:
            raise LoopError(errno.EINVAL, f"no loop device has the number {index}")
    else:
        base = os.path.basename(name_or_minor)
        if not (base.startswith("loop") and base[4:].isdigit()):
            raise LoopError(errno.EINVAL, "not a loop device name", device=str(name_or_minor))
        index = int(base[4:])
        where = os.path.dirname(name_or_minor)
        if where and os.path.realpath(where) != _engine.DEV:
            dev = LoopDevice(index, _engine.open_node(name_or_minor, index), owned=owned)
            dev.path = name_or_minor
            return dev
    try:
        fd = _engine.open_device(index, private_nodes=True)
    except FileNotFoundError:
        raise DeviceNodeError(
            errno.ENOENT, "no such loop device", device=_engine.device_path(index)
        ) from None
    return LoopDevice(index, fd, owned=owned)
