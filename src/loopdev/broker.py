"""``loopdev serve``: loop devices for unprivileged clients over a Varlink socket.

One thread per connection. A connection is checked against the policy with
the peer's credentials (``SO_PEERCRED``, ``SO_PEERGROUPS``) when it is
accepted. The backing file arrives as a descriptor, so a client attaches
only what it could open; its access mode decides read-only. The device goes
back as descriptors on root's unlinked nodes (``_Grant``) that the broker
sets to mode 0 before it releases the device, so nothing the client kept
reaches a later device on the same minor. Each device belongs to its
connection; when the connection closes it is released. Limits count a
device against its owner until the kernel has released it.

Uses only the public API (``loopdev.attach``, ``LoopDevice``, ``loopdev.errors``).
See docs/BROKER.md for the protocol and the security model.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import queue
import re
import resource
import selectors
import signal
import socket
import stat
import struct
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import loopdev
from loopdev import _native, _varlink
from loopdev.device import LoopDevice
from loopdev.errors import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    LoopError,
    NoFreeDevice,
    PartitionTableError,
    UnsupportedByKernel,
)

__all__ = ["DEFAULT_SOCKET", "Broker", "Policy", "listen", "serve"]

DEFAULT_SOCKET = "/run/loopdev/broker.sock"
INTERFACE_NAME = "io.loopdev"
MAX_MESSAGE = 65536  # requests are small; a larger one is refused and ends the connection
MAX_FDS = 8  # per request; Attach needs one
SCM_MAX_FD = 253  # the kernel's limit of descriptors in one message (net/scm.h)
MAX_CONNECTIONS = 1024
MAX_DETACH_TIMEOUT = 10.0
IDLE_WORKERS = 16  # threads kept waiting for the next connection
IDLE_WORKER_SECONDS = 60.0
LOOP_MAJOR = 7
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in Python's socket

# The text of docs/io.loopdev.varlink (a test keeps them identical), for
# org.varlink.service.GetInterfaceDescription.
INTERFACE = """\
# Loop devices for unprivileged clients, served by `loopdev serve`.
#
# File descriptors travel as SCM_RIGHTS with the first byte of the message
# they belong to. A parameter named "file" or "fd" is an index into the
# descriptors of its message. Every device belongs to the connection that
# attached it and is released when that connection closes. A client is a
# user: limits and List count every connection of the caller's uid.
interface io.loopdev

# A registered partition of a device.
type Partition (
  number: int,
  name: string,
  start: int,
  size: int,
  major: int,
  minor: int,
  # Index of the partition's descriptor in the reply (Attach only).
  fd: ?int
)

type Device (
  # Kernel name, e.g. "loop3" (see /sys/block/loop3).
  name: string,
  # Unique per attachment (kernels since 5.15).
  diskseq: ?int,
  read_only: bool,
  size: int,
  # The process that made the connection owning the device.
  owner_pid: int,
  # Index of the device's descriptor in the reply (Attach only).
  fd: ?int,
  partitions: []Partition
)

# Attach the regular file passed as descriptor "file". Its access mode
# decides: a descriptor opened O_RDONLY gives a read-only device. The reply
# passes a descriptor for the device and one for each partition, on inodes
# owned by the caller, linked nowhere (reopen them as /proc/PID/fd/N).
# direct_io: true, false, or null for "where the file supports it".
method Attach(
  file: int,
  read_only: ?bool,
  partscan: ?bool,
  offset: ?int,
  sizelimit: ?int,
  block_size: ?int,
  direct_io: ?bool
) -> (device: Device)

# Release a device this connection attached: partitions deleted, device
# unbound, waiting up to timeout seconds (default 10, at most 10) until the
# kernel released it. Close every descriptor of it first.
method Detach(name: string, timeout: ?float) -> ()

# The devices of the caller's uid, on every connection.
method List() -> (devices: []Device)

# The caller's uid is neither root nor allowed by the policy.
error PermissionDenied (message: string)

# limit is "per-client", "total" or "connections".
error LimitReached (limit: string, max: int, message: string)

# The message is not a valid call, or its descriptors are not usable.
error BadRequest (message: string)

# No device of that name belongs to this connection.
error NoSuchDevice (name: string)

# The loopdev.errors exception of the same name; errno from the kernel.
error BackingFileError (errno: int, message: string, device: ?string, backing: ?string)
error ConfigureError (errno: int, message: string, device: ?string, backing: ?string)
error NoFreeDevice (errno: int, message: string, device: ?string, backing: ?string)
error DeviceBusy (errno: int, message: string, device: ?string, backing: ?string)
error PartitionTableError (errno: int, message: string, device: ?string, backing: ?string)
error UnsupportedByKernel (errno: int, message: string, device: ?string, backing: ?string)
error LoopError (errno: int, message: string, device: ?string, backing: ?string)

