"""The compatible Loop / LoopControl API on real loop devices."""

from __future__ import annotations

import errno
import fcntl
import inspect
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import open_fds

import loopdev
from loopdev import Loop, LoopControl, LoopInfo, UnexpectedDevice


def sysfs(lo: Loop, attr: str) -> str:
    with open(f"/sys/block/loop{lo.minor}/{attr}") as f:
        return f.read().strip()


def test_reexports() -> None:
    from loopdev import compat

    assert loopdev.Loop is compat.Loop
    assert loopdev.LoopControl is compat.LoopControl
    assert loopdev.LoopInfo is compat.LoopInfo
    assert loopdev.UnexpectedDevice is compat.UnexpectedDevice
    assert issubclass(UnexpectedDevice, Exception)


def test_loopinfo_zero_and_fields() -> None:
    info = LoopInfo()
    for name in (
        "lo_device",
        "lo_inode",
        "lo_rdevice",
        "lo_offset",
        "lo_sizelimit",
        "lo_number",
        "lo_encrypt_type",
        "lo_encrypt_key_size",
        "lo_flags",
    ):
        assert getattr(info, name) == 0
    assert info.lo_file_name == bytes(64)
    assert not info.autoclear
    info.lo_flags = Loop.LO_FLAGS_AUTOCLEAR
    assert info.autoclear
    st = os.stat("/")
    info.lo_device, info.lo_inode = st.st_dev, st.st_ino
    assert info.is_bound_to(st)


def test_class_constants() -> None:
    assert Loop.LOOP_MAJOR == 7
    assert Loop.LOOP_CONFIGURE == 0x4C0A
    assert Loop.LO_FLAGS_AUTOCLEAR == 4


def test_loop_for_fd_configures(ctl: LoopControl, image_fd: int, configure_path: str) -> None:
    lo = ctl.loop_for_fd(
        image_fd,
        offset=1 << 20,
        sizelimit=4 << 20,
        blocksize=4096,
        autoclear=True,
        read_only=True,
    )
    try:
        info = lo.get_status()
        assert info.lo_offset == 1 << 20
        assert info.lo_sizelimit == 4 << 20
        assert info.autoclear
        assert info.lo_flags & Loop.LO_FLAGS_READ_ONLY
        assert sysfs(lo, "queue/logical_block_size") == "4096"
        assert int(sysfs(lo, "size")) * 512 == 4 << 20
        assert lo.is_bound_to(image_fd)
        assert lo.devname == f"loop{lo.minor}"
    finally:
        lo.close()
    assert lo.fd == -1 and lo.devname == "<closed>"


def test_loop_for_fd_takes_configures_keywords_in_its_order(
    ctl: LoopControl, image_fd: int
) -> None:
    """By position too (offset, sizelimit, blocksize, autoclear, partscan, read_only,
    as Loop.configure), and with a Loop that has no on_close of its own yet."""
    lo = ctl.loop_for_fd(image_fd, False, None, 1 << 20, 4 << 20, 4096, True, False, True)
    try:
        info = lo.get_status()
        assert (info.lo_offset, info.lo_sizelimit) == (1 << 20, 4 << 20)
        assert info.autoclear and info.lo_flags & Loop.LO_FLAGS_READ_ONLY
        assert not info.lo_flags & Loop.LO_FLAGS_PARTSCAN
        assert sysfs(lo, "queue/logical_block_size") == "4096"
        assert lo.on_close is None
    finally:
        lo.close()
    assert lo.on_close is None
    params = list(inspect.signature(LoopControl.loop_for_fd).parameters)
    assert params[4:] == list(inspect.signature(Loop.configure).parameters)[2:]


def test_configure_partscan_flag(ctl: LoopControl, image_fd: int, configure_path: str) -> None:
    lo = ctl.loop_for_fd(image_fd, autoclear=True, partscan=True)
    try:
        assert lo.get_status().lo_flags & Loop.LO_FLAGS_PARTSCAN
    finally:
        lo.close()


