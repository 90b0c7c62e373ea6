"""Fixtures for tests on real loop devices.

A test that needs a device asks for the ``devices`` fixture: it skips where no
device can be had, and fails instead when ``LOOPDEV_REQUIRE_DEVICES=1`` (CI).
Every test is checked afterwards for devices left bound to its files
(``_no_leaked_devices``). Test modules import what they share from ``helpers.py``
(devices, children), ``images.py`` (disk images) and ``brokerlib.py`` (the broker).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import brokerlib
import helpers
import pytest
from helpers import bindings, forget_registered, leaked_devices, reap, release

REQUIRE_DEVICES = os.environ.get("LOOPDEV_REQUIRE_DEVICES") == "1"


def _why_no_devices() -> str | None:
    if os.geteuid() != 0:
        return "loop devices need root"
    try:
        os.close(os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return f"/dev/loop-control unusable: {exc}"
    try:
        from loopdev import _native  # noqa: F401
    except ImportError as exc:
        return f"native extension missing: {exc}"
    return None


@pytest.fixture(scope="session")
def _device_reason() -> str | None:
    return _why_no_devices()


@pytest.fixture
def devices(_device_reason: str | None) -> None:
    if _device_reason is not None:
        if REQUIRE_DEVICES:
            pytest.fail(f"LOOPDEV_REQUIRE_DEVICES=1 but {_device_reason}")
        pytest.skip(_device_reason)


@pytest.fixture(autouse=True)
def _no_leaked_devices(tmp_path: Path) -> Iterator[None]:
    """Fail a test that leaves a loop device bound to one of its files.

    The rule: a device is the test's leak when it is bound after the test to an
    attachment that was not there before it (a new ``diskseq``, or a new name),
    that attachment is still bound after up to 3 s (a clear is finished by the
    last close, which a prober or a parallel run may delay), and its backing
    file is the test's:

    - the path sysfs shows lies below ``tmp_path``; or else, read with
      ``LOOP_GET_STATUS64`` (a brief read-only open of that device only):
    - its ``lo_device``/``lo_inode`` is a file below ``tmp_path`` or one the
      test passed to ``helpers.register_backing()``; this catches a device
      bound from a private mount namespace, whose sysfs path is the path in
      that namespace (``/x.img``) and says nothing to us; or
    - the name its binder recorded (``lo_file_name``; cut at 63 bytes by the
      kernel) lies below ``tmp_path``.

    Devices other processes bind meanwhile match none of these (their files
    are not ours; every pytest run has its own ``tmp_path``), so they never
    fail a test. Not caught: a file only a child could see (a private tmpfs)
    bound under a name outside ``tmp_path`` and not registered.
    A leak is cleared (only if still the same attachment) so it does not
    cascade into later tests.
    """
    forget_registered()
    before = bindings()
    yield
    leaked = leaked_devices(before, tmp_path)
    release(leaked)
    forget_registered()
    shown = {name: os.fsdecode(b.backing) for name, b in leaked.items()}
    assert not leaked, f"test left loop devices bound: {shown}"


@pytest.fixture
def image(tmp_path: Path, devices: None) -> Path:
    """A 16 MiB sparse image file."""
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(16 << 20)
    return path


@pytest.fixture
def image_fd(image: Path) -> Iterator[int]:
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture(params=["configure", "fallback"])
def configure_path(request: pytest.FixtureRequest, devices: None) -> Iterator[str]:
    """Run the test through LOOP_CONFIGURE and through the forced fallback."""
    from loopdev import _native

    _native.force_fallback(request.param == "fallback")
    yield request.param
    _native.force_fallback(os.environ.get("LOOPDEV_FORCE_FALLBACK") == "1")


@pytest.fixture
def ctl(devices: None) -> Iterator[object]:
    from loopdev import LoopControl

    control = LoopControl()
    yield control
    control.close()


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[str]]]:
    """Children registered here are killed and reaped even when the test fails."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        reap(proc)


@pytest.fixture
def space(devices: None) -> Iterator[Path]:
    """A directory for images and sockets that other users can reach; afterwards nothing
    may be bound below it (a leak is detached, so that it does not cascade)."""
    brokerlib.require_unprivileged()
    with brokerlib.shared_dir() as path:
        yield path
        helpers.poll(lambda: not helpers.bound_under(path), 3)
        left = helpers.bound_under(path)
        for name in left:
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
        assert not left, f"devices left bound: {left}"
