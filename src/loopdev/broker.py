"""``loopdev serve``: loop devices for unprivileged clients over a Varlink socket.

The manager: it accepts connections, admits a peer by its credentials
(``SO_PEERCRED``, ``SO_PEERGROUPS``, checked against the policy once, at
accept), and serves each connection in a worker (``_broker_pool``), reading
calls and answering each from the handler table of ``_broker_methods``. The
shared state is the ``_broker_ledger``; devices go to clients as descriptors
of nodes the broker revokes before it releases the device
(``_broker_grant``). Each device belongs to its connection; when the
connection closes it is released. The interface is ``io.loopdev.varlink``.

See docs/BROKER.md for the protocol and the security model.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import select
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

from loopdev import _engine, _varlink
from loopdev._broker_grant import NodeDir
from loopdev._broker_ledger import Ledger, Peer, Policy
from loopdev._broker_methods import HANDLERS, MAX_DETACH_TIMEOUT, Call, Service, release
from loopdev._broker_pool import Pool
from loopdev._interface import NAME, TEXT, Refusal
from loopdev._varlink import JsonObject
from loopdev.cli import Args
from loopdev.errors import LoopError

__all__ = ["DEFAULT_SOCKET", "INTERFACE", "Broker", "Peer", "Policy", "listen", "serve"]

DEFAULT_SOCKET = "/run/loopdev/broker.sock"
INTERFACE = TEXT  # what org.varlink.service.GetInterfaceDescription returns
MAX_MESSAGE = 65536  # requests are small; a larger one is refused and ends the connection
MAX_FDS = 8  # per request; Attach needs one
SO_PEERGROUPS: int = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13; not in Python's socket
_SCHEMAS = {method: schema for method, (schema, _) in HANDLERS.items()}  # for the fuzz tests


def peer_of(sock: socket.socket, groups_too: bool = True) -> Peer:
    """The peer's credentials as the kernel recorded them at connect."""
    cred: tuple[int, int, int] = struct.unpack(
        "3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    )
    pid, uid, gid = cred
    if not groups_too:
        return Peer(pid, uid, gid, frozenset({gid}))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        gids: tuple[int, ...] = struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    except OSError:
        # ERANGE: more than 256 groups (Python caps the buffer); ENOPROTOOPT:
        # kernel before 4.13. The primary group still counts.
        gids = ()
    return Peer(pid, uid, gid, frozenset((*gids, gid)))


_Job = tuple[int, socket.socket, Peer]  # connection id, socket, peer


class Broker:
    """Accepts and serves connections: the policy, the ledger, the node directory, the workers."""

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
        self.ledger = Ledger(policy)
        self.nodes = NodeDir(node_dir)
        self.node_path = self.nodes.path
        if self.nodes.removed:
            self._log(f"removed the node directories of dead brokers: {self.nodes.removed}")
        self._service = Service(policy, self.ledger, self.nodes)
        self._pool: Pool[_Job] = Pool(lambda job: self._serve_connection(*job))
        self._lock = threading.Lock()
        self._socks: dict[int, socket.socket] = {}  # connection id -> socket, for stop()
        self._conn_ids = itertools.count(1)
        self._stopping = threading.Event()

    # --- connections --------------------------------------------------------------

    def accept(self, sock: socket.socket) -> None:
        """Take a new connection: answer and close it if refused, else serve it in a worker."""
        try:
            # The kernel recorded these at connect; they never change on this
            # socket, so they are read once. Groups only where the policy has any.
            peer = peer_of(sock, groups_too=bool(self.policy.groups))
        except OSError:
            sock.close()
            return
        refusal = self.ledger.admit(peer)
        if refusal is not None:
            kind = refusal.error.rpartition(".")[2]
            why = refusal.parameters["message"]
            self._log(f"uid={peer.uid} pid={peer.pid} connect -> {kind} ({why})")
            # Answered before any call: the client reads it as the reply to its first.
            sock.setblocking(False)
            try:
                sock.send(_encode(refusal.reply()))
            except OSError:
                pass
            sock.close()
            return
        with self._lock:
            conn_id = next(self._conn_ids)
            self._socks[conn_id] = sock
        try:
            self._pool.submit((conn_id, sock, peer))
        except RuntimeError as exc:  # no more threads: refuse this one, keep serving
            self._log(f"uid={peer.uid} pid={peer.pid} connect -> refused ({exc})")
            with self._lock:
                self._socks.pop(conn_id, None)
            sock.close()
            self._disconnect(conn_id, peer)

    def _serve_connection(self, conn_id: int, sock: socket.socket, peer: Peer) -> None:
        conn = _varlink.Connection(
            sock, max_message=MAX_MESSAGE, max_fds=MAX_FDS, timeout=self.timeout
        )
        try:
            while not self._stopping.is_set():
                idle = None if self.ledger.has_devices(conn_id) else self.timeout
                try:
                    frame = conn.receive(idle_timeout=idle)
                except _varlink.IdleTimeout:
                    self._log(f"uid={peer.uid} pid={peer.pid} idle for {self.timeout:g} s: closed")
                    break
                except _varlink.ProtocolError as exc:
                    self._log(f"uid={peer.uid} pid={peer.pid} BadRequest ({exc}): closed")
                    self._try_send(conn, _bad(str(exc)).reply())
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

    def _try_send(self, conn: _varlink.Connection, reply: JsonObject) -> None:
        try:
            conn.send(reply)
        except _varlink.ProtocolError:
            pass

    def _disconnect(self, conn_id: int, peer: Peer) -> None:
        """The connection is gone: release its devices without waiting for other holders."""
        left = self.ledger.leave(conn_id, peer)
        outcomes = [f"{o.dev.name}:{release(self._service, o, entry)}" for o, entry in left]
        if left:
            self._log(f"uid={peer.uid} pid={peer.pid} disconnect released {','.join(outcomes)}")

    # --- requests -----------------------------------------------------------------

    def _handle(
        self, conn_id: int, peer: Peer, frame: _varlink.Frame
    ) -> tuple[JsonObject | None, list[int]]:
        """The reply to one message and the descriptors to send with it.

        Closes every descriptor of the request; never raises for bad input.
        """
        start = time.monotonic()
        method = "?"
        detail: list[str] = []
        oneway = False
        reply: JsonObject
        fds: list[int] = []
        try:
            call = _varlink.parse_call(frame.payload)
            method, oneway = call.method, call.oneway
            if frame.fds_dropped:
                raise _bad(f"more than {MAX_FDS} file descriptors in one message")
            entry = HANDLERS.get(call.method)
            if entry is None:
                interface = call.method.rpartition(".")[0]
                if interface in (NAME, "org.varlink.service"):
                    raise Refusal(_varlink.METHOD_NOT_FOUND, method=call.method)
                raise Refusal(_varlink.INTERFACE_NOT_FOUND, interface=interface)
            schema, handler = entry
            params = _varlink.check_parameters(call.parameters, schema)
            parameters, fds = handler(self._service, Call(conn_id, peer, frame.fds, detail), params)
            reply = {"parameters": parameters}
            outcome = "ok"
        except _varlink.BadRequest as exc:
            reply, outcome = _bad(str(exc)).reply(), "BadRequest"
        except _varlink.InvalidParameter as exc:
            refusal = Refusal(_varlink.INVALID_PARAMETER, parameter=exc.parameter)
            reply, outcome = refusal.reply(), f"InvalidParameter ({exc})"
        except Refusal as exc:
            reply, outcome = exc.reply(), exc.error.rpartition(".")[2]
            if "message" in exc.parameters:
                outcome += f" ({exc.parameters['message']})"
        except OSError as exc:
            refusal = Refusal.of(exc)
            reply, outcome = refusal.reply(), f"{refusal.error.rpartition('.')[2]} ({exc})"
        except Exception as exc:  # a bug must not take the server down
            refusal = Refusal(f"{NAME}.InternalError", message=f"{type(exc).__name__}: {exc}")
            reply, outcome = refusal.reply(), f"InternalError {traceback.format_exc()!r}"
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

    # --- life cycle ---------------------------------------------------------------

    def stop(self) -> None:
        """End every connection (their devices are released) and wait for the workers."""
        self._stopping.set()
        with self._lock:
            # Under the lock: a worker removes its socket here before closing it.
            for sock in self._socks.values():
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self._pool.stop(timeout=MAX_DETACH_TIMEOUT + 5)
        self.ledger.revoke_all()  # for a worker still busy: we exit, the kernel releases

    def close(self) -> None:
        self.nodes.close()


def _bad(message: str) -> Refusal:
    return Refusal(f"{NAME}.BadRequest", message=message)


def _encode(reply: JsonObject) -> bytes:
    import json

    return json.dumps(reply, separators=(",", ":")).encode() + b"\0"


_log_lock = threading.Lock()
# Control characters (C0, DEL, C1) and the backslash, as Python escapes them.
_CONTROLS = list(range(0x20)) + list(range(0x7F, 0xA0))
_UNPRINTABLE: dict[int, str] = {c: f"\\x{c:02x}" for c in _CONTROLS}
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


def run(args: Args) -> int:
    """``loopdev serve``: serve as the command line asks."""
    policy = Policy(
        users=frozenset(args.allow_user),
        groups=frozenset(args.allow_group),
        max_per_client=args.max_per_client,
        max_devices=args.max_devices,
        allow_block_devices=args.allow_block_devices,
    )
    return serve(
        policy,
        socket_path=args.socket or DEFAULT_SOCKET,
        node_dir=args.node_dir,
        timeout=args.timeout,
    )


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
    try:
        # attach() keeps loop-control and /dev open for the process: opened
        # now, so that the server holds the same descriptors before and after
        # each request (tests/test_broker.py counts them).
        _engine.shared_control()
    except OSError:
        pass  # the first attach says what is wrong
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
    poller = select.poll()
    poller.register(listener.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    try:
        while True:
            if any(fd == wake_r for fd, _ in poller.poll()):
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
