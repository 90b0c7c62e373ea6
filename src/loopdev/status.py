"""The kernel's ``struct loop_info64`` as a plain Python object."""

from __future__ import annotations

import os

INT_FIELDS = (
    "lo_device",
    "lo_inode",
    "lo_rdevice",
    "lo_offset",
    "lo_sizelimit",
    "lo_number",
    "lo_encrypt_type",
    "lo_encrypt_key_size",
    "lo_flags",
)
BYTES_FIELDS = {"lo_file_name": 64, "lo_crypt_name": 64, "lo_encrypt_key": 32}


class LoopInfo:
    """``struct loop_info64``; a new one is all zeros. Byte fields are ``bytes``."""

    __slots__ = (*INT_FIELDS, *BYTES_FIELDS, "lo_init")

    lo_device: int
    lo_inode: int
    lo_rdevice: int
    lo_offset: int
    lo_sizelimit: int
    lo_number: int
    lo_encrypt_type: int
    lo_encrypt_key_size: int
    lo_flags: int
    lo_file_name: bytes
    lo_crypt_name: bytes
    lo_encrypt_key: bytes
    lo_init: tuple[int, int]

    def __init__(self) -> None:
        for name in INT_FIELDS:
            setattr(self, name, 0)
        for name, size in BYTES_FIELDS.items():
            setattr(self, name, bytes(size))
        self.lo_init = (0, 0)

    @property
    def autoclear(self) -> bool:
        """Whether ``LO_FLAGS_AUTOCLEAR`` is set."""
        from loopdev._native import LO_FLAGS_AUTOCLEAR

        return bool(self.lo_flags & LO_FLAGS_AUTOCLEAR)

    def is_bound_to(self, st: os.stat_result) -> bool:
        """Same ``st_dev`` and ``st_ino`` as the backing file."""
        return self.lo_device == st.st_dev and self.lo_inode == st.st_ino

    @property
    def file_name(self) -> str:
        """``lo_file_name`` decoded; cut at 64 bytes by the kernel."""
        return os.fsdecode(self.lo_file_name.split(b"\0", 1)[0])

    def __repr__(self) -> str:
        return (
            f"LoopInfo(lo_offset={self.lo_offset}, lo_sizelimit={self.lo_sizelimit}, "
            f"lo_flags={self.lo_flags:#x}, lo_file_name={self.file_name!r})"
        )
