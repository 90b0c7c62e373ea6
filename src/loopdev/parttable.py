"""Read GPT and MBR partition tables from a disk image or block device.

Pure user space and read-only: :func:`read_table` says which partitions the
kernel's scanner would register for a device, or raises
:class:`~loopdev.errors.PartitionTableError` when the table is malformed, so
that a bad table is refused before the kernel ever sees it.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from codecs import utf_16_le_decode

from loopdev.errors import PartitionTableError

__all__ = ["Partition", "PartitionTable", "read_table"]

# Plain __slots__ classes instead of frozen dataclasses: importing
# ``dataclasses`` pulls in ``inspect`` and costs several milliseconds.  Fields
# live in private slots behind read-only properties: immutable (for mypy too)
# while construction stays a plain, fast slot store.


class Partition:
    """One partition as the kernel would register it; offsets in bytes."""

    __slots__ = ("_bootable", "_label", "_number", "_size", "_start", "_type", "_uuid")
    __match_args__ = ("number", "start", "size", "type", "uuid", "label", "bootable")

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
        self._number = number
        self._start = start
        self._size = size
        self._type = type
        self._uuid = uuid
        self._label = label
        self._bootable = bootable

    @property
    def number(self) -> int:
        """Kernel partition number: GPT entry index + 1; MBR 1-4, logicals from 5."""
        return self._number

    @property
    def start(self) -> int:
        """Offset from the start of the disk, in bytes."""
        return self._start

    @property
    def size(self) -> int:
        """Length in bytes."""
        return self._size

    @property
    def type(self) -> str:
        """GPT type GUID (lower case) or MBR type byte as ``"0x83"``."""
        return self._type

    @property
    def uuid(self) -> str | None:
        """GPT partition GUID (lower case); ``None`` for MBR."""
        return self._uuid

    @property
    def label(self) -> str | None:
        """GPT partition name; ``None`` for MBR."""
        return self._label

    @property
    def bootable(self) -> bool:
        """MBR active flag (0x80); always ``False`` for GPT."""
        return self._bootable

    def _key(self) -> tuple[int, int, int, str, str | None, str | None, bool]:
        return (
            self._number,
            self._start,
            self._size,
            self._type,
            self._uuid,
            self._label,
            self._bootable,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Partition):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Partition(number={self._number!r}, start={self._start!r}, "
            f"size={self._size!r}, type={self._type!r}, uuid={self._uuid!r}, "
            f"label={self._label!r}, bootable={self._bootable!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (Partition, self._key())


class PartitionTable:
    """A whole table: scheme, logical sector size, disk id and partitions."""

    __slots__ = ("_disk_id", "_partitions", "_scheme", "_sector_size")
    __match_args__ = ("scheme", "sector_size", "disk_id", "partitions")

    def __init__(
        self,
        scheme: str,
        sector_size: int,
        disk_id: str | None,
        partitions: tuple[Partition, ...],
    ) -> None:
        self._scheme = scheme
        self._sector_size = sector_size
        self._disk_id = disk_id
        self._partitions = partitions

    @property
    def scheme(self) -> str:
        """``"gpt"`` or ``"dos"``, as sfdisk names them."""
        return self._scheme

    @property
    def sector_size(self) -> int:
        """The logical block size the table was read with."""
        return self._sector_size

    @property
    def disk_id(self) -> str | None:
        """GPT disk GUID (lower case) or MBR disk signature as ``"0x%08x"``."""
        return self._disk_id

    @property
    def partitions(self) -> tuple[Partition, ...]:
        """The partitions, sorted by number."""
        return self._partitions

    def _key(self) -> tuple[str, int, str | None, tuple[Partition, ...]]:
        return (self._scheme, self._sector_size, self._disk_id, self._partitions)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartitionTable):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"PartitionTable(scheme={self._scheme!r}, "
            f"sector_size={self._sector_size!r}, disk_id={self._disk_id!r}, "
            f"partitions={self._partitions!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (PartitionTable, self._key())


_SECTOR_SIZES = (512, 1024, 2048, 4096)
# One read at offset 0 covers the MBR, both candidate GPT header positions and
# the usual 128-entry array behind either (bytes 1024-17407 with 512-byte
# sectors, 8192-24575 with 4096), so a typical GPT costs a single pread.
_PREFIX = 32768

_MBR_MAGIC = b"\x55\xaa"
_AIX_MAGIC = b"\xc9\xc2\xd4\xc1"  # EBCDIC "IBMA"
_PMBR_TYPE = 0xEE
_EXTENDED_TYPES = frozenset((0x05, 0x0F, 0x85))
_MAX_EBRS = 256  # the kernel's DISK_MAX_PARTS bounds logicals the same way

_GPT_SIGNATURE = b"EFI PART"
_GPT_HEADER_MIN = 92
_GPT_ENTRY_MIN = 128
_GPT_MAX_ENTRIES = 16384
_GPT_MAX_ARRAY = 4 << 20
_ZERO_GUID = bytes(16)
_EMPTY_NAME = bytes(72)
_ZERO_CRC = bytes(4)

# boot flag, (CHS), type, (CHS), first LBA, number of sectors
_MBR_ENTRY = struct.Struct("<B3xB3xII")
_U32 = struct.Struct("<I")
# signature, revision, header size, header CRC, reserved, my LBA, alternate
# LBA, first usable, last usable, disk GUID, entries LBA, entry count, entry
# size, entries CRC
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")
# GUIDs are mixed-endian: the first three fields little-endian, the last
# eight bytes as stored.  Re-packing them big-endian makes one hex() call
# give the canonical digit order.
_GPT_GUID_LE = struct.Struct("<IHH8s")
_GPT_GUID_BE = struct.Struct(">IHH8s")
# first LBA, last LBA, (attributes), name
_GPT_ENTRY_REST = struct.Struct("<32xQQ8x72s")
# FAT BPB from offset 0x0b: bytes/sector, sectors/cluster, reserved sectors,
# FATs, root entries, sectors (16 bit), media, FAT length (16 bit), sectors
# per track, heads, hidden, sectors (32 bit), FAT length (32 bit, FAT32).
_FAT_BPB = struct.Struct("<HBHBHHBHHHIII")


class _Invalid(Exception):
    """A GPT header or entry array failed validation: try the other copy."""


def read_table(
    fd: int, size: int, sector_size: int | None = None, *, path: str | None = None
) -> PartitionTable | None:
    """Read the partition table of the disk open as ``fd`` (``size`` bytes).

    ``sector_size`` is the logical block size; ``None`` probes for a GPT at
    512 then 4096 and reads an MBR with 512.  Returns ``None`` when there is
    no partition table, raises :class:`PartitionTableError` (naming ``path``)
    when the table is malformed; read errors propagate as plain ``OSError``.
    Only ``os.pread`` is used: the file offset is left alone and ``fd`` stays
    open.
    """
    if sector_size is not None and sector_size not in _SECTOR_SIZES:
        raise ValueError(f"sector_size must be one of {_SECTOR_SIZES}, not {sector_size!r}")
    if size < 512:
        return None
    disk = _Disk(fd, size, path)
    mbr = disk.head[:512]
    if len(mbr) < 512:
        return None
    # AIX disks may lack 0x55AA and are not DOS tables (kernel and libblkid).
    if mbr[:4] == _AIX_MAGIC:
        return None
    if mbr[510:512] != _MBR_MAGIC:
        found = _gpt_signature_at_lba1(disk, sector_size)
        if found:
            # The kernel and libfdisk ignore a GPT without its protective MBR;
            # saying so beats silently reporting "no table".
            raise disk.error(
                f"GPT header at LBA 1 ({found}-byte sectors) but no protective MBR "
                "(0x55AA signature missing at byte 510)"
            )
        return None
    entries = [_MBR_ENTRY.unpack_from(mbr, 446 + 16 * i) for i in range(4)]
    if any(entry[1] == _PMBR_TYPE for entry in entries):
        # Protective (or hybrid) MBR: the GPT is authoritative, as in the kernel.
        return _read_gpt(disk, sector_size)
    # 0x55AA alone does not make a partition table: FAT (and other) boot
    # sectors carry it too.  Like the kernel's msdos.c and libblkid's dos.c:
    # - every boot indicator must be 0x00 or 0x80, else it is boot code;
    # - a sector that passes libblkid's FAT boot-sector test is a filesystem;
    # - with all four slots empty (zero sectors) there is nothing to register,
    #   and such sectors are typically unformatted or filesystem boot sectors,
    #   so we report no table (sfdisk would call it an empty "dos" label).
    if any(entry[0] not in (0x00, 0x80) for entry in entries):
        return None
    if _is_fat_boot_sector(mbr):
        return None
    if all(entry[3] == 0 for entry in entries):
        return None
    return _read_mbr(disk, mbr, entries, sector_size or 512)


class _Disk:
    """Bounded positional reads, served from one initial read when possible."""

    __slots__ = ("fd", "head", "path", "size")

    def __init__(self, fd: int, size: int, path: str | None) -> None:
        self.fd = fd
        self.size = size
        self.path = path
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
        return PartitionTableError(message, backing=self.path)


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


def _is_fat_boot_sector(sector: bytes) -> bool:
    """libblkid's ``blkid_probe_is_vfat()``: FAT magic (or x86 jump) plus a sane BPB."""
    magic = (
        sector[0x52:0x57] == b"MSWIN"
        or sector[0x52:0x5A] == b"FAT32   "
        or sector[0x36:0x3B] == b"MSDOS"
        or sector[0x36:0x3E] in (b"FAT16   ", b"FAT12   ", b"FAT     ")
    )
    if not magic:
        # Old floppies: no magic string, only a jump instruction.  JFS and
        # HPFS put a FAT-like pseudo-BPB there, so rule them out.
        if sector[0] not in (0xEB, 0xE9):
            return False
        if sector[0x36:0x3E] in (b"JFS     ", b"HPFS    "):
            return False
    (
        bytes_per_sector,
        cluster_size,
        reserved,
        fats,
        dir_entries,
        sectors16,
        media,
        fat_length16,
        _track,
        _heads,
        _hidden,
        sectors32,
        fat_length32,
    ) = _FAT_BPB.unpack_from(sector, 0x0B)
    if not fats or not reserved or not (media >= 0xF8 or media == 0xF0):
        return False
    if not cluster_size or cluster_size & (cluster_size - 1):
        return False
    if bytes_per_sector not in _SECTOR_SIZES:
        return False
    sector_count = sectors16 or sectors32
    fat_size = (fat_length16 or fat_length32) * fats
    dir_size = (dir_entries * 32 + bytes_per_sector - 1) // bytes_per_sector
    data_sectors = sector_count - (reserved + fat_size + dir_size)
    if data_sectors < 0:  # wraps around in libblkid's uint32 arithmetic
        return False
    clusters = data_sectors // cluster_size
    if not fat_length16 and fat_length32:
        max_clusters = 0x0FFFFFF6
    else:
        max_clusters = 0xFFF4 if clusters > 0xFF4 else 0xFF4
    return bool(clusters <= max_clusters)


