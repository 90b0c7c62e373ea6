"""The broker (``loopdev serve``) with unprivileged clients, on real loop devices.

The server runs as root; clients run as ``nobody`` (and as a uid outside the
policy) through ``setpriv``. Covered: data through the device and a partition
at the right offsets, the file access decided by the client's own
permissions and descriptor mode, hand-over descriptors that are linked
nowhere, release on SIGKILL, policy and limits with typed errors, every kind
of bad input, socket activation, SIGTERM, and 32 concurrent clients.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from brokerlib import (
    GPT_PARTS,
    OUTSIDER,
    MiB,
    Server,
    as_user,
    bound_under,
    call,
    closed_by_server,
    gpt_image,
    handover_dirs_named,
    handover_dirs_of,
    make_image,
    partitions_of,
    poll,
    raw_connect,
    raw_reply,
    raw_send,
)

import loopdev
from loopdev import _interface, _varlink, broker

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def start(space: Path) -> Iterator[Callable[..., Server]]:
    """Start brokers (root, allowing nobody unless told otherwise); stopped with SIGTERM."""
    servers: list[Server] = []

    def run(*args: str, allow_nobody: bool = True) -> Server:
        extra = ("--allow-user", "nobody") if allow_nobody else ()
        server = Server(space, *extra, *args, name=f"broker{len(servers)}")
        servers.append(server)
        return server

    yield run
    for server in servers:
        server.stop()


@pytest.fixture
def server(start: Callable[..., Server]) -> Server:
    return start()


def serving(server: Server) -> None:
    """The server still answers a normal request, and a real attach."""
    reply, _ = call(server.socket, "org.varlink.service.GetInfo")
    assert reply is not None and reply["parameters"]["product"] == "loopdev broker"
    dev = loopdev.attach(
        os.path.join(os.path.dirname(server.socket), "ok.img"), broker=server.socket
    )
    dev.detach()


# --- 1. what an unprivileged client gets ---------------------------------------------


def test_nobody_writes_through_device_and_partition(space: Path, server: Server) -> None:
    image = gpt_image(space / "gpt.img")
    got = as_user(
        """
dev = loopdev.attach(sys.argv[1], partscan=True)
parts = dev.partitions
fds = [dev.fd] + [p.fd for p in parts]
sts = [os.fstat(fd) for fd in fds]
fd = os.open(dev.path, os.O_RDWR)
os.pwrite(fd, b"D" * 512, 100 * 512)
os.close(fd)
fd = os.open(parts[1].path, os.O_RDWR)
os.pwrite(fd, b"P" * 512, 4096)
os.close(fd)
pid = os.fork()
if pid == 0:  # a child of the client reaches the paths too
    try:
        for path in [dev.path] + [p.path for p in parts]:
            os.close(os.open(path, os.O_RDONLY))
        os._exit(0)
    except BaseException:
        os._exit(1)
child = os.waitpid(pid, 0)[1]
out(
    kind=type(dev).__name__, isinstance=isinstance(dev, loopdev.LoopDevice), name=dev.name,
    path=dev.path, parts=[[p.number, p.start, p.size, p.path] for p in parts],
    nlink=[s.st_nlink for s in sts], uid=[s.st_uid for s in sts],
    mode=[stat.S_IMODE(s.st_mode) for s in sts], blk=all(stat.S_ISBLK(s.st_mode) for s in sts),
    child=child, ro=dev.info().read_only,
)
dev.detach()
out(after=dev.fd)
""",
        str(image),
        broker=server.socket,
    )
    info = got[0]
    assert info["kind"] == "LoopDevice" and info["isinstance"]
    assert info["path"].startswith("/proc/") and "/fd/" in info["path"]
    assert [(n, s, z) for n, s, z, _ in info["parts"]] == [
        (i + 1, start, size) for i, (start, size) in enumerate(GPT_PARTS)
    ]
    assert all(p.startswith("/proc/") for *_, p in info["parts"])
    # Linked nowhere, root's (the client cannot chmod them), 0666, block devices.
    assert info["nlink"] == [0, 0, 0] and info["uid"] == [0] * 3
    assert info["mode"] == [0o666] * 3 and info["blk"] and info["child"] == 0
    assert info["ro"] is False and got[1] == {"after": -1}
    data = image.read_bytes()
    assert data[100 * 512 : 101 * 512] == b"D" * 512
    p2 = GPT_PARTS[1][0] + 4096
    assert data[p2 : p2 + 512] == b"P" * 512
    assert not bound_under(space)
    assert not list(Path("/dev").glob(".loopdev-broker.*/*")), "a node stayed in the directory"


def test_a_child_program_formats_through_the_path(space: Path, server: Server) -> None:
    mkfs = shutil.which("mkfs.ext4", path="/usr/sbin:/sbin:/usr/bin")
    if mkfs is None:
        pytest.skip("mkfs.ext4 (e2fsprogs) missing")
    image = make_image(space / "fs.img", size=16 * MiB)
    got = as_user(
        """
