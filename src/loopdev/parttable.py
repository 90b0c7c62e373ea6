"""Read GPT and MBR partition tables as the Linux kernel's parsers read them.

Pure user space and read-only. :func:`read_table` returns the partitions that
the kernel's own parsers (``block/partitions/efi.c``, ``msdos.c``, driven by
``core.c``; read in v6.18) would register for a device: same numbers, starts
and sizes, including what the kernel truncates at the end of the device, and
without what it skips (``PartitionTable.notes`` says what and why). A table
the kernel would refuse raises :class:`~loopdev.errors.PartitionTableError`
saying why. :func:`gpt_sector_size` tells which sector size a GPT was
written for.
"""

from __future__ import annotations

import os
from codecs import utf_16_le_decode

from loopdev import _native
from loopdev._record import Record
from loopdev.errors import PartitionTableError

__all__ = ["Partition", "PartitionTable", "gpt_sector_size", "read_table"]


class Partition(Record):
    """One partition as the kernel would register it; offsets in bytes."""

    __slots__ = ()
    __match_args__ = ("number", "start", "size", "type", "uuid", "label", "bootable")

    number: int
    """Kernel partition number: GPT entry index + 1; MBR 1-4, logicals from 5."""
    start: int
    """Offset from the start of the disk, in bytes."""
    size: int
    """Length in bytes."""
    type: str
    """GPT type GUID (lower case) or MBR type byte as ``"0x83"``."""
    uuid: str | None
    """GPT partition GUID (lower case); ``None`` for MBR."""
    label: str | None
    """GPT partition name; ``None`` for MBR."""
    bootable: bool
    """MBR active flag (0x80); always ``False`` for GPT."""

    def __init__(
        self,
        number: int,
        start: int,
        size: int,
        type: str,
        uuid: str | None,
        label: str | None,
        bootable: bool = False,
    ) -> None:
        self._values = (number, start, size, type, uuid, label, bootable)


class PartitionTable(Record):
    """A whole table: scheme, logical sector size, disk id, partitions and notes."""

    __slots__ = ()
    __match_args__ = ("scheme", "sector_size", "disk_id", "partitions", "notes")

    scheme: str
    """``"gpt"`` or ``"dos"``, as sfdisk names them."""
    sector_size: int
    """The logical block size the table was read with."""
    disk_id: str | None
    """GPT disk GUID (lower case) or MBR disk signature as ``"0x%08x"``."""
    partitions: tuple[Partition, ...]
    """What the kernel would register, sorted by number (they may overlap)."""
    notes: tuple[str, ...]
    """Partitions of the table the kernel truncates or skips, and why."""

    def __init__(
        self,
        scheme: str,
        sector_size: int,
        disk_id: str | None,
        partitions: tuple[Partition, ...],
        notes: tuple[str, ...] = (),
    ) -> None:
        self._values = (scheme, sector_size, disk_id, partitions, notes)


_SECTOR_SIZES = (512, 1024, 2048, 4096)
# One read at offset 0 covers the MBR, both candidate GPT header positions and
# the usual 128-entry array behind either (bytes 1024-17407 with 512-byte
# sectors, 8192-24575 with 4096), so a typical GPT costs a single pread.
_PREFIX = 32768

# block/partitions/core.c allocate_partitions(): a scan has DISK_MAX_PARTS
# (256) slots and slot 0 is the whole disk, so partition numbers stop at 255
# (efi.c: ``i < state->limit - 1``; msdos.c: ``state->next == state->limit``).
# BLKPG refuses higher numbers too (add_partition(): EINVAL for >= 256).
_MAX_PARTNO = 255

_MBR_MAGIC = b"\x55\xaa"
_AIX_MAGIC = b"\xc9\xc2\xd4\xc1"  # EBCDIC "IBMA"
_PMBR_TYPE = 0xEE
_EXTENDED_TYPES = frozenset((0x05, 0x0F, 0x85))
# msdos.c parse_extended(): give up after 100 EBRs in a row without a logical.
_MAX_EMPTY_EBRS = 100

