"""The only module that touches ``ffi``/``lib``: typed wrappers over the shim.

Every C function answers ``-errno`` on failure; here that becomes a typed
:mod:`loopdev.errors` exception carrying the device and backing paths.
"""

from __future__ import annotations

import errno
import os

from loopdev import errors
from loopdev._loopdev_ffi import ffi, lib
from loopdev.status import BYTES_FIELDS, INT_FIELDS, LoopInfo

# Not ``typing.TYPE_CHECKING``: importing typing at run time costs more than
# the rest of ``import loopdev`` together.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    OnOpen = Callable[[int, int], None]
    OnDiscard = Callable[[int], None]

LOOP_MAJOR: int = lib.LOOP_MAJOR
LO_NAME_SIZE: int = lib.LO_NAME_SIZE
LO_FLAGS_READ_ONLY: int = lib.LO_FLAGS_READ_ONLY
LO_FLAGS_AUTOCLEAR: int = lib.LO_FLAGS_AUTOCLEAR
LO_FLAGS_PARTSCAN: int = lib.LO_FLAGS_PARTSCAN
LO_FLAGS_DIRECT_IO: int = lib.LO_FLAGS_DIRECT_IO

LOOP_SET_FD: int = lib.LOOP_SET_FD
LOOP_CLR_FD: int = lib.LOOP_CLR_FD
LOOP_SET_STATUS64: int = lib.LOOP_SET_STATUS64
LOOP_GET_STATUS64: int = lib.LOOP_GET_STATUS64
LOOP_CHANGE_FD: int = lib.LOOP_CHANGE_FD
LOOP_SET_CAPACITY: int = lib.LOOP_SET_CAPACITY
LOOP_SET_DIRECT_IO: int = lib.LOOP_SET_DIRECT_IO
LOOP_SET_BLOCK_SIZE: int = lib.LOOP_SET_BLOCK_SIZE
LOOP_CONFIGURE: int = lib.LOOP_CONFIGURE
LOOP_CTL_ADD: int = lib.LOOP_CTL_ADD
LOOP_CTL_REMOVE: int = lib.LOOP_CTL_REMOVE
LOOP_CTL_GET_FREE: int = lib.LOOP_CTL_GET_FREE

BLKFLSBUF: int = lib.BLKFLSBUF
BLKSSZGET: int = lib.BLKSSZGET
BLKGETSIZE64: int = lib.BLKGETSIZE64
BLKGETDISKSEQ: int = lib.BLKGETDISKSEQ
BLKPG_ADD_PARTITION: int = lib.BLKPG_ADD_PARTITION
BLKPG_DEL_PARTITION: int = lib.BLKPG_DEL_PARTITION

DIRECT_IO_OFF, DIRECT_IO_TRY, DIRECT_IO_REQUIRED = 0, 1, 2

_STAGE_WHAT = {
    lib.LD_STAGE_CONTROL: "opening loop-control",
    lib.LD_STAGE_GET_FREE: "asking loop-control for a free device",
    lib.LD_STAGE_OPEN: "opening the loop device",
    lib.LD_STAGE_CHECK: "checking the loop device node",
    lib.LD_STAGE_LOCK: "locking the loop device",
    lib.LD_STAGE_CONFIGURE: "binding the backing file (LOOP_CONFIGURE)",
    lib.LD_STAGE_SET_FD: "binding the backing file (LOOP_SET_FD)",
    lib.LD_STAGE_SET_STATUS: "setting offset, size limit and flags (LOOP_SET_STATUS64)",
    lib.LD_STAGE_BLOCK_SIZE: "setting the logical block size (LOOP_SET_BLOCK_SIZE)",
    lib.LD_STAGE_DIRECT_IO: "enabling direct I/O (LOOP_SET_DIRECT_IO)",
    lib.LD_STAGE_VERIFY: "checking what the kernel applied",
    lib.LD_STAGE_EXHAUSTED: "finding a device to configure",
    lib.LD_STAGE_PARTITIONS: "deleting partitions a previous attachment left on the device",
}


_STAGE_ERRORS: dict[int, tuple[type[errors.LoopError], str]] = {
    lib.LD_STAGE_GET_FREE: (
        errors.NoFreeDevice,
        "no loop device is free or can be created (all in use, or max_loop reached)",
    ),
    lib.LD_STAGE_EXHAUSTED: (
        errors.DeviceBusy,
        "every free loop device was taken or busy before it could be configured; "
        "retries exhausted, try again or reduce the number of concurrent attaches",
    ),
    lib.LD_STAGE_VERIFY: (
        errors.ConfigureError,
        "the kernel did not apply the requested offset, size limit, flags or block size",
    ),
    lib.LD_STAGE_DIRECT_IO: (
        errors.BackingFileError,
        "direct I/O was required but the backing file refuses O_DIRECT; "
        "use direct_io='auto' or False",
    ),
    lib.LD_STAGE_PARTITIONS: (
        errors.DeviceBusy,
        "a partition left by a previous attachment of this device is still open; "
        "close or unmount it",
    ),
}