import subprocess
with loopdev.attach(sys.argv[1]) as dev:
    done = subprocess.run([sys.argv[2], "-q", "-F", dev.path], capture_output=True, text=True)
    out(rc=done.returncode, err=done.stderr)
""",
        str(image),
        mkfs,
        broker=server.socket,
    )
    assert got == [{"rc": 0, "err": ""}]
    assert image.read_bytes()[1024 + 0x38 : 1024 + 0x3A] == b"\x53\xef"  # ext4 magic


def test_handed_over_inode_cannot_be_linked_even_by_root(space: Path, server: Server) -> None:
    image = make_image(space / "link.img", owner=None)
    with loopdev.attach(image, broker=server.socket) as dev:
        libc = ctypes.CDLL(None, use_errno=True)
        at_empty_path, at_fdcwd = 0x1000, -100
        target = f"/dev/.loopdev-test-link-{os.getpid()}"
        assert libc.linkat(dev.fd, b"", at_fdcwd, target.encode(), at_empty_path) == -1
        assert ctypes.get_errno() == errno.ENOENT  # no links: the kernel refuses
        with pytest.raises(OSError):
            os.link(dev.path, target, follow_symlinks=True)
        assert not os.path.exists(target)


def test_file_the_client_cannot_open_is_refused_in_the_client(space: Path, server: Server) -> None:
    secret = make_image(space / "root.img", owner=None)
    os.chmod(secret, 0o600)
    got = as_user(
        """
try:
    loopdev.attach(sys.argv[1])
except OSError as exc:
    out(kind=type(exc).__name__, errno=exc.errno, perm=isinstance(exc, PermissionError),
        backing=isinstance(exc, loopdev.BackingFileError))
for ro in (True, False):  # not read-only either
    try:
        loopdev.attach(sys.argv[1], read_only=ro)
    except loopdev.BackingFileError as exc:
        out(ro=ro, errno=exc.errno)
""",
        str(secret),
        broker=server.socket,
    )
    assert got[0] == {
        "kind": "BackingFileError",
        "errno": errno.EACCES,
        "perm": False,
        "backing": True,
    }
    assert got[1:] == [{"ro": True, "errno": errno.EACCES}, {"ro": False, "errno": errno.EACCES}]
    assert "Attach" not in server.log_text()  # the broker never saw the file
    assert not bound_under(space)


def test_read_only_descriptor_gives_a_read_only_device(space: Path, server: Server) -> None:
    image = make_image(space / "ro.img")
    got = as_user(
        """
import fcntl, struct
fd = os.open(sys.argv[1], os.O_RDONLY)
dev = loopdev.attach(fd)  # read_only not asked: the descriptor decides
BLKROGET = 0x125E
ro = struct.unpack("i", fcntl.ioctl(dev.fd, BLKROGET, b"\\0" * 4))[0]
res = dict(read_only=dev.info().read_only, sysfs=dev.info().read_only, blkroget=ro,
           mode=stat.S_IMODE(os.fstat(dev.fd).st_mode))
try:
    os.open(dev.path, os.O_RDWR)
    res["open_rw"] = "opened"
except OSError as exc:
    res["open_rw"] = exc.errno
try:
    os.pwrite(dev.fd, b"x" * 512, 0)
    res["write_fd"] = "written"
except OSError as exc:
    res["write_fd"] = exc.errno
out(**res)
dev.detach()
os.close(fd)
""",
        str(image),
        broker=server.socket,
    )
    assert got == [
        {
            "read_only": True,
            "sysfs": True,
            "blkroget": 1,
            "mode": 0o444,
            "open_rw": errno.EACCES,
            "write_fd": errno.EBADF,
        }
    ]
    assert image.read_bytes()[:512] == b"\0" * 512
    # The same through a raw request that asks for read-write explicitly.
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    sock = raw_connect(server.socket)
    try:
        reply, fds = call(sock, "io.loopdev.Attach", {"file": 0, "read_only": False}, [fd])
        assert reply is not None and reply["parameters"]["device"]["read_only"] is True
        name = reply["parameters"]["device"]["name"]
        assert open(f"/sys/block/{name}/ro").read().strip() == "1"
        assert fcntl.fcntl(fds[0], fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        for f in fds:
            os.close(f)
    finally:
        sock.close()
        os.close(fd)


def test_sigkilled_client_with_three_devices_leaves_nothing(space: Path, server: Server) -> None:
    images = [
        gpt_image(space / "k0.img"),
        make_image(space / "k1.img"),
        make_image(space / "k2.img"),
    ]
    proc = as_user(
        """