_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER_MIN = 92  # sizeof(gpt_header)
_GPT_ENTRY_SIZE = 128  # sizeof(gpt_entry), the only entry size efi.c accepts
# efi.c is_gpt_valid(): the entry array must fit one kmalloc(), KMALLOC_MAX_SIZE
# bytes: 4 MiB on x86-64 and other 4 KiB-page configurations.
_GPT_MAX_ARRAY = 4 << 20
_ZERO_GUID = bytes(16)
_EMPTY_NAME = bytes(72)
_ZERO_CRC = bytes(4)

# Fields read with int.from_bytes, not the struct module: importing struct
# cost 0.3 ms of `import loopdev` (issue 17). Every buffer read here is long
# enough: a sector, a header block or the entry array, checked by the callers.
_MbrEntry = tuple[int, int, int, int]


def _le(raw: bytes, start: int, end: int) -> int:
    return int.from_bytes(raw[start:end], "little")


def _mbr_entries(sector: bytes) -> list[_MbrEntry]:
    """The four partition entries of an MBR or EBR."""
    return [_mbr_entry(sector, 446 + 16 * i) for i in range(4)]


def _mbr_entry(sector: bytes, offset: int) -> _MbrEntry:
    """Boot flag, type, first LBA, number of sectors (the CHS fields are skipped)."""
    return (
        sector[offset],
        sector[offset + 4],
        _le(sector, offset + 8, offset + 12),
        _le(sector, offset + 12, offset + 16),
    )


def _gpt_entry(array: bytes, offset: int) -> tuple[int, int, bytes]:
    """First LBA, last LBA and name of the GPT entry at ``offset``."""
    return (
        _le(array, offset + 32, offset + 40),
        _le(array, offset + 40, offset + 48),
        array[offset + 56 : offset + 128],
    )


def _format_guid(raw: bytes, offset: int = 0) -> str:
    """The GUID at ``offset`` in canonical form (lower case)."""
    # Mixed-endian: the first three fields little-endian, the last eight bytes
    # as stored. Turned big-endian, one hex() gives the canonical digit order.
    b = raw[offset : offset + 16]
    h = (bytes((b[3], b[2], b[1], b[0], b[5], b[4], b[7], b[6])) + b[8:]).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class _Invalid(Exception):
    """A GPT header or its entry array fails the kernel's is_gpt_valid()."""


def read_table(
    fd: int,
    size: int,
    sector_size: int | None = None,
    *,
    path: str | None = None,
    device: str | None = None,
) -> PartitionTable | None:
    """Read the partition table of the disk open as ``fd`` (``size`` bytes).

    ``sector_size`` is the logical block size; ``None`` probes for a GPT at
    512 then 4096 and reads an MBR with 512.  Returns ``None`` when the kernel
    would find no partition table; raises :class:`PartitionTableError`
    (naming ``device`` and ``path``) for a table the kernel would refuse;
    read errors propagate as plain ``OSError``.  Only ``os.pread`` is used:
    the file offset is left alone and ``fd`` stays open.
    """
    if sector_size is not None and sector_size not in _SECTOR_SIZES:
        raise ValueError(f"sector_size must be one of {_SECTOR_SIZES}, not {sector_size!r}")
    # The kernel sees whole 512-byte sectors (get_capacity()); a disk of
    # capacity 0 is not scanned at all (bdev_disk_changed()).
    size -= size % 512
    if size < 512:
        return None
    disk = _Disk(fd, size, path, device)
    mbr = disk.head[:512]
    if len(mbr) < 512:
        return None
    entries = _mbr_entries(mbr)
    signed = mbr[510:512] == _MBR_MAGIC
    # core.c check_part[]: efi_partition() runs before msdos_partition().
    # efi.c is_pmbr_valid()/pmbr_part_valid(): a GPT counts only behind an MBR
    # with 0x55AA and a type 0xee entry starting at LBA 1 (other entries
    # beside it make it a hybrid MBR, still a GPT disk).  The boot option
    # "gpt" (force_gpt) would skip this; loopdev follows the default.
    if signed and any(e[1] == _PMBR_TYPE and e[2] == 1 for e in entries):
        return _read_gpt(disk, sector_size)
    if not signed:
        found = _gpt_sector_sizes(disk.head, sector_size)
        if found:
            raise disk.error(
                f"GPT header at LBA 1 ({found[0]}-byte sectors) but no protective MBR "
                "(0x55AA signature missing at byte 510): the kernel ignores such a GPT "
                "(efi.c is_pmbr_valid())"
            )
        return None  # msdos.c: no 0x55AA, no DOS table
    # msdos.c msdos_partition(), in its order.  AIX disks are not DOS tables.
    if mbr[:4] == _AIX_MAGIC and _is_aix(disk, entries):
        return None
    # 0x55AA alone does not make a table (FAT boot sectors carry it too): any
    # boot indicator other than 0x00/0x80 means boot code, no partitions.
    if any(entry[0] not in (0x00, 0x80) for entry in entries):
        return None
    if any(e[1] == _PMBR_TYPE for e in entries):
        # msdos.c ignores an MBR with a type 0xee entry; efi.c refused it above.
        raise disk.error(
            "the MBR has a GPT protective entry (type 0xee) that does not start at LBA 1: "
            "the kernel reads neither a GPT (efi.c pmbr_part_valid()) nor the MBR "
            "(msdos.c skips MBRs with type 0xee)"
        )
    if all(entry[3] == 0 for entry in entries):
        return None  # nothing to register (sfdisk would call it an empty "dos" label)
    return _read_mbr(disk, mbr, entries, sector_size or 512)


