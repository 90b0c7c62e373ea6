"""The only module that touches ``ffi``/``lib``: typed wrappers over the shim.

Every C function answers ``-errno`` on failure; here that becomes a typed
:mod:`loopdev.errors` exception carrying the device and backing paths.
"""

from __future__ import annotations

import errno
import os

from loopdev import errors
from loopdev._loopdev_ffi import ffi, lib

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    OnOpen = Callable[[int, int], None]
    OnDiscard = Callable[[int], None]

LOOP_MAJOR: int = lib.LOOP_MAJOR
BLOCK_EXT_MAJOR: int = lib.BLOCK_EXT_MAJOR  # partitions past max_part get minors here
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
BLKROGET: int = lib.BLKROGET
BLKSSZGET: int = lib.BLKSSZGET
BLKGETSIZE64: int = lib.BLKGETSIZE64
BLKGETDISKSEQ: int = lib.BLKGETDISKSEQ
BLKPG_ADD_PARTITION: int = lib.BLKPG_ADD_PARTITION
BLKPG_DEL_PARTITION: int = lib.BLKPG_DEL_PARTITION
FS_IOC_GETFLAGS: int = lib.FS_IOC_GETFLAGS
FS_APPEND_FL: int = lib.FS_APPEND_FL
FS_IMMUTABLE_FL: int = lib.FS_IMMUTABLE_FL

# os.O_PATH is missing on PyPy: the C library's value.
O_PATH: int = lib.O_PATH

DIRECT_IO_OFF, DIRECT_IO_TRY, DIRECT_IO_REQUIRED = 0, 1, 2

# Names for error messages, for the requests Python issues itself.
_IOCTL_NAMES = {
    LOOP_SET_FD: "LOOP_SET_FD",
    LOOP_CLR_FD: "LOOP_CLR_FD",
    LOOP_SET_STATUS64: "LOOP_SET_STATUS64",
    LOOP_GET_STATUS64: "LOOP_GET_STATUS64",
    LOOP_CHANGE_FD: "LOOP_CHANGE_FD",
    LOOP_SET_CAPACITY: "LOOP_SET_CAPACITY",
    LOOP_SET_DIRECT_IO: "LOOP_SET_DIRECT_IO",
    LOOP_SET_BLOCK_SIZE: "LOOP_SET_BLOCK_SIZE",
    LOOP_CONFIGURE: "LOOP_CONFIGURE",
    LOOP_CTL_ADD: "LOOP_CTL_ADD",
    LOOP_CTL_REMOVE: "LOOP_CTL_REMOVE",
    LOOP_CTL_GET_FREE: "LOOP_CTL_GET_FREE",
    BLKFLSBUF: "BLKFLSBUF",
    BLKROGET: "BLKROGET",
    BLKSSZGET: "BLKSSZGET",
    BLKGETSIZE64: "BLKGETSIZE64",
    BLKGETDISKSEQ: "BLKGETDISKSEQ",
}


# --------------------------------------------------------------- loop_info64

_INFO = ffi.typeof("struct loop_info64")
INT_FIELDS = tuple(name for name, f in _INFO.fields if f.type.kind == "primitive")
BYTES_FIELDS = {
    name: ffi.sizeof(f.type)
    for name, f in _INFO.fields
    if f.type.kind == "array" and f.type.item.cname == "unsigned char"
}
_LO_INIT_LEN = ffi.sizeof(_INFO.fields[-1][1].type) // ffi.sizeof("unsigned long long")


