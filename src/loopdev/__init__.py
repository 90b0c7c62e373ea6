"""loopdev: Linux loop devices from Python, without leaks or races."""

from loopdev.compat import Loop, LoopControl, LoopInfo, UnexpectedDevice
from loopdev.errors import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    LoopError,
    NoFreeDevice,
    PartitionTableError,
    UnsupportedByKernel,
)

__all__ = [
    "BackingFileError",
    "ConfigureError",
    "DeviceBusy",
    "Loop",
    "LoopControl",
    "LoopError",
    "LoopInfo",
    "NoFreeDevice",
    "PartitionTableError",
    "UnexpectedDevice",
    "UnsupportedByKernel",
]
__version__ = "0.1.0"
