"""Helpers for the broker tests: a real ``loopdev serve`` and unprivileged clients.

The server runs as a child process (root) on a socket in a private directory
and is stopped with SIGTERM; clients run as other users through ``setpriv``.
Images live in a directory that those users can reach (pytest's tmp_path is
0700 under /tmp/pytest-of-root), removed afterwards.
"""

from __future__ import annotations

import errno
import functools
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import images
import pytest
from helpers import poll

from loopdev import _varlink

NOBODY, NOGROUP = 65534, 65534
OUTSIDER = 4242  # a uid no policy in these tests allows
MiB = 1 << 20
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SETPRIV = shutil.which("setpriv", path=_TOOL_PATH)
REQUIRE = os.environ.get("LOOPDEV_REQUIRE_DEVICES") == "1"
# Whether a client running as nobody is required too (default: with the devices).
# An interpreter nobody cannot run (one below a root-only home, linked to a
# libpython there) cannot run these clients at all: CI then sets it to 0 and
# requires it of another interpreter.
REQUIRE_UNPRIVILEGED = (
    os.environ.get("LOOPDEV_REQUIRE_UNPRIVILEGED", "1" if REQUIRE else "0") == "1"
)

# What every client program starts with; the broker comes from LOOPDEV_BROKER.
PRELUDE = """\
import errno, json, os, stat, sys, time
import loopdev
from loopdev import broker_client as bc
B = os.environ["LOOPDEV_BROKER"]
def out(**kw):
    print(json.dumps(kw), flush=True)
"""


