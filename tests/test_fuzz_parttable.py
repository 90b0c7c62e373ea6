"""Structure-aware fuzzing of ``loopdev.parttable.read_table``.

``tests/test_parttable.py`` mutates two fixed images field by field. Here whole
tables are *generated* from a model (any sector size, entry count and size,
array placement, partition layout, EBR chain shape and order), so that

- an unmutated model must read back exactly as the kernel's parsers would
  read it (the oracle: entries numbered above 255 dropped, an entry size other
  than 128 or a destroyed primary GPT header refused, extended partitions as
  their 1 KiB stub), and
- a model mutated at the structure level (header and entry fields with the CRCs
  recomputed so the semantic checks are reached, destroyed primaries, size
  mismatches, EBR loops, self-links, chains past 255, links and logicals
  leaving the extended partition, overlaps) must give either
  ``PartitionTableError`` or a table whose partitions lie inside the device,
  and whose BLKPG plan (``partitions.blkpg_plan``) is whole blocks without
  overlaps; never any other exception.

The same generators drive three engines: hypothesis (bounded, in CI), a seeded
``random`` loop, and atheris (``python tests/test_fuzz_parttable.py -runs=N``)
where it is installed. A few generated images are also attached with
``partscan=True`` to check that what loopdev registers is what ``read_table``
says (through ``blkpg_plan``), and that a table it refuses leaves nothing bound.

``LOOPDEV_LONG=1`` runs many more examples.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import random
import re
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from images import GPT_ENTRY, GPT_FIELDS, GPT_HEADER, Img, gpt_header, mbr_sector

from loopdev.errors import PartitionTableError
from loopdev.partitions import blkpg_plan
from loopdev.parttable import Partition, PartitionTable, read_table

LONG = os.environ.get("LOOPDEV_LONG") == "1"
MiB = 1 << 20
T = TypeVar("T")

# Bounded: about 20 s for the whole file on the 2-core CI machine by default.
EXAMPLES = 3000 if LONG else 250
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- drawing: one interface, three engines ------------------------------------------------


class Draw(Protocol):
    def integer(self, lo: int, hi: int) -> int: ...
    def blob(self, n: int) -> bytes: ...


def pick(d: Draw, seq: Sequence[T]) -> T:
    return seq[d.integer(0, len(seq) - 1)]


def chance(d: Draw, one_in: int) -> bool:
    return d.integer(1, one_in) == 1


class HypothesisDraw:
    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))

    def blob(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


class RandomDraw:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def blob(self, n: int) -> bytes:
        return self.rng.randbytes(n)


class AtherisDraw:
    """Over ``atheris.FuzzedDataProvider``: exhausted input draws the lowest values."""

    def __init__(self, fdp: object) -> None:
        self.fdp = fdp

    def integer(self, lo: int, hi: int) -> int:
        value: int = self.fdp.ConsumeIntInRange(lo, hi)  # type: ignore[attr-defined]
        return value

    def blob(self, n: int) -> bytes:
        raw: bytes = self.fdp.ConsumeBytes(n)  # type: ignore[attr-defined]
        return raw.ljust(n, b"\0")


class Case:
    """A generated image, how to read it, and what must come out.

    ``expected`` is the table, or ``refused`` a pattern of the error the
    kernel's rules give; both ``None``: unknown (only sanity is checked).
    """

    def __init__(
        self,
        image: Img,
        read_as: int | None,
        expected: PartitionTable | None,
        mutations: list[str],
        size: int | None = None,
        refused: str | None = None,
    ) -> None:
        self.image = image
        self.read_as = read_as
        self.expected = expected
        self.mutations = mutations
        self.size = image.size if size is None else size  # what read_table is told
        self.refused = refused


def guid_text(raw: bytes) -> str:
    return str(uuid.UUID(bytes_le=raw))


def spans(d: Draw, lo: int, hi: int, n: int, min_gap: int = 0) -> list[tuple[int, int]]:
    """Up to ``n`` sorted, disjoint [start, end) spans of whole units within [lo, hi)."""
    out: list[tuple[int, int]] = []
    pos = lo
    for i in range(n):
        room = hi - pos - min_gap
        if room < 1:
            break
        pos += min_gap + d.integer(0, min(3, room - 1))
        left = n - i
        length = d.integer(1, max(1, min(hi - pos, (hi - pos) // left + 2)))
        length = min(length, hi - pos)
        if length < 1:
            break
        out.append((pos, pos + length))
        pos += length
    return out


# --- GPT model ---------------------------------------------------------------------------

LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4").bytes_le
LABEL_CHARS = "abcXYZ 019-_.äöü✓€日本\U0001f600"


class GptModel:
    def __init__(self, d: Draw) -> None:
        self.ss = pick(d, [512, 512, 4096, 4096, 1024, 2048])
        # efi.c accepts only 128-byte entries; the others must be refused.
        self.entry_size = pick(d, [128, 128, 128, 128, 128, 128, 128, 256, 512, 136])
        self.count = pick(d, [128, 128, 4, 1, 56, 200, d.integer(1, 300)])
        self.array_lbas = -(-self.count * self.entry_size // self.ss)
        self.primary_array = 2 + (d.integer(0, 3) if chance(d, 4) else 0)
        self.first_usable = self.primary_array + self.array_lbas + d.integer(0, 2)
        usable = d.integer(1, 2048 if self.ss == 512 else 512)
        self.last_usable = self.first_usable + usable - 1
        self.backup_array = self.last_usable + 1 + d.integer(0, 2)
        self.last = self.backup_array + self.array_lbas + (d.integer(0, 2) if chance(d, 4) else 0)
        # The image may have grown behind its backup header (not moved yet).
        self.grown = d.integer(1, 64) if chance(d, 5) else 0
        self.header_size = pick(d, [92, 92, 92, 128, self.ss])
        self.disk_guid = d.blob(16)
        self.hybrid = chance(d, 6)
        self.entries: dict[int, tuple[bytes, bytes, int, int, str]] = {}
        n = d.integer(0, min(self.count, 12))
        indices = list(range(self.count))
        for first, end in spans(d, self.first_usable, self.last_usable + 1, n):
            index = indices.pop(d.integer(0, len(indices) - 1))
            ptype = LINUX if chance(d, 2) else d.blob(16)
            if ptype == bytes(16):
                ptype = LINUX
            label = "".join(pick(d, LABEL_CHARS) for _ in range(d.integer(0, 12)))
            self.entries[index] = (ptype, d.blob(16), first, end - 1, label)

    @property
    def size(self) -> int:
        return (self.last + 1 + self.grown) * self.ss

    def array(self) -> bytearray:
        raw = bytearray(self.count * self.entry_size)
        for index, (ptype, puuid, first, last, label) in self.entries.items():
            name = label.encode("utf-16-le")[:72]
            GPT_ENTRY.pack_into(raw, index * self.entry_size, ptype, puuid, first, last, 0, name)
        return raw

    def header(self, my_lba: int, alternate: int, array_lba: int, array_crc: int) -> list[object]:
        return [
            b"EFI PART",
            0x10000,
            self.header_size,
            0,
            0,
            my_lba,
            alternate,
            self.first_usable,
            self.last_usable,
            self.disk_guid,
            array_lba,
            self.count,
            self.entry_size,
            array_crc,
        ]

    def expected(self) -> PartitionTable:
        """As efi.c registers it: numbers up to 255, a note when more are in use."""
        parts = []
        notes: tuple[str, ...] = ()
        for index, (ptype, puuid, first, last, label) in sorted(self.entries.items()):
            if index >= 255:
                notes = ("GPT partitions numbered above 255 ...",)
                continue
            name = label.encode("utf-16-le")[:72].decode("utf-16-le", "replace")
            parts.append(
                Partition(
                    index + 1,
                    first * self.ss,
                    (last - first + 1) * self.ss,
                    guid_text(ptype),
                    guid_text(puuid),
                    name,
                )
            )
        return PartitionTable("gpt", self.ss, guid_text(self.disk_guid), tuple(parts), notes)


# The header fields a mutation may set: all but the ones fixed by construction.
HEADER_FIELDS = {k: v for k, v in GPT_FIELDS.items() if k not in ("header_crc", "disk_guid")}
WIDTH = {1: 0xFFFFFFFF, 2: 0xFFFFFFFF, 11: 0xFFFFFFFF, 12: 0xFFFFFFFF, 13: 0xFFFFFFFF}


def interesting(d: Draw, m: GptModel) -> int:
    return pick(
        d,
        [
            0,
            1,
            2,
            3,
            m.first_usable - 1,
            m.first_usable,
            m.last_usable,
            m.last_usable + 1,
            m.backup_array,
            m.last - 1,
            m.last,
            m.last + 1,
            m.last + m.grown,
            m.last + m.grown + 1,
            m.count,
            m.count + 1,
            16384,
            16385,
            2**31,
            2**32 - 1,
            2**32,
            2**63,
            2**64 - 1,
            d.integer(0, 2**64 - 1),
        ],
    )


def build_gpt(d: Draw, mutate: bool) -> Case:
    m = GptModel(d)
    array = m.array()
    headers = {
        "primary": m.header(1, m.last, m.primary_array, 0),
        "backup": m.header(m.last, 1, m.backup_array, 0),
    }
    arrays = {"primary": bytearray(array), "backup": bytearray(array)}
    mutations: list[str] = []
    fix_crc = {"primary": True, "backup": True}
    size: int | None = None
    benign = True  # the table must still read exactly as modelled
    destroyed: set[str] = set()
    for _ in range(d.integer(1, 4) if mutate else 0):
        which = pick(d, ["primary", "backup", "both"])
        targets = ["primary", "backup"] if which == "both" else [which]
        op = pick(
            d,
            [
                "field",
                "field",
                "entry",
                "entry",
                "duplicate",
                "destroy",
                "flip",
                "size",
                "nocrc",
            ],
        )
        mutations.append(f"{op}:{which}")
        if op == "destroy" and which != "both":
            # A destroyed backup changes nothing; a destroyed primary loses the
            # table (efi.c find_valid_gpt() never falls back to the backup).
            headers[which] = [b"\0" * 8, *headers[which][1:]]
            destroyed.add(which)
            continue
        benign = False
        if op == "field":
            name = pick(d, list(HEADER_FIELDS))
            index = HEADER_FIELDS[name]
            value: object = interesting(d, m) & WIDTH.get(index, 2**64 - 1)
            if name == "signature":
                value = pick(d, [b"EFI PART", b"EFI PARU", b"\0" * 8])
            mutations[-1] += f":{name}={value!r}"
            for t in targets:
                headers[t][index] = value
        elif op == "entry" and m.count:
            index = pick(d, [*m.entries, d.integer(0, m.count - 1)]) if m.entries else 0
            field = pick(d, ["first", "last", "type", "swap"])
            mutations[-1] += f":{index}.{field}"
            for t in targets:
                offset = index * m.entry_size
                ptype, puuid, first, last, _, name_ = GPT_ENTRY.unpack_from(arrays[t], offset)
                if field == "first":
                    first = interesting(d, m)
                elif field == "last":
                    last = interesting(d, m)
                elif field == "type":
                    ptype = pick(d, [bytes(16), LINUX])
                else:
                    first, last = last, first
                GPT_ENTRY.pack_into(arrays[t], offset, ptype, puuid, first, last, 0, name_)
        elif op == "duplicate" and m.entries and m.count > 1:
            src = pick(d, list(m.entries)) * m.entry_size
            dst = d.integer(0, m.count - 1) * m.entry_size
            for t in targets:
                arrays[t][dst : dst + m.entry_size] = arrays[t][src : src + m.entry_size]
        elif op == "flip":
            for t in targets:
                base = 0 if t == "primary" else 1
                region = pick(d, ["header", "array"])
                if region == "array" and arrays[t]:
                    at = d.integer(0, len(arrays[t]) - 1)
                    arrays[t][at] = d.integer(0, 255)
                else:
                    at = d.integer(0, 91)
                    raw = bytearray(GPT_HEADER.pack(*headers[t]))
                    raw[at] = d.integer(0, 255)
                    headers[t] = list(GPT_HEADER.unpack(bytes(raw)))
                mutations[-1] += f":{region}{base}@{at}"
        elif op == "size":
            size = max(0, m.size + pick(d, [-m.ss, -1, 1, m.ss, -(m.ss * m.array_lbas), 4096]))
        elif op == "nocrc":
            for t in targets:
                fix_crc[t] = False
                headers[t][3] = d.integer(0, 2**32 - 1)
    image = Img(m.size)
    pmbr: list[tuple[int, int, int, int] | None] = [(0, 0xEE, 1, min(m.last, 0xFFFFFFFF))]
    if m.hybrid:
        pmbr.append((0x80, 0x0C, m.first_usable, 1))
    image.write(0, mbr_sector(pmbr, 0x12345678))
    for t, lba in (("primary", 1), ("backup", m.last)):
        fields = headers[t]
        array_lba = fields[10]
        if isinstance(array_lba, int) and 0 <= array_lba * m.ss < m.size:
            image.write(array_lba * m.ss, bytes(arrays[t]))
            # The header's entries CRC covers what it points at (unless told not to fix).
            if fix_crc[t] and isinstance(fields[11], int) and isinstance(fields[12], int):
                length = fields[11] * fields[12]
                if 0 <= length <= 4 * MiB:
                    fields[13] = zlib.crc32(bytes(arrays[t]).ljust(length, b"\0")[:length])
        image.write(lba * m.ss, gpt_header(fields, m.ss, fix_crc[t]))
    read_as: int | None = m.ss
    if m.ss in (512, 4096) and chance(d, 2):
        read_as = None  # let read_table probe
    expected, refused = None, None
    if benign and size is None:
        if "primary" in destroyed:
            refused = "GPT header at LBA 1"
        elif m.entry_size != 128:
            refused = f"entry size is {m.entry_size}; the kernel accepts only 128"
        else:
            expected = m.expected()
    return Case(image, read_as, expected, mutations, size, refused)


# --- MBR model ---------------------------------------------------------------------------

EXTENDED = (0x05, 0x0F, 0x85)
DATA_TYPES = (0x83, 0x82, 0x07, 0x0C, 0x8E, 0xFD)


class Chunk:
    """One EBR of a chain: its sector, its logical (relative offset, length) if any."""

    def __init__(self, ebr: int, logical: tuple[int, int] | None) -> None:
        self.ebr = ebr
        self.logical = logical


def build_mbr(d: Draw, mutate: bool) -> Case:
    ss = pick(d, [512, 512, 512, 4096])
    read_as: int | None = 4096 if ss == 4096 else pick(d, [None, 512])
    total = d.integer(64, 65536 if ss == 512 else 8192)
    long_chain = mutate and chance(d, 12)
    if long_chain:
        total = max(total, 1200)
    slots: list[tuple[int, int, int, int] | None] = [None] * 4
    n_primary = d.integer(1, 4)
    used = sorted(d.integer(0, 3) for _ in range(n_primary))
    used = sorted(set(used))
    layout = spans(d, 1, total, len(used))
    used = used[: len(layout)]
    n_ext = 0
    chains: dict[int, list[Chunk]] = {}
    for slot, (start, end) in zip(used, layout, strict=True):
        extended = n_ext < 2 and (end - start) >= 4 and chance(d, 2 if n_ext == 0 else 5)
        if long_chain and n_ext == 0 and end - start >= 600:
            extended = True
        if extended:
            n_ext += 1
            ptype = pick(d, EXTENDED)
            chunks: list[Chunk] = []
            if long_chain and n_ext == 1 and end - start >= 600:
                chunks = [Chunk(start + 2 * i, (1, 1)) for i in range(min(300, (end - start) // 2))]
            else:
                k = d.integer(0, 10)
                pos = start
                for _ in range(k):
                    if end - pos < 2:
                        break
                    ebr = pos if not chunks else pos + d.integer(0, 2)
                    if ebr >= end - 1:
                        break
                    gap = d.integer(1, 3)
                    if ebr + gap >= end:
                        break
                    length = d.integer(1, max(1, min(64, end - ebr - gap)))
                    length = min(length, end - ebr - gap)
                    has_logical = not chance(d, 8)
                    chunks.append(Chunk(ebr, (gap, length) if has_logical else None))
                    pos = ebr + gap + length
                if chunks and chunks[0].ebr != start:
                    chunks[0] = Chunk(start, chunks[0].logical)
            # The chain starts at the extended partition; the others in any order.
            rest = chunks[1:]
            if not long_chain:
                rest = [rest.pop(d.integer(0, len(rest) - 1)) for _ in range(len(rest))]
            chains[slot] = chunks[:1] + rest
            slots[slot] = (0, ptype, start, end - start)
        else:
            slots[slot] = (pick(d, [0x00, 0x80]), pick(d, DATA_TYPES), start, end - start)
    disk_id = d.integer(0, 2**32 - 1)
    image = Img(total * ss)
    ebr_sectors: dict[int, list[tuple[int, int, int, int] | None]] = {}
    for slot, chain in chains.items():
        ext = slots[slot]
        assert ext is not None
        ext_start, ext_len = ext[2], ext[3]
        if not chain:
            if chance(d, 2):
                ebr_sectors[ext_start] = [None] * 4  # signed, empty: no logicals
            continue
        for i, chunk in enumerate(chain):
            entries: list[tuple[int, int, int, int] | None] = [None] * 4
            data_slot = d.integer(0, 1)
            if chunk.logical is not None:
                gap, length = chunk.logical
                entries[data_slot] = (pick(d, [0, 0x80]), pick(d, DATA_TYPES), gap, length)
            if i + 1 < len(chain):
                nxt = chain[i + 1]
                link_len = (nxt.logical[0] + nxt.logical[1]) if nxt.logical else 1
                link_slot = pick(d, [s for s in range(4) if s != data_slot])
                link = (0, pick(d, EXTENDED), nxt.ebr - ext_start, link_len)
                entries[link_slot] = link
            if chance(d, 6):  # garbage that does not fit: the kernel skips slots 3 and 4
                free = [s for s in (2, 3) if entries[s] is None]
                if free:
                    entries[pick(d, free)] = (0, 0x83, ext_len + 5, 7)
            ebr_sectors[chunk.ebr] = entries
    mutations: list[str] = []
    benign = True
    unsigned: set[int] = set()
    mbr_entries = list(slots)
    if long_chain:
        mutations.append("long-chain")
    for _ in range(d.integer(1, 4) if mutate else 0):
        benign = False
        op = pick(d, ["loop", "self", "outside", "field", "field", "unsign", "overlap", "zero"])
        ebrs = sorted(ebr_sectors)
        if op in ("loop", "self", "outside", "unsign", "field") and ebrs and chains:
            slot = pick(d, list(chains))
            ext = slots[slot]
            chain = chains[slot]
            assert ext is not None
            if not chain:
                continue
            at = pick(d, chain)
            entries = ebr_sectors[at.ebr]
            link_slot = next((s for s, e in enumerate(entries) if e and e[1] in EXTENDED), 1)
            if op == "loop":
                target = pick(d, chain).ebr
                entries[link_slot] = (0, 0x05, target - ext[2], 1)
            elif op == "self":
                entries[link_slot] = (0, 0x05, at.ebr - ext[2], 1)
            elif op == "outside":
                entries[link_slot] = (0, 0x05, pick(d, [ext[3], ext[3] + 1, 2**32 - 1]), 1)
            elif op == "unsign":
                unsigned.add(at.ebr)  # written without 0x55AA
            else:
                s = d.integer(0, 3)
                old = entries[s] or (0, 0x83, 1, 1)
                which = d.integer(0, 3)
                values = [0, 1, 2, ext[3] - 1, ext[3], total, 2**32 - 1, d.integer(0, 2**32 - 1)]
                new = list(old)
                new[which] = pick(d, [0x00, 0x80, 0x01]) if which == 0 else pick(d, values)
                if which == 1:
                    new[1] = pick(d, [0, 0x05, 0x0F, 0x83, 0xEE])
                entries[s] = (new[0], new[1], new[2], new[3])
            mutations.append(f"{op}@{at.ebr}")
        elif op == "overlap" and len([e for e in mbr_entries if e]) >= 1:
            s = pick(d, [i for i, e in enumerate(mbr_entries) if e])
            e = mbr_entries[s]
            assert e is not None
            other = d.integer(0, 3)
            mbr_entries[other] = (0, pick(d, [0x83, *EXTENDED]), e[2] + d.integer(-1, 1), e[3])
            mutations.append(f"overlap:{s}->{other}")
        else:
            s = d.integer(0, 3)
            e = mbr_entries[s] or (0, 0x83, 1, 1)
            field = d.integer(1, 3)
            vals = [0, 1, total - 1, total, total + 1, 2**32 - 1, d.integer(0, 2**32 - 1)]
            new = list(e)
            new[field] = pick(d, [0, 0x05, 0x83, 0xEE]) if field == 1 else pick(d, vals)
            mbr_entries[s] = (new[0], new[1], new[2], new[3])
            mutations.append(f"mbr-field:{s}.{field}")
    image.write(0, mbr_sector(mbr_entries, disk_id))
    for ebr, entries in ebr_sectors.items():
        sector = mbr_sector(entries)
        if ebr in unsigned:
            sector = sector[:510] + b"\0\0"
        image.write(ebr * ss, sector)
    expected = None
    if benign:
        expected = mbr_expected(slots, chains, ss, disk_id)
    return Case(image, read_as, expected, mutations)


def mbr_expected(
    slots: list[tuple[int, int, int, int] | None],
    chains: dict[int, list[Chunk]],
    ss: int,
    disk_id: int,
) -> PartitionTable | None:
    """As msdos.c registers it: extended partitions as their stub, logicals up to 255."""
    if not any(slots):
        return None
    parts: list[Partition] = []
    notes: tuple[str, ...] = ()
    number = 5
    for slot, entry in enumerate(slots):
        if entry is None:
            continue
        boot, ptype, start, count = entry
        if slot not in chains:
            parts.append(
                Partition(
                    slot + 1, start * ss, count * ss, f"0x{ptype:02x}", None, None, boot == 0x80
                )
            )
            continue
        logicals = [chunk.logical and (chunk.ebr, *chunk.logical) for chunk in chains[slot]]
        for i, logical in enumerate(logicals):
            if not logical:
                continue
            if number > 255:
                notes = ("logical partitions after number 255 ...",)
                break
            ebr, gap, length = logical
            parts.append(Partition(number, (ebr + gap) * ss, length * ss, "", None, None))
            number += 1
            if number > 255 and any(logicals[i + 1 :]):
                notes = ("logical partitions after number 255 ...",)
                break
        stub = min(count * ss, max(ss, 1024))
        parts.append(Partition(slot + 1, start * ss, stub, f"0x{ptype:02x}", None, None, False))
    return PartitionTable(
        "dos", ss, f"0x{disk_id:08x}", tuple(sorted(parts, key=lambda p: p.number)), notes
    )


# --- checking ------------------------------------------------------------------------------


def outline(table: PartitionTable) -> list[tuple[int, int, int]]:
    return [(p.number, p.start, p.size) for p in table.partitions]


def read_case(case: Case) -> PartitionTable | None:
    with case.image.fd() as fd:
        return read_table(fd, case.size, case.read_as, path="fuzz.img")


def assert_sane(table: PartitionTable, size: int) -> None:
    """What the kernel's parsers guarantee (not: no overlaps), and what BLKPG is given."""
    assert table.scheme in ("gpt", "dos")
    assert table.sector_size in (512, 1024, 2048, 4096)
    ss = table.sector_size
    size -= size % 512
    numbers = [p.number for p in table.partitions]
    assert numbers == sorted(set(numbers)), numbers
    assert all(1 <= n <= 255 for n in numbers), numbers
    for p in table.partitions:
        assert p.size > 0 and p.size % 512 == 0, p
        assert p.start >= 0 and p.start % ss == 0, p
        assert p.start + p.size <= size, f"{p} past the end of the {size}-byte device"
    plan, _ = blkpg_plan(table, ss)
    assert {n for n, _, _ in plan} <= set(numbers)
    ordered = sorted((start, start + length, n) for n, start, length in plan)
    for start, end, n in ordered:
        assert start % ss == 0 and end % ss == 0 and 0 <= start < end <= size, (n, start, end)
    for (_, end, a), (start, _, b) in itertools.pairwise(ordered):
        assert end <= start, f"planned partitions {a} and {b} overlap"


