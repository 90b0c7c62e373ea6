"""Build the loopdev CFFI extension (API mode) from csrc/."""

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "loopdev.h").read_text())
ffibuilder.set_source(
    "loopdev._loopdev_ffi",
    (CSRC / "loopdev.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
