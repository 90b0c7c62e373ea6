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

__all__ = [  # noqa: RUF022 - grouped: compat, errors, then the high-level API
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
    "attach",
    "devices",
    "find",
    "open",
    "LoopDevice",
    "DeviceInfo",
]
__version__ = "0.1.0"

TYPE_CHECKING = False
if TYPE_CHECKING:
    from loopdev.device import DeviceInfo, LoopDevice, attach, devices, find
    from loopdev.device import open_device as open

# The high-level API loads on first use: it needs dataclasses, which would
# triple the import time of code that only uses the compatible API.
_LAZY = {
    "attach": "attach",
    "devices": "devices",
    "find": "find",
    "open": "open_device",
    "LoopDevice": "LoopDevice",
    "DeviceInfo": "DeviceInfo",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        from loopdev import device

        value = getattr(device, _LAZY[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'loopdev' has no attribute {name!r}")