# --- GPT -------------------------------------------------------------------


def _gpt_signature_at_lba1(disk: _Disk, sector_size: int | None) -> int:
    """Sector size whose LBA 1 holds a GPT signature, or 0."""
    for candidate in (sector_size,) if sector_size else (512, 4096):
        if disk.read(candidate, 8) == _GPT_SIGNATURE:
            return candidate
    return 0


def _read_gpt(disk: _Disk, sector_size: int | None) -> PartitionTable:
    ss = sector_size or _probe_gpt_sector_size(disk)
    last_lba = disk.size // ss - 1
    if last_lba < 2:
        raise disk.error(
            f"device of {disk.size} bytes is too small for a GPT with {ss}-byte sectors"
        )

    problems: list[str] = []
    backups = [last_lba]
    try:
        header = _gpt_header(disk, ss, 1, last_lba)
        # A header that checks out but whose array does not still knows where
        # its backup lives (it may not be at the end of a grown image).
        alternate = header[6]
        if 2 <= alternate <= last_lba and alternate != last_lba:
            backups.insert(0, alternate)
        array = _gpt_array(disk, ss, header)
    except _Invalid as exc:
        problems.append(f"primary header at LBA 1: {exc}")
    else:
        return _gpt_table(disk, ss, header, array)

    for lba in backups:
        try:
            header = _gpt_header(disk, ss, lba, last_lba)
            array = _gpt_array(disk, ss, header)
        except _Invalid as exc:
            problems.append(f"backup header at LBA {lba}: {exc}")
        else:
            return _gpt_table(disk, ss, header, array)
    raise disk.error("both GPT headers are bad: " + "; ".join(problems))


