"""The cdef against the kernel headers: every constant and struct layout.

cffi only reports a wrongly typed field at first use, so each struct is
instantiated and its layout compared with what the C compiler says.
"""

from __future__ import annotations

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
        lines.append(f'printf("{name} %llu\\n", (unsigned long long)({name}));')
    for struct, fields in STRUCTS.items():
        lines.append(f'printf("sizeof.{struct} %zu\\n", sizeof(struct {struct}));')
        for field in fields:
            lines.append(
                f'printf("{struct}.{field} %zu %zu\\n", offsetof(struct {struct}, {field}),'
                f" sizeof(((struct {struct} *)0)->{field}));"
            )
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
    assert getattr(lib, name) == header_values[name]


@pytest.mark.parametrize("struct", sorted(STRUCTS))
def test_struct_layout_matches_header(struct: str, header_values: dict[str, int]) -> None:
    ctype = f"struct {struct}"
    instance = ffi.new(f"{ctype} *")
    assert ffi.sizeof(ctype) == header_values[f"sizeof.{struct}"]
    fields = dict(ffi.typeof(ctype).fields)
    for name in STRUCTS[struct]:
        getattr(instance, name)  # cffi checks a field's type at first use
        assert ffi.offsetof(ctype, name) == header_values[f"{struct}.{name}.offset"]
        assert ffi.sizeof(fields[name].type) == header_values[f"{struct}.{name}.size"]


def test_compat_constants_come_from_the_shim() -> None:
    from loopdev import Loop

    for name in ("LOOP_SET_FD", "LOOP_CONFIGURE", "LO_FLAGS_PARTSCAN", "LOOP_MAJOR"):
        assert getattr(Loop, name) == getattr(lib, name)
