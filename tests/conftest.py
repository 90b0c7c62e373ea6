"""Fixtures for tests on real loop devices.

A test that needs a device asks for the ``devices`` fixture: it skips where no
device can be had, and fails instead when ``LOOPDEV_REQUIRE_DEVICES=1`` (CI).
Every test is checked afterwards for devices left bound to its files.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

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


def bound_under(prefix: str) -> list[str]:
    """Loop devices whose backing file lies below the directory ``prefix``."""
    want = os.fsencode(prefix.rstrip("/") + "/")
    found = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
                backing = f.read().strip()
        except OSError:
            continue
        if backing.startswith(want) or backing + b"/" == want:
            found.append(name)
    return found


def wait_unbound(prefix: str, timeout: float = 3.0) -> list[str]:
    """Devices still bound below ``prefix`` after up to ``timeout`` seconds.

    A device cleared while another process has it open (a prober, losetup,
    a parallel test run) is released when that process closes it.
    """
    deadline = time.monotonic() + timeout
    while (left := bound_under(prefix)) and time.monotonic() < deadline:
        time.sleep(0.01)
    return left


@pytest.fixture(autouse=True)
def _no_leaked_devices(tmp_path: Path) -> Iterator[None]:
    yield
    leaked = wait_unbound(str(tmp_path))
    for name in leaked:  # clean up so one leak does not cascade
        subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
    wait_unbound(str(tmp_path))
    assert not leaked, f"test left loop devices bound: {leaked}"


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


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))