def plan_outline(table: PartitionTable) -> list[tuple[int, int, int]]:
    return blkpg_plan(table, table.sector_size)[0]


def check_case(case: Case) -> PartitionTable | None:
    """Run read_table on ``case`` and hold it to the oracle; returns the table read."""
    try:
        table = read_case(case)
    except PartitionTableError as exc:
        assert case.expected is None, f"valid table refused ({case.mutations}): {exc}"
        assert exc.errno and "fuzz.img" in str(exc)
        if case.refused is not None:
            assert re.search(case.refused, str(exc)), f"{case.mutations}: {exc}"
        return None
    assert case.refused is None, f"{case.mutations}: read, not refused ({case.refused})"
    if case.expected is not None:
        assert table is not None, "valid table not found"
        if table.scheme == "dos":  # MBR types of logicals are not modelled
            assert outline(table) == outline(case.expected)
            assert table.disk_id == case.expected.disk_id
        else:
            assert table.partitions == case.expected.partitions
            assert table._values[:3] == case.expected._values[:3]
        # The wording of notes is tested elsewhere; here whether there are any.
        assert bool(table.notes) == bool(case.expected.notes), table.notes
    if table is not None:
        assert_sane(table, case.size)
    return table


def build_case(d: Draw) -> Case:
    mutate = d.integer(0, 2) > 0
    return build_gpt(d, mutate) if d.integer(0, 1) else build_mbr(d, mutate)