devs = [loopdev.attach(sys.argv[1], partscan=True)]
devs += [loopdev.attach(p) for p in sys.argv[2:]]
out(names=[d.name for d in devs], parts=[p.name for p in devs[0].partitions])
time.sleep(3600)
""",
        *map(str, images),
        broker=server.socket,
        wait=False,
    )
    try:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        held = json.loads(line)
        assert len(held["names"]) == 3 and len(held["parts"]) == 2
        assert partitions_of(held["names"][0]) == held["parts"]
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()

        def released() -> bool:
            return not bound_under(space) and not partitions_of(held["names"][0])

        assert poll(released, 1.0), (bound_under(space), partitions_of(held["names"][0]))
        took = time.monotonic() - killed
        assert took < 1.0
    finally:
        proc.kill()
        proc.wait()
    assert poll(lambda: "disconnect released" in server.log_text(), 5)
    serving_as_nobody(space, server)


def test_device_a_child_holds_is_released_at_its_last_close_and_counted_until_then(
    space: Path, start: Callable[..., Server]
) -> None:
    server = start("--max-per-client", "1")
    image = gpt_image(space / "child.img")
    got = as_user(
        """
import subprocess
dev = loopdev.attach(sys.argv[1], partscan=True)
name, part = dev.name, dev.partitions[0]
child = subprocess.Popen(["sleep", "1"], pass_fds=[dev.fd, part.fd])
dev.close()  # the connection ends; the child still holds the device and a partition
try:
    loopdev.attach(sys.argv[1]).detach()
    out(limited=False)
except bc.LimitReached:
    out(limited=True, name=name)
child.wait()
deadline = time.monotonic() + 2
while True:
    try:
        loopdev.attach(sys.argv[1]).detach()
        out(again=True)
        break
    except bc.LimitReached:
        assert time.monotonic() < deadline, "still counted after the holder exited"
        time.sleep(0.01)
""",
        str(image),
        broker=server.socket,
    )
    assert got[0]["limited"] is True and got[1] == {"again": True}
    assert poll(lambda: not bound_under(space) and not partitions_of(got[0]["name"]), 1)
    assert "pending" in server.log_text()


def serving_as_nobody(space: Path, server: Server) -> None:
    image = space / "ok.img"
    if not image.exists():
        make_image(image)
    got = as_user(
        "d = loopdev.attach(sys.argv[1]); out(name=d.name); d.detach()",
        str(image),
        broker=server.socket,
    )
    assert got[0]["name"].startswith("loop")


# --- 2. policy and limits ----------------------------------------------------------


def test_user_outside_the_policy_is_refused(space: Path, server: Server) -> None:
    image = make_image(space / "outsider.img", owner=OUTSIDER)
    got = as_user(
        """
for method in (lambda: loopdev.attach(sys.argv[1]), lambda: bc.list_devices(B)):
    try:
        method()
    except bc.PermissionDenied as exc:
        out(errno=exc.errno, perm=isinstance(exc, PermissionError), text=str(exc))
""",
        str(image),
        uid=OUTSIDER,
        gid=OUTSIDER,
        broker=server.socket,
    )
    assert [(g["errno"], g["perm"]) for g in got] == [(errno.EACCES, True)] * 2
    assert f"uid {OUTSIDER} is not allowed" in got[0]["text"]
    assert not bound_under(space)
    make_image(space / "ok.img")
    serving(server)
    serving_as_nobody(space, server)


def test_groups_decide_with_supplementary_groups(space: Path, start: Callable[..., Server]) -> None:
    group = 4343
    server = start("--allow-group", str(group), allow_nobody=False)
    image = make_image(space / "g.img", owner=OUTSIDER)
    os.chmod(image, 0o666)
    code = """
try:
    d = loopdev.attach(sys.argv[1]); d.detach(); out(ok=True)
except bc.PermissionDenied:
    out(ok=False)
