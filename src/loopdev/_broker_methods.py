"""The broker's methods: one plain handler each, behind the table ``HANDLERS``.

A handler gets the broker's state (``Service``), the call (``Call``: who,
on which connection, with which descriptors) and its parameters, already
checked against the interface; it returns the reply's parameters and the
descriptors to send, or raises ``Refusal`` / ``OSError`` for an error reply.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

import loopdev
from loopdev import _native, _varlink, nodes, sysfs
from loopdev._broker_grant import Grant, NodeDir
from loopdev._broker_ledger import Draining, Ledger, Owned, Peer, Policy
from loopdev._interface import METHODS, NAME, TEXT, Refusal
from loopdev._varlink import JsonObject
from loopdev.errors import BackingFileError, DeviceBusy
from loopdev.partitions import PartitionDevice

MAX_DETACH_TIMEOUT = 10.0
SCM_MAX_FD = _varlink.SCM_MAX_FD  # descriptors in one message: the device and 252 partitions

Reply = tuple[JsonObject, list[int]]


@dataclass(frozen=True)
class Service:
    """What every handler works with."""

    policy: Policy
    ledger: Ledger
    nodes: NodeDir


@dataclass(frozen=True)
class Call:
    """One call: the connection, its peer, the message's descriptors, and notes for the log."""

    conn: int
    peer: Peer
    fds: list[int]
    detail: list[str]


T = TypeVar("T")


def _get(params: JsonObject, name: str, kind: type[T]) -> T | None:
    """A parameter the schema checked already: of ``kind``, or None where optional."""
    value = params[name]
    if value is None or isinstance(value, kind):
        return value
    raise AssertionError(f"{name} passed the schema as {type(value).__name__}")


def _number(params: JsonObject, name: str) -> float | None:
    """A "float" parameter, which JSON may carry as an integer."""
    value = params[name]
    return float(value) if isinstance(value, (int, float)) else None


# --- io.loopdev ---------------------------------------------------------------------


def attach(svc: Service, call: Call, params: JsonObject) -> Reply:
    index = _get(params, "file", int) or 0
    if not 0 <= index < len(call.fds):
        raise _varlink.InvalidParameter("file", f"no descriptor {index} in this message")
    fd = call.fds[index]
    st, fd_read_only = check_backing(fd, svc.policy)
    call.detail.append(f"file={os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}")
    read_only = bool(_get(params, "read_only", bool)) or fd_read_only
    partscan = bool(_get(params, "partscan", bool))
    dio = _get(params, "direct_io", bool)
    direct_io: bool | Literal["auto"] = "auto" if dio is None else dio
    svc.ledger.reserve(call.peer.uid)
    try:
        dev = loopdev.attach(
            fd,
            read_only=read_only,
            partscan=partscan,
            offset=_get(params, "offset", int) or 0,
            sizelimit=_get(params, "sizelimit", int) or 0,
            block_size=_get(params, "block_size", int),
            direct_io=direct_io,
            autoclear=True,  # released by the kernel whatever happens to us
        )
    except BaseException:
        svc.ledger.unreserve(call.peer.uid)
        raise
    call.detail.append(f"device={dev.name}{' ro' if read_only else ''}")
    grant = Grant(read_only)
    owned = Owned(dev, call.peer, call.conn, read_only, partscan, grant)
    handed: list[int] = []
    try:
        device, parts = device_json(owned, fd_index=0)
        if 1 + len(parts) > SCM_MAX_FD:
            raise Refusal(
                f"{NAME}.LimitReached",
                limit="descriptors",
                max=SCM_MAX_FD,
                message=f"{dev.name} has {len(parts)} partitions; a reply carries at most "
                f"{SCM_MAX_FD} descriptors: the device and {SCM_MAX_FD - 1} partitions",
            )
        handed.append(svc.nodes.hand_over(os.fstat(dev.fd).st_rdev, dev.name, grant))
        for part in parts:
            rdev = os.makedev(part.major, part.minor)
            handed.append(svc.nodes.hand_over(rdev, part.name, grant))
        grant.hold_partitions()
    except BaseException:
        _varlink.close_fds(handed)
        release(svc, owned, svc.ledger.drop(owned))
        raise
    svc.ledger.record(owned)
    return {"device": device}, handed


