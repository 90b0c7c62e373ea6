"""Reliability on real loop devices: what survives kills, threads, races, holders and bad input.

Every test here works on real devices (no mock of the kernel) and can fail:

- kills: children attach with autoclear (both APIs) and get SIGKILL while holding
  a device or in the middle of a tight attach/detach loop; nothing stays bound;
- threads: 8 threads, half compat and half ``attach()``; no failure, no fd left;
- fd hygiene: children started while devices are attached inherit no device,
  control or backing fd;
- durability: blocks written through a device or a partition are in the file
  after detach, also when another process held the device at detach time;
- kernel races: EBUSY from ``LOOP_CONFIGURE``/``LOOP_SET_FD`` made to happen
  (an exclusive holder, non-cooperating allocators) is retried;
- bad input: one matrix over ``attach()``, compat ``loop_for_fd`` (both configure
  paths) and the CLI;
- resource limits: with every candidate unusable, attach ends in a typed error
  within its bound.

``LOOPDEV_LONG=1`` runs the long variants (more kills and cycles).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import bound_under, open_fds

from loopdev import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    DeviceNodeError,
    Loop,
    LoopControl,
    LoopError,
    NoFreeDevice,
    _native,
)
from loopdev.device import attach, open_device

LONG = os.environ.get("LOOPDEV_LONG") == "1"
KILL_REPS = 50 if LONG else 10
THREAD_CYCLES = 200 if LONG else 50
RELEASE_TIMEOUT = 2.0  # how long the kernel may take to release after the last close

MiB = 1 << 20
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SFDISK = shutil.which("sfdisk", path=_TOOL_PATH)
UNSHARE = shutil.which("unshare", path=_TOOL_PATH)
MOUNT = shutil.which("mount", path=_TOOL_PATH)


# --- helpers -----------------------------------------------------------------------


def make_image(path: Path, size: int = 4 * MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# GPT made by sfdisk: p1 at 1 MiB (6 MiB), p2 at 7 MiB (4 MiB), in 512-byte sectors.
GPT_PARTS = ((1 * MiB, 6 * MiB), (7 * MiB, 4 * MiB))


def gpt_image(path: Path, size: int = 16 * MiB) -> Path:
    if SFDISK is None:
        pytest.skip("sfdisk (util-linux) not installed")
    make_image(path, size)
    script = "label: gpt\n" + "".join(
        f"start={start // 512}, size={length // 512}\n" for start, length in GPT_PARTS
    )
    subprocess.run(
        [SFDISK, "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=script,
        text=True,
        check=True,
        capture_output=True,
    )
    return path


def poll(condition: Callable[[], bool], timeout: float) -> bool:
    """True as soon as ``condition()`` holds, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)
    return True


def wait_unbound(prefix: str | Path, timeout: float = RELEASE_TIMEOUT) -> list[str]:
    """Devices still bound below ``prefix`` after waiting up to ``timeout`` for the kernel."""
    poll(lambda: not bound_under(str(prefix)), timeout)
    return bound_under(str(prefix))


def backing_of(minor: int) -> str | None:
    try:
        with open(f"/sys/block/loop{minor}/loop/backing_file") as f:
            return f.read().strip() or None
    except OSError:
        return None


def partitions_of(minor: int) -> list[str]:
    try:
        entries = os.listdir(f"/sys/block/loop{minor}")
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(f"loop{minor}p"))


def bound_exactly(path: str, timeout: float = RELEASE_TIMEOUT) -> list[str]:
    """Loop devices still backed by exactly ``path`` (e.g. another loop device) after
    waiting up to ``timeout``; ``bound_under`` would take /dev/loop1 for /dev/loop10."""

    def names() -> list[str]:
        return [
            n
            for n in os.listdir("/sys/block")
            if n.startswith("loop") and n[4:].isdigit() and backing_of(int(n[4:])) == path
        ]

    poll(lambda: not names(), timeout)
    return names()


def wait_node(path: str, timeout: float = 5.0) -> None:
    def ready() -> bool:
        try:
            return stat.S_ISBLK(os.stat(path).st_mode)
        except FileNotFoundError:
            return False

    assert poll(ready, timeout), f"{path} did not appear"


def digest(path: str | Path, spans: list[tuple[int, int]]) -> str:
    """sha256 over the bytes of ``path`` at each (offset, length), in order."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for offset, length in spans:
            data = os.pread(fd, length, offset)
            assert len(data) == length
            h.update(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def random_blocks(rng: random.Random, area: int, count: int, block: int = 4096) -> list[int]:
    """``count`` distinct block-aligned offsets within ``area`` bytes."""
    return sorted(b * block for b in rng.sample(range(area // block), count))


def write_blocks(fd: int, offsets: list[int], rng: random.Random, block: int = 4096) -> str:
    """Write random blocks at ``offsets``; returns the sha256 of what was written."""
    h = hashlib.sha256()
    for offset in offsets:
        data = rng.randbytes(block)
        assert os.pwrite(fd, data, offset) == block
        h.update(data)
    return h.hexdigest()


def python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """A child interpreter running ``code`` (stdout/stdin piped, text)."""
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def reap(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """Kill (if still running) and collect a child; returns its remaining stdout, stderr."""
    if proc.poll() is None:
        proc.kill()
    try:
        out, err = proc.communicate(timeout=30)
    except ValueError:  # already collected: its pipes are closed
        return "", ""
    return out, err


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Children registered here are killed and reaped even when the test fails."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        reap(proc)


# --- 1. kills ---------------------------------------------------------------------

KILL_CHILD = r"""
import os, sys, time
import loopdev
api, mode, path, partscan = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
if api == "compat":
    ctl = loopdev.LoopControl()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    def once():
        lo = ctl.loop_for_fd(fd, autoclear=True, partscan=partscan)
        return lo.minor, lo.close