# --- hypothesis ---------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_generated_gpt_reads_back_exactly(data: st.DataObject) -> None:
    case = build_gpt(HypothesisDraw(data), mutate=False)
    assert case.expected is not None or case.refused is not None
    check_case(case)


@FUZZ
@given(data=st.data())
def test_generated_mbr_reads_back_exactly(data: st.DataObject) -> None:
    case = build_mbr(HypothesisDraw(data), mutate=False)
    check_case(case)


@FUZZ
@given(data=st.data())
def test_mutated_gpt_never_escapes(data: st.DataObject) -> None:
    check_case(build_gpt(HypothesisDraw(data), mutate=True))


@FUZZ
@given(data=st.data())
def test_mutated_mbr_never_escapes(data: st.DataObject) -> None:
    check_case(build_mbr(HypothesisDraw(data), mutate=True))


def test_seeded_random_cases() -> None:
    """Plain PRNG-driven cases: different shapes than hypothesis' shrinking-friendly draws."""
    seed = int(os.environ.get("LOOPDEV_FUZZ_SEED", "0")) or random.randrange(1 << 32)
    rng = random.Random(seed)
    deadline = time.monotonic() + (60 if LONG else 4)
    n = 0
    while time.monotonic() < deadline:
        case = build_case(RandomDraw(rng))
        try:
            check_case(case)
        except AssertionError as exc:
            raise AssertionError(f"seed {seed}, case {n}, {case.mutations}: {exc}") from exc
        n += 1
    assert n > 100


