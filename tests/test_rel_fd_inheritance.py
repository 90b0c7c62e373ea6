"""Fd inheritance: a child started (``close_fds=False``) while devices are attached
inherits no device, loop-control, backing file or node-directory fd.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from helpers import CHILDREN, wait_unbound
from images import SFDISK, gpt_image, make_image

from loopdev import LoopControl
from loopdev.device import attach


def child_fd_targets() -> list[str]:
    """What a child started with close_fds=False finds open in itself."""
    out = subprocess.run(
        [sys.executable, "-S", "-I", str(CHILDREN / "list_fds.py")],
        close_fds=False,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.splitlines()


def assert_clean(targets: list[str], forbidden: list[str]) -> None:
    leaked = [
        t
        for t in targets
        if t.startswith("/dev/loop") or any(t == f or t.startswith(f + " ") for f in forbidden)
    ]
    assert leaked == [], f"child inherited {leaked}"


@pytest.mark.parametrize("api", ["compat", "compat-clear_fd_wait", "attach", "attach-partscan"])
def test_children_inherit_no_fd(tmp_path: Path, devices: None, api: str) -> None:
    image = gpt_image(tmp_path / "fd.img") if api == "attach-partscan" else None
    image = image or make_image(tmp_path / "fd.img")
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    forbidden = [str(image), "/dev/loop-control", str(node_dir)]
    if api.startswith("compat"):
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True)
        try:
            forbidden.append(f"/dev/loop{lo.minor}")
            assert_clean(child_fd_targets(), forbidden)
            if api == "compat-clear_fd_wait":
                # The fd is parked on O_PATH and reopened with dup2 under the same number.
                lo.clear_fd_wait(fd, 5.0, 0.01)
                assert lo.fd >= 0
                assert_clean(child_fd_targets(), forbidden)
        finally:
            lo.close()
            ctl.close()
            os.close(fd)
    else:
        partscan = api == "attach-partscan"
        with attach(image, partscan=partscan, node_dir=node_dir) as dev:
            if partscan:
                assert len(dev.partitions) == 2
            forbidden += [dev.path, *(str(node_dir / n) for n in dev.nodes)]
            assert_clean(child_fd_targets(), forbidden)


def test_children_spawned_during_attach_loop_inherit_no_fd(
    tmp_path: Path, devices: None, configure_path: str
) -> None:
    """Fds the native loop opens for a moment (device, /proc/self/fd, sysfs dirs) are CLOEXEC."""
    image = gpt_image(tmp_path / "busy.img") if SFDISK else make_image(tmp_path / "busy.img")
    stop = threading.Event()
    errors: list[str] = []

    def churn() -> None:
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        try:
            while not stop.is_set():
                try:
                    lo = ctl.loop_for_fd(fd, autoclear=True, partscan=SFDISK is not None)
                    lo.close()
                    with attach(image, partscan=SFDISK is not None, direct_io=False):
                        pass
                except Exception as exc:
                    errors.append(repr(exc))
                    return
        finally:
            os.close(fd)
            ctl.close()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(25):
            assert_clean(child_fd_targets(), [str(image), "/dev/loop-control"])
    finally:
        stop.set()
        worker.join()
    assert errors == []
    assert wait_unbound(tmp_path) == []
