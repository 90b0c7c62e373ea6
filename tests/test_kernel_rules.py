"""Partitions as the kernel's parsers read them, one rule per case, on sfdisk-made images.

Each case makes an image with sfdisk (and patches its bytes where sfdisk will
not write such a table), and states what the kernel's own parser would do
with it (``block/partitions/efi.c``, ``msdos.c`` and ``core.c``, read in
v6.18; this test kernel has no parsers, so ``sfdisk --json`` plus that
reading is the oracle): the partitions it registers (number, start, size in
bytes), or the reason it finds no table. Two tests run every case:

- ``read_table`` on the image file returns exactly that, with a note for
  each partition the kernel truncates or skips;
- ``attach(partscan=True)`` on a real device registers it (where BLKPG cannot
  do what the kernel's parser does, the documented ``blkpg_plan`` difference),
  logs each note as a warning on the ``loopdev`` logger, and for a table the
  kernel refuses raises ``PartitionTableError`` and leaves nothing bound.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from images import (
    KiB,
    MiB,
    Span,
    gpt_fix,
    kernel_spans,
    needs_sfdisk,
    read_at,
    set_gpt_entry,
    set_mbr_entry,
    sfdisk_4k,
    sfdisk_image,
    write_at,
)

import loopdev
from loopdev.errors import PartitionTableError
from loopdev.partitions import blkpg_plan, list_partitions
from loopdev.parttable import gpt_sector_size, read_table

pytestmark = needs_sfdisk


class Expect(NamedTuple):
    """What the kernel would do with ``path`` on a device of ``block_size``."""

    path: Path
    block_size: int
    kernel: list[Span] | None  # registered by the kernel's parser; None: no table
    error: str | None = None  # the table is refused: PartitionTableError matching this
    notes: tuple[str, ...] = ()  # patterns, one per PartitionTable.notes entry
    planned: list[Span] | None = None  # what BLKPG registers, where it differs
    plan_notes: tuple[str, ...] = ()  # patterns, one per note of blkpg_plan()


# --- making and patching images ----------------------------------------------------


def ebr_entries(path: Path, sector: int) -> list[tuple[int, int, int, int]]:
    raw = read_at(path, sector * 512, 512)
    return [struct.unpack_from("<B3xB3xII", raw, 446 + 16 * i) for i in range(4)]


def gpt_entry(path: Path, index: int, first: int | None = None, last: int | None = None) -> None:
    """Change entry ``index`` in both entry arrays of a 512-byte GPT, CRCs fixed."""
    if first is not None:
        set_gpt_entry(path, index, 32, struct.pack("<Q", first))
    if last is not None:
        set_gpt_entry(path, index, 40, struct.pack("<Q", last))


# --- the cases -----------------------------------------------------------------------

RULES: dict[str, Callable[[Path], Expect]] = {}
NEEDS_DEVICE = {"gpt-4096", "gpt-4096-on-512", "dos-4096", "dos-4096-unaligned-end"}


def rule(name: str) -> Callable[[Callable[[Path], Expect]], Callable[[Path], Expect]]:
    def register(build: Callable[[Path], Expect]) -> Callable[[Path], Expect]:
        RULES[name] = build
        return build

    return register


GPT = "label: gpt\n{0}1 : size=4M, name=one\n{0}2 : size=4M, name=two\n{0}4 : size=2M, type=S\n"
# 1: LBAs 2048..10239, 2: 10240..18431, 4: 18432..22527; last LBA 65535.


def gpt(tmp: Path, size: int = 32 * MiB) -> tuple[Path, dict[str, Any]]:
    path = tmp / "gpt.img"
    return path, sfdisk_image(path, GPT.format(path), size)


@rule("gpt-numbering")
def _(tmp: Path) -> Expect:
    # efi.c efi_partition(): partition number = entry index + 1; unused
    # entries (zero type GUID) are skipped and their numbers not reused.
    path, table = gpt(tmp)
    return Expect(path, 512, kernel_spans(table))


@rule("gpt-no-protective-mbr")
def _(tmp: Path) -> Expect:
    # efi.c is_pmbr_valid(): no 0x55AA, no GPT (unless booted with "gpt").
    path, _ = gpt(tmp)
    write_at(path, 0, bytes(512))
    return Expect(path, 512, None, error="no protective MBR")


@rule("gpt-protective-entry-not-at-lba-1")
def _(tmp: Path) -> Expect:
    # efi.c pmbr_part_valid(): the 0xee entry must start at LBA 1; msdos.c
    # then ignores the MBR because of its 0xee entry.
    path, _ = gpt(tmp)
    set_mbr_entry(path, 0, 0, (0, 0xEE, 2, 65534))
    return Expect(path, 512, None, error="does not start at LBA 1")


@rule("gpt-hybrid-mbr")
def _(tmp: Path) -> Expect:
    # efi.c is_pmbr_valid(): other entries beside 0xee make a hybrid MBR, still GPT.
    path, table = gpt(tmp)
    set_mbr_entry(path, 0, 1, (0x80, 0x0C, 2048, 8192))
    return Expect(path, 512, kernel_spans(table))


@rule("gpt-bad-primary-good-backup")
def _(tmp: Path) -> Expect:
    # efi.c find_valid_gpt(): the backup is used only with the "gpt" boot option.
    path, _ = gpt(tmp)
    write_at(path, 512 + 16, b"\xff\xff\xff\xff")  # header CRC
    return Expect(path, 512, None, error=r"header CRC32 .* backup header at LBA 65535 is intact")


@rule("gpt-good-primary-bad-backup")
def _(tmp: Path) -> Expect:
    # find_valid_gpt(): a good primary is used whatever the backup says.
    path, table = gpt(tmp)
    write_at(path, 32 * MiB - 512 + 16, b"\xff\xff\xff\xff")
    return Expect(path, 512, kernel_spans(table))


@rule("gpt-my-lba")
def _(tmp: Path) -> Expect:
    # efi.c is_gpt_valid(): my_lba must be the LBA the header was read from.
    path, _ = gpt(tmp)
    gpt_fix(path, 1, my_lba=2)
    return Expect(path, 512, None, error="header claims to be at LBA 2")


@rule("gpt-shrunk-image")
def _(tmp: Path) -> Expect:
    # is_gpt_valid(): last_usable_lba past the last LBA of the disk.
    path, _ = gpt(tmp)
    os.truncate(path, 24 * MiB)
    return Expect(path, 512, None, error="last usable LBA 65502 is past the last LBA 49151")


@rule("gpt-grown-image")
def _(tmp: Path) -> Expect:
    # The backup is no longer at the end: only compare_gpts() notices (a log line).
    path, table = gpt(tmp)
    os.truncate(path, 48 * MiB)
    return Expect(path, 512, kernel_spans(table))


@rule("gpt-entry-size-256")
def _(tmp: Path) -> Expect:
    # is_gpt_valid(): sizeof_partition_entry must be sizeof(gpt_entry), 128.
    path, _ = gpt(tmp)
    gpt_fix(path, 1, entry_size=256)
    return Expect(path, 512, None, error="entry size is 256; the kernel accepts only 128")


@rule("gpt-no-entries")
def _(tmp: Path) -> Expect:
    # efi.c alloc_read_gpt_entries(): an empty array is no array.
    path, _ = gpt(tmp)
    gpt_fix(path, 1, count=0)
    return Expect(path, 512, None, error="0 partition entries")


@rule("gpt-huge-entry-array")
def _(tmp: Path) -> Expect:
    # is_gpt_valid(): the array must fit KMALLOC_MAX_SIZE (4 MiB on x86-64).
    path, _ = gpt(tmp)
    gpt_fix(path, 1, count=40000)
    return Expect(path, 512, None, error="40000 entries of 128 bytes exceed the kernel's 4 MiB")


@rule("gpt-entry-array-past-end")
def _(tmp: Path) -> Expect:
    # efi.c read_lba(): a short read of the entry array fails the header.
    path, _ = gpt(tmp)
    gpt_fix(path, 1, entries_lba=65535)
    return Expect(path, 512, None, error="entry array at LBA 65535 .* runs past the end")


@rule("gpt-partition-outside-usable-lbas")
def _(tmp: Path) -> Expect:
    # efi.c is_pte_valid() checks entries against the disk, not the usable LBAs.
    path, table = gpt(tmp)
    gpt_entry(path, 0, first=40)
    kernel = [(1, 40 * 512, (10240 - 40) * 512), *kernel_spans(table)[1:]]
    return Expect(path, 512, kernel)


@rule("gpt-partition-past-last-lba")
def _(tmp: Path) -> Expect:
    # is_pte_valid(): an entry ending past the last LBA is skipped.
    path, table = gpt(tmp)
    gpt_entry(path, 1, last=70000)
    kernel = [s for s in kernel_spans(table) if s[0] != 2]
    return Expect(path, 512, kernel, notes=("GPT partition 2 .* ends past the last LBA 65535",))


@rule("gpt-partition-ends-before-it-starts")
def _(tmp: Path) -> Expect:
    path, table = gpt(tmp)
    gpt_entry(path, 1, last=10000)
    kernel = [s for s in kernel_spans(table) if s[0] != 2]
    return Expect(path, 512, kernel, notes=("GPT partition 2 .* ends at LBA 10000, before",))


@rule("gpt-overlap")
def _(tmp: Path) -> Expect:
    # efi.c checks no overlaps; BLKPG refuses them (EBUSY): partition 2 is left out.
    path, table = gpt(tmp)
    gpt_entry(path, 1, first=8000)
    p1, _, p4 = kernel_spans(table)
    return Expect(
        path,
        512,
        [p1, (2, 8000 * 512, (18432 - 8000) * 512), p4],
        planned=[p1, p4],
        plan_notes=("partition 2 .* overlaps partition 1; the kernel registers both",),
    )


@rule("gpt-300-partitions")
def _(tmp: Path) -> Expect:
    # Bug 3: core.c allocate_partitions() has DISK_MAX_PARTS (256) slots and
    # efi.c stops at i < limit - 1: partitions 1..255 are registered, the
    # rest skipped; never a failed attach.
    path = tmp / "gpt300.img"
    script = "label: gpt\ntable-length: 300\n" + "".join(
        f"start={2048 + 64 * i}, size=64\n" for i in range(300)
    )
    table = sfdisk_image(path, script)
    assert len(table["partitions"]) == 300
    return Expect(
        path,
        512,
        kernel_spans(table)[:255],
        notes=(r"45 GPT partitions numbered above 255 \(256, 257, \.\.\., 300\) are not",),
    )


@rule("gpt-4096")
def _(tmp: Path) -> Expect:
    path = tmp / "gpt4k.img"
    table = sfdisk_4k(path, GPT.format(path))
    assert table["sectorsize"] == 4096
    return Expect(path, 4096, kernel_spans(table))


@rule("gpt-4096-on-512")
def _(tmp: Path) -> Expect:
    # Bug 4: efi.c reads LBA 1 at byte 512 on a 512-byte device: no GPT there.
    path = tmp / "gpt4k.img"
    sfdisk_4k(path, GPT.format(path))
    return Expect(
        path,
        512,
        None,
        error=r"written for 4096-byte sectors: attach with block_size=4096 "
        r"\(compat: blocksize=4096; CLI: --sector-size 4096\)",
    )


DOS = (
    "label: dos\n{0}1 : start=2048, size=4M, type=83\n{0}3 : size=4M, type=83\n"
    "{0}4 : size=12M, type=5\n{0}5 : start=24577, size=3M, type=83\n{0}6 : size=2M, type=7\n"
)
# 1: 2048+8192, 3: 10240+8192, 4 (extended): 18432+24576, EBRs at 18432 and
# 30720 (by sfdisk), 5: 24577+6143, 6: 32768+4096 sectors.
EBR5, EBR6 = 18432, 30720


def dos(tmp: Path, script: str = DOS, size: int = 32 * MiB) -> tuple[Path, dict[str, Any]]:
    path = tmp / "dos.img"
    table = sfdisk_image(path, script.format(path), size)
    return path, table


@rule("dos-numbering")
def _(tmp: Path) -> Expect:
    # msdos.c: primaries keep their slot number (empty slot 2 is not reused),
    # logicals count from 5, the extended partition is a 1 KiB stub.
    path, table = dos(tmp)
    assert ebr_entries(path, EBR6)[0][1] == 0x07  # sfdisk put the second EBR there
    kernel = kernel_spans(table)
    assert [s[0] for s in kernel] == [1, 3, 4, 5, 6] and kernel[2][2] == 1024
    return Expect(path, 512, kernel)


@rule("dos-zero-size-entry")
def _(tmp: Path) -> Expect:
    # msdos.c: an entry of 0 sectors is skipped whatever its type.
    path, table = dos(tmp)
    set_mbr_entry(path, 0, 1, (0, 0x83, 5000, 0))
    return Expect(path, 512, kernel_spans(table))


@rule("dos-logical-next-to-its-ebr")
def _(tmp: Path) -> Expect:
    # sfdisk puts logical 5 one sector after its EBR: the kernel's 1 KiB stub
    # overlaps it; BLKPG cannot add both, so the stub is shortened to 512.
    path = tmp / "dos.img"
    script = (
        f"label: dos\n{path}1 : start=2048, size=4M, type=83\n{path}2 : size=12M, type=5\n"
        f"{path}5 : start=10241, size=2M, type=83\n{path}6 : size=2M\n"
    )
    table = sfdisk_image(path, script)
    kernel = kernel_spans(table)
    assert kernel[1] == (2, 10240 * 512, 1024) and kernel[2][1] == 10241 * 512
    planned = [kernel[0], (2, 10240 * 512, 512), *kernel[2:]]
    notes = ("extended partition 2 is registered with 512 bytes instead of 1024",)
    return Expect(path, 512, kernel, planned=planned, plan_notes=notes)


SHRINK = "label: dos\n{0}1 : start=2048, size=4M\n{0}2 : size=8M\n{0}3 : size=12M\n"
# 1: 2048+8192, 2: 10240+16384, 3: 26624+24576 sectors.


@rule("dos-shrunk-image")
def _(tmp: Path) -> Expect:
    # core.c blk_add_partition(): a partition running past the end of the
    # disk is truncated to it (with a warning), not refused.
    path, table = dos(tmp, SHRINK)
    os.truncate(path, 20 * MiB)
    p1, p2, _ = kernel_spans(table)
    return Expect(
        path,
        512,
        [p1, p2, (3, 26624 * 512, (40960 - 26624) * 512)],
        notes=(r"MBR partition 3 .* runs past the end .* truncated to 7340032 bytes",),
    )


@rule("dos-partition-starts-past-end")
def _(tmp: Path) -> Expect:
    # blk_add_partition(): a partition starting past the end is skipped.
    path, table = dos(tmp, SHRINK)
    os.truncate(path, 12 * MiB)
    return Expect(
        path,
        512,
        [kernel_spans(table)[0], (2, 10240 * 512, (24576 - 10240) * 512)],
        notes=("MBR partition 2 .* truncated", "MBR partition 3 is not registered: it starts"),
    )


@rule("dos-4096")
def _(tmp: Path) -> Expect:
    # msdos.c scales LBAs by the logical block size; the stub is one block.
    path = tmp / "dos4k.img"
    script = (
        f"label: dos\n{path}1 : start=256, size=4M\n{path}3 : size=4M\n"
        f"{path}4 : size=12M, type=5\n{path}5 : size=3M\n{path}6 : size=2M, type=7\n"
    )
    table = sfdisk_4k(path, script)
    kernel = kernel_spans(table)
    assert kernel[2][2] == 4096
    return Expect(path, 4096, kernel)


@rule("dos-4096-unaligned-end")
def _(tmp: Path) -> Expect:
    # The kernel truncates to the capacity in 512-byte sectors, which need not
    # be whole 4096-byte blocks; BLKPG takes whole blocks: cut to 4096.
    path = tmp / "dos4k.img"
    script = f"label: dos\n{path}1 : start=256, size=8M\n{path}2 : size=8M\n"
    table = sfdisk_4k(path, script)
    os.truncate(path, 12 * MiB + 512)
    p1, _ = kernel_spans(table)
    return Expect(
        path,
        4096,
        [p1, (2, 9 * MiB, 3 * MiB + 512)],
        notes=("MBR partition 2 .* truncated to 3146240 bytes",),
        planned=[p1, (2, 9 * MiB, 3 * MiB)],
        plan_notes=("partition 2 is registered with 3145728 bytes instead of 3146240",),
    )


@rule("dos-overlap")
def _(tmp: Path) -> Expect:
    # msdos.c checks no overlaps; BLKPG refuses them.
    path, table = dos(tmp, SHRINK)
    set_mbr_entry(path, 0, 1, (0, 0x83, 8000, 16384))
    p1, _, p3 = kernel_spans(table)
    return Expect(
        path,
        512,
        [p1, (2, 8000 * 512, 16384 * 512), p3],
        planned=[p1, p3],
        plan_notes=("partition 2 .* overlaps partition 1; the kernel registers both",),
    )


@rule("dos-partition-at-sector-0")
def _(tmp: Path) -> Expect:
    path, table = dos(tmp, SHRINK)
    set_mbr_entry(path, 0, 0, (0, 0x83, 0, 2048))
    return Expect(path, 512, [(1, 0, MiB), *kernel_spans(table)[1:]])


@rule("dos-logical-outside-extended")
def _(tmp: Path) -> Expect:
    # msdos.c parse_extended(): slots 1 and 2 of an EBR are taken as they are.
    path, table = dos(tmp)
    set_mbr_entry(path, EBR5, 0, (0, 0x83, 30000, 100))
    kernel = [s if s[0] != 5 else (5, (EBR5 + 30000) * 512, 100 * 512) for s in kernel_spans(table)]
    return Expect(path, 512, kernel)


@rule("dos-link-leaves-extended")
def _(tmp: Path) -> Expect:
    # parse_extended() follows any link; here to zeros: the chain ends.
    path, table = dos(tmp)
    link = ebr_entries(path, EBR5)[1]
    set_mbr_entry(path, EBR5, 1, (link[0], link[1], 40000, 1))
    return Expect(path, 512, [s for s in kernel_spans(table) if s[0] != 6])


@rule("dos-ebr-without-signature")
def _(tmp: Path) -> Expect:
    # parse_extended(): an EBR without 0x55AA ends the chain.
    path, table = dos(tmp)
    write_at(path, EBR6 * 512 + 510, b"\0\0")
    return Expect(
        path,
        512,
        [s for s in kernel_spans(table) if s[0] != 6],
        notes=(f"EBR at byte {EBR6 * 512} .* no 0x55AA signature",),
    )


@rule("dos-ebr-loop")
def _(tmp: Path) -> Expect:
    # parse_extended() has no loop check: a link back to the first EBR makes
    # the kernel register 5 and 6 again as 7, 8, ... up to 255. BLKPG keeps
    # the first copy of each.
    path, table = dos(tmp)
    set_mbr_entry(path, EBR6, 1, (0, 0x05, 0, 1))
    base = kernel_spans(table)
    p5, p6 = base[3][1:], base[4][1:]
    again = [(n, *(p5 if n % 2 else p6)) for n in range(5, 256)]
    return Expect(
        path,
        512,
        [*base[:3], *again],
        notes=(f"loops back to byte {EBR5 * 512}", "after number 255 .* not registered"),
        planned=base,
        plan_notes=tuple(
            rf"partition {n} \(bytes .* overlaps partition {6 - n % 2};" for n in range(7, 256)
        ),
    )


@rule("dos-boot-code")
def _(tmp: Path) -> Expect:
    # msdos.c: a boot indicator other than 0x00/0x80 means no partition table.
    path, _ = dos(tmp)
    write_at(path, 446, b"\x41")
    return Expect(path, 512, None)


@rule("dos-gpt-entry-not-at-lba-1")
def _(tmp: Path) -> Expect:
    # msdos.c skips an MBR with a 0xee entry; efi.c refuses it (not at LBA 1).
    path, _ = dos(tmp)
    set_mbr_entry(path, 0, 1, (0, 0xEE, 5, 1))
    return Expect(path, 512, None, error="does not start at LBA 1")


# --- the tests -----------------------------------------------------------------------


def outline(table: Any) -> list[Span]:
    return [(p.number, p.start, p.size) for p in table.partitions]


def matches(patterns: tuple[str, ...], notes: list[str]) -> None:
    assert len(notes) == len(patterns), notes
    for pattern, note in zip(patterns, notes, strict=True):
        assert re.search(pattern, note), (pattern, note)


def build(name: str, tmp_path: Path, request: pytest.FixtureRequest) -> Expect:
    if name in NEEDS_DEVICE:  # sfdisk writes 4096-byte tables through a loop device
        request.getfixturevalue("devices")
    return RULES[name](tmp_path)


@pytest.mark.parametrize("name", RULES)
def test_read_table_follows_the_kernel(
    name: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    want = build(name, tmp_path, request)
    fd = os.open(want.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if want.error is not None:
            with pytest.raises(PartitionTableError, match=want.error) as info:
                read_table(fd, size, want.block_size, path=str(want.path))
            assert info.value.backing == str(want.path)
            return
        table = read_table(fd, size, want.block_size, path=str(want.path))
    finally:
        os.close(fd)
    if want.kernel is None:
        assert table is None
        return
    assert table is not None and table.sector_size == want.block_size
    assert outline(table) == want.kernel
    matches(want.notes, list(table.notes))
    plan, plan_notes = blkpg_plan(table, want.block_size)
    assert plan == (want.kernel if want.planned is None else want.planned)
    matches(want.plan_notes, plan_notes)


@pytest.mark.parametrize("name", RULES)
def test_attach_registers_what_the_kernel_would(
    name: str, tmp_path: Path, request: pytest.FixtureRequest, devices: None, caplog: Any
) -> None:
    want = build(name, tmp_path, request)
    caplog.set_level(logging.WARNING, logger="loopdev")
    if want.error is not None:
        with pytest.raises(PartitionTableError, match=want.error) as info:
            loopdev.attach(want.path, partscan=True, block_size=want.block_size)
        assert info.value.backing == str(want.path)
        assert (info.value.device or "").startswith("/dev/loop")
        from helpers import wait_unbound

        assert wait_unbound(str(tmp_path)) == []
        return
    with loopdev.attach(want.path, partscan=True, block_size=want.block_size) as dev:
        got = [(p.number, p.start, p.size) for p in list_partitions(dev.name)]
        name_ = dev.name
    expected = want.kernel if want.planned is None else want.planned
    assert got == (expected or [])
    warnings = [r.getMessage() for r in caplog.records if r.name == "loopdev"]
    assert all(w.startswith(f"/dev/{name_} ({want.path}): ") for w in warnings)
    matches(want.notes + want.plan_notes, [w.split("): ", 1)[1] for w in warnings])


# --- bug 4: the sector size a GPT was written for ------------------------------------


def test_gpt_sector_size_of_sfdisk_images(tmp_path: Path, devices: None) -> None:
    gpt512, _ = gpt(tmp_path)
    dos512, _ = dos(tmp_path)
    gpt4k = tmp_path / "gpt4k.img"
    sfdisk_4k(gpt4k, GPT.format(gpt4k))
    # Inside a bigger file, at an offset, as attach(offset=...) would see it.
    outer = tmp_path / "outer.img"
    with open(outer, "wb") as f:
        f.truncate(1 * MiB)
        f.seek(1 * MiB)
        f.write(read_at(gpt4k, 0, 64 * KiB))
    for path, offset, size, expected in [
        (gpt512, 0, 32 * MiB, 512),
        (gpt4k, 0, 32 * MiB, 4096),
        (dos512, 0, 32 * MiB, None),
        (outer, 1 * MiB, 32 * MiB, 4096),
        (outer, 0, 2 * MiB, None),
        (gpt4k, 0, 4096, None),  # LBA 1 not inside the size
        (gpt512, 0, 1023, None),
    ]:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            assert gpt_sector_size(fd, offset, size) == expected, (path, offset, size)
        finally:
            os.close(fd)
    # A header that fails its CRC is not taken for a GPT.
    write_at(gpt512, 512 + 16, b"\xff\xff\xff\xff")
    fd = os.open(gpt512, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert gpt_sector_size(fd, 0, 32 * MiB) is None
    finally:
        os.close(fd)