def test_self_check_oracle_detects_a_wrong_table() -> None:
    """The oracle is not vacuous: a valid GPT read back must equal the model exactly."""
    rng = random.Random(1)
    for _ in range(50):
        case = build_gpt(RandomDraw(rng), mutate=False)
        if case.expected is not None and case.expected.partitions:
            break
    assert case.expected is not None and case.expected.partitions
    table = read_case(case)
    assert table == case.expected
    wrong = PartitionTable("gpt", case.expected.sector_size, None, case.expected.partitions)
    assert table != wrong
    with pytest.raises(AssertionError):
        check_case(Case(case.image, case.read_as, wrong, case.mutations))
    with pytest.raises(AssertionError):
        check_case(Case(case.image, case.read_as, None, case.mutations, refused="x"))


# --- attached for real ---------------------------------------------------------------------

DEVICE_EXAMPLES = 60 if LONG else 12


def test_generated_images_attach_as_read(tmp_path: Path, devices: None) -> None:
    """What attach(partscan=True) registers is read_table's answer as BLKPG can take it
    (blkpg_plan); a table it refuses raises PartitionTableError and leaves nothing bound
    or registered."""
    from helpers import bound_under

    from loopdev.device import attach

    rng = random.Random()
    for n in range(DEVICE_EXAMPLES):
        case = build_case(RandomDraw(rng))
        if case.size != case.image.size:
            continue  # a size mismatch cannot be attached
        path = case.image.save(tmp_path / f"fuzz{n}.img")
        sector = case.read_as or 512
        if case.image.size % sector or case.image.size < sector:
            continue
        try:
            expected = _read_path(path, sector)
        except PartitionTableError:
            expected = None
            with pytest.raises(PartitionTableError):
                attach(path, partscan=True, block_size=sector, direct_io=False)
        else:
            with attach(path, partscan=True, block_size=sector, direct_io=False) as dev:
                got = [(p.number, p.start, p.size) for p in dev.partitions]
                want = plan_outline(expected) if expected is not None else []
                assert got == want, f"{case.mutations}: registered {got}, read {want}"
        assert bound_under(str(path)) == []
        path.unlink()


