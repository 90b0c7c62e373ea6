"""Tests for loopdev.parttable: sfdisk-made, hand-made, corrupted and fuzzed images.

Only user space: images are sparse files under ``tmp_path`` or memfds, never
attached to loop devices.
"""

from __future__ import annotations

import functools
import itertools
import os
import pickle
import random
import re
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from images import (
    DISK_GUID,
    EBRS,
    ESP,
    EXT_LBA,
    FDISK,
    GPT_LAYOUT,
    LINUX,
    MBR_SIZE,
    SFDISK,
    SWAP,
    Img,
    fix_gpt_crcs,
    gpt_by_hand,
    gpt_lbas,
    make_image,
    mbr_by_hand,
    mbr_sector,
    needs_sfdisk,
    part_uuid,
    run,
    set_gpt_entry,
    set_mbr_entry,
    sfdisk,
)

from loopdev.errors import PartitionTableError
from loopdev.partitions import blkpg_plan
from loopdev.parttable import Partition, PartitionTable, gpt_sector_size, read_table

KiB = 1 << 10
MiB = 1 << 20

_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
MKFS_EXT4 = shutil.which("mkfs.ext4", path=_TOOL_PATH)
MKFS_FAT = shutil.which("mkfs.fat", path=_TOOL_PATH)
EXTENDED_TYPES = ("0x05", "0x0f", "0x85")

# Hypothesis: bounded and leaving nothing behind (no example database).
FUZZ = settings(max_examples=200, deadline=None, database=None)


def read_img(img: Img, sector_size: int | None = None) -> PartitionTable | None:
    with img.fd() as fd:
        return read_table(fd, img.size, sector_size, path="test.img")


def read_path(path: Path, sector_size: int | None = None) -> PartitionTable | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_table(fd, os.fstat(fd).st_size, sector_size, path=str(path))
    finally:
        os.close(fd)


def assert_sane(table: PartitionTable | None, size: int) -> None:
    """What read_table promises whenever it returns a table, and what BLKPG is given.

    Like the kernel, read_table may return overlapping partitions (it does
    not check) and a size truncated at the device end; blkpg_plan() must
    turn that into disjoint, whole-block spans on the device.
    """
    if table is None:
        return
    assert isinstance(table, PartitionTable)
    assert table.scheme in ("gpt", "dos")
    assert table.sector_size in (512, 1024, 2048, 4096)
    ss = table.sector_size
    numbers = [p.number for p in table.partitions]
    assert numbers == sorted(set(numbers))
    assert all(1 <= n <= 255 for n in numbers)
    for p in table.partitions:
        assert p.size > 0 and p.size % 512 == 0
        assert p.start >= 0 and p.start % ss == 0
        assert p.start + p.size <= size
    plan, _ = blkpg_plan(table, ss)
    spans = sorted((start, start + length) for _, start, length in plan)
    for start, end in spans:
        assert start % ss == 0 and end % ss == 0 and 0 <= start < end <= size
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert end <= start
    assert {n for n, _, _ in plan} <= set(numbers)


def outline(table: PartitionTable | None) -> list[tuple[int, int, int]]:
    assert table is not None
    return [(p.number, p.start, p.size) for p in table.partitions]


def fields(p: Partition) -> tuple[object, ...]:
    return (p.number, p.start, p.size, p.type, p.uuid, p.label, p.bootable)


# --- hand-made GPT -------------------------------------------------------------


def gpt_expected(size: int = 4 * MiB, ss: int = 512) -> PartitionTable:
    return PartitionTable(
        "gpt",
        ss,
        DISK_GUID,
        tuple(
            Partition(number, start, length, ptype, part_uuid(number), label)
            for number, start, length, ptype, label in GPT_LAYOUT
        ),
    )


# --- hand-made MBR ---------------------------------------------------------------

MBR_EXPECTED = PartitionTable(
    "dos",
    512,
    "0xdeadbeef",
    (
        Partition(1, 2048 * 512, 1 * MiB, "0x83", None, None, True),
        Partition(2, 4096 * 512, 1 * MiB, "0x82", None, None),
        Partition(3, EXT_LBA * 512, 1 * KiB, "0x0f", None, None),  # the kernel's stub
        Partition(5, 8192 * 512, 512 * KiB, "0x83", None, None),
        Partition(6, 10240 * 512, 512 * KiB, "0x07", None, None),
        Partition(7, 12289 * 512, 2047 * 512, "0x83", None, None, True),
    ),
)


# --- sfdisk ----------------------------------------------------------------------


def from_sfdisk(table: dict[str, Any], image: Path) -> tuple[tuple[object, ...], ...]:
    """sfdisk's view of ``image`` converted to Partition fields.

    sfdisk reports an extended partition with its full size, the kernel (and
    read_table) with a stub of max(sector, 1 KiB) bytes, so convert that too.
    """
    ss = int(table.get("sectorsize", 512))
    out: list[tuple[int, int, int, str, str | None, str | None, bool]] = []
    for p in table["partitions"]:
        match = re.search(r"(\d+)$", p["node"])
        assert match is not None and p["node"].startswith(str(image))
        start, size = p["start"] * ss, p["size"] * ss
        if table["label"] == "gpt":
            out.append(
                (
                    int(match[1]),
                    start,
                    size,
                    p["type"].lower(),
                    p["uuid"].lower(),
                    p.get("name", ""),
                    False,
                )
            )
        else:
            ptype = f"0x{int(p['type'], 16):02x}"
            if ptype in EXTENDED_TYPES:
                size = min(size, max(ss, 1024))
            out.append((int(match[1]), start, size, ptype, None, None, bool(p.get("bootable"))))
    return tuple(sorted(out))


