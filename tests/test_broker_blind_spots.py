"""The broker at the edges no other test reached (issue 19), as a client sees it.

- a read-only grant with partscan hands the partitions over read-only too:
  their descriptors are O_RDONLY and no write reaches the image through them
  or through their paths;
- the descriptor limit per message is exact: 8 pass (and the 8th is the one
  an Attach can name), 9 are refused;
- Detach waits at most its cap (10 s) however long the client asks for, on a
  device another process holds.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerlib import (
    GPT_PARTS,
    MiB,
    Server,
    as_user,
    bound_under,
    call,
    gpt_image,
    make_image,
    poll,
    raw_connect,
    raw_send,
)

from loopdev import _native, _varlink, broker


@pytest.fixture
def server(space: Path) -> Iterator[Server]:
    srv = Server(space, "--allow-user", "nobody")
    try:
        yield srv
    finally:
        srv.stop()


def test_read_only_grant_hands_partitions_over_read_only(space: Path, server: Server) -> None:
    image = gpt_image(space / "ro-parts.img")
    got = as_user(
        """
import fcntl
fd = os.open(sys.argv[1], os.O_RDONLY)
dev = loopdev.attach(fd, partscan=True)  # read-only: the descriptor decides
res = []
for handed in [dev] + dev.partitions:
    r = dict(name=handed.name, access=fcntl.fcntl(handed.fd, fcntl.F_GETFL) & os.O_ACCMODE)
    try:
        os.pwrite(handed.fd, b"W" * 512, 0)
        r["write_fd"] = "written"
    except OSError as exc:
        r["write_fd"] = exc.errno
    try:
        again = os.open(handed.path, os.O_RDWR)
    except OSError as exc:
        r["write_path"] = exc.errno
    else:
        try:
            os.pwrite(again, b"W" * 512, 0)
            os.fsync(again)
            r["write_path"] = "written"
        except OSError as exc:
            r["write_path"] = exc.errno
        os.close(again)
    res.append(r)