def _read_path(path: Path, sector: int) -> PartitionTable | None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return read_table(fd, os.fstat(fd).st_size, sector, path=str(path))
    finally:
        os.close(fd)


# --- atheris -------------------------------------------------------------------------------

HAVE_ATHERIS = importlib.util.find_spec("atheris") is not None


def atheris_one_input(data: bytes) -> None:
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    check_case(build_case(AtherisDraw(atheris.FuzzedDataProvider(data))))


@pytest.mark.skipif(not HAVE_ATHERIS, reason="atheris not installed (optional)")
def test_atheris_harness(tmp_path: Path) -> None:
    """Coverage-guided: libFuzzer drives the same generators, bounded in runs and time."""
    seconds = 120 if LONG else 8
    out = subprocess.run(
        [
            sys.executable,
            __file__,
            f"-max_total_time={seconds}",
            "-runs=2000000",
            f"-artifact_prefix={tmp_path}/",
            "-print_final_stats=1",
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert "Done" in out.stderr or "stat::number_of_executed_units" in out.stderr


def main(argv: list[str]) -> None:
    """``python tests/test_fuzz_parttable.py [libFuzzer flags]``: run atheris."""
    import atheris  # type: ignore[import-untyped,import-not-found,unused-ignore]

    # Coverage for the table reader only (instrumenting everything loaded, hypothesis
    # included, takes a minute): load it again instrumented and use that copy.
    import loopdev.parttable

    with atheris.instrument_imports(include=["loopdev.parttable"]):
        fresh = importlib.reload(loopdev.parttable)
    globals().update(
        Partition=fresh.Partition, PartitionTable=fresh.PartitionTable, read_table=fresh.read_table
    )
    atheris.Setup(argv, atheris_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