else:
    def once():
        dev = loopdev.attach(path, partscan=partscan)
        return dev.minor, dev.detach
if mode == "hold":
    minor, _ = once()
    os.write(1, b"%d\n" % minor)
    time.sleep(120)
else:
    os.write(1, b"GO\n")
    while True:
        minor, release = once()
        os.write(1, b"%d\n" % minor)
        release()
"""


def _kill_once(
    api: str, mode: str, image: Path, partscan: bool, rng: random.Random, env: dict[str, str]
) -> list[int]:
    """One child killed at a random point; returns the minors it had attached."""
    proc = python(KILL_CHILD, api, mode, str(image), "1" if partscan else "0", env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if not first:
            _, err = reap(proc)
            pytest.fail(f"child died before it started: {err}")
        # Hold: anywhere while it owns the device. Loop: anywhere in attach/detach.
        time.sleep(rng.uniform(0, 0.05) if mode == "hold" else rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL, f"child failed before the kill: {err}"
    lines = ([first] if first != "GO" else []) + out.split()
    return [int(m) for m in lines]


@pytest.mark.parametrize("mode", ["hold", "attach-loop"])
@pytest.mark.parametrize("api", ["compat", "attach"])
def test_sigkill_leaves_nothing_bound(tmp_path: Path, devices: None, api: str, mode: str) -> None:
    """SIGKILL at random points: the kernel releases every autoclear device and partition."""
    image = gpt_image(tmp_path / "kill.img") if SFDISK else make_image(tmp_path / "kill.img")
    rng = random.Random()
    env = dict(os.environ, LOOPDEV_FORCE_FALLBACK="0")
    attached = 0
    for rep in range(KILL_REPS):
        partscan = SFDISK is not None and rep % 2 == 0
        minors = _kill_once(api, mode, image, partscan, rng, env)
        attached += len(minors)
        left = wait_unbound(tmp_path)
        for name in left:
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
        assert left == [], f"rep {rep} ({api}, {mode}, partscan={partscan}) left {left} bound"
        for minor in set(minors):
            # Partitions on a device nobody has bound any more are a leak (BLKPG
            # partitions outlive LOOP_CLR_FD where partscan is off).
            parts = partitions_of(minor)
            if parts and backing_of(minor) is None:
                pytest.fail(f"loop{minor} is unbound but still has partitions {parts}")
    assert attached > 0, "no child ever got a device: the kills proved nothing"


@pytest.mark.skipif(not LONG, reason="long variant (LOOPDEV_LONG=1)")
def test_sigkill_in_fallback_leaks_only_in_the_documented_window(
    tmp_path: Path, devices: None
) -> None:
    """Without LOOP_CONFIGURE, a kill between LOOP_SET_FD and LOOP_SET_STATUS64 (which
    sets autoclear) leaves the device bound: the kernel offers no atomic way. Prove that
    this is the only leak there is (bound to our file, autoclear off, no partitions)."""
    image = make_image(tmp_path / "kill.img")
    rng = random.Random()
    env = dict(os.environ, LOOPDEV_FORCE_FALLBACK="1")
    leaks = 0
    for rep in range(KILL_REPS):
        api = "compat" if rep % 2 else "attach"
        _kill_once(api, "attach-loop", image, False, rng, env)
        for name in wait_unbound(tmp_path):
            minor = int(name[4:])
            with open(f"/sys/block/{name}/loop/autoclear") as f:
                autoclear = f.read().strip()
            parts = partitions_of(minor)
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
            assert autoclear == "0" and parts == [], f"unexpected leak shape on {name}"
            leaks += 1
    assert wait_unbound(tmp_path) == []
    print(f"fallback kills: {leaks} of {KILL_REPS} left a device in the SET_FD window")


# --- 2. threads ---------------------------------------------------------------------


def test_eight_threads_both_apis(tmp_path: Path, devices: None) -> None:
    """4 threads compat (one shared LoopControl) + 4 threads attach(), concurrently."""
    paths = [str(make_image(tmp_path / f"t{i}.img", 1 * MiB)) for i in range(8)]
    before = open_fds()
    failures: list[str] = []
    record = failures.append  # list.append is atomic under the GIL
    barrier = threading.Barrier(8)
    ctl = LoopControl()

    def compat_worker(path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            barrier.wait()
            for _ in range(THREAD_CYCLES):
                try:
                    lo = ctl.loop_for_fd(fd, autoclear=True)
                    try:
                        if not lo.is_bound_to(fd):
                            record(f"compat loop{lo.minor} not bound to {path}")
                    finally:
                        lo.close()
                except Exception as exc:
                    record(f"compat: {exc!r}")
        finally:
            os.close(fd)

    def attach_worker(path: str) -> None:
        barrier.wait()
        for _ in range(THREAD_CYCLES):
            try:
                with attach(path) as dev:
                    if dev.info().backing_file != path:
                        record(f"attach {dev.path} not bound to {path}")
            except Exception as exc:
                record(f"attach: {exc!r}")

    threads = [
        threading.Thread(target=compat_worker if i % 2 else attach_worker, args=(p,))
        for i, p in enumerate(paths)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        ctl.close()
    assert failures == []
    assert wait_unbound(tmp_path) == []
    assert open_fds() == before


# --- 3. fd hygiene ------------------------------------------------------------------

FD_LISTER = (
    "import os\n"
    "for n in os.listdir('/proc/self/fd'):\n"
    "    try:\n"
    "        print(os.readlink('/proc/self/fd/' + n))\n"
    "    except OSError:\n"
    "        pass\n"
)


def child_fd_targets() -> list[str]:
    """What a child started with close_fds=False finds open in itself."""
    out = subprocess.run(
        [sys.executable, "-S", "-I", "-c", FD_LISTER],
        close_fds=False,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def assert_clean(targets: list[str], forbidden: list[str]) -> None:
    leaked = [
        t
        for t in targets
        if t.startswith("/dev/loop") or any(t == f or t.startswith(f + " ") for f in forbidden)
    ]
    assert leaked == [], f"child inherited {leaked}"


@pytest.mark.parametrize("api", ["compat", "compat-clear_fd_wait", "attach", "attach-partscan"])
def test_children_inherit_no_fd(tmp_path: Path, devices: None, api: str) -> None:
    image = gpt_image(tmp_path / "fd.img") if api == "attach-partscan" else None
    image = image or make_image(tmp_path / "fd.img")
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    forbidden = [str(image), "/dev/loop-control", str(node_dir)]
    if api.startswith("compat"):
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True)
        try:
            forbidden.append(f"/dev/loop{lo.minor}")
            assert_clean(child_fd_targets(), forbidden)
            if api == "compat-clear_fd_wait":
                # The fd is parked on O_PATH and reopened with dup2 under the same number.
                lo.clear_fd_wait(fd, 5.0, 0.01)
                assert lo.fd >= 0
                assert_clean(child_fd_targets(), forbidden)
        finally:
            lo.close()
            ctl.close()
            os.close(fd)
    else:
        partscan = api == "attach-partscan"
        with attach(image, partscan=partscan, node_dir=node_dir) as dev:
            if partscan:
                assert len(dev.partitions) == 2
            forbidden += [dev.path, *(str(node_dir / n) for n in dev.nodes)]
            assert_clean(child_fd_targets(), forbidden)


def test_children_spawned_during_attach_loop_inherit_no_fd(
    tmp_path: Path, devices: None, configure_path: str
) -> None:
    """Fds the native loop opens for a moment (device, /proc/self/fd, sysfs dirs) are CLOEXEC."""
    image = gpt_image(tmp_path / "busy.img") if SFDISK else make_image(tmp_path / "busy.img")
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            while not stop.is_set():
                try:
                    lo = ctl.loop_for_fd(fd, autoclear=True, partscan=SFDISK is not None)
                    lo.close()
                    with attach(image, partscan=SFDISK is not None, direct_io=False):
                        pass
                except Exception as exc:
                    errors.append(repr(exc))
                    return
        finally:
            os.close(fd)
            ctl.close()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(25):
            assert_clean(child_fd_targets(), [str(image), "/dev/loop-control"])
    finally:
        stop.set()
        worker.join()
    assert errors == []
    assert wait_unbound(tmp_path) == []


# --- 4. durability ------------------------------------------------------------------


def _attach_partscan(api: str, image: Path) -> tuple[int, Callable[[], None], int]:
    """Attach with partscan; (minor, release, the library's own device fd)."""
    if api == "compat":
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
        finally:
            os.close(fd)
            ctl.close()
        return lo.minor, lo.close, lo.fd
    dev = attach(image, partscan=True)
    return dev.minor, dev.detach, dev.fd


@pytest.mark.parametrize("target", ["device", "partition"])
@pytest.mark.parametrize("api", ["compat", "attach"])
def test_writes_are_in_the_file_after_detach(
    tmp_path: Path, devices: None, api: str, target: str
) -> None:
    image = gpt_image(tmp_path / "dur.img")
    rng = random.Random()
    minor, release, dev_fd = _attach_partscan(api, image)
    try:
        if target == "device":
            base = 0
            offsets = random_blocks(rng, 16 * MiB, 64)
            # Through the library's own fd, not flushed by us: release must do it.
            expected = write_blocks(dev_fd, offsets, rng)
        else:
            base, area = GPT_PARTS[0]
            offsets = random_blocks(rng, area, 64)
            part = f"/dev/loop{minor}p1"
            wait_node(part)
            pfd = os.open(part, os.O_RDWR | os.O_CLOEXEC)
            try:
                expected = write_blocks(pfd, offsets, rng)
            finally:
                os.close(pfd)
    finally:
        release()
    assert wait_unbound(tmp_path) == []
    assert partitions_of(minor) == [] or backing_of(minor) is not None
    assert digest(image, [(base + o, 4096) for o in offsets]) == expected


HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
os.pread(fd, 4096, 0)
print("held", flush=True)
sys.stdin.read()  # until the parent closes our stdin
os.close(fd)
"""


def _hold(path: str, procs: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    proc = python(HOLDER, path)
    procs.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "held", proc.stderr.read() if proc.stderr else ""
    return proc


def _let_go(proc: subprocess.Popen[str]) -> None:
    proc.communicate(timeout=30)
    assert proc.returncode == 0


@pytest.mark.parametrize("how", ["attach-timeout", "attach-waits", "compat-close", "compat-wait"])
def test_writes_survive_a_reader_holding_the_device(
    tmp_path: Path, devices: None, how: str, child_procs: list[subprocess.Popen[str]]
) -> None:
    """Another process holds the device read-only while we detach: the data still lands."""
    image = make_image(tmp_path / "held.img", 8 * MiB)
    rng = random.Random()
    offsets = random_blocks(rng, 8 * MiB, 64)
    if how.startswith("attach"):
        dev = attach(image)
        expected = write_blocks(dev.fd, offsets, rng)
        holder = _hold(dev.path, child_procs)
        if how == "attach-timeout":
            start = time.monotonic()
            with pytest.raises(DeviceBusy) as exc:
                dev.detach(timeout=0.3)
            assert 0.3 <= time.monotonic() - start < 5
            assert exc.value.errno == errno.EBUSY and exc.value.device == dev.path
            assert bound_under(str(tmp_path)) == [dev.name]  # still held, still bound
            _let_go(holder)
        else:
            threading.Timer(0.3, lambda: _let_go(holder)).start()
            start = time.monotonic()
            dev.detach(timeout=10)
            assert time.monotonic() - start >= 0.25
    else:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True)
        expected = write_blocks(lo.fd, offsets, rng)
        holder = _hold(f"/dev/loop{lo.minor}", child_procs)
        try:
            if how == "compat-wait":
                with pytest.raises(TimeoutError):
                    lo.clear_fd_wait(fd, 0.3, 0.01)
                assert lo.is_bound_to(fd)
            else:
                lo.clear_fd()
        finally:
            lo.close()
            os.close(fd)
            ctl.close()
        assert bound_under(str(tmp_path)) != []  # the holder keeps it bound
        _let_go(holder)
    assert wait_unbound(tmp_path) == []
    assert digest(image, [(o, 4096) for o in offsets]) == expected


@pytest.mark.parametrize("api", ["compat", "attach"])
def test_busy_partition_refuses_detach_and_changes_nothing(
    tmp_path: Path, devices: None, api: str
) -> None:
    """One partition is open: detach (compat clear_fd) raises DeviceBusy and the device keeps
    every partition, not only the busy one (README: "nothing changed then")."""
    image = gpt_image(tmp_path / "busy.img")
    release: Callable[[], None]
    again: Callable[[], None]
    if api == "attach":
        dev = attach(image, partscan=True)
        minor, release, again = dev.minor, dev.detach, dev.detach
    else:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
        minor, release = lo.minor, lo.clear_fd

        def close_all() -> None:
            lo.close()
            os.close(fd)
            ctl.close()

        again = close_all

    wait_node(f"/dev/loop{minor}p2")
    before = partitions_of(minor)
    assert len(before) == 2
    holder = os.open(f"/dev/loop{minor}p2", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(DeviceBusy) as exc:
            release()
        assert exc.value.errno == errno.EBUSY
        assert backing_of(minor) == str(image)
        assert partitions_of(minor) == before  # "nothing changed then"
    finally:
        os.close(holder)
        again()
    assert wait_unbound(tmp_path) == []


# --- 5. kernel races ------------------------------------------------------------------

EXCL_HOLDER = r"""
import fcntl, os, sys, time
LOOP_CTL_GET_FREE = 0x4C82
ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
for _ in range(100):
    minor = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
    try:
        fd = os.open(f"/dev/loop{minor}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        break
    except OSError:
        time.sleep(0.001)
print(minor, time.monotonic() + float(sys.argv[1]), flush=True)
time.sleep(float(sys.argv[1]))
os.close(fd)
"""


@pytest.mark.parametrize("api", ["compat", "attach"])
def test_exclusive_holder_busy_is_retried(
    tmp_path: Path,
    devices: None,
    configure_path: str,
    api: str,
    child_procs: list[subprocess.Popen[str]],
) -> None:
    """A process holds the next free minor with O_EXCL: LOOP_CONFIGURE / LOOP_SET_FD answer
    EBUSY until it lets go (0.3 s, so others on this machine just retry as well)."""
    image = make_image(tmp_path / "excl.img")
    holder = python(EXCL_HOLDER, "0.3")
    child_procs.append(holder)
    assert holder.stdout is not None
    line = holder.stdout.readline().split()
    assert line, holder.stderr.read() if holder.stderr else ""
    held, released_at = int(line[0]), float(line[1])
    start = time.monotonic()
    if api == "compat":
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            lo = ctl.loop_for_fd(fd, autoclear=True)
            minor = lo.minor
            lo.close()
        finally:
            os.close(fd)
            ctl.close()
    else:
        with attach(image) as dev:
            minor = dev.minor
    end = time.monotonic()
    holder.communicate(timeout=30)
    print(f"held loop{held} for 0.3 s; got loop{minor} after {end - start:.3f} s")
    if minor == held:
        # It got the minor that was busy: it must have been refused and retried until then.
        assert start < released_at <= end + 0.05
    assert wait_unbound(tmp_path) == []


ROGUE = r"""
import errno, fcntl, os, struct, sys, time
LOOP_CTL_GET_FREE, LOOP_CONFIGURE, AUTOCLEAR = 0x4C82, 0x4C0A, 4
ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
back = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
cfg = bytearray(304)  # struct loop_config: fd, block_size, loop_info64, reserved
struct.pack_into("<II", cfg, 0, back, 0)
struct.pack_into("<I", cfg, 8 + 52, AUTOCLEAR)
deadline = time.monotonic() + float(sys.argv[2])
busy = done = 0
while time.monotonic() < deadline:
    minor = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)  # no lock: it does not cooperate
    try:
        dev = os.open(f"/dev/loop{minor}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        continue
    try:
        fcntl.ioctl(dev, LOOP_CONFIGURE, bytes(cfg))
        done += 1
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        busy += 1
    os.close(dev)
print(busy, done)
"""

CONTENDER = r"""
import json, os, sys, time
import loopdev
from loopdev import _native
path, cycles = sys.argv[1], int(sys.argv[2])
ctl = loopdev.LoopControl()
fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
dev_dir = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
failures, retries = [], 0
config = _native.Config(flags=_native.LO_FLAGS_AUTOCLEAR)
for i in range(cycles):
    try:
        if i % 2:
            lo = ctl.loop_for_fd(fd, autoclear=True)
            if not lo.is_bound_to(fd):
                failures.append("not bound")
            lo.close()
        else:  # the engine of loop_for_fd, to count its retries
            got = _native.attach(ctl.fd, dev_dir, fd, config)
            retries += got.retries
            os.close(got.fd)
    except OSError as exc:
        failures.append(repr(exc))
print(json.dumps({"failures": failures, "retries": retries}))
"""


def test_contending_allocators_never_fail(
    tmp_path: Path, devices: None, child_procs: list[subprocess.Popen[str]]
) -> None:
    """4 loopdev processes (2 through the LOOP_SET_FD fallback) against 2 allocators that do
    not take the loop-control lock: the EBUSY race really happens and loopdev retries it."""
    cycles = 400 if LONG else 100
    rogue_time = 10.0 if LONG else 2.5
    for i in range(2):
        rogue = python(ROGUE, str(make_image(tmp_path / f"rogue{i}.img", MiB)), str(rogue_time))
        child_procs.append(rogue)
    workers = []
    for i in range(4):
        env = dict(os.environ, LOOPDEV_FORCE_FALLBACK="1" if i % 2 else "0")
        path = make_image(tmp_path / f"w{i}.img", MiB)
        workers.append(python(CONTENDER, str(path), str(cycles), env=env))
        child_procs.append(workers[-1])
    reports = []
    for proc in workers:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    busy = 0
    for proc in child_procs[:2]:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        busy += int(out.split()[0])
    assert [r["failures"] for r in reports] == [[]] * 4
    retries = sum(r["retries"] for r in reports)
    print(f"contention: {retries} loopdev retries, {busy} EBUSY seen by the rogue allocators")
    assert retries + busy > 0, "the race never happened: the test proved nothing"
    assert wait_unbound(tmp_path) == []


READER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
print("reading", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for off in range(0, 1 << 20, 65536):
        try:
            os.pread(fd, 65536, off)
        except OSError:
            pass
os.close(fd)
"""


def test_configure_while_another_process_reads(
    tmp_path: Path,
    devices: None,
    configure_path: str,
    child_procs: list[subprocess.Popen[str]],
) -> None:
    """Bind (LOOP_CONFIGURE, or SET_FD + SET_STATUS64 + SET_BLOCK_SIZE in the fallback) a
    device that another process holds open and reads, then change offset and block size
    under its reads: where the kernel answers EAGAIN (5.x) it is retried, never surfaced."""
    image = make_image(tmp_path / "reader.img", 4 * MiB)
    ctl = LoopControl()
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        for _attempt in range(5):  # the free minor is shared with everyone on this machine
            lo = Loop(ctl.get_unbound())
            reader = python(READER, f"/dev/loop{lo.minor}", "1.0")
            child_procs.append(reader)
            assert reader.stdout is not None and reader.stdout.readline().strip() == "reading"
            try:
                lo.configure(fd, offset=4096, sizelimit=2 * MiB, blocksize=4096, autoclear=True)
                break
            except DeviceBusy as exc:
                busy = exc
                lo.close()
                reap(reader)
        else:
            pytest.fail(f"no free minor stayed free for a single configure: {busy}")
        try:
            status = lo.get_status()
            assert (status.lo_offset, status.lo_sizelimit, status.autoclear) == (4096, 2 * MiB, 1)
            assert lo.is_bound_to(fd)
            for i in range(6):
                lo.set_status(offset=8192 if i % 2 else 4096)
                lo.set_block_size(512 if i % 2 else 4096)
            assert lo.get_status().lo_offset == 8192
        finally:
            lo.close()
        reader.communicate(timeout=30)
    finally:
        os.close(fd)
        ctl.close()
    assert wait_unbound(tmp_path) == []


# --- 6. bad input matrix ----------------------------------------------------------------


def _cli_available() -> bool:
    try:
        import loopdev.cli  # noqa: F401
    except ImportError:
        return False
    return True


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")


def _readonly(tmp_path: Path) -> str:
    path = make_image(tmp_path / "ro.img", MiB)
    path.chmod(0o444)
    return str(path)


def _closed_fd() -> int:
    for fd in range(900, 1000):
        try:
            os.fstat(fd)
        except OSError:
            return fd
    raise AssertionError("no closed fd number found")


def _tmpfs_file(tmp_path: Path) -> str:
    path = Path("/dev/shm") / f"loopdev-rel-{os.getpid()}-{tmp_path.name}.img"
    make_image(path, MiB)
    return str(path)


def _tmpfs_has_odirect() -> bool:
    path = Path("/dev/shm") / f"loopdev-rel-probe-{os.getpid()}"
    make_image(path, 4096)
    try:
        os.close(os.open(path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC))
        return True
    except OSError:
        return False
    finally:
        path.unlink()


class Expect(NamedTuple):
    """``kind``: "raise" (``exc`` with ``code``), "ok" (binds; undone by the test), or
    "either" (the kernel decides: success, or ``exc`` with ``code``)."""

    kind: str
    exc: type[BaseException] | None = None
    code: int | None = None


def raises(exc: type[BaseException], code: int | None) -> Expect:
    return Expect("raise", exc, code)


OK = Expect("ok")


class Row(NamedTuple):
    """One bad input. ``backing(tmp_path, image)`` gives a path or an fd; ``kwargs`` are
    attach()'s (compat gets the matching loop_for_fd keywords, the CLI the options)."""

    backing: Callable[[Path, Path], str | int]
    kwargs: dict[str, Any]
    expect: dict[str, Expect]  # by API; an API not listed does not apply


# API keys: "attach" = loopdev.attach(); "compat" / "compat-fallback" = LoopControl.loop_for_fd
# through LOOP_CONFIGURE / the forced LOOP_SET_FD fallback, with paths opened by the test and
# passed as fds; "cli" = python -m loopdev attach.
ROWS: dict[str, Row] = {
    "missing": Row(
        lambda t, i: str(t / "nope.img"),
        {},
        {"attach": raises(BackingFileError, errno.ENOENT), "cli": raises(SystemExit, 1)},
    ),
    "directory": Row(
        lambda t, i: str(t),
        {},
        {
            "attach": raises(BackingFileError, errno.EISDIR),
            "compat": raises(ConfigureError, errno.EINVAL),
            "compat-fallback": raises(ConfigureError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    "fifo": Row(
        lambda t, i: _fifo(t),
        {},
        {
            "attach": raises(BackingFileError, errno.EINVAL),
            "compat": raises(ConfigureError, errno.EINVAL),
            "compat-fallback": raises(ConfigureError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    "dev-null": Row(
        lambda t, i: "/dev/null",
        {},
        {
            "attach": raises(BackingFileError, errno.EINVAL),
            "compat": raises(ConfigureError, errno.EINVAL),
            "compat-fallback": raises(ConfigureError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    "fd-minus-one": Row(
        lambda t, i: -1,
        {},
        {
            "attach": raises(BackingFileError, errno.EBADF),
            # The classic API raises ValueError here; compat keeps that on purpose.
            "compat": raises(ValueError, None),
        },
    ),
    "closed-fd": Row(
        lambda t, i: _closed_fd(),
        {},
        {
            "attach": raises(BackingFileError, errno.EBADF),
            "compat": raises(ConfigureError, errno.EBADF),
            "compat-fallback": raises(ConfigureError, errno.EBADF),
        },
    ),
    # compat passes offset and size limit to the kernel as the classic module does: it
    # binds a 0-byte device for an offset past the end, and rounds a size limit down.
    "offset-past-end": Row(
        lambda t, i: str(i),
        {"offset": 32 * MiB},
        {"attach": raises(BackingFileError, errno.EINVAL), "cli": raises(SystemExit, 1)},
    ),
    "negative-offset": Row(
        lambda t, i: str(i),
        {"offset": -1},
        {
            "attach": raises(ConfigureError, errno.EINVAL),
            "compat": raises(ConfigureError, errno.EINVAL),
            "compat-fallback": raises(ConfigureError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    "sizelimit-1000": Row(
        lambda t, i: str(i),
        {"sizelimit": 1000},
        {"attach": raises(ConfigureError, errno.EINVAL), "cli": raises(SystemExit, 1)},
    ),
    "sizelimit-2**64": Row(
        lambda t, i: str(i),
        {"sizelimit": 1 << 64},
        {
            "attach": raises(ConfigureError, errno.EINVAL),
            "compat": raises(ConfigureError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    "block-1000": Row(
        lambda t, i: str(i),
        {"block_size": 1000},
        {
            "attach": raises(ConfigureError, errno.EINVAL),
            "compat": raises(ConfigureError, errno.EINVAL),
            "compat-fallback": raises(ConfigureError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    # attach() allows 512..4096; the kernel decides for compat (6.15+ accepts 8192).
    "block-8192": Row(
        lambda t, i: str(i),
        {"block_size": 8192},
        {
            "attach": raises(ConfigureError, errno.EINVAL),
            "compat": Expect("either", ConfigureError, errno.EINVAL),
            "compat-fallback": Expect("either", LoopError, errno.EINVAL),
            "cli": raises(SystemExit, 1),
        },
    ),
    # Root opens a 0444 file read-write anyway, so only attach() can refuse; with an
    # O_RDONLY fd the kernel binds read-only, which is the classic loop_for_fd behaviour.
    "rw-on-readonly-file": Row(
        lambda t, i: _readonly(t),
        {},
        {"attach": raises(BackingFileError, errno.EACCES), "cli": raises(SystemExit, 1)},
    ),
    "rw-on-readonly-fd": Row(
        lambda t, i: str(i),
        {"_fd_mode": os.O_RDONLY},
        {"attach": raises(BackingFileError, errno.EBADF)},
    ),
    # tmpfs has O_DIRECT since 6.6: forced direct I/O must then work.
    "direct-io-tmpfs": Row(
        lambda t, i: _tmpfs_file(t),
        {"direct_io": True},
        {"attach": OK, "cli": OK},
    ),
    # ramfs has no O_DIRECT (run in a private mount namespace).
    "direct-io-ramfs": Row(
        lambda t, i: "ramfs",
        {"direct_io": True},
        {"attach": raises(BackingFileError, errno.EINVAL), "cli": raises(SystemExit, 1)},
    ),
    # A loop device as backing file: loop-on-loop is allowed.
    "loop-device": Row(
        lambda t, i: "outer-loop",
        {},
        {"attach": OK, "compat": OK, "compat-fallback": OK, "cli": OK},
    ),
    # A real cycle: a device bound to itself (LOOP_CONFIGURE / LOOP_SET_FD) or turned into
    # a cycle with LOOP_CHANGE_FD; the kernel answers EBADF. Compat only: attach() cannot
    # choose the minor.
    "self-cycle": Row(
        lambda t, i: "self",
        {},
        {
            "compat": raises(ConfigureError, errno.EBADF),
            "compat-fallback": raises(ConfigureError, errno.EBADF),
        },
    ),
    "change-fd-cycle": Row(
        lambda t, i: "cycle",
        {},
        {
            "compat": raises(LoopError, errno.EBADF),
            "compat-fallback": raises(LoopError, errno.EBADF),
        },
    ),
    # Best effort: another thread truncates the file while we attach in a loop.
    "truncated-while-attaching": Row(
        lambda t, i: str(i),
        {},
        {"attach": Expect("either", LoopError, None), "compat": Expect("either", LoopError, None)},
    ),
}


def _matrix() -> list[Any]:
    return [
        pytest.param(name, api, id=f"{name}-{api}")
        for name, row in ROWS.items()
        for api in row.expect
    ]


_COMPAT_KW = {"offset": "offset", "sizelimit": "sizelimit", "block_size": "blocksize"}
_CLI_OPT = {"offset": "--offset", "sizelimit": "--sizelimit", "block_size": "--sector-size"}


def _run_cli(backing: str, kwargs: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "loopdev", "attach", "--show"]
    for key, value in kwargs.items():
        if key == "direct_io":
            argv.append("--direct-io=on" if value is True else f"--direct-io={value}")
        else:
            argv += [_CLI_OPT[key], str(value)]
    return subprocess.run([*argv, backing], capture_output=True, text=True, timeout=60)


RAMFS_CHILD = r"""
import json, os, subprocess, sys
import loopdev
path, api, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(path, "wb") as f:
    f.truncate(1 << 20)
if api == "cli":
    out = subprocess.run(argv + [path], capture_output=True, text=True)
    print(json.dumps({"rc": out.returncode, "stderr": out.stderr}))
    sys.exit()
try:
    with loopdev.attach(path, direct_io=True):
        print(json.dumps({"ok": True}))
except OSError as exc:
    print(json.dumps({"type": type(exc).__name__, "errno": exc.errno, "text": str(exc)}))
"""


def _ramfs_case(tmp_path: Path, api: str, expect: Expect) -> None:
    if UNSHARE is None or MOUNT is None:
        pytest.skip("unshare/mount (util-linux) not installed")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    path = str(mnt / "x.img")
    cli = [sys.executable, "-m", "loopdev", "attach", "--show", "--direct-io=on"]
    script = f'{MOUNT} -t ramfs ramfs "$1" && shift && exec "$@"'
    out = subprocess.run(
        [
            *(UNSHARE, "-m", "--propagation", "private", "sh", "-c", script, "sh", str(mnt)),
            *(sys.executable, "-c", RAMFS_CHILD, path, api, *cli),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip(f"no private ramfs mount here: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    if api == "cli":
        assert result["rc"] == 1
        lines = result["stderr"].splitlines()
        assert len(lines) == 1 and lines[0].startswith("loopdev: ") and path in lines[0]
    else:
        assert expect.exc is not None
        assert result.get("type") == expect.exc.__name__, result
        assert result["errno"] == expect.code and path in result["text"]


def _check_error(exc: BaseException, expect: Expect, backing: str | int) -> None:
    assert expect.exc is not None
    assert isinstance(exc, expect.exc), f"{type(exc).__name__}: {exc}"
    if expect.exc is ValueError:
        return
    assert isinstance(exc, OSError)
    if expect.code is not None:
        assert exc.errno == expect.code, exc
    if isinstance(backing, str):
        assert backing in str(exc), f"path missing from {exc}"


def _attach_any(api: str, backing: str | int, kwargs: dict[str, Any]) -> Callable[[], None]:
    """Attach through ``api``; returns how to undo it."""
    if api == "attach":
        dev = attach(backing, **kwargs)
        return dev.detach
    compat_kwargs = {_COMPAT_KW[k]: v for k, v in kwargs.items()}
    ctl = LoopControl()
    if isinstance(backing, str):
        # The test opens what only makes sense as a path (O_NONBLOCK: a FIFO).
        mode = os.O_RDONLY if os.path.isdir(backing) else os.O_RDWR | os.O_NONBLOCK
        fd = os.open(backing, mode | os.O_CLOEXEC)
    else:
        fd = backing
    try:
        lo = ctl.loop_for_fd(fd, autoclear=True, **compat_kwargs)
    finally:
        ctl.close()
        if isinstance(backing, str):
            os.close(fd)
    return lo.close


def _truncation_race(api: str, image: Path) -> None:
    stop = threading.Event()

    def truncate() -> None:
        while not stop.is_set():
            os.truncate(image, 0)
            os.truncate(image, MiB)

    errors: list[LoopError] = []
    worker = threading.Thread(target=truncate)
    worker.start()
    try:
        for _ in range(30):
            try:
                _attach_any(api, str(image), {})()
            except LoopError as exc:  # typed: what we want
                errors.append(exc)
    finally:
        stop.set()
        worker.join()
    for error in errors:
        assert error.errno and error.strerror


def _cycle_case(tmp_path: Path, row: str, image: Path) -> None:
    ctl = LoopControl()
    if row == "self-cycle":
        try:
            for _attempt in range(5):
                lo = Loop(ctl.get_unbound())
                try:
                    lo.configure(lo.fd, autoclear=True)  # loopN backed by loopN
                except DeviceBusy:
                    continue  # bound by someone else since get_unbound()
                finally:
                    lo.close()
                pytest.fail(f"loop{lo.minor} was bound to itself")
        finally:
            ctl.close()
        pytest.fail("no free minor stayed free")
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    a = ctl.loop_for_fd(fd, read_only=True, autoclear=True)
    a_fd = os.open(f"/dev/loop{a.minor}", os.O_RDONLY | os.O_CLOEXEC)
    b = ctl.loop_for_fd(a_fd, read_only=True, autoclear=True)
    b_fd = os.open(f"/dev/loop{b.minor}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        a.change_fd(b_fd)  # a -> b -> a: refused
    finally:
        os.close(b_fd)
        b.close()
        os.close(a_fd)
        a.close()
        os.close(fd)
        ctl.close()
        assert wait_unbound(tmp_path) == []


@pytest.mark.parametrize(("row", "api"), _matrix())
def test_bad_input_matrix(tmp_path: Path, image: Path, row: str, api: str) -> None:
    """Each bad input: a typed error (OSError subclass, errno, path) and nothing bound."""
    spec = ROWS[row]
    expect = spec.expect[api]
    if api == "cli" and not _cli_available():
        pytest.skip("loopdev.cli is not there yet")
    if api == "compat-fallback":
        _native.force_fallback(True)
    kwargs = dict(spec.kwargs)
    fd_mode = kwargs.pop("_fd_mode", None)
    cleanup: list[Callable[[], None]] = []
    try:
        backing = spec.backing(tmp_path, image)
        if backing == "ramfs":
            _ramfs_case(tmp_path, api, expect)
            return
        if backing in ("self", "cycle"):
            with pytest.raises(OSError) as caught:
                _cycle_case(tmp_path, row, image)
            _check_error(caught.value, expect, -1)
            return
        if row == "truncated-while-attaching":
            _truncation_race(api, image)
            return
        if backing == "outer-loop":
            outer = attach(image)
            cleanup.append(outer.detach)
            backing = outer.path
        if isinstance(backing, str) and backing.startswith("/dev/shm/"):
            cleanup.append(lambda: os.unlink(str(backing)))
            if not _tmpfs_has_odirect():
                expect = (
                    raises(BackingFileError, errno.EINVAL)
                    if api == "attach"
                    else raises(SystemExit, 1)
                )
        if fd_mode is not None:
            assert isinstance(backing, str)
            backing = os.open(backing, fd_mode | os.O_CLOEXEC)
            cleanup.append(lambda: os.close(int(backing)))
        if api == "cli":
            assert isinstance(backing, str)
            out = _run_cli(backing, kwargs)
            if expect.kind == "ok":
                assert out.returncode == 0, out.stderr
                name = os.path.basename(out.stdout.strip())
                assert name.startswith("loop")
                cleanup.insert(0, open_device(name, owned=True).detach)
            else:
                assert out.returncode == expect.code, out.stderr
                lines = out.stderr.splitlines()
                assert len(lines) == 1, f"not one line: {out.stderr!r}"
                assert lines[0].startswith("loopdev: ") and backing in lines[0]
        else:
            try:
                undo = _attach_any(api, backing, kwargs)
            except BaseException as exc:
                if expect.kind == "ok":
                    raise
                _check_error(exc, expect, backing)
            else:
                cleanup.insert(0, undo)
                assert expect.kind != "raise", f"{row} was accepted by {api}"
    finally:
        for undo in cleanup:
            undo()
        _native.force_fallback(os.environ.get("LOOPDEV_FORCE_FALLBACK") == "1")
    assert wait_unbound(tmp_path) == []
    if isinstance(backing, str) and backing.startswith("/dev/"):
        assert bound_exactly(backing) == []


# --- 8. resource limits -------------------------------------------------------------------


def loop_minors() -> set[int]:
    return {
        int(n[4:]) for n in os.listdir("/sys/block") if n.startswith("loop") and n[4:].isdigit()
    }


def remove_added(minors: set[int]) -> None:
    """LOOP_CTL_REMOVE minors a test caused to be created, where still unbound (the kernel
    refuses one that is bound or open: then it is someone else's by now)."""
    ctl = LoopControl()
    try:
        for minor in sorted(minors):
            if backing_of(minor) is None:
                with contextlib.suppress(OSError):
                    ctl.remove(minor)
    finally:
        ctl.close()


def _private_control(directory: Path) -> int:
    """A directory holding only a loop-control node; returns an O_PATH fd on it."""
    directory.mkdir()
    os.mknod(directory / "loop-control", stat.S_IFCHR | 0o600, os.makedev(10, 237))
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def test_exhausted_candidates_fail_within_bound(tmp_path: Path, devices: None) -> None:
    """No candidate device is usable: attach ends in a typed error within its bound
    (64 rounds, 30 s) instead of spinning. Two ways, run side by side:

    - no-nodes: LoopControl(dir_fd) on a private directory that has loop-control but no
      loop nodes: a node that never existed is not a race, so a DeviceNodeError (ENOENT)
      at once;
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


def test_held_control_lock_is_a_courtesy(tmp_path: Path, devices: None) -> None:
    """Another allocator holds the loop-control lock (a stopped or hung process): attach
    goes on without it after about a second, instead of waiting or failing. A private
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
    assert got.unlocked, "attach claims to have held a lock another process holds"
    assert 0.9 < elapsed < 1.5, f"attach took {elapsed:.2f} s with the control lock held"
    assert os.listdir(tmp_path / "private") == ["loop-control"], "private node left behind"
