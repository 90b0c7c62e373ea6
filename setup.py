"""Only what pyproject.toml cannot say: the CFFI extension and its abi3 tag."""

import sysconfig

from setuptools import setup

# cffi builds limited-API extensions, so one abi3 wheel serves CPython 3.10+;
# free-threaded CPython has no limited API (setuptools refuses the option).
ABI3 = not sysconfig.get_config_var("Py_GIL_DISABLED")

setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ABI3 else {},
)
