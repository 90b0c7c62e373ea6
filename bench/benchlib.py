"""What the benchmarks share: the native call, clean-up of what they bound, signals, stats.

Every benchmark binds only files in its own temporary directory and releases every
device bound to them at exit, on errors, Ctrl-C, SIGTERM and SIGHUP too (and were
it killed outright, autoclear releases them when the kernel closes its fds).
"""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

try:
    from loopdev import LoopControl, _native
    from loopdev.compat import Loop
except ImportError as exc:  # the CFFI extension only exists in an installed copy
    sys.exit(f"bench: cannot import loopdev ({exc}); pip install the package first")

HERE = Path(__file__).resolve().parent
SYS_BLOCK = "/sys/block"


# --- the native call: the one place to adapt when its signature changes ----------------


def native_config() -> _native.Config:
    """What every native cycle binds with: autoclear, so closing the fd releases."""
    return _native.Config(flags=_native.LO_FLAGS_AUTOCLEAR)


def native_attach(ctl_fd: int, dev_dirfd: int, backing_fd: int, config: _native.Config) -> int:
    """``_native.attach`` as it is called today; returns the device fd."""
    return _native.attach(ctl_fd, dev_dirfd, backing_fd, config).fd


# --- signals ------------------------------------------------------------------------------

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C so every ``finally`` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise Interrupted(signum)


def stop_on_signals() -> None:
    """SIGTERM and SIGHUP raise :class:`Interrupted` (SIGINT raises KeyboardInterrupt)."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block ends: its steps must not be cut in half.

    Children started inside inherit the mask, so they finish their step too.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# --- devices and clean-up -----------------------------------------------------------------


def loop_minors() -> set[int]:
    return {int(n[4:]) for n in os.listdir(SYS_BLOCK) if n.startswith("loop") and n[4:].isdigit()}


def backing_of(name: str) -> bytes | None:
    try:
        with open(f"{SYS_BLOCK}/{name}/loop/backing_file", "rb") as f:
            return f.read().rstrip(b"\n") or None
    except OSError:  # unbound, or removed meanwhile
        return None


def bound_under(root: str) -> list[str]:
    """Loop devices whose backing file lies below the directory ``root``."""
    prefix = os.fsencode(root.rstrip("/") + "/")
    return [
        name
        for name in os.listdir(SYS_BLOCK)
        if (backing := backing_of(name)) is not None and backing.startswith(prefix)
    ]


def _close_own_fds(names: set[str]) -> None:
    """Close this process's fds on these devices.

    A signal that lands while the native attach runs raises right after it
    returns, before the caller gets the fd: the device stays open, and bound.
    """
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.path.basename(os.readlink(f"/proc/self/fd/{entry}")) in names:
                os.close(int(entry))
        except OSError:  # the listing's own fd, or closed meanwhile
            continue


def release_under(root: str, timeout: float = 5.0) -> list[str]:
    """Unbind every device still backed by a file below ``root``; return those left bound."""
    deadline = time.monotonic() + timeout
    while True:
        left = bound_under(root)
        if not left or time.monotonic() > deadline:
            return left
        _close_own_fds(set(left))
        for name in left:
            try:
                lo = Loop(int(name[4:]))
            except OSError:  # released or removed meanwhile
                continue
            try:
                # CLR_FD marks autoclear; the unbind happens at the last close,
                # which is ours unless a worker still holds it.
                lo.clear_fd()
            except OSError:
                pass
            finally:
                lo.close()
        time.sleep(0.05)


def remove_added(minors: Iterable[int]) -> int:
    """LOOP_CTL_REMOVE minors this run made the kernel add, where unbound; returns how many
    went (the kernel refuses one that is bound or open: someone else's by now)."""
    removed = 0
    ctl = LoopControl()
    try:
        for minor in sorted(minors):
            if backing_of(f"loop{minor}") is None:
                try:
                    ctl.remove(minor)
                    removed += 1
                except OSError:
                    pass
    finally:
        ctl.close()
    return removed


@contextlib.contextmanager
def ignoring_signals() -> Iterator[None]:
    """Clean-up that a second Ctrl-C cannot cut short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def make_files(root: str, names: Iterable[str], size: int = 1 << 20) -> list[str]:
    """Sparse files of ``size`` bytes below ``root``."""
    paths = []
    for name in names:
        path = os.path.join(root, name)
        with open(path, "wb") as f:
            f.truncate(size)
        paths.append(path)
    return paths


def compile_raw_cycle(workdir: str) -> str:
    """``bench/raw_cycle.c`` compiled with ``gcc -O2`` into ``workdir``; returns the program."""
    program = os.path.join(workdir, "raw_cycle")
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", program, str(HERE / "raw_cycle.c")],
        check=True,
        capture_output=True,
        text=True,
    )
    return program


# --- statistics and targets ---------------------------------------------------------------


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 2 else median(values)


@dataclass
class Target:
    """One figure of the issue: what was measured, the target, whether it is met."""

    figure: str
    value: str
    target: str
    met: bool
