"""The broker attacked the way an unprivileged local user would (docs/BROKER.md).

Each test is one finding of the attack on ``loopdev serve``: the client runs as
``nobody`` (or as uids outside the policy) against a real broker, does what an
attacker would, and the test checks that it gets nowhere.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from brokerlib import (
    OUTSIDER,
    Server,
    as_user,
    bound_under,
    call,
    gpt_image,
    handover_dirs_of,
    make_image,
    poll,
)
from images import sfdisk
from test_broker import server, serving, serving_as_nobody, start  # noqa: F401

import loopdev
from loopdev import _native, _varlink, broker, partitions
from loopdev._broker_grant import Grant, NodeDir
from loopdev.errors import LoopError

SECRET = b"ROOT-SECRET"

# Keeps an O_PATH reference to every node it was handed, lets the device go,
# waits for a line on stdin, then tries to come back through the references.
KEEP_AND_COME_BACK = """
dev = loopdev.attach(sys.argv[1], partscan=True)
refs = [os.open(p, os.O_PATH) for p in [dev.path] + [p.path for p in dev.partitions]]
out(name=dev.name, parts=len(dev.partitions))
dev.detach()
out(released=True)
sys.stdin.readline()
rows = []
for ref in refs:
    link = f"/proc/self/fd/{ref}"
    row = {}
    for flag in ("O_RDWR", "O_RDONLY"):
        try:
            fd = os.open(link, getattr(os, flag))
        except OSError as exc:
            row[flag] = exc.errno
        else:
            row[flag] = os.pread(fd, 11, 0).decode(errors="replace")
            os.close(fd)
    try:
        os.chmod(link, 0o666)
        row["chmod"] = 0
    except OSError as exc:
        row["chmod"] = exc.errno
    rows.append(row)
out(rows=rows)
"""


def test_kept_reference_cannot_reach_the_next_device_on_the_minor(
    space: Path,
    server: Server,  # noqa: F811
) -> None:
    """Finding 1: an O_PATH kept past release reopens nothing (device and partitions)."""
    image = gpt_image(space / "mine.img")
    secret = make_image(space / "secret.img", owner=None)
    os.chmod(secret, 0o600)
    with open(secret, "r+b") as f:
        f.write(SECRET)
    proc = as_user(KEEP_AND_COME_BACK, str(image), broker=server.socket, wait=False)
    rebound = ""
    try:
        first = json.loads(proc.stdout.readline())
        assert first["parts"] == 2, first
        assert json.loads(proc.stdout.readline()) == {"released": True}
        assert poll(lambda: not bound_under(space), 3)
        # Root binds the same minor to its own file (if nobody else took it).
        if subprocess.run(["losetup", f"/dev/{first['name']}", str(secret)]).returncode == 0:
            rebound = first["name"]
        out, err = proc.communicate("\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if rebound:
            subprocess.run(["losetup", "-d", f"/dev/{rebound}"], check=False)
    assert proc.returncode == 0, err
    rows = json.loads(out.splitlines()[-1])["rows"]
    assert len(rows) == 3
    for row in rows:
        assert row == {"O_RDWR": errno.EACCES, "O_RDONLY": errno.EACCES, "chmod": errno.EPERM}


def test_read_only_grant_cannot_be_upgraded(space: Path, server: Server) -> None:  # noqa: F811
    """Finding 3: neither chmod nor a read-write reopen turns a read-only grant writable."""
    image = gpt_image(space / "ro.img")
    os.chmod(image, 0o644)
    got = as_user(
        """
fd = os.open(sys.argv[1], os.O_RDONLY)
dev = loopdev.attach(fd, partscan=True)
os.close(fd)
rows = []
for link in [dev.path] + [p.path for p in dev.partitions]:
    row = {}
    try:
        os.chmod(link, 0o600)
        row["chmod"] = 0
    except OSError as exc:
        row["chmod"] = exc.errno
    try:
        os.close(os.open(link, os.O_RDWR))
        row["rw"] = 0
    except OSError as exc:
        row["rw"] = exc.errno
    rows.append(row)
out(rows=rows, ro=dev.info().read_only)
dev.detach()
""",
        str(image),
        broker=server.socket,
    )
    assert got[0]["ro"] is True
    assert got[0]["rows"] == [{"chmod": errno.EPERM, "rw": errno.EACCES}] * 3


def _chattr(path: Path, flag: str) -> None:
    subprocess.run(["chattr", flag, str(path)], check=True)


def test_append_only_file_is_not_rewritten(space: Path, server: Server) -> None:  # noqa: F811
    """Finding 2: an O_APPEND descriptor (and an append-only file) is refused, bytes unchanged."""
    image = make_image(space / "append.img")
    with open(image, "r+b") as f:
        f.write(b"HEAD" * 128)
    before = image.read_bytes()
    _chattr(image, "+a")
    try:
        got = as_user(
            """