"""
    sock = server.socket
    assert as_user(code, str(image), uid=OUTSIDER, gid=OUTSIDER, broker=sock) == [{"ok": False}]
    assert as_user(code, str(image), uid=OUTSIDER, gid=group, broker=sock) == [{"ok": True}]
    got = as_user(code, str(image), uid=OUTSIDER, gid=OUTSIDER, groups=[group], broker=sock)
    assert got == [{"ok": True}]
    assert as_user(code, str(image), broker=sock) == [{"ok": False}]  # nobody: not in the group


def test_seventeenth_device_is_refused(space: Path, server: Server) -> None:
    image = make_image(space / "many.img", size=1 * MiB)
    got = as_user(
        """
devs = [loopdev.attach(sys.argv[1]) for _ in range(16)]
try:
    loopdev.attach(sys.argv[1])
except bc.LimitReached as exc:
    out(errno=exc.errno, nofree=isinstance(exc, loopdev.NoFreeDevice), text=str(exc),
        bound=len([d for d in loopdev.devices() if d.backing_file == sys.argv[1]]),
        listed=len(bc.list_devices(B)))
devs.pop().detach()
again = loopdev.attach(sys.argv[1])  # room again
out(again=again.name)
for d in devs + [again]:
    d.detach()
""",
        str(image),
        broker=server.socket,
    )
    assert got[0]["errno"] == errno.EDQUOT and got[0]["nofree"]
    assert "16 devices" in got[0]["text"]
    assert got[0]["bound"] == 16 and got[0]["listed"] == 16
    assert got[1]["again"].startswith("loop")
    assert "LimitReached" in server.log_text()
    make_image(space / "ok.img")
    serving(server)


def test_total_limit(space: Path, start: Callable[..., Server]) -> None:
    server = start("--max-devices", "2")
    image = make_image(space / "t.img", size=1 * MiB, owner=None)
    os.chmod(image, 0o666)
    devs = [loopdev.attach(image, broker=server.socket) for _ in range(2)]
    try:
        got = as_user(
            "try:\n    loopdev.attach(sys.argv[1])\n"
            "except bc.LimitReached as exc:\n    out(text=str(exc))",
            str(image),
            broker=server.socket,
        )
        assert "serves 2 devices" in got[0]["text"]
    finally:
        for dev in devs:
            dev.detach()
    assert not bound_under(space)


def test_connections_per_client_are_limited(space: Path, start: Callable[..., Server]) -> None:
    server = start("--max-per-client", "2")  # 2 * 2 + 16 = 20 connections per user
    baseline = server.settled_fds()
    held = [raw_connect(server.socket) for _ in range(20)]
    try:
        for sock in held[:3]:
            reply, _ = call(sock, "io.loopdev.List")
            assert reply == {"parameters": {"devices": []}}
        reply, _ = call(server.socket, "io.loopdev.List")  # the 21st
        assert reply is not None and reply["error"] == "io.loopdev.LimitReached"
        assert reply["parameters"]["limit"] == "connections"
        assert reply["parameters"]["max"] == 20
        # Other users still get in.
        make_image(space / "ok.img")
        serving_as_nobody(space, server)
    finally:
        for sock in held:
            sock.close()
    assert server.wait_fds(baseline) == baseline
    serving(server)


def test_client_cannot_see_or_detach_another_clients_devices(space: Path, server: Server) -> None:
    image = make_image(space / "mine.img", owner=None)
    os.chmod(image, 0o666)
    mine = loopdev.attach(image, broker=server.socket)  # root's device
    try:
        got = as_user(
            """
out(listed=bc.list_devices(B))
conn = bc.connect(B)
try:
    bc.call(conn, "io.loopdev.Detach", {"name": sys.argv[1]})
except bc.BrokerError as exc:
    out(errno=exc.errno)