def _probe_gpt_sector_size(disk: _Disk) -> int:
    for ss in (512, 4096):
        if disk.read(ss, 8) == _GPT_SIGNATURE:
            return ss
    # Primary header gone: look for a backup at the end of the device.
    for ss in (512, 4096):
        last = disk.size // ss - 1
        if last >= 2 and disk.read(last * ss, 8) == _GPT_SIGNATURE:
            return ss
    raise disk.error(
        "protective MBR (type 0xee) but no GPT header at LBA 1 or at the last LBA "
        "for 512- or 4096-byte sectors"
    )


_Header = tuple[bytes, int, int, int, int, int, int, int, int, bytes, int, int, int, int]


def _gpt_header(disk: _Disk, ss: int, lba: int, last_lba: int) -> _Header:
    """Read and validate the header at ``lba``; raise _Invalid if unusable."""
    raw = disk.read(lba * ss, ss)
    if len(raw) < _GPT_HEADER_MIN:
        raise _Invalid("cannot read the header sector")
    header: _Header = _GPT_HEADER.unpack_from(raw)
    (
        signature,
        _revision,
        header_size,
        header_crc,
        _reserved,
        my_lba,
        _alternate,
        first_usable,
        last_usable,
        _guid,
        entries_lba,
        count,
        entry_size,
        _entries_crc,
    ) = header
    if signature != _GPT_SIGNATURE:
        raise _Invalid("no 'EFI PART' signature")
    if not _GPT_HEADER_MIN <= header_size <= ss:
        raise _Invalid(f"header size {header_size} is outside {_GPT_HEADER_MIN}..{ss}")
    # The CRC covers header_size bytes with its own field taken as zero.
    crc = zlib.crc32(raw[:16] + _ZERO_CRC + raw[20:header_size])
    if crc != header_crc:
        raise _Invalid(f"header CRC32 is 0x{header_crc:08x}, computed 0x{crc:08x}")
    if my_lba != lba:
        raise _Invalid(f"header claims to be at LBA {my_lba}")
    if not 2 <= first_usable <= last_usable <= last_lba:
        raise _Invalid(
            f"usable LBAs {first_usable}..{last_usable} do not fit in LBAs 2..{last_lba}"
        )
    if first_usable <= lba <= last_usable:
        raise _Invalid(
            f"header LBA {lba} lies inside the usable LBAs {first_usable}..{last_usable}"
        )
    if entry_size < _GPT_ENTRY_MIN or entry_size % 8:
        raise _Invalid(f"entry size {entry_size} is not a multiple of 8 of at least 128")
    if count > _GPT_MAX_ENTRIES or count * entry_size > _GPT_MAX_ARRAY:
        raise _Invalid(f"{count} entries of {entry_size} bytes is an absurd entry array")
    if count:
        end_lba = entries_lba + (count * entry_size + ss - 1) // ss  # exclusive
        if entries_lba < 2 or end_lba - 1 > last_lba:
            raise _Invalid(f"entry array at LBAs {entries_lba}..{end_lba - 1} is off the device")
        if entries_lba <= lba < end_lba:
            raise _Invalid(f"entry array at LBAs {entries_lba}..{end_lba - 1} covers the header")
        if entries_lba <= last_usable and first_usable < end_lba:
            raise _Invalid(
                f"entry array at LBAs {entries_lba}..{end_lba - 1} overlaps the usable "
                f"LBAs {first_usable}..{last_usable}"
            )
    return header