# A bug in the broker; the request changed nothing.
error InternalError (message: string)
"""

_SCHEMAS: dict[str, _varlink.Schema] = {
    "io.loopdev.Attach": {
        "file": ("int", False),
        "read_only": ("bool", True),
        "partscan": ("bool", True),
        "offset": ("int", True),
        "sizelimit": ("int", True),
        "block_size": ("int", True),
        "direct_io": ("bool", True),
    },
    "io.loopdev.Detach": {"name": ("string", False), "timeout": ("float", True)},
    "io.loopdev.List": {},
    "org.varlink.service.GetInfo": {},
    "org.varlink.service.GetInterfaceDescription": {"interface": ("string", False)},
}

# Most specific first: the loopdev.errors class decides the Varlink error name.
_LOOP_ERRORS: tuple[type[LoopError], ...] = (
    BackingFileError,
    ConfigureError,
    NoFreeDevice,
    DeviceBusy,
    PartitionTableError,
    UnsupportedByKernel,
)


class Refusal(Exception):
    """A request answered with a Varlink error."""

    def __init__(self, error: str, **parameters: Any) -> None:
        super().__init__(error)
        self.error = error
        self.parameters = parameters


def _bad(message: str) -> Refusal:
    return Refusal("io.loopdev.BadRequest", message=message)


def _from_os_error(exc: OSError) -> Refusal:
    kind = next((c.__name__ for c in _LOOP_ERRORS if isinstance(exc, c)), "LoopError")
    return Refusal(
        f"io.loopdev.{kind}",
        errno=exc.errno or 0,
        message=exc.strerror or str(exc),
        device=getattr(exc, "device", None),
        backing=getattr(exc, "backing", None),
    )


@dataclass(frozen=True)
class Peer:
    """Who is on the other end, from the kernel (not from the client's words)."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_of(sock: socket.socket, groups_too: bool = True) -> Peer:
    """The peer's credentials as the kernel recorded them at connect."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    if not groups_too:
        return Peer(pid, uid, gid, frozenset({gid}))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:
        # ERANGE: more than 256 groups (Python caps the buffer); ENOPROTOOPT:
        # kernel before 4.13. The primary group still counts.
        groups = frozenset()
    return Peer(pid, uid, gid, groups | {gid})


@dataclass(frozen=True)
class Policy:
    """Who may use the broker and how much. Root is always allowed."""

    users: frozenset[int] = frozenset()
    groups: frozenset[int] = frozenset()
    max_per_client: int = 16
    max_devices: int = 256
    allow_block_devices: bool = False

    def allows(self, peer: Peer) -> bool:
        return peer.uid == 0 or peer.uid in self.users or bool(peer.groups & self.groups)

    @property
    def max_connections_per_client(self) -> int:
        # Room for one connection per device (what broker_client makes) and
        # as many again closing or listing; one user cannot hold every slot.
        return 2 * self.max_per_client + 16


@dataclass
class _Owned:
    dev: LoopDevice
    uid: int
    pid: int
    conn: int
    read_only: bool
    partscan: bool
    grant: _Grant


@dataclass(eq=False)  # compared by identity: each is one attachment
class _Draining:
    """A device its owner let go of that the kernel has not released yet."""

    uid: int
    name: str
    diskseq: int | None


def _read_sysfs(name: str, attr: str) -> str | None:
    try:
        with open(f"/sys/block/{name}/{attr}") as f:
            return f.read().strip()
    except OSError:
        return None


def _still_bound(entry: _Draining) -> bool:
    if not _read_sysfs(entry.name, "loop/backing_file"):
        return False
    if entry.diskseq is None:
        return True  # kernels before 5.15: cannot tell a rebinding; count it
    return _read_sysfs(entry.name, "diskseq") == str(entry.diskseq)


def _is_loop_block(st: os.stat_result) -> bool:
    """A loop device or one of its partitions (partitions have major 259)."""
    if os.major(st.st_rdev) == LOOP_MAJOR:
        return True
    link = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    try:
        target = os.readlink(link)
    except OSError:
        return True  # cannot tell: refuse
    return any(part.startswith("loop") for part in target.split("/"))


def _check_backing_fd(fd: int, policy: Policy) -> tuple[os.stat_result, bool]:
    """The file's stat and whether its access mode forces read-only.

    ``BackingFileError`` for a descriptor of the wrong kind, as ``attach()``
    raises for a path of the wrong kind.
    """
    try:
        path: str | None = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        path = None

    def refuse(err: int, message: str) -> BackingFileError:
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
        if _is_loop_block(st):
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
    flags: int = struct.unpack_from("i", raw)[0]  # the kernel writes an int
    return flags


class _Grant:
    """The nodes handed over for one device, and the power to make them useless.

    Each node is root's, unlinked, with mode 0666 (0444 read-only): whoever
    holds a descriptor of it (the client, or a process that may ptrace the
    client) can reopen it through ``/proc/PID/fd/N``, nobody can chmod it.
    ``revoke()`` sets mode 0 through our ``O_PATH`` reference, so a reference
    the client kept (``O_PATH``, ``/proc`` link) opens nothing any more: it is
    called before the device is released and its minor can be bound again.
    We also hold every partition open: a rescan (``LOOP_CHANGE_FD`` on a
    read-only device rereads the table) then fails with EBUSY instead of
    dropping partitions whose minors (major 259) would go to other disks.
    """

    def __init__(self, read_only: bool) -> None:
        self.mode = 0o444 if read_only else 0o666
        self.refs: list[int] = []  # O_PATH, one per node
        self.held: list[int] = []  # our own descriptors of the partitions

    def revoke(self) -> None:
        for ref in self.refs:
            os.chmod(f"/proc/self/fd/{ref}", 0)

    def restore(self) -> None:
        """The device stays the client's after all (a refused Detach)."""
        for ref in self.refs:
            os.chmod(f"/proc/self/fd/{ref}", self.mode)

    def hold_partitions(self) -> None:
        # refs[0] is the whole device's node, the others its partitions'.
        for ref in self.refs[1:]:
            self.held.append(os.open(f"/proc/self/fd/{ref}", os.O_RDONLY | os.O_CLOEXEC))

    def let_partitions_go(self) -> None:
        """Before the partitions are deleted (BLKPG refuses an open one)."""
        _varlink.close_fds(self.held)
        self.held = []

    def close(self) -> None:
        """Revoke and forget: the device is being released."""
        self.revoke()
        self.let_partitions_go()
        _varlink.close_fds(self.refs)
        self.refs = []


# A live broker holds an exclusive flock on its node directory. Directories
# of brokers from before that rule have no "<pid>." in their names and are
# left alone: nothing tells whether they are still in use.
_NODE_DIR_PREFIX = ".loopdev-broker."
_NODE_DIR_NAME = re.compile(r"\.loopdev-broker\.[0-9]+\.[a-z0-9_]+")


def _make_node_dir(parent: str) -> tuple[str, int]:
    """Our root-only (0700) node directory, locked, and its descriptor.

    Root-only: the client never reaches a node by path, not even in the
    instant between mknod and unlink. It is locked before it gets the name
    other brokers look for, so none of them can take it for a dead one.
    """
    staged = tempfile.mkdtemp(prefix=".loopdev-broker-new.", dir=parent)
    fd = os.open(staged, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        path = os.path.join(
            parent, f"{_NODE_DIR_PREFIX}{os.getpid()}.{os.path.basename(staged)[-8:]}"
        )
        os.rename(staged, path)
    except BaseException:
        os.close(fd)
        os.rmdir(staged)
        raise
    return path, fd


def _remove_dead_node_dirs(parent: str) -> list[str]:
    """Remove the node directories of brokers that died (SIGKILL leaves them)."""
    removed = []
    for name in os.listdir(parent):
        if not _NODE_DIR_NAME.fullmatch(name):
            continue
        path = os.path.join(parent, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            for node in os.listdir(fd):  # a node of a broker killed between mknod and unlink
                os.unlink(node, dir_fd=fd)
            os.rmdir(path)
            removed.append(name)
        except OSError:
            pass  # locked: its broker is alive
        finally:
            os.close(fd)
    return removed


def _device_json(owned: _Owned, fd_index: int | None = None) -> tuple[dict[str, Any], list[Any]]:
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
            size = int(_read_sysfs(dev.name, "size") or 0) * 512
        except ValueError:
            size = 0
    device = {
        "name": dev.name,
        "diskseq": dev.diskseq,
        "read_only": owned.read_only,
        "size": size,
        "owner_pid": owned.pid,
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


_Job = tuple[int, socket.socket, Peer]  # connection id, socket, peer


class Broker:
    """The server's state: policy, devices by connection, limits, the node directory."""

    def __init__(
        self,
        policy: Policy,
        *,
        node_dir: str = "/dev",
        timeout: float = 10.0,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.policy = policy
        self.timeout = timeout
        write = log or _stderr_log
        # Method names, paths and error texts come from clients: one record, one line.
        self._log: Callable[[str], None] = lambda line: write(_printable(line))
        self._lock = threading.Lock()
        self._owned: dict[str, _Owned] = {}  # by device name
        self._draining: list[_Draining] = []
        self._connections: dict[int, int] = {}  # uid -> open connections
        self._socks: dict[int, socket.socket] = {}  # connection id -> socket
        self._threads: list[threading.Thread] = []
        self._reserved = 0  # attaches in progress, counted against the limits
        self._reserved_by: dict[int, int] = {}
        self._conn_ids = itertools.count(1)
        self._node_ids = itertools.count(1)
        self._stopping = threading.Event()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._idle = 0  # workers waiting on _jobs, not yet claimed
        if os.statvfs(node_dir).f_flag & os.ST_NODEV:
            raise LoopError(
                errno.EACCES,
                "the node directory is on a file system mounted nodev; "
                "give loopdev serve --node-dir a directory on one without (e.g. /dev)",
                backing=node_dir,
            )
        self.node_path, self._node_dir = _make_node_dir(node_dir)
        removed = _remove_dead_node_dirs(node_dir)
        if removed:
            self._log(f"removed the node directories of stopped brokers: {', '.join(removed)}")

    # --- connections --------------------------------------------------------------

    def accept(self, sock: socket.socket) -> None:
        """Take a new connection: refuse it over the limits, else serve it in a thread."""
        try:
            # The kernel recorded these at connect; they never change on this
            # socket, so they are read once. Groups only where the policy has any.
            peer = peer_of(sock, groups_too=bool(self.policy.groups))
        except OSError:
            sock.close()
            return
        refusal = self._admit(peer)
        if refusal is not None:
            why = refusal.parameters["message"]
            kind = refusal.error.rpartition(".")[2]
            self._log(f"uid={peer.uid} pid={peer.pid} connect -> {kind} ({why})")
            # Answered before any call: the client reads it as the reply to its first.
            sock.setblocking(False)
            try:
                sock.send(_encode(_error_reply(refusal)))
            except OSError:
                pass
            sock.close()
            return
        with self._lock:
            conn_id = next(self._conn_ids)
            self._socks[conn_id] = sock
            idle = self._idle > 0
            if idle:
                self._idle -= 1  # claimed: that worker takes the next job
        if idle:
            self._jobs.put((conn_id, sock, peer))
            return
        thread = threading.Thread(target=self._worker, args=((conn_id, sock, peer),), daemon=True)
        with self._lock:  # listed before it starts, so that stop() waits for it
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # no more threads: refuse this one, keep serving
            self._log(f"uid={peer.uid} pid={peer.pid} connect -> refused ({exc})")
            with self._lock:
                self._threads.remove(thread)
                self._socks.pop(conn_id, None)
            sock.close()
            self._disconnect(conn_id, peer)

    def _worker(self, job: _Job | None) -> None:
        """Serve connections; between them wait a while as an idle worker.

        Starting a thread costs more than a whole List request; a few idle
        workers take new connections at once.
        """
        while job is not None:
            self._serve_connection(*job)
            with self._lock:
                if self._stopping.is_set() or self._idle >= IDLE_WORKERS:
                    return
                self._idle += 1
            try:
                job = self._jobs.get(timeout=IDLE_WORKER_SECONDS)
            except queue.Empty:
                with self._lock:
                    if self._idle > 0:  # not claimed: leave
                        self._idle -= 1
                        return
                job = self._jobs.get()  # claimed while we timed out: the job is coming

    def _admit(self, peer: Peer) -> Refusal | None:
        """Count a new connection of ``peer``; a refusal when the policy or a limit says no.

        A user outside the policy is never counted: it cannot hold a slot.
        """
        if not self.policy.allows(peer):
            return Refusal(
                "io.loopdev.PermissionDenied",
                message=f"uid {peer.uid} is not allowed to use this loopdev broker",
            )
        uid = peer.uid
        with self._lock:
            count = self._connections.get(uid, 0)
            if sum(self._connections.values()) >= MAX_CONNECTIONS:
                limit, message = MAX_CONNECTIONS, "the broker has too many connections"
            elif count >= self.policy.max_connections_per_client:
                limit = self.policy.max_connections_per_client
                message = f"uid {uid} has {limit} connections open"
            else:
                self._connections[uid] = count + 1
                return None
        return Refusal("io.loopdev.LimitReached", limit="connections", max=limit, message=message)

    def _serve_connection(self, conn_id: int, sock: socket.socket, peer: Peer) -> None:
        conn = _varlink.Connection(
            sock, max_message=MAX_MESSAGE, max_fds=MAX_FDS, timeout=self.timeout
        )
        try:
            while not self._stopping.is_set():
                idle = None if self._has_devices(conn_id) else self.timeout
                try:
                    frame = conn.receive(idle_timeout=idle)
                except _varlink.IdleTimeout:
                    self._log(f"uid={peer.uid} pid={peer.pid} idle for {self.timeout:g} s: closed")
                    break
                except _varlink.ProtocolError as exc:
                    self._log(f"uid={peer.uid} pid={peer.pid} BadRequest ({exc}): closed")
                    self._try_send(conn, _error_reply(_bad(str(exc))))
                    break
                except OSError:
                    break
                if frame is None:
                    break
                reply, fds = self._handle(conn_id, peer, frame)
                try:
                    if reply is not None:
                        conn.send(reply, fds)
                except _varlink.ProtocolError:
                    break
                finally:
                    _varlink.close_fds(fds)
        except Exception:  # a bug: the connection ends, the server carries on
            self._log(f"uid={peer.uid} pid={peer.pid} internal error: {traceback.format_exc()!r}")
        finally:
            with self._lock:
                self._socks.pop(conn_id, None)
            conn.close()
            self._disconnect(conn_id, peer)

    def _try_send(self, conn: _varlink.Connection, reply: dict[str, Any]) -> None:
        try:
            conn.send(reply)
        except _varlink.ProtocolError:
            pass

    def _has_devices(self, conn_id: int) -> bool:
        with self._lock:
            return any(o.conn == conn_id for o in self._owned.values())

    def _disconnect(self, conn_id: int, peer: Peer) -> None:
        """The connection is gone: release its devices without waiting for other holders."""
        with self._lock:
            mine = [(o, self._let_go(o)) for o in list(self._owned.values()) if o.conn == conn_id]
            self._socks.pop(conn_id, None)  # if it never got to serve
            self._connections[peer.uid] -= 1
            if not self._connections[peer.uid]:
                del self._connections[peer.uid]
        outcomes = [f"{o.dev.name}:{self._release(o, entry)}" for o, entry in mine]
        if mine:
            self._log(f"uid={peer.uid} pid={peer.pid} disconnect released {','.join(outcomes)}")

    def _let_go(self, owned: _Owned) -> _Draining:
        """Under the lock: move a device from owned to draining, so that it stays counted."""
        self._owned.pop(owned.dev.name, None)
        entry = _Draining(owned.uid, owned.dev.name, owned.dev.diskseq)
        self._draining.append(entry)
        return entry

    def _release(self, owned: _Owned, entry: _Draining) -> str:
        """Detach a device already let go of; what happened, in one word.

        A client's descriptors may outlive its connection (a child holds
        them, or the kernel is still closing a killed process's files): then
        the device is cleared and our descriptor closed, so autoclear
        releases it at the holder's last close, and ``entry`` keeps it
        counted against its owner until then.
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
        if _still_bound(entry):
            return "pending"
        self._forget(entry)
        return "released"

    def _forget(self, entry: _Draining) -> None:
        with self._lock:
            if entry in self._draining:
                self._draining.remove(entry)

    # --- requests -----------------------------------------------------------------

    def _handle(
        self, conn_id: int, peer: Peer, frame: _varlink.Frame
    ) -> tuple[dict[str, Any] | None, list[int]]:
        """The reply to one message and the descriptors to send with it.

        Closes every descriptor of the request; never raises for bad input.
        """
        start = time.monotonic()
        method = "?"
        detail: list[str] = []
        oneway = False
        reply: dict[str, Any]
        fds: list[int] = []
        try:
            call = _varlink.parse_call(frame.payload)
            method, oneway = call.method, call.oneway
            if frame.fds_dropped:
                raise _bad(f"more than {MAX_FDS} file descriptors in one message")
            schema = _SCHEMAS.get(call.method)
            if schema is None:
                interface = call.method.rpartition(".")[0]
                if interface in (INTERFACE_NAME, "org.varlink.service"):
                    raise Refusal(_varlink.METHOD_NOT_FOUND, method=call.method)
                raise Refusal(_varlink.INTERFACE_NOT_FOUND, interface=interface)
            params = _varlink.check_parameters(call.parameters, schema)
            parameters, fds = self._dispatch(call.method, params, frame.fds, conn_id, peer, detail)
            reply = {"parameters": parameters}
            outcome = "ok"
        except _varlink.BadRequest as exc:
            reply, outcome = _error_reply(_bad(str(exc))), "BadRequest"
        except _varlink.InvalidParameter as exc:
            refusal = Refusal(_varlink.INVALID_PARAMETER, parameter=exc.parameter)
            reply, outcome = _error_reply(refusal), f"InvalidParameter ({exc})"
        except Refusal as exc:
            reply, outcome = _error_reply(exc), exc.error.rpartition(".")[2]
            if "message" in exc.parameters:
                outcome += f" ({exc.parameters['message']})"
        except OSError as exc:
            refusal = _from_os_error(exc)
            reply, outcome = _error_reply(refusal), f"{refusal.error.rpartition('.')[2]} ({exc})"
        except Exception as exc:  # a bug must not take the server down
            refusal = Refusal("io.loopdev.InternalError", message=f"{type(exc).__name__}: {exc}")
            reply, outcome = _error_reply(refusal), f"InternalError {traceback.format_exc()!r}"
        finally:
            _varlink.close_fds(frame.fds)
        took = (time.monotonic() - start) * 1000
        self._log(
            f"uid={peer.uid} pid={peer.pid} {method.rpartition('.')[2]} "
            f"{' '.join(detail)}{' ' if detail else ''}-> {outcome} {took:.1f}ms"
        )
        if oneway:
            _varlink.close_fds(fds)
            return None, []
        return reply, fds

    def _dispatch(
        self,
        method: str,
        params: dict[str, Any],
        fds: list[int],
        conn_id: int,
        peer: Peer,
        detail: list[str],
    ) -> tuple[dict[str, Any], list[int]]:
        if method == "io.loopdev.Attach":
            return self._attach(params, fds, conn_id, peer, detail)
        if method == "io.loopdev.Detach":
            return self._detach(params, conn_id, detail), []
        if method == "io.loopdev.List":
            with self._lock:
                mine = [o for o in self._owned.values() if o.uid == peer.uid]
            return {"devices": [_device_json(o)[0] for o in mine]}, []
        if method == "org.varlink.service.GetInfo":
            return {
                "vendor": "loopdev",
                "product": "loopdev broker",
                "version": loopdev.__version__,
                "url": "https://pypi.org/project/loopdev/",
                "interfaces": ["org.varlink.service", INTERFACE_NAME],
            }, []
        if method == "org.varlink.service.GetInterfaceDescription":
            if params["interface"] != INTERFACE_NAME:
                raise Refusal(_varlink.INTERFACE_NOT_FOUND, interface=params["interface"])
            return {"description": INTERFACE}, []
        raise AssertionError(method)

    def _reserve(self, uid: int) -> None:
        """Count a device for ``uid`` or raise ``LimitReached``."""
        with self._lock:
            self._draining = [d for d in self._draining if _still_bound(d)]
            mine = sum(o.uid == uid for o in self._owned.values())
            mine += sum(d.uid == uid for d in self._draining)
            total = len(self._owned) + len(self._draining) + self._reserved
            if mine + self._reserved_by.get(uid, 0) >= self.policy.max_per_client:
                limit = self.policy.max_per_client
                raise Refusal(
                    "io.loopdev.LimitReached",
                    limit="per-client",
                    max=limit,
                    message=f"uid {uid} has {limit} devices, its limit",
                )
            if total >= self.policy.max_devices:
                limit = self.policy.max_devices
                raise Refusal(
                    "io.loopdev.LimitReached",
                    limit="total",
                    max=limit,
                    message=f"the broker serves {limit} devices, its limit",
                )
            self._reserved += 1
            self._reserved_by[uid] = self._reserved_by.get(uid, 0) + 1

    def _unreserve(self, uid: int) -> None:
        with self._lock:
            self._unreserve_locked(uid)

    def _attach(
        self, params: dict[str, Any], fds: list[int], conn_id: int, peer: Peer, detail: list[str]
    ) -> tuple[dict[str, Any], list[int]]:
        index = params["file"]
        if not 0 <= index < len(fds):
            raise _varlink.InvalidParameter("file", f"no descriptor {index} in this message")
        fd = fds[index]
        st, fd_read_only = _check_backing_fd(fd, self.policy)
        detail.append(f"file={os.major(st.st_dev)}:{os.minor(st.st_dev)}:{st.st_ino}")
        read_only = bool(params["read_only"]) or fd_read_only
        self._reserve(peer.uid)
        try:
            direct_io: bool | Literal["auto"] = (
                "auto" if params["direct_io"] is None else params["direct_io"]
            )
            dev = loopdev.attach(
                fd,
                read_only=read_only,
                partscan=bool(params["partscan"]),
                offset=params["offset"] or 0,
                sizelimit=params["sizelimit"] or 0,
                block_size=params["block_size"],
                direct_io=direct_io,
                autoclear=True,  # released by the kernel whatever happens to us
            )
        except BaseException:
            self._unreserve(peer.uid)
            raise
        detail.append(f"device={dev.name}{' ro' if read_only else ''}")
        grant = _Grant(read_only)
        owned = _Owned(dev, peer.uid, peer.pid, conn_id, read_only, bool(params["partscan"]), grant)
        handed: list[int] = []
        try:
            device, parts = _device_json(owned, fd_index=0)
            if 1 + len(parts) > SCM_MAX_FD:
                raise Refusal(
                    "io.loopdev.LimitReached",
                    limit="descriptors",
                    max=SCM_MAX_FD,
                    message=f"{dev.name} has {len(parts)} partitions; a reply carries at "
                    f"most {SCM_MAX_FD} descriptors: the device and {SCM_MAX_FD - 1} partitions",
                )
            rdev = os.fstat(dev.fd).st_rdev  # the real dev_t, whatever max_part is
            handed.append(self._hand_over(os.major(rdev), os.minor(rdev), grant))
            for part in parts:
                handed.append(self._hand_over(part.major, part.minor, grant))
            grant.hold_partitions()
        except BaseException:
            _varlink.close_fds(handed)
            with self._lock:
                entry = self._let_go(owned)
                self._unreserve_locked(peer.uid)
            self._release(owned, entry)
            raise
        with self._lock:
            self._owned[dev.name] = owned
            self._unreserve_locked(peer.uid)
        return {"device": device}, handed

    def _unreserve_locked(self, uid: int) -> None:
        self._reserved -= 1
        self._reserved_by[uid] -= 1
        if not self._reserved_by[uid]:
            del self._reserved_by[uid]

    def _hand_over(self, major: int, minor: int, grant: _Grant) -> int:
        """An open descriptor of ``major:minor`` on a node of ``grant``, linked nowhere."""
        name = f"{major}.{minor}.{next(self._node_ids)}"
        # Mode 0 until it is unlinked and ours alone; root opens it anyway.
        os.mknod(name, stat.S_IFBLK, os.makedev(major, minor), dir_fd=self._node_dir)
        fd = -1
        try:
            grant.refs.append(os.open(name, _native.O_PATH | os.O_CLOEXEC, dir_fd=self._node_dir))
            read_only = grant.mode == 0o444
            flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
            fd = os.open(name, flags, dir_fd=self._node_dir)
            os.fchmod(fd, grant.mode)  # root stays the owner: the client cannot chmod it
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            os.unlink(name, dir_fd=self._node_dir)
        return fd

    def _detach(self, params: dict[str, Any], conn_id: int, detail: list[str]) -> dict[str, Any]:
        name = params["name"]
        timeout = params["timeout"]
        timeout = (
            MAX_DETACH_TIMEOUT if timeout is None else min(max(timeout, 0.0), MAX_DETACH_TIMEOUT)
        )
        detail.append(f"device={name}")
        with self._lock:
            owned = self._owned.get(name)
            if owned is None or owned.conn != conn_id:
                raise Refusal("io.loopdev.NoSuchDevice", name=name)
            entry = self._let_go(owned)
        dev = owned.dev
        grant = owned.grant
        grant.revoke()  # before the minor can be bound again
        grant.let_partitions_go()
        try:
            dev.detach(timeout=timeout)
        except DeviceBusy:
            if dev.fd >= 0:
                # A partition is held: nothing changed, the device stays the client's.
                grant.restore()
                grant.hold_partitions()
                with self._lock:
                    self._draining.remove(entry)
                    self._owned[name] = owned
                raise
            self._release(owned, entry)  # cleared; counted until the holder lets go
            raise
        except OSError:
            self._release(owned, entry)
            raise
        grant.close()
        self._forget(entry)
        return {}

    # --- life cycle ---------------------------------------------------------------

    def stop(self) -> None:
        """End every connection (their devices are released) and wait for the threads."""
        self._stopping.set()
        with self._lock:
            # Under the lock: a thread removes its socket here before closing it.
            for sock in self._socks.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            threads = list(self._threads)
            for _ in range(self._idle):
                self._jobs.put(None)
            self._idle = 0
        deadline = time.monotonic() + MAX_DETACH_TIMEOUT + 5
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        try:
            os.rmdir(self.node_path)  # still locked: no other broker touches it meanwhile
        except OSError:
            pass
        os.close(self._node_dir)


def _encode(reply: dict[str, Any]) -> bytes:
    import json

    return json.dumps(reply, separators=(",", ":")).encode() + b"\0"


def _error_reply(refusal: Refusal) -> dict[str, Any]:
    return {"error": refusal.error, "parameters": refusal.parameters}


_log_lock = threading.Lock()
# Control characters (C0, DEL, C1) and the backslash, as Python escapes them.
_UNPRINTABLE = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}
_UNPRINTABLE.update({ord("\\"): "\\\\", ord("\n"): "\\n", ord("\t"): "\\t"})


def _printable(line: str) -> str:
    return line.translate(_UNPRINTABLE)


def _stderr_log(line: str) -> None:
    with _log_lock:
        try:
            sys.stderr.write(f"loopdev serve: {line}\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # a lost log line must not take a request down with it


# --- the listening socket ---------------------------------------------------------


def _activated_socket() -> socket.socket | None:
    """The socket systemd passed (LISTEN_FDS, LISTEN_PID), if any; the variables are unset."""
    pid = os.environ.pop("LISTEN_PID", None)
    count = os.environ.pop("LISTEN_FDS", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if pid is None or count is None or pid != str(os.getpid()):
        return None
    if count != "1":
        raise LoopError(errno.EINVAL, f"expected one socket from systemd, got LISTEN_FDS={count}")
    sock = socket.socket(fileno=3)  # SD_LISTEN_FDS_START
    sock.set_inheritable(False)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise LoopError(errno.EINVAL, "the socket from systemd is not a Unix stream socket")
    return sock


def listen(path: str) -> socket.socket:
    """A listening socket at ``path`` that everybody may connect to (the policy decides).

    The socket gets its mode in a directory of its own and is renamed into
    place: it never exists at ``path`` with another mode, and nothing is done
    by name where others could swap the name.
    """
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, mode=0o755, exist_ok=True)
    _check_socket_dir(parent)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise LoopError(errno.EEXIST, "exists and is not a socket", backing=path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # left by a broker that died
        else:
            raise LoopError(errno.EADDRINUSE, "another broker serves this socket", backing=path)
        finally:
            probe.close()
    private = tempfile.mkdtemp(prefix=".loopdev-serve.", dir=parent)  # 0700, ours
    staged = os.path.join(private, "sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(staged)
        os.chmod(staged, 0o666)
        sock.listen(128)
        os.rename(staged, path)
    except BaseException:
        sock.close()
        raise
    finally:
        if os.path.lexists(staged):
            os.unlink(staged)
        os.rmdir(private)
    return sock


def _check_socket_dir(parent: str) -> None:
    """Refuse a directory where others could replace the socket path under us."""
    st = os.stat(parent)
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others_write and not (st.st_mode & stat.S_ISVTX and st.st_uid == os.geteuid()):
        raise LoopError(
            errno.EPERM,
            "the socket's directory is writable by others (and not sticky and ours): "
            "choose one only root can write, such as /run/loopdev",
            backing=parent,
        )


def _raise_fd_limit() -> None:
    # One descriptor per device and per connection, a few more per request.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(
    policy: Policy,
    *,
    socket_path: str = DEFAULT_SOCKET,
    node_dir: str = "/dev",
    timeout: float = 10.0,
) -> int:
    """Serve until SIGTERM or SIGINT; returns the exit status."""
    # The broker attaches itself; a LOOPDEV_BROKER in its environment would
    # send its own attach() back to a broker.
    os.environ.pop("LOOPDEV_BROKER", None)
    _raise_fd_limit()
    broker = Broker(policy, node_dir=node_dir, timeout=timeout)
    try:
        listener = _activated_socket()
        where = "the socket from systemd"
        if listener is None:
            listener = listen(socket_path)
            where = socket_path
            ino = os.stat(socket_path).st_ino
        try:
            _stderr_log(
                f"serving on {where}; users {sorted(policy.users)} groups "
                f"{sorted(policy.groups)}, {policy.max_per_client} devices per client, "
                f"{policy.max_devices} in total"
            )
            _accept_until_signal(listener, broker)
        finally:
            listener.close()
            if where == socket_path:
                _unlink_if_same(socket_path, ino)
    finally:
        broker.stop()
        broker.close()
    _stderr_log("stopped")
    return 0


def _accept_until_signal(listener: socket.socket, broker: Broker) -> None:
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def on_signal(signum: int, frame: object) -> None:
        pass  # the wakeup fd below has woken select() already

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    # Written by the C-level handler in whichever thread the kernel gives the
    # signal to: a Python handler runs only in the main thread, and only once
    # select() returned, which a signal taken by a worker thread never makes it do.
    old_wakeup = signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    listener.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(wake_r, selectors.EVENT_READ)
    try:
        while True:
            events = selector.select()
            if any(key.fileobj == wake_r for key, _ in events):
                return
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as exc:  # EMFILE and the like: wait, do not spin
                _stderr_log(f"accept failed: {exc}")
                time.sleep(0.1)
                continue
            sock.setblocking(True)
            broker.accept(sock)
    finally:
        selector.close()
        signal.set_wakeup_fd(old_wakeup)
        for signum, handler in old.items():
            signal.signal(signum, handler)
        os.close(wake_r)
        os.close(wake_w)


def _unlink_if_same(path: str, ino: int) -> None:
    try:
        if os.lstat(path).st_ino == ino:
            os.unlink(path)
    except OSError:
        pass
