"""Build the loopdev CFFI extension (API mode) from csrc/."""

import os
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"
# The kernel's structs and numbers, the shim's own types (shim.h, also
# included by loopdev.c), and the Python callbacks.
CDEFS = ("kernel.cdef", "shim.h", "python.cdef")
# LOOPDEV_COVERAGE=1: the gcov build of .ci/coverage (unoptimised, so that
# lines count as written). The shim is #included there instead of pasted, so
# that gcov counts its lines against csrc/loopdev.c.
COVERAGE = os.environ.get("LOOPDEV_COVERAGE") == "1"

ffibuilder = FFI()
ffibuilder.cdef("\n".join((CSRC / name).read_text() for name in CDEFS))
ffibuilder.set_source(
    "loopdev._loopdev_ffi",
    '#include "loopdev.c"\n' if COVERAGE else (CSRC / "loopdev.c").read_text(),
    include_dirs=[str(CSRC)],
    extra_compile_args=[*(["-O0", "--coverage"] if COVERAGE else ["-O2"]), "-Wall", "-pthread"],
    # pthread_sigmask lives in libpthread before
    # glibc 2.34 (manylinux2014 has 2.17): link it instead of relying on the
    # interpreter having loaded it.
    extra_link_args=["-pthread", *(["--coverage"] if COVERAGE else [])],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
