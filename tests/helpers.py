"""What the tests share: the kernel's view of loop devices, child programs.

Images are made in ``images.py``.

Devices are seen through sysfs and raw ioctls, not through loopdev's own
listing code, so a bug there cannot hide a leak. Other processes on this
machine bind loop devices at the same time: nothing here assumes a minor or
that only our devices are bound.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

MiB = 1 << 20
LONG = os.environ.get("LOOPDEV_LONG") == "1"
RELEASE_TIMEOUT = 3.0  # how long the kernel may take to release after the last close

CHILDREN = Path(__file__).resolve().parent / "children"
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
UNSHARE = shutil.which("unshare", path=_TOOL_PATH)
MOUNT = shutil.which("mount", path=_TOOL_PATH)
SYS_BLOCK = "/sys/block"


# --- waiting --------------------------------------------------------------------------


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


# --- devices as sysfs shows them ----------------------------------------------------------


def loop_names() -> list[str]:
    """``loopN`` entries of /sys/block (bound or not)."""
    return [n for n in os.listdir(SYS_BLOCK) if n.startswith("loop") and n[4:].isdigit()]


def loop_minors() -> set[int]:
    return {int(n[4:]) for n in loop_names()}


def _read(name: str, attr: str) -> bytes | None:
    try:
        with open(f"{SYS_BLOCK}/{name}/{attr}", "rb") as f:
            return f.read().rstrip(b"\n")
    except OSError:  # unbound (no loop/backing_file) or removed meanwhile
        return None


def backing_bytes(name: str) -> bytes | None:
    """The backing path sysfs shows for ``name`` (raw: other processes' paths need not be
    UTF-8), with " (deleted)" where it was unlinked; None when unbound."""
    return _read(name, "loop/backing_file") or None


def backing_of(minor: int) -> str | None:
    raw = backing_bytes(f"loop{minor}")
    return None if raw is None else os.fsdecode(raw)


def bound_under(prefix: str | Path) -> list[str]:
    """Loop devices bound to ``prefix`` itself or to a file below that directory, sorted.

    The path compared is the one sysfs shows *in our mount namespace*: a device bound
    from another namespace shows that namespace's path (see :func:`leaked_devices`).
    """
    want = os.fsencode(str(prefix).rstrip("/") + "/")
    found = []
    for name in loop_names():
        backing = backing_bytes(name)
        if backing is not None and (backing.startswith(want) or backing + b"/" == want):
            found.append(name)
    return sorted(found, key=lambda n: int(n[4:]))


def wait_unbound(prefix: str | Path, timeout: float = RELEASE_TIMEOUT) -> list[str]:
    """Devices still bound below ``prefix`` after waiting up to ``timeout`` seconds.

    A device cleared while another process has it open (a prober, losetup, a
    parallel test run) is released when that process closes it.
    """
    poll(lambda: not bound_under(prefix), timeout)
    return bound_under(prefix)


def bound_exactly(path: str, timeout: float = RELEASE_TIMEOUT) -> list[str]:
    """Devices still backed by exactly ``path`` (e.g. another loop device) after waiting
    up to ``timeout``; ``bound_under`` would take /dev/loop1 for /dev/loop10."""
    want = os.fsencode(path)

    def names() -> list[str]:
        return [n for n in loop_names() if backing_bytes(n) == want]

    poll(lambda: not names(), timeout)
    return names()


def partitions_of(minor: int) -> list[str]:
    try:
        entries = os.listdir(f"{SYS_BLOCK}/loop{minor}")
    except FileNotFoundError:
        return []
    return sorted(e for e in entries if e.startswith(f"loop{minor}p"))


def wait_node(path: str, timeout: float = 5.0) -> None:
    def ready() -> bool:
        try:
            return stat.S_ISBLK(os.stat(path).st_mode)
        except FileNotFoundError:
            return False

    assert poll(ready, timeout), f"{path} did not appear"


def remove_added(minors: Iterable[int]) -> None:
    """LOOP_CTL_REMOVE minors a test caused to be created, where still unbound (the kernel
    refuses one that is bound or open: then it is someone else's by now)."""
    from loopdev import LoopControl

    ctl = LoopControl()
    try:
        for minor in sorted(minors):
            if backing_of(minor) is None:
                with contextlib.suppress(OSError):
                    ctl.remove(minor)
    finally:
        ctl.close()


def open_fds() -> set[str]:
    """This process's open fds, but loop-control and /dev, which attach() opens once
    and keeps for the process (loopdev._engine.shared_control)."""
    from loopdev import _engine

    return set(os.listdir("/proc/self/fd")) - {str(fd) for fd in _engine.shared_fds()}


# --- child programs -----------------------------------------------------------------------


def in_private_mount(
    mount: list[str], target: str | os.PathLike[str], argv: list[str]
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a private mount namespace after ``mount MOUNT... TARGET`` there
    (the mount goes with the namespace)."""
    script = f'{MOUNT} {" ".join(mount)} "$1" && shift && exec "$@"'
    return subprocess.run(
        [
            UNSHARE or "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            os.fspath(target),
            *argv,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m loopdev ARGS`` with this interpreter; never raises on its status."""
    return subprocess.run(
        [sys.executable, "-m", "loopdev", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run_example(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> None:
    """Run a documentation example; it must exit 0 (its output in the failure).

    Its own process group, output to a file: a background job the example
    started (the broker) neither holds a pipe open nor outlives the test.
    """
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            status = proc.wait(timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.seek(0)
        assert status == 0, f"exit {status}\n{log.read()}"


def child_argv(name: str, *args: str) -> list[str]:
    """The command line running ``tests/children/NAME.py`` with this interpreter."""
    return [sys.executable, str(CHILDREN / f"{name}.py"), *args]


def child(name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``tests/children/NAME.py`` (stdin/stdout/stderr piped, text)."""
    return subprocess.Popen(
        child_argv(name, *args),
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


# --- the per-test leak check --------------------------------------------------------------


class Binding(NamedTuple):
    """One attachment of a device: ``diskseq`` is new for every bind (5.15+)."""

    diskseq: bytes | None
    backing: bytes


def binding_of(name: str) -> Binding | None:
    """The attachment ``name`` has now; None when unbound."""
    backing = backing_bytes(name)
    return None if backing is None else Binding(_read(name, "diskseq"), backing)


def bindings() -> dict[str, Binding]:
    """Every bound loop device now, by name."""
    return {name: b for name in loop_names() if (b := binding_of(name)) is not None}


_registered: set[tuple[int, int]] = set()


def register_backing(target: str | os.PathLike[str] | os.stat_result | tuple[int, int]) -> None:
    """Count a file as the running test's for the leak check, by device and inode.

    For files outside ``tmp_path``, and for files only a child can see (bound from a
    private mount namespace): pass ``(st_dev, st_ino)`` as the child reported them.
    """
    if isinstance(target, tuple):
        _registered.add(target)
        return
    st = target if isinstance(target, os.stat_result) else os.stat(target)
    _registered.add((st.st_dev, st.st_ino))


def forget_registered() -> None:
    _registered.clear()


def _ids_below(root: Path) -> set[tuple[int, int]]:
    ids = set()
    for here, dirs, files in os.walk(root):
        for entry in (*dirs, *files):
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(here, entry))
                ids.add((st.st_dev, st.st_ino))
    return ids


class _Status(NamedTuple):
    ids: tuple[int, int]
    file_name: bytes


def _status(name: str, binding: Binding) -> _Status | None:
    """``lo_device``/``lo_inode``/``lo_file_name`` of ``binding``; None once it is gone.

    A brief read-only open (the kernel keeps those only in ``LOOP_GET_STATUS64``).
    """
    from loopdev._loopdev_ffi import ffi, lib

    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: in autoclear rundown, i.e. being released
        return None
    try:
        info = ffi.new("struct loop_info64 *")
        try:
            fcntl.ioctl(fd, lib.LOOP_GET_STATUS64, ffi.buffer(info))
        except OSError:  # ENXIO: unbound meanwhile
            return None
        if binding_of(name) != binding:
            return None  # released and bound again: another attachment
        file_name = bytes(ffi.buffer(info.lo_file_name)).split(b"\0", 1)[0]
        return _Status((int(info.lo_device), int(info.lo_inode)), file_name)
    finally:
        os.close(fd)


def _is_ours(
    name: str, binding: Binding, tmp_path: Path, walked: list[set[tuple[int, int]]]
) -> bool:
    prefix = os.fsencode(str(tmp_path)) + b"/"
    if binding.backing.startswith(prefix):
        return True
    status = _status(name, binding)
    if status is None:
        return False
    if not walked:
        walked.append(_ids_below(tmp_path))
    if status.ids in _registered or status.ids in walked[0]:
        return True
    # The kernel cuts lo_file_name to 63 bytes: a cut name must equal our prefix's start.
    recorded = status.file_name
    from loopdev._loopdev_ffi import lib

    cut = len(recorded) == lib.LO_NAME_SIZE - 1
    return recorded.startswith(prefix) or (cut and prefix.startswith(recorded))


def leaked_devices(
    before: dict[str, Binding], tmp_path: Path, timeout: float = RELEASE_TIMEOUT
) -> dict[str, Binding]:
    """Attachments made since ``before`` that are the test's and still bound after up to
    ``timeout`` seconds (the rule is in conftest's ``_no_leaked_devices``)."""
    walked: list[set[tuple[int, int]]] = []
    ours = {
        name: binding
        for name, binding in bindings().items()
        if before.get(name) != binding and _is_ours(name, binding, tmp_path, walked)
    }

    def left() -> dict[str, Binding]:
        now = bindings()
        return {n: b for n, b in ours.items() if now.get(n) == b}

    poll(lambda: not left(), timeout)
    return left()


def release(leaked: dict[str, Binding]) -> None:
    """LOOP_CLR_FD each of these attachments, only if the device still has it."""
    from loopdev._loopdev_ffi import lib

    for name, binding in leaked.items():
        try:
            fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            # Held open by us, the device cannot change attachment: check, then clear.
            if binding_of(name) == binding:
                with contextlib.suppress(OSError):
                    fcntl.ioctl(fd, lib.LOOP_CLR_FD, 0)
        finally:
            os.close(fd)
