"""Run a test body in a simulated container: a private mount namespace with a tmpfs ``/dev``.

Containers (docker, podman, Kubernetes) give a process a ``/dev`` that is a
tmpfs filled once at start: no devtmpfs, no udev. :func:`run` re-creates that
for one call of a test body, a real function in a test module:

- ``unshare -m --propagation private`` gives the child its own mount namespace
  whose mounts never propagate back to the host;
- the child mounts a tmpfs on ``/dev`` and fills it with character devices
  (``dev="bare"``), plus block nodes ``loopN`` for the loop devices that had a
  host node at "container start" (``dev="static"``), made with the dev_t that
  sysfs gives;
- ``loop_control=False`` leaves ``/dev/loop-control`` out;
  ``drop_mknod=True`` runs the body without CAP_MKNOD (``setpriv``);
- the child imports the body's module by name, calls it with JSON arguments
  and writes its return value, or its exception and traceback, as JSON; the
  parent re-raises a failure as :class:`ChildFailed` with the child's
  traceback.

Afterwards the parent checks, and cleans up so that one leak does not
cascade: no loop device bound to the given images (by device and inode, not
by path: a device bound from inside the namespace names the file by its path
*there*), no partition left registered on a device the body reported with
:func:`used`, and nothing new in the host's ``/dev`` that devtmpfs did not
make (a loop block node whose dev_t is not the one sysfs gives for its name).

Bodies use the helpers here (:func:`dev_listing`, :func:`assert_opens_as`,
:func:`bound_to`, ...): they work in the child and on the host alike.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import importlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

UNSHARE = shutil.which("unshare")
SETPRIV = shutil.which("setpriv")
LOSETUP = shutil.which("losetup")
PARTX = shutil.which("partx")

# What a container runtime puts in /dev: (major, minor, mode). loop-control's
# dev_t is read from /sys/class/misc at run time.
CHAR_DEVICES = {
    "null": (1, 3, 0o666),
    "zero": (1, 5, 0o666),
    "full": (1, 7, 0o666),
    "random": (1, 8, 0o666),
    "urandom": (1, 9, 0o666),
    "tty": (5, 0, 0o666),
}
SYMLINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
}
CAP_MKNOD = 27
MS_NOSUID = 0x2
MNT_DETACH = 0x2
LOOP_GET_STATUS64 = 0x4C05
LOOP_INFO64_SIZE = 232  # struct loop_info64; lo_device and lo_inode lead it
LOOP_NAME = re.compile(r"loop\d+")
LOOP_PART_NAME = re.compile(r"loop\d+p\d+")

_libc = ctypes.CDLL(None, use_errno=True)
_USED: list[str] = []  # loop device names the body reported (child side)


class ChildFailed(AssertionError):
    """The body failed in the child; the message carries the child's traceback."""

    def __init__(self, message: str, result: dict[str, Any]) -> None:
        super().__init__(message)
        self.result = result


class Leaked(AssertionError):
    """The body passed but left something behind (now cleaned up)."""


# --- helpers for bodies (child) and checks (parent) -----------------------------


def used(name: str) -> None:
    """Report that the body used loop device ``name`` (the parent checks its partitions)."""
    if name not in _USED:
        _USED.append(name)


def sysfs_devt(name: str) -> tuple[int, int]:
    """``(major, minor)`` of block device ``name`` from ``/sys/class/block/NAME/dev``."""
    with open(f"/sys/class/block/{name}/dev") as f:
        major, minor = f.read().split(":")
    return int(major), int(minor)


def assert_opens_as(path: str, name: str) -> None:
    """``path`` opens as block device ``name`` (its dev_t as sysfs gives it)."""
    want = os.makedev(*sysfs_devt(name))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    got = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
    assert stat.S_ISBLK(st.st_mode), f"{path} is not a block device (mode {st.st_mode:o})"
    assert st.st_rdev == want, f"{path} opens as {got}, sysfs says {name} is {sysfs_devt(name)}"


def dev_listing(path: str = "/dev") -> dict[str, list[Any]]:
    """Top-level entries of ``path``: name -> [kind, major, minor, mode] (or symlink target)."""
    found: dict[str, list[Any]] = {}
    for name in os.listdir(path):
        try:
            st = os.lstat(os.path.join(path, name))
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            found[name] = ["link", os.readlink(os.path.join(path, name))]
        elif stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode):
            kind = "blk" if stat.S_ISBLK(st.st_mode) else "chr"
            found[name] = [kind, os.major(st.st_rdev), os.minor(st.st_rdev), st.st_mode & 0o7777]
        else:
            found[name] = [stat.filemode(st.st_mode)[0], st.st_mode & 0o7777]
    return found


