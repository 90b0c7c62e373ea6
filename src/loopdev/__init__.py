"""loopdev: Linux loop devices from Python, without leaks or races."""

from loopdev.compat import Loop, LoopControl, LoopInfo, UnexpectedDevice
from loopdev.device import DeviceInfo, LoopDevice, attach, devices, find
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
# child waiting forever on that import's lock.

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