def gpt_sector_size(fd: int, offset: int, size: int) -> int | None:
    """The sector size (512 or 4096) a GPT in a file was written for.

    Looks for a valid primary GPT header (signature, size, CRC, ``my_lba``)
    at LBA 1 for both sizes in the ``size`` bytes of ``fd`` that start at
    ``offset`` (what a loop device with that offset and size limit would
    show).  Returns ``None`` when there is none, or a header for both.
    """
    if offset < 0 or size < 1024:
        return None
    found = _gpt_sector_sizes(_pread(fd, min(size, 8192), offset), None, check=True)
    return found[0] if len(found) == 1 else None


class _Disk:
    """Bounded positional reads, served from one initial read when possible."""

    __slots__ = ("device", "fd", "head", "path", "size")

    def __init__(self, fd: int, size: int, path: str | None, device: str | None) -> None:
        self.fd = fd
        self.size = size
        self.path = path
        self.device = device
        self.head = _pread(fd, min(size, _PREFIX), 0)

    def read(self, offset: int, length: int) -> bytes:
        """Read up to ``length`` bytes at ``offset``, never past the device end."""
        length = min(length, self.size - offset)
        if offset < 0 or length <= 0:
            return b""
        end = offset + length
        if end <= len(self.head):
            return self.head[offset:end]
        return _pread(self.fd, length, offset)

    def error(self, message: str) -> PartitionTableError:
        return PartitionTableError(message, device=self.device, backing=self.path)


