"""Varlink framing over an AF_UNIX stream socket, with file descriptors by SCM_RIGHTS.

A message is one JSON object followed by a NUL byte. File descriptors travel
as SCM_RIGHTS with the first byte of the message they belong to (one
``sendmsg`` per message, as every Varlink implementation sends them). The
receiving side is bounded: a message larger than ``max_message`` or one that
does not complete within ``timeout`` seconds of its first byte ends the
connection; descriptors beyond ``max_fds`` are closed and the message is
marked so that it can be refused.

Also here: the parser of a call (``{"method": ..., "parameters": {...}}``) and
the checker of its parameters, pure functions that the fuzz tests drive.
"""

from __future__ import annotations

import array
import json
import math
import os
import select
import socket
import time
from collections.abc import Mapping, Sequence
from typing import NamedTuple, cast

__all__ = [
    "BadRequest",
    "Call",
    "Connection",
    "Frame",
    "IdleTimeout",
    "InvalidParameter",
    "ProtocolError",
    "check_parameters",
    "parse_call",
]

SCM_MAX_FD = 253  # the kernel's limit of descriptors in one message
_CHUNK = 65536
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

# Standard errors of the org.varlink.service interface.
METHOD_NOT_FOUND = "org.varlink.service.MethodNotFound"
INTERFACE_NOT_FOUND = "org.varlink.service.InterfaceNotFound"
INVALID_PARAMETER = "org.varlink.service.InvalidParameter"

JsonObject = dict[str, object]


def json_object(value: object) -> JsonObject | None:
    """``value`` if it is a JSON object (decoded JSON has only string keys), else None."""
    return cast(JsonObject, value) if isinstance(value, dict) else None


class ProtocolError(Exception):
    """The peer broke the framing (too large, truncated, timed out): the connection ends."""


class IdleTimeout(Exception):
    """No message started within the idle timeout."""


class BadRequest(Exception):
    """A complete message that is not a valid call; the connection can go on."""


class InvalidParameter(Exception):
    """A parameter is missing, unknown, or of the wrong type or range."""

    def __init__(self, parameter: str, why: str) -> None:
        super().__init__(f"parameter {parameter!r}: {why}")
        self.parameter = parameter


class Frame(NamedTuple):
    """One received message: its bytes (without the NUL) and its descriptors."""

    payload: bytes
    fds: list[int]
    fds_dropped: bool  # it came with more than max_fds descriptors; all were closed


class Call(NamedTuple):
    method: str
    parameters: JsonObject
    oneway: bool


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# The socket's own blocking mode and timeout are left alone (setting them is an
# ioctl each time, and a timeout makes Python poll before every call): every
# call is non-blocking and waits in poll() only where it has to. No SIGPIPE.
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_RECV_FLAGS = socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC


def _ready(sock: socket.socket, event: int, timeout: float | None) -> bool:
    """Whether ``sock`` is ready for ``event`` (or closed) within ``timeout`` s (None: ever)."""
    poller = select.poll()
    poller.register(sock, event)
    return bool(poller.poll(-1 if timeout is None else min(math.ceil(timeout * 1000), 2**31 - 1)))


def _fds_from(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % fds.itemsize])
    return list(fds)