out(handed=res, read_only=dev.info().read_only)
dev.detach()
os.close(fd)
""",
        str(image),
        broker=server.socket,
    )
    (info,) = got
    assert info["read_only"] is True
    handed = info["handed"]
    assert len(handed) == 1 + len(GPT_PARTS), handed
    refused = (errno.EBADF, errno.EPERM, errno.EROFS, errno.EACCES)
    for entry in handed:
        assert entry["access"] == os.O_RDONLY, entry
        assert entry["write_fd"] in refused, entry
        assert entry["write_path"] in refused, entry
    data = image.read_bytes()
    for start, _ in GPT_PARTS:
        assert b"W" not in data[start : start + 512]


def _pipes(n: int, stack: list[int]) -> list[int]:
    """``n`` write ends (both ends of each go on ``stack`` to be closed)."""
    writers = []
    for _ in range(n):
        r, w = os.pipe2(os.O_CLOEXEC)
        stack += [r, w]
        writers.append(w)
    return writers


def test_descriptor_limit_is_exact(space: Path, server: Server) -> None:
    assert broker.MAX_FDS == 8
    image = make_image(space / "eighth.img", 1 * MiB)
    stack: list[int] = []
    try:
        extra = _pipes(broker.MAX_FDS, stack)
        # Exactly the limit: served.
        reply, _ = call(server.socket, "io.loopdev.List", {}, extra[: broker.MAX_FDS])
        assert reply == {"parameters": {"devices": []}}
        # One more: refused.
        reply, _ = call(server.socket, "io.loopdev.List", {}, [*extra, extra[0]])
        assert reply is not None and reply["error"] == "io.loopdev.BadRequest", reply
        assert f"more than {broker.MAX_FDS}" in reply["parameters"]["message"]
        # The 8th descriptor of 8 is the backing file an Attach names.
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        stack.append(fd)
        sock = raw_connect(server.socket)
        try:
            reply, fds = call(sock, "io.loopdev.Attach", {"file": 7}, [*extra[:7], fd])
            assert reply is not None and "parameters" in reply, reply
            name = reply["parameters"]["device"]["name"]
            assert bound_under(space) == [name]
            for handed in fds:
                os.close(handed)
        finally:
            sock.close()  # releases the device
    finally:
        for fd in stack:
            os.close(fd)


def _detach_reply(sock: socket.socket, name: str, timeout: float) -> dict[str, Any] | None:
    """Send Detach; the reply, waited for up to a minute (the cap is 10 s)."""
    message = {"method": "io.loopdev.Detach", "parameters": {"name": name, "timeout": timeout}}
    raw_send(sock, json.dumps(message).encode() + b"\0")
    conn = _varlink.Connection(sock, max_message=1 << 20, max_fds=8, timeout=60)
    frame = conn.receive(idle_timeout=60)
    return None if frame is None else dict(json.loads(frame.payload))


def test_detach_waits_at_most_its_cap(space: Path, server: Server) -> None:
    """A client asks Detach to wait an hour for a device this process holds open: the
    broker answers DeviceBusy after its cap, and the device goes at the last close."""
    image = make_image(space / "held.img", 1 * MiB)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    sock = raw_connect(server.socket)
    holder = -1
    try:
        reply, fds = call(sock, "io.loopdev.Attach", {"file": 0}, [fd])
        assert reply is not None and "parameters" in reply, reply
        name = reply["parameters"]["device"]["name"]
        for handed in fds:
            os.close(handed)
        holder = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        started = time.monotonic()
        reply = _detach_reply(sock, name, 3600.0)
        took = time.monotonic() - started
        assert reply is not None and reply["error"] == "io.loopdev.DeviceBusy", reply
        assert broker.MAX_DETACH_TIMEOUT - 1 < took < broker.MAX_DETACH_TIMEOUT + 20, took
        assert bound_under(space) == [name]  # held: the kernel keeps it until the last close
    finally:
        if holder >= 0:
            os.close(holder)
        sock.close()
        os.close(fd)
    assert poll(lambda: not bound_under(space), 5)


# --- paths the coverage pass found untaken ---------------------------------------------


@pytest.mark.parametrize("held", [1, 2])
def test_detach_with_a_partition_held_keeps_the_device(
    space: Path, server: Server, held: int
) -> None:
    """A partition is open elsewhere: Detach is DeviceBusy and changes nothing (the
    device stays the connection's, listed, its partitions under the same numbers,
    the handed-over nodes open again); once let go, Detach succeeds.

    Held in turn: whichever partition the kernel lists first, one of the two runs
    holds one listed after another. Deleting that other one and adding it back
    gave it a new minor (about 1 run in 8 before, by the device's name): the
    broker then answered ENXIO and kept the device, half revoked.
    """
    image = gpt_image(space / "held-part.img")
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    sock = raw_connect(server.socket)
    holder = -1
    refs: list[int] = []
    try:
        reply, fds = call(sock, "io.loopdev.Attach", {"file": 0, "partscan": True}, [fd])
        assert reply is not None and "parameters" in reply, reply
        name = reply["parameters"]["device"]["name"]
        for handed in fds:  # what a client keeps: references, not open descriptors
            refs.append(os.open(f"/proc/self/fd/{handed}", _native.O_PATH | os.O_CLOEXEC))
            os.close(handed)
        numbers = _numbers(name)
        assert len(numbers) == 1 + len(GPT_PARTS)
        poll(lambda: os.path.exists(f"/dev/{name}p{held}"), 5)
        holder = os.open(f"/dev/{name}p{held}", os.O_RDONLY | os.O_CLOEXEC)
        reply = _detach_reply(sock, name, 1.0)
        assert reply is not None and reply["error"] == "io.loopdev.DeviceBusy", reply
        reply, _ = call(sock, "io.loopdev.List")
        assert reply is not None
        assert [d["name"] for d in reply["parameters"]["devices"]] == [name]
        assert len(reply["parameters"]["devices"][0]["partitions"]) == len(GPT_PARTS)
        assert _numbers(name) == numbers  # nothing deleted and added back
        for ref, number in zip(refs, numbers, strict=True):
            st = os.stat(f"/proc/self/fd/{ref}")
            assert (st.st_rdev, st.st_mode & 0o777) == (number, 0o666)
        os.close(holder)
        holder = -1
        assert _detach_reply(sock, name, 5.0) == {"parameters": {}}
        for ref in refs:  # revoked once the device is gone
            assert os.stat(f"/proc/self/fd/{ref}").st_mode & 0o777 == 0
    finally:
        if holder >= 0:
            os.close(holder)
        _varlink.close_fds(refs)
        sock.close()
        os.close(fd)


def _numbers(name: str) -> list[int]:
    """The device numbers of ``name`` and its partitions, in partition order."""
    paths = [f"/sys/block/{name}"]
    paths += [f"/sys/block/{name}/{name}p{n}" for n in range(1, len(GPT_PARTS) + 1)]
    numbers = []
    for path in paths:
        with open(f"{path}/dev") as f:
            major, minor = f.read().split(":")
        numbers.append(os.makedev(int(major), int(minor)))
    return numbers


def test_interface_description_of_another_interface(server: Server) -> None:
    reply, _ = call(
        server.socket, "org.varlink.service.GetInterfaceDescription", {"interface": "org.x"}
    )
    assert reply is not None and reply["error"] == "org.varlink.service.InterfaceNotFound"
    assert reply["parameters"] == {"interface": "org.x"}


def _serve(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loopdev", "serve", *args],
        capture_output=True,
        text=True,
        timeout=30,
        **kwargs,
    )


def test_socket_path_that_is_a_file_or_a_stale_socket(space: Path) -> None:
    """A file in the way is refused and kept; a socket no broker answers on (one that
    died) is replaced."""
    in_the_way = space / "file.sock"
    in_the_way.write_text("mine")
    done = _serve("--socket", str(in_the_way))
    assert done.returncode == 1 and "not a socket" in done.stderr, done.stderr
    assert in_the_way.read_text() == "mine"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(space / "stale.sock"))
    stale.close()
    srv = Server(space, "--allow-user", "nobody", name="stale")
    srv.stop()


def test_socket_activation_with_the_wrong_sockets(space: Path) -> None:
    """LISTEN_FDS=2, or fd 3 a datagram socket: refused with a message, not served."""
    launcher = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS=sys.argv[2], LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'loopdev', 'serve',"
        " '--socket', sys.argv[3]])\n"
    )
    unused = str(space / "not-this.sock")
    for kind, count, expected in [
        (socket.SOCK_STREAM, "2", "expected one socket"),
        (socket.SOCK_DGRAM, "1", "not a Unix stream socket"),
    ]:
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            done = subprocess.run(
                [sys.executable, "-c", launcher, str(sock.fileno()), count, unused],
                pass_fds=[sock.fileno()],
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            sock.close()
        assert done.returncode == 1 and expected in done.stderr, done.stderr
        assert not os.path.exists(unused)