@functools.cache
def unprivileged_reason() -> str | None:
    """Why unprivileged clients cannot run here, or None. Asked once per run: every
    test with the ``space`` fixture asks, and the probe starts an interpreter."""
    if os.geteuid() != 0:
        return "the broker tests start a root server"
    if SETPRIV is None:
        return "setpriv (util-linux) missing"
    user = [f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"]
    probe = subprocess.run(
        [SETPRIV, *user, sys.executable, "-c", "import loopdev.broker_client"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return (
            f"nobody cannot run {sys.executable} with loopdev importable (make the "
            f"environment world-readable): {probe.stderr.strip()[-300:]}"
        )
    return None


def require_unprivileged() -> None:
    reason = unprivileged_reason()
    if reason is not None:
        if REQUIRE_UNPRIVILEGED:
            pytest.fail(f"LOOPDEV_REQUIRE_DEVICES=1 (or _UNPRIVILEGED) but {reason}")
        pytest.skip(reason)


@contextmanager
def shared_dir() -> Iterator[Path]:
    """A directory every user can reach (not list or write), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="loopdev-broker-test."))
    os.chmod(path, 0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_image(path: Path, size: int = 4 * MiB, owner: int | None = NOBODY) -> Path:
    images.make_image(path, size)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


# p1 at 1 MiB (4 MiB long), p2 at 6 MiB (4 MiB long), in 512-byte sectors.
GPT_PARTS = ((1 * MiB, 4 * MiB), (6 * MiB, 4 * MiB))


def gpt_image(path: Path, owner: int | None = NOBODY) -> Path:
    images.gpt_image(path, 12 * MiB, GPT_PARTS)
    if owner is not None:
        os.chown(path, owner, owner)
    return path


def backing_of(name: str) -> str | None:
    try:
        with open(f"/sys/block/{name}/loop/backing_file") as f:
            return f.read().strip() or None
    except OSError:
        return None


def bound_under(prefix: Path) -> list[str]:
    want = str(prefix).rstrip("/") + "/"
    return sorted(
        n
        for n in os.listdir("/sys/block")
        if n.startswith("loop") and (backing_of(n) or "").startswith(want)
    )


def partitions_of(name: str) -> list[str]:
    try:
        return sorted(e for e in os.listdir(f"/sys/block/{name}") if e.startswith(f"{name}p"))
    except FileNotFoundError:
        return []


def handover_dirs_named(pid: int) -> set[str]:
    """The hand-over directories named for broker ``pid``, alive or dead (the name
    carries the pid; only brokers older than that rule made others)."""
    return set(glob.glob(f"/dev/.loopdev-broker.{pid}.*"))


def handover_dirs_of(pid: int) -> set[str]:
    """The hand-over directories process ``pid`` (a broker) holds open.

    Only its own: other brokers on this machine (other tests, other runs)
    come and go with their directories meanwhile.
    """
    found = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed meanwhile
        if os.path.basename(target).startswith(".loopdev-broker."):
            found.add(target)
    return found


class Server:
    """A running ``loopdev serve``; ``stop()`` sends SIGTERM and checks it went cleanly."""

    def __init__(self, directory: Path, *args: str, name: str = "broker") -> None:
        self.socket = str(directory / f"{name}.sock")
        self.log = directory / f"{name}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "loopdev", "serve", "--socket", self.socket, *args],
                stdout=log,
                stderr=log,
                env={k: v for k, v in os.environ.items() if k != "LOOPDEV_BROKER"},
            )
        if not poll(self._ready, 15):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"broker did not start: {self.log.read_text()}")
        self._handover = handover_dirs_of(self.proc.pid)

    def _ready(self) -> bool:
        """The server answers a call (so its accept loop runs)."""
        if self.proc.poll() is not None:
            raise AssertionError(f"broker exited: {self.log.read_text()}")
        try:
            reply, _ = call(self.socket, "org.varlink.service.GetInfo")
        except OSError:
            return False
        return reply is not None and "parameters" in reply

    def fds(self) -> int:
        """How many descriptors the server has open (the probe's connection may still close)."""
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def settled_fds(self) -> int:
        """The descriptor count once it stopped changing (connections done closing)."""
        counts = [self.fds()]
        while len(counts) < 3 or len(set(counts[-3:])) > 1:
            time.sleep(0.02)
            counts.append(self.fds())
        return counts[-1]

    def wait_fds(self, baseline: int, timeout: float = 5.0) -> int:
        """The server's descriptor count once back at ``baseline`` (or after ``timeout``)."""
        poll(lambda: self.fds() <= baseline, timeout)
        return self.fds()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError("broker did not stop on SIGTERM") from None
        text = self.log_text()
        assert self.proc.returncode == 0, text
        assert "Traceback" not in text and "internal error" not in text, text
        left = [d for d in self._handover if os.path.lexists(d)]
        assert not left, f"hand-over directory left: {left}"
        assert not os.path.exists(self.socket), "socket left behind"


def as_user(
    code: str,
    *args: str,
    uid: int = NOBODY,
    gid: int = NOGROUP,
    groups: Sequence[int] = (),
    broker: str = "",
    wait: bool = True,
    timeout: float = 120,
) -> Any:
    """Run PRELUDE + ``code`` as ``uid``; the JSON lines it printed (or the Popen)."""
    cmd = [SETPRIV or "setpriv", f"--reuid={uid}", f"--regid={gid}"]
    cmd += [f"--groups={','.join(map(str, groups))}"] if groups else ["--clear-groups"]
    cmd += [sys.executable, "-c", PRELUDE + code, *args]
    env = {"PATH": "/usr/bin:/bin", "LOOPDEV_BROKER": broker, "HOME": "/"}
    if not wait:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    assert done.returncode == 0, f"client failed:\n{done.stdout}\n{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


# --- raw protocol, for bad input ----------------------------------------------------


def raw_connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.connect(path)
    sock.settimeout(10)
    return sock


def raw_send(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.sendall(data)


def raw_reply(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """The next reply and its descriptors; None when the server closed the connection."""
    conn = _varlink.Connection(sock, max_message=1 << 24, max_fds=253, timeout=10)
    frame = conn.receive(idle_timeout=10)
    if frame is None:
        return None, []
    return json.loads(frame.payload), frame.fds


def call(
    path_or_sock: str | socket.socket,
    method: str,
    parameters: dict[str, Any] | None = None,
    fds: Sequence[int] = (),
) -> tuple[dict[str, Any] | None, list[int]]:
    sock = raw_connect(path_or_sock) if isinstance(path_or_sock, str) else path_or_sock
    message = {"method": method, "parameters": parameters or {}}
    raw_send(sock, json.dumps(message).encode() + b"\0", fds)
    try:
        return raw_reply(sock)
    finally:
        if isinstance(path_or_sock, str):
            sock.close()


def closed_by_server(sock: socket.socket, timeout: float = 10) -> bool:
    """Whether the server closed ``sock`` (an error reply before EOF is allowed)."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError as exc:
        return exc.errno in (errno.ECONNRESET, errno.EPIPE)
