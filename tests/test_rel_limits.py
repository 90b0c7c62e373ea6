"""Resource limits: with every candidate device unusable, attach ends in a typed error
within its bound; a loop-control lock held by another allocator does not delay attach
(loopdev takes none).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from pathlib import Path

from helpers import MiB, loop_minors, open_fds, remove_added, wait_unbound
from images import make_image

from loopdev import DeviceBusy, DeviceNodeError, Loop, LoopControl, NoFreeDevice, _native

CONTROL = "/dev/loop-control"


def _private_control(directory: Path) -> int:
    """A directory holding only a loop-control node (a copy of /dev's, so its flock is
    ours alone); returns an O_PATH fd on it."""
    directory.mkdir()
    os.mknod(directory / "loop-control", stat.S_IFCHR | 0o600, os.stat(CONTROL).st_rdev)
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def test_exhausted_candidates_fail_within_bound(tmp_path: Path, devices: None) -> None:
    """No candidate device is usable: attach ends in a typed error within its bound
    (64 rounds, 30 s) instead of spinning. Two ways, run side by side:

    - no-nodes: LoopControl(dir_fd) on a private directory that has loop-control but no
      loop nodes: every minor loop-control offers cannot be opened (ENOENT);
    - all-locked: lock=True where every candidate is already flock'ed by us (taken in the
      setup hook and dropped when loopdev gives the device up, so no device is ever held
      longer than loopdev itself holds it). loopdev skips a minor that stays locked and
      asks LOOP_CTL_ADD for a new one; the minors added for this test are removed after.
    """
    image = make_image(tmp_path / "limit.img", MiB)
    minors_before = loop_minors()
    before = open_fds()
    dir_fd = _private_control(tmp_path / "private")
    results: dict[str, tuple[BaseException | None, float]] = {}
    taken: list[int] = []

    def no_nodes() -> None:
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        ctl = LoopControl(dir_fd)
        start = time.monotonic()
        try:
            ctl.loop_for_fd(fd, autoclear=True).close()
            results["no-nodes"] = (None, time.monotonic() - start)
        except BaseException as exc:
            results["no-nodes"] = (exc, time.monotonic() - start)
        finally:
            ctl.close()
            os.close(fd)

    def all_locked() -> None:
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        ctl = LoopControl()

        def setup(lo: Loop) -> None:
            ours = os.open(f"/dev/loop{lo.minor}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(ours, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # someone else's lock: the candidate fails all the same
            taken.append(lo.minor)
            lo.on_close = lambda _lo: os.close(ours)

        start = time.monotonic()
        try:
            ctl.loop_for_fd(fd, lock=True, setup=setup, autoclear=True).close()
            results["all-locked"] = (None, time.monotonic() - start)
        except BaseException as exc:
            results["all-locked"] = (exc, time.monotonic() - start)
        finally:
            ctl.close()
            os.close(fd)

    threads = [threading.Thread(target=f) for f in (no_nodes, all_locked)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        os.close(dir_fd)
        remove_added(set(taken) - minors_before)
    assert all(not t.is_alive() for t in threads), "attach did not give up"
    for name, (exc, elapsed) in sorted(results.items()):
        print(f"{name}: {type(exc).__name__} after {elapsed:.2f} s")
        if name == "no-nodes":
            # A node that never existed is not a race: at once, and said so.
            assert isinstance(exc, DeviceNodeError), f"{name}: {exc!r}"
            assert exc.errno == errno.ENOENT and elapsed < 0.5, (exc, elapsed)
            continue
        assert isinstance(exc, (DeviceBusy, NoFreeDevice)), f"{name}: {exc!r}"
        assert exc.errno in (errno.ENOENT, errno.EWOULDBLOCK, errno.EBUSY), exc
        assert elapsed < 60, f"{name} took {elapsed:.1f} s"
    assert set(results) == {"no-nodes", "all-locked"}
    assert len(taken) > 1, "the setup hook never saw a candidate"
    assert wait_unbound(tmp_path) == []
    assert open_fds() == before


def test_held_control_lock_does_not_delay(tmp_path: Path, devices: None) -> None:
    """Another allocator holds the loop-control lock (a stopped or hung process): attach
    does not wait for it; loopdev takes no lock there (issue 17). A private
    loop-control node: its flock is ours alone, nobody else on the machine waits for it;
    the private directory has no loop nodes, so the device is reached through a private
    node (as in a container)."""
    image = make_image(tmp_path / "locked.img", MiB)
    dir_fd = _private_control(tmp_path / "private")
    holder = os.open("loop-control", os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
    ctl = os.open("loop-control", os.O_RDWR | os.O_CLOEXEC, dir_fd=dir_fd)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        config = _native.Config(flags=_native.LO_FLAGS_AUTOCLEAR)
        start = time.monotonic()
        got = _native.attach(ctl, dir_fd, fd, config, private_nodes=True)
        elapsed = time.monotonic() - start
        os.close(got.fd)
    finally:
        for closing in (holder, ctl, fd, dir_fd):
            os.close(closing)
    assert elapsed < 0.5, f"attach took {elapsed:.2f} s with the control lock held"
    assert os.listdir(tmp_path / "private") == ["loop-control"], "private node left behind"