class Connection:
    """One end of a Varlink connection; owns ``sock`` and every descriptor received."""

    def __init__(
        self, sock: socket.socket, *, max_message: int, max_fds: int, timeout: float
    ) -> None:
        self.sock = sock
        self.max_message = max_message
        self.max_fds = min(max_fds, SCM_MAX_FD)
        self.timeout = timeout
        self._buf = bytearray()  # starts at a message boundary, holds no complete message
        # Descriptors by message: 0 is the first message in _buf, 1 the next, ...
        self._fds: dict[int, list[int]] = {}
        self._dropped: set[int] = set()
        self._deadline = 0.0

    def receive(self, idle_timeout: float | None = None) -> Frame | None:
        """The next message; None at end of file between messages.

        ``idle_timeout`` bounds the wait for a message to start (None: for
        ever); once it started, it must complete within ``self.timeout``.
        """
        while True:
            end = self._buf.find(b"\0")
            if end >= 0:
                if end > self.max_message:
                    raise ProtocolError(f"message larger than {self.max_message} bytes")
                return self._take(end)
            if len(self._buf) > self.max_message:
                raise ProtocolError(f"message larger than {self.max_message} bytes")
            started = bool(self._buf)
            wait = self._deadline - time.monotonic() if started else idle_timeout
            if (wait is not None and wait <= 0) or not _ready(self.sock, select.POLLIN, wait):
                if started:
                    raise ProtocolError(f"message not completed within {self.timeout:g} s")
                raise IdleTimeout
            try:
                got: tuple[bytes, list[tuple[int, int, bytes]], int, object] = self.sock.recvmsg(
                    _CHUNK, socket.CMSG_SPACE(self.max_fds * 4), _RECV_FLAGS
                )
                data, ancdata, flags, _ = got
            except BlockingIOError:
                continue  # readable, then not: another reader of a shared socket
            except (ConnectionResetError, BrokenPipeError):
                data, ancdata, flags = b"", [], 0
            fds = _fds_from(ancdata)
            if not data:
                close_fds(fds)
                if started:
                    self.discard()
                    raise ProtocolError("connection closed in the middle of a message")
                return None
            if not started:
                self._deadline = time.monotonic() + self.timeout
            if fds or flags & socket.MSG_CTRUNC:
                # The kernel ends a read with the segment that carried
                # descriptors, and a sender's segment starts with its message:
                # they belong to the last message that starts in this read.
                self._add_fds(data.count(b"\0", 0, len(data) - 1), fds, flags)
            self._buf += data

    def _add_fds(self, message: int, fds: list[int], flags: int) -> None:
        held = self._fds.setdefault(message, [])
        if flags & socket.MSG_CTRUNC or len(held) + len(fds) > self.max_fds:
            # The kernel closed what did not fit; we close the rest.
            close_fds(fds + held)
            held.clear()
            self._dropped.add(message)
        else:
            held.extend(fds)

    def _take(self, end: int) -> Frame:
        payload = bytes(self._buf[:end])
        del self._buf[: end + 1]
        fds: list[int] = []
        dropped = False
        if self._fds or self._dropped:
            fds = self._fds.pop(0, [])
            dropped = 0 in self._dropped
            self._fds = {k - 1: v for k, v in self._fds.items()}
            self._dropped = {k - 1 for k in self._dropped if k}
        if self._buf:  # the next message began in the same read
            self._deadline = time.monotonic() + self.timeout
        return Frame(payload, fds, dropped)

    def send(self, message: Mapping[str, object], fds: Sequence[int] = ()) -> None:
        """Send one message; ``fds`` go with its first byte. Raises ``ProtocolError``."""
        data = memoryview(json.dumps(message, separators=(",", ":")).encode() + b"\0")
        ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        deadline = time.monotonic() + self.timeout
        sent = 0
        while sent < len(data):
            try:
                if sent == 0:
                    sent = self.sock.sendmsg([data], ancdata if fds else [], _SEND_FLAGS)
                else:
                    sent += self.sock.send(data[sent:], _SEND_FLAGS)
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not _ready(self.sock, select.POLLOUT, left):
                    raise ProtocolError(f"peer did not read within {self.timeout:g} s") from None
            except OSError as exc:
                raise ProtocolError(f"send failed: {exc.strerror}") from None

    def discard(self) -> None:
        """Close descriptors of messages that will never complete."""
        for fds in self._fds.values():
            close_fds(fds)
        self._fds = {}

    def close(self) -> None:
        self.discard()
        self.sock.close()


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_call(payload: bytes) -> Call:
    """A Varlink call from one message's bytes; ``BadRequest`` for anything else."""
    try:
        decoded: object = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and over-long integers.
        raise BadRequest(f"not a JSON object: {str(exc)[:200]}") from None
    obj = json_object(decoded)
    if obj is None:
        raise BadRequest("a call must be a JSON object")
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise BadRequest("a call needs a string 'method'")
    given = obj.get("parameters")
    parameters = {} if given is None else json_object(given)
    if parameters is None:
        raise BadRequest("'parameters' must be a JSON object")
    oneway = obj.get("oneway", False)
    if not isinstance(oneway, bool):
        raise BadRequest("'oneway' must be true or false")
    return Call(method, parameters, oneway)


# A parameter's type: "int", "bool", "string" or "float"; and whether it may be absent.
Schema = Mapping[str, tuple[str, bool]]


def _type_ok(kind: str, value: object) -> bool:
    if kind == "int":
        return type(value) is int and _INT_MIN <= value <= _INT_MAX
    if kind == "bool":
        return type(value) is bool
    if kind == "string":
        return type(value) is str
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value)  # type: ignore[arg-type]
    raise AssertionError(f"unknown schema type {kind}")


def check_parameters(parameters: JsonObject, schema: Schema) -> JsonObject:
    """``parameters`` checked against ``schema``; absent and null optionals become None."""
    for name in parameters:
        if name not in schema:
            raise InvalidParameter(name, "unknown parameter")
    checked: JsonObject = {}
    for name, (kind, optional) in schema.items():
        value = parameters.get(name)
        if value is None:
            if not optional:
                raise InvalidParameter(name, "missing")
            checked[name] = None
        elif not _type_ok(kind, value):
            raise InvalidParameter(name, f"must be {kind} (64-bit for int)")
        else:
            checked[name] = value
    return checked