""",
            mine.name,
            broker=server.socket,
        )
        assert got == [{"listed": []}, {"errno": errno.ENXIO}]
        # Another connection of the same user cannot detach it either.
        reply, _ = call(server.socket, "io.loopdev.Detach", {"name": mine.name})
        assert reply is not None and reply["error"] == "io.loopdev.NoSuchDevice"
        assert loopdev.device.device_info(mine.name) is not None
        listed = loopdev.broker_client.list_devices(server.socket)
        assert [d["name"] for d in listed] == [mine.name]
    finally:
        mine.detach()


# --- 3. bad input ------------------------------------------------------------------


def _msg(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\0"


# (name, bytes to send, error expected or None for "connection closed")
_BAD_MESSAGES: list[tuple[str, bytes, str | None]] = [
    ("malformed-json", b"{oops\0", "io.loopdev.BadRequest"),
    ("empty-message", b"\0", "io.loopdev.BadRequest"),
    ("not-an-object", b"[1, 2]\0", "io.loopdev.BadRequest"),
    ("no-method", _msg({"parameters": {}}), "io.loopdev.BadRequest"),
    ("method-not-a-string", _msg({"method": 7}), "io.loopdev.BadRequest"),
    (
        "parameters-not-an-object",
        _msg({"method": "io.loopdev.List", "parameters": [1]}),
        "io.loopdev.BadRequest",
    ),
    (
        "unknown-method",
        _msg({"method": "io.loopdev.Frobnicate"}),
        "org.varlink.service.MethodNotFound",
    ),
    (
        "unknown-interface",
        _msg({"method": "com.example.Thing"}),
        "org.varlink.service.InterfaceNotFound",
    ),
    (
        "unknown-parameter",
        _msg({"method": "io.loopdev.List", "parameters": {"all": True}}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "missing-parameter",
        _msg({"method": "io.loopdev.Attach"}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "file-as-string",
        _msg({"method": "io.loopdev.Attach", "parameters": {"file": "0"}}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "file-as-bool",
        _msg({"method": "io.loopdev.Attach", "parameters": {"file": True}}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "read-only-as-int",
        _msg({"method": "io.loopdev.Attach", "parameters": {"file": 0, "read_only": 1}}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "offset-2**80",
        _msg({"method": "io.loopdev.Attach", "parameters": {"file": 0, "offset": 2**80}}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "file-index-without-fd",
        _msg({"method": "io.loopdev.Attach", "parameters": {"file": 0}}),
        "org.varlink.service.InvalidParameter",
    ),
    (
        "timeout-nan",
        b'{"method":"io.loopdev.Detach","parameters":{"name":"loop0","timeout":NaN}}\0',
        "io.loopdev.BadRequest",
    ),
    (
        "detach-not-ours",
        _msg({"method": "io.loopdev.Detach", "parameters": {"name": "loop0"}}),
        "io.loopdev.NoSuchDevice",
    ),
    ("deep-nesting", b"[" * 60000 + b"\0", "io.loopdev.BadRequest"),
    ("bad-utf8", b'{"method":"io.loopdev.\xff"}\0', "io.loopdev.BadRequest"),
    (
        "huge-integer-text",
        b'{"method":"io.loopdev.List","x":' + b"9" * 5000 + b"}\0",
        "io.loopdev.BadRequest",
    ),
    ("oversized", b" " * (broker.MAX_MESSAGE + 10) + b"\0", None),
    ("oversized-no-nul", b"x" * (1 << 20), None),
]


@pytest.mark.parametrize(
    ("data", "expected"),
    [pytest.param(d, e, id=n) for n, d, e in _BAD_MESSAGES],
)
def test_bad_message(space: Path, server: Server, data: bytes, expected: str | None) -> None:
    make_image(space / "ok.img")
    baseline = server.settled_fds()
    sock = raw_connect(server.socket)
    try:
        try:
            raw_send(sock, data)
        except (BrokenPipeError, ConnectionResetError):
            assert expected is None  # the server hung up on an oversized message
        if expected is None:
            assert closed_by_server(sock)
        else:
            reply, fds = raw_reply(sock)
            assert reply is not None and reply.get("error") == expected, reply
            assert not fds
            # The connection goes on after a refused message.
            reply, _ = call(sock, "io.loopdev.List")
            assert reply == {"parameters": {"devices": []}}
    finally:
        sock.close()
    assert server.wait_fds(baseline) == baseline
    serving(server)


def _wrong_kind_fd(kind: str, space: Path, stack: list[Callable[[], None]]) -> int:
    """A descriptor of the given wrong kind; cleanup pushed on ``stack``."""
    if kind == "socket":
        a, b = socket.socketpair()
        stack += [a.close, b.close]
        return a.fileno()
    if kind == "directory":
        fd = os.open(space, os.O_RDONLY | os.O_DIRECTORY)
    elif kind == "pipe":
        r, w = os.pipe()
        stack.append(lambda: os.close(w))
        fd = r
    elif kind == "fifo":
        os.mkfifo(space / "fifo")
        fd = os.open(space / "fifo", os.O_RDWR)
    elif kind == "char-device":
        fd = os.open("/dev/null", os.O_RDWR)
    elif kind == "o-path":
        fd = os.open(make_image(space / "opath.img"), os.O_PATH)
    elif kind == "write-only":
        fd = os.open(make_image(space / "wo.img"), os.O_WRONLY)
    elif kind in ("loop-device", "loop-partition"):
        image = (
            gpt_image(space / "loop.img")
            if kind == "loop-partition"
            else make_image(space / "loop.img")
        )
        dev = loopdev.attach(image, partscan=kind == "loop-partition")
        stack.append(dev.detach)
        if kind == "loop-device":
            fd = os.open(dev.path, os.O_RDWR)
        else:
            part = dev.partitions[0]
            fd = os.open(part.path, os.O_RDWR)
    elif kind == "block-device-not-allowed":
        fd = _other_block_device()
    else:
        raise AssertionError(kind)
    stack.append(lambda: os.close(fd))
    return fd


def _other_block_device() -> int:
    """A read-only descriptor of a block device that is not a loop device; skip if none."""
    for name in sorted(os.listdir("/sys/block")):
        if name.startswith("loop"):
            continue
        try:
            return os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # e.g. EPERM from the device cgroup
    pytest.skip("no block device other than loop devices can be opened here")


_KIND_ERRNO = {"directory": errno.EISDIR, "o-path": errno.EBADF, "write-only": errno.EBADF}


@pytest.mark.parametrize(
    "kind",
    [
        "socket",
        "directory",
        "pipe",
        "fifo",
        "char-device",
        "o-path",
        "write-only",
        "loop-device",
        "loop-partition",
        "block-device-not-allowed",
    ],
)
def test_descriptor_of_the_wrong_kind(space: Path, server: Server, kind: str) -> None:
    make_image(space / "ok.img")
    stack: list[Callable[[], None]] = []
    try:
        fd = _wrong_kind_fd(kind, space, stack)
        before = set(bound_under(space))
        baseline = server.settled_fds()
        reply, fds = call(server.socket, "io.loopdev.Attach", {"file": 0}, [fd])
        assert reply is not None and not fds
        assert reply["error"] == "io.loopdev.BackingFileError", reply
        assert reply["parameters"]["errno"] == _KIND_ERRNO.get(kind, errno.EINVAL)
        assert set(bound_under(space)) == before
        assert server.wait_fds(baseline) == baseline
    finally:
        for undo in reversed(stack):
            undo()
    serving(server)


def test_block_devices_only_where_the_policy_allows(
    space: Path, start: Callable[..., Server]
) -> None:
    server = start("--allow-block-devices")
    stack: list[Callable[[], None]] = []
    try:
        for kind in ("loop-device", "loop-partition"):  # never, whatever the policy
            fd = _wrong_kind_fd(kind, space, stack)
            reply, _ = call(server.socket, "io.loopdev.Attach", {"file": 0}, [fd])
            assert reply is not None and reply["error"] == "io.loopdev.BackingFileError"
            assert "loop device" in reply["parameters"]["message"]
        # Another block device passes the policy (read-only: it is not ours), even an
        # empty one (zram without a disk size), as attach() takes a 0-byte file.
        fd = _other_block_device()
        stack.append(lambda: os.close(fd))
        reply, fds = call(server.socket, "io.loopdev.Attach", {"file": 0}, [fd])
        assert reply is not None
        assert reply["parameters"]["device"]["read_only"] is True, reply
        for f in fds:
            os.close(f)
    finally:
        for undo in reversed(stack):
            undo()


def test_too_many_descriptors_are_closed(space: Path, server: Server) -> None:
    make_image(space / "ok.img")
    baseline = server.settled_fds()
    pipes = [os.pipe() for _ in range(20)]
    readers = [r for r, _ in pipes]
    writers = [w for _, w in pipes]
    try:
        sock = raw_connect(server.socket)
        reply, _ = call(sock, "org.varlink.service.GetInfo", {}, writers)  # 20 > 8
        assert reply is not None and reply["error"] == "io.loopdev.BadRequest"
        assert "more than 8" in reply["parameters"]["message"]
        # A few descriptors a call does not use are closed too.
        reply, _ = call(sock, "io.loopdev.List", {}, writers[:3])
        assert reply == {"parameters": {"devices": []}}
        sock.close()
        assert server.wait_fds(baseline) == baseline
    finally:
        for fd in writers:
            os.close(fd)
    # The server holds no write end: every read end sees end of file.
    try:
        assert all(os.read(r, 1) == b"" for r in readers)
    finally:
        for fd in readers:
            os.close(fd)
    serving(server)


def test_truncated_and_abandoned_requests(space: Path, start: Callable[..., Server]) -> None:
    server = start("--timeout", "1")
    make_image(space / "ok.img")
    image = make_image(space / "half.img")
    baseline = server.settled_fds()
    # Disconnect in the middle of a request that carries a descriptor.
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    sock = raw_connect(server.socket)
    raw_send(sock, b'{"method":"io.loopdev.Attach","parameters":{"fi', [fd])
    sock.close()
    # Half a request, then silence: closed after the read timeout.
    stuck = raw_connect(server.socket)
    raw_send(stuck, b'{"method":"io.loopdev.Li')
    # Connected, sending nothing: closed after the idle timeout.
    silent = raw_connect(server.socket)
    # Meanwhile the server serves others.
    serving(server)
    started = time.monotonic()
    assert closed_by_server(stuck, 5) and closed_by_server(silent, 5)
    assert time.monotonic() - started < 3
    stuck.close()
    silent.close()
    os.close(fd)
    assert server.wait_fds(baseline) == baseline
    assert not bound_under(space)
    assert "not completed within 1 s" in server.log_text()
    assert "idle for 1 s" in server.log_text()


def test_oneway_and_pipelined_calls(space: Path, server: Server) -> None:
    sock = raw_connect(server.socket)
    try:
        oneway = _msg({"method": "io.loopdev.List", "oneway": True})
        raw_send(sock, oneway + _msg({"method": "io.loopdev.List"}) + b"{bad\0")
        conn = _varlink.Connection(sock, max_message=1 << 20, max_fds=8, timeout=10)
        frames = [conn.receive(idle_timeout=10) for _ in range(2)]
        replies = [json.loads(f.payload) for f in frames if f is not None]
        assert replies[0] == {"parameters": {"devices": []}}
        assert replies[1]["error"] == "io.loopdev.BadRequest" and len(replies) == 2
    finally:
        sock.close()


def test_bad_attach_parameters_are_typed_loop_errors(space: Path, server: Server) -> None:
    image = make_image(space / "p.img", owner=None)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for params, error in [
            ({"offset": -1}, "io.loopdev.ConfigureError"),
            ({"offset": 64 << 20}, "io.loopdev.BackingFileError"),
            ({"sizelimit": 1000}, "io.loopdev.ConfigureError"),
            ({"block_size": 1000}, "io.loopdev.ConfigureError"),
        ]:
            reply, _ = call(server.socket, "io.loopdev.Attach", {"file": 0, **params}, [fd])
            assert reply is not None and reply["error"] == error, (params, reply)
            assert reply["parameters"]["errno"] == errno.EINVAL
    finally:
        os.close(fd)
    assert not bound_under(space)
    with pytest.raises(loopdev.ConfigureError):
        loopdev.attach(image, broker=server.socket, block_size=1000)


# --- 4. life cycle -----------------------------------------------------------------


def test_sigterm_with_clients_holding_devices(space: Path, start: Callable[..., Server]) -> None:
    server = start()
    image = make_image(space / "held.img")
    proc = as_user(
        "d = loopdev.attach(sys.argv[1]); out(name=d.name); time.sleep(3600)",
        str(image),
        broker=server.socket,
        wait=False,
    )
    try:
        held = json.loads(proc.stdout.readline())
        server.stop()  # SIGTERM: exits 0, socket and node directory gone
        assert "stopped" in server.log_text()
        # The client still holds its descriptors: the kernel releases at its last close.
        proc.kill()
        proc.wait()
        assert poll(lambda: not bound_under(space), 2.0), held
    finally:
        proc.kill()
        proc.wait()


def test_socket_activation(space: Path) -> None:
    path = str(space / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    os.chmod(path, 0o666)
    listener.listen(16)
    log = open(space / "activated.log", "wb")
    launcher = (
        "import os, sys\n"
        "os.dup2(int(sys.argv[1]), 3)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'loopdev', 'serve',"
        " '--allow-user', 'nobody', '--socket', sys.argv[2]])\n"
    )
    unused = str(space / "not-this.sock")
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(listener.fileno()), unused],
        pass_fds=[listener.fileno()],
        stdout=log,
        stderr=log,
    )
    try:
        make_image(space / "ok.img")
        got = as_user(
            "d = loopdev.attach(sys.argv[1]); out(name=d.name); d.detach()",
            str(space / "ok.img"),
            broker=path,
        )
        assert got[0]["name"].startswith("loop")
        assert not os.path.exists(unused)
        mine = handover_dirs_of(proc.pid)  # the launcher exec'd the broker: same pid
        assert len(mine) == 1, mine
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        listener.close()
        log.close()
    text = (space / "activated.log").read_text()
    assert "the socket from systemd" in text and "Traceback" not in text, text
    assert os.path.exists(path)  # systemd's socket, not ours to remove
    # Only its own: other brokers on this machine come and go meanwhile.
    assert not [d for d in mine if os.path.lexists(d)]
    assert not handover_dirs_named(proc.pid)


def test_refuses_to_start_twice_and_on_a_nodev_node_dir(space: Path, server: Server) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "loopdev", "serve", "--socket", server.socket],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1 and "another broker serves this socket" in second.stderr
    nodev = space / "nodev"
    nodev.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "nodev", "loopdev-test", str(nodev)])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a nodev tmpfs here")
    args = ["serve", "--node-dir", str(nodev), "--socket", str(space / "x.sock")]
    try:
        third = subprocess.run(
            [sys.executable, "-m", "loopdev", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        subprocess.run(["umount", str(nodev)], check=True)
    assert third.returncode == 1 and "nodev" in third.stderr, third.stderr
    assert not os.path.exists(space / "x.sock")


def test_list_through_the_cli(space: Path, server: Server) -> None:
    image = make_image(space / "cli.img")
    got = as_user(
        """
