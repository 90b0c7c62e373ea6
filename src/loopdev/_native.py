"""The only module that touches ``ffi``/``lib``: typed wrappers over the shim.

Every C function answers ``-errno`` on failure; here that becomes a typed
:mod:`loopdev.errors` exception carrying the errno, the failed call or stage
and the device and backing paths. The words and advice are ``errors``'.

Three things more than a 1:1 call are here, each because only the binding can
do it; none decides anything the caller did not ask for:

- the hook trampolines (``ld_py_on_open``, ``ld_py_on_discard``): cffi's way
  for C to call the caller's hooks, and to carry an exception a hook raised
  (or a signal's handler raised as the trampoline was entered) back over the
  C frames. They are in the request only where a caller passes
  hooks (compat ``loop_for_fd(setup=...)``): on the default path no Python
  runs from C (test_no_python_callback_from_c_on_the_default_path);
- ``_run_signal_handlers``: the attach loop lets signals in while it waits and
  answers ``LD_STAGE_INTERRUPTED`` when one came. CPython runs a signal's
  Python handler only when Python code runs, and the shim cannot call
  ``PyErr_CheckSignals`` (cffi releases the GIL around calls), so entering an
  empty Python function stands in for it. Then PEP 475's rule, as in the
  ``os`` module's wrappers: the handler raises (``KeyboardInterrupt``), or the
  call goes on, with signals blocked from its start (``resume``: the loop also
  comes back once before its first nap, for a signal Python's handler took
  while the mask was the caller's) (test_sigint_while_backing_off,
  test_sigint_in_the_first_rounds,
  test_signal_whose_handler_returns_does_not_end_the_attach);
- the release of a device bound by a call that an exception (a signal's,
  raised as the call returned) cut off from its caller (``attach``'s
  ``except``, :func:`claim`): until the binding returns the fd, no one else
  can.
"""

from __future__ import annotations

import errno
import os

from loopdev import errors
from loopdev._loopdev_ffi import ffi, lib
from loopdev._record import Record

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    OnOpen = Callable[[int, int], None]
    OnDiscard = Callable[[int], None]
    # What sysfs_info answers, in DeviceInfo's field order after name and index:
    # backing file, offset, size limit, read-only, autoclear, partscan, direct
    # I/O, logical block size, size in bytes.
    SysfsValues = tuple[str, int, int, bool, bool, bool, bool, int, int]

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
# For a pointer argument left empty (cffi takes no None there); false as a bool.
NULL: object = ffi.NULL
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
# The shim's stages by name; loopdev.errors words the failures.
_STAGES = {
    lib.LD_STAGE_GET_FREE: "get_free",
    lib.LD_STAGE_OPEN: "open",
    lib.LD_STAGE_NODE: "node",
    lib.LD_STAGE_CHECK: "check",
    lib.LD_STAGE_LOCK: "lock",
    lib.LD_STAGE_PARTITIONS: "partitions",
    lib.LD_STAGE_CONFIGURE: "configure",
    lib.LD_STAGE_SET_FD: "set_fd",
    lib.LD_STAGE_SET_STATUS: "set_status",
    lib.LD_STAGE_BLOCK_SIZE: "block_size",
    lib.LD_STAGE_DIRECT_IO: "direct_io",
    lib.LD_STAGE_VERIFY: "verify",
}


def check(ret: int, call: str, device: str | None = None, backing: str | None = None) -> int:
    """Return ``ret`` when non-negative, else raise the typed error for ``-ret``."""
    if ret < 0:
        raise errors.call_failed(-ret, call, device=device, backing=backing)
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
        raise errors.LoopError(errno.ENXIO, errors.NOT_BOUND, device=device)
    check(err, "get_status", device)
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
    check(lib.ld_set_status(fd, raw), "set_status", device)


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
        "delete_partitions",
        f"/dev/loop{index}",
    )


# Scalar in, scalar out, bound as they are (a wrapper cost more than the call):
# 0 or -errno for the device's write-back into the backing file, waited for
# (errors as fsync reports them); BLKGETDISKSEQ's value or -errno.
write_back_raw: Callable[[int], int] = lib.ld_write_back
diskseq_raw: Callable[[int], int] = lib.ld_diskseq


def crc32(data: bytes) -> int:
    """CRC-32 as ``zlib.crc32(data)`` computes it (for the GPT parser)."""
    crc: int = lib.ld_crc32(data, len(data))
    return crc


def clear_fd_quietly(dev_fd: int) -> None:
    """``LOOP_CLR_FD`` for error paths: the failure being handled matters more."""
    lib.ld_ioctl(dev_fd, LOOP_CLR_FD, 0)


def open_private(dir_fd: int, index: int, part_shift: int, *, read_only: bool = False) -> int:
    """``loop{index}`` through a node of our own below ``dir_fd``, unlinked at once."""
    flags = os.O_RDONLY if read_only else os.O_RDWR
    ret = lib.ld_open_private(dir_fd, index, part_shift, flags)
    if ret < 0:
        raise errors.stage_failed(-ret, "node", device=f"/dev/loop{index}")
    return int(ret)


