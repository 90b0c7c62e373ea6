"""The high-level API on real devices: attach(), LoopDevice, devices(), find(), open()."""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import bound_under, wait_unbound

import loopdev
from loopdev import BackingFileError, ConfigureError, LoopError


def losetup_entry(path: str) -> dict[str, Any]:
    out = subprocess.run(["losetup", "-J", "-l", path], capture_output=True, text=True, check=True)
    entry: dict[str, Any] = json.loads(out.stdout)["loopdevices"][0]
    return entry


def test_attach_matches_losetup(image: Path) -> None:
    with loopdev.attach(
        image, offset=1048576, sizelimit=4194304, read_only=True, block_size=4096
    ) as dev:
        entry = losetup_entry(dev.path)
        assert int(entry["offset"]) == 1048576
        assert int(entry["sizelimit"]) == 4194304
        assert entry["ro"] in (True, 1, "1")
        assert int(entry["log-sec"]) == 4096
        assert entry["back-file"] == str(image)
        info = dev.info()
        assert (info.offset, info.sizelimit, info.read_only, info.block_size) == (
            1048576,
            4194304,
            True,
            4096,
        )
        assert info.autoclear and info.size == 4194304
        assert info.backing_file == str(image)
        assert dev.diskseq and dev.diskseq > 0
    assert bound_under(str(image)) == []
    assert dev.fd == -1


def test_long_backing_path_in_full(tmp_path: Path, devices: None) -> None:
    deep = tmp_path / ("d" * 40) / ("e" * 40)
    deep.mkdir(parents=True)
    path = deep / "image-with-a-long-name.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    assert len(str(path)) > 64
    with loopdev.attach(path) as dev:
        assert dev.info().backing_file == str(path)
        assert [d.backing_file for d in loopdev.devices() if d.name == dev.name] == [str(path)]


def test_attach_fd_and_find(image: Path, image_fd: int) -> None:
    with loopdev.attach(image_fd, offset=4096) as dev:
        found = loopdev.find(image)
        assert [d.name for d in found] == [dev.name]
        assert loopdev.find(image, offset=4096)[0].name == dev.name
        assert loopdev.find(image, offset=0) == []
    assert loopdev.find(image) == []


def test_open_does_not_detach(image: Path) -> None:
    with loopdev.attach(image) as dev:
        with loopdev.open(dev.name) as other:
            assert other.info().backing_file == str(image)
        assert dev.info().backing_file == str(image)
        with loopdev.open(dev.index) as again:
            assert again.index == dev.index


def test_device_info_is_one_frozen_record(image: Path) -> None:
    """``DeviceInfo`` is built once from what the C shim read (no intermediate
    object), and is a record like the package's others: frozen, equal and hashed
    by value, picklable, constructed by keyword as before."""
    with loopdev.attach(image, offset=4096, read_only=True) as dev:
        info = dev.info()
        fields = {field: getattr(info, field) for field in info.__match_args__}
        assert fields == {
            "name": dev.name,
            "index": dev.index,
            "backing_file": str(image),
            "offset": 4096,
            "sizelimit": 0,
            "read_only": True,
            "autoclear": True,
            "partscan": False,
            "direct_io": info.direct_io,
            "block_size": 512,
            "size": os.path.getsize(image) - 4096,
        }
        assert [type(v) for v in fields.values()] == [str, int, str, int, int] + [bool] * 4 + [
            int,
            int,
        ]
        again = loopdev.DeviceInfo(**fields)
        assert again == info and hash(again) == hash(info) and repr(again) == repr(info)
        assert pickle.loads(pickle.dumps(info)) == info and copy.copy(info) == info
        assert info.path == dev.path and info in loopdev.devices()
        with pytest.raises(AttributeError):
            info.offset = 0  # type: ignore[misc]
        with pytest.raises(AttributeError):
            info.other = 0  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            loopdev.DeviceInfo(*fields.values())  # type: ignore[call-arg]


def test_minor_is_a_deprecated_alias_of_index(image: Path) -> None:
    """``.index`` is the N of loopN; ``.minor`` still answers it, with a DeprecationWarning."""
    with loopdev.attach(image) as dev:
        info = dev.info()
        assert dev.name == f"loop{dev.index}" and info.index == dev.index
        with pytest.warns(DeprecationWarning, match=r"LoopDevice\.minor .* LoopDevice\.index"):
            assert dev.minor == dev.index
        with pytest.warns(DeprecationWarning, match=r"DeviceInfo\.minor .* DeviceInfo\.index"):
            assert info.minor == info.index


