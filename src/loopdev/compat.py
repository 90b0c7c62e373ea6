"""Drop-in ``Loop`` / ``LoopControl`` API for code written against the classic module.

Same names, parameters, defaults and exceptions; the work is done by the
engine in :mod:`loopdev._engine`, shared with the high-level API.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

from loopdev import _engine, _native, nodes, sysfs
from loopdev._native import LoopInfo
from loopdev.errors import UnexpectedDevice

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable


__all__ = ["Loop", "LoopControl", "LoopInfo", "UnexpectedDevice"]

_READ_ONLY = _native.LO_FLAGS_READ_ONLY
_AUTOCLEAR = _native.LO_FLAGS_AUTOCLEAR
_PARTSCAN = _native.LO_FLAGS_PARTSCAN


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

    # Slots for what every Loop holds (each Loop is made and dropped once per
    # compat cycle: issue 17), and a __dict__ so that callers may still hang
    # their own attributes on it, as on the classic module's. on_close is a
    # slot too, not a class default: Python 3.11 specialises no load of a
    # class attribute through an instance (190 instructions in close()).
    __slots__ = ("__dict__", "__weakref__", "_autoclear", "_bound", "fd", "minor", "on_close")

    fd: int
    minor: int
    _autoclear: bool  # released by our close() only if we set autoclear
    _bound: bool  # bound by us and not cleared: spares a kernel query on clear
    on_close: Callable[[Loop], object] | None

    def __init__(self, minor: int, dir_fd: int | None = None) -> None:
        self.fd = -1  # first: __del__ looks at it even if __init__ failed
        self.on_close = None
        self.minor = minor
        self._autoclear = False
        self._bound = False
        self.fd = _engine.open_device(minor, dir_fd)

    @property
    def devname(self) -> str:
        """``loop{minor}``; ``"<closed>"`` once closed."""
        return f"loop{self.minor}" if self.fd >= 0 else "<closed>"

    def __del__(self) -> None:
        if self.fd >= 0:
            self.close()

    def close(self) -> None:
        """Run ``on_close(self)`` once with the fd still open, then close the fd."""
        callback = self.on_close
        try:
            if callback is not None:
                self.on_close = None
                if callable(callback):
                    callback(self)
        finally:
            fd = self.fd
            if fd >= 0:
                self.fd = -1
                if self._autoclear:
                    _engine.unpublish_nodes(self.minor)
                os.close(fd)

    def flock(self, op: int) -> None:
        """``flock(2)`` on the device; ``BlockingIOError`` when ``LOCK_NB`` cannot lock."""
        fcntl.flock(self.fd, op)

    def flush_buf(self) -> None:
        """``BLKFLSBUF``: write back and drop the device's buffers before clearing.

        ``WriteBackError`` (the device stays bound) when the write-back failed:
        BLKFLSBUF itself never says so, a write-back first does.
        """
        _engine.write_back(self.fd, self.minor, "the device is still bound")
        _native.ioctl(self.fd, _native.BLKFLSBUF, device=self._path)

    def set_fd(self, fd: int) -> None:
        """Deprecated ``LOOP_SET_FD``; prefer :meth:`configure`."""
        _native.ioctl(self.fd, self.LOOP_SET_FD, fd, device=self._path)

    def clear_fd(self) -> None:
        """Delete the device's partitions, then ``LOOP_CLR_FD``.

        The kernel defers the unbind until the last opener closes.
        """
        _engine.release_plain(self.fd, self.minor, self._bound)
        self._bound = False
        self._autoclear = False  # released now: nothing left for close() to release

    def clear_fd_wait(self, fd: int, timeout: float, wait: float = 0.1) -> None:
        """Clear, then wait until unbound or bound to a file other than ``fd``'s.

        ``TimeoutError`` after ``timeout`` seconds. ``wait`` is accepted; the
        poll interval is at most 1 ms whatever it says.
        """
        self.clear_fd()
        st = os.fstat(fd)
        # The unbind happens at the last close (the kernel's deferred
        # LOOP_CLR_FD: see configure() in csrc/loopdev.c); our own fd counts
        # as an opener. Park it on an O_PATH handle to the same inode (not an
        # opener; works for an unlinked private node too) while waiting, then
        # reopen the device under the same fd number.
        parked = os.open(f"/proc/self/fd/{self.fd}", _native.O_PATH | os.O_CLOEXEC)
        try:
            os.dup2(parked, self.fd, inheritable=False)
            try:
                sysfs.wait_released(f"loop{self.minor}", st, timeout)
            finally:
                self._reopen(parked)
        finally:
            os.close(parked)

    def _reopen(self, parked: int) -> None:
        for _ in range(100):
            try:
                new = os.open(f"/proc/self/fd/{parked}", os.O_RDWR | os.O_CLOEXEC)
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
        raise OSError(errno.ENXIO, "device stayed in rundown", self._path)

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
        old = (info.lo_offset, info.lo_sizelimit, info.lo_flags)
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
        _engine.set_status(self.fd, self.minor, info, old)

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
        flags = _engine.flags(read_only, autoclear, partscan)
        config = _native.Config(offset or 0, sizelimit or 0, blocksize or 0, flags)
        _engine.configure(self.fd, self.minor, fd, config)
        self._autoclear = bool(autoclear)
        self._bound = True

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
        """``LOOP_SET_BLOCK_SIZE``, retrying the kernel's transient ``EAGAIN``.

        Since 5.0 (commit 5db470e229e2) it answers EAGAIN while the device's
        page cache cannot be dropped (a reader, udev): bounded, as the C side
        retries it for attach (``ioctl_retry_eagain`` in csrc/loopdev.c).
        """
        delay = 0.0002
        for _ in range(63):
            try:
                _native.ioctl(self.fd, self.LOOP_SET_BLOCK_SIZE, size, device=self._path)
                return
            except OSError as exc:
                if exc.errno != errno.EAGAIN:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        _native.ioctl(self.fd, self.LOOP_SET_BLOCK_SIZE, size, device=self._path)

    def mknod(self, dir_fd: int, mode: int = 0o600) -> None:
        """Block node ``loop{minor}`` in ``dir_fd``: a bind mount of the host's node where
        that is the device, else ``mknod``. Remove (unmount) it before release."""
        nodes.mirror_node(dir_fd, f"loop{self.minor}", sysfs.loop_devt(self.minor), mode)

    @property
    def _path(self) -> str:
        return _engine.device_path(self.minor)


def _adopt(index: int, fd: int, autoclear: bool) -> Loop:
    """A ``Loop`` around a device fd the native attach loop opened, checked and bound;
    takes ownership. Not ``Loop(...)``: its ``__init__`` opens the device."""
    lo = _new(Loop)
    lo.fd = fd
    lo.on_close = None
    lo.minor = index
    lo._autoclear = autoclear
    lo._bound = True
    return lo


# Loop.__new__ looked up on each call is a load Python 3.11 does not specialise.
_new = object.__new__


class LoopControl:
    """``loop-control`` below ``dir_fd`` (default /dev); devices are opened there too."""

    def __init__(self, dir_fd: int | None = None) -> None:
        self._control = _engine.Control(dir_fd)

    @property
    def fd(self) -> int:
        """The loop-control fd; -1 once closed."""
        return self._control.fd

    def __del__(self) -> None:
        if hasattr(self, "_control"):  # __init__ got that far
            self.close()

    def close(self) -> None:
        """Idempotent; afterwards every operation raises ``RuntimeError``."""
        self._control.close()

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
        setup: Callable[[Loop], object] | None = None,
        offset: int | None = None,
        sizelimit: int | None = None,
        blocksize: int | None = 0,
        autoclear: int | None = None,
        partscan: int | None = None,
        read_only: int | None = None,
    ) -> Loop:
        """Get a free device, bind it to ``fd`` and configure it.

        The keywords are those of :meth:`Loop.configure`, in its order (not
        keyword-only: Python looks up each missing keyword-only default in a
        dict, 610 instructions of the compat cycle). Transient kernel races are
        retried (bounded); a failure never leaves a device bound.
        """
        control = self._control
        if control.fd < 0:
            raise RuntimeError("LoopControl is closed")
        if fd < 0:
            raise ValueError(f"Invalid file descriptor '{fd}'")
        # Inline, not _engine.flags, and no | where a flag is not asked for:
        # this is the hot path (issue 17).
        flags = _AUTOCLEAR if autoclear else 0
        if read_only:
            flags |= _READ_ONLY
        if partscan:
            flags |= _PARTSCAN
        offset, sizelimit, blocksize = offset or 0, sizelimit or 0, blocksize or 0
        if setup is not None:
            config = _native.Config(offset, sizelimit, blocksize, flags)
            return self._attach_with_setup(fd, config, lock, setup)
        got = _engine.attach_plain(control, fd, flags, offset, sizelimit, blocksize, lock)
        # _adopt's work inline: a call's frame is 2 % of the cycle (issue 17).
        lo = _new(Loop)
        lo.fd = got & 0xFFFFFFFF
        lo.on_close = None
        lo.minor = got >> 32
        lo._autoclear = True if autoclear else False
        lo._bound = True
        return lo

    def _attach_with_setup(
        self, fd: int, config: _native.Config, lock: bool, setup: Callable[[Loop], object]
    ) -> Loop:
        # Apart from loop_for_fd: its closures would make cells of its variables
        # on every call, also without setup (the hot path, issue 17).
        autoclear = bool(config.flags & _AUTOCLEAR)
        current: list[Loop] = []

        def on_open(index: int, dev_fd: int) -> None:
            lo = _adopt(index, dev_fd, autoclear)
            current.append(lo)
            try:
                setup(lo)
            except BaseException:
                current.pop().close()
                raise

        def on_discard(dev_fd: int) -> None:
            current.pop().close()

        _engine.attach(self._control, fd, config, lock=lock, on_open=on_open, on_discard=on_discard)
        return current[-1]