def check_node(fd: int, index: int, part_shift: int) -> None:
    """``UnexpectedDevice`` unless ``fd`` is block device ``loop{index}``
    (``ld_check_node``, the check of :func:`open_device`)."""
    res = ffi.new(_ATTACH_RES)
    err = lib.ld_check_node(fd, index, part_shift, res)
    if err < 0:
        res.index = index
        res.stage = lib.LD_STAGE_CHECK
        raise _attach_error(res, err, None)


def open_device(
    dir_fd: int,
    index: int,
    part_shift: int,
    *,
    private_nodes: bool = False,
    read_only: bool = False,
    device: str,
) -> int:
    """``loop{index}`` below ``dir_fd`` opened and checked to be that block device
    (``ld_open_device``, the attach loop's own check); read-write unless ``read_only``.

    ``UnexpectedDevice`` for another node; with ``private_nodes`` a missing or
    wrong node is passed by through a private one. A failed open itself raises
    the ``OSError`` ``os.open`` would (``FileNotFoundError``, ...) for ``device``.
    """
    res = ffi.new(_ATTACH_RES)
    flags = os.O_RDONLY if read_only else os.O_RDWR
    fd = lib.ld_open_device(dir_fd, index, part_shift, private_nodes, flags, res)
    if fd >= 0:
        return int(fd)
    if res.stage == lib.LD_STAGE_OPEN:
        raise OSError(-fd, os.strerror(-fd), device)
    res.index = index
    raise _attach_error(res, fd, None)


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


def sysfs_info(name: str) -> SysfsValues | None:
    """What sysfs says of ``name`` (``loopN``), read in C; None when it is not bound."""
    raw = ffi.new("struct ld_sysfs_info *")
    err = lib.ld_sysfs_info(name.encode(), raw)
    if err == -errno.ENXIO:
        return None
    check(err, "sysfs", f"/sys/block/{name}")
    return (
        os.fsdecode(ffi.unpack(raw.backing, raw.backing_len)),
        raw.offset,
        raw.sizelimit,
        bool(raw.read_only),
        bool(raw.autoclear),
        bool(raw.partscan),
        bool(raw.direct_io),
        raw.block_size,
        raw.sectors * 512,  # sysfs counts 512-byte sectors
    )


def force_fallback(on: bool) -> None:
    """Use ``LOOP_SET_FD`` + ``LOOP_SET_STATUS64`` even where ``LOOP_CONFIGURE`` exists."""
    lib.ld_force_fallback(int(on))


# ------------------------------------------------------------------ binding


class Config(Record):
    """What to configure; ``flags`` are ``LO_FLAGS_*`` (read-only, autoclear, partscan)."""

    __slots__ = ()
    __match_args__ = ("offset", "sizelimit", "block_size", "flags", "direct_io", "file_name")

    offset: int
    sizelimit: int
    block_size: int
    flags: int
    direct_io: int
    file_name: str | None

    def __init__(
        self,
        offset: int = 0,
        sizelimit: int = 0,
        block_size: int = 0,
        flags: int = 0,
        direct_io: int = DIRECT_IO_OFF,
        file_name: str | None = None,
    ) -> None:
        self._values = (offset, sizelimit, block_size, flags, direct_io, file_name)

    def with_block_size(self, block_size: int) -> Config:
        """The same with another block size."""
        return Config(
            self.offset, self.sizelimit, block_size, self.flags, self.direct_io, self.file_name
        )


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
                backing = config.file_name or fd_path(backing_fd)
                raise errors.out_of_range(field, value, bits, backing=backing) from None
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
        backing = config.file_name or fd_path(backing_fd)
        raise errors.stage_failed(
            -err, _STAGES.get(stage[0], "bind"), device=device, backing=backing
        )


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


def _trampoline_raised(exc_type: Any, exc: BaseException, tb: Any) -> None:
    """A trampoline raised before its hook ran: a signal's handler runs as Python
    enters a function, before any try in it. Hand the exception to attach()'s
    caller like a hook's own; C gets the trampoline's ``error`` answer."""
    if tb is not None:  # cffi's rule: tb_frame is the trampoline's, with its arguments
        hooks: _Hooks = ffi.from_handle(tb.tb_frame.f_locals["ctx"])
        hooks.error = hooks.error or exc


# on_open answers -1 where the hook raised (and closed the fd), -2 where it
# never ran (the fd is C's to close).
@ffi.def_extern(error=-2, onerror=_trampoline_raised)  # type: ignore[untyped-decorator]
def ld_py_on_open(ctx: Any, index: int, fd: int) -> int:
    hooks: _Hooks = ffi.from_handle(ctx)
    try:
        hooks.on_open(index, fd)
    except BaseException as exc:  # handed back to the caller of attach()
        hooks.error = exc
        return -1
    return 0