def loop_names() -> list[str]:
    """Whole loop devices in sysfs, by index."""
    names = [n for n in os.listdir("/sys/class/block") if LOOP_NAME.fullmatch(n)]
    return sorted(names, key=lambda n: int(n[4:]))


def partitions_of(name: str) -> list[str]:
    """Partitions sysfs lists for loop device ``name``."""
    try:
        return sorted(e for e in os.listdir(f"/sys/block/{name}") if e.startswith(f"{name}p"))
    except FileNotFoundError:
        return []


def backing_of(name: str) -> str | None:
    """Sysfs ``backing_file`` of ``name`` (a path in the binder's namespace); None if unbound."""
    try:
        with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
            raw = f.read().rstrip(b"\n")
    except OSError:
        return None
    return os.fsdecode(raw) or None


def _status_dev_ino(name: str) -> tuple[int, int] | None:
    """``(lo_device, lo_inode)`` by LOOP_GET_STATUS64, through a node that really is ``name``."""
    path = f"/dev/{name}"
    try:
        if os.stat(path).st_rdev != os.makedev(*sysfs_devt(name)):
            return None
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        buf = bytearray(LOOP_INFO64_SIZE)
        fcntl.ioctl(fd, LOOP_GET_STATUS64, buf)
    except OSError:
        return None  # unbound meanwhile (ENXIO)
    finally:
        os.close(fd)
    lo_device, lo_inode = struct.unpack_from("=QQ", buf)
    return lo_device, lo_inode


def bound_to(image: str) -> list[str]:
    """Loop devices bound to ``image``, matched by device and inode.

    The sysfs backing path is the path in the namespace of whoever bound it:
    compared by name, then resolved here, and where it does not resolve here
    (another namespace, unlinked) asked by LOOP_GET_STATUS64.
    """
    st = os.stat(image)
    want = (st.st_dev, st.st_ino)
    path = os.path.abspath(image)
    found = []
    for name in loop_names():
        backing = backing_of(name)
        if backing is None:
            continue
        if backing == path:
            found.append(name)
            continue
        try:
            other = os.stat(backing)
        except OSError:
            if _status_dev_ino(name) == want:
                found.append(name)
            continue
        if (other.st_dev, other.st_ino) == want:
            found.append(name)
    return found


def _clear_pending(name: str) -> bool:
    """Whether ``name``'s binding may still go by itself: its autoclear flag is set
    (LOOP_CLR_FD sets it where the device is open, since 3.7; the last close clears).
    A device bound without it stays bound until someone clears it: no use waiting."""
    try:
        with open(f"/sys/block/{name}/loop/autoclear") as f:
            return f.read().strip() != "0"
    except OSError:
        return True  # unbound or removed meanwhile: look again


