"""The client side of ``loopdev serve``: loop devices without root.

``loopdev.attach(..., broker=PATH)`` (or ``LOOPDEV_BROKER=PATH`` in the
environment) lands here. The backing file is opened by this process, with
its own permissions, and sent to the broker as a descriptor. The device
comes back as descriptors: ``LoopDevice.fd``, and ``path`` =
``/proc/PID/fd/N``, which this process and other processes of the same user
can open. Each device has its own connection; closing it (``detach()``,
``close()``, or the process ending) releases the device.
"""

from __future__ import annotations

import errno
import os
import select
import socket
import stat
import threading
from collections.abc import Mapping, Sequence
from typing import TypeVar, cast

from loopdev import _interface, _varlink
from loopdev._varlink import JsonObject
from loopdev.device import LoopDevice
from loopdev.errors import BackingFileError, ConfigureError, LoopError, NoFreeDevice
from loopdev.partitions import PartitionDevice

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from typing_extensions import Unpack

    from loopdev.device import AttachOptions, Backing

__all__ = [
    "BadRequest",
    "BrokerError",
    "BrokerLease",
    "BrokerPartition",
    "LimitReached",
    "PermissionDenied",
    "attach",
    "call",
    "connect",
    "list_devices",
]

MAX_REPLY = 16 << 20  # a List of many devices with many partitions
REPLY_TIMEOUT = 120.0  # an attach may retry for 30 s, a detach waits 10 s
READ_TIMEOUT = 10.0  # once a reply started


class BrokerError(LoopError):
    """The broker refused the request, failed, or could not be reached."""


class PermissionDenied(BrokerError, PermissionError):
    """The broker's policy does not allow this user."""


class LimitReached(BrokerError, NoFreeDevice):
    """A limit of the broker (per client, total, connections) is reached; nothing attached."""


class BadRequest(BrokerError):
    """The broker did not understand the request (a client or version mismatch)."""


def _error(name: object, parameters: object) -> LoopError:
    """The exception for a Varlink error reply."""
    params = _varlink.json_object(parameters) or {}
    message = params.get("message")
    text = message if isinstance(message, str) else f"{name}: {params}"
    if not isinstance(name, str):
        return BrokerError(errno.EPROTO, f"the broker failed: {text}")
    loop_error = _interface.loop_error(name, params)
    if loop_error is not None:
        return loop_error
    if name == f"{_interface.NAME}.PermissionDenied":
        return PermissionDenied(errno.EACCES, text)
    if name == f"{_interface.NAME}.LimitReached":
        return LimitReached(errno.EDQUOT, text)
    if name == f"{_interface.NAME}.NoSuchDevice":
        device = params.get("name")
        return BrokerError(
            errno.ENXIO,
            "not a device of this connection",
            device=device if isinstance(device, str) else None,
        )
    if name == f"{_interface.NAME}.BadRequest" or name.startswith("org.varlink.service."):
        return BadRequest(errno.EPROTO, f"the broker refused the request: {text}")
    return BrokerError(errno.EPROTO, f"the broker failed: {text}")


