"""Steps shared by both faces of loopdev (compat and high-level) around the native core."""

from __future__ import annotations

from loopdev import _native

TYPE_CHECKING = False  # typing is costly to import at run time
if TYPE_CHECKING:
    from collections.abc import Callable


def finish_attach(dev_fd: int, minor: int, config: _native.Config, backing: str | None) -> None:
    """After a successful bind: register partitions where the kernel found none.

    On failure the device is cleared again (the caller closes its fd), so a
    failed attach never leaves a device bound or a partition registered.
    """
    if not config.flags & _native.LO_FLAGS_PARTSCAN:
        return
    from loopdev import partitions  # the table reader loads only when needed

    try:
        partitions.ensure_registered(dev_fd, minor, backing)
    except BaseException:
        _native.delete_partitions(dev_fd, minor)
        _native.lib_clear_fd(dev_fd)
        raise


def release(dev_fd: int, minor: int, before_clear: Callable[[], None] | None = None) -> None:
    """Delete the device's partitions, then ``LOOP_CLR_FD``.

    Partitions first: BLKPG partitions outlive the binding on kernels without
    a partition parser and would point into the next file bound to this minor.
    If one is in use this raises before anything changed. ``before_clear``
    runs between the two (private nodes go before the device is released).
    """
    _native.delete_partitions(dev_fd, minor)
    if before_clear is not None:
        before_clear()
    _native.ioctl(dev_fd, _native.LOOP_CLR_FD, device=f"/dev/loop{minor}")
