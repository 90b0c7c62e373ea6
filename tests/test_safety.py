"""No silent data loss, files told apart by device and inode, losetup parity (issue 16).

Each test runs on real loop devices; the full file system is a small tmpfs mounted
below the test's ``tmp_path`` and unmounted afterwards.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import MOUNT, MiB, backing_of, bound_under, partitions_of, poll, run_cli, wait_unbound
from images import GPT_PARTS, gpt_image

import loopdev
from loopdev import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    DeviceNodeError,
    LoopControl,
    LoopError,
    UnexpectedDevice,
    WriteBackError,
)
from loopdev.device import attach, find

UMOUNT = "umount"


@pytest.fixture
def small_fs(tmp_path: Path, devices: None) -> Iterator[Path]:
    """A 4 MiB tmpfs below ``tmp_path``: a 64 MiB sparse image there cannot be filled."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(
        [MOUNT or "mount", "-t", "tmpfs", "-o", "size=4M", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        # A device left bound to a file here would keep the mount busy: the leak
        # check reports it; a lazy unmount still takes the mount away.
        subprocess.run([UMOUNT, "-l", str(where)], check=False)


def sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def fill_through(device: str, size: int = 16 * MiB) -> None:
    """Write ``size`` bytes through ``device`` (buffered: they reach the file at write-back)."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        block = b"\xa5" * MiB
        for _ in range(size // MiB):
            assert os.write(fd, block) == MiB
    finally:
        os.close(fd)


# --- item 1: a failed write-back is an error, never a normal return -----------------------


def test_detach_reports_write_back_failure(small_fs: Path) -> None:
    image = sparse(small_fs / "big.img", 64 * MiB)
    dev = attach(image, direct_io=False)
    name = dev.name
    fill_through(dev.path)
    with pytest.raises(WriteBackError) as info:
        dev.detach()
    exc = info.value
    assert exc.errno == errno.ENOSPC
    assert "ENOSPC" in str(exc)
    assert exc.device == dev.path and exc.backing == str(image)
    assert isinstance(exc, OSError)
    # Documented: the device is detached all the same.
    assert exc.released and "detached" in str(exc)
    assert dev.fd == -1
    assert poll(lambda: backing_of(int(name[4:])) != str(image), 3)


def test_cli_detach_reports_write_back_failure(small_fs: Path) -> None:
    image = sparse(small_fs / "big.img", 64 * MiB)
    done = run_cli("attach", "--show", str(image))
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    try:
        # The writer's close flushes and the kernel drops that error; the next fsync,
        # by whoever opens the device, still reports it.
        fill_through(path)
        done = run_cli("detach", path)
        assert done.returncode == 1
        assert "ENOSPC" in done.stderr and str(image) in done.stderr and path in done.stderr
        assert done.stderr.startswith("loopdev: ") and done.stderr.count("\n") == 1
        assert wait_unbound(small_fs) == []
    finally:
        if bound_under(small_fs):
            run_cli("detach", path)


def test_compat_flush_buf_reports_write_back_failure(small_fs: Path) -> None:
    image = sparse(small_fs / "big.img", 64 * MiB)
    ctl = LoopControl()
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        lo = ctl.loop_for_fd(fd, autoclear=True)
    finally:
        os.close(fd)
        ctl.close()
    try:
        fill_through(f"/dev/loop{lo.minor}")
        with pytest.raises(WriteBackError) as info:
            lo.flush_buf()
        assert info.value.errno == errno.ENOSPC
        assert not info.value.released and "still bound" in str(info.value)
        assert info.value.backing == str(image)
    finally:
        lo.close()
    assert wait_unbound(small_fs) == []


def test_detach_with_room_returns_normally(tmp_path: Path, devices: None) -> None:
    """The same writes with room for them: detach returns and the data is in the file."""
    image = sparse(tmp_path / "big.img", 64 * MiB)
    dev = attach(image, direct_io=False)
    fill_through(dev.path)
    dev.detach()
    with open(image, "rb") as f:
        assert f.read(MiB) == b"\xa5" * MiB


# --- item 2: backing files are told apart by the kernel's device and inode ----------------


def cli_ok(*args: str) -> str:
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_names_ending_in_newline_are_other_files(tmp_path: Path, devices: None) -> None:
    plain = sparse(tmp_path / "img", 4 * MiB)
    newline = sparse(tmp_path / "img\n", 4 * MiB)
    other = attach(newline, autoclear=False)
    try:
        assert find(plain) == []
        assert [i.name for i in find(newline)] == [other.name]
        assert cli_ok("find", str(plain)) == ""
        assert cli_ok("losetup", "-j", str(plain)) == ""  # the drop-in too
        # -L must not reuse the device of "img\n".
        shown = cli_ok("attach", "--show", "-L", str(plain)).strip()
        assert shown != other.path
        assert [i.path for i in find(plain)] == [shown]
        # detach-by-file detaches the device of "img" only.
        cli_ok("detach", str(plain))
        # (helpers.bound_under strips every newline: it would see "img\n" as "img".)
        assert poll(lambda: find(plain) == [], 3)
        assert [i.name for i in find(newline)] == [other.name]
        assert other.info().backing_file == str(newline)
    finally:
        other.detach()


def test_a_live_deleted_looking_name_is_not_the_deleted_file(tmp_path: Path, devices: None) -> None:
    gone = sparse(tmp_path / "x.img", 4 * MiB)
    dev = attach(gone, autoclear=False)
    try:
        os.unlink(gone)
        live = sparse(tmp_path / "x.img (deleted)", 4 * MiB)
        assert backing_of(dev.index) == str(live)  # what sysfs shows: the same text
        assert find(live) == []
        assert cli_ok("find", str(live)) == ""
        assert cli_ok("losetup", "-j", str(live)) == ""
        cli_ok("detach", str(live))
        assert backing_of(dev.index) == str(live)  # still bound: not that file
        shown = cli_ok("attach", "--show", "-L", str(live)).strip()
        assert shown != dev.path
        cli_ok("detach", shown)
    finally:
        dev.detach()


def test_find_sees_a_hard_link(tmp_path: Path, devices: None) -> None:
    """Same inode under another name: the same file."""
    first = sparse(tmp_path / "a.img", 4 * MiB)
    os.link(first, tmp_path / "b.img")
    with attach(first) as dev:
        assert [i.name for i in find(tmp_path / "b.img")] == [dev.name]
        assert cli_ok("find", str(tmp_path / "b.img")).strip() == dev.path


# --- item 3: a 0444 file as root attaches read-write, as with losetup ----------------------


def test_cli_attaches_a_0444_file_read_write_as_root(tmp_path: Path, devices: None) -> None:
    image = sparse(tmp_path / "ro.img", 4 * MiB)
    image.chmod(0o444)
    done = run_cli("attach", "--show", str(image))
    assert done.returncode == 0, done.stderr
    assert "write-protected" not in done.stderr
    path = done.stdout.strip()
    try:
        with open(f"/sys/block/{os.path.basename(path)}/ro") as f:
            assert f.read().strip() == "0"
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, b"written", 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        assert run_cli("detach", "--wait", path).returncode == 0
    with open(image, "rb") as f:
        f.seek(4096)
        assert f.read(7) == b"written"


# --- item 5: detach with a partition open is deferred to its last close, like losetup -d ---


def test_cli_detach_with_an_open_partition_exits_0(tmp_path: Path, devices: None) -> None:
    image = gpt_image(tmp_path / "gpt.img")
    done = run_cli("attach", "--show", "-P", str(image))
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    name = os.path.basename(path)
    minor = int(name[4:])
    assert partitions_of(minor) == [f"{name}p1", f"{name}p2"]
    holder = os.open(f"{path}p1", os.O_RDONLY | os.O_CLOEXEC)
    try:
        done = run_cli("detach", path)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        # Held: still bound, partitions still there, until the holder closes.
        assert backing_of(minor) == str(image)
    finally:
        os.close(holder)
    closed = time.monotonic()
    assert poll(lambda: backing_of(minor) is None and partitions_of(minor) == [], 2.0)
    assert time.monotonic() - closed < 2.0


def test_library_detach_still_refuses_an_open_partition(tmp_path: Path, devices: None) -> None:
    """detach() keeps its rule (nothing changed, DeviceBusy); lazy=True defers instead."""
    image = gpt_image(tmp_path / "gpt.img")
    dev = attach(image, partscan=True)
    holder = os.open(dev.partitions[0].path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(DeviceBusy):
            dev.detach()
        assert len(dev.partitions) == 2
        dev.detach(timeout=0, lazy=True)
        assert backing_of(dev.index) == str(image)
    finally:
        os.close(holder)
    assert poll(lambda: backing_of(dev.index) is None and partitions_of(dev.index) == [], 2.0)


# --- item 4: a read-only /dev without loop nodes (a container) ----------------------------


def body_read_only_dev(image: str, node_dir: str | None) -> dict[str, object]:
    """In the child: /dev read-only and without loopN; attach, write, detach."""
    import nsrun

    import loopdev

    subprocess.run(["mount", "-o", "remount,ro", "/dev"], check=True)
    dev = loopdev.attach(image, partscan=True, node_dir=node_dir)
    nsrun.used(dev.name)
    try:
        assert os.fstat(dev.fd).st_rdev == os.makedev(*nsrun.sysfs_devt(dev.name))
        payload = os.urandom(4096)
        if node_dir is None:
            parts = dev.partitions
            assert [p.number for p in parts] == [1, 2]
            assert os.pwrite(dev.fd, payload, parts[1].start) == 4096
            os.fsync(dev.fd)
        else:
            assert sorted(dev.nodes) == sorted([dev.name, f"{dev.name}p1", f"{dev.name}p2"])
            for name in dev.nodes:
                nsrun.assert_opens_as(f"{node_dir}/{name}", name)
            fd = os.open(f"{node_dir}/{dev.name}p2", os.O_WRONLY | os.O_CLOEXEC)
            try:
                assert os.pwrite(fd, payload, 0) == 4096
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        dev.detach()
    left = [n for n in os.listdir("/tmp") if n.startswith(f".loopdev-{os.getpid()}-")]
    nodes_left = os.listdir(node_dir) if node_dir else []
    return {"payload": payload.hex(), "left": left + nodes_left}


@pytest.mark.parametrize("with_node_dir", [False, True], ids=["no-node-dir", "node-dir"])
def test_read_only_dev_without_nodes_attaches(
    tmp_path: Path, devices: None, with_node_dir: bool
) -> None:
    import nsrun

    image = gpt_image(tmp_path / "gpt.img")
    node_dir = None
    if with_node_dir:
        node_dir = tmp_path / "nodes"
        node_dir.mkdir()
    out = nsrun.run(
        body_read_only_dev,
        str(image),
        None if node_dir is None else str(node_dir),
        images=[str(image)],
    )
    assert out["left"] == []
    start = GPT_PARTS[1][0]
    with open(image, "rb") as f:
        f.seek(start)
        assert f.read(4096).hex() == out["payload"]


# --- item 6: the smaller ones ----------------------------------------------------------------


def test_direct_io_before_the_file_as_in_losetup(image_plain: Path) -> None:
    done = run_cli("attach", "--show", "--direct-io", str(image_plain))
    assert done.returncode == 0, done.stderr
    path = done.stdout.strip()
    try:
        with open(f"/sys/block/{os.path.basename(path)}/loop/dio") as f:
            assert f.read().strip() == "1"
    finally:
        assert run_cli("detach", "--wait", path).returncode == 0


def test_unknown_option_gets_the_subcommands_usage(image_plain: Path) -> None:
    done = run_cli("attach", "--bogus", str(image_plain))
    assert done.returncode == 2
    assert "usage: loopdev attach" in done.stderr
    assert "unrecognized arguments: --bogus" in done.stderr
    assert find(image_plain) == []


def test_library_warnings_carry_the_prefix(tmp_path: Path, devices: None) -> None:
    """A table note the library logs (partitions past the end) reaches stderr as
    ``loopdev: ...``, like the command's own lines."""
    image = sparse(tmp_path / "mbr.img", 16 * MiB)
    table = "label: dos\nstart=2048, size=8192\nstart=12288, size=16384\n"
    subprocess.run(
        ["sfdisk", "-q", "--no-reread", "--no-tell-kernel", str(image)],
        input=table,
        text=True,
        check=True,
    )
    with open(image, "r+b") as f:
        f.truncate(8 * MiB)  # partition 2 (6-14 MiB) now runs past the end
    done = run_cli("attach", "--show", "-P", str(image))
    assert done.returncode == 0, done.stderr
    try:
        lines = done.stderr.splitlines()
        assert lines, "expected a warning"
        assert all(line.startswith("loopdev: ") for line in lines), done.stderr
    finally:
        run_cli("detach", "--wait", done.stdout.strip())


PACKAGE_DIR = os.path.dirname(loopdev.__file__)


def console_script(where: Path) -> Path:
    """The ``loopdev`` command as an installer writes it (``scripts/loopdev``, its
    ``#!python`` made this interpreter): the installed one, else the checkout's."""
    installed = Path(sys.executable).parent / "loopdev"
    source = installed if installed.exists() else Path(__file__).parents[1] / "scripts" / "loopdev"
    if not source.exists():
        pytest.skip("neither an installed loopdev command nor a checkout")
    body = source.read_text().split("\n", 1)[1]
    script = where / "loopdev"
    script.write_text(f"#!{sys.executable}\n{body}")
    script.chmod(0o755)
    return script


def hook_line(path: str, statement: str) -> int:
    """The line of ``path`` where ``statement`` (the excepthook's install) stands."""
    with open(path) as f:
        return next(n for n, line in enumerate(f, 1) if line.strip() == statement)


# Where each way in puts the command's Ctrl-C handling in place. A Ctrl-C
# before that line (a few instructions of our first module: Python runs a
# pending signal at calls, as in the `-m` check's `index()`) still gets
# Python's own traceback; after it, none may.
HOOKS = {
    os.path.join(PACKAGE_DIR, "__init__.py"): "sys.excepthook = _excepthook",
    str(Path(PACKAGE_DIR).parent / "_loopdev_main.py"): "sys.excepthook = excepthook",
}


def ours_in_traceback(stderr: str) -> list[str]:
    """Frames of loopdev's own files in ``stderr``'s traceback, except where the
    only one is the entry module before its hook is in place (see HOOKS)."""
    frames = re.findall(r'File "([^"]+)", line (\d+)', stderr)
    ours = [(f, int(n)) for f, n in frames if f.startswith(PACKAGE_DIR) or "_loopdev_main" in f]
    if len(ours) == 1 and frames[-1][0] == ours[0][0]:
        path, line = ours[0]
        if path in HOOKS and line < hook_line(path, HOOKS[path]):
            return []
    return [f"{f}:{n}" for f, n in ours]


@pytest.mark.parametrize("how", ["console-script", "python-m"])
def test_ctrl_c_early_in_a_run_is_quiet(image_plain: Path, tmp_path: Path, how: str) -> None:
    """SIGINT at 16 points of a run (spread over the time one run takes, so under
    coverage too most land inside ``import loopdev`` or the run): the command dies
    of SIGINT as losetup does, without a traceback, nothing bound. Python's own start
    (``site``) comes before any code of loopdev and may still print one: such a
    traceback must hold no loopdev frame."""
    if how == "console-script":
        argv = [str(console_script(tmp_path))]
    else:
        argv = [sys.executable, "-m", "loopdev"]
    argv += ["run", str(image_plain), "--", "true"]
    start = time.monotonic()
    subprocess.run(argv, check=True, capture_output=True)
    whole = time.monotonic() - start
    killed_quietly = 0
    for step in range(16):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(whole * step / 16)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        if err:
            # Python's own start, before loopdev's hook: its forms vary by version
            # and moment (a traceback, a bare "KeyboardInterrupt"; exit status 1 or
            # SIGINT), or its initialisation failing ("Fatal Python error:
            # init_import_site", "init_sys_streams", on 3.10 even with a TypeError
            # from its own handler), before any module of ours could run; and never
            # a frame of loopdev.
            python_start = err.startswith("Fatal Python error: init_")
            assert python_start or "KeyboardInterrupt" in err, (step, proc.returncode, err)
            assert not ours_in_traceback(err), (step, err)
        else:
            assert proc.returncode in (0, -signal.SIGINT), (step, proc.returncode, err)
            killed_quietly += proc.returncode == -signal.SIGINT
        assert find(image_plain) == [], step
    # Not a timing figure: only that the signal met a running loopdev at least once.
    assert killed_quietly >= 1


def test_another_programs_ctrl_c_is_its_own(tmp_path: Path) -> None:
    """``python -m app`` whose package imports loopdev keeps Python's excepthook:
    only loopdev's own command dies of SIGINT silently."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("import loopdev\n")
    (app / "__main__.py").write_text("import sys\nprint(sys.excepthook is sys.__excepthook__)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    done = subprocess.run(
        [sys.executable, "-m", "app"], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout == "True\n"


@pytest.fixture
def image_plain(tmp_path: Path, devices: None) -> Path:
    return sparse(tmp_path / "plain.img", 4 * MiB)


@pytest.mark.parametrize(
    ("kwargs", "exc", "code", "text"),
    [
        ({"block_size": "4096"}, ConfigureError, errno.EINVAL, "must be an int"),
        ({"offset": 1.5}, ConfigureError, errno.EINVAL, "must be an int"),
        ({"offset": "1MiB"}, ConfigureError, errno.EINVAL, "must be an int"),
        ({"sizelimit": "4096"}, ConfigureError, errno.EINVAL, "must be an int"),
        ({"node_dir": "FILE"}, DeviceNodeError, errno.ENOTDIR, "not a directory"),
    ],
    ids=["block-size-str", "offset-float", "offset-str", "sizelimit-str", "node-dir-file"],
)
def test_wrong_types_say_what_is_wrong(
    image_plain: Path, kwargs: dict[str, object], exc: type[LoopError], code: int, text: str
) -> None:
    if kwargs.get("node_dir") == "FILE":
        kwargs = {"node_dir": str(image_plain)}
    with pytest.raises(exc) as info:
        attach(image_plain, **kwargs)  # type: ignore[arg-type]
    assert info.value.errno == code and text in str(info.value)
    assert find(image_plain) == []


def test_bools_are_not_numbers(image_plain: Path) -> None:
    with pytest.raises(BackingFileError) as info:
        attach(True)  # type: ignore[arg-type]
    assert info.value.errno == errno.EINVAL and "True" in str(info.value)
    with pytest.raises(LoopError) as opened:
        loopdev.open(True)
    assert "loopTrue" not in str(opened.value) and "True" in str(opened.value)


def test_open_honours_the_directory(tmp_path: Path, image_plain: Path) -> None:
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    with attach(image_plain, node_dir=nodes) as dev:
        other = dev.index + 1
        opened = loopdev.open(str(nodes / dev.name))
        try:
            assert opened.path == str(nodes / dev.name) and opened.index == dev.index
            assert os.fstat(opened.fd).st_rdev == os.fstat(dev.fd).st_rdev
        finally:
            opened.close()
        os.link(nodes / dev.name, nodes / f"loop{other}")  # wrong numbers for its name
        try:
            with pytest.raises(UnexpectedDevice):
                loopdev.open(str(nodes / f"loop{other}"))
        finally:
            os.unlink(nodes / f"loop{other}")
        with pytest.raises(DeviceNodeError) as missing:
            loopdev.open(str(tmp_path / "nowhere" / "loop0"))
        assert missing.value.errno == errno.ENOENT


# --- item 7: from a read of the shim ------------------------------------------------------

FAULTS_C = Path(__file__).resolve().parent / "faultinject" / "faults.c"


@pytest.fixture(scope="module")
def faults_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/faultinject/faults.c built (the LD_PRELOAD fault library of test_faults)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the fault-injection library")
    out = tmp_path_factory.mktemp("faults") / "faults.so"
    subprocess.run(
        [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(FAULTS_C), "-ldl"],
        check=True,
        capture_output=True,
    )
    return out


def under_faults(so: Path, rules: str, code: str, *args: str) -> str:
    env = dict(os.environ, LD_PRELOAD=str(so), LOOPDEV_FAULTS=rules)
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_compat_set_block_size_retries_eagain(faults_so: Path, image_plain: Path) -> None:
    from loopdev import _native

    code = """
import os, sys
from loopdev import LoopControl, _native
ctl = LoopControl()
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
lo = ctl.loop_for_fd(fd, autoclear=True)
os.close(fd)
ctl.close()
try:
    lo.set_block_size(4096)
    print(_native.logical_block_size(lo.fd))
finally:
    lo.close()
"""
    rules = f"ioctl:{_native.LOOP_SET_BLOCK_SIZE:#x}:EAGAIN:3"
    assert under_faults(faults_so, rules, code, str(image_plain)).strip() == "4096"
    assert wait_unbound(image_plain.parent) == []


def test_device_removed_at_the_sysfs_open_is_unbound(faults_so: Path) -> None:
    """ENODEV at the open of /sys/block/loopN (removed meanwhile): not bound, no error."""
    code = """
import loopdev
print(len(loopdev.devices()))
"""
    assert under_faults(faults_so, "open:loop[0-9]*:ENODEV:1", code).strip().isdigit()


def test_setup_hook_after_a_backoff_nap_can_be_interrupted(
    faults_so: Path, image_plain: Path
) -> None:
    """LOOP_CONFIGURE answers EBUSY three times, so the loop naps before its fourth
    attempt (signals blocked while it does; the first three retry at once) and opens
    a device again: the setup hook then runs with the caller's signal
    mask, so Ctrl-C ends the hook itself, not only the whole attach afterwards."""
    from loopdev import _native

    code = """
import json, os, signal, sys, time
from loopdev import LoopControl
calls = []
def setup(lo):
    calls.append("start")
    if len(calls) == 4:  # the attempt after the first nap
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        calls.append("finished")
ctl = LoopControl()
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
try:
    lo = ctl.loop_for_fd(fd, autoclear=True, setup=setup)
    lo.close()
    outcome = "attached"
except KeyboardInterrupt:
    outcome = "interrupted"
print(json.dumps({"outcome": outcome, "calls": calls}))
"""
    rules = f"ioctl:{_native.LOOP_CONFIGURE:#x}:EBUSY:3;ioctl:{_native.LOOP_SET_FD:#x}:EBUSY:3"
    import json

    got = json.loads(under_faults(faults_so, rules, code, str(image_plain)).splitlines()[-1])
    assert got["outcome"] == "interrupted"
    assert got["calls"] == ["start"] * 4, got  # the fourth hook did not finish
    assert wait_unbound(image_plain.parent) == []


# --- item 6: nodes in a container's /dev ------------------------------------------------------

HOLDER = """
import sys, time
import loopdev
dev = loopdev.attach(sys.argv[1], partscan=True)
print(dev.name, " ".join(p.name for p in dev.partitions), flush=True)
time.sleep(120)
"""


def body_killed_holders_nodes_go(gpt: str, plain: str) -> dict[str, object]:
    """A process that attached with partitions is SIGKILLed: its nodes stay in /dev
    (nobody is left to remove them) until the next attach removes those whose numbers
    sysfs no longer gives their names."""
    import nsrun

    import loopdev

    proc = subprocess.Popen([sys.executable, "-c", HOLDER, gpt], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    name, parts = proc.stdout.readline().split(" ", 1)
    nsrun.used(name)
    parts_list = parts.split()
    assert all(os.path.exists(f"/dev/{p}") for p in parts_list)
    proc.kill()
    proc.wait()
    assert nsrun.wait_unbound(gpt) == []
    assert all(os.path.exists(f"/dev/{p}") for p in parts_list)  # stale: nobody removed them
    dev = loopdev.attach(plain)
    nsrun.used(dev.name)
    try:
        left = [p for p in parts_list if os.path.exists(f"/dev/{p}")]
    finally:
        dev.detach()
    return {"left": left}


def test_nodes_of_a_killed_process_go_at_the_next_attach(tmp_path: Path, devices: None) -> None:
    import nsrun

    gpt = gpt_image(tmp_path / "gpt.img")
    plain = sparse(tmp_path / "plain.img", 4 * MiB)
    out = nsrun.run(body_killed_holders_nodes_go, str(gpt), str(plain), images=[gpt, plain])
    assert out["left"] == []


def body_premade_wrong_node_stays(image: str) -> dict[str, object]:
    """Every /dev/loopK the container has points at another loop device: attach
    replaces the one it uses, and after detach a right node is left in its place."""
    import nsrun

    import loopdev

    names = sorted(nsrun.loop_names(), key=lambda n: int(n[4:]))
    for name, other in zip(names, names[1:] + names[:1], strict=True):
        os.mknod(f"/dev/{name}", stat.S_IFBLK | 0o600, os.makedev(*nsrun.sysfs_devt(other)))
    dev = loopdev.attach(image)
    nsrun.used(dev.name)
    try:
        assert dev.name in names, f"{dev.name} had no premade node: inconclusive"
        nsrun.assert_opens_as(dev.path, dev.name)
    finally:
        dev.detach()
    st = os.stat(dev.path)
    return {
        "blk": stat.S_ISBLK(st.st_mode),
        "right": os.makedev(*nsrun.sysfs_devt(dev.name)) == st.st_rdev,
    }


def test_a_premade_wrong_node_is_not_lost(tmp_path: Path, devices: None) -> None:
    import nsrun

    image = sparse(tmp_path / "plain.img", 4 * MiB)
    out = nsrun.run(body_premade_wrong_node_stays, str(image), images=[image])
    assert out == {"blk": True, "right": True}
