"""The high-level API: ``attach()`` a file, get a ``LoopDevice``, detach on exit."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Union

from loopdev import _native, core, nodes, partitions, sysfs
from loopdev.errors import BackingFileError, ConfigureError, DeviceBusy, LoopError

__all__ = ["DeviceInfo", "LoopDevice", "attach", "devices", "find", "open_device"]

Backing = Union[str, "os.PathLike[str]", int]
DirectIO = bool | Literal["auto"]

_BLOCK_SIZES = (512, 1024, 2048, 4096)
_DIO = {
    False: _native.DIRECT_IO_OFF,
    "auto": _native.DIRECT_IO_TRY,
    True: _native.DIRECT_IO_REQUIRED,
}


@dataclass(frozen=True)
class DeviceInfo:
    """One bound loop device, read from sysfs (the backing path in full)."""

    name: str
    minor: int
    backing_file: str
    offset: int
    sizelimit: int
    read_only: bool
    autoclear: bool
    partscan: bool
    direct_io: bool
    block_size: int
    size: int

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def _flag(name: str, attr: str) -> bool:
    return sysfs.read_int(name, attr) != 0


def device_info(name: str) -> DeviceInfo | None:
    """What sysfs says of ``name``; None when it is not bound."""
    backing = sysfs.backing_file(name)
    if backing is None:
        return None
    try:
        return DeviceInfo(
            name=name,
            minor=int(name[4:]),
            backing_file=backing,
            offset=sysfs.read_int(name, "loop/offset"),
            sizelimit=sysfs.read_int(name, "loop/sizelimit"),
            read_only=_flag(name, "ro"),
            autoclear=_flag(name, "loop/autoclear"),
            partscan=_flag(name, "loop/partscan"),
            direct_io=_flag(name, "loop/dio"),
            block_size=sysfs.read_int(name, "queue/logical_block_size"),
            size=sysfs.read_int(name, "size") * 512,
        )
    except OSError as exc:
        if sysfs.is_gone(exc):
            return None  # unbound while we read
        raise


def _loop_names() -> list[str]:
    names = [n for n in os.listdir(sysfs.SYS_BLOCK) if n.startswith("loop") and n[4:].isdigit()]
    return sorted(names, key=lambda n: int(n[4:]))


def devices() -> list[DeviceInfo]:
    """Every bound loop device, by minor."""
    found = []
    for name in _loop_names():
        info = device_info(name)
        if info is not None:
            found.append(info)
    return found


def find(path: str | os.PathLike[str], offset: int | None = None) -> list[DeviceInfo]:
    """Devices backed by ``path`` (same device and inode), optionally at ``offset``.

    Reads sysfs only: opening each device to ask LOOP_GET_STATUS64 would
    delay the release of devices that their owners are detaching.
    """
    st = os.stat(path)
    found = []
    for info in devices():
        try:
            other = os.stat(info.backing_file)
        except OSError:
            continue  # unlinked (" (deleted)") or unreachable: not this path's inode
        if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
            continue
        if offset is None or info.offset == offset:
            found.append(info)
    return found


class LoopDevice:
    """An attached (or opened) loop device. Leaving ``with`` detaches what we attached."""

    def __init__(
        self, minor: int, fd: int, *, owned: bool, backing_st: os.stat_result | None = None
    ) -> None:
        self.minor = minor
        self.name = f"loop{minor}"
        self.path = f"/dev/loop{minor}"
        self.owned = owned
        self._fd = fd
        self._backing_st = backing_st
        self._node_dir: int | None = None
        self._node_names: list[str] = []
        try:
            self.diskseq: int | None = _native.get_u64(fd, _native.BLKGETDISKSEQ, device=self.path)
        except OSError:
            self.diskseq = None  # kernels before 5.15

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
        return partitions.list_partitions(self.name)

    @property
    def nodes(self) -> list[str]:
        """Names of the private nodes made by ``attach(node_dir=...)``."""
        return list(self._node_names)

    def resize(self) -> int:
        """Re-read the backing file's size (after it grew); returns the new size."""
        _native.ioctl(self._live_fd(), _native.LOOP_SET_CAPACITY, device=self.path)
        return _native.get_u64(self._fd, _native.BLKGETSIZE64, device=self.path)

    def detach(self, timeout: float = 10.0) -> None:
        """Delete partitions, remove private nodes, unbind, and wait until released.

        ``DeviceBusy`` if a partition is in use (nothing changed then) or if
        another process still holds the device after ``timeout`` seconds (the
        kernel releases it when they close it).
        """
        if self._fd < 0:
            return
        try:
            os.fsync(self._fd)
        except OSError:
            pass  # a read-only device has nothing to write back
        core.release(self._fd, self.minor, before_clear=self._remove_nodes)
        fd, self._fd = self._fd, -1
        os.close(fd)
        try:
            sysfs.wait_released(self.name, self._backing_st, timeout, 0.002)
        except TimeoutError:
            raise DeviceBusy(
                errno.EBUSY,
                f"still held open by another process after {timeout:g} s; the kernel "
                "releases it when the last holder closes it",
                device=self.path,
            ) from None

    def close(self) -> None:
        """Close our fd without detaching (an autoclear device is released then)."""
        if self._fd >= 0:
            self._remove_nodes()
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
        self._node_dir = os.open(node_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        for name, major, minor in [(self.name, _native.LOOP_MAJOR, self.minor)] + [
            (p.name, p.major, p.minor) for p in self.partitions
        ]:
            nodes.make_node(self._node_dir, name, major, minor, mode)
            self._node_names.append(name)

    def _remove_nodes(self) -> None:
        if self._node_dir is None:
            return
        for name in self._node_names:
            nodes.remove_node(self._node_dir, name)
        self._node_names.clear()
        os.close(self._node_dir)
        self._node_dir = None

    def _abort(self) -> None:
        """Undo a half-finished attach; the original error matters, not ours."""
        try:
            self._remove_nodes()
            _native.delete_partitions(self._fd, self.minor)
        except OSError:
            pass
        _native.lib_clear_fd(self._fd)
        fd, self._fd = self._fd, -1
        os.close(fd)


def _validate(
    offset: int, sizelimit: int, block_size: int | None, direct_io: DirectIO, where: str | None
) -> None:
    """Input errors known before any device is touched."""
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


def _open_backing(backing: Backing, read_only: bool) -> tuple[int, str, bool]:
    """The backing fd, its path for messages, and whether we opened it."""
    if isinstance(backing, int):
        if backing < 0:
            raise BackingFileError(errno.EBADF, f"invalid file descriptor {backing}")
        try:
            path = os.readlink(f"/proc/self/fd/{backing}")
        except OSError:
            raise BackingFileError(errno.EBADF, f"file descriptor {backing} is not open") from None
        return backing, path, False
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


def _check_kind(st: os.stat_result, path: str) -> None:
    if stat.S_ISDIR(st.st_mode):
        raise BackingFileError(errno.EISDIR, "backing file is a directory", backing=path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise BackingFileError(
            errno.EINVAL, "backing file is not a regular file or block device", backing=path
        )


def _check_backing(fd: int, path: str, offset: int, read_only: bool) -> os.stat_result:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise BackingFileError(exc.errno or errno.EBADF, "cannot stat", backing=path) from None
    _check_kind(st, path)
    size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
    if offset >= size:
        raise BackingFileError(
            errno.EINVAL,
            f"offset {offset} is at or past the end of the file ({size} bytes)",
            backing=path,
        )
    if not read_only:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
            raise BackingFileError(
                errno.EBADF, "backing fd is open read-only; pass read_only=True", backing=path
            )
        if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o222:
            raise BackingFileError(
                errno.EACCES,
                "backing file has no write permission; pass read_only=True",
                backing=path,
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
    broker: str | None = None,
) -> LoopDevice:
    """Attach ``backing`` (a path or an open fd) to a free loop device.

    ``partscan`` registers the image's partitions (the kernel's scan, or
    loopdev's where the kernel finds none). ``direct_io="auto"`` uses direct
    I/O where the file supports it. ``node_dir`` gets private block nodes for
    the device and its partitions, removed on detach. ``broker`` (default:
    ``LOOPDEV_BROKER`` from the environment; "" for none) asks the
    ``loopdev serve`` socket at that path instead, which needs no root.
    """
    if broker is None:
        broker = os.environ.get("LOOPDEV_BROKER")
    if broker:
        from loopdev import broker_client

        return broker_client.attach(
            backing,
            broker=broker,
            offset=offset,
            sizelimit=sizelimit,
            read_only=read_only,
            partscan=partscan,
            direct_io=direct_io,
            block_size=block_size,
            autoclear=autoclear,
            lock=lock,
            node_dir=node_dir,
            node_mode=node_mode,
        )
    where = None if isinstance(backing, int) else os.fspath(backing)
    _validate(offset, sizelimit, block_size, direct_io, where)
    fd, path, opened = _open_backing(backing, read_only)
    try:
        st = _check_backing(fd, path, offset, read_only)
        flags = (
            (_native.LO_FLAGS_READ_ONLY if read_only else 0)
            | (_native.LO_FLAGS_AUTOCLEAR if autoclear else 0)
            | (_native.LO_FLAGS_PARTSCAN if partscan else 0)
        )
        config = _native.Config(
            offset, sizelimit, block_size or 0, flags, _DIO[direct_io], file_name=path
        )
        got = _attach_free(fd, config, lock, path)
        dev = LoopDevice(got.minor, got.fd, owned=True, backing_st=st)
        try:
            core.finish_attach(got.fd, got.minor, config, path)
            if node_dir is not None:
                dev._make_nodes(node_dir, node_mode)
            elif partscan:
                partitions.wait_for_nodes(dev.partitions)
        except BaseException:
            dev._abort()
            raise
        return dev
    finally:
        if opened:
            os.close(fd)


def _attach_free(fd: int, config: _native.Config, lock: bool, path: str) -> _native.Attached:
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        dev_dir = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return _native.attach(ctl, dev_dir, fd, config, lock=lock, backing=path)
        finally:
            os.close(dev_dir)
    finally:
        os.close(ctl)


def open_device(name_or_minor: str | int, *, owned: bool = False) -> LoopDevice:
    """Wrap an existing device (``3``, ``"loop3"`` or ``"/dev/loop3"``); not detached on exit
    unless ``owned``."""
    if isinstance(name_or_minor, int):
        minor = name_or_minor
    else:
        base = os.path.basename(name_or_minor)
        if not (base.startswith("loop") and base[4:].isdigit()):
            raise LoopError(errno.EINVAL, "not a loop device name", device=str(name_or_minor))
        minor = int(base[4:])
    path = f"/dev/loop{minor}"
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(_native.LOOP_MAJOR, minor):
        os.close(fd)
        raise LoopError(errno.ENODEV, "not a loop block device", device=path)
    return LoopDevice(minor, fd, owned=owned)
