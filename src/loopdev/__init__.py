"""loopdev: Linux loop devices from Python, without leaks or races."""

# No `from __future__ import annotations`: it imports a module, before the
# next lines can run (the two annotations that need it are strings).
import os
import sys

# `python -m loopdev` runs this before loopdev/__main__.py: the command's
# handling of Ctrl-C (_loopdev_main.py) starts here, not after this import
# (~40 ms). sys.argv[0] is "-m" only while Python imports the module to run;
# a program of its own that imports loopdev keeps its excepthook.
if (
    sys.argv[:1] == ["-m"]
    and "-m" in sys.orig_argv
    and sys.orig_argv[sys.orig_argv.index("-m") + 1 :][:1] == ["loopdev"]
):

    def _excepthook(
        kind: type[BaseException], value: BaseException, tb: "TracebackType | None"
    ) -> None:
        import _loopdev_main  # only now: its import would be a window of its own

        _loopdev_main.excepthook(kind, value, tb)

    sys.excepthook = _excepthook

from loopdev import device
from loopdev.compat import Loop, LoopControl, LoopInfo, UnexpectedDevice
from loopdev.device import DeviceInfo, LoopDevice, devices, find
from loopdev.device import open_device as open
from loopdev.errors import (
    BackingFileError,
    ConfigureError,
    ControlUnavailable,
    DeviceBusy,
    DeviceNodeError,
    LoopError,
    NoFreeDevice,
    PartitionTableError,
    UnsupportedByKernel,
    WriteBackError,
)

# Everything the attach path needs is imported here, not on first use: a
# fork() landing while another thread runs a first attach would leave the
# child waiting forever on that import's lock. (The broker's client is the
# exception: it costs a socket module and the interface file at import.)

# Not typing.TYPE_CHECKING: importing typing (or dataclasses, which pulls in
# inspect) at run time costs more than the rest of loopdev together. Every
# module keeps the type checker's imports behind its own flag and refers here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import TracebackType

    from typing_extensions import Unpack

    from loopdev.device import AttachOptions, Backing


# os.environ.get raises and catches a KeyError inside when the name is unset,
# the common case: 8.5 us of each attach() on the bench machine (issue 17,
# measured side by side). os.environ's own mapping of encoded names (a private
# attribute, the same in CPython and PyPy) answers without; the public call
# where os.environ was replaced or has none.
_environ = os.environ
_environ_bytes: dict[bytes, bytes] | None = getattr(os.environ, "_data", None)


def _broker_from_environment() -> str | None:
    """``LOOPDEV_BROKER``, read at each attach() (the environment may change)."""
    if os.environ is _environ and type(_environ_bytes) is dict:
        value = _environ_bytes.get(b"LOOPDEV_BROKER")  # POSIX: bytes in, bytes out
        return None if value is None else os.fsdecode(value)
    return os.environ.get("LOOPDEV_BROKER")


def attach(
    backing: "Backing", *, broker: str | None = None, **options: "Unpack[AttachOptions]"
) -> LoopDevice:
    """Attach ``backing`` (a path or an open fd) to a free loop device.

    In this process (``loopdev.device.attach``, which documents ``options``),
    or, where ``broker`` names a ``loopdev serve`` socket (default:
    ``LOOPDEV_BROKER`` from the environment; "" for none), through that
    broker, which needs no root (``loopdev.broker_client.attach``).
    """
    if broker is None:
        broker = _broker_from_environment()
    if broker:
        from loopdev import broker_client

        return broker_client.attach(backing, broker=broker, **options)
    return device.attach(backing, **options)


__all__ = [  # noqa: RUF022 - grouped: compat, errors, then the high-level API
    "Loop",
    "LoopControl",
    "LoopInfo",
    "UnexpectedDevice",
    "BackingFileError",
    "ConfigureError",
    "ControlUnavailable",
    "DeviceBusy",
    "DeviceNodeError",
    "LoopError",
    "NoFreeDevice",
    "PartitionTableError",
    "UnsupportedByKernel",
    "WriteBackError",
    "attach",
    "devices",
    "find",
    "open",
    "LoopDevice",
    "DeviceInfo",
]
__version__ = "0.1.0"