def _gpt_array(disk: _Disk, ss: int, header: _Header) -> bytes:
    """Read the entry array of a valid header and check its CRC."""
    entries_lba, count, entry_size, entries_crc = header[10:14]
    length = count * entry_size
    raw = disk.read(entries_lba * ss, length)
    if len(raw) != length:
        raise _Invalid("entry array is truncated")
    crc = zlib.crc32(raw)
    if crc != entries_crc:
        raise _Invalid(f"entry array CRC32 is 0x{entries_crc:08x}, computed 0x{crc:08x}")
    return raw


def _gpt_table(disk: _Disk, ss: int, header: _Header, array: bytes) -> PartitionTable:
    first_usable, last_usable = header[7], header[8]
    count, entry_size = header[11], header[12]
    size = disk.size
    unpack = _GPT_ENTRY_REST.unpack_from
    guid_le = _GPT_GUID_LE.unpack_from
    guid_be = _GPT_GUID_BE.pack
    types: dict[bytes, str] = {}  # type GUIDs repeat: format each once
    parts: list[Partition] = []
    for index in range(count):
        offset = index * entry_size
        raw_type = array[offset : offset + 16]
        if raw_type == _ZERO_GUID:
            continue  # unused entry
        number = index + 1
        first, last, name = unpack(array, offset)
        if last < first:
            raise disk.error(
                f"GPT partition {number} ends at LBA {last}, before its first LBA {first}"
            )
        if (last + 1) * ss > size:
            raise disk.error(
                f"GPT partition {number} ends at byte {(last + 1) * ss}, past the end "
                f"of the device ({size} bytes)"
            )
        if first < first_usable:
            raise disk.error(
                f"GPT partition {number} starts at LBA {first}, "
                f"before the first usable LBA {first_usable}"
            )
        if last > last_usable:
            raise disk.error(
                f"GPT partition {number} ends at LBA {last}, past the last usable LBA {last_usable}"
            )
        ptype = types.get(raw_type)
        if ptype is None:
            ptype = types[raw_type] = _format_guid(raw_type)
        h = guid_be(*guid_le(array, offset + 16)).hex()
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
                f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}",
                label,
            )
        )
    _check_overlaps(disk, [(p.start, p.start + p.size, p.number) for p in parts])
    return PartitionTable("gpt", ss, _format_guid(header[9]), tuple(parts))