class LoopInfo:
    """``struct loop_info64``; a new one is all zeros. Byte fields are ``bytes``."""

    __slots__ = (*INT_FIELDS, *BYTES_FIELDS, "lo_init")

    lo_device: int
    lo_inode: int
    lo_rdevice: int
    lo_offset: int
    lo_sizelimit: int
    lo_number: int
    lo_encrypt_type: int
    lo_encrypt_key_size: int
    lo_flags: int
    lo_file_name: bytes
    lo_crypt_name: bytes
    lo_encrypt_key: bytes
    lo_init: tuple[int, ...]

    def __init__(self) -> None:
        for name in INT_FIELDS:
            setattr(self, name, 0)
        for name, size in BYTES_FIELDS.items():
            setattr(self, name, bytes(size))
        self.lo_init = (0,) * _LO_INIT_LEN

    @property
    def autoclear(self) -> bool:
        """Whether ``LO_FLAGS_AUTOCLEAR`` is set."""
        return bool(self.lo_flags & LO_FLAGS_AUTOCLEAR)

    def is_bound_to(self, st: os.stat_result) -> bool:
        """Same ``st_dev`` and ``st_ino`` as the backing file."""
        return self.lo_device == st.st_dev and self.lo_inode == st.st_ino

    @property
    def file_name(self) -> str:
        """``lo_file_name`` decoded; cut at 64 bytes by the kernel."""
        return os.fsdecode(self.lo_file_name.split(b"\0", 1)[0])

    def __repr__(self) -> str:
        return (
            f"LoopInfo(lo_offset={self.lo_offset}, lo_sizelimit={self.lo_sizelimit}, "
            f"lo_flags={self.lo_flags:#x}, lo_file_name={self.file_name!r})"
        )


# -------------------------------------------------------------------- errors

_STAGE_WHAT = {
    lib.LD_STAGE_GET_FREE: "asking loop-control for a free device",
    lib.LD_STAGE_OPEN: "opening the loop device",
    lib.LD_STAGE_NODE: "making a private device node",
    lib.LD_STAGE_CHECK: "checking the loop device node",
    lib.LD_STAGE_LOCK: "locking the loop device",
    lib.LD_STAGE_PARTITIONS: "deleting partitions a previous attachment left on the device",
    lib.LD_STAGE_CONFIGURE: "binding the backing file (LOOP_CONFIGURE)",
    lib.LD_STAGE_SET_FD: "binding the backing file (LOOP_SET_FD)",
    lib.LD_STAGE_SET_STATUS: "setting offset, size limit and flags (LOOP_SET_STATUS64)",
    lib.LD_STAGE_BLOCK_SIZE: "setting the logical block size (LOOP_SET_BLOCK_SIZE)",
    lib.LD_STAGE_DIRECT_IO: "enabling direct I/O (LOOP_SET_DIRECT_IO)",
    lib.LD_STAGE_VERIFY: "checking what the kernel applied",
}

# What the last race seen means when the retries ran out.
_EXHAUSTED_WHY = {
    lib.LD_STAGE_OPEN: "every free device was being released or removed by another "
    "process when we opened it",
    lib.LD_STAGE_LOCK: "every free device was locked (flock) by another process",
    lib.LD_STAGE_PARTITIONS: "every free device had a partition of an earlier attachment "
    "still open",
    lib.LD_STAGE_CONFIGURE: "every free device was bound by another process, or still held "
    "by its last user, before we could configure it",
    lib.LD_STAGE_SET_FD: "every free device was bound by another process, or still held "
    "by its last user, before we could configure it",
}

