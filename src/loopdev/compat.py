"""Drop-in ``Loop`` / ``LoopControl`` API for code written against the classic module.

Same names, parameters, defaults and exceptions; the work is done by the
native core in :mod:`loopdev._native`, shared with the high-level API.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

from loopdev import _native, core, nodes, sysfs
from loopdev.errors import UnexpectedDevice
from loopdev.status import LoopInfo

TYPE_CHECKING = False  # typing is costly to import at run time
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


__all__ = ["Loop", "LoopControl", "LoopInfo", "UnexpectedDevice"]

_DEV = "/dev"


def _flags(read_only: bool | None, autoclear: bool | None, partscan: bool | None) -> int:
    flags = 0
    if read_only:
        flags |= _native.LO_FLAGS_READ_ONLY
    if autoclear:
        flags |= _native.LO_FLAGS_AUTOCLEAR
    if partscan:
        flags |= _native.LO_FLAGS_PARTSCAN
    return flags


class Loop:
    """One loop device, opened read-write as ``loop{minor}`` below ``dir_fd`` (default /dev)."""

    LOOP_MAJOR = _native.LOOP_MAJOR
    LO_FLAGS_READ_ONLY = _native.LO_FLAGS_READ_ONLY
    LO_FLAGS_AUTOCLEAR = _native.LO_FLAGS_AUTOCLEAR
    LO_FLAGS_PARTSCAN = _native.LO_FLAGS_PARTSCAN
    LO_FLAGS_DIRECT_IO = _native.LO_FLAGS_DIRECT_IO
    LOOP_SET_FD = _native.LOOP_SET_FD
    LOOP_CLR_FD = _native.LOOP_CLR_FD
    LOOP_SET_STATUS64 = _native.LOOP_SET_STATUS64
    LOOP_GET_STATUS64 = _native.LOOP_GET_STATUS64
    LOOP_CHANGE_FD = _native.LOOP_CHANGE_FD
    LOOP_SET_CAPACITY = _native.LOOP_SET_CAPACITY
    LOOP_SET_DIRECT_IO = _native.LOOP_SET_DIRECT_IO
    LOOP_SET_BLOCK_SIZE = _native.LOOP_SET_BLOCK_SIZE
    LOOP_CONFIGURE = _native.LOOP_CONFIGURE

    fd: int
    minor: int
    devname: str
    on_close: Callable[[Loop], Any] | None

    def __init__(self, minor: int, dir_fd: int | None = None) -> None:
        self.fd = -1
        self.minor = minor
        self.devname = f"loop{minor}"
        self.on_close = None
        self._dir_fd = dir_fd
        path = self.devname if dir_fd is not None else f"{_DEV}/{self.devname}"
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or st.st_rdev != os.makedev(self.LOOP_MAJOR, minor):
                raise UnexpectedDevice(minor, st.st_rdev, st.st_mode)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    @classmethod
    def _adopt(cls, minor: int, fd: int, dir_fd: int | None) -> Loop:
        """Wrap a device fd the native attach loop opened and checked; takes ownership."""
        lo = cls.__new__(cls)
        lo.fd = fd
        lo.minor = minor
        lo.devname = f"loop{minor}"
        lo.on_close = None
        lo._dir_fd = dir_fd
        return lo

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()

    def close(self) -> None:
        """Run ``on_close(self)`` once with the fd still open, then close the fd."""
        callback, self.on_close = self.on_close, None
        try:
            if callable(callback):
                callback(self)
        finally:
            if self.fd >= 0:
                fd, self.fd = self.fd, -1
                self.devname = "<closed>"
                os.close(fd)

    def flock(self, op: int) -> None:
        """``flock(2)`` on the device; ``BlockingIOError`` when ``LOCK_NB`` cannot lock."""
        fcntl.flock(self.fd, op)

    def flush_buf(self) -> None:
        """``BLKFLSBUF``: write back and drop the device's buffers before clearing."""
        _native.ioctl(self.fd, _native.BLKFLSBUF, device=self._path)

    def set_fd(self, fd: int) -> None:
        """Deprecated ``LOOP_SET_FD``; prefer :meth:`configure`."""
        _native.ioctl(self.fd, self.LOOP_SET_FD, fd, device=self._path)

    def clear_fd(self) -> None:
        """Delete the device's partitions, then ``LOOP_CLR_FD``.

        The kernel defers the unbind until the last opener closes.
        """
        core.release(self.fd, self.minor)

    def clear_fd_wait(self, fd: int, timeout: float, wait: float = 0.1) -> None:
        """Clear, then wait until unbound or bound to a file other than ``fd``'s.

        ``TimeoutError`` after ``timeout`` seconds; ``wait`` caps the poll interval.
        """
        self.clear_fd()
        st = os.fstat(fd)
        # Since 6.x LOOP_CLR_FD only sets autoclear and the unbind happens at
        # the last close, and our own fd counts as an opener: park it on an
        # O_PATH handle (not an opener) while waiting, then reopen the device
        # under the same fd number.
        path = self.devname if self._dir_fd is not None else f"{_DEV}/{self.devname}"
        parked = os.open(path, os.O_PATH | os.O_CLOEXEC, dir_fd=self._dir_fd)
        try:
            os.dup2(parked, self.fd, inheritable=False)
        finally:
            os.close(parked)
        try:
            sysfs.wait_released(f"loop{self.minor}", st, timeout, wait)
        finally:
            self._reopen(path)

    def _reopen(self, path: str) -> None:
        for _ in range(100):
            try:
                new = os.open(path, os.O_RDWR | os.O_CLOEXEC, dir_fd=self._dir_fd)
            except OSError as exc:
                # ENXIO while the kernel finishes the rundown of this minor.
                if exc.errno != errno.ENXIO:
                    raise
                time.sleep(0.001)
                continue
            try:
                os.dup2(new, self.fd, inheritable=False)
            finally:
                os.close(new)
            return
        raise OSError(errno.ENXIO, "device stayed in rundown", path)

    def change_fd(self, fd: int) -> None:
        """``LOOP_CHANGE_FD``: the device must be read-only and the file the same size."""
        _native.ioctl(self.fd, self.LOOP_CHANGE_FD, fd, device=self._path)

    def is_bound_to(self, fd: int) -> bool:
        """Bound, and to the same file as ``fd``."""
        try:
            info = self.get_status()
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return False
            raise
        return info.is_bound_to(os.fstat(fd))

    def set_status(
        self,
        offset: int | None = None,
        sizelimit: int | None = None,
        autoclear: bool | None = None,
        partscan: bool | None = None,
        read_only: bool | None = None,
    ) -> None:
        """Change only what is not None; an offset or sizelimit of 0 leaves it unchanged."""
        info = self.get_status()
        if offset:
            info.lo_offset = offset
        if sizelimit:
            info.lo_sizelimit = sizelimit
        for wanted, flag in (
            (autoclear, self.LO_FLAGS_AUTOCLEAR),
            (partscan, self.LO_FLAGS_PARTSCAN),
            (read_only, self.LO_FLAGS_READ_ONLY),
        ):
            if wanted is not None:
                info.lo_flags = (info.lo_flags | flag) if wanted else (info.lo_flags & ~flag)
        _native.set_status(self.fd, info, device=self._path)

    def configure(
        self,
        fd: int,
        offset: int | None = None,
        sizelimit: int | None = None,
        blocksize: int = 0,
        autoclear: bool | None = None,
        partscan: bool | None = None,
        read_only: bool | None = None,
    ) -> None:
        """Bind to ``fd`` and configure in one step (``LOOP_CONFIGURE``, or its fallback)."""
        config = _config_from_kwargs(offset, sizelimit, blocksize, autoclear, partscan, read_only)
        # Partitions of an earlier binding would point into the new file.
        _native.delete_partitions(self.fd, self.minor)
        _native.configure(self.fd, fd, config, device=self._path)
        core.finish_attach(self.fd, self.minor, config, None)

    def get_status(self) -> LoopInfo:
        """``LOOP_GET_STATUS64``; ``OSError(ENXIO)`` when unbound."""
        return _native.get_status(self.fd, device=self._path)

    def set_direct_io(self, dio: bool = True) -> None:
        """``LOOP_SET_DIRECT_IO``."""
        _native.ioctl(self.fd, self.LOOP_SET_DIRECT_IO, int(dio), device=self._path)

    def set_capacity(self) -> None:
        """``LOOP_SET_CAPACITY``: re-read the backing file's size."""
        _native.ioctl(self.fd, self.LOOP_SET_CAPACITY, device=self._path)

    def set_block_size(self, size: int) -> None:
        """``LOOP_SET_BLOCK_SIZE``."""
        _native.ioctl(self.fd, self.LOOP_SET_BLOCK_SIZE, size, device=self._path)

    def mknod(self, dir_fd: int, mode: int = 0o600) -> None:
        """Create block node ``loop{minor}`` in ``dir_fd``; remove it before release."""
        nodes.make_node(dir_fd, f"loop{self.minor}", self.LOOP_MAJOR, self.minor, mode)

    @property
    def _path(self) -> str:
        return f"/dev/loop{self.minor}"


