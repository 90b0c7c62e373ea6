"""Bad input: one matrix over ``attach()``, compat ``loop_for_fd`` (both configure
paths) and the CLI. Each input gives a typed ``loopdev.errors`` error (an ``OSError``
with errno and path) and leaves nothing bound; the CLI exits 1 with one line.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from helpers import (
    MOUNT,
    UNSHARE,
    MiB,
    bound_exactly,
    child_argv,
    in_private_mount,
    register_backing,
    wait_unbound,
)
from images import make_image

from loopdev import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    Loop,
    LoopControl,
    LoopError,
    _native,
)
from loopdev.device import attach, open_device


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
    register_backing(path)  # outside tmp_path: the leak check would not know it
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
    # Root opens a 0444 file read-write anyway, so only attach() can refuse; the CLI
    # attaches it read-write as losetup does (issue 16); with an O_RDONLY fd the
    # kernel binds read-only, which is the classic loop_for_fd behaviour.
    "rw-on-readonly-file": Row(
        lambda t, i: _readonly(t),
        {},
        {"attach": raises(BackingFileError, errno.EACCES), "cli": OK},
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


def _ramfs_case(tmp_path: Path, api: str, expect: Expect) -> None:
    if UNSHARE is None or MOUNT is None:
        pytest.skip("unshare/mount (util-linux) not installed")
    mnt = tmp_path / "ramfs"
    mnt.mkdir()
    path = str(mnt / "x.img")
    cli = [sys.executable, "-m", "loopdev", "attach", "--show", "--direct-io=on"]
    out = in_private_mount(
        ["-t", "ramfs", "ramfs"], mnt, child_argv("ramfs_attach", path, api, *cli)
    )
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip(f"no private ramfs mount here: {out.stderr.strip()}")
    result = json.loads(out.stdout)
    # Only the child saw the file; a device left bound to it shows "/x.img" in sysfs.
    register_backing((result["backing"][0], result["backing"][1]))
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