_STAGE_ERRORS: dict[int, tuple[type[errors.LoopError], str]] = {
    lib.LD_STAGE_GET_FREE: (
        errors.NoFreeDevice,
        "no loop device is free or can be created (all in use, or max_loop reached)",
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

_NODE_FIX = {
    errno.EPERM: "making a device node needs CAP_MKNOD; in a container run with --privileged, "
    "or mount devtmpfs on /dev (-v /dev:/dev)",
    errno.EROFS: "/dev is read-only; mount devtmpfs on /dev (-v /dev:/dev) or make /dev writable",
    errno.EACCES: "device nodes are not usable there (nodev mount or no permission); "
    "mount devtmpfs on /dev (-v /dev:/dev)",
}

_CONFIGURE_STAGES = (
    lib.LD_STAGE_CONFIGURE,
    lib.LD_STAGE_SET_FD,
    lib.LD_STAGE_SET_STATUS,
    lib.LD_STAGE_BLOCK_SIZE,
)
_REFUSED = (errno.EBADF, errno.EINVAL, errno.EACCES, errno.EPERM, errno.EROFS)


def _fail(
    err: int, what: str, device: str | None, backing: str | None, stage: int = 0
) -> errors.LoopError:
    """Pick the typed error for ``-err`` at ``stage``, with an actionable message."""
    code = -err
    if stage in _STAGE_ERRORS:
        cls, message = _STAGE_ERRORS[stage]
        return cls(code, message, device=device, backing=backing)
    if stage == lib.LD_STAGE_NODE:
        fix = _NODE_FIX.get(code, "mount devtmpfs on /dev (-v /dev:/dev)")
        return errors.DeviceNodeError(
            code,
            f"/dev has no usable node for the device and loopdev cannot make one: {fix}",
            device=device,
        )
    if stage == lib.LD_STAGE_OPEN and code in (errno.EPERM, errno.EACCES):
        return errors.DeviceNodeError(
            code,
            "opening the loop device was refused (a container's device cgroup?): allow block "
            "devices 7:* and 259:* (docker --device-cgroup-rule 'b 7:* rmw' --device-cgroup-rule "
            "'b 259:* rmw') or run with --privileged",
            device=device,
        )
    if stage == lib.LD_STAGE_OPEN and code == errno.ENOENT:
        return errors.DeviceNodeError(
            code, "no device node for the device in the device directory", device=device
        )
    if code == errno.EBUSY:
        return errors.DeviceBusy(code, f"device busy while {what}", device=device, backing=backing)
    if stage in _CONFIGURE_STAGES and code in _REFUSED:
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


# -------------------------------------------------------------------- ioctls


def ioctl(fd: int, request: int, arg: int = 0, *, device: str | None = None) -> int:
    """An ioctl whose argument is an integer."""
    what = _IOCTL_NAMES.get(request, f"ioctl {request:#x}")
    return check(lib.ld_ioctl(fd, request, arg), what, device)


def get_u64(fd: int, request: int, *, device: str | None = None) -> int:
    """An ioctl that writes a ``u64`` (``BLKGETSIZE64``, ``BLKGETDISKSEQ``)."""
    out = ffi.new("uint64_t *")
    check(lib.ld_get_u64(fd, request, out), _IOCTL_NAMES.get(request, "ioctl"), device)
    return int(out[0])


def get_int(fd: int, request: int, *, device: str | None = None) -> int:
    """An ioctl that writes an ``int`` (``BLKSSZGET``, ``BLKROGET``)."""
    out = ffi.new("int *")
    check(lib.ld_get_int(fd, request, out), _IOCTL_NAMES.get(request, "ioctl"), device)
    return int(out[0])


def logical_block_size(fd: int, *, device: str | None = None) -> int:
    """``BLKSSZGET``."""
    return get_int(fd, BLKSSZGET, device=device)


def get_status(fd: int, *, device: str | None = None) -> LoopInfo:
    """``LOOP_GET_STATUS64``; ``LoopError(ENXIO)`` when unbound."""
    raw = ffi.new("struct loop_info64 *")
    err = lib.ld_get_status(fd, raw)
    if err == -errno.ENXIO:
        raise errors.LoopError(errno.ENXIO, "device is not bound", device=device)
    check(err, "reading the device status (LOOP_GET_STATUS64)", device)
    info = LoopInfo()
    for name in INT_FIELDS:
        setattr(info, name, getattr(raw, name))
    for name in BYTES_FIELDS:
        setattr(info, name, bytes(ffi.buffer(getattr(raw, name))))
    info.lo_init = tuple(raw.lo_init)
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


def blkpg(dev_fd: int, op: int, pno: int, start: int = 0, length: int = 0, *, device: str) -> None:
    """``BLKPG`` add or delete of partition ``pno`` (offsets in bytes)."""
    check(lib.ld_blkpg(dev_fd, op, pno, start, length), f"BLKPG on partition {pno}", device)


def delete_partitions(dev_fd: int, index: int, *, bound: bool = False) -> int:
    """Delete every partition of ``loop{index}`` (BLKPG), or none if one is open.

    ``bound``: the caller knows the device is bound (it attached it), which
    spares asking the kernel where the device has no partitions.
    """
    return check(
        lib.ld_del_partitions(dev_fd, index, 1 if bound else -1),
        "deleting partitions (one may be mounted or open)",
        f"/dev/loop{index}",
    )


def write_back(dev_fd: int) -> None:
    """Write what was written through the device into the backing file and wait;
    ``OSError`` with the write-back's errno (as ``fsync`` reports it)."""
    err = lib.ld_write_back(dev_fd)
    if err < 0:
        raise OSError(-err, os.strerror(-err))


def clear_fd_quietly(dev_fd: int) -> None:
    """``LOOP_CLR_FD`` for error paths: the failure being handled matters more."""
    lib.ld_ioctl(dev_fd, LOOP_CLR_FD, 0)


def open_private(dir_fd: int, index: int, part_shift: int) -> int:
    """``loop{index}`` through a node of our own below ``dir_fd``, unlinked at once."""
    ret = lib.ld_open_private(dir_fd, index, part_shift)
    if ret < 0:
        raise _fail(
            ret, _STAGE_WHAT[lib.LD_STAGE_NODE], f"/dev/loop{index}", None, lib.LD_STAGE_NODE
        )
    return int(ret)


def bind_mount(source: str, target: str) -> None:
    """``mount --bind SOURCE TARGET``, in-process."""
    err = lib.ld_bind_mount(os.fsencode(source), os.fsencode(target))
    if err < 0:
        raise OSError(-err, os.strerror(-err), source, None, target)


def unmount(target: str) -> None:
    """Lazy unmount of ``target``."""
    err = lib.ld_unmount(os.fsencode(target))
    if err < 0:
        raise OSError(-err, os.strerror(-err), target)


class SysfsInfo:
    """One bound device as sysfs describes it (see ``struct ld_sysfs_info``)."""

    __slots__ = (
        "autoclear",
        "backing",
        "block_size",
        "direct_io",
        "offset",
        "partscan",
        "read_only",
        "size",
        "sizelimit",
    )

    def __init__(self, raw: Any) -> None:
        self.backing = os.fsdecode(ffi.unpack(raw.backing, raw.backing_len))
        self.offset: int = raw.offset
        self.sizelimit: int = raw.sizelimit
        self.size: int = raw.sectors * 512  # sysfs counts 512-byte sectors
        self.read_only = bool(raw.read_only)
        self.autoclear = bool(raw.autoclear)
        self.partscan = bool(raw.partscan)
        self.direct_io = bool(raw.direct_io)
        self.block_size: int = raw.block_size


def sysfs_info(name: str) -> SysfsInfo | None:
    """What sysfs says of ``name`` (``loopN``), read in C; None when it is not bound."""
    raw = ffi.new("struct ld_sysfs_info *")
    err = lib.ld_sysfs_info(name.encode(), raw)
    if err == -errno.ENXIO:
        return None
    check(err, "reading sysfs", f"/sys/block/{name}")
    return SysfsInfo(raw)


def force_fallback(on: bool) -> None:
    """Use ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` even where ``LOOP_CONFIGURE`` exists."""
    lib.ld_force_fallback(int(on))


# ------------------------------------------------------------------ binding


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
    try:
        raw.offset = config.offset
        raw.sizelimit = config.sizelimit
        raw.block_size = config.block_size
    except OverflowError:
        for field, value, bits in (
            ("offset", config.offset, 64),
            ("size limit", config.sizelimit, 64),
            ("block size", config.block_size, 32),
        ):
            if not 0 <= value < 1 << bits:
                raise errors.ConfigureError(
                    errno.EINVAL,
                    f"{field} {value} is out of range (0 to 2**{bits} - 1)",
                    backing=config.file_name or fd_path(backing_fd),
                ) from None
        raise
    raw.flags = config.flags
    raw.direct_io = config.direct_io
    if config.file_name is None:
        return None
    name = ffi.new("char[]", os.fsencode(config.file_name))
    raw.file_name = name
    return name


def fd_path(fd: int) -> str | None:
    """What ``/proc/self/fd/N`` says the fd is, for messages."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


def bind(dev_fd: int, index: int, backing_fd: int, config: Config, *, device: str) -> None:
    """Delete stale partitions, bind and configure one open device; on failure nothing
    stays bound."""
    stage = ffi.new("int *")
    raw = ffi.new("struct ld_config *")
    _name = _fill_config(raw, config, backing_fd)
    err = lib.ld_bind(dev_fd, index, backing_fd, raw, stage)
    if err < 0:
        what = _STAGE_WHAT.get(stage[0], "configuring")
        raise _fail(err, what, device, config.file_name or fd_path(backing_fd), stage[0])


# Parsed once: ffi.new() of a C type name looks the name up on every call.
_ATTACH_REQ = ffi.typeof("struct ld_attach_req *")
_ATTACH_RES = ffi.typeof("struct ld_attach_res *")


class Attached:
    """The outcome of :func:`attach`: the device fd and how many extra rounds it took."""

    __slots__ = ("fd", "index", "retries")

    def __init__(self, index: int, fd: int, retries: int) -> None:
        self.index = index
        self.fd = fd
        self.retries = retries


class _Hooks:
    __slots__ = ("error", "on_discard", "on_open")

    def __init__(self, on_open: OnOpen, on_discard: OnDiscard) -> None:
        self.on_open = on_open
        self.on_discard = on_discard
        self.error: BaseException | None = None


@ffi.def_extern()  # type: ignore[untyped-decorator]
def ld_py_on_open(ctx: Any, index: int, fd: int) -> int:
    hooks: _Hooks = ffi.from_handle(ctx)
    try:
        hooks.on_open(index, fd)
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


def _run_signal_handlers() -> None:
    """Entering a Python function runs pending signal handlers (CPython checks its
    eval breaker there); returning from a C call does not."""


def _attach_error(res: Any, err: int, backing: str | None) -> errors.LoopError:
    device = f"/dev/loop{res.index}" if res.index >= 0 else None
    if res.exhausted:
        why = _EXHAUSTED_WHY.get(res.stage, f"the last attempt failed {_STAGE_WHAT[res.stage]}")
        return errors.DeviceBusy(
            -err,
            f"{why}; retries exhausted, try again or reduce the number of concurrent attaches",
            device=device,
            backing=backing,
        )
    if res.stage == lib.LD_STAGE_CHECK and err == -errno.ENODEV:
        return errors.UnexpectedDevice(res.index, res.rdev, res.mode)
    return _fail(err, _STAGE_WHAT.get(res.stage, "attaching"), device, backing, res.stage)


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
    private_nodes: bool = False,
    part_shift: int = 0,
) -> Attached:
    """Allocate, open, lock and configure a free device in one native call.

    With ``on_open`` the hooks own each device fd the loop opens: ``on_open``
    adopts it, ``on_discard`` closes it when that device is given up. A
    signal that arrives while the loop waits runs its Python handler; if that
    raises (``KeyboardInterrupt``), nothing is bound.
    """
    req = ffi.new(_ATTACH_REQ)
    res = ffi.new(_ATTACH_RES)
    req.ctl_fd = ctl_fd
    req.dev_dirfd = dev_dirfd
    req.private_nodes = private_nodes
    req.part_shift = part_shift
    req.backing_fd = backing_fd
    req.lock = lock
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
        # Interrupted while waiting, nothing bound: run the signal's handler,
        # which raises (KeyboardInterrupt) or lets us go on.
        while res.stage == lib.LD_STAGE_INTERRUPTED:
            _run_signal_handlers()
            err = lib.ld_attach(req, res)
    except BaseException:
        # A signal's exception raised as the call returned, before anyone
        # owns the new device: release it here.
        if hooks is None and res.fd >= 0:
            clear_fd_quietly(res.fd)
            os.close(res.fd)
        raise
    if hooks is not None and hooks.error is not None:
        raise hooks.error
    if err < 0:
        raise _attach_error(res, err, config.file_name or fd_path(backing_fd))
    return Attached(res.index, res.fd, res.retries)


lib.ld_init()
if os.environ.get("LOOPDEV_FORCE_FALLBACK") == "1":
    force_fallback(True)