out_rows = []
for flags in (os.O_RDWR | os.O_APPEND, os.O_RDONLY | os.O_APPEND):
    fd = os.open(sys.argv[1], flags)
    try:
        dev = loopdev.attach(fd, direct_io=False)
    except OSError as exc:
        out_rows.append([type(exc).__name__, exc.errno, str(exc)])
    else:
        ro = dev.info().read_only
        try:
            os.pwrite(dev.fd, b"X" * 512, 0)
            os.fsync(dev.fd)
            wrote = True
        except OSError:
            wrote = False
        dev.detach()
        out_rows.append(["attached", ro, wrote])
    os.close(fd)
out(rows=out_rows)
""",
            str(image),
            broker=server.socket,
        )
    finally:
        _chattr(image, "-a")
    rows = got[0]["rows"]
    kind, err, text = rows[0]
    assert (kind, err) == ("BackingFileError", errno.EPERM), rows
    assert "append-only" in text
    # Read-only: nothing can be written, so it may be attached (read-only).
    assert rows[1] == ["attached", True, False], rows
    assert image.read_bytes() == before


def test_outsiders_are_closed_at_accept_and_never_counted(
    space: Path,
    server: Server,  # noqa: F811
) -> None:
    """Finding 4: 1,104 connections of 23 users outside the policy leave nobody served."""
    users, per_user = 23, 48
    code = """
import select, socket
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(B)
    socks.append(s)
# Each one is answered (PermissionDenied) and closed by the broker at once.
deadline = time.monotonic() + 5
data = {s: b"" for s in socks}
open_ = set(socks)
while open_ and time.monotonic() < deadline:
    ready, _, _ = select.select(list(open_), [], [], max(0, deadline - time.monotonic()))
    for s in ready:
        chunk = s.recv(4096)
        data[s] += chunk
        if not chunk:
            open_.discard(s)
refused = sum(b"io.loopdev.PermissionDenied" in d for d in data.values())
out(closed=len(socks) - len(open_), refused=refused)
sys.stdin.readline()  # hold every socket until told
"""
    procs = [
        as_user(
            code,
            str(per_user),
            uid=OUTSIDER + i,
            gid=OUTSIDER + i,
            broker=server.socket,
            wait=False,
        )
        for i in range(users)
    ]
    try:
        for proc in procs:
            line = proc.stdout.readline()
            assert json.loads(line) == {"closed": per_user, "refused": per_user}, line
        make_image(space / "ok.img")
        serving_as_nobody(space, server)  # served while the outsiders still hold their sockets
    finally:
        for proc in procs:
            try:
                proc.communicate("\n", timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    log = server.log_text()
    assert f"uid={OUTSIDER}" in log and "PermissionDenied" in log


def test_log_escapes_what_a_client_chooses(space: Path, server: Server) -> None:  # noqa: F811
    """Finding 5: a method name with a newline and ESC yields one escaped log line."""
    forged = "loopdev serve: uid=0 pid=1 Attach device=loop0 -> ok FORGED"
    reply, _ = call(server.socket, f"io.loopdev.X\n{forged}\x1b[2J\x07")
    assert reply is not None and reply["error"] == "org.varlink.service.MethodNotFound"
    assert poll(lambda: "FORGED" in server.log_text(), 5)
    text = server.log_text()
    assert "\x1b" not in text and "\x07" not in text
    lines = [line for line in text.splitlines() if "FORGED" in line]
    assert len(lines) == 1 and not lines[0].startswith(forged), lines
    assert "\\n" in lines[0] and "\\x1b" in lines[0]


def test_killed_brokers_directory_is_removed_by_the_next(
    space: Path,
    start: Callable[..., Server],  # noqa: F811
) -> None:
    """Finding 7: the node directory a SIGKILLed broker left is gone once another starts."""
    sock = str(space / "killed.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopdev", "serve", "--socket", sock],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Its own directory only: other brokers on this machine come and go meanwhile.
        assert poll(lambda: os.path.exists(sock) and len(handover_dirs_of(proc.pid)) == 1, 15)
        (dead,) = handover_dirs_of(proc.pid)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert os.path.isdir(dead)
    live = start()  # a broker of another test running now keeps its directory
    assert not os.path.exists(dead)
    make_image(space / "ok.img")
    serving(live)


@pytest.mark.parametrize("mode", [0o777, 0o775])
def test_socket_directory_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    """Finding 6: a racer in a directory others can write could swap the socket path."""
    directory = tmp_path / "run"
    directory.mkdir()
    os.chmod(directory, mode)
    with pytest.raises(LoopError) as raised:
        broker.listen(str(directory / "b.sock"))
    assert raised.value.errno == errno.EPERM and "writable" in str(raised.value)
    assert not os.path.exists(directory / "b.sock")


def test_socket_is_made_with_its_mode(tmp_path: Path) -> None:
    """Finding 6: the socket appears with mode 0666 in one step; a sticky root dir is fine."""
    directory = tmp_path / "sticky"
    directory.mkdir()
    os.chmod(directory, 0o1777)
    listener = broker.listen(str(directory / "b.sock"))
    try:
        st = os.lstat(directory / "b.sock")
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
        assert [p.name for p in directory.iterdir()] == ["b.sock"]
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(directory / "b.sock"))
        probe.close()
    finally:
        listener.close()


def test_partition_minors_cannot_be_given_away_by_a_rescan(
    space: Path,
    server: Server,  # noqa: F811
) -> None:
    """LOOP_CHANGE_FD (allowed on a read-only device) rereads the table: the broker holds
    the partitions open, so they stay, and their minors cannot go to other disks."""
    image = gpt_image(space / "mine.img")
    other = gpt_image(space / "other.img")
    os.chmod(image, 0o644)
    got = as_user(
        """
