"""``loopdev run [OPTIONS] FILE -- COMMAND``: a device for exactly the command's life.

Real devices, a real ``python -m loopdev``; through a real broker as ``nobody``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from brokerlib import (
    GPT_PARTS,
    NOBODY,
    NOGROUP,
    SETPRIV,
    Server,
    bound_under,
    gpt_image,
    make_image,
)
from helpers import MiB, backing_of, poll, run_cli

from loopdev.device import find


def ran(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("run", *args)


def unbound(image: Path) -> bool:
    """Nothing bound to ``image`` (by the kernel's device and inode) within 3 s."""
    return poll(lambda: find(image) == [], 3)


@pytest.fixture
def image(tmp_path: Path, devices: None) -> Path:
    path = tmp_path / "disk.img"
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    return path


def test_data_written_by_the_command_lands_in_the_image(image: Path) -> None:
    script = 'printf hello | dd of="$LOOPDEV" bs=512 seek=3 conv=notrunc,fsync status=none'
    done = ran(str(image), "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    assert unbound(image)
    with open(image, "rb") as f:
        f.seek(3 * 512)
        assert f.read(5) == b"hello"


def test_environment_names_the_device_and_its_partitions(tmp_path: Path, devices: None) -> None:
    image = gpt_image(tmp_path / "gpt.img")
    script = (
        'test -b "$LOOPDEV" || exit 3; for p in $LOOPDEV_PARTITIONS; do test -b "$p" || '
        'exit 4; done; echo "$LOOPDEV"; echo "$LOOPDEV_PARTITIONS"'
    )
    done = ran("-P", str(image), "--", "sh", "-c", script)
    assert done.returncode == 0, done.stderr
    dev, parts = done.stdout.splitlines()
    assert parts.split() == [f"{dev}p1", f"{dev}p2"]
    assert unbound(image)
    name = os.path.basename(dev)
    assert poll(lambda: not os.path.exists(f"/sys/block/{name}/{name}p1"), 3)


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["sh", "-c", "exit 0"], 0),
        (["sh", "-c", "exit 7"], 7),
        (["sh", "-c", "exit 255"], 255),
        (["no-such-command-here"], 127),
        (["sh", "-c", "kill -TERM $$"], 128 + signal.SIGTERM),
        (["sh", "-c", "kill -KILL $$"], 128 + signal.SIGKILL),
    ],
    ids=["0", "7", "255", "not-found", "sigterm", "sigkill"],
)
def test_exit_status_is_passed_on(image: Path, command: list[str], status: int) -> None:
    done = ran(str(image), "--", *command)
    assert done.returncode == status, done.stderr
    assert unbound(image)  # detached after the command failed too
    if status == 127:
        assert done.stderr == "loopdev: no-such-command-here: command not found\n"


def test_not_executable_is_126(image: Path, tmp_path: Path) -> None:
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    done = ran(str(image), "--", str(script))
    assert done.returncode == 126
    assert unbound(image)


def test_options_after_the_separator_belong_to_the_command(image: Path) -> None:
    done = ran("-r", str(image), "--", "sh", "-c", 'echo "$@"', "sh", "--wait", "-P")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "--wait -P\n"


def test_no_command_is_a_usage_error(image: Path) -> None:
    done = ran(str(image))
    assert done.returncode == 2
    assert find(image) == []


def _start_run(image: Path, *command: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "loopdev", "run", str(image), "--", *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_sigterm_to_loopdev_reaches_the_command_and_detaches(image: Path) -> None:
    proc = _start_run(image, "sh", "-c", 'echo "$LOOPDEV"; exec sleep 60')
    try:
        assert proc.stdout is not None
        dev = proc.stdout.readline().strip()
        assert dev.startswith("/dev/loop")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert unbound(image)


def test_ctrl_c_goes_to_the_command_and_loopdev_still_detaches(image: Path) -> None:
    """SIGINT to the whole process group, as the terminal sends it."""
    proc = _start_run(image, "sh", "-c", 'echo "$LOOPDEV"; exec sleep 60')
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("/dev/loop")
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=10) == 128 + signal.SIGINT
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert "Traceback" not in err
    assert unbound(image)


def test_sigkill_of_loopdev_leaves_nothing_bound(image: Path) -> None:
    """Autoclear: the command does not hold the device, so it goes with loopdev."""
    proc = _start_run(image, "sh", "-c", 'echo "$LOOPDEV"; exec sleep 60')
    try:
        assert proc.stdout is not None
        dev = proc.stdout.readline().strip()
        minor = int(os.path.basename(dev)[4:])
        assert backing_of(minor) == str(image)
        proc.kill()  # loopdev only; its command lives on
        proc.wait(timeout=10)
        assert unbound(image)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


# --- through a broker, as nobody ------------------------------------------------------------


@pytest.fixture
def broker(space: Path) -> Iterator[Server]:
    server = Server(space, "--allow-user", "nobody", name="run-broker")
    yield server
    server.stop()


def as_nobody(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [SETPRIV or "setpriv", f"--reuid={NOBODY}", f"--regid={NOGROUP}", "--clear-groups"]
    cmd += [sys.executable, "-m", "loopdev", *args]
    env = {"PATH": "/usr/bin:/bin", "LOOPDEV_BROKER": socket, "HOME": "/"}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_nobody_runs_a_command_with_partitions_through_the_broker(
    space: Path, broker: Server
) -> None:
    image = gpt_image(space / "gpt.img")
    script = (
        'set -e; test -b "$LOOPDEV"; set -- $LOOPDEV_PARTITIONS; test "$#" = 2; '
        'test -b "$1"; test -b "$2"; '
        'printf partition2 | dd of="$2" bs=512 seek=1 conv=notrunc,fsync status=none; '
        'printf whole | dd of="$LOOPDEV" bs=512 seek=2 conv=notrunc,fsync status=none; '
        "exit 5"
    )
    done = as_nobody(broker.socket, "run", "-P", str(image), "--", "sh", "-c", script)
    assert done.returncode == 5, done.stderr
    assert done.stderr == ""
    with open(image, "rb") as f:
        f.seek(GPT_PARTS[1][0] + 512)
        assert f.read(10) == b"partition2"
        f.seek(2 * 512)
        assert f.read(5) == b"whole"
    assert poll(lambda: not bound_under(space), 3)


def test_attach_through_the_broker_points_to_run(space: Path, broker: Server) -> None:
    image = make_image(space / "plain.img")
    done = as_nobody(broker.socket, "attach", "--show", str(image))
    assert done.returncode == 1
    assert "loopdev run" in done.stderr and "LOOPDEV_BROKER" in done.stderr
    assert done.stderr.count("\n") == 1
    assert bound_under(space) == []
    time.sleep(0)  # nothing to wait for: no device was asked of the broker