# -1 where the hook raised, or never ran (the fd then stays with the object its
# on_open made, compat's Loop, which closes it when dropped): the attach stops.
@ffi.def_extern(error=-1, onerror=_trampoline_raised)  # type: ignore[untyped-decorator]
def ld_py_on_discard(ctx: Any, fd: int) -> int:
    hooks: _Hooks = ffi.from_handle(ctx)
    try:
        hooks.on_discard(fd)
    except BaseException as exc:
        hooks.error = hooks.error or exc
        return -1
    return 0


def _run_signal_handlers() -> None:
    """Entering a Python function runs pending signal handlers (CPython checks its
    eval breaker there); returning from a C call does not."""


def _attach_error(res: Any, err: int, backing: str | None) -> errors.LoopError:
    device = f"/dev/loop{res.index}" if res.index >= 0 else None
    stage = _STAGES.get(res.stage, "attach")
    if res.exhausted:
        return errors.retries_exhausted(-err, stage, device=device, backing=backing)
    if stage == "check" and err == -errno.ENODEV:
        return errors.UnexpectedDevice(res.index, res.rdev, res.mode)
    return errors.stage_failed(-err, stage, device=device, backing=backing)


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
    res.fd = -1  # zero-filled reads as fd 0: a signal before the call must not close stdin
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
        # Interrupted (or back before its first nap), nothing bound: run the
        # signals' handlers, which raise (KeyboardInterrupt) or let us go on,
        # with signals blocked from the start of the next call.
        while res.stage == lib.LD_STAGE_INTERRUPTED:
            _run_signal_handlers()
            req.resume = 1
            err = lib.ld_attach(req, res)
    except BaseException:
        # A signal's exception raised as the call returned, before anyone
        # owns the new device: release it here.
        if hooks is None and res.fd >= 0:
            clear_fd_quietly(res.fd)
            os.close(res.fd)
        raise
    if hooks is not None and hooks.error is not None:
        raise hooks.error  # a hook that raised stopped the attach: nothing is bound
    if err < 0:
        raise _attach_error(res, err, config.file_name or fd_path(backing_fd))
    return Attached(res.index, res.fd, res.retries)


def plain_request(ctl_fd: int, dev_dirfd: int, private_nodes: bool, part_shift: int) -> object:
    """What stays the same from one ``attach_plain_raw`` call to the next, filled once
    per control: passed as one argument instead of four (issue 17)."""
    req = ffi.new(_ATTACH_REQ)
    req.ctl_fd = ctl_fd
    req.dev_dirfd = dev_dirfd
    req.private_nodes = private_nodes
    req.part_shift = part_shift
    req.max_attempts = 64
    req.timeout_ms = 30000
    return req


# The compat cycle's two C calls, bound as they are: a Python wrapper around
# each cost more than the call itself (issue 17). The caller passes a
# plain_request, ints and a token (see claim), and hands a negative answer
# to attach_plain_failed or release_failed.
attach_plain_raw: Callable[[object, int, int, int, int, int, bool, int, object, int], int]
attach_plain_raw = lib.ld_attach_plain
# The same without offset, size limit, block size and lock: each argument cffi
# converts costs about 90 instructions (issue 17).
attach_flags_raw: Callable[[object, int, int, int], int] = lib.ld_attach_flags
release_raw: Callable[[int, int, bool], int] = lib.ld_release


def claim(token: int) -> None:
    """After an exception around ``attach_plain_raw(..., token)``: release the device
    that call bound, if it ran and bound one (a signal's handler raised as the call
    returned, before the caller took the result). Per thread; a call that never ran
    left another token behind, and nothing is released."""
    fd = lib.ld_claim(token)
    if fd >= 0:
        clear_fd_quietly(fd)
        os.close(fd)


def out_of_range(config: Config, backing_fd: int) -> errors.LoopError | None:
    """The error for an offset, size limit or block size that overflowed its C type;
    None when none did (another argument overflowed: the OverflowError stands)."""
    try:
        _fill_config(ffi.new("struct ld_config *"), config, backing_fd)
    except errors.LoopError as exc:
        return exc
    return None


def attach_plain_failed(err: int, backing_fd: int, file_name: str | None = None) -> bool:
    """For ``attach_plain_raw``'s negative answer: True when a signal interrupted the
    wait and its handler let us go on (call again: nothing is bound); else raises the
    typed error."""
    res = ffi.new(_ATTACH_RES)
    lib.ld_last_res(res)
    if res.stage != lib.LD_STAGE_INTERRUPTED:
        raise _attach_error(res, err, file_name or fd_path(backing_fd))
    _run_signal_handlers()  # raises (KeyboardInterrupt) or lets us go on
    return True


def release_failed(err: int, index: int) -> errors.LoopError:
    """The error for ``release_raw``'s negative answer."""
    call = "delete_partitions" if lib.ld_last_stage() else "LOOP_CLR_FD"
    return errors.call_failed(-err, call, device=f"/dev/loop{index}")


lib.ld_init()
if os.environ.get("LOOPDEV_FORCE_FALLBACK") == "1":
    force_fallback(True)
