"""Disk images for the tests: sparse files, partition tables by sfdisk and by hand.

- :func:`make_image`: an empty sparse file.
- By sfdisk (a test that needs it skips where it is missing): :func:`sfdisk`
  partitions a file or a device from a script and returns ``sfdisk --json``;
  :func:`sfdisk_image` does it on a new sparse file, :func:`sfdisk_4k` with
  4096-byte sectors, :func:`gpt_image` is the two-partition GPT most tests
  attach; :func:`kernel_spans` is sfdisk's table as the kernel registers it.
- By hand, byte for byte: :func:`mbr_entry`, :func:`mbr_sector`,
  :func:`gpt_header`, :data:`GPT_ENTRY`; patched in place, in a file or in
  an :class:`Img` (an image kept in memory): :func:`set_mbr_entry` (in a GPT's
  protective MBR: a hybrid MBR), :func:`gpt_fix` (header fields and CRCs),
  :func:`set_gpt_entry`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import uuid
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

KiB, MiB = 1 << 10, 1 << 20

_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
SFDISK = shutil.which("sfdisk", path=_TOOL_PATH)
FDISK = shutil.which("fdisk", path=_TOOL_PATH)
needs_sfdisk = pytest.mark.skipif(SFDISK is None, reason="sfdisk (util-linux) not installed")

Span = tuple[int, int, int]  # partition number, start and size in bytes


def make_image(path: Path, size: int = 4 * MiB) -> Path:
    """A sparse file of ``size`` bytes."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


# --- by sfdisk ----------------------------------------------------------------------------


def run(*argv: str, stdin: str = "") -> str:
    """``argv``'s stdout (C locale); its stderr in the failure when it fails."""
    env = {**os.environ, "LC_ALL": "C"}
    done = subprocess.run(argv, input=stdin, text=True, capture_output=True, env=env, check=False)
    assert done.returncode == 0, f"{argv}: {done.stderr}"
    return done.stdout


def sfdisk(target: Path | str, script: str, *options: str) -> dict[str, Any]:
    """Partition ``target`` (a file or a device) by an sfdisk script; ``sfdisk --json``."""
    if SFDISK is None:
        pytest.skip("sfdisk (util-linux) not installed")
    run(SFDISK, "--quiet", "--no-reread", "--no-tell-kernel", *options, str(target), stdin=script)
    return sfdisk_json(target, *options)


def sfdisk_json(target: Path | str, *options: str) -> dict[str, Any]:
    assert SFDISK is not None
    table: dict[str, Any] = json.loads(run(SFDISK, *options, "--json", str(target)))
    return table["partitiontable"]  # type: ignore[no-any-return]


def sfdisk_image(path: Path, script: str, size: int = 32 * MiB) -> dict[str, Any]:
    """A ``size``-byte sparse image partitioned by sfdisk; ``sfdisk --json``."""
    return sfdisk(make_image(path, size), script)


def sfdisk_4k(path: Path, script: str, size: int = 32 * MiB) -> dict[str, Any]:
    """The same with 4096-byte sectors: sfdisk 2.38 has no --sector-size, so it
    partitions the image through a loop device with 4096-byte blocks. Nodes are
    named as on the image (``IMAGE1``), as for :func:`sfdisk_image`."""
    import loopdev

    if SFDISK is None:
        pytest.skip("sfdisk (util-linux) not installed")
    with loopdev.attach(make_image(path, size), block_size=4096) as dev:
        table = sfdisk(dev.path, script)
    table["device"] = str(path)
    for part in table["partitions"]:
        part["node"] = str(path) + part["node"].removeprefix(dev.path).lstrip("p")
    return table


# Three named partitions (sfdisk places them from 1 MiB on): 4 MiB, 8 MiB and a
# 2 MiB swap partition.
GPT3 = "label: gpt\nsize=4M, type=L, name=root\nsize=8M, type=L, name=data\nsize=2M, type=S\n"