def test_backing_path_follows_the_file(
    ctl: LoopControl, tmp_path: Path, configure_path: str
) -> None:
    """lo_file_name is the backing fd's path, kept per thread for the same file (fd,
    device, inode, ctime: one fstat instead of a readlink a cycle, issue 17): read
    again after a rename or unlink of the file, and for another file under the same
    fd number."""
    cut = loopdev._native.LO_NAME_SIZE - 1

    def recorded(fd: int) -> str:
        lo = ctl.loop_for_fd(fd, autoclear=True)
        try:
            return lo.get_status().file_name
        finally:
            lo.close()

    a, b, c = (tmp_path / n for n in ("a.img", "b.img", "c.img"))
    for path in (a, c):
        path.write_bytes(bytes(1 << 20))
    fd = os.open(a, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert recorded(fd) == str(a)[:cut]
        assert recorded(fd) == str(a)[:cut]
        a.rename(b)
        assert recorded(fd) == str(b)[:cut]
        b.unlink()
        assert recorded(fd) == f"{b} (deleted)"[:cut]
    finally:
        os.close(fd)
    again = os.open(c, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert again == fd  # the lowest free number: the one just closed
        assert recorded(again) == str(c)[:cut]
    finally:
        os.close(again)


def test_bad_block_size_leaves_nothing_bound(
    ctl: LoopControl, image: Path, image_fd: int, configure_path: str
) -> None:
    with pytest.raises(OSError) as exc:
        ctl.loop_for_fd(image_fd, blocksize=1000, autoclear=True)
    assert exc.value.errno == errno.EINVAL
    # The autouse fixture also checks; check the fallback path's clear here too.
    from helpers import wait_unbound

    assert wait_unbound(str(image)) == []


def test_data_survives_flush_and_clear(ctl: LoopControl, image: Path, image_fd: int) -> None:
    payload = os.urandom(8192)
    lo = ctl.loop_for_fd(image_fd, autoclear=False)
    try:
        dev = os.open(f"/dev/loop{lo.minor}", os.O_RDWR | os.O_CLOEXEC)
        try:
            os.pwrite(dev, payload, 65536)
        finally:
            os.close(dev)
        lo.flush_buf()
        lo.clear_fd()
    finally:
        lo.close()
    with open(image, "rb") as f:
        f.seek(65536)
        assert f.read(8192) == payload


def test_clear_fd_wait_times_out_then_returns(ctl: LoopControl, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd)
    holder = os.open(f"/dev/loop{lo.minor}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(TimeoutError):
            lo.clear_fd_wait(image_fd, 0.3, 0.05)
        assert lo.is_bound_to(image_fd)
        timer = threading.Timer(0.2, os.close, (holder,))
        timer.start()
        start = time.monotonic()
        lo.clear_fd_wait(image_fd, 10, 0.05)
        assert time.monotonic() - start < 5
        timer.join()
        holder = -1
        assert not lo.is_bound_to(image_fd)
        # The Loop is still usable afterwards: unbound, or bound by another allocator
        # on this machine that took the freed minor meanwhile.
        try:
            info = lo.get_status()
        except OSError as exc:
            assert exc.errno == errno.ENXIO
        else:
            assert not info.is_bound_to(os.fstat(image_fd))
    finally:
        if holder >= 0:
            os.close(holder)
        lo.close()


def test_lock_blocks_second_flock(ctl: LoopControl, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd, lock=True, autoclear=True)
    other = os.open(f"/dev/loop{lo.minor}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        lo.flock(fcntl.LOCK_UN)
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
    finally:
        os.close(other)
        lo.close()


def test_flock_nonblocking_conflict(ctl: LoopControl, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd, autoclear=True)
    other = Loop(lo.minor)
    try:
        lo.flock(fcntl.LOCK_EX)
        with pytest.raises(BlockingIOError):
            other.flock(fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        other.close()
        lo.close()


def test_on_close_runs_once(ctl: LoopControl, image_fd: int) -> None:
    calls: list[int] = []
    lo = ctl.loop_for_fd(image_fd, autoclear=True)

    def on_close(closing: Loop) -> None:
        calls.append(closing.fd)
        assert closing.fd >= 0
        closing.close()

    lo.on_close = on_close
    lo.close()
    lo.close()
    assert len(calls) == 1
    assert lo.fd == -1


def test_closed_control_raises(devices: None) -> None:
    ctl = LoopControl()
    ctl.close()
    ctl.close()
    for call in (ctl.add, ctl.remove, ctl.get_unbound, lambda: ctl.loop_for_fd(0)):
        with pytest.raises(RuntimeError):
            call()


def test_negative_fd(ctl: LoopControl) -> None:
    with pytest.raises(ValueError):
        ctl.loop_for_fd(-1)


def test_missing_node_raises_and_leaks_nothing(devices: None) -> None:
    assert not os.path.exists("/dev/loop999")
    before = open_fds()
    with pytest.raises(FileNotFoundError):
        Loop(999)
    assert open_fds() == before


def test_unexpected_device(tmp_path: Path, devices: None) -> None:
    (tmp_path / "loop3").write_bytes(b"")
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        before = open_fds()
        with pytest.raises(UnexpectedDevice) as exc:
            Loop(3, dir_fd=dirfd)
        assert open_fds() == before
        assert exc.value.expected_minor == 3
        assert stat.S_ISREG(exc.value.mode)
        os.mknod(tmp_path / "loop4", stat.S_IFBLK | 0o600, os.makedev(7, 5))
        with pytest.raises(UnexpectedDevice) as exc:
            Loop(4, dir_fd=dirfd)
        assert exc.value.rdev == os.makedev(7, 5)
    finally:
        os.close(dirfd)


def test_dir_fd_zero_is_a_directory(tmp_path: Path, devices: None) -> None:
    # In a child: fd 0 becomes a directory holding a loop node.
    os.mknod(tmp_path / "loop0", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    code = (
        "import os, sys\n"
        "from loopdev import Loop\n"
        f"d = os.open({str(tmp_path)!r}, os.O_RDONLY | os.O_DIRECTORY)\n"
        "os.dup2(d, 0)\n"
        "lo = Loop(0, dir_fd=0)\n"
        "print(lo.devname)\n"
        "lo.close()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "loop0"


def test_set_status_changes_only_given(ctl: LoopControl, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd, offset=4096, sizelimit=1 << 20, autoclear=False)
    try:
        lo.set_status(offset=0, sizelimit=0, autoclear=True)
        info = lo.get_status()
        assert (info.lo_offset, info.lo_sizelimit, info.autoclear) == (4096, 1 << 20, True)
        lo.set_status(offset=8192, partscan=True)
        info = lo.get_status()
        assert info.lo_offset == 8192
        assert info.lo_flags & Loop.LO_FLAGS_PARTSCAN
        lo.set_status(autoclear=False)
        assert not lo.get_status().autoclear
    finally:
        lo.clear_fd()
        lo.close()


def test_set_capacity_block_size_direct_io(ctl: LoopControl, image: Path, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd, autoclear=True)
    try:
        assert int(sysfs(lo, "size")) * 512 == 16 << 20
        os.truncate(image, 32 << 20)
        lo.set_capacity()
        assert int(sysfs(lo, "size")) * 512 == 32 << 20
        lo.set_block_size(4096)
        assert sysfs(lo, "queue/logical_block_size") == "4096"
        lo.set_direct_io(True)
        assert sysfs(lo, "loop/dio") == "1"
        lo.set_direct_io(False)
        assert sysfs(lo, "loop/dio") == "0"
    finally:
        lo.close()


def test_set_fd_and_clear(ctl: LoopControl, image_fd: int) -> None:
    for _ in range(20):  # another allocator may take the minor after GET_FREE
        lo = Loop(ctl.get_unbound())
        try:
            lo.set_fd(image_fd)
        except OSError as exc:
            lo.close()
            if exc.errno != errno.EBUSY:
                raise
            continue
        try:
            assert lo.is_bound_to(image_fd)
            lo.clear_fd()
        finally:
            lo.close()
        return
    pytest.fail("no device could be bound in 20 tries")


def test_change_fd(ctl: LoopControl, image: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.truncate(16 << 20)
    ro = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    ro2 = os.open(other, os.O_RDONLY | os.O_CLOEXEC)
    lo = ctl.loop_for_fd(ro, read_only=True, autoclear=True)
    try:
        lo.change_fd(ro2)
        assert lo.is_bound_to(ro2)
        assert not lo.is_bound_to(ro)
    finally:
        lo.close()
        os.close(ro)
        os.close(ro2)


def test_is_bound_to_propagates_other_errors(ctl: LoopControl, image_fd: int) -> None:
    lo = Loop(ctl.get_unbound())
    try:
        assert not lo.is_bound_to(image_fd)
    finally:
        lo.close()
    with pytest.raises(OSError) as exc:
        lo.is_bound_to(image_fd)  # closed Loop: EBADF, not a bool
    assert exc.value.errno == errno.EBADF


def test_mknod(ctl: LoopControl, tmp_path: Path, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd, autoclear=True)
    dirfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    old = os.umask(0o077)
    try:
        lo.mknod(dirfd, 0o640)
        st = os.stat(tmp_path / f"loop{lo.minor}")
        assert stat.S_ISBLK(st.st_mode)
        assert st.st_rdev == os.makedev(7, lo.minor)
        assert stat.S_IMODE(st.st_mode) == 0o640
        again = Loop(lo.minor, dir_fd=dirfd)
        again.close()
    finally:
        os.umask(old)
        os.unlink(tmp_path / f"loop{lo.minor}")
        os.close(dirfd)
        lo.close()


def test_add_and_remove(ctl: LoopControl) -> None:
    minor = next(m for m in range(200, 1000) if not os.path.exists(f"/sys/block/loop{m}"))
    assert ctl.add(minor) == minor
    try:
        deadline = time.monotonic() + 5
        while not os.path.exists(f"/dev/loop{minor}") and time.monotonic() < deadline:
            time.sleep(0.01)
        lo = Loop(minor)
        lo.close()
    finally:
        ctl.remove(minor)
    assert not os.path.exists(f"/sys/block/loop{minor}")


def test_setup_runs_before_configure(ctl: LoopControl, image_fd: int) -> None:
    """The hook sees each candidate before loopdev configures it: unbound (``ENXIO``),
    or bound to another file where another allocator took that minor first since
    GET_FREE (loopdev then moves on); never bound to our file. Recorded here and
    checked after the attach: failing inside the hook would abort the attach."""
    seen: list[tuple[Loop, str]] = []

    def setup(lo: Loop) -> None:
        try:
            info = lo.get_status()
        except OSError as exc:
            assert exc.errno == errno.ENXIO, exc
            seen.append((lo, "unbound"))
        else:
            ours = info.is_bound_to(os.fstat(image_fd))
            seen.append((lo, "ours" if ours else "another file"))

    lo = ctl.loop_for_fd(image_fd, setup=setup, autoclear=True)
    try:
        assert seen[-1][0] is lo
        assert all(state != "ours" for _, state in seen), seen
        assert lo.is_bound_to(image_fd)
    finally:
        lo.close()


def test_setup_raising_closes_device(ctl: LoopControl, image_fd: int) -> None:
    seen: list[Loop] = []

    def setup(lo: Loop) -> None:
        seen.append(lo)
        raise KeyError("no")

    before = open_fds()
    with pytest.raises(KeyError):
        ctl.loop_for_fd(image_fd, setup=setup, autoclear=True)
    assert seen and seen[0].fd == -1
    assert open_fds() == before


def test_failing_configure_with_setup_closes(ctl: LoopControl, image_fd: int) -> None:
    seen: list[Loop] = []
    closed: list[int] = []

    def setup(lo: Loop) -> None:
        seen.append(lo)
        lo.on_close = lambda closing: closed.append(closing.minor)

    with pytest.raises(OSError):
        ctl.loop_for_fd(image_fd, setup=setup, blocksize=3000)
    # One device unless another allocator raced us; every one was closed once.
    assert len(closed) == len(seen) >= 1
    assert all(lo.fd == -1 for lo in seen)


def test_fds_are_cloexec(ctl: LoopControl, image_fd: int) -> None:
    lo = ctl.loop_for_fd(image_fd, autoclear=True)
    try:
        for fd in (lo.fd, ctl.fd):  # type: ignore[attr-defined]
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        lo.close()


def _remove_if_unbound(ctl: LoopControl, minor: int) -> None:
    for _ in range(100):
        try:
            ctl.remove(minor)
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY:  # EBUSY: still in rundown, or bound again
                return
            time.sleep(0.01)


def test_locked_free_device_is_skipped(ctl: LoopControl, image_fd: int) -> None:
    """A free device someone else holds locked is skipped, not retried until exhaustion."""
    existing = {int(n[4:]) for n in os.listdir("/sys/block") if n[4:].isdigit()}
    for _ in range(10):
        held = Loop(ctl.get_unbound())
        try:
            held.flock(fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held.close()
            continue
        try:
            start = time.monotonic()
            lo = ctl.loop_for_fd(image_fd, lock=True, autoclear=True)
            try:
                assert lo.minor != held.minor
                assert time.monotonic() - start < 5
            finally:
                lo.close()
            if lo.minor not in existing:  # LOOP_CTL_ADD made it for this test
                _remove_if_unbound(ctl, lo.minor)
            return
        finally:
            held.close()
    pytest.fail("could not lock a free device")
