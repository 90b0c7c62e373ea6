"""The cdef against the kernel headers: every constant and struct layout.

cffi only reports a wrongly typed field at first use, so each struct is
instantiated and its layout compared with what the C compiler says.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest
from loopdev._loopdev_ffi import ffi, lib

CONSTANTS = [
    "LO_NAME_SIZE",
    "LO_KEY_SIZE",
    "LOOP_MAJOR",
    "LO_FLAGS_READ_ONLY",
    "LO_FLAGS_AUTOCLEAR",
    "LO_FLAGS_PARTSCAN",
    "LO_FLAGS_DIRECT_IO",
    "LOOP_SET_FD",
    "LOOP_CLR_FD",
    "LOOP_SET_STATUS64",
    "LOOP_GET_STATUS64",
    "LOOP_CHANGE_FD",
    "LOOP_SET_CAPACITY",
    "LOOP_SET_DIRECT_IO",
    "LOOP_SET_BLOCK_SIZE",
    "LOOP_CONFIGURE",
    "LOOP_CTL_ADD",
    "LOOP_CTL_REMOVE",
    "LOOP_CTL_GET_FREE",
    "BLKFLSBUF",
    "BLKSSZGET",
    "BLKGETSIZE64",
    "BLKGETDISKSEQ",
    "BLKPG",
    "BLKPG_ADD_PARTITION",
    "BLKPG_DEL_PARTITION",
]
STRUCTS = {
    "loop_info64": [
        "lo_device",
        "lo_inode",
        "lo_rdevice",
        "lo_offset",
        "lo_sizelimit",
        "lo_number",
        "lo_encrypt_type",
        "lo_encrypt_key_size",
        "lo_flags",
        "lo_file_name",
        "lo_crypt_name",
        "lo_encrypt_key",
        "lo_init",
    ],
    "loop_config": ["fd", "block_size", "info"],
    "blkpg_partition": ["start", "length", "pno"],
}


# The probe prints only what the build's headers define: the shim builds against
# headers older than some features (manylinux2014 has 3.10-based ones) and then
# uses its own fallbacks, which the ABI tests below check instead. A macro is
# probed under #ifdef of itself; LO_FLAGS_* are enum constants, so each is
# probed under a macro that came with it (LO_FLAGS_DIRECT_IO and
# LOOP_SET_DIRECT_IO: both 4.4), or unguarded where every header has it.
GUARDS = {
    "LO_FLAGS_READ_ONLY": None,
    "LO_FLAGS_AUTOCLEAR": None,
    "LO_FLAGS_PARTSCAN": None,
    "LO_FLAGS_DIRECT_IO": "LOOP_SET_DIRECT_IO",
}
STRUCT_GUARDS = {"loop_config": "LOOP_CONFIGURE"}  # struct and ioctl: both 5.8


def _guarded(guard: str | None, lines: list[str]) -> list[str]:
    return lines if guard is None else [f"#ifdef {guard}", *lines, "#endif"]


@pytest.fixture(scope="module")
def header_values(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to read the headers with")
    tmp = tmp_path_factory.mktemp("hdr")
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        "#include <linux/loop.h>",
        "#include <linux/fs.h>",
        "#include <linux/major.h>",
        "#include <linux/blkpg.h>",
        "int main(void) {",
    ]
    for name in CONSTANTS:
        line = f'printf("{name} %llu\\n", (unsigned long long)({name}));'
        lines += _guarded(GUARDS.get(name, name), [line])
    for struct, fields in STRUCTS.items():
        body = [f'printf("sizeof.{struct} %zu\\n", sizeof(struct {struct}));']
        for field in fields:
            body.append(
                f'printf("{struct}.{field} %zu %zu\\n", offsetof(struct {struct}, {field}),'
                f" sizeof(((struct {struct} *)0)->{field}));"
            )
        lines += _guarded(STRUCT_GUARDS.get(struct), body)
    lines += ["return 0; }"]
    src = Path(tmp) / "h.c"
    src.write_text("\n".join(lines))
    exe = Path(tmp) / "h"
    subprocess.run([cc, "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    values: dict[str, int] = {}
    for line in out.splitlines():
        key, *nums = line.split()
        if len(nums) == 2:
            values[key + ".offset"], values[key + ".size"] = int(nums[0]), int(nums[1])
        else:
            values[key] = int(nums[0])
    return values


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_header(name: str, header_values: dict[str, int]) -> None:
    if name not in header_values:
        pytest.skip(f"{name} is newer than these headers: the shim's fallback is checked instead")
    assert getattr(lib, name) == header_values[name]


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_struct_layout_matches_header(struct: str, header_values: dict[str, int]) -> None:
    if f"sizeof.{struct}" not in header_values:
        pytest.skip(f"struct {struct} is newer than these headers: the shim's own is checked")
    ctype = f"struct {struct}"
    instance = ffi.new(f"{ctype} *")
    assert ffi.sizeof(ctype) == header_values[f"sizeof.{struct}"]
    fields = dict(ffi.typeof(ctype).fields)
    for name in STRUCTS[struct]:
        getattr(instance, name)  # cffi checks a field's type at first use
        assert ffi.offsetof(ctype, name) == header_values[f"{struct}.{name}.offset"]
        assert ffi.sizeof(fields[name].type) == header_values[f"{struct}.{name}.size"]


# The kernel ABI, written down as the oracle for the shim's fallbacks (used where
# the build headers are older) and for every other value. ioctl numbers use the
# generic _IOC encoding (include/uapi/asm-generic/ioctl.h), which is what x86,
# arm, arm64, riscv and s390 use; powerpc, mips, sparc and alpha differ.
GENERIC_IOCTL = platform.machine() in {
    "x86_64",
    "i686",
    "i386",
    "aarch64",
    "armv7l",
    "armv8l",
    "riscv64",
    "s390x",
}
_IOC_READ = 2
IOC_ENCODED = {"BLKFLSBUF", "BLKSSZGET", "BLKPG", "BLKGETSIZE64", "BLKGETDISKSEQ"}


def _ior(type_: int, nr: int, size: int) -> int:
    return _IOC_READ << 30 | size << 16 | type_ << 8 | nr


KERNEL_ABI = {
    "LO_NAME_SIZE": 64,
    "LO_KEY_SIZE": 32,
    "LOOP_MAJOR": 7,
    "LO_FLAGS_READ_ONLY": 1,
    "LO_FLAGS_AUTOCLEAR": 4,
    "LO_FLAGS_PARTSCAN": 8,  # 3.2
    "LO_FLAGS_DIRECT_IO": 16,  # 4.4
    "LOOP_SET_FD": 0x4C00,
    "LOOP_CLR_FD": 0x4C01,
    "LOOP_SET_STATUS64": 0x4C04,
    "LOOP_GET_STATUS64": 0x4C05,
    "LOOP_CHANGE_FD": 0x4C06,
    "LOOP_SET_CAPACITY": 0x4C07,
    "LOOP_SET_DIRECT_IO": 0x4C08,  # 4.4
    "LOOP_SET_BLOCK_SIZE": 0x4C09,  # 4.14
    "LOOP_CONFIGURE": 0x4C0A,  # 5.8
    "LOOP_CTL_ADD": 0x4C80,
    "LOOP_CTL_REMOVE": 0x4C81,
    "LOOP_CTL_GET_FREE": 0x4C82,
    "BLKFLSBUF": 0x1261,  # _IO(0x12, 97)
    "BLKSSZGET": 0x1268,  # _IO(0x12, 104)
    "BLKPG": 0x1269,  # _IO(0x12, 105)
    "BLKGETSIZE64": _ior(0x12, 114, ffi.sizeof("size_t")),
    "BLKGETDISKSEQ": _ior(0x12, 128, 8),  # 5.15, __u64
    "BLKPG_ADD_PARTITION": 1,
    "BLKPG_DEL_PARTITION": 2,
}
# struct loop_info64 and struct loop_config (5.8): all fields naturally aligned,
# so the same on every architecture. (offset, size) per field.
KERNEL_STRUCTS = {
    "loop_info64": (
        232,
        {
            "lo_device": (0, 8),
            "lo_inode": (8, 8),
            "lo_rdevice": (16, 8),
            "lo_offset": (24, 8),
            "lo_sizelimit": (32, 8),
            "lo_number": (40, 4),
            "lo_encrypt_type": (44, 4),
            "lo_encrypt_key_size": (48, 4),
            "lo_flags": (52, 4),
            "lo_file_name": (56, 64),
            "lo_crypt_name": (120, 64),
            "lo_encrypt_key": (184, 32),
            "lo_init": (216, 16),
        },
    ),
    "loop_config": (304, {"fd": (0, 4), "block_size": (4, 4), "info": (8, 232)}),
}


def test_kernel_abi_table_is_complete() -> None:
    assert sorted(KERNEL_ABI) == sorted(CONSTANTS)


@pytest.mark.parametrize("name", CONSTANTS)
def test_constant_matches_kernel_abi(name: str) -> None:
    if not GENERIC_IOCTL and name in IOC_ENCODED:
        pytest.skip(f"{platform.machine()} does not use the generic ioctl encoding")
    assert getattr(lib, name) == KERNEL_ABI[name]


@pytest.mark.parametrize("struct", sorted(KERNEL_STRUCTS))
def test_struct_layout_matches_kernel_abi(struct: str) -> None:
    size, fields = KERNEL_STRUCTS[struct]
    ctype = f"struct {struct}"
    assert ffi.sizeof(ctype) == size
    types = dict(ffi.typeof(ctype).fields)
    for name, (offset, field_size) in fields.items():
        assert (ffi.offsetof(ctype, name), ffi.sizeof(types[name].type)) == (offset, field_size)


def test_compat_constants_come_from_the_shim() -> None:
    from loopdev import Loop

    for name in ("LOOP_SET_FD", "LOOP_CONFIGURE", "LO_FLAGS_PARTSCAN", "LOOP_MAJOR"):
        assert getattr(Loop, name) == getattr(lib, name)