def _clear_finished(name: str) -> bool:
    """Whether unbound ``name`` is past its clear: open() answers ENXIO while the clear
    runs (6.x), and the kernel drops partscan's partitions before it ends that state
    (``lo_state = Lo_unbound`` after ``bdev_disk_changed()`` in ``__loop_clr_fd``)."""
    try:
        fd = os.open(f"/dev/{name}", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def wait_unbound(image: str, timeout: float = 3.0) -> list[str]:
    """Devices still bound to ``image`` after up to ``timeout`` s (autoclear release is
    async); at once where none of them has a clear pending."""
    deadline = time.monotonic() + timeout
    while (left := bound_to(image)) and time.monotonic() < deadline:
        if not any(_clear_pending(n) for n in left):
            break
        time.sleep(0.01)
    return left


def stale_partitions(names: Sequence[str], timeout: float = 3.0) -> dict[str, list[str]]:
    """Partitions still registered on those of ``names`` that are unbound, after up to
    ``timeout`` s; at once where each of those devices is past its clear (BLKPG's
    partitions outlive LOOP_CLR_FD: nothing drops them later).

    A device another process bound meanwhile is theirs, with their partitions.
    """
    deadline = time.monotonic() + timeout
    while True:
        left = {n: parts for n in names if backing_of(n) is None and (parts := partitions_of(n))}
        if not left or time.monotonic() >= deadline:
            return left
        if all(_clear_finished(n) for n in left) and left == {
            n: parts for n in left if backing_of(n) is None and (parts := partitions_of(n))
        }:
            return left
        time.sleep(0.01)


def has_cap(cap: int) -> bool:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def mounts_at(target: str) -> list[tuple[str, str]]:
    """(mount id, fstype) of every mount on ``target`` in this namespace, in order."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if fields[4] == target:
                found.append((fields[0], fields[sep + 1]))
    return found


def remove_node(path: str) -> None:
    """Remove a node that may be a bind mount (compat ``Loop.mknod`` may bind the host's)."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"umount {path}: {os.strerror(err)}") from None
        os.unlink(path)


# --- the child --------------------------------------------------------------------


def _mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    if (
        _libc.mount(
            os.fsencode(source),
            os.fsencode(target),
            fstype.encode(),
            ctypes.c_ulong(flags),
            data.encode(),
        )
        != 0
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"mount -t {fstype} {source} {target}: {os.strerror(err)}")


def _check_private(host_ns: str) -> None:
    """Refuse to touch /dev unless this is a new namespace whose mounts do not propagate."""
    if os.readlink("/proc/self/ns/mnt") == host_ns:
        raise RuntimeError("nsrun: still in the host's mount namespace; not mounting on /dev")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            tags = fields[6 : fields.index("-")]
            if any(t.startswith("shared:") for t in tags):
                raise RuntimeError(f"nsrun: mount {fields[4]} still propagates ({tags})")


def _make_dev(flavour: str, loop_control: bool) -> None:
    """Mount and fill the container's /dev as the runtime would at start."""
    # "Container start": the host's loop nodes of this moment, as --privileged copies them.
    static = []
    if flavour == "static":
        static = [
            n for n in dev_listing() if LOOP_NAME.fullmatch(n) and os.path.exists(f"/sys/block/{n}")
        ]
    _mount("tmpfs", "/dev", "tmpfs", MS_NOSUID, "mode=755")
    old = os.umask(0)
    try:
        for name, (major, minor, mode) in CHAR_DEVICES.items():
            os.mknod(f"/dev/{name}", stat.S_IFCHR | mode, os.makedev(major, minor))
        if loop_control:
            with open("/sys/class/misc/loop-control/dev") as f:
                major, minor = (int(x) for x in f.read().split(":"))
            os.mknod("/dev/loop-control", stat.S_IFCHR | 0o600, os.makedev(major, minor))
        for name, target in SYMLINKS.items():
            os.symlink(target, f"/dev/{name}")
        for name in static:
            try:
                devt = sysfs_devt(name)
            except FileNotFoundError:
                continue  # removed since
            os.mknod(f"/dev/{name}", stat.S_IFBLK | 0o600, os.makedev(*devt))
    finally:
        os.umask(old)


def _child_main(spec: dict[str, Any]) -> None:
    out: dict[str, Any]
    try:
        if not spec.get("prepared"):
            _check_private(spec["host_ns"])
            _make_dev(spec["dev"], spec["loop_control"])
            if spec["drop_mknod"]:
                spec["prepared"] = True
                argv = [SETPRIV or "setpriv", "--inh-caps=-mknod", "--bounding-set=-mknod"]
                argv += [sys.executable, os.path.abspath(__file__), json.dumps(spec)]
                os.execv(argv[0], argv)
        if spec["drop_mknod"] and has_cap(CAP_MKNOD):
            raise RuntimeError("nsrun: CAP_MKNOD still effective after setpriv")
        func = getattr(importlib.import_module(spec["module"]), spec["func"])
        out = {"ok": True, "value": func(*spec["args"])}
        json.dumps(out)
    except BaseException as exc:
        out = {
            "ok": False,
            "type": type(exc).__name__,
            "module": type(exc).__module__,
            "errno": getattr(exc, "errno", None),
            "message": str(exc),
            "traceback": traceback.format_exc(),
        }
    out["used"] = _USED
    with open(spec["result"], "w") as f:
        json.dump(out, f)


# --- the parent -------------------------------------------------------------------


def _host_dev_state() -> tuple[dict[str, list[Any]], list[tuple[str, str]]]:
    return dev_listing(), mounts_at("/dev")


def _stray_loop_node(name: str, entry: list[Any] | None) -> bool:
    """A loop block node devtmpfs did not make: what a leaking body would leave.

    Other entries (another process's files, devices coming and going) are not ours.
    """
    if entry is None or entry[0] != "blk" or not name.startswith("loop"):
        return False
    try:
        return sysfs_devt(name) != (entry[1], entry[2])
    except OSError:
        return True


def _check_host_dev(before: tuple[dict[str, list[Any]], list[tuple[str, str]]]) -> list[str]:
    """What the child changed in the host's /dev (others' devices come and go meanwhile)."""
    problems = []
    listing, mounts = _host_dev_state()
    if mounts != before[1]:
        problems.append(f"mounts on the host's /dev changed: {before[1]} -> {mounts}")
    suspects = [n for n, e in listing.items() if n not in before[0] and _stray_loop_node(n, e)]
    if suspects:
        time.sleep(0.05)  # a device of another process removed between listing and sysfs
    for name in suspects:
        entry = dev_listing().get(name)
        if _stray_loop_node(name, entry):
            problems.append(f"host /dev/{name} appeared: {entry}")
            os.unlink(f"/dev/{name}")
    return problems


def _undo(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    return "" if out.returncode == 0 else f" ({' '.join(argv)}: {out.stderr.strip()})"


def _clean_up(images: Sequence[str], names: Sequence[str]) -> list[str]:
    """Leaks of the child: reported, and undone so they do not cascade."""
    problems = []
    for image in images:
        for name in wait_unbound(image):
            undo = _undo([LOSETUP, "-d", f"/dev/{name}"]) if LOSETUP else ""
            problems.append(f"{name} left bound to {image}{undo}")
        wait_unbound(image)
    for name, parts in stale_partitions(names).items():
        undo = _undo([PARTX, "-d", f"/dev/{name}"]) if PARTX else ""
        problems.append(f"{name} unbound with partitions left registered: {parts}{undo}")
    return problems


def _end_group(pgid: int, timeout: float = 5.0) -> None:
    """Kill what the child left running in its process group (a killed body's children)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.01)


def run(
    func: Callable[..., Any],
    *args: Any,
    dev: str = "bare",
    loop_control: bool = True,
    drop_mknod: bool = False,
    images: Sequence[str | os.PathLike[str]] = (),
    timeout: float = 60.0,
) -> Any:
    """Call ``func(*args)`` in a simulated container; return what it returned.

    ``func`` must be a module-level function of an importable test module and
    ``args`` and its return value JSON values. ``images`` are checked
    afterwards for devices still bound to them.
    """
    if dev not in ("bare", "static"):
        raise ValueError(f"dev must be 'bare' or 'static', not {dev!r}")
    if UNSHARE is None or (drop_mknod and SETPRIV is None):
        raise RuntimeError("nsrun needs unshare (and setpriv) from util-linux")
    fd, result = tempfile.mkstemp(prefix="nsrun-", suffix=".json")
    os.close(fd)
    spec = {
        "module": func.__module__,
        "func": func.__qualname__,
        "args": list(args),
        "dev": dev,
        "loop_control": loop_control,
        "drop_mknod": drop_mknod,
        "host_ns": os.readlink("/proc/self/ns/mnt"),
        "result": result,
    }
    argv = [UNSHARE, "-m", "--propagation", "private", sys.executable]
    argv += [os.path.abspath(__file__), json.dumps(spec)]
    env = _child_env()
    host_before = _host_dev_state()
    timed_out = False
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    finally:
        _end_group(proc.pid)
    try:
        with open(result) as f:
            out: dict[str, Any] = json.load(f) if os.fstat(f.fileno()).st_size else {}
    finally:
        os.unlink(result)
    problems = _clean_up([os.fspath(i) for i in images], out.get("used", []))
    problems += _check_host_dev(host_before)
    where = f"{func.__qualname__} in a {dev} /dev"
    tail = f"\n--- child stdout ---\n{stdout}\n--- child stderr ---\n{stderr}"
    leaks = "".join(f"\nalso left behind: {p}" for p in problems)
    if timed_out:
        raise ChildFailed(f"{where}: timed out after {timeout:g} s{leaks}{tail}", out)
    if not out:
        raise ChildFailed(f"{where}: no result (exit {proc.returncode}){leaks}{tail}", out)
    if not out["ok"]:
        raise ChildFailed(
            f"{where}: {out['type']}: {out['message']}{leaks}\n"
            f"--- child traceback ---\n{out['traceback']}{tail}",
            out,
        )
    if problems:
        raise Leaked(f"{where} left things behind (cleaned up):\n" + "\n".join(problems))
    return out["value"]


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))


def spawn(func: Callable[..., Any], *args: Any) -> subprocess.Popen[str]:
    """Start ``func(*args)`` in a plain child process (this namespace); stdout/stderr piped.

    For bodies that need a process to kill (a crash while holding a device).
    """
    spec = {"module": func.__module__, "func": func.__qualname__, "args": list(args)}
    argv = [sys.executable, os.path.abspath(__file__), "--plain", json.dumps(spec)]
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env()
    )


if __name__ == "__main__":
    # Run as the module ``nsrun`` (not ``__main__``) so that bodies share ``_USED``.
    import nsrun

    if sys.argv[1] == "--plain":
        plain = json.loads(sys.argv[2])
        getattr(importlib.import_module(plain["module"]), plain["func"])(*plain["args"])
    else:
        nsrun._child_main(json.loads(sys.argv[1]))
