"""Build the loopdev CFFI extension (API mode) from csrc/."""

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "loopdev.h").read_text())
ffibuilder.set_source(
    "loopdev._loopdev_ffi",
    (CSRC / "loopdev.c").read_text(),
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function", "-pthread"],
    # pthread_once/pthread_mutex_*/pthread_atfork live in libpthread before
    # glibc 2.34 (manylinux2014 has 2.17): link it instead of relying on the
    # interpreter having loaded it.
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