_CONFIGURE_STAGES = (
    lib.LD_STAGE_CONFIGURE,
    lib.LD_STAGE_SET_FD,
    lib.LD_STAGE_SET_STATUS,
    lib.LD_STAGE_BLOCK_SIZE,
)


def _fail(
    err: int, what: str, device: str | None, backing: str | None, stage: int = 0
) -> errors.LoopError:
    """Pick the typed error for ``-err`` at ``stage``, with an actionable message."""
    code = -err
    if stage in _STAGE_ERRORS:
        cls, message = _STAGE_ERRORS[stage]
        return cls(code, message, device=device, backing=backing)
    if code == errno.EBUSY:
        return errors.DeviceBusy(code, f"device busy while {what}", device=device, backing=backing)
    if stage in _CONFIGURE_STAGES and code in (
        errno.EBADF,
        errno.EINVAL,
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        return errors.ConfigureError(
            code,
            f"the kernel refused {what}: check the block size (512..4096, a power of "
            "two), the offset and size limit, and that the backing fd is a regular "
            "file or block device opened with a mode that allows the request",
            device=device,
            backing=backing,
        )
    return errors.LoopError(code, f"failed {what}", device=device, backing=backing)


def check(ret: int, what: str, device: str | None = None, backing: str | None = None) -> int:
    """Return ``ret`` when non-negative, else raise the typed error for ``-ret``."""
    if ret < 0:
        raise _fail(ret, what, device, backing)
    return ret


_IOCTL_NAMES = {
    value: name
    for name, value in list(globals().items())
    if name.startswith(("LOOP_", "BLK")) and isinstance(value, int)
}


def ioctl(fd: int, request: int, arg: int = 0, *, device: str | None = None) -> int:
    """An ioctl whose argument is an integer."""
    what = _IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    return check(lib.ld_ioctl(fd, request, arg), what, device)


def get_u64(fd: int, request: int, *, device: str | None = None) -> int:
    """An ioctl that writes a ``u64`` (``BLKGETSIZE64``, ``BLKGETDISKSEQ``)."""
    out = ffi.new("uint64_t *")
    check(lib.ld_get_u64(fd, request, out), f"ioctl {request:#x}", device)
    return int(out[0])


def logical_block_size(fd: int, *, device: str | None = None) -> int:
    """``BLKSSZGET``."""
    out = ffi.new("int *")
    check(lib.ld_get_int(fd, BLKSSZGET, out), "reading the block size", device)
    return int(out[0])


def _bytes(field: Any) -> bytes:
    return bytes(ffi.buffer(field))


def get_status(fd: int, *, device: str | None = None) -> LoopInfo:
    """``LOOP_GET_STATUS64``; ``ENXIO`` when unbound."""
    raw = ffi.new("struct loop_info64 *")
    err = lib.ld_get_status(fd, raw)
    if err < 0:
        raise OSError(-err, os.strerror(-err), device)
    info = LoopInfo()
    for name in INT_FIELDS:
        setattr(info, name, getattr(raw, name))
    for name in BYTES_FIELDS:
        setattr(info, name, _bytes(getattr(raw, name)))
    info.lo_init = (raw.lo_init[0], raw.lo_init[1])
    return info


def set_status(fd: int, info: LoopInfo, *, device: str | None = None) -> None:
    """``LOOP_SET_STATUS64``, retrying the kernel's transient ``EAGAIN``."""
    raw = ffi.new("struct loop_info64 *")
    for name in INT_FIELDS:
        setattr(raw, name, getattr(info, name))
    for name, size in BYTES_FIELDS.items():
        setattr(raw, name, getattr(info, name)[:size])
    raw.lo_init = list(info.lo_init)
    check(lib.ld_set_status(fd, raw), "setting the device status (LOOP_SET_STATUS64)", device)


class Config:
    """What to configure; ``flags`` are ``LO_FLAGS_*`` (read-only, autoclear, partscan)."""

    __slots__ = ("block_size", "direct_io", "file_name", "flags", "offset", "sizelimit")

    def __init__(
        self,
        offset: int = 0,
        sizelimit: int = 0,
        block_size: int = 0,
        flags: int = 0,
        direct_io: int = DIRECT_IO_OFF,
        file_name: str | None = None,
    ) -> None:
        self.offset = offset
        self.sizelimit = sizelimit
        self.block_size = block_size
        self.flags = flags
        self.direct_io = direct_io
        self.file_name = file_name


def _fill_config(raw: Any, config: Config, backing_fd: int) -> Any:
    """Copy ``config`` into the C struct ``raw``; returns the name buffer to keep alive.

    Without a name the shim records the backing fd's own path.
    """
    for field, value, bits in (
        ("offset", config.offset, 64),
        ("size limit", config.sizelimit, 64),
        ("block size", config.block_size, 32),
    ):
        if not 0 <= value < 1 << bits:
            raise errors.ConfigureError(
                errno.EINVAL,
                f"{field} {value} is out of range (0 to 2**{bits} - 1)",
                backing=config.file_name or _fd_path(backing_fd),
            )
    name = ffi.NULL
    if config.file_name is not None:
        name = ffi.new("char[]", os.fsencode(config.file_name))
        raw.file_name = name
    raw.offset = config.offset
    raw.sizelimit = config.sizelimit
    raw.block_size = config.block_size
    raw.flags = config.flags
    raw.direct_io = config.direct_io
    return name


def _fd_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def configure(
    dev_fd: int, backing_fd: int, config: Config, *, device: str, backing: str | None = None
) -> None:
    """Bind and configure one device; on failure nothing stays bound."""
    stage = ffi.new("int *")
    raw = ffi.new("struct ld_config *")
    _name = _fill_config(raw, config, backing_fd)
    err = lib.ld_configure(dev_fd, backing_fd, raw, stage)
    if err < 0:
        what = _STAGE_WHAT.get(stage[0], "configuring")
        raise _fail(err, what, device, backing or _fd_path(backing_fd), stage[0])


class Attached:
    """The outcome of :func:`attach`: the device fd and how many extra rounds it took."""

    __slots__ = ("fd", "minor", "retries")

    def __init__(self, minor: int, fd: int, retries: int) -> None:
        self.minor = minor
        self.fd = fd
        self.retries = retries


class _Hooks:
    __slots__ = ("error", "on_discard", "on_open")

    def __init__(self, on_open: OnOpen, on_discard: OnDiscard) -> None:
        self.on_open = on_open
        self.on_discard = on_discard
        self.error: BaseException | None = None


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ld_py_on_open(ctx: Any, minor: int, fd: int) -> int:
    hooks: _Hooks = ffi.from_handle(ctx)
    try:
        hooks.on_open(minor, fd)
    except BaseException as exc:  # handed back to the caller of attach()
        hooks.error = exc
        return -1
    return 0


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ld_py_on_discard(ctx: Any, fd: int) -> None:
    hooks: _Hooks = ffi.from_handle(ctx)
    try:
        hooks.on_discard(fd)
    except BaseException as exc:
        hooks.error = hooks.error or exc


def attach(
    ctl_fd: int,
    dev_dirfd: int,
    backing_fd: int,
    config: Config,
    *,
    lock: bool = False,
    on_open: OnOpen | None = None,
    on_discard: OnDiscard | None = None,
    max_attempts: int = 64,
    timeout: float = 30.0,
    backing: str | None = None,
) -> Attached:
    """Allocate, open, lock and configure a free device in one native call.

    With ``on_open`` the hooks own each device fd the loop opens: ``on_open``
    adopts it, ``on_discard`` closes it when that device is given up.
    """
    req = ffi.new("struct ld_attach_req *")
    res = ffi.new("struct ld_attach_res *")
    req.ctl_fd = ctl_fd
    req.dev_dirfd = dev_dirfd
    req.backing_fd = backing_fd
    req.lock = int(lock)
    req.max_attempts = max_attempts
    req.timeout_ms = int(timeout * 1000)
    _name = _fill_config(req.config, config, backing_fd)
    hooks = None
    if on_open is not None:
        if on_discard is None:
            raise ValueError("on_open needs on_discard")
        hooks = _Hooks(on_open, on_discard)
        handle = ffi.new_handle(hooks)
        req.on_open = lib.ld_py_on_open
        req.on_discard = lib.ld_py_on_discard
        req.ctx = handle
    try:
        err = lib.ld_attach(req, res)
    except BaseException:
        # A signal's exception (KeyboardInterrupt) is raised as the call
        # returns, before anyone owns the new device: release it here.
        if hooks is None and res.fd >= 0:
            lib_clear_fd(res.fd)
            os.close(res.fd)
        raise
    if hooks is not None and hooks.error is not None:
        raise hooks.error
    if err < 0:
        device = f"/dev/loop{res.minor}" if res.minor >= 0 else None
        if res.stage == lib.LD_STAGE_CHECK:
            raise errors.UnexpectedDevice(res.minor, res.rdev, res.mode)
        what = _STAGE_WHAT.get(res.stage, "attaching")
        raise _fail(err, what, device, backing or _fd_path(backing_fd), res.stage)
    return Attached(res.minor, res.fd, res.retries)


def blkpg(dev_fd: int, op: int, pno: int, start: int = 0, length: int = 0, *, device: str) -> None:
    """``BLKPG`` add or delete of partition ``pno`` (offsets in bytes)."""
    check(lib.ld_blkpg(dev_fd, op, pno, start, length), f"BLKPG on partition {pno}", device)


def delete_partitions(dev_fd: int, minor: int) -> int:
    """Delete every partition of ``loop{minor}`` (BLKPG); returns how many."""
    return check(
        lib.ld_del_partitions(dev_fd, minor, 0),
        "deleting partitions (one may be mounted or open)",
        f"/dev/loop{minor}",
    )


def lib_clear_fd(dev_fd: int) -> None:
    """``LOOP_CLR_FD`` for error paths: the failure being handled matters more."""
    lib.ld_ioctl(dev_fd, LOOP_CLR_FD, 0)


def force_fallback(on: bool) -> None:
    """Use ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` even where ``LOOP_CONFIGURE`` exists."""
    lib.ld_force_fallback(int(on))


if os.environ.get("LOOPDEV_FORCE_FALLBACK") == "1":
    force_fallback(True)
