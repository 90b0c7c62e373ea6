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

    ``errno`` is the kernel's answer, ``device`` the loop device (if any),
    ``backing`` the backing file (if known) and ``stage`` the step of the
    native attach or bind that failed (``"open"``, ``"configure"``, ...), if
    it was one.
    """

    def __init__(
        self,
        err: int,
        message: str,
        *,
        device: str | None = None,
        backing: str | None = None,
        stage: str | None = None,
    ) -> None:
        super().__init__(err, message)
        self.device = device
        self.backing = backing
        self.stage = stage
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
        return (
            _rebuild,
            (type(self), self.errno, self.strerror, self.device, self.backing, self.stage),
        )


def _rebuild(
    cls: type[LoopError],
    err: int,
    message: str,
    device: str | None,
    backing: str | None,
    stage: str | None = None,
) -> LoopError:
    return cls(err, message, device=device, backing=backing, stage=stage)


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


# ------------------------------------------------------- the binding's failures
# _native calls the shim, checks its -errno and raises what these build: the
# words and the advice live here, the binding only names what failed.

NOT_BOUND = "device is not bound"

# What the simple calls were doing (by the binding's name for them; an ioctl
# is named by its request).
_CALLS = {
    "get_status": "reading the device status (LOOP_GET_STATUS64)",
    "set_status": "setting the device status (LOOP_SET_STATUS64)",
    "delete_partitions": "deleting partitions (one may be mounted or open)",
    "sysfs": "reading sysfs",
}

# What each stage of the native bind and attach (csrc/shim.h) was doing.
_STAGE_DOING = {
    "get_free": "asking loop-control for a free device",
    "open": "opening the loop device",
    "node": "making a private device node",
    "check": "checking the loop device node",
    "lock": "locking the loop device",
    "partitions": "deleting partitions a previous attachment left on the device",
    "configure": "binding the backing file (LOOP_CONFIGURE)",
    "set_fd": "binding the backing file (LOOP_SET_FD)",
    "set_status": "setting offset, size limit and flags (LOOP_SET_STATUS64)",
    "block_size": "setting the logical block size (LOOP_SET_BLOCK_SIZE)",
    "direct_io": "enabling direct I/O (LOOP_SET_DIRECT_IO)",
    "verify": "checking what the kernel applied",
    "bind": "configuring",  # a stage the binding does not name
    "attach": "attaching",
}

_RACED_BINDING = (
    "every free device was bound by another process, or still held "
    "by its last user, before we could configure it"
)

# What the last race seen means when the retries ran out.
_EXHAUSTED_WHY = {
    "open": "every free device was being released or removed by another process when we opened it",
    "lock": "every free device was locked (flock) by another process",
    "partitions": "every free device had a partition of an earlier attachment still open",
    "configure": _RACED_BINDING,
    "set_fd": _RACED_BINDING,
}

# Stages whose failure means one thing whatever the errno.
_STAGE_ERRORS: dict[str, tuple[type[LoopError], str]] = {
    "get_free": (
        NoFreeDevice,
        "no loop device is free or can be created (all in use, or max_loop reached)",
    ),
    "verify": (
        ConfigureError,
        "the kernel did not apply the requested offset, size limit, flags or block size",
    ),
    "direct_io": (
        BackingFileError,
        "direct I/O was required but the backing file refuses O_DIRECT; "
        "use direct_io='auto' or False",
    ),
    "partitions": (
        DeviceBusy,
        "a partition left by a previous attachment of this device is still open; "
        "close or unmount it",
    ),
}

_DEVTMPFS = "mount devtmpfs on /dev (-v /dev:/dev)"
_NODE_FIX = {
    _errno.EPERM: "making a device node needs CAP_MKNOD; in a container run with "
    f"--privileged, or {_DEVTMPFS}",
    _errno.EROFS: f"/dev is read-only; {_DEVTMPFS} or make /dev writable",
    _errno.EACCES: f"device nodes are not usable there (nodev mount or no permission); {_DEVTMPFS}",
}

_CONFIGURE_STAGES = ("configure", "set_fd", "set_status", "block_size")
_REFUSED = (_errno.EBADF, _errno.EINVAL, _errno.EACCES, _errno.EPERM, _errno.EROFS)


def call_failed(
    err: int, call: str, *, device: str | None = None, backing: str | None = None
) -> LoopError:
    """The error for a simple native ``call`` that answered ``err`` (an errno)."""
    doing = _CALLS.get(call, call)
    if err == _errno.EBUSY:
        return DeviceBusy(err, f"device busy while {doing}", device=device, backing=backing)
    return LoopError(err, f"failed {doing}", device=device, backing=backing)


def stage_failed(
    err: int, stage: str, *, device: str | None, backing: str | None = None
) -> LoopError:
    """The error for the native bind or attach failing with ``err`` at ``stage``,
    with what to do about it."""
    if stage in _STAGE_ERRORS:
        cls, message = _STAGE_ERRORS[stage]
        return cls(err, message, device=device, backing=backing, stage=stage)
    if stage == "node":
        fix = _NODE_FIX.get(err, _DEVTMPFS)
        message = f"/dev has no usable node for the device and loopdev cannot make one: {fix}"
        return DeviceNodeError(err, message, device=device, stage=stage)
    if stage == "open" and err in (_errno.EPERM, _errno.EACCES):
        message = (
            "opening the loop device was refused (a container's device cgroup?): allow block "
            "devices 7:* and 259:* (docker --device-cgroup-rule 'b 7:* rmw' --device-cgroup-rule "
            "'b 259:* rmw') or run with --privileged"
        )
        return DeviceNodeError(err, message, device=device, stage=stage)
    if stage == "open" and err == _errno.ENOENT:
        message = "no device node for the device in the device directory"
        return DeviceNodeError(err, message, device=device, stage=stage)
    doing = _STAGE_DOING.get(stage, stage)
    if err == _errno.EBUSY:
        message = f"device busy while {doing}"
        return DeviceBusy(err, message, device=device, backing=backing, stage=stage)
    if stage in _CONFIGURE_STAGES and err in _REFUSED:
        message = (
            f"the kernel refused {doing}: check the block size (512..4096, a power of "
            "two), the offset and size limit, and that the backing fd is a regular "
            "file or block device opened with a mode that allows the request"
        )
        return ConfigureError(err, message, device=device, backing=backing, stage=stage)
    return LoopError(err, f"failed {doing}", device=device, backing=backing, stage=stage)


def retries_exhausted(
    err: int, stage: str, *, device: str | None, backing: str | None
) -> DeviceBusy:
    """The error for the native attach giving up after its retries, the last at ``stage``."""
    why = _EXHAUSTED_WHY.get(stage, f"the last attempt failed {_STAGE_DOING.get(stage, stage)}")
    return DeviceBusy(
        err,
        f"{why}; retries exhausted, try again or reduce the number of concurrent attaches",
        device=device,
        backing=backing,
        stage=stage,
    )


def out_of_range(field: str, value: int, bits: int, *, backing: str | None) -> ConfigureError:
    """A configuration value the C struct cannot hold."""
    message = f"{field} {value} is out of range (0 to 2**{bits} - 1)"
    return ConfigureError(_errno.EINVAL, message, backing=backing)
