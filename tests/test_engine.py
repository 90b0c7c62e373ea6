"""The shared engine: behaviours both faces get from it, on real devices.

- fork() while another thread runs a first attach: the child attaches (no
  import happens on the attach path);
- compat ``set_status`` that moves the offset moves the partitions with it;
- compat records the backing path in ``lo_file_name``;
- ``loopdev.open()`` does not leak its fd into a later ``detach()``;
- typed errors for input that alone decides the outcome;
- the binding's failures name their stage; ``errors`` words them;
- no Python callback from C on the default path: the hook trampolines run
  only for compat's ``setup``.
"""

from __future__ import annotations

import errno
import gc
import os
import pickle
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import pytest
from helpers import bound_under
from images import MiB, gpt_image, make_image, sfdisk_4k

import loopdev
from loopdev import _native, errors
from loopdev.errors import BackingFileError, DeviceNodeError, LoopError, PartitionTableError


def test_no_python_callback_from_c_on_the_default_path(tmp_path: Path, devices: None) -> None:
    """Either face walks straight down to the ioctl: the C attach loop calls back
    into Python (``_native.ld_py_on_open``) only where a caller passes a hook
    (compat ``loop_for_fd(setup=...)``), seen by a profiler of this thread."""
    from loopdev import LoopControl

    image = make_image(tmp_path / "walk.img")
    called: list[str] = []

    def profile(frame: types.FrameType, event: str, arg: object) -> None:
        if event == "call" and frame.f_code.co_name.startswith("ld_py_"):
            called.append(frame.f_code.co_name)

    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = LoopControl()
    try:
        sys.setprofile(profile)
        try:
            loopdev.attach(fd, direct_io=False).detach(timeout=0)
            loopdev.attach(fd, partscan=True).detach(timeout=0)
            lo = ctl.loop_for_fd(fd, autoclear=True)
            lo.clear_fd()
            lo.close()
            plain = list(called)
            lo = ctl.loop_for_fd(fd, autoclear=True, setup=lambda lo: None)
            lo.clear_fd()
            lo.close()
        finally:
            sys.setprofile(None)
    finally:
        ctl.close()
        os.close(fd)
    assert plain == []
    assert called == ["ld_py_on_open"]  # the profiler does see a callback from C


