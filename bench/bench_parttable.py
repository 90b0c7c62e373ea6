"""Time loopdev.parttable.read_table on a GPT with all 128 entries in use.

Run: ``python bench/bench_parttable.py [--iterations N]``.  The image is a
sparse file in a temporary directory, made with sfdisk when it is installed
and by hand otherwise; nothing is attached to a loop device.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

try:
    from loopdev.parttable import read_table
except ImportError:  # running from a checkout without loopdev installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from loopdev.parttable import read_table

SIZE = 12 << 20
ENTRIES = 128
LINUX = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8477de4")


def build_with_sfdisk(sfdisk: str, path: Path) -> None:
    script = "label: gpt\n" + "".join(
        f'start={2048 + i * 128}, size=128, type=L, name="part{i + 1}"\n' for i in range(ENTRIES)
    )
    subprocess.run([sfdisk, "--quiet", str(path)], input=script, text=True, check=True)


def build_by_hand(path: Path) -> None:
    """Primary and backup GPT with 128 Linux partitions of 64 KiB."""
    last_lba = SIZE // 512 - 1
    first_usable, last_usable = 34, last_lba - 33
    array = b"".join(
        struct.pack(
            "<16s16sQQQ72s",
            LINUX.bytes_le,
            uuid.uuid4().bytes_le,
            2048 + i * 128,
            2048 + i * 128 + 127,
            0,
            f"part{i + 1}".encode("utf-16-le"),
        )
        for i in range(ENTRIES)
    )
    pmbr = bytearray(512)
    struct.pack_into("<B3sB3sII", pmbr, 446, 0, b"\0\2\0", 0xEE, b"\xff\xff\xff", 1, last_lba)
    pmbr[510:512] = b"\x55\xaa"
    disk_guid = uuid.uuid4().bytes_le
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(pmbr)
        for my_lba, alternate, array_lba in (
            (1, last_lba, 2),
            (last_lba, 1, last_usable + 1),
        ):
            header = bytearray(
                struct.pack(
                    "<8sIIIIQQQQ16sQIII",
                    b"EFI PART",
                    0x10000,
                    92,
                    0,
                    0,
                    my_lba,
                    alternate,
                    first_usable,
                    last_usable,
                    disk_guid,
                    array_lba,
                    ENTRIES,
                    128,
                    zlib.crc32(array),
                )
            )
            struct.pack_into("<I", header, 16, zlib.crc32(header))
            f.seek(array_lba * 512)
            f.write(array)
            f.seek(my_lba * 512)
            f.write(header)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args()

    path_env = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    sfdisk = shutil.which("sfdisk", path=path_env)
    with tempfile.TemporaryDirectory(prefix="bench-parttable-") as tmp:
        image = Path(tmp) / "gpt128.img"
        if sfdisk:
            image.touch()
            os.truncate(image, SIZE)
            build_with_sfdisk(sfdisk, image)
        else:
            build_by_hand(image)
        fd = os.open(image, os.O_RDONLY)
        try:
            table = read_table(fd, SIZE, path=str(image))
            assert table is not None and len(table.partitions) == ENTRIES, table
            for _ in range(200):  # warm caches
                read_table(fd, SIZE)
            samples = []
            clock = time.perf_counter_ns
            for _ in range(args.iterations):
                t0 = clock()
                read_table(fd, SIZE)
                samples.append(clock() - t0)
        finally:
            os.close(fd)

    samples.sort()
    p90 = samples[int(len(samples) * 0.9)]
    print(
        f"read_table, GPT with {ENTRIES} partitions "
        f"({'sfdisk' if sfdisk else 'hand-made'} image), "
        f"{args.iterations} parses, Python {sys.version.split()[0]}:"
    )
    print(f"  median {statistics.median(samples) / 1000:8.1f} us")
    print(f"  p90    {p90 / 1000:8.1f} us")
    print(f"  min    {samples[0] / 1000:8.1f} us")


if __name__ == "__main__":
    main()