# p1 at 1 MiB (6 MiB), p2 at 7 MiB (4 MiB), in 512-byte sectors.
GPT_PARTS = ((1 * MiB, 6 * MiB), (7 * MiB, 4 * MiB))


def gpt_image(
    path: Path, size: int = 16 * MiB, parts: tuple[tuple[int, int], ...] = GPT_PARTS
) -> Path:
    """A sparse image with a GPT of ``parts`` ((start, length) in bytes) made by sfdisk."""
    script = "label: gpt\n" + "".join(
        f"start={start // 512}, size={length // 512}\n" for start, length in parts
    )
    sfdisk_image(path, script, size)
    return path


EXTENDED = ("5", "f", "85")  # sfdisk's names of the MBR types of extended partitions


def kernel_spans(table: dict[str, Any]) -> list[Span]:
    """sfdisk's partitions as the kernel registers them, by number: an extended
    partition is a stub of one logical block but at least 1 KiB (msdos.c
    msdos_partition())."""
    ss = table.get("sectorsize", 512)
    spans = []
    for part in table["partitions"]:
        number = int(re.sub(r".*\D", "", part["node"]))
        start, size = part["start"] * ss, part["size"] * ss
        if table["label"] == "dos" and part["type"] in EXTENDED:
            size = min(size, max(ss, 1 * KiB))
        spans.append((number, start, size))
    return sorted(spans)


# --- by hand ------------------------------------------------------------------------------

MBR_ENTRY = struct.Struct("<B3sB3sII")  # flag, CHS start, type, CHS end, first LBA, sectors
GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
GPT_ENTRY = struct.Struct("<16s16sQQQ72s")  # type, GUID, first LBA, last LBA, flags, name


def mbr_entry(boot: int, ptype: int, lba: int, count: int) -> bytes:
    """One 16-byte MBR/EBR entry (CHS fields as "beyond 1024 cylinders")."""
    return MBR_ENTRY.pack(
        boot, b"\xfe\xff\xff", ptype, b"\xfe\xff\xff", lba & 0xFFFFFFFF, count & 0xFFFFFFFF
    )


def mbr_sector(entries: Sequence[tuple[int, int, int, int] | None], disk_id: int = 0) -> bytes:
    """An MBR/EBR sector from (boot flag, type, first LBA, sectors) entries; ``None`` or
    an all-zero entry leaves its slot empty."""
    sector = bytearray(512)
    struct.pack_into("<I", sector, 440, disk_id)
    for slot, entry in enumerate(entries):
        if entry is not None and (entry[1] or entry[3]):
            sector[446 + 16 * slot : 462 + 16 * slot] = mbr_entry(*entry)
    sector[510:512] = b"\x55\xaa"
    return bytes(sector)


# GPT_HEADER's fields by name (efi.h gpt_header).
GPT_FIELDS = {
    "signature": 0,
    "revision": 1,
    "header_size": 2,
    "header_crc": 3,
    "my_lba": 5,
    "alternate": 6,
    "first_usable": 7,
    "last_usable": 8,
    "disk_guid": 9,
    "entries_lba": 10,
    "count": 11,
    "entry_size": 12,
    "entries_crc": 13,
}


def _seal(raw: bytearray, header_size: int, ss: int) -> bytes:
    """``raw`` with its header CRC32 computed over ``header_size`` bytes, as efi.c does
    (where that size is one efi.c accepts)."""
    if 92 <= header_size <= ss:
        raw[16:20] = bytes(4)
        struct.pack_into("<I", raw, 16, zlib.crc32(raw[:header_size]))
    return bytes(raw)


def gpt_header(fields: Sequence[object], ss: int = 512, fix_crc: bool = True) -> bytes:
    """A GPT header from its ``GPT_HEADER`` fields, padded to its size (at most a sector);
    with ``fix_crc`` its CRC32 is right."""
    header_size = fields[2] if isinstance(fields[2], int) else 92
    raw = bytearray(GPT_HEADER.pack(*fields)).ljust(max(92, min(header_size, ss)), b"\0")
    return _seal(raw, header_size, ss) if fix_crc else bytes(raw)