import fcntl
from loopdev import _native
def parts(name):
    return sorted((e, open(f"/sys/block/{name}/{e}/dev").read().strip())
                  for e in os.listdir(f"/sys/block/{name}") if e.startswith(name + "p"))
fd = os.open(sys.argv[1], os.O_RDONLY)
dev = loopdev.attach(fd, partscan=True)
before = parts(dev.name)
for part in dev.partitions:  # an attacker lets go of its own partition descriptors
    os.dup2(os.open("/dev/null", os.O_RDONLY), part.fd)
other = os.open(sys.argv[2], os.O_RDONLY)
fcntl.ioctl(dev.fd, _native.LOOP_CHANGE_FD, other)
out(before=before, after=parts(dev.name))
dev.detach()
""",
        str(image),
        str(other),
        broker=server.socket,
    )
    assert len(got[0]["before"]) == 2 and got[0]["after"] == got[0]["before"]


def test_reply_that_cannot_carry_its_descriptors_fails_clearly(
    space: Path,
    server: Server,  # noqa: F811
) -> None:
    """Finding 7: a device with 253 partitions needs 254 descriptors, more than a message
    carries: LimitReached, nothing left bound, and the log says so (it said ok)."""
    image = make_image(space / "many.img", size=2 * 1024 * 1024)
    script = "label: gpt\ntable-length: 256\n" + "".join(
        f"start={2048 + i}, size=1\n" for i in range(253)
    )
    sfdisk(image, script)
    got = as_user(
        """
try:
    loopdev.attach(sys.argv[1], partscan=True)
except OSError as exc:
    out(kind=type(exc).__name__, text=str(exc))
""",
        str(image),
        broker=server.socket,
    )
    assert got[0]["kind"] == "LimitReached" and "253 descriptors" in got[0]["text"], got
    assert poll(lambda: not bound_under(space), 3)
    assert "Attach" in server.log_text() and "LimitReached" in server.log_text()


def test_refused_detach_never_reopens_a_node_whose_number_moved(space: Path) -> None:
    """A refused Detach hands the nodes back only where each still is its partition:
    partitions deleted and added back (the release deletes them one by one when it
    cannot ask first; a rescan) get new minors, and their old numbers go to the next
    disk, so those nodes stay at mode 0."""
    image = gpt_image(space / "moved.img", owner=None)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    node_dir = NodeDir("/dev")
    dev = loopdev.attach(fd, partscan=True, autoclear=True)
    grant = Grant(read_only=False)
    refs: list[int] = []  # what a client keeps of each node
    try:
        names = [dev.name] + [p.name for p in dev.partitions]
        numbers = [os.fstat(dev.fd).st_rdev]
        numbers += [os.makedev(p.major, p.minor) for p in dev.partitions]
        for name, number in zip(names, numbers, strict=True):
            handed = node_dir.hand_over(number, name, grant)
            refs.append(os.open(f"/proc/self/fd/{handed}", _native.O_PATH | os.O_CLOEXEC))
            os.close(handed)
        grant.revoke()
        _native.delete_partitions(dev.fd, dev.index, bound=True)
        partitions.ensure_registered(dev.fd, dev.index, None)
        now = [os.makedev(p.major, p.minor) for p in dev.partitions]
        moved = [n for n, old, new in zip(names[1:], numbers[1:], now, strict=True) if old != new]
        if not moved:
            pytest.skip("every partition came back under its old number (RCU was quick)")
        assert sorted(grant.restore()) == sorted(moved)
        for ref, name in zip(refs, names, strict=True):
            mode = stat.S_IMODE(os.stat(f"/proc/self/fd/{ref}").st_mode)
            assert mode == (0 if name in moved else 0o666), name
    finally:
        grant.close()
        _varlink.close_fds(refs)
        dev.detach()
        node_dir.close()
        os.close(fd)