def _format_guid(raw: bytes) -> str:
    h = _GPT_GUID_BE.pack(*_GPT_GUID_LE.unpack(raw)).hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- MBR -------------------------------------------------------------------

_MbrEntry = tuple[int, int, int, int]  # boot flag, type, first LBA, sectors


def _read_mbr(disk: _Disk, mbr: bytes, entries: list[_MbrEntry], ss: int) -> PartitionTable:
    size = disk.size
    primaries: list[tuple[Partition, bool]] = []  # (partition, is extended)
    for slot, (boot, ptype, lba, count) in enumerate(entries, 1):
        if not count:
            continue  # empty slot; like the kernel, its number is not reused
        if not lba:
            raise disk.error(f"MBR partition {slot} starts at sector 0, on top of the MBR")
        start, length = lba * ss, count * ss
        if start + length > size:
            raise disk.error(
                f"MBR partition {slot} ends at byte {start + length}, past the end "
                f"of the device ({size} bytes)"
            )
        part = Partition(slot, start, length, f"0x{ptype:02x}", None, None, boot == 0x80)
        primaries.append((part, ptype in _EXTENDED_TYPES))
    # Extended partitions take part with their full extent here.
    _check_overlaps(disk, [(p.start, p.start + p.size, p.number) for p, _ in primaries])

    result: list[Partition] = []
    number = 5
    for part, extended in primaries:
        if not extended:
            result.append(part)
            continue
        logicals = _read_logicals(disk, part, ss, number)
        number += len(logicals)
        result.extend(logicals)
        # Like the kernel's msdos.c, register the extended partition as a
        # stub of one sector but at least 1 KiB ("room for LILO"), so that
        # nobody mkfs'es the whole container.  sfdisk --json reports the full
        # extent instead.  Unlike the kernel, the stub is clipped to end where
        # the first logical starts (possible when a logical begins one 512-byte
        # sector after its EBR): overlapping partitions cannot be added with
        # BLKPG, and callers may rely on the list being overlap-free.
        stub = min(part.size, max(ss, 1024))
        if logicals:
            stub = min(stub, min(p.start for p in logicals) - part.start)
        result.append(
            Partition(part.number, part.start, stub, part.type, None, None, part.bootable)
        )
    result.sort(key=_number)
    return PartitionTable("dos", ss, f"0x{_U32.unpack_from(mbr, 440)[0]:08x}", tuple(result))