def size_of(disk: Img | Path) -> int:
    return disk.size if isinstance(disk, Img) else os.path.getsize(disk)


def read_at(disk: Img | Path, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``; zeros past the end."""
    if isinstance(disk, Img):
        return disk.read(offset, length)
    with open(disk, "rb") as f:
        f.seek(offset)
        return f.read(length).ljust(length, b"\0")


def write_at(disk: Img | Path, offset: int, data: bytes) -> None:
    if isinstance(disk, Img):
        disk.write(offset, data)
        return
    with open(disk, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_mbr_entry(
    disk: Img | Path, sector: int, slot: int, entry: tuple[int, int, int, int]
) -> None:
    """Set entry ``slot`` (0-3) of the MBR/EBR at 512-byte ``sector``: flag, type, LBA, count.
    In slots 1-3 of a GPT's protective MBR this makes a hybrid MBR."""
    write_at(disk, sector * 512 + 446 + 16 * slot, mbr_entry(*entry))


def gpt_fix(disk: Img | Path, lba: int, ss: int = 512, **fields: int) -> None:
    """Set ``fields`` (by their ``GPT_FIELDS`` names) of the GPT header at ``lba``, then
    recompute its entries CRC and its own; a header that is not one (no signature, a
    size efi.c refuses) keeps its CRC."""
    raw = bytearray(read_at(disk, lba * ss, ss))
    header = list(GPT_HEADER.unpack_from(raw))
    for name, value in fields.items():
        header[GPT_FIELDS[name]] = value
    if header[0] != b"EFI PART":
        return
    length = header[11] * header[12]
    if length <= 4 * MiB and header[10] * ss + length <= size_of(disk):
        header[13] = zlib.crc32(read_at(disk, header[10] * ss, length))
    GPT_HEADER.pack_into(raw, 0, *header)
    write_at(disk, lba * ss, _seal(raw, header[2], ss)[: max(92, min(header[2], ss))])


def gpt_lbas(disk: Img | Path, ss: int = 512) -> tuple[int, int]:
    """Where the primary and the backup GPT header are: LBA 1 and the last LBA."""
    return 1, size_of(disk) // ss - 1


def fix_gpt_crcs(disk: Img | Path, ss: int = 512) -> None:
    """Recompute the CRCs of both GPT headers, so that only the semantic checks object."""
    for lba in gpt_lbas(disk, ss):
        gpt_fix(disk, lba, ss)


def set_gpt_entry(disk: Img | Path, index: int, offset: int, value: bytes, ss: int = 512) -> None:
    """Patch entry ``index`` at ``offset`` in both entry arrays, then fix both headers."""
    for lba in gpt_lbas(disk, ss):
        array_lba = struct.unpack("<Q", read_at(disk, lba * ss + 72, 8))[0]
        write_at(disk, array_lba * ss + index * GPT_ENTRY.size + offset, value)
        gpt_fix(disk, lba, ss)


class Img:
    """A sparse disk image kept in memory as 512-byte sectors (later writes win);
    materialised as a memfd or a file."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sectors: dict[int, bytearray] = {}

    def copy(self) -> Img:
        new = Img(self.size)
        new.sectors = {index: bytearray(data) for index, data in self.sectors.items()}
        return new

    def write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            index, within = divmod(offset + pos, 512)
            n = min(512 - within, len(data) - pos)
            sector = self.sectors.setdefault(index, bytearray(512))
            sector[within : within + n] = data[pos : pos + n]
            pos += n

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            index, within = divmod(offset + len(out), 512)
            n = min(512 - within, length - len(out))
            sector = self.sectors.get(index)
            out += sector[within : within + n] if sector is not None else bytes(n)
        return bytes(out)

    def _within(self) -> Iterator[tuple[int, bytes]]:
        for index, data in sorted(self.sectors.items()):
            if 0 <= index * 512 < self.size:
                yield index * 512, bytes(data[: self.size - index * 512])

    @contextlib.contextmanager
    def fd(self) -> Iterator[int]:
        fd = os.memfd_create("loopdev-test-image", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, self.size)
            for offset, data in self._within():
                os.pwrite(fd, data, offset)
            yield fd
        finally:
            os.close(fd)

    def save(self, path: Path) -> Path:
        with open(path, "wb") as f:
            f.truncate(self.size)
            for offset, data in self._within():
                f.seek(offset)
                f.write(data)
        return path


# --- whole tables by hand -----------------------------------------------------------------

LINUX = "0fc63daf-8483-4772-8e79-3d69d8477de4"
SWAP = "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f"
ESP = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b"
DISK_GUID = "01234567-89ab-cdef-0011-223344556677"


def guid_le(text: str) -> bytes:
    return uuid.UUID(text).bytes_le


def part_uuid(number: int) -> str:
    return f"{number:08x}-aaaa-4bbb-8ccc-{number:012x}"


# (number, start byte, size in bytes, type, label)
GPT_LAYOUT = [
    (1, 1 * MiB, 1 * MiB, LINUX, "root"),
    (2, 2 * MiB, 1 * MiB, SWAP, "swap space"),
    (4, 3 * MiB, 512 * KiB, ESP, "ünïcødé ✓"),
]


def gpt_by_hand(
    size: int = 4 * MiB,
    ss: int = 512,
    layout: list[tuple[int, int, int, str, str]] = GPT_LAYOUT,
    count: int = 128,
) -> Img:
    """A GPT as UEFI lays it out: primary at LBA 1, backup at the last LBA; partition
    GUIDs by :func:`part_uuid`, disk GUID ``DISK_GUID``."""
    img = Img(size)
    last_lba = size // ss - 1
    array_lbas = -(-count * GPT_ENTRY.size // ss)
    first_usable, last_usable = 2 + array_lbas, last_lba - 1 - array_lbas
    array = bytearray(count * GPT_ENTRY.size)
    for number, start, length, ptype, label in layout:
        GPT_ENTRY.pack_into(
            array,
            (number - 1) * GPT_ENTRY.size,
            guid_le(ptype),
            guid_le(part_uuid(number)),
            start // ss,
            (start + length) // ss - 1,
            0,
            label.encode("utf-16-le"),
        )
    img.write(0, mbr_sector([(0, 0xEE, 1, min(last_lba, 0xFFFFFFFF))]))
    for my_lba, alternate, array_lba in ((1, last_lba, 2), (last_lba, 1, last_usable + 1)):
        img.write(array_lba * ss, bytes(array))
        fields = (b"EFI PART", 0x10000, 92, 0, 0, my_lba, alternate, first_usable, last_usable)
        fields += (guid_le(DISK_GUID), array_lba, count, GPT_ENTRY.size, zlib.crc32(array))
        img.write(my_lba * ss, gpt_header(fields, ss))
    return img


MBR_SIZE = 8 * MiB
EXT_LBA = 6144  # extended partition: LBAs 6144..14335
EBRS = (6144, 9216, 12288)


def mbr_by_hand() -> Img:
    """Two primaries, an extended partition and three chained logicals (disk id
    0xdeadbeef; the first primary and the last logical bootable)."""
    img = Img(MBR_SIZE)
    primaries = [(0x80, 0x83, 2048, 2048), (0, 0x82, 4096, 2048), (0, 0x0F, EXT_LBA, 8192)]
    img.write(0, mbr_sector(primaries, disk_id=0xDEADBEEF))
    # Data entries are relative to their EBR, links to the extended partition.
    img.write(EBRS[0] * 512, mbr_sector([(0, 0x83, 2048, 1024), (0, 0x05, 3072, 4096)]))
    img.write(EBRS[1] * 512, mbr_sector([(0, 0x07, 1024, 1024), (0, 0x05, 6144, 2048)]))
    img.write(EBRS[2] * 512, mbr_sector([(0x80, 0x83, 1, 2047)]))
    return img