def connect(path: str) -> _varlink.Connection:
    """A connection to the broker at ``path``; ``BrokerError`` if there is none."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise BrokerError(
            exc.errno or errno.ECONNREFUSED,
            "cannot connect to the loopdev broker (is `loopdev serve` running?)",
            backing=path,
        ) from None
    return _varlink.Connection(
        sock, max_message=MAX_REPLY, max_fds=_varlink.SCM_MAX_FD, timeout=READ_TIMEOUT
    )


class _Idle:
    """This process's connections that hold no device, kept for the next attach.

    A device still has a connection of its own (closing it releases the
    device); only a connection whose device was detached is reused, which
    saves the broker a new connection (its accept and a worker) per attach.
    A forked child never uses its parent's: they share the socket.
    """

    MAX = 2  # per broker: sequential attach/detach needs one

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._conns: dict[str, list[_varlink.Connection]] = {}

    def take(self, path: str) -> _varlink.Connection | None:
        with self._lock:
            self._forget_parents()
            conns = self._conns.get(path, [])
            while conns:
                conn = conns.pop()
                if _still_open(conn):
                    return conn
                conn.close()
        return None

    def give(self, path: str, conn: _varlink.Connection) -> None:
        with self._lock:
            self._forget_parents()
            conns = self._conns.setdefault(path, [])
            if len(conns) < self.MAX:
                conns.append(conn)
                return
        conn.close()

    def _forget_parents(self) -> None:
        if self._pid != os.getpid():
            for conns in self._conns.values():
                for conn in conns:
                    conn.close()  # our copy only: the parent's socket stays open
            self._conns = {}
            self._pid = os.getpid()


def _still_open(conn: _varlink.Connection) -> bool:
    """Whether the broker kept an idle connection (it closes them after its --timeout)."""
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return not poller.poll(0)  # a reused connection gets nothing unasked but EOF


_IDLE = _Idle()


def call(
    conn: _varlink.Connection,
    method: str,
    parameters: Mapping[str, object],
    fds: Sequence[int] = (),
) -> tuple[JsonObject, list[int]]:
    """One call: the reply's parameters and the descriptors that came with it (ours to close)."""
    unsent: Exception | None = None
    try:
        conn.send({"method": method, "parameters": parameters}, fds)
    except (_varlink.ProtocolError, OSError) as exc:
        # The broker may have answered at connect (PermissionDenied, a limit)
        # and closed: that answer is still ours to read.
        unsent = exc
    try:
        frame = conn.receive(idle_timeout=REPLY_TIMEOUT)
    except (_varlink.ProtocolError, _varlink.IdleTimeout, OSError) as exc:
        raise BrokerError(errno.EPROTO, f"no reply from the loopdev broker: {exc}") from None
    if frame is None:
        why = f" ({unsent})" if unsent is not None else ""
        raise BrokerError(errno.ECONNRESET, f"the loopdev broker closed the connection{why}")
    try:
        reply = _parse(frame)
    except BaseException:
        _varlink.close_fds(frame.fds)
        raise
    if "error" in reply:
        _varlink.close_fds(frame.fds)
        raise _error(reply["error"], reply.get("parameters"))
    params = _varlink.json_object(reply.get("parameters", {}))
    if params is None:
        _varlink.close_fds(frame.fds)
        raise _malformed()
    return params, frame.fds


def _parse(frame: _varlink.Frame) -> JsonObject:
    import json

    try:
        decoded: object = json.loads(frame.payload)
    except ValueError:
        decoded = None
    reply = _varlink.json_object(decoded)
    if reply is None:
        raise _malformed()
    return reply


def _malformed(what: str = "") -> BrokerError:
    return BrokerError(errno.EPROTO, f"malformed {what}reply from the loopdev broker")


T = TypeVar("T")


def _field(obj: JsonObject, key: str, kind: type[T]) -> T:
    """``obj[key]`` if it is a ``kind`` (and not a bool posing as an int)."""
    value = obj.get(key)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise _malformed()


def _objects(obj: JsonObject, key: str) -> list[JsonObject]:
    """``obj[key]``, a list of JSON objects."""
    value = obj.get(key)
    items = cast("list[object]", value) if isinstance(value, list) else None
    found = [_varlink.json_object(item) for item in items or ()]
    if items is None or None in found:
        raise _malformed()
    return [item for item in found if item is not None]


class BrokerPartition(PartitionDevice):
    """A partition handed over by the broker; ``path`` reopens our descriptor of it."""

    _fd: int

    @classmethod
    def from_reply(cls, entry: JsonObject, fd: int) -> BrokerPartition:
        part = cls(
            number=_field(entry, "number", int),
            start=_field(entry, "start", int),
            size=_field(entry, "size", int),
            major=_field(entry, "major", int),
            minor=_field(entry, "minor", int),
            name=_field(entry, "name", str),
        )
        part._fd = fd
        return part

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def path(self) -> str:
        return f"/proc/{os.getpid()}/fd/{self._fd}"


class BrokerLease:
    """How a device the broker attached is released: by the broker, through its connection.

    The ``LoopDevice`` that ``attach()`` returns holds it: ``detach()`` closes
    our descriptors, asks the broker to release the device and waits for it;
    ``close()`` (or the process ending) closes the connection, and the broker
    releases the device without waiting.
    """

    def __init__(
        self,
        conn: _varlink.Connection,
        name: str,
        fd: int,
        parts: list[BrokerPartition],
        broker: str,
    ) -> None:
        self.path = f"/proc/{os.getpid()}/fd/{fd}"  # this user's processes can open it
        self._conn: _varlink.Connection | None = conn
        self._name = name
        self._parts = parts
        self._broker = broker

    def partitions(self) -> list[PartitionDevice]:
        """The partitions registered at attach, each with its own descriptor."""
        return list(self._parts)

    def detach(self, fd: int, timeout: float) -> None:
        conn = self._let_go(fd)
        if conn is None:
            return
        try:
            call(conn, "io.loopdev.Detach", {"name": self._name, "timeout": timeout})
        except BaseException:
            conn.close()
            raise
        _IDLE.give(self._broker, conn)

    def close(self, fd: int) -> None:
        conn = self._let_go(fd)
        if conn is not None:
            conn.close()

    def _let_go(self, fd: int) -> _varlink.Connection | None:
        _varlink.close_fds([fd] + [part.fd for part in self._parts])
        self._parts = []
        conn, self._conn = self._conn, None
        return conn