def detach(svc: Service, call: Call, params: JsonObject) -> Reply:
    name = _get(params, "name", str) or ""
    asked = _number(params, "timeout")
    timeout = MAX_DETACH_TIMEOUT if asked is None else min(max(asked, 0.0), MAX_DETACH_TIMEOUT)
    call.detail.append(f"device={name}")
    owned, entry = svc.ledger.take(name, call.conn)
    dev = owned.dev
    owned.grant.revoke()  # before the minor can be bound again
    try:
        owned.grant.drop_partitions()  # or DeviceBusy: deleting some would renumber them
        dev.detach(timeout=timeout)
    except DeviceBusy:
        if dev.fd >= 0:
            # A partition is held: the device stays the client's.
            try:
                lost = owned.grant.restore()
            except BaseException:
                release(svc, owned, entry)
                raise
            if lost:
                call.detail.append(f"renumbered={','.join(lost)}")
            svc.ledger.give_back(owned, entry)
            raise
        release(svc, owned, entry)  # cleared; counted until the holder lets go
        raise
    except OSError:
        release(svc, owned, entry)
        raise
    owned.grant.close()
    svc.ledger.forget(entry)
    return {}, []


def list_devices(svc: Service, call: Call, params: JsonObject) -> Reply:
    return {"devices": [device_json(o)[0] for o in svc.ledger.of_uid(call.peer.uid)]}, []


# --- org.varlink.service --------------------------------------------------------------


def get_info(svc: Service, call: Call, params: JsonObject) -> Reply:
    return {
        "vendor": "loopdev",
        "product": "loopdev broker",
        "version": loopdev.__version__,
        "url": "https://pypi.org/project/loopdev/",
        "interfaces": ["org.varlink.service", NAME],
    }, []


def get_interface_description(svc: Service, call: Call, params: JsonObject) -> Reply:
    interface = _get(params, "interface", str)
    if interface != NAME:
        raise Refusal(_varlink.INTERFACE_NOT_FOUND, interface=interface)
    return {"description": TEXT}, []


Handler = Callable[[Service, Call, JsonObject], Reply]

# Each method with its parameters and its handler; io.loopdev's parameters
# come from the interface file.
HANDLERS: dict[str, tuple[_varlink.Schema, Handler]] = {
    f"{NAME}.Attach": (METHODS[f"{NAME}.Attach"], attach),
    f"{NAME}.Detach": (METHODS[f"{NAME}.Detach"], detach),
    f"{NAME}.List": (METHODS[f"{NAME}.List"], list_devices),
    "org.varlink.service.GetInfo": ({}, get_info),
    "org.varlink.service.GetInterfaceDescription": (
        {"interface": ("string", False)},
        get_interface_description,
    ),
}


# --- shared by the handlers and the connection's end ----------------------------------


def release(svc: Service, owned: Owned, entry: Draining) -> str:
    """Detach a device already let go of; what happened, in one word.

    A client's descriptors may outlive its connection (a child holds them,
    or the kernel is still closing a killed process's files): then the
    device is cleared and our descriptor closed, so autoclear releases it
    at the holder's last close, and ``entry`` keeps it counted against its
    owner until then.
    """
    dev = owned.dev
    owned.grant.close()  # before the minor can be bound again
    if dev.fd >= 0:
        try:
            dev.detach(timeout=0.0)
        except OSError:
            # DeviceBusy (a partition held, or another holder), or the
            # client cleared it with its own descriptor: close ours.
            dev.close()
    if entry.still_bound():
        return "pending"
    svc.ledger.forget(entry)
    return "released"