def _number(part: Partition) -> int:
    return part.number


def _read_logicals(disk: _Disk, extended: Partition, ss: int, number: int) -> list[Partition]:
    """Follow the EBR chain of ``extended``; logicals are numbered from ``number``.

    Each EBR holds the logical partition (relative to the EBR) and a link to
    the next EBR (relative to the extended partition), as in the kernel's
    parse_extended(): data partitions in any slot (slots 3 and 4 only when
    they fit, as they sometimes hold garbage), then the first link found.
    """
    ext_start = extended.start
    ext_end = ext_start + extended.size
    ebr = ext_start
    link_size = extended.size
    seen: set[int] = set()
    logicals: list[Partition] = []
    spans: list[tuple[int, int, int]] = []
    while True:
        if ebr in seen:
            raise disk.error(
                f"EBR chain of extended partition {extended.number} loops back to byte {ebr}"
            )
        if len(seen) >= _MAX_EBRS:
            raise disk.error(f"extended partition {extended.number} has more than {_MAX_EBRS} EBRs")
        seen.add(ebr)
        sector = disk.read(ebr, 512)
        if sector[510:512] != _MBR_MAGIC:
            if ebr == ext_start and not any(sector):
                break  # never-written container: no logical partitions
            raise disk.error(
                f"EBR at byte {ebr} in extended partition {extended.number} has no 0x55AA signature"
            )
        # An EBR sector is part of the table: no logical may cover it.
        spans.append((ebr, ebr + ss, -1))
        entries = [_MBR_ENTRY.unpack_from(sector, 446 + 16 * i) for i in range(4)]
        link: _MbrEntry | None = None
        for slot, entry in enumerate(entries):
            boot, ptype, lba, count = entry
            if not count:
                continue
            if ptype in _EXTENDED_TYPES:
                if link is None:
                    link = entry
                continue
            start, length = ebr + lba * ss, count * ss
            if slot >= 2 and (lba * ss + length > link_size or start + length > ext_end):
                continue  # kernel: slots 3 and 4 "sometimes contain random garbage"
            if not lba:
                raise disk.error(f"logical partition {number} starts on its own EBR at byte {ebr}")
            if start + length > ext_end:
                raise disk.error(
                    f"logical partition {number} (bytes {start}..{start + length - 1}) "
                    f"ends past extended partition {extended.number} "
                    f"(bytes {ext_start}..{ext_end - 1})"
                )
            logicals.append(
                Partition(number, start, length, f"0x{ptype:02x}", None, None, boot == 0x80)
            )
            spans.append((start, start + length, number))
            number += 1
        if link is None:
            break
        ebr = ext_start + link[2] * ss
        link_size = link[3] * ss
        if not ext_start <= ebr < ext_end:
            raise disk.error(
                f"EBR link to byte {ebr} leaves extended partition {extended.number} "
                f"(bytes {ext_start}..{ext_end - 1})"
            )
    _check_overlaps(disk, spans)
    return logicals


# --- shared ------------------------------------------------------------------


def _check_overlaps(disk: _Disk, spans: list[tuple[int, int, int]]) -> None:
    """Raise if any two [start, end) spans overlap; -1 names an EBR sector."""
    spans.sort()
    for (start_a, end_a, a), (start_b, end_b, b) in itertools.pairwise(spans):
        if start_b < end_a:
            raise disk.error(
                f"{_span_name(a, start_a)} (bytes {start_a}..{end_a - 1}) overlaps "
                f"{_span_name(b, start_b)} (bytes {start_b}..{end_b - 1})"
            )


def _span_name(number: int, start: int) -> str:
    return f"the EBR at byte {start}" if number < 0 else f"partition {number}"