import subprocess
d = loopdev.attach(sys.argv[1])
from loopdev.cli import main
import io, contextlib
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    status = main(["list", "--json", "--broker", B])
out(status=status, listed=json.loads(buf.getvalue()), name=d.name)
d.detach()
""",
        str(image),
        broker=server.socket,
    )
    rows = got[0]["listed"]["loopdevices"]
    assert got[0]["status"] == 0
    assert [r["name"] for r in rows] == [f"/dev/{got[0]['name']}"]
    assert rows[0]["back-file"] == str(image)


@pytest.mark.parametrize(
    "args",
    [
        ["--allow-user", "no-such-user-here"],
        ["--allow-group", "no-such-group-here"],
        ["--max-per-client", "0"],
        ["--max-devices", "-3"],
        ["--timeout", "nan"],
    ],
)
def test_serve_usage_errors(args: list[str]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "loopdev", "serve", "--socket", "/nonexistent/x.sock", *args],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2 and "error: argument" in done.stderr, done.stderr


def test_interface_is_defined_once_and_described() -> None:
    """The server describes itself with the interface file, the only copy in the tree;
    its methods' parameters and its errors come from there."""
    text = (ROOT / "src" / "loopdev" / "io.loopdev.varlink").read_text()
    assert broker.INTERFACE == text
    places = [ROOT / d for d in ("src", "docs", "contrib", "tests")]
    files = [p for d in places for p in d.rglob("*") if p.is_file() and p.suffix != ".so"]
    copies = [p for p in files if "\ninterface io.loopdev\n" in p.read_text(errors="ignore")]
    assert copies == [ROOT / "src" / "loopdev" / "io.loopdev.varlink"], copies
    assert broker._SCHEMAS["io.loopdev.Attach"]["file"] == ("int", False)
    assert broker._SCHEMAS["io.loopdev.Detach"]["timeout"] == ("float", True)
    assert set(_interface.LOOP_ERRORS) <= _interface.ERRORS


