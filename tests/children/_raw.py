"""A loop device bound with bare ioctls, as an allocator that is not loopdev does it.

Numbers and the ``struct loop_config`` layout come from loopdev's CFFI binding, which
the C compiler filled in from <linux/loop.h>.
"""

from __future__ import annotations

import errno
import fcntl
import os

from loopdev._loopdev_ffi import ffi, lib


def loop_config(backing_fd: int, flags: int = 0, file_name: bytes = b"") -> bytes:
    """``struct loop_config`` for ``LOOP_CONFIGURE``: ``flags`` are ``LO_FLAGS_*``."""
    cfg = ffi.new("struct loop_config *")
    cfg.fd = backing_fd
    cfg.info.lo_flags = flags
    cfg.info.lo_file_name = file_name[: lib.LO_NAME_SIZE - 1]
    return bytes(ffi.buffer(cfg))


def get_free(ctl: int) -> int:
    """``LOOP_CTL_GET_FREE``, without the loop-control lock loopdev takes."""
    return fcntl.ioctl(ctl, lib.LOOP_CTL_GET_FREE)


def configure(dev_fd: int, config: bytes) -> None:
    fcntl.ioctl(dev_fd, lib.LOOP_CONFIGURE, config)


def open_free(ctl: int) -> tuple[int, int] | None:
    """The minor GET_FREE names and an fd of its node; None when it cannot be opened
    (another allocator took it and let it go meanwhile)."""
    minor = get_free(ctl)
    try:
        return minor, os.open(f"/dev/loop{minor}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None


def configured(dev_fd: int, config: bytes) -> bool:
    """``LOOP_CONFIGURE``; False when another allocator bound the device first (EBUSY)."""
    try:
        configure(dev_fd, config)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        return False
    return True


def open_control() -> int:
    return os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
