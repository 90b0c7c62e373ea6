"""Partitions of a loop device: the kernel's scan, or ours through BLKPG.

The same result on every kernel: after :func:`ensure_registered` each
partition of the image is a block device with the start and size the
kernel's own parser would give it, whether the kernel parsed the table itself
or has no parser for it (built without ``CONFIG_MSDOS_PARTITION`` and
``CONFIG_EFI_PARTITION``) and loopdev registered it with BLKPG.  What the
kernel would truncate or skip, loopdev truncates or skips too, with a warning
(:func:`loopdev.errors.warn`).
"""

from __future__ import annotations

import os
import stat
import time

from loopdev import _native
from loopdev.errors import LoopError, warn
from loopdev.parttable import _EXTENDED_TYPES, PartitionTable, read_table
from loopdev.sysfs import SYS_BLOCK, is_gone

SECTOR = 512  # sysfs start and size are in 512-byte sectors whatever the block size


# typing.NamedTuple for the type checker only; collections' at run time.
TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from typing import NamedTuple

    class _Fields(NamedTuple):
        number: int
        start: int
        size: int
        major: int
        minor: int
        name: str
else:

    class _Fields(tuple):
        """namedtuple's behaviour, written out: collections (namedtuple's module,
        with operator, keyword and reprlib) was 1.5-1.8 ms of ``import loopdev``
        (issue 17)."""

        __slots__ = ()
        _fields = ("number", "start", "size", "major", "minor", "name")

        def __new__(cls, number, start, size, major, minor, name):
            return tuple.__new__(cls, (number, start, size, major, minor, name))

        number = property(lambda self: self[0], doc="Partition number")
        start = property(lambda self: self[1], doc="Start in bytes")
        size = property(lambda self: self[2], doc="Size in bytes")
        major = property(lambda self: self[3], doc="Device major")
        minor = property(lambda self: self[4], doc="Device minor")
        name = property(lambda self: self[5], doc="Kernel name (loopNpM)")

        def __repr__(self):
            fields = ", ".join(f"{k}={v!r}" for k, v in zip(self._fields, self, strict=True))
            return f"{type(self).__name__}({fields})"

        def __getnewargs__(self):
            return tuple(self)

        def _asdict(self):
            return dict(zip(self._fields, self, strict=True))

        def _replace(self, **changes):
            return type(self)(**{**self._asdict(), **changes})


class PartitionDevice(_Fields):
    """A registered partition: number, byte start and size, ``major:minor``, node."""

    __slots__ = ()

    @property
    def path(self) -> str:
        return f"/dev/{self.name}"


def _read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def list_partitions(name: str) -> list[PartitionDevice]:
    """The partitions sysfs lists for ``name`` (e.g. ``loop3``), by number."""
    base = f"{SYS_BLOCK}/{name}"
    found = []
    try:
        entries = os.listdir(base)
    except OSError as exc:
        if is_gone(exc):
            return []
        raise
    for entry in entries:
        if not entry.startswith(f"{name}p"):
            continue
        try:
            major, minor = _read(f"{base}/{entry}/dev").split(":")
            found.append(
                PartitionDevice(
                    number=int(_read(f"{base}/{entry}/partition")),
                    start=int(_read(f"{base}/{entry}/start")) * SECTOR,
                    size=int(_read(f"{base}/{entry}/size")) * SECTOR,
                    major=int(major),
                    minor=int(minor),
                    name=entry,
                )
            )
        except OSError as exc:
            if not is_gone(exc):
                raise
            continue  # deleted while we looked
    return sorted(found)


def ensure_registered(dev_fd: int, index: int, backing: str | None = None) -> int:
    """Register the image's partitions with BLKPG where the kernel's scan found none.

    Returns how many loopdev registered. A table the kernel would refuse
    raises :class:`~loopdev.errors.PartitionTableError` and registers
    nothing; partitions the kernel would skip, or that BLKPG cannot add as
    the kernel would, are left out with a warning (never an error).
    """
    name = f"loop{index}"
    if list_partitions(name):
        return 0  # the kernel's own scan found them
    device = f"/dev/{name}"
    size = _native.get_u64(dev_fd, _native.BLKGETSIZE64, device=device)
    sector = _native.logical_block_size(dev_fd, device=device)
    table = read_table(dev_fd, size, sector, path=backing, device=device)
    if table is None:
        return 0
    where = f"{device} ({backing})" if backing else device
    plan, notes = blkpg_plan(table, sector)
    for note in (*table.notes, *notes):
        warn(f"{where}: {note}")
    added = 0
    try:
        for number, start, length in plan:
            _native.blkpg(dev_fd, _native.BLKPG_ADD_PARTITION, number, start, length, device=device)
            added += 1
    except BaseException:
        _native.delete_partitions(dev_fd, index)
        raise
    return added