# --- 5. load -----------------------------------------------------------------------


def test_32_clients_20_cycles_each(space: Path, start: Callable[..., Server]) -> None:
    server = start("--max-per-client", "32")
    baseline = server.settled_fds()
    clients, cycles = 32, 20
    images = [make_image(space / f"load{i}.img", size=1 * MiB) for i in range(clients)]
    code = """
failures = []
for cycle in range(int(sys.argv[2])):
    try:
        with loopdev.attach(sys.argv[1]) as dev:
            fd = os.open(dev.path, os.O_RDWR)
            os.pwrite(fd, bytes([cycle + 1]) * 512, cycle * 512)
            os.close(fd)
    except Exception as exc:
        failures.append(repr(exc))
out(failures=failures)
"""
    procs = [
        as_user(code, str(img), str(cycles), broker=server.socket, wait=False) for img in images
    ]
    failures: list[str] = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        failures += json.loads(out)["failures"]
    assert failures == []
    for img in images:
        data = img.read_bytes()
        assert all(data[c * 512 : (c + 1) * 512] == bytes([c + 1]) * 512 for c in range(cycles))
    assert poll(lambda: not bound_under(space), 3), bound_under(space)
    assert server.wait_fds(baseline) == baseline
    assert loopdev.broker_client.list_devices(server.socket) == []
    assert server.log_text().count("Attach") == clients * cycles