def _pread(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    # Short reads are legal; loop until EOF so a slow device is not "corrupt".
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _is_aix(disk: _Disk, entries: list[_MbrEntry]) -> bool:
    """msdos.c aix_magic_present(): IBMA, no Linux (0x83) or 0x82 entry, "_LVM" at sector 7.

    An AIX disk is not a DOS table; the kernel reads it only with
    CONFIG_AIX_PARTITION (aix.c), which loopdev does not: nothing registered.
    """
    if any(entry[1] in (0x82, 0x83) for entry in entries):
        return False
    return disk.read(7 * 512, 4) == b"_LVM"


# --- GPT -------------------------------------------------------------------


def _gpt_sector_sizes(head: bytes, sector_size: int | None, check: bool = False) -> list[int]:
    """Sector sizes whose LBA 1 in ``head`` holds a GPT signature (a valid header if ``check``)."""
    found = []
    for ss in (sector_size,) if sector_size else (512, 4096):
        if head[ss : ss + 8] != _GPT_SIGNATURE:
            continue
        if check:
            raw = head[ss : 2 * ss]
            if len(raw) < ss:  # the kernel reads the whole block
                continue
            try:
                _check_header(raw, ss, 1)
            except _Invalid:
                continue
        found.append(ss)
    return found


def _read_gpt(disk: _Disk, sector_size: int | None) -> PartitionTable:
    if sector_size:
        ss = sector_size
    else:
        found = _gpt_sector_sizes(disk.head, None)
        if not found:
            message = (
                "protective MBR (type 0xee) but no GPT header at LBA 1 "
                "for 512- or 4096-byte sectors"
            )
            for ss in (512, 4096):  # say so if a backup header shows the size
                if _backup_is_intact(disk, ss):
                    message = _primary_problem(disk, ss, "no 'EFI PART' signature")
                    break
            raise disk.error(message)
        ss = found[0]
    # efi.c last_lba(): the disk's bytes over the logical block size.
    last_lba = disk.size // ss - 1
    try:
        header = _gpt_header(disk, ss, 1, last_lba)
        array = _gpt_array(disk, ss, header, last_lba)
    except _Invalid as exc:
        raise disk.error(_primary_problem(disk, ss, str(exc))) from None
    return _gpt_table(disk, ss, header, array, last_lba)


def _primary_problem(disk: _Disk, ss: int, problem: str) -> str:
    """Why the kernel ignores this GPT, and what would fix it."""
    message = f"the primary GPT header at LBA 1 ({ss}-byte sectors) is not valid: {problem}"
    written_for = [
        other
        for other in _SECTOR_SIZES
        if other != ss and _gpt_sector_sizes(disk.head, other, check=True)
    ]
    if written_for:
        other = written_for[0]
        return (
            f"{message}; the table was written for {other}-byte sectors: attach with "
            f"block_size={other} (compat: blocksize={other}; CLI: --sector-size {other})"
        )
    # efi.c find_valid_gpt() reads the backup only to compare it with a good
    # primary; it is used instead of the primary only with the "gpt" boot
    # option (force_gpt).  So a valid backup does not save the table.
    if _backup_is_intact(disk, ss):
        return (
            f"{message}; the backup header at LBA {disk.size // ss - 1} is intact, but the "
            "kernel uses it only when booted with 'gpt' (efi.c find_valid_gpt()): repair "
            "the primary from it, e.g. by writing the table again with fdisk"
        )
    return message


def _backup_is_intact(disk: _Disk, ss: int) -> bool:
    """Whether the last LBA holds a valid GPT header and entry array."""
    last_lba = disk.size // ss - 1
    if last_lba < 2:
        return False
    try:
        _gpt_array(disk, ss, _gpt_header(disk, ss, last_lba, last_lba), last_lba)
    except _Invalid:
        return False
    return True


_Header = tuple[bytes, int, int, int, int, int, int, int, int, bytes, int, int, int, int]


def _unpack_header(raw: bytes) -> _Header:
    """Signature, revision, header size, header CRC, reserved, my LBA, alternate
    LBA, first usable, last usable, disk GUID, entries LBA, entry count, entry
    size, entries CRC: struct gpt_header's 92 bytes (efi.h)."""
    return (
        raw[0:8],
        _le(raw, 8, 12),
        _le(raw, 12, 16),
        _le(raw, 16, 20),
        _le(raw, 20, 24),
        _le(raw, 24, 32),
        _le(raw, 32, 40),
        _le(raw, 40, 48),
        _le(raw, 48, 56),
        raw[56:72],
        _le(raw, 72, 80),
        _le(raw, 80, 84),
        _le(raw, 84, 88),
        _le(raw, 88, 92),
    )


def _gpt_header(disk: _Disk, ss: int, lba: int, last_lba: int) -> _Header:
    """Read the header at ``lba`` and validate it as efi.c is_gpt_valid() does."""
    # efi.c alloc_read_gpt_header()/read_lba(): one whole logical block, on the disk.
    if lba > last_lba:
        raise _Invalid(f"the device ({disk.size} bytes) has no LBA {lba}")
    raw = disk.read(lba * ss, ss)
    if len(raw) < ss:
        raise _Invalid("cannot read the header sector")
    header = _check_header(raw, ss, lba)
    first_usable, last_usable = header[7], header[8]
    # is_gpt_valid(): only these bounds; the kernel does not check that the
    # usable LBAs stay clear of the headers or the entry arrays.
    if first_usable > last_lba:
        raise _Invalid(f"first usable LBA {first_usable} is past the last LBA {last_lba}")
    if last_usable > last_lba:
        raise _Invalid(
            f"last usable LBA {last_usable} is past the last LBA {last_lba} "
            "(was the image made smaller after partitioning?)"
        )
    if last_usable < first_usable:
        raise _Invalid(
            f"last usable LBA {last_usable} is before the first usable LBA {first_usable}"
        )
    count, entry_size = header[11], header[12]
    if entry_size != _GPT_ENTRY_SIZE:
        raise _Invalid(f"entry size is {entry_size}; the kernel accepts only {_GPT_ENTRY_SIZE}")
    if count * entry_size > _GPT_MAX_ARRAY:
        raise _Invalid(
            f"{count} entries of {entry_size} bytes exceed the kernel's "
            f"{_GPT_MAX_ARRAY >> 20} MiB entry array limit"
        )
    if not count:
        # efi.c alloc_read_gpt_entries() returns NULL for an empty array.
        raise _Invalid("it has 0 partition entries")
    return header


def _check_header(raw: bytes, ss: int, lba: int) -> _Header:
    """efi.c is_gpt_valid() up to my_lba: signature, header size, CRC, position."""
    header = _unpack_header(raw)
    signature, header_size, header_crc, my_lba = header[0], header[2], header[3], header[5]
    if signature != _GPT_SIGNATURE:
        raise _Invalid("no 'EFI PART' signature")
    if header_size > ss:
        raise _Invalid(f"header size {header_size} is larger than the {ss}-byte sector")
    if header_size < _GPT_HEADER_MIN:
        raise _Invalid(f"header size {header_size} is smaller than {_GPT_HEADER_MIN}")
    # The CRC covers header_size bytes with its own field taken as zero.
    crc = _native.crc32(raw[:16] + _ZERO_CRC + raw[20:header_size])
    if crc != header_crc:
        raise _Invalid(f"header CRC32 is 0x{header_crc:08x}, computed 0x{crc:08x}")
    if my_lba != lba:
        raise _Invalid(f"header claims to be at LBA {my_lba}")
    return header


def _gpt_array(disk: _Disk, ss: int, header: _Header, last_lba: int) -> bytes:
    """Read the entry array of a valid header and check its CRC (is_gpt_valid())."""
    array_fields: tuple[int, int, int, int] = header[10:14]
    entries_lba, count, entry_size, entries_crc = array_fields
    length = count * entry_size
    # efi.c read_lba(): nothing past last_lba, and a short read fails.
    if entries_lba > last_lba:
        raise _Invalid(f"entry array LBA {entries_lba} is past the last LBA {last_lba}")
    raw = disk.read(entries_lba * ss, length)
    if len(raw) != length:
        raise _Invalid(
            f"entry array at LBA {entries_lba} ({length} bytes) runs past the end of the device"
        )
    crc = _native.crc32(raw)
    if crc != entries_crc:
        raise _Invalid(f"entry array CRC32 is 0x{entries_crc:08x}, computed 0x{crc:08x}")
    return raw


def _gpt_table(
    disk: _Disk, ss: int, header: _Header, array: bytes, last_lba: int
) -> PartitionTable:
    count = header[11]
    types: dict[bytes, str] = {}  # type GUIDs repeat: format each once
    parts: list[Partition] = []
    notes: list[str] = []
    # efi.c efi_partition(): entries up to the partition number limit, each
    # checked by is_pte_valid() alone: no check against the usable LBAs and
    # none for overlaps.
    for index in range(min(count, _MAX_PARTNO)):
        offset = index * _GPT_ENTRY_SIZE
        raw_type = array[offset : offset + 16]
        if raw_type == _ZERO_GUID:
            continue  # unused entry
        number = index + 1
        first, last, name = _gpt_entry(array, offset)
        if first > last_lba or last > last_lba:
            notes.append(
                f"GPT partition {number} (LBAs {first}..{last}) is not registered: it "
                f"ends past the last LBA {last_lba} of the device (efi.c is_pte_valid())"
            )
            continue
        if last < first:
            # efi.c computes the size as last - first + 1 in u64: zero (then
            # skipped by core.c blk_add_partition()) or a wrapped, absurd size
            # that BLKPG cannot express.  Either way nothing usable.
            notes.append(
                f"GPT partition {number} is not registered: it ends at LBA {last}, "
                f"before its first LBA {first}"
            )
            continue
        ptype = types.get(raw_type)
        if ptype is None:
            ptype = types[raw_type] = _format_guid(raw_type)
        if name == _EMPTY_NAME:
            label = ""
        else:
            label = utf_16_le_decode(name, "replace")[0]
            nul = label.find("\0")
            if nul >= 0:
                label = label[:nul]
        parts.append(
            Partition(
                number,
                first * ss,
                (last - first + 1) * ss,
                ptype,
                _format_guid(array, offset + 16),
                label,
            )
        )
    if count > _MAX_PARTNO:
        beyond = [
            index + 1
            for index in range(_MAX_PARTNO, count)
            if array[index * _GPT_ENTRY_SIZE : index * _GPT_ENTRY_SIZE + 16] != _ZERO_GUID
        ]
        if beyond:
            notes.append(
                f"{len(beyond)} GPT partitions numbered above {_MAX_PARTNO} "
                f"({_numbers(beyond)}) are not registered: the kernel registers partition "
                f"numbers up to {_MAX_PARTNO} (DISK_MAX_PARTS)"
            )
    return PartitionTable("gpt", ss, _format_guid(header[9]), tuple(parts), tuple(notes))


def _numbers(numbers: list[int]) -> str:
    if len(numbers) > 4:
        return f"{numbers[0]}, {numbers[1]}, ..., {numbers[-1]}"
    return ", ".join(map(str, numbers))


# --- MBR -------------------------------------------------------------------

# number -> (first 512-byte sector, 512-byte sectors, type byte, bootable)
_Found = dict[int, tuple[int, int, int, bool]]


def _read_mbr(disk: _Disk, mbr: bytes, entries: list[_MbrEntry], ss: int) -> PartitionTable:
    """msdos.c msdos_partition(), then core.c blk_add_partition() for each slot.

    Like the kernel, positions are counted in 512-byte sectors (sector_t) and
    table LBAs are scaled by the logical block size.  The kernel checks no
    overlaps and no bounds here beyond what is written below.
    """
    ssz = ss // 512
    found: _Found = {}
    notes: list[str] = []
    number = 5  # msdos.c: state->next = 5, shared by every extended partition
    for slot, (boot, ptype, lba, count) in enumerate(entries, 1):
        if not count:
            continue  # empty slot; its number is not reused
        start, length = lba * ssz, count * ssz
        if ptype in _EXTENDED_TYPES:
            # msdos.c: register the extended partition as a stub of one
            # logical sector but at least 2 sectors (1 KiB, "room for LILO"),
            # so that nobody mkfs'es the whole container; sfdisk --json shows
            # the full extent instead.
            found[slot] = (start, min(length, max(ssz, 2)), ptype, boot == 0x80)
            number = _parse_extended(disk, found, notes, slot, start, length, ssz, number)
            continue
        found[slot] = (start, length, ptype, boot == 0x80)
    capacity = disk.size // 512
    parts: list[Partition] = []
    for number in sorted(found):
        start, length, ptype, bootable = found[number]
        # core.c blk_add_partition(): a partition starting past the end is
        # skipped, one running past the end is truncated ("camera firmware"),
        # both with a warning in the kernel log.
        if start >= capacity:
            notes.append(
                f"MBR partition {number} is not registered: it starts at byte "
                f"{start * 512}, past the end of the device ({disk.size} bytes)"
            )
            continue
        if start + length > capacity:
            notes.append(
                f"MBR partition {number} (bytes {start * 512}..{(start + length) * 512 - 1}) "
                f"runs past the end of the device ({disk.size} bytes): truncated to "
                f"{(capacity - start) * 512} bytes, as the kernel does"
            )
            length = capacity - start
        parts.append(
            Partition(number, start * 512, length * 512, f"0x{ptype:02x}", None, None, bootable)
        )
    disk_id = f"0x{_le(mbr, 440, 444):08x}"
    return PartitionTable("dos", ss, disk_id, tuple(parts), tuple(notes))


def _parse_extended(
    disk: _Disk,
    found: _Found,
    notes: list[str],
    extended: int,
    first: int,
    first_size: int,
    ssz: int,
    number: int,
) -> int:
    """msdos.c parse_extended(): follow the EBR chain; returns the next logical number.

    Each EBR holds logical partitions (relative to the EBR) and a link to the
    next EBR (relative to the extended partition).  The kernel bounds the
    chain by 100 EBRs in a row without a logical and by the partition number
    limit, nothing else: a link may leave the extended partition, a chain may
    loop (re-registering the same logicals), a logical may lie anywhere.
    """
    capacity = disk.size // 512
    this_sector, this_size = first, first_size
    empty_links = 0
    visited: set[int] = set()
    looped = False
    while True:
        empty_links += 1
        if empty_links > _MAX_EMPTY_EBRS:
            notes.append(
                f"the EBR chain of extended partition {extended} is not followed past "
                f"byte {this_sector * 512}: {_MAX_EMPTY_EBRS} EBRs in a row without a "
                "logical partition"
            )
            return number
        if number > _MAX_PARTNO:
            notes.append(
                f"the EBR chain of extended partition {extended} is not followed past "
                f"byte {this_sector * 512}: partition numbers stop at {_MAX_PARTNO}"
            )
            return number
        if this_sector >= capacity:
            # read_part_sector() fails: "partition table partially beyond EOD".
            notes.append(
                f"the EBR at byte {this_sector * 512} (extended partition {extended}) lies "
                f"past the end of the device ({disk.size} bytes): the chain ends there"
            )
            return number
        sector = disk.read(this_sector * 512, 512)
        if sector[510:512] != _MBR_MAGIC:
            if any(sector):  # an unwritten first EBR is the usual empty container
                notes.append(
                    f"the EBR at byte {this_sector * 512} (extended partition {extended}) "
                    "has no 0x55AA signature: the chain ends there"
                )
            return number
        if this_sector not in visited:
            visited.add(this_sector)
        elif not looped:
            looped = True
            notes.append(
                f"the EBR chain of extended partition {extended} loops back to byte "
                f"{this_sector * 512}; the kernel registers its logical partitions again"
            )
        entries = _mbr_entries(sector)
        for slot, (boot, ptype, lba, count) in enumerate(entries):
            if not count or ptype in _EXTENDED_TYPES:
                continue
            offset, length = lba * ssz, count * ssz
            start = this_sector + offset
            # Slots 3 and 4 "sometimes contain random garbage": only when they
            # fit the link that led here and the extended partition.
            if slot >= 2 and (
                offset + length > this_size or start < first or start + length > first + first_size
            ):
                continue
            found[number] = (start, length, ptype, boot == 0x80)
            empty_links = 0
            number += 1
            if number > _MAX_PARTNO:
                rest = entries[slot + 1 :]
                if any(e[3] for e in rest) or any(
                    e[3] and e[1] in _EXTENDED_TYPES for e in entries
                ):
                    notes.append(
                        f"logical partitions after number {_MAX_PARTNO} in extended "
                        f"partition {extended} are not registered: partition numbers stop "
                        f"at {_MAX_PARTNO}"
                    )
                return number
        # Then the first link to a further EBR, if any.
        link = next((e for e in entries if e[3] and e[1] in _EXTENDED_TYPES), None)
        if link is None:
            return number
        this_sector = first + link[2] * ssz
        this_size = link[3] * ssz