@needs_sfdisk
def test_gpt_three_named_partitions_match_sfdisk(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    js = sfdisk(
        image,
        "label: gpt\n"
        'size=1M, type=L, name="alpha"\n'
        'size=1M, type=S, name="b e t a"\n'
        'type=U, name="ünïcødé"\n',
    )
    table = read_path(image)
    assert table is not None
    assert (table.scheme, table.sector_size, table.disk_id) == (
        "gpt",
        512,
        js["id"].lower(),
    )
    assert tuple(fields(p) for p in table.partitions) == from_sfdisk(js, image)
    assert [p.label for p in table.partitions] == ["alpha", "b e t a", "ünïcødé"]
    assert [p.type for p in table.partitions] == [LINUX, SWAP, ESP]


@needs_sfdisk
def test_mbr_primaries_extended_logicals_match_sfdisk(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    js = sfdisk(
        image,
        "label: dos\nlabel-id: 0x12345678\n"
        "size=1M, type=83, bootable\n"
        "size=1M, type=82\n"
        "size=4M, type=5\n"
        f"{image}5 : size=1M, type=83\n"
        f"{image}6 : type=7\n",
    )
    table = read_path(image)
    assert table is not None
    assert (table.scheme, table.sector_size, table.disk_id) == (
        "dos",
        512,
        "0x12345678",
    )
    assert tuple(fields(p) for p in table.partitions) == from_sfdisk(js, image)
    # The documented difference: sfdisk shows the extended partition whole,
    # the kernel (and read_table) registers a 1 KiB stub at its start.
    extended = next(p for p in js["partitions"] if p["node"].endswith("3"))
    assert extended["size"] * 512 == 4 * MiB
    assert table.partitions[2] == Partition(3, extended["start"] * 512, 1024, "0x05", None, None)
    assert [p.number for p in table.partitions] == [1, 2, 3, 5, 6]
    assert table.partitions[0].bootable and not table.partitions[1].bootable


def _sfdisk_has_sector_size() -> bool:
    assert SFDISK is not None
    return "--sector-size" in run(SFDISK, "--help")


@needs_sfdisk
def test_gpt_4096_byte_sectors(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 16 * MiB)
    if _sfdisk_has_sector_size():
        js = sfdisk(
            image,
            'label: gpt\nsize=1M, type=L, name="alpha"\ntype=S, name="beta"\n',
            "--sector-size",
            "4096",
        )
        assert js["sectorsize"] == 4096
        expected = from_sfdisk(js, image)
        disk_id = js["id"].lower()
    elif FDISK is not None:
        # sfdisk < 2.39 has no --sector-size; fdisk -b does the same job.
        run(
            FDISK,
            "-b",
            "4096",
            str(image),
            stdin="g\nn\n\n\n+1M\nn\n\n\n\nx\nn\n1\nalpha\nn\n2\nbeta\nr\nw\n",
        )
        listing = run(
            FDISK,
            "-b",
            "4096",
            "-l",
            "-o",
            "Device,Start,Sectors,Type-UUID,UUID,Name",
            str(image),
        )
        match = re.search(r"Disk identifier: (\S+)", listing)
        assert match is not None
        disk_id = match[1].lower()
        rows = []
        for line in listing.splitlines():
            if line.startswith(str(image)):
                node, start, sectors, ptype, puuid, name = line.split(None, 5)
                rows.append(
                    (
                        int(node[len(str(image)) :]),
                        int(start) * 4096,
                        int(sectors) * 4096,
                        ptype.lower(),
                        puuid.lower(),
                        name,
                        False,
                    )
                )
        expected = tuple(rows)
    else:
        pytest.skip("neither sfdisk --sector-size nor fdisk -b available")
    table = read_path(image)
    assert table is not None
    assert (table.scheme, table.sector_size, table.disk_id) == ("gpt", 4096, disk_id)
    assert tuple(fields(p) for p in table.partitions) == expected
    assert [p.label for p in table.partitions] == ["alpha", "beta"]
    assert read_path(image, 4096) == table
    # Read with the wrong logical block size there is no GPT where it should
    # be (the kernel finds nothing); the error names the fix.
    with pytest.raises(
        PartitionTableError,
        match="written for 4096-byte sectors: attach with block_size=4096 "
        r"\(compat: blocksize=4096; CLI: --sector-size 4096\)",
    ):
        read_path(image, 512)
    fd = os.open(image, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert gpt_sector_size(fd, 0, 16 * MiB) == 4096
    finally:
        os.close(fd)


@needs_sfdisk
def test_gpt_128_partitions_match_sfdisk(tmp_path: Path) -> None:
    image = make_image(tmp_path / "disk.img", 12 * MiB)
    script = "label: gpt\n" + "".join(
        f'start={2048 + i * 128}, size=128, type=L, name="part{i + 1}"\n' for i in range(128)
    )
    js = sfdisk(image, script)
    table = read_path(image)
    assert table is not None
    assert len(table.partitions) == 128
    assert [p.number for p in table.partitions] == list(range(1, 129))
    assert tuple(fields(p) for p in table.partitions) == from_sfdisk(js, image)


@needs_sfdisk
def test_sfdisk_gpt_with_broken_primary_is_refused(tmp_path: Path) -> None:
    # efi.c find_valid_gpt(): without the "gpt" boot option the kernel never
    # uses the backup instead of the primary.
    image = make_image(tmp_path / "disk.img", 8 * MiB)
    sfdisk(image, 'label: gpt\nsize=1M, name="a"\nsize=2M, name="b"\n')
    with open(image, "r+b") as f:
        f.seek(512 + 40)  # first usable LBA, under the header CRC
        f.write(b"\xff")
    with pytest.raises(
        PartitionTableError, match=r"header CRC32.*backup header at LBA 16383 is intact"
    ):
        read_path(image)


# --- GPT: hand-made --------------------------------------------------------------


@pytest.mark.parametrize("ss", [512, 4096])
def test_hand_made_gpt(ss: int) -> None:
    img = gpt_by_hand(ss=ss)
    assert read_img(img) == gpt_expected(ss=ss)
    assert read_img(img, ss) == gpt_expected(ss=ss)


@pytest.mark.parametrize(
    ("where", "offset", "data"),
    [
        ("header", 0, b"XFI PART"),  # signature
        ("header", 16, b"\x00\x00\x00\x01"),  # header CRC
        ("header", 12, b"\x00\x10"),  # header size (CRC now wrong too)
        ("header", 24, b"\x07"),  # my_lba
        ("header", 88, b"\x01"),  # entry array CRC
        ("array", 57, b"\x01"),  # a byte of the entry array
    ],
)
@pytest.mark.parametrize("ss", [512, 4096])
def test_bad_primary_is_refused_though_the_backup_is_good(
    ss: int, where: str, offset: int, data: bytes
) -> None:
    # efi.c find_valid_gpt() reads the backup only to compare it with a good
    # primary (or with the "gpt" boot option): a bad primary loses the table.
    img = gpt_by_hand(ss=ss)
    img.write((ss if where == "header" else 2 * ss) + offset, data)
    last = img.size // ss - 1
    with pytest.raises(
        PartitionTableError, match=f"backup header at LBA {last} is intact.*'gpt'"
    ) as info:
        read_img(img)
    assert str(info.value).startswith(
        f"the primary GPT header at LBA 1 ({ss}-byte sectors) is not valid: "
    )


def test_bad_backup_is_ignored() -> None:
    img = gpt_by_hand()
    img.write((img.size // 512 - 1) * 512 + 16, b"\x00\x00\x00\x00")
    assert read_img(img) == gpt_expected()


def test_grown_image_reads_the_primary() -> None:
    img = gpt_by_hand(size=4 * MiB)
    img.size = 8 * MiB  # grown after partitioning: the backup is mid-disk now
    assert read_img(img) == gpt_expected(size=8 * MiB)
    img.write(2 * 512 + 100, b"\xff")  # primary entry array CRC fails
    with pytest.raises(PartitionTableError, match="entry array CRC32") as info:
        read_img(img)
    assert "backup" not in str(info.value)  # none at the last LBA


def test_both_headers_bad() -> None:
    img = gpt_by_hand()
    first, last = gpt_lbas(img, 512)
    img.write(first * 512 + 16, b"\x00\x00\x00\x00")
    img.write(last * 512 + 16, b"\x00\x00\x00\x00")
    with pytest.raises(PartitionTableError, match="header CRC32 is 0x00000000") as info:
        read_img(img)
    assert info.value.errno == 22
    assert info.value.backing == "test.img"
    assert info.value.device is None
    assert "backup" not in str(info.value)
    with img.fd() as fd, pytest.raises(PartitionTableError) as info:
        read_table(fd, img.size, device="/dev/loop9")
    assert info.value.device == "/dev/loop9" and info.value.backing is None


def test_both_entry_arrays_bad() -> None:
    img = gpt_by_hand()
    img.write(2 * 512, b"\x01")
    img.write((img.size // 512 - 33) * 512, b"\x01")
    with pytest.raises(PartitionTableError, match="entry array CRC32"):
        read_img(img)


def _lba(value: int) -> bytes:
    return struct.pack("<Q", value)


# GPT_LAYOUT in (number, start, size): 1 at LBA 2048, 2 at 4096, 4 at 6144.
P1, P2, P4 = (1, MiB, MiB), (2, 2 * MiB, MiB), (4, 3 * MiB, 512 * KiB)


@pytest.mark.parametrize(
    ("index", "offset", "value", "outline_", "note"),
    [
        # efi.c is_pte_valid(): past the last LBA of the device: skipped.
        (0, 40, _lba(10**9), [P2, P4], "GPT partition 1 .* ends past the last LBA 8191"),
        (0, 32, _lba(8192), [P2, P4], "GPT partition 1 .* ends past the last LBA 8191"),
        # Past the last usable LBA, or before the first, but on the device:
        # the kernel does not look at the usable range for entries.
        (0, 40, _lba(8191), [(1, MiB, 8191 * 512 - MiB + 512), P2, P4], None),
        (0, 32, _lba(1), [(1, 512, 2 * MiB - 512), P2, P4], None),
        # Ending before it starts: nothing the kernel could register.
        (1, 40, _lba(4000), [P1, P4], "GPT partition 2 .* ends at LBA 4000, before its first"),
        (1, 40, _lba(4095), [P1, P4], "GPT partition 2 .* ends at LBA 4095, before its first"),
        # Overlaps: the kernel registers both (blkpg_plan then cannot).
        (1, 32, _lba(4095), [P1, (2, 4095 * 512, MiB + 512), P4], None),
        (3, 32, _lba(2048), [P1, P2, (4, MiB, 2 * MiB + 512 * KiB)], None),
    ],
)
def test_gpt_entry_rules(
    index: int, offset: int, value: bytes, outline_: list[tuple[int, int, int]], note: str | None
) -> None:
    img = gpt_by_hand()
    set_gpt_entry(img, index, offset, value)
    table = read_img(img)
    assert outline(table) == outline_
    assert table is not None
    if note is None:
        assert table.notes == ()
    else:
        assert len(table.notes) == 1 and re.search(note, table.notes[0]), table.notes
    assert_sane(table, img.size)


def test_overlapping_gpt_partitions_plan_the_first() -> None:
    img = gpt_by_hand()
    set_gpt_entry(img, 3, 32, _lba(2048))  # partition 4 over 1 and 2
    table = read_img(img)
    assert table is not None
    plan, notes = blkpg_plan(table, 512)
    assert plan == [P1, P2]
    assert notes == [
        f"partition 4 (bytes {MiB}..{3 * MiB + 512 * KiB - 1}) is not registered: it "
        "overlaps partition 1, 2; the kernel registers both, BLKPG refuses overlaps"
    ]


def test_empty_entries_are_skipped_and_numbers_kept() -> None:
    img = gpt_by_hand()
    set_gpt_entry(img, 1, 0, bytes(16))  # zero type GUID: unused
    table = read_img(img)
    assert table is not None
    assert [p.number for p in table.partitions] == [1, 4]


def _u32(value: int) -> bytes:
    return struct.pack("<I", value)


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        # efi.c is_gpt_valid(), in its order.
        (12, _u32(513), "header size 513 is larger than the 512-byte sector"),
        (12, _u32(91), "header size 91 is smaller than 92"),
        (24, _lba(2), "header claims to be at LBA 2"),
        (40, _lba(8192), "first usable LBA 8192 is past the last LBA 8191"),
        (48, _lba(10**6), "last usable LBA 1000000 is past the last LBA 8191"),
        (48, _lba(33), "last usable LBA 33 is before the first usable LBA 34"),
        (84, _u32(256), "entry size is 256; the kernel accepts only 128"),
        (84, _u32(132), "entry size is 132"),
        (84, _u32(64), "entry size is 64"),
        (80, _u32(32769), "32769 entries of 128 bytes exceed the kernel's 4 MiB"),
        (80, _u32(1_000_000), "exceed the kernel's 4 MiB"),
        (80, _u32(0), "it has 0 partition entries"),  # alloc_read_gpt_entries()
        (72, _lba(8192), "entry array LBA 8192 is past the last LBA 8191"),
        (72, _lba(8190), "entry array at LBA 8190 .* runs past the end of the device"),
    ],
)
def test_bad_gpt_headers(offset: int, value: bytes, message: str) -> None:
    img = gpt_by_hand()
    for lba in gpt_lbas(img, 512):
        img.write(lba * 512 + offset, value)
    fix_gpt_crcs(img, 512)
    with pytest.raises(PartitionTableError, match=f"primary GPT header at LBA 1 .*{message}"):
        read_img(img)


@pytest.mark.parametrize(
    ("offset", "value"),
    [
        (40, _lba(0)),  # first usable LBA on the MBR
        (48, _lba(8191)),  # last usable LBA on the backup header
        (72, _lba(100)),  # entry array inside the usable LBAs (zeros: no entries)
        (72, _lba(8159)),  # the primary pointing at the backup's entry array
    ],
)
def test_gpt_header_fields_the_kernel_does_not_check(offset: int, value: bytes) -> None:
    img = gpt_by_hand()
    for lba in gpt_lbas(img, 512):
        img.write(lba * 512 + offset, value)
    fix_gpt_crcs(img, 512)
    table = read_img(img)
    assert table is not None and table.scheme == "gpt"
    assert_sane(table, img.size)


def test_gpt_without_protective_mbr() -> None:
    img = gpt_by_hand()
    img.write(0, bytes(512))
    with pytest.raises(PartitionTableError, match="no protective MBR"):
        read_img(img)


def test_protective_entry_must_start_at_lba_1() -> None:
    # efi.c pmbr_part_valid(); msdos.c then ignores the 0xee MBR too.
    img = gpt_by_hand()
    set_mbr_entry(img, 0, 0, (0, 0xEE, 2, 8190))
    with pytest.raises(PartitionTableError, match="does not start at LBA 1"):
        read_img(img)
    # An invalid boot indicator makes the sector boot code: nothing at all.
    set_mbr_entry(img, 0, 0, (0x41, 0xEE, 2, 8190))
    assert read_img(img) is None


def test_hybrid_mbr_reads_the_gpt() -> None:
    img = gpt_by_hand()
    set_mbr_entry(img, 0, 1, (0x80, 0x0C, 2048, 2048))
    set_mbr_entry(img, 0, 2, (0x80, 0x83, 0, 2048))  # boot flags do not matter
    assert read_img(img) == gpt_expected()


def test_protective_mbr_without_gpt() -> None:
    img = Img(4 * MiB)
    img.write(0, mbr_sector([(0, 0xEE, 1, 8191)]))
    with pytest.raises(PartitionTableError, match="no GPT header"):
        read_img(img)
    with pytest.raises(PartitionTableError, match="not valid: no 'EFI PART' signature "):
        read_img(img, 512)


def test_too_small_for_the_header() -> None:
    img = Img(4096)
    img.write(0, mbr_sector([(0, 0xEE, 1, 7)]))
    img.write(512, b"EFI PART")
    with pytest.raises(PartitionTableError, match="has no LBA 1"):
        read_img(img, 4096)


# --- MBR: hand-made --------------------------------------------------------------


def test_hand_made_mbr_with_logicals(tmp_path: Path) -> None:
    img = mbr_by_hand()
    assert read_img(img) == MBR_EXPECTED
    assert read_path(img.save(tmp_path / "mbr.img")) == MBR_EXPECTED


def test_mbr_read_with_4096_byte_sectors() -> None:
    img = Img(64 * MiB)
    img.write(0, mbr_sector([(0, 0x83, 256, 256), (0, 0x05, 512, 2048)]))
    img.write(512 * 4096, mbr_sector([(0, 0x83, 256, 512)]))
    table = read_img(img, 4096)
    assert table == PartitionTable(
        "dos",
        4096,
        "0x00000000",
        (
            Partition(1, 1 * MiB, 1 * MiB, "0x83", None, None),
            Partition(2, 2 * MiB, 4096, "0x05", None, None),  # stub: one logical sector
            Partition(5, 3 * MiB, 2 * MiB, "0x83", None, None),
        ),
    )


def test_extended_stub_overlapping_first_logical() -> None:
    # A logical one 512-byte sector after its EBR: the kernel registers its
    # 1 KiB stub over it; BLKPG cannot, so the plan shortens the stub.
    img = Img(4 * MiB)
    img.write(0, mbr_sector([(0, 0x85, 2048, 4096)]))
    img.write(2048 * 512, mbr_sector([(0, 0x83, 1, 2047)]))
    table = read_img(img)
    assert outline(table) == [(1, MiB, 1024), (5, MiB + 512, 2047 * 512)]
    assert blkpg_plan(table, 512) == (  # type: ignore[arg-type]
        [(1, MiB, 512), (5, MiB + 512, 2047 * 512)],
        [
            "extended partition 1 is registered with 512 bytes instead of 1024: "
            "partition 5 starts inside the kernel's stub, and BLKPG refuses overlaps"
        ],
    )
    assert_sane(table, img.size)
    # A logical on its own EBR starts where the stub does: the stub goes.
    img.write(2048 * 512, mbr_sector([(0, 0x83, 0, 2048)]))
    table = read_img(img)
    assert outline(table) == [(1, MiB, 1024), (5, MiB, MiB)]
    plan, notes = blkpg_plan(table, 512)  # type: ignore[arg-type]
    assert plan == [(5, MiB, MiB)]
    assert notes == [
        "extended partition 1 is not registered: partition 5 overlaps the kernel's stub, "
        "and BLKPG refuses overlaps"
    ]


def test_extended_with_unwritten_first_ebr_has_no_logicals() -> None:
    img = Img(4 * MiB)
    img.write(0, mbr_sector([(0, 0x83, 2048, 2048), (0, 0x05, 4096, 2048)]))
    table = read_img(img)
    assert table is not None
    assert [p.number for p in table.partitions] == [1, 2]


def _mbr_case(change: str) -> Img:
    img = mbr_by_hand()
    if change == "past end":
        set_mbr_entry(img, 0, 1, (0, 0x82, 4096, 100_000))
    elif change == "primaries overlap":
        set_mbr_entry(img, 0, 1, (0, 0x82, 3000, 1000))
    elif change == "extended overlaps":
        set_mbr_entry(img, 0, 3, (0, 0x83, 14000, 100))
    elif change == "sector 0":
        set_mbr_entry(img, 0, 0, (0, 0x83, 0, 2048))
    elif change == "ebr loop":
        set_mbr_entry(img, EBRS[2], 1, (0, 0x05, 0, 2048))
    elif change == "link outside":
        set_mbr_entry(img, EBRS[1], 1, (0, 0x05, 9000, 2048))
    elif change == "logical outside":
        set_mbr_entry(img, EBRS[2], 0, (0, 0x83, 1, 4096))
    elif change == "no signature":
        img.write(EBRS[1] * 512 + 510, b"\x00\x00")
    elif change == "logical covers ebr":
        set_mbr_entry(img, EBRS[0], 0, (0, 0x83, 2048, 2000))
    elif change == "logical on ebr":
        set_mbr_entry(img, EBRS[1], 0, (0, 0x83, 0, 1024))
    return img


# MBR_EXPECTED in (number, start, size).
M1, M2, M3 = (1, 2048 * 512, MiB), (2, 4096 * 512, MiB), (3, EXT_LBA * 512, 1024)
M5, M6, M7 = (5, 8192 * 512, 512 * KiB), (6, 10240 * 512, 512 * KiB), (7, 12289 * 512, 2047 * 512)
# A link back to the first EBR: 5, 6, 7 again and again as 8, 9, 10, ...
LOOPED = [(n, *(M5, M6, M7)[(n - 5) % 3][1:]) for n in range(5, 256)]


@pytest.mark.parametrize(
    ("change", "outline_", "note"),
    [
        # core.c blk_add_partition(): truncated at the end of the device.
        (
            "past end",
            [M1, (2, 4096 * 512, 6 * MiB), M3, M5, M6, M7],
            "MBR partition 2 .* truncated",
        ),
        # No overlap checks anywhere in msdos.c.
        ("primaries overlap", [M1, (2, 3000 * 512, 1000 * 512), M3, M5, M6, M7], None),
        ("extended overlaps", [M1, M2, M3, (4, 14000 * 512, 100 * 512), M5, M6, M7], None),
        ("sector 0", [(1, 0, MiB), M2, M3, M5, M6, M7], None),
        ("logical covers ebr", [M1, M2, M3, (5, 8192 * 512, 2000 * 512), M6, M7], None),
        ("logical on ebr", [M1, M2, M3, M5, (6, 9216 * 512, 1024 * 512), M7], None),
        # A logical (slots 1 and 2) may lie outside its extended partition...
        ("logical outside", [M1, M2, M3, M5, M6, (7, 12289 * 512, 4095 * 512)], "truncated"),
        # ...and a link may leave it: followed, here to zeros (no 0x55AA).
        ("link outside", [M1, M2, M3, M5, M6], None),
        # An EBR without 0x55AA ends the chain; what came before stays.
        ("no signature", [M1, M2, M3, M5], "EBR at byte 4718592 .* no 0x55AA signature"),
        # A loop re-registers the same logical until the number limit.
        (
            "ebr loop",
            [M1, M2, M3, *LOOPED],
            "loops back to byte 3145728",
        ),
    ],
)
def test_mbr_kernel_rules(
    change: str, outline_: list[tuple[int, int, int]], note: str | None
) -> None:
    table = read_img(_mbr_case(change))
    assert outline(table) == outline_
    assert table is not None
    if note is None:
        assert table.notes == ()
    else:
        assert any(re.search(note, n) for n in table.notes), table.notes
    assert_sane(table, MBR_SIZE)


def test_ebr_loop_registers_one_copy() -> None:
    table = read_img(_mbr_case("ebr loop"))
    assert table is not None
    plan, notes = blkpg_plan(table, 512)
    assert plan == [M1, M2, M3, M5, M6, M7]
    assert len(notes) == 255 - 7
    assert notes[0].startswith(f"partition 8 (bytes {8192 * 512}..")


def test_ebr_chain_stops_at_partition_255() -> None:
    # 300 EBRs in a row, each with a logical: 5..255 are registered.
    img = Img(64 * MiB)
    img.write(0, mbr_sector([(0, 0x05, 2048, 100_000)]))
    for i in range(300):
        img.write(
            (2048 + 8 * i) * 512,
            mbr_sector([(0, 0x83, 1, 7), (0, 0x05, 8 * (i + 1), 8)]),
        )
    table = read_img(img)
    assert table is not None
    assert [p.number for p in table.partitions] == [1, *range(5, 256)]
    assert table.partitions[-1].start == (2048 + 8 * 250 + 1) * 512
    assert table.notes == (
        "logical partitions after number 255 in extended partition 1 are not registered: "
        "partition numbers stop at 255",
    )


def _empty_ebrs_image(data_at: int) -> Img:
    img = Img(64 * MiB)
    img.write(0, mbr_sector([(0, 0x05, 2048, 100_000)]))
    for i in range(150):
        data = [(0, 0x83, 1, 7)] if i in (0, data_at) else [(0, 0, 0, 0)]
        img.write((2048 + 8 * i) * 512, mbr_sector([*data, (0, 0x05, 8 * (i + 1), 8)]))
    return img


def test_ebr_chain_gives_up_after_100_empty_ebrs() -> None:
    # The 100th EBR after the last logical is still read...
    table = read_img(_empty_ebrs_image(100))
    assert table is not None
    assert [p.start // 512 for p in table.partitions] == [2048, 2049, 2048 + 8 * 100 + 1]
    # ...the 101st is not.
    table = read_img(_empty_ebrs_image(101))
    assert table is not None
    assert [p.start // 512 for p in table.partitions] == [2048, 2049]
    assert table.notes == (
        f"the EBR chain of extended partition 1 is not followed past byte "
        f"{(2048 + 8 * 101) * 512}: 100 EBRs in a row without a logical partition",
    )


def test_garbage_in_ebr_slots_3_and_4() -> None:
    # msdos.c parse_extended(): slots 3 and 4 count only when they fit both
    # the link that led to the EBR and the extended partition.  The link to
    # EBRS[1] covers 4096 sectors.
    img = mbr_by_hand()
    set_mbr_entry(img, EBRS[1], 2, (0, 0x83, 4000, 100))  # past the link: skipped
    set_mbr_entry(img, EBRS[1], 3, (0, 0x83, 2100, 100))  # fits: registered
    table = read_img(img)
    assert outline(table)[3:] == [M5, M6, (7, (9216 + 2100) * 512, 100 * 512), (8, *M7[1:])]


def test_partition_starting_past_the_end_is_skipped() -> None:
    img = mbr_by_hand()
    set_mbr_entry(img, 0, 3, (0, 0x83, 20000, 100))
    table = read_img(img)
    assert outline(table) == outline(MBR_EXPECTED)
    assert table is not None and table.notes == (
        "MBR partition 4 is not registered: it starts at byte 10240000, past the end "
        f"of the device ({MBR_SIZE} bytes)",
    )


# --- no table at all -------------------------------------------------------------


def fat_boot_sector() -> bytes:
    """A FAT12 boot sector whose boot code happens to look like an MBR entry."""
    sector = bytearray(512)
    sector[0:11] = b"\xeb\x3c\x90mkfs.fat"
    # 512 B/sector, 4 sectors/cluster, 4 reserved, 2 FATs, 512 root entries,
    # 8192 sectors, media 0xf8, 8 sectors per FAT
    struct.pack_into("<HBHBHHBH", sector, 0x0B, 512, 4, 4, 2, 512, 8192, 0xF8, 8)
    sector[0x26] = 0x29
    sector[0x2B:0x3E] = b"NO NAME    FAT12   "
    sector[0x1BE:0x1CE] = b"\x00\x01\x01\x00\x83\xfe\xff\xff" + struct.pack("<II", 1, 100)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


def _no_table_image(kind: str) -> Img:
    img = Img(4 * MiB)
    if kind == "fat":
        sector = bytearray(fat_boot_sector())
        sector[446 + 48] = 0x41  # boot code there: msdos.c then checks for FAT
        img.write(0, bytes(sector))
    elif kind == "ext4-like":
        img.write(1024 + 0x38, b"\x53\xef")  # superblock magic, nothing at 0
    elif kind == "boot code":
        sector = bytearray(mbr_sector([(0, 0x83, 2048, 2048)]))
        sector[446 + 16] = 0x41  # an "invalid boot indicator": this is code
        img.write(0, bytes(sector))
    elif kind == "empty mbr":
        img.write(0, mbr_sector([], disk_id=0x1234))
    elif kind == "aix":
        img.write(0, b"\xc9\xc2\xd4\xc1" + mbr_sector([(0, 0x07, 2048, 2048)])[4:])
        img.write(7 * 512, b"_LVM")
    return img


@pytest.mark.parametrize("kind", ["zeros", "fat", "ext4-like", "boot code", "empty mbr", "aix"])
def test_no_partition_table(kind: str) -> None:
    assert read_img(_no_table_image(kind)) is None


def test_fat_boot_sector_with_valid_boot_flags_is_read_as_a_table() -> None:
    # msdos.c looks for FAT only when a boot indicator is invalid: with all
    # four 0x00/0x80 the kernel takes the sector for an MBR (libblkid and
    # sfdisk would not).
    img = Img(4 * MiB)
    img.write(0, fat_boot_sector())
    table = read_img(img)
    assert outline(table) == [(1, 512, 100 * 512)]


def test_aix_magic_with_a_linux_partition_is_a_dos_table() -> None:
    img = Img(4 * MiB)
    img.write(0, b"\xc9\xc2\xd4\xc1" + mbr_sector([(0, 0x83, 2048, 2048)])[4:])
    img.write(7 * 512, b"_LVM")
    assert outline(read_img(img)) == [(1, MiB, MiB)]
    img.write(446 + 4, b"\x07")  # no Linux partition: msdos.c aix_magic_present()
    assert read_img(img) is None


def test_tiny_inputs(tmp_path: Path) -> None:
    path = tmp_path / "tiny.img"
    path.write_bytes(b"\x55\xaa" * 100)
    assert read_path(path) is None
    with Img(4 * MiB).fd() as fd:
        assert read_table(fd, 0) is None
        assert read_table(fd, 511) is None


@pytest.mark.skipif(MKFS_EXT4 is None, reason="mkfs.ext4 not installed")
def test_real_ext4_image(tmp_path: Path) -> None:
    assert MKFS_EXT4 is not None
    image = make_image(tmp_path / "ext4.img", 8 * MiB)
    run(MKFS_EXT4, "-q", "-F", str(image))
    assert read_path(image) is None


@pytest.mark.skipif(MKFS_FAT is None, reason="mkfs.fat not installed")
def test_real_fat_image(tmp_path: Path) -> None:
    assert MKFS_FAT is not None
    image = make_image(tmp_path / "fat.img", 8 * MiB)
    run(MKFS_FAT, str(image))
    assert read_path(image) is None


@pytest.mark.parametrize("seed", range(40))
def test_random_bytes(seed: int) -> None:
    rng = random.Random(seed)
    img = Img(1 * MiB)
    img.write(0, rng.randbytes(64 * KiB))
    img.write(img.size - 64 * KiB, rng.randbytes(64 * KiB))
    if seed % 4 == 1:
        img.write(510, b"\x55\xaa")
    elif seed % 4 == 2:
        img.write(446 + 4, b"\xee")
        img.write(510, b"\x55\xaa")
        img.write(512, b"EFI PART")
    elif seed % 4 == 3:
        img.write(446, bytes([0x00, 1, 1, 0, 0x05, 1, 1, 0]) + struct.pack("<II", 1, 2000))
        img.write(462, bytes(48))
        img.write(510, b"\x55\xaa")
    try:
        assert_sane(read_img(img), img.size)
    except PartitionTableError:
        pass


# --- API behaviour ---------------------------------------------------------------


def test_fd_offset_untouched_and_fd_left_open() -> None:
    with gpt_by_hand().fd() as fd:
        os.lseek(fd, 12345, os.SEEK_SET)
        assert read_table(fd, 4 * MiB) == gpt_expected()
        assert os.lseek(fd, 0, os.SEEK_CUR) == 12345
        os.fstat(fd)  # still open


def test_bad_sector_size_argument() -> None:
    with gpt_by_hand().fd() as fd, pytest.raises(ValueError, match="sector_size"):
        read_table(fd, 4 * MiB, 520)


def test_value_objects() -> None:
    table = gpt_expected()
    p = table.partitions[0]
    assert p == Partition(1, MiB, MiB, LINUX, part_uuid(1), "root")
    assert p != Partition(1, MiB, MiB, LINUX, part_uuid(1), "root", True)
    assert p != fields(p)
    assert hash(p) == hash(Partition(*fields(p)))  # type: ignore[arg-type]
    assert pickle.loads(pickle.dumps(table)) == table
    noted = PartitionTable("gpt", 512, DISK_GUID, table.partitions, ("a note",))
    assert noted != table and noted.notes == ("a note",) and table.notes == ()
    assert pickle.loads(pickle.dumps(noted)) == noted
    assert repr(noted).endswith("notes=('a note',))")
    assert repr(p).startswith("Partition(number=1, start=1048576, size=1048576, type=")
    assert "PartitionTable(scheme='gpt'" in repr(table)
    with pytest.raises(AttributeError):
        setattr(p, "size", 0)  # noqa: B010
    with pytest.raises(AttributeError):
        setattr(table, "partitions", ())  # noqa: B010
    with pytest.raises(AttributeError):
        setattr(p, "extra", 1)  # noqa: B010
    with pytest.raises(AttributeError):
        delattr(p, "label")
    match p:
        case Partition(number, start, size):
            assert (number, start, size) == (1, MiB, MiB)


# --- property-based: mutated tables -----------------------------------------------

# Values a mutated field is set to: boundaries of the layout (where the
# interesting bugs live), header constants, partition types, or anything.
U32_VALUES = [
    0,
    1,
    2,
    7,
    32,
    91,
    92,
    127,
    128,
    136,
    512,
    4096,
    16384,
    16385,
    2**31,
    2**32 - 1,
]
WILD_VALUES = [2**32 - 1, 2**32, 2**63, 2**64 - 1, 0x05, 0x0F, 0x80, 0x85, 0xEE]


def boundary_lbas(ss: int, size: int = 4 * MiB) -> list[int]:
    last = size // ss - 1
    array_lbas = -(-128 * 128 // ss)
    edges = [
        0,
        1,
        2,
        2 + array_lbas,
        last - 1 - array_lbas,
        last - array_lbas,
        last,
        last + 1,
    ]
    for _, start, length, _, _ in GPT_LAYOUT:
        edges += [start // ss, (start + length) // ss - 1]
    return sorted({e + d for e in edges for d in (-1, 0, 1) if e + d >= 0})


MBR_LBAS = sorted(
    {v + d for v in (0, 1, 2048, 4096, 6144, 8192, 10240, 12288, 14336, 16384) for d in (-1, 0, 1)}
    | {1024, 2047, 3072}
)


@functools.cache
def gpt_base(ss: int) -> Img:
    return gpt_by_hand(ss=ss)


def gpt_targets(ss: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Byte regions to flip and (offset, width) fields to set, in both copies."""
    last = 4 * MiB // ss - 1
    array_lbas = -(-128 * 128 // ss)
    regions = [(446, 66)]
    fields_ = [(450, 1), (454, 4), (458, 4), (510, 1)]
    for header, array in ((1, 2), (last, last - array_lbas)):
        regions += [(header * ss, 92), (array * ss, 4 * 128)]
        fields_ += [
            (header * ss + off, width)
            for off, width in (
                (12, 4),
                (24, 8),
                (32, 8),
                (40, 8),
                (48, 8),
                (72, 8),
                (80, 4),
                (84, 4),
            )
        ]
        for index in range(4):
            entry = array * ss + index * 128
            fields_ += [(entry, 1), (entry + 32, 8), (entry + 40, 8)]
    return regions, fields_


def mbr_targets() -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    regions = [(446, 66)] + [(ebr * 512 + 446, 34) for ebr in EBRS]
    fields_ = []
    for base, slots in [(0, 4)] + [(ebr * 512, 2) for ebr in EBRS]:
        for slot in range(slots):
            entry = base + 446 + 16 * slot
            fields_ += [(entry, 1), (entry + 4, 1), (entry + 8, 4), (entry + 12, 4)]
    return regions, fields_


Change = tuple[int, int, int]  # offset, width in bytes, value


def mutations(
    targets: tuple[list[tuple[int, int]], list[tuple[int, int]]], lbas: list[int]
) -> st.SearchStrategy[list[Change]]:
    regions, fields_ = targets
    flip = st.tuples(st.sampled_from(regions), st.integers(0, 1 << 16), st.integers(0, 255)).map(
        lambda t: (t[0][0] + t[1] % t[0][1], 1, t[2])
    )
    values = (
        st.sampled_from(lbas)
        | st.sampled_from(lbas)
        | st.sampled_from(U32_VALUES + WILD_VALUES)
        | st.integers(0, 2**64 - 1)
    )
    assign = st.tuples(st.sampled_from(fields_), values).map(lambda t: (t[0][0], t[0][1], t[1]))
    return st.lists(st.one_of(flip, assign, assign), min_size=1, max_size=6)


@functools.cache
def gpt_mutations(ss: int) -> st.SearchStrategy[list[Change]]:
    return mutations(gpt_targets(ss), boundary_lbas(ss))


@functools.cache
def mbr_base() -> Img:
    return mbr_by_hand()


def mutate(img: Img, changes: list[Change]) -> Img:
    img = img.copy()
    for offset, width, value in changes:
        img.write(offset, (value % (1 << (8 * width))).to_bytes(width, "little"))
    return img


def check(img: Img, sector_size: int | None) -> None:
    try:
        table = read_img(img, sector_size)
    except PartitionTableError as exc:
        event(f"error: {re.sub(r'[0-9]+', 'N', exc.strerror or '')[:40]}")
        return
    event("no table" if table is None else f"{table.scheme} table")
    assert_sane(table, img.size)


@FUZZ
@given(
    ss=st.sampled_from([512, 4096]),
    data=st.data(),
    fix_crcs=st.booleans(),
    read_as=st.sampled_from([None, None, 512, 4096]),
)
def test_fuzz_gpt(ss: int, data: st.DataObject, fix_crcs: bool, read_as: int | None) -> None:
    img = mutate(gpt_base(ss), data.draw(gpt_mutations(ss)))
    if fix_crcs:  # let the mutation through the CRCs to the semantic checks
        fix_gpt_crcs(img, ss)
    check(img, read_as)


@FUZZ
@given(
    changes=mutations(mbr_targets(), MBR_LBAS),
    read_as=st.sampled_from([None, None, 4096]),
)
def test_fuzz_mbr(changes: list[Change], read_as: int | None) -> None:
    check(mutate(mbr_base(), changes), read_as)


_boot_flags = st.sampled_from([0x00, 0x80, 0x00, 0x80, 0x00, 0x80, 0x00, 0x01])
_types = st.sampled_from([0x00, 0x05, 0x0F, 0x83, 0x85]) | st.integers(0, 255)
_small_entry = st.tuples(_boot_flags, _types, st.integers(0, 600), st.integers(0, 600))
_wild_entry = st.tuples(
    _boot_flags,
    st.integers(0, 255),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**32 - 1),
)
mbr_entries = st.lists(
    st.just((0, 0, 0, 0)) | _small_entry | _small_entry | _wild_entry,
    min_size=4,
    max_size=4,
)


@FUZZ
@given(
    code=st.binary(min_size=446, max_size=446),
    entries=mbr_entries,
    ebr_entries=mbr_entries,
    rest=st.binary(max_size=1024),
)
def test_fuzz_first_sectors(
    code: bytes,
    entries: list[tuple[int, int, int, int]],
    ebr_entries: list[tuple[int, int, int, int]],
    rest: bytes,
) -> None:
    img = Img(1 * MiB)
    img.write(512, rest)
    img.write(0, code + mbr_sector(entries)[446:])
    for _, _, lba, _ in entries:  # wherever an extended partition may start
        if 0 < lba < 2048:
            img.write(lba * 512, mbr_sector(ebr_entries))
    check(img, None)
