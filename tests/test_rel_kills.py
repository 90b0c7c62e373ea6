"""Kills: children attach with autoclear (both APIs) and get SIGKILL while holding a
device or in the middle of a tight attach/detach loop; nothing stays bound.

Real devices, no mock of the kernel. ``LOOPDEV_LONG=1`` runs 50 kills instead of 10.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import LONG, backing_of, child, partitions_of, reap, wait_unbound
from images import SFDISK, gpt_image, make_image

KILL_REPS = 50 if LONG else 10


def _kill_once(
    api: str, mode: str, image: Path, partscan: bool, rng: random.Random, env: dict[str, str]
) -> list[int]:
    """One child killed at a random point; returns the minors it had attached."""
    proc = child("kill_target", api, mode, str(image), "1" if partscan else "0", env=env)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        if not first:
            _, err = reap(proc)
            pytest.fail(f"child died before it started: {err}")
        # Hold: anywhere while it owns the device. Loop: anywhere in attach/detach.
        time.sleep(rng.uniform(0, 0.05) if mode == "hold" else rng.uniform(0, 0.15))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    finally:
        reap(proc)
    assert proc.returncode == -signal.SIGKILL, f"child failed before the kill: {err}"
    lines = ([first] if first != "GO" else []) + out.split()
    return [int(m) for m in lines]


@pytest.mark.parametrize("mode", ["hold", "attach-loop"])
@pytest.mark.parametrize("api", ["compat", "attach"])
def test_sigkill_leaves_nothing_bound(tmp_path: Path, devices: None, api: str, mode: str) -> None:
    """SIGKILL at random points: the kernel releases every autoclear device and partition."""
    image = gpt_image(tmp_path / "kill.img") if SFDISK else make_image(tmp_path / "kill.img")
    rng = random.Random()
    env = dict(os.environ, LOOPDEV_FORCE_FALLBACK="0")
    attached = 0
    for rep in range(KILL_REPS):
        partscan = SFDISK is not None and rep % 2 == 0
        minors = _kill_once(api, mode, image, partscan, rng, env)
        attached += len(minors)
        left = wait_unbound(tmp_path)
        for name in left:
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
        assert left == [], f"rep {rep} ({api}, {mode}, partscan={partscan}) left {left} bound"
        for minor in set(minors):
            # Partitions on a device nobody has bound any more are a leak (BLKPG
            # partitions outlive LOOP_CLR_FD where partscan is off).
            parts = partitions_of(minor)
            if parts and backing_of(minor) is None:
                pytest.fail(f"loop{minor} is unbound but still has partitions {parts}")
    assert attached > 0, "no child ever got a device: the kills proved nothing"


@pytest.mark.skipif(not LONG, reason="long variant (LOOPDEV_LONG=1)")
def test_sigkill_in_fallback_leaks_only_in_the_documented_window(
    tmp_path: Path, devices: None
) -> None:
    """Without LOOP_CONFIGURE, a kill between LOOP_SET_FD and LOOP_SET_STATUS64 (which
    sets autoclear) leaves the device bound: the kernel offers no atomic way. Prove that
    this is the only leak there is (bound to our file, autoclear off, no partitions)."""
    image = make_image(tmp_path / "kill.img")
    rng = random.Random()
    env = dict(os.environ, LOOPDEV_FORCE_FALLBACK="1")
    leaks = 0
    for rep in range(KILL_REPS):
        api = "compat" if rep % 2 else "attach"
        _kill_once(api, "attach-loop", image, False, rng, env)
        for name in wait_unbound(tmp_path):
            minor = int(name[4:])
            with open(f"/sys/block/{name}/loop/autoclear") as f:
                autoclear = f.read().strip()
            parts = partitions_of(minor)
            subprocess.run(["losetup", "-d", f"/dev/{name}"], check=False)
            assert autoclear == "0" and parts == [], f"unexpected leak shape on {name}"
            leaks += 1
    assert wait_unbound(tmp_path) == []
    print(f"fallback kills: {leaks} of {KILL_REPS} left a device in the SET_FD window")