def device_json(
    owned: Owned, fd_index: int | None = None
) -> tuple[JsonObject, list[PartitionDevice]]:
    """The Device object of the interface, and the partitions it lists.

    ``fd_index`` (Attach): the caller's thread alone uses the device yet, so
    its descriptor gives the size; List reads sysfs, as another connection's
    thread may be closing that descriptor.
    """
    dev = owned.dev
    # Partitions are handed over where the client asked for partscan. (A
    # client that sets LO_FLAGS_PARTSCAN itself with LOOP_SET_STATUS gets
    # kernel-scanned partitions it cannot open; detach deletes them.)
    parts = dev.partitions if owned.partscan else []
    if fd_index is not None:
        size = os.lseek(dev.fd, 0, os.SEEK_END)
    else:
        try:
            size = sysfs.read_int(dev.name, "size") * 512
        except (OSError, ValueError):
            size = 0
    device: JsonObject = {
        "name": dev.name,
        "diskseq": dev.diskseq,
        "read_only": owned.read_only,
        "size": size,
        "owner_pid": owned.peer.pid,
        "fd": fd_index,
        "partitions": [
            {
                "number": p.number,
                "name": p.name,
                "start": p.start,
                "size": p.size,
                "major": p.major,
                "minor": p.minor,
                "fd": None if fd_index is None else fd_index + 1 + i,
            }
            for i, p in enumerate(parts)
        ],
    }
    return device, parts


def check_backing(fd: int, policy: Policy) -> tuple[os.stat_result, bool]:
    """The file's stat and whether its access mode forces read-only.

    ``BackingFileError`` for a descriptor of the wrong kind, as ``attach()``
    raises for a path of the wrong kind.
    """

    def refuse(err: int, message: str) -> BackingFileError:
        try:
            path: str | None = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = None
        return BackingFileError(err, message, backing=path)

    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise refuse(exc.errno or errno.EBADF, "backing descriptor unusable") from None
    if flags & _native.O_PATH:
        # An O_PATH descriptor needs no read permission on the file.
        raise refuse(errno.EBADF, "backing descriptor is O_PATH; open the file for reading")
    if stat.S_ISBLK(st.st_mode):
        if not policy.allow_block_devices:
            raise refuse(
                errno.EINVAL,
                "block devices are not allowed by the broker's policy "
                "(loopdev serve --allow-block-devices)",
            )
        if nodes.is_loop_block(st.st_rdev):
            raise refuse(errno.EINVAL, "backing file is a loop device or a partition of one")
    elif stat.S_ISDIR(st.st_mode):
        raise refuse(errno.EISDIR, "backing file is a directory")
    elif not stat.S_ISREG(st.st_mode):
        raise refuse(errno.EINVAL, "backing file is not a regular file")
    mode = flags & os.O_ACCMODE
    if mode == os.O_WRONLY:
        raise refuse(errno.EBADF, "backing descriptor is write-only; a loop device reads it")
    if mode == os.O_RDWR:
        # Loop I/O writes at any offset whatever the descriptor says: an
        # append-only file would be rewritten in place through the device.
        if _inode_flags(fd) & (_native.FS_APPEND_FL | _native.FS_IMMUTABLE_FL):
            raise refuse(
                errno.EPERM,
                "backing file is append-only or immutable (chattr +a/+i); "
                "attach it read-only (open it O_RDONLY)",
            )
        if flags & os.O_APPEND:
            raise refuse(
                errno.EPERM,
                "backing descriptor is O_APPEND, which a loop device would not honour; "
                "open the file without O_APPEND, or read-only",
            )
    return st, mode == os.O_RDONLY


def _inode_flags(fd: int) -> int:
    """The file's chattr flags; 0 where its file system has none."""
    try:
        raw = fcntl.ioctl(fd, _native.FS_IOC_GETFLAGS, bytes(8))
    except OSError:
        return 0  # ENOTTY, EOPNOTSUPP: no such flags there
    flags: tuple[int] = struct.unpack_from("i", raw)  # the kernel writes an int
    return flags[0]
