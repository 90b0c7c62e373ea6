"""Partitions of attached images on a real kernel, with or without its MBR/GPT parsers."""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from images import (
    GPT3,
    kernel_spans,
    make_image,
    mbr_entry,
    needs_sfdisk,
    sfdisk_4k,
    sfdisk_image,
)

import loopdev
from loopdev import LoopControl, PartitionTableError, _native
from loopdev.compat import Loop
from loopdev.partitions import list_partitions

pytestmark = needs_sfdisk

MBR = "label: dos\n,4M,83\n,4M,83\n,12M,5\n,3M,83\n"


def expected_spans(table: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """Partition number -> (start, size) in bytes, as the kernel registers them."""
    return {number: (start, size) for number, start, size in kernel_spans(table)}


def registered(minor: int) -> dict[int, tuple[int, int]]:
    return {p.number: (p.start, p.size) for p in list_partitions(f"loop{minor}")}


def in_proc_partitions(minor: int) -> list[str]:
    with open("/proc/partitions") as f:
        return [
            line.split()[-1]
            for line in f
            if line.split()[-1:] and line.split()[-1].startswith(f"loop{minor}p")
        ]


@pytest.fixture
def gpt_image(tmp_path: Path, devices: None) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "gpt.img"
    return path, sfdisk_image(path, GPT3)


@pytest.fixture
def mbr_image(tmp_path: Path, devices: None) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "mbr.img"
    return path, sfdisk_image(path, MBR)


@pytest.fixture
def gpt4k_image(tmp_path: Path, devices: None) -> tuple[Path, dict[str, Any]]:
    """A GPT with 4096-byte sectors, written by sfdisk through a 4096-byte loop device."""
    path = tmp_path / "gpt4k.img"
    return path, sfdisk_4k(path, GPT3)


@pytest.mark.parametrize("fixture", ["gpt_image", "mbr_image"])
def test_high_level_partitions_match_sfdisk(
    fixture: str, request: pytest.FixtureRequest, configure_path: str
) -> None:
    path, table = request.getfixturevalue(fixture)
    with loopdev.attach(path, partscan=True) as dev:
        assert registered(dev.index) == expected_spans(table)
        for part in dev.partitions:
            fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                assert _native.get_u64(fd, _native.BLKGETSIZE64) == part.size
            finally:
                os.close(fd)
        minor = dev.index
    assert in_proc_partitions(minor) == []


def test_compat_partscan_registers(gpt_image: tuple[Path, dict[str, Any]]) -> None:
    path, table = gpt_image
    ctl = LoopControl()
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        lo = ctl.loop_for_fd(fd, partscan=True, autoclear=True)
        try:
            assert registered(lo.minor) == expected_spans(table)
        finally:
            lo.clear_fd()
            lo.close()
        assert in_proc_partitions(lo.minor) == []
    finally:
        os.close(fd)
        ctl.close()


def test_gpt_4096_sectors(gpt4k_image: tuple[Path, dict[str, Any]]) -> None:
    path, table = gpt4k_image
    assert table["sectorsize"] == 4096
    with loopdev.attach(path, partscan=True, block_size=4096) as dev:
        assert registered(dev.index) == expected_spans(table)


def test_marker_lands_at_partition_offset(gpt_image: tuple[Path, dict[str, Any]]) -> None:
    path, table = gpt_image
    marker = os.urandom(4096)
    with loopdev.attach(path, partscan=True) as dev:
        part2 = next(p for p in dev.partitions if p.number == 2)
        fd = os.open(part2.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.pwrite(fd, marker, 8192)
            os.fsync(fd)
        finally:
            os.close(fd)
    start = expected_spans(table)[2][0]
    with open(path, "rb") as f:
        f.seek(start + 8192)
        assert f.read(4096) == marker


def rebound_partitions(minor: int, tmp_path: Path) -> dict[int, tuple[int, int]] | None:
    """Bind ``minor`` to a plain file; its partitions, or None if another process has it."""
    plain = make_image(tmp_path / "plain.img", 32 << 20)
    fd = os.open(plain, os.O_RDWR | os.O_CLOEXEC)
    try:
        try:
            lo = Loop(minor)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # still in rundown, or taken and released
                return None
            raise
        try:
            lo.configure(fd, autoclear=True)
        except OSError as exc:
            if exc.errno == errno.EBUSY:  # a parallel allocator took the minor
                return None
            raise
        try:
            return registered(minor)
        finally:
            lo.close()
    finally:
        os.close(fd)


def test_private_nodes_and_no_state_after_detach(
    gpt_image: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    path, _ = gpt_image
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    for _ in range(10):
        with loopdev.attach(path, partscan=True, node_dir=nodes) as dev:
            names = sorted(os.listdir(nodes))
            assert names == sorted([dev.name] + [p.name for p in dev.partitions])
            for name in names:
                assert (nodes / name).stat().st_mode & 0o777 == 0o600
            minor = dev.index
        assert os.listdir(nodes) == []
        assert in_proc_partitions(minor) == []
        # The same minor bound again, without partitions, shows none.
        again = rebound_partitions(minor, tmp_path)
        if again is not None:
            assert again == {}
            return
    pytest.fail("the minor was taken by another process every time")


def losetup_find_free(path: Path) -> str:
    """``losetup -f --show``, retried: without loopdev's lock it loses races with
    other allocators on the machine (GET_FREE, then someone else binds that minor)."""
    for _ in range(50):
        done = subprocess.run(
            ["losetup", "-f", "--show", str(path)], capture_output=True, text=True, check=False
        )
        if done.returncode == 0:
            return done.stdout.strip()
        time.sleep(0.05)
    pytest.fail(f"losetup -f failed 50 times: {done.stderr}")


def test_stale_blkpg_partitions_are_dropped(
    gpt_image: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    """Partitions left by another tool (partx -a; losetup -d) never reach the next file."""
    path, table = gpt_image
    for _ in range(10):
        dev = losetup_find_free(path)
        minor = int(dev.removeprefix("/dev/loop"))
        try:
            fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
            try:
                # The same test in a parallel run may have left its stale
                # partitions on this minor: start from none.
                _native.delete_partitions(fd, minor)
                for number, (start, size) in expected_spans(table).items():
                    _native.blkpg(fd, _native.BLKPG_ADD_PARTITION, number, start, size, device=dev)
            finally:
                os.close(fd)
        finally:
            subprocess.run(["losetup", "-d", dev], check=True)
        again = rebound_partitions(minor, tmp_path)
        if again is not None:
            assert again == {}
            assert in_proc_partitions(minor) == []
            return
    pytest.fail("the minor was taken by another process every time")


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def test_corrupt_primary_gpt_is_refused_like_the_kernel(
    gpt_image: tuple[Path, dict[str, Any]],
) -> None:
    # efi.c find_valid_gpt() uses the backup only with the "gpt" boot option.
    path, _ = gpt_image
    _corrupt(path, 512 + 16, b"\xff\xff\xff\xff")  # header CRC of the primary
    with pytest.raises(PartitionTableError, match="backup header at LBA 65535 is intact") as info:
        loopdev.attach(path, partscan=True)
    assert info.value.backing == str(path)
    assert (info.value.device or "").startswith("/dev/loop")
    from helpers import wait_unbound

    assert wait_unbound(str(path)) == []


@pytest.mark.parametrize("damage", ["both_headers", "past_end", "random"])
def test_bad_tables_register_nothing(
    damage: str, gpt_image: tuple[Path, dict[str, Any]], configure_path: str
) -> None:
    path, _ = gpt_image
    size = path.stat().st_size
    if damage == "both_headers":
        _corrupt(path, 512 + 16, b"\xff\xff\xff\xff")
        _corrupt(path, size - 512 + 16, b"\xff\xff\xff\xff")
    elif damage == "past_end":
        # Keep the table valid for sfdisk, then shrink the device under it.
        path.write_bytes(path.read_bytes()[: 16 << 20])
    else:
        # Random bytes where both GPT headers and arrays live, behind a
        # protective MBR so that the image still claims to be GPT.
        _corrupt(path, 0, os.urandom(64 << 10))
        _corrupt(path, size - (64 << 10), os.urandom(64 << 10))
        _corrupt(path, 510, b"\x55\xaa")
        _corrupt(
            path,
            446,
            mbr_entry(0, 0xEE, 1, size // 512 - 1),
        )
    with pytest.raises(PartitionTableError):
        loopdev.attach(path, partscan=True)
    from helpers import wait_unbound

    assert wait_unbound(str(path)) == []
