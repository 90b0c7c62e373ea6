"""Only what pyproject.toml cannot say: the CFFI extension and its abi3 tag."""

from setuptools import setup

setup(
    cffi_modules=["build_ffi.py:ffibuilder"],
    # cffi marks its extensions py_limited_api: one wheel serves CPython 3.10+.
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