def test_detach_waits_for_other_holder(image: Path) -> None:
    dev = loopdev.attach(image)
    holder = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
    closed_at: list[float] = []

    def close_later() -> None:
        time.sleep(0.3)
        closed_at.append(time.monotonic())
        os.close(holder)

    t = threading.Thread(target=close_later)
    t.start()
    dev.detach(timeout=10)
    done = time.monotonic()
    t.join()
    assert done >= closed_at[0]
    assert done - closed_at[0] < 0.5
    assert bound_under(str(image)) == []


def test_detach_times_out_while_held(image: Path) -> None:
    dev = loopdev.attach(image)
    holder = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(loopdev.DeviceBusy):
            dev.detach(timeout=0.2)
    finally:
        os.close(holder)  # autoclear releases it now


def test_resize(image: Path) -> None:
    with loopdev.attach(image) as dev:
        os.truncate(image, 32 << 20)
        assert dev.resize() == 32 << 20
        assert dev.info().size == 32 << 20


def test_direct_io_auto_and_required(tmp_path: Path, devices: None) -> None:
    disk = tmp_path / "dio.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    with loopdev.attach(disk, direct_io=True) as dev:
        assert dev.info().direct_io
    shm = Path("/dev/shm") / f"loopdev-test-{os.getpid()}.img"
    with open(shm, "wb") as f:
        f.truncate(1 << 20)
    try:
        fd = -1
        try:
            fd = os.open(shm, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
            supported = True
        except OSError:
            supported = False  # tmpfs before 6.6 has no O_DIRECT
        finally:
            if fd >= 0:
                os.close(fd)
        with loopdev.attach(shm) as dev:  # "auto": on where it works, off elsewhere
            assert dev.info().direct_io == supported
        if supported:
            with loopdev.attach(shm, direct_io=True) as dev:
                assert dev.info().direct_io
        else:
            with pytest.raises(BackingFileError):
                loopdev.attach(shm, direct_io=True)
        with loopdev.attach(shm, direct_io=False) as dev:
            assert not dev.info().direct_io
        assert wait_unbound(str(shm)) == []
    finally:
        shm.unlink()


def _fifo(tmp_path: Path) -> str:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    return str(path)


def _readonly_file(tmp_path: Path) -> str:
    path = tmp_path / "ro.img"
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    path.chmod(0o444)
    return str(path)


BAD_INPUTS: list[tuple[str, Any, dict[str, Any], type[LoopError], int]] = [
    ("missing", lambda t, i: str(t / "nope.img"), {}, BackingFileError, errno.ENOENT),
    ("directory", lambda t, i: str(t), {}, BackingFileError, errno.EISDIR),
    ("fifo", lambda t, i: _fifo(t), {}, BackingFileError, errno.EINVAL),
    ("dev-null", lambda t, i: "/dev/null", {}, BackingFileError, errno.EINVAL),
    ("fd-minus-one", lambda t, i: -1, {}, BackingFileError, errno.EBADF),
    ("closed-fd", lambda t, i: 987, {}, BackingFileError, errno.EBADF),
    ("offset-past-end", lambda t, i: str(i), {"offset": 32 << 20}, BackingFileError, errno.EINVAL),
    ("negative-offset", lambda t, i: str(i), {"offset": -1}, ConfigureError, errno.EINVAL),
    ("sizelimit-1000", lambda t, i: str(i), {"sizelimit": 1000}, ConfigureError, errno.EINVAL),
    ("block-1000", lambda t, i: str(i), {"block_size": 1000}, ConfigureError, errno.EINVAL),
    ("block-8192", lambda t, i: str(i), {"block_size": 8192}, ConfigureError, errno.EINVAL),
    ("rw-on-readonly", lambda t, i: _readonly_file(t), {}, BackingFileError, errno.EACCES),
]


@pytest.mark.parametrize(
    ("make", "kwargs", "exc_type", "code"),
    [b[1:] for b in BAD_INPUTS],
    ids=[b[0] for b in BAD_INPUTS],
)
def test_bad_input(
    make: Any,
    kwargs: dict[str, Any],
    exc_type: type[LoopError],
    code: int,
    tmp_path: Path,
    image: Path,
) -> None:
    backing = make(tmp_path, image)
    with pytest.raises(exc_type) as exc:
        loopdev.attach(backing, **kwargs)
    assert exc.value.errno == code
    assert isinstance(exc.value, OSError)
    if isinstance(backing, str):
        assert backing in str(exc.value)
    assert wait_unbound(str(tmp_path)) == []