def _handed_over(reply: JsonObject, fds: list[int]) -> tuple[str, int, list[BrokerPartition]]:
    """The Attach reply's device name, its descriptor and its partitions; closes the
    descriptors it names none of, and all of them on a malformed reply."""
    try:
        device = _varlink.json_object(reply.get("device"))
        if device is None:
            raise _malformed("Attach ")
        name = _field(device, "name", str)
        if not (name.startswith("loop") and name[4:].isdigit()):
            raise _malformed("Attach ")
        entries = _objects(device, "partitions")
        indexes = [_field(device, "fd", int)] + [_field(p, "fd", int) for p in entries]
        if not all(0 <= i < len(fds) for i in indexes):
            raise _malformed("Attach ")
        parts = [
            BrokerPartition.from_reply(p, fds[i]) for p, i in zip(entries, indexes[1:], strict=True)
        ]
    except BaseException:
        _varlink.close_fds(fds)
        raise
    _varlink.close_fds([f for i, f in enumerate(fds) if i not in indexes])
    return name, fds[indexes[0]], parts


def _open_backing(backing: Backing, read_only: bool) -> tuple[int, bool]:
    """Our descriptor of the backing file, opened with our permissions; and whether we opened it."""
    if isinstance(backing, int):
        if backing < 0:
            raise BackingFileError(errno.EBADF, f"invalid file descriptor {backing}")
        return backing, False
    path = os.path.abspath(os.fspath(backing))
    try:
        if stat.S_ISFIFO(os.stat(path).st_mode):  # opening it would block
            raise BackingFileError(errno.EINVAL, "backing file is a FIFO", backing=path)
        fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
    except BackingFileError:
        raise
    except OSError as exc:
        hint = "" if read_only else "; pass read_only=True for a read-only file"
        raise BackingFileError(
            exc.errno or errno.EACCES, f"cannot open the backing file{hint}", backing=path
        ) from None
    return fd, True


def attach(backing: Backing, *, broker: str, **options: Unpack[AttachOptions]) -> LoopDevice:
    """``loopdev.attach()`` through the broker at ``broker`` (see the module docstring)."""
    where = None if isinstance(backing, int) else os.fspath(backing)
    if not options.get("autoclear", True) or options.get("lock") or options.get("node_dir"):
        raise ConfigureError(
            errno.EINVAL,
            "autoclear=False, lock and node_dir are not available through the broker "
            "(its devices are released with their connection, its nodes are descriptors)",
            backing=where,
        )
    read_only = options.get("read_only", False)
    direct_io = options.get("direct_io", "auto")
    params = {
        "file": 0,
        "read_only": read_only,
        "partscan": options.get("partscan", False),
        "offset": options.get("offset", 0),
        "sizelimit": options.get("sizelimit", 0),
        "block_size": options.get("block_size"),
        "direct_io": None if direct_io == "auto" else direct_io,
    }
    fd, opened = _open_backing(backing, read_only)
    try:
        conn = _IDLE.take(broker)
        reused = conn is not None
        if conn is None:
            conn = connect(broker)
        try:
            try:
                reply, fds = call(conn, "io.loopdev.Attach", params, [fd])
            except BrokerError as exc:
                if not (reused and exc.errno == errno.ECONNRESET):
                    raise
                # The broker closed the idle connection before it read the
                # call (its --timeout): nothing was attached; once more anew.
                conn.close()
                conn = connect(broker)
                reply, fds = call(conn, "io.loopdev.Attach", params, [fd])
            name, dev_fd, parts = _handed_over(reply, fds)
            lease = BrokerLease(conn, name, dev_fd, parts, broker)
            return LoopDevice(int(name[4:]), dev_fd, owned=True, lease=lease)
        except BaseException:
            conn.close()
            raise
    finally:
        if opened:
            os.close(fd)


def list_devices(broker: str) -> list[JsonObject]:
    """The broker's devices of this user (the ``Device`` objects of the interface)."""
    conn = connect(broker)
    try:
        reply, fds = call(conn, "io.loopdev.List", {})
        _varlink.close_fds(fds)
    finally:
        conn.close()
    return _objects(reply, "devices")
