"""Partitions of attached images on a real kernel, with or without its MBR/GPT parsers."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import loopdev
from loopdev import LoopControl, PartitionTableError, _native
from loopdev.compat import Loop
from loopdev.partitions import list_partitions

SFDISK = shutil.which("sfdisk")
pytestmark = pytest.mark.skipif(SFDISK is None, reason="sfdisk (Debian package fdisk) missing")

GPT3 = "label: gpt\nsize=4M, type=L, name=root\nsize=8M, type=L, name=data\nsize=2M, type=S\n"
MBR = "label: dos\n,4M,83\n,4M,83\n,12M,5\n,3M,83\n"


def make_image(path: Path, script: str, size: int = 32 << 20) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.truncate(size)
    subprocess.run([SFDISK, "-q", str(path)], input=script, text=True, check=True)
    return sfdisk_json(path)


def sfdisk_json(path: Path | str) -> dict[str, Any]:
    out = subprocess.run([SFDISK, "--json", str(path)], capture_output=True, text=True, check=True)
    table: dict[str, Any] = json.loads(out.stdout)["partitiontable"]
    return table


def expected_spans(table: dict[str, Any]) -> dict[int, tuple[int, int]]:
    """Partition number -> (start, size) in bytes, as the kernel registers them."""
    ss = table.get("sectorsize", 512)
    spans = {}
    for part in table["partitions"]:
        number = int("".join(ch for ch in part["node"][len(table["device"]) :] if ch.isdigit()))
        size = part["size"] * ss
        if table["label"] == "dos" and part["type"] in ("5", "f", "85"):
            size = min(size, max(ss, 1024))  # the kernel registers an extended partition as 1 KiB
        spans[number] = (part["start"] * ss, size)
    return spans


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
    return path, make_image(path, GPT3)


@pytest.fixture
def mbr_image(tmp_path: Path, devices: None) -> tuple[Path, dict[str, Any]]:
    path = tmp_path / "mbr.img"
    return path, make_image(path, MBR)


@pytest.fixture
def gpt4k_image(tmp_path: Path, devices: None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """A GPT with 4096-byte sectors, written by sfdisk through a 4096-byte loop device."""
    path = tmp_path / "gpt4k.img"
    with open(path, "wb") as f:
        f.truncate(32 << 20)
    with loopdev.attach(path, block_size=4096) as dev:
        subprocess.run([SFDISK, "-q", dev.path], input=GPT3, text=True, check=True)
        table = sfdisk_json(dev.path)
    yield path, table


@pytest.mark.parametrize("fixture", ["gpt_image", "mbr_image"])
def test_high_level_partitions_match_sfdisk(
    fixture: str, request: pytest.FixtureRequest, configure_path: str
) -> None:
    path, table = request.getfixturevalue(fixture)
    with loopdev.attach(path, partscan=True) as dev:
        assert registered(dev.minor) == expected_spans(table)
        for part in dev.partitions:
            fd = os.open(part.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                assert _native.get_u64(fd, _native.BLKGETSIZE64) == part.size
            finally:
                os.close(fd)
        minor = dev.minor
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
        assert registered(dev.minor) == expected_spans(table)


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
    plain = tmp_path / "plain.img"
    with open(plain, "wb") as f:
        f.truncate(32 << 20)
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
            minor = dev.minor
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
    from conftest import wait_unbound

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
            bytes([0, 1, 1, 0, 0xEE, 0xFE, 0xFF, 0xFF, 1, 0, 0, 0])
            + (size // 512 - 1).to_bytes(4, "little"),
        )
    with pytest.raises(PartitionTableError):
        loopdev.attach(path, partscan=True)
    from conftest import wait_unbound

    assert wait_unbound(str(path)) == []
