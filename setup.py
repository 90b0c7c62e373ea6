"""Only what pyproject.toml cannot say: the CFFI extension and its abi3 tag."""

import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import PlatformError

# cffi builds limited-API extensions, so one abi3 wheel serves CPython 3.10+.
# Free-threaded CPython has no limited API (setuptools refuses the option),
# and PyPy has no abi3 at all: both get a wheel per interpreter.
ABI3 = sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED")


class LinuxOnlyBuildExt(build_ext):
    """Refuse to compile elsewhere: the shim is <linux/loop.h> and Linux ioctls."""

    def run(self) -> None:
        if not sys.platform.startswith("linux"):
            raise PlatformError(
                f"loopdev supports Linux only (loop devices are a Linux kernel interface); "
                f"this is {sys.platform!r}"
            )
        super().run()


setup(
    cmdclass={"build_ext": LinuxOnlyBuildExt},
    cffi_modules=["build_ffi.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ABI3 else {},
)
