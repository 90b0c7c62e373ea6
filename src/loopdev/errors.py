"""Every error loopdev raises: ``OSError`` subclasses with errno and paths."""

from __future__ import annotations

import errno as _errno
import os
import sys

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from logging import Logger


def warn(message: str) -> None:
    """Warn on the ``loopdev`` logger where the program has ``logging`` loaded, else on
    stderr (as logging's last-resort handler would).

    Never imports: ``logging`` alone cost ``import loopdev`` 13 ms (issue 17), and
    an import at warning time on the attach path could hang a child forked while
    another thread held the import lock. Looking the module up in ``sys.modules``
    takes no lock, and logging re-creates its own locks in a forked child.
    """
    module = sys.modules.get("logging")
    if module is not None:
        logger: Logger = module.getLogger("loopdev")
        logger.warning("%s", message)
        return
    try:
        sys.stderr.write(f"loopdev: warning: {message}\n")
    except (AttributeError, OSError, ValueError):
        pass  # no usable stderr (None, or closed): nowhere to say it


class LoopError(OSError):
    """A loop-device operation failed.

    ``errno`` is the kernel's answer, ``device`` the loop device (if any) and
    ``backing`` the backing file (if known).
    """

    def __init__(
        self,
        err: int,
        message: str,
        *,
        device: str | None = None,
        backing: str | None = None,
    ) -> None:
        super().__init__(err, message)
        self.device = device
        self.backing = backing
        self.filename = device if device is not None else backing

    def __str__(self) -> str:
        where = [f"device {self.device}"] if self.device else []
        if self.backing:
            where.append(f"file {self.backing}")
        detail = f" ({', '.join(where)})" if where else ""
        reason = os.strerror(self.errno) if self.errno else "error"
        return f"{self.strerror}{detail}: {reason} [errno {self.errno}]"

    def __reduce__(self) -> tuple[object, ...]:
        # OSError pickles by its args; keep the keyword-only paths too.
        return (_rebuild, (type(self), self.errno, self.strerror, self.device, self.backing))


def _rebuild(
    cls: type[LoopError], err: int, message: str, device: str | None, backing: str | None
) -> LoopError:
    return cls(err, message, device=device, backing=backing)


class NoFreeDevice(LoopError):
    """No loop device could be allocated (all in use, or ``max_loop`` reached)."""


class DeviceBusy(LoopError):
    """The device stayed busy or contended past the retry bound."""


class BackingFileError(LoopError):
    """The backing file cannot back a loop device as asked."""


class UnsupportedByKernel(LoopError):
    """The running kernel refused a feature loopdev needs for this request."""


class ConfigureError(LoopError):
    """The kernel refused or did not apply the requested configuration."""


class WriteBackError(LoopError):
    """Data written through the device did not all reach the backing file: it is lost.

    ``errno`` is the cause (``ENOSPC`` where the backing file's file system is
    full; the block layer itself only says ``EIO``). ``released`` says whether
    the device was released anyway (``detach()`` does) or is still bound.
    """

    released: bool = False


class PartitionTableError(LoopError):
    """A partition table is malformed; nothing was registered from it."""

    def __init__(self, message: str, *, device: str | None = None, backing: str | None = None):
        super().__init__(_errno.EINVAL, message, device=device, backing=backing)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_table, (type(self), self.strerror, self.device, self.backing))


def _rebuild_table(
    cls: type[PartitionTableError], message: str, device: str | None, backing: str | None
) -> PartitionTableError:
    return cls(message, device=device, backing=backing)


class DeviceNodeError(LoopError):
    """A device node is missing, points elsewhere, or cannot be made or opened."""


class ControlUnavailable(DeviceNodeError):
    """``loop-control`` cannot be opened."""


class ControlMissing(ControlUnavailable, FileNotFoundError):
    """``loop-control`` does not exist (still a ``FileNotFoundError``)."""


class ControlDenied(ControlUnavailable, PermissionError):
    """``loop-control`` may not be opened (still a ``PermissionError``)."""


class UnexpectedDevice(DeviceNodeError):
    """The node opened as ``loop{minor}`` is not that loop block device."""

    def __init__(self, expected_minor: int, rdev: int, mode: int) -> None:
        super().__init__(
            _errno.ENODEV,
            f"loop{expected_minor} is not that loop block device "
            f"(found {os.major(rdev)}:{os.minor(rdev)}, mode {mode:o})",
            device=f"loop{expected_minor}",
        )
        self.expected_minor = expected_minor
        self.rdev = rdev
        self.mode = mode

    def __reduce__(self) -> tuple[object, ...]:
        return (UnexpectedDevice, (self.expected_minor, self.rdev, self.mode))