def blkpg_plan(
    table: PartitionTable, block_size: int
) -> tuple[list[tuple[int, int, int]], list[str]]:
    """The ``(number, start, length)`` BLKPG adds for ``table``, and notes on what differs.

    The kernel's parser registers partitions with add_partition() directly;
    BLKPG_ADD_PARTITION (block/ioctl.c blkpg_do_ioctl(), bdev_add_partition())
    also refuses a partition that overlaps a registered one (EBUSY) and a
    length that is not whole logical blocks (EINVAL).  So, in the kernel's
    order (by number):

    - a partition overlapping one already planned is left out, except that
      an extended partition's stub gives way to a logical partition inside
      it (one that starts a 512-byte sector after its EBR): the stub is
      shortened, or left out when the logical starts where it does;
    - a partition the kernel truncated at a device end that is not a whole
      number of blocks (file size not a multiple of the block size) is cut
      to whole blocks.
    """
    planned: dict[int, tuple[int, int]] = {}  # number -> (start, length)
    notes: list[str] = []
    spans: list[tuple[int, int, int]] = []  # (start, end, number), sorted, disjoint
    stubs = set()
    if table.scheme == "dos":
        stubs = {
            p.number
            for p in table.partitions
            if p.number <= 4 and int(p.type, 16) in _EXTENDED_TYPES
        }
    for part in table.partitions:
        start, length = part.start, part.size
        if length % block_size:
            length -= length % block_size
            if not length:
                notes.append(
                    f"partition {part.number} is not registered: truncated at the end of "
                    f"the device it is less than one {block_size}-byte block"
                )
                continue
            notes.append(
                f"partition {part.number} is registered with {length} bytes instead of "
                f"{part.size}: BLKPG takes whole {block_size}-byte blocks"
            )
        end = start + length
        if not spans or start >= spans[-1][1]:
            # After everything planned so far (the usual layout): no overlap.
            planned[part.number] = (start, length)
            spans.append((start, end, part.number))
            continue
        at = max(_first_at_or_after(spans, start) - 1, 0)
        hits = []
        while at < len(spans) and spans[at][0] < end:
            if spans[at][1] > start:
                hits.append(spans[at])
            at += 1
        for hit in hits:
            hit_start, hit_end, number = hit
            if number not in stubs:
                continue
            # The kernel's stub overlaps a real partition: keep the partition.
            spans.remove(hit)
            if hit_start < start:
                planned[number] = (hit_start, start - hit_start)
                _insert_sorted(spans, (hit_start, start, number))
                notes.append(
                    f"extended partition {number} is registered with {start - hit_start} "
                    f"bytes instead of {hit_end - hit_start}: partition {part.number} starts "
                    "inside the kernel's stub, and BLKPG refuses overlaps"
                )
            else:
                del planned[number]
                notes.append(
                    f"extended partition {number} is not registered: partition "
                    f"{part.number} overlaps the kernel's stub, and BLKPG refuses overlaps"
                )
        hits = [hit for hit in hits if hit[2] not in stubs]
        if hits:
            others = ", ".join(str(hit[2]) for hit in hits)
            notes.append(
                f"partition {part.number} (bytes {start}..{end - 1}) is not registered: it "
                f"overlaps partition {others}; the kernel registers both, BLKPG refuses overlaps"
            )
            continue
        planned[part.number] = (start, length)
        _insert_sorted(spans, (start, end, part.number))
    # By number: planned was filled in the table's order, which is by number.
    return [(number, start, length) for number, (start, length) in planned.items()], notes


# Not the bisect module: importing it cost 0.3 ms of `import loopdev` (issue 17).
def _first_at_or_after(spans: list[tuple[int, int, int]], start: int) -> int:
    """The index of the first span that starts at or after ``start`` (spans sorted)."""
    lo, hi = 0, len(spans)
    while lo < hi:
        mid = (lo + hi) // 2
        if spans[mid][0] < start:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _insert_sorted(spans: list[tuple[int, int, int]], span: tuple[int, int, int]) -> None:
    at = _first_at_or_after(spans, span[0])
    while at < len(spans) and spans[at] < span:
        at += 1
    spans.insert(at, span)


def wait_for_nodes(parts: list[PartitionDevice], timeout: float = 5.0) -> None:
    """Wait until ``/dev`` has a node for each partition (devtmpfs adds them async)."""
    deadline = time.monotonic() + timeout
    delay = 0.0002
    for part in parts:
        while True:
            try:
                st = os.stat(part.path)
                if stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(part.major, part.minor):
                    break
            except FileNotFoundError:
                pass
            if time.monotonic() >= deadline:
                raise LoopError(
                    2,
                    f"no device node appeared for {part.name} within {timeout:g} s "
                    "(no devtmpfs? use a private node directory)",
                    device=part.path,
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