class LoopControl:
    """``loop-control`` below ``dir_fd`` (default /dev); devices are opened there too."""

    fd: int

    def __init__(self, dir_fd: int | None = None) -> None:
        self.fd = -1
        self._dir_fd = dir_fd
        path = "loop-control" if dir_fd is not None else f"{_DEV}/loop-control"
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
        # The attach loop opens loopN relative to this: dir_fd itself (0 is
        # a valid fd), or our own handle on /dev.
        try:
            self._dev_dir = (
                dir_fd
                if dir_fd is not None
                else os.open(_DEV, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            )
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()

    def close(self) -> None:
        """Idempotent; afterwards every operation raises ``RuntimeError``."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
            if self._dir_fd is None:
                os.close(self._dev_dir)

    def _check_open(self) -> int:
        if self.fd < 0:
            raise RuntimeError("LoopControl is closed")
        return self.fd

    def add(self, minor: int = -1) -> int:
        """``LOOP_CTL_ADD``; returns the new minor."""
        return _native.ioctl(self._check_open(), _native.LOOP_CTL_ADD, minor, device="loop-control")

    def remove(self, minor: int = -1) -> None:
        """``LOOP_CTL_REMOVE``."""
        _native.ioctl(self._check_open(), _native.LOOP_CTL_REMOVE, minor, device="loop-control")

    def get_unbound(self) -> int:
        """``LOOP_CTL_GET_FREE`` (creates a device when none is free)."""
        return _native.ioctl(self._check_open(), _native.LOOP_CTL_GET_FREE, device="loop-control")

    def loop_for_fd(
        self,
        fd: int,
        lock: bool = False,
        setup: Callable[[Loop], Any] | None = None,
        **kwargs: Any,
    ) -> Loop:
        """Get a free device, bind it to ``fd`` and configure it with ``**kwargs``.

        ``kwargs`` are those of :meth:`Loop.configure`. Transient kernel races
        are retried (bounded); a failure never leaves a device bound.
        """
        ctl = self._check_open()
        if fd < 0:
            raise ValueError(f"Invalid file descriptor '{fd}'")
        config = _config_from_kwargs(**kwargs)
        return self._attach(ctl, fd, config, lock, setup)

    def _attach(
        self,
        ctl: int,
        fd: int,
        config: _native.Config,
        lock: bool,
        setup: Callable[[Loop], Any] | None,
    ) -> Loop:
        if setup is None:
            got = _native.attach(ctl, self._dev_dir, fd, config, lock=lock)
            try:
                lo = Loop._adopt(got.minor, got.fd, self._dir_fd)
            except BaseException:
                _native.lib_clear_fd(got.fd)
                os.close(got.fd)
                raise
        else:
            lo = self._attach_with_setup(ctl, fd, config, lock, setup)
        try:
            core.finish_attach(lo.fd, lo.minor, config, None)
        except BaseException:
            lo.close()
            raise
        return lo

    def _attach_with_setup(
        self,
        ctl: int,
        fd: int,
        config: _native.Config,
        lock: bool,
        setup: Callable[[Loop], Any],
    ) -> Loop:
        current: list[Loop] = []

        def on_open(minor: int, dev_fd: int) -> None:
            lo = Loop._adopt(minor, dev_fd, self._dir_fd)
            current.append(lo)
            try:
                setup(lo)
            except BaseException:
                current.pop().close()
                raise

        def on_discard(dev_fd: int) -> None:
            current.pop().close()

        _native.attach(
            ctl,
            self._dev_dir,
            fd,
            config,
            lock=lock,
            on_open=on_open,
            on_discard=on_discard,
        )
        return current[-1]


def _config_from_kwargs(
    offset: int | None = None,
    sizelimit: int | None = None,
    blocksize: int = 0,
    autoclear: bool | None = None,
    partscan: bool | None = None,
    read_only: bool | None = None,
) -> _native.Config:
    return _native.Config(
        offset=offset or 0,
        sizelimit=sizelimit or 0,
        block_size=blocksize or 0,
        flags=_flags(read_only, autoclear, partscan),
    )