def test_fork_during_first_attach(tmp_path: Path, devices: None) -> None:
    """A fresh interpreter: one thread attaches for the first time while the main thread
    forks; the child attaches too (it would hang on an import lock held by the thread)."""
    image = make_image(tmp_path / "fork.img")
    child = textwrap.dedent(
        f"""
        import os, sys, threading
        import loopdev

        def attacher():
            for _ in range(20):
                with loopdev.attach({str(image)!r}, partscan=True):
                    pass

        t = threading.Thread(target=attacher)
        t.start()
        pids = []
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                with loopdev.attach({str(image)!r}, partscan=True):
                    pass
                os._exit(0)
            pids.append(pid)
        t.join()
        for pid in pids:
            assert os.waitpid(pid, 0)[1] == 0
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "ok"


def test_compat_set_status_moves_partitions(tmp_path: Path, devices: None) -> None:
    """Partitions loopdev registered follow a new offset, as a rescan would."""
    # The table 1 MiB into a bigger file (and not at its end, where the backup
    # header would be found): attached at offset 0 there is none.
    inner = gpt_image(tmp_path / "inner.img", 16 * MiB, ((1 * MiB, 2 * MiB), (4 * MiB, 2 * MiB)))
    outer = tmp_path / "outer.img"
    with open(outer, "wb") as f:
        f.truncate(MiB)
        f.seek(MiB)
        f.write(inner.read_bytes())
        f.truncate(MiB + inner.stat().st_size + MiB)
    fd = os.open(outer, os.O_RDWR | os.O_CLOEXEC)
    ctl = loopdev.LoopControl()
    lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
    try:
        assert loopdev.open(lo.minor).partitions == []
        lo.set_status(offset=MiB)
        parts = [(p.number, p.start) for p in loopdev.open(lo.minor).partitions]
        assert parts == [(1, 2048 * 512), (2, 8192 * 512)]
    finally:
        lo.clear_fd()
        lo.close()
        ctl.close()
        os.close(fd)


def test_compat_set_status_refused_table_changes_nothing(tmp_path: Path, devices: None) -> None:
    """A span that cuts a valid GPT short (a table the kernel would refuse there):
    PartitionTableError, and the device keeps its span and its partitions."""
    image = gpt_image(tmp_path / "g.img", 16 * MiB, ((1 * MiB, 2 * MiB), (4 * MiB, 8 * MiB)))
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = loopdev.LoopControl()
    lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
    try:
        before = [(p.number, p.start, p.size) for p in loopdev.open(lo.minor).partitions]
        assert len(before) == 2
        with pytest.raises(PartitionTableError):
            lo.set_status(sizelimit=6 * MiB)
        assert lo.get_status().lo_sizelimit == 0
        after = [(p.number, p.start, p.size) for p in loopdev.open(lo.minor).partitions]
        assert after == before
    finally:
        lo.clear_fd()
        lo.close()
        ctl.close()
        os.close(fd)


def test_compat_set_status_with_a_partition_open_changes_nothing(
    tmp_path: Path, devices: None
) -> None:
    """BLKPG deletes no partition while one is open: EBUSY before the status changes."""
    image = gpt_image(tmp_path / "g.img", 16 * MiB, ((1 * MiB, 2 * MiB), (4 * MiB, 2 * MiB)))
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = loopdev.LoopControl()
    lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
    try:
        parts = loopdev.open(lo.minor).partitions
        held = os.open(parts[0].path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with pytest.raises(OSError) as raised:
                lo.set_status(sizelimit=12 * MiB)
            assert raised.value.errno == errno.EBUSY
            assert lo.get_status().lo_sizelimit == 0
            assert loopdev.open(lo.minor).partitions == parts
        finally:
            os.close(held)
    finally:
        lo.clear_fd()
        lo.close()
        ctl.close()
        os.close(fd)


def test_compat_records_backing_path(tmp_path: Path, devices: None) -> None:
    """lo_file_name holds the backing path (cut at 63 bytes as the kernel cuts it)."""
    image = make_image(tmp_path / ("x" * 80 + ".img"))
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = loopdev.LoopControl()
    try:
        for force in (False, True):
            _native.force_fallback(force)
            lo = ctl.loop_for_fd(fd, autoclear=True)
            name = lo.get_status().file_name
            lo.close()
            assert name == str(image)[: _native.LO_NAME_SIZE - 1]
    finally:
        _native.force_fallback(os.environ.get("LOOPDEV_FORCE_FALLBACK") == "1")
        ctl.close()
        os.close(fd)


def test_open_does_not_block_detach(tmp_path: Path, devices: None) -> None:
    """An fd of loopdev.open() left to the garbage collector does not hold the device."""
    image = make_image(tmp_path / "open.img")
    dev = loopdev.attach(image)
    loopdev.open(dev.index).info()
    gc.collect()
    start = time.monotonic()
    dev.detach(timeout=5)
    assert time.monotonic() - start < 1


def test_zero_byte_file_attaches(tmp_path: Path, devices: None) -> None:
    """As with losetup: a 0-byte file attaches (the CLI warns)."""
    image = make_image(tmp_path / "zero.img", 0)
    with loopdev.attach(image) as dev:
        assert dev.info().size == 0


@pytest.mark.parametrize(
    ("call", "cls", "code"),
    [
        (lambda p: loopdev.find(p / "missing"), BackingFileError, errno.ENOENT),
        (lambda p: loopdev.open(99999), DeviceNodeError, errno.ENOENT),
        (lambda p: loopdev.open(-1), LoopError, errno.EINVAL),
        (lambda p: loopdev.attach(p / "zero.img", node_dir=p / "nope"), DeviceNodeError, 2),
    ],
    ids=["find-missing", "open-9999", "open-negative", "missing-node-dir"],
)
def test_typed_errors(tmp_path: Path, devices: None, call: object, cls: type, code: int) -> None:
    make_image(tmp_path / "zero.img", MiB)
    with pytest.raises(cls) as exc:
        call(tmp_path)  # type: ignore[operator]
    assert exc.value.errno == code
    assert bound_under(str(tmp_path)) == []


def test_stage_errors_carry_the_stage_and_the_advice() -> None:
    """The binding raises what errors builds from (errno, stage, device): the class and
    the words come from the stage, and the stage survives pickling (the broker)."""
    exc = errors.stage_failed(errno.EPERM, "open", device="/dev/loop7")
    assert isinstance(exc, DeviceNodeError)
    assert (exc.errno, exc.stage, exc.device) == (errno.EPERM, "open", "/dev/loop7")
    assert "--device-cgroup-rule" in str(exc)
    back = pickle.loads(pickle.dumps(exc))
    assert (type(back), back.stage, str(back)) == (type(exc), exc.stage, str(exc))
    busy = errors.retries_exhausted(errno.EBUSY, "lock", device=None, backing="/x.img")
    assert (type(busy), busy.stage) == (errors.DeviceBusy, "lock")
    assert str(busy).startswith("every free device was locked")


def test_o_path_fd_is_refused_before_any_device(tmp_path: Path, devices: None) -> None:
    image = make_image(tmp_path / "opath.img")
    fd = os.open(image, os.O_PATH | os.O_CLOEXEC)
    try:
        with pytest.raises(BackingFileError, match="O_PATH"):
            loopdev.attach(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("api", ["attach", "compat"])
def test_4k_gpt_gets_its_sector_size(tmp_path: Path, devices: None, api: str) -> None:
    """partscan without a block size: the device gets the sector size the GPT was written
    for (systemd does the same); the partitions are the table's."""
    image = tmp_path / "4k.img"
    sfdisk_4k(image, "label: gpt\nstart=256, size=1024\nstart=1280, size=1024\n", 16 * MiB)
    if api == "attach":
        with loopdev.attach(image, partscan=True) as dev:
            assert dev.info().block_size == 4096
            got = [(p.number, p.start, p.size) for p in dev.partitions]
    else:
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        ctl = loopdev.LoopControl()
        lo = ctl.loop_for_fd(fd, autoclear=True, partscan=True)
        try:
            assert _native.logical_block_size(lo.fd) == 4096
            got = [(p.number, p.start, p.size) for p in loopdev.open(lo.minor).partitions]
        finally:
            lo.clear_fd()
            lo.close()
            ctl.close()
            os.close(fd)
    assert got == [(1, 256 * 4096, 1024 * 4096), (2, 1280 * 4096, 1024 * 4096)]
    # An explicit block size wins; where the table does not fit it, the error says why.
    with pytest.raises(loopdev.PartitionTableError, match="block_size=4096"):
        loopdev.attach(image, partscan=True, block_size=512)
    assert bound_under(str(tmp_path)) == []
