"""Time loop device attach+detach cycles: loopdev against raw C ioctls and losetup.

Run as root: ``python bench/bench_attach.py [--cycles N] [--rounds R] [--json] [--dir D]``.
Needs loopdev installed, ``cc`` and ``losetup``; the defaults take 30-60 s.

One cycle binds a small sparse file to a free loop device with autoclear and
closes the device, which releases it. Every round runs ``N`` cycles of each
scenario (``N`` per worker under contention, ``N // 10`` for losetup), in an
order rotated per round so machine noise hits all alike; the table shows the
median and p90 of all per-cycle times and the ratio to the raw C baseline.
Backing files and the C program live in a temporary directory (below ``--dir``:
its file system matters, as LOOP_CONFIGURE fsyncs the backing file) that is
removed at exit; devices still bound to its files are released first, on
errors, Ctrl-C and SIGTERM too.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier as SyncBarrier
from types import FrameType
from typing import NoReturn, TypedDict

try:
    import loopdev
    from loopdev import LoopControl, _native
    from loopdev.compat import Loop
except ImportError as exc:  # the CFFI extension only exists in an installed copy
    sys.exit(f"bench_attach: cannot import loopdev ({exc}); pip install the package first")

WORKERS = 8
BACKING_SIZE = 1 << 20
IMPORT_RUNS = 9
TARGET_RATIO = 1.10
TARGET_RETRIES = 0.5
TARGET_IMPORT_MS = 5.0

C_SOURCE = r"""
/* Raw-ioctl limit of one attach+detach cycle: no locking, no verification. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/loop.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    long cycles, retries = 0;
    long long *times;
    int ctl, backing;

    if (argc != 3) {
        fprintf(stderr, "usage: %s CYCLES BACKING_FILE\n", argv[0]);
        return 2;
    }
    cycles = strtol(argv[1], NULL, 10);
    ctl = open("/dev/loop-control", O_RDWR | O_CLOEXEC);
    backing = open(argv[2], O_RDWR | O_CLOEXEC);
    times = calloc(cycles > 0 ? cycles : 1, sizeof(*times));
    if (ctl < 0 || backing < 0 || !times) {
        perror("setup");
        return 1;
    }
    for (long i = 0; i < cycles; i++) {
        long long t0 = now_ns();
        for (int attempt = 0;; attempt++) {
            struct loop_config cfg;
            char name[32];
            int minor, fd;

            if (attempt == 1000) {
                fprintf(stderr, "no device after 1000 attempts\n");
                return 1;
            }
            minor = ioctl(ctl, LOOP_CTL_GET_FREE);
            if (minor < 0) {
                perror("LOOP_CTL_GET_FREE");
                return 1;
            }
            snprintf(name, sizeof(name), "/dev/loop%d", minor);
            fd = open(name, O_RDWR | O_CLOEXEC);
            if (fd < 0) {
                /* Another process released or removed it after GET_FREE. */
                if (errno == ENXIO || errno == ENOENT) {
                    retries++;
                    continue;
                }
                perror(name);
                return 1;
            }
            memset(&cfg, 0, sizeof(cfg));
            cfg.fd = (unsigned)backing;
            cfg.info.lo_flags = LO_FLAGS_AUTOCLEAR;
            if (ioctl(fd, LOOP_CONFIGURE, &cfg) < 0) {
                int err = errno;
                close(fd);
                /* Another process bound this minor since GET_FREE. */
                if (err == EBUSY) {
                    retries++;
                    continue;
                }
                errno = err;
                perror("LOOP_CONFIGURE");
                return 1;
            }
            close(fd); /* autoclear: the last close unbinds */
            break;
        }
        times[i] = now_ns() - t0;
    }
    printf("retries %ld\n", retries);
    for (long i = 0; i < cycles; i++)
        printf("%lld\n", times[i]);
    return 0;
}
"""


@dataclass
class Run:
    """One scenario's outcome in one round."""

    times_ns: list[int] = field(default_factory=list)
    failures: int = 0
    retries: int | None = 0
    start_ns: int = 0
    end_ns: int = 0
    first_error: str | None = None

    def merge(self, other: Run) -> None:
        """Pool a concurrent worker's run into this one."""
        self.times_ns += other.times_ns
        self.failures += other.failures
        if self.retries is not None and other.retries is not None:
            self.retries += other.retries
        if not self.start_ns or other.start_ns < self.start_ns:
            self.start_ns = other.start_ns
        self.end_ns = max(self.end_ns, other.end_ns)
        self.first_error = self.first_error or other.first_error


@dataclass
class Tally:
    """A scenario pooled over all rounds."""

    name: str
    times_ns: list[int] = field(default_factory=list)
    round_medians_ns: list[float] = field(default_factory=list)
    failures: int = 0
    retries: int | None = 0
    wall_ns: int = 0
    first_error: str | None = None

    def add(self, run: Run) -> None:
        """Add one round."""
        self.times_ns += run.times_ns
        if run.times_ns:
            self.round_medians_ns.append(statistics.median(run.times_ns))
        self.failures += run.failures
        self.retries = (
            None if run.retries is None or self.retries is None else (self.retries + run.retries)
        )
        self.wall_ns += run.end_ns - run.start_ns
        self.first_error = self.first_error or run.first_error


@dataclass
class Workspace:
    """The temporary directory, its backing files and the compiled C program."""

    root: str
    single: str
    workers: list[str]
    c_program: str


class Interrupted(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C so every ``finally`` runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    raise Interrupted(signum)


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


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


def _cycle_config() -> _native.Config:
    return _native.Config(flags=_native.LO_FLAGS_AUTOCLEAR)


# ---------------------------------------------------------------- setup/cleanup


def make_workspace(parent: str | None) -> Workspace:
    """Sparse backing files and the C baseline, compiled with ``cc -O2``."""
    root = tempfile.mkdtemp(prefix="bench_attach.", dir=parent)
    try:
        paths = []
        for name in ["single", *(f"worker{i}" for i in range(WORKERS))]:
            path = os.path.join(root, name)
            with open(path, "wb") as f:
                f.truncate(BACKING_SIZE)
            paths.append(path)
        source = os.path.join(root, "attach_c.c")
        program = os.path.join(root, "attach_c")
        with open(source, "w") as f:
            f.write(C_SOURCE)
        subprocess.run(["cc", "-O2", "-Wall", "-o", program, source], check=True)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return Workspace(root, paths[0], paths[1:], program)


def fs_type(path: str) -> str:
    """The file system holding ``path``: LOOP_CONFIGURE fsyncs the backing file, so it matters."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            # A mount point with octal escapes (\040 for a space) just never matches.
            mnt = fields[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def bound_under(root: str) -> list[str]:
    """Loop devices whose backing file is below ``root``."""
    found = []
    prefix = root.rstrip("/") + "/"
    for path in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(path) as f:
                backing = f.read().strip()
        except OSError:  # unbound between glob and open
            continue
        if backing.startswith(prefix):
            found.append(path.split("/")[3])
    return found


def _close_own_fds(name: str) -> None:
    """Close this process's fds on ``/dev/{name}``.

    A signal that lands while the native attach runs raises right after it
    returns, before the caller gets the fd: the device stays open, and bound.
    """
    for entry in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{entry}") == f"/dev/{name}":
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
        for name in left:
            _close_own_fds(name)
            try:
                lo = Loop(int(name[4:]))
            except OSError:  # released or removed meanwhile
                continue
            try:
                # Since 6.x CLR_FD marks autoclear and the unbind happens at
                # the last close, which is ours unless a worker still holds it.
                lo.clear_fd()
            except OSError:
                pass
            finally:
                lo.close()
        time.sleep(0.05)


def cleanup(ws: Workspace) -> None:
    """Release leftover devices, then remove the directory; a second Ctrl-C cannot cut it short."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        left = release_under(ws.root)
        if left:
            print(f"bench_attach: still bound after cleanup: {left}", file=sys.stderr)
        shutil.rmtree(ws.root, ignore_errors=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------ single process


def run_compat(ws: Workspace, cycles: int) -> Run:
    """The public API: ``LoopControl().loop_for_fd(fd, autoclear=True)`` then ``close()``."""
    run = Run()
    fd = os.open(ws.single, os.O_RDWR | os.O_CLOEXEC)
    ctl = LoopControl()
    try:
        clock = time.perf_counter_ns
        run.start_ns = time.monotonic_ns()
        for _ in range(cycles):
            t0 = clock()
            lo = ctl.loop_for_fd(fd, autoclear=True)
            lo.close()
            run.times_ns.append(clock() - t0)
        run.end_ns = time.monotonic_ns()
    finally:
        ctl.close()
        os.close(fd)
    return run


def _open_ctl() -> tuple[int, int]:
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        dirfd = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except BaseException:
        os.close(ctl)
        raise
    return ctl, dirfd


def native_cycles(
    ctl: int, dirfd: int, path: str, cycles: int, stop: Callable[[], bool] | None = None
) -> Run:
    """``_native.attach`` + ``os.close`` ``cycles`` times; failures are counted, not raised."""
    run = Run()
    retries = 0
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        clock = time.perf_counter_ns
        run.start_ns = time.monotonic_ns()
        for _ in range(cycles):
            if stop is not None and stop():
                break
            t0 = clock()
            try:
                got = _native.attach(ctl, dirfd, fd, _cycle_config())
            except OSError as exc:
                run.failures += 1
                run.first_error = run.first_error or f"{type(exc).__name__}: {exc}"
                continue
            os.close(got.fd)
            retries += got.retries
            run.times_ns.append(clock() - t0)
        run.end_ns = time.monotonic_ns()
    finally:
        os.close(fd)
    run.retries = retries
    return run


def run_native(ws: Workspace, cycles: int) -> Run:
    """The layer below the public API, to show what the Python wrapper costs."""
    ctl, dirfd = _open_ctl()
    try:
        return native_cycles(ctl, dirfd, ws.single, cycles)
    finally:
        os.close(dirfd)
        os.close(ctl)


def run_c(ws: Workspace, cycles: int) -> Run:
    """The compiled baseline; it times itself, so process start-up is not counted."""
    start = time.monotonic_ns()
    # subprocess.run kills the child on an exception; should one slip past it,
    # autoclear still releases the devices when the child exits.
    out = subprocess.run(
        [ws.c_program, str(cycles), ws.single], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    head, *rest = out
    key, count = head.split()
    if key != "retries":
        raise RuntimeError(f"unexpected output of the C baseline: {head!r}")
    times = [int(line) for line in rest if line]
    return Run(times, 0, int(count), start, start + sum(times))


def run_losetup(ws: Workspace, cycles: int) -> Run:
    """``losetup -f --show FILE`` + ``losetup -d DEV``: two process starts per cycle."""
    run = Run(retries=None)
    losetup = shutil.which("losetup") or "losetup"  # resolved once, not per cycle
    clock = time.perf_counter_ns
    run.start_ns = time.monotonic_ns()
    for _ in range(cycles):
        # No autoclear here, and a signal inside subprocess.run can orphan a
        # running losetup that binds a device after cleanup() looked: hold
        # signals for the cycle (two sigprocmask calls against ms of work).
        with deferred_signals():
            t0 = clock()
            dev = subprocess.run(
                [losetup, "-f", "--show", ws.single], check=True, capture_output=True, text=True
            ).stdout.strip()
            subprocess.run([losetup, "-d", dev], check=True)
            run.times_ns.append(clock() - t0)
    run.end_ns = time.monotonic_ns()
    return run


# ---------------------------------------------------------------- contention


def _process_worker(conn: Connection, path: str, cycles: int, barrier: SyncBarrier) -> None:
    """One of the forked allocators: its own loop-control, as an independent process has."""
    # The parent alone reacts to Ctrl-C and ends the workers with SIGTERM,
    # whose default action closes their fds, and autoclear then releases.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        ctl, dirfd = _open_ctl()
        barrier.wait(60)
        conn.send(native_cycles(ctl, dirfd, path, cycles))
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def run_processes(ws: Workspace, cycles: int) -> Run:
    """``WORKERS`` forked processes allocating at once."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    procs = []
    conns = []
    done = False
    try:
        for path in ws.workers:
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_process_worker, args=(child_end, path, cycles, barrier))
            conns.append(parent_end)
            # A signal inside start() would orphan the child: the finally
            # below only ends the processes in ``procs``.
            with deferred_signals():
                proc.start()
                procs.append(proc)
            # Only the child may hold the write end, so a dead child reads as EOF.
            child_end.close()
        total = Run()
        for conn in conns:
            got = conn.recv()
            if isinstance(got, str):
                raise RuntimeError(f"worker process failed: {got}")
            total.merge(got)
        done = True
        return total
    finally:
        for proc in procs:
            if not done:
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()


def run_threads(ws: Workspace, cycles: int, shared_ctl: bool = False) -> Run:
    """``WORKERS`` threads allocating at once (cffi drops the GIL in the native call).

    Each thread opens loop-control itself unless ``shared_ctl``: then all use one
    fd, as threads sharing one ``LoopControl`` do.
    """
    barrier = threading.Barrier(WORKERS)
    stop = threading.Event()
    results: list[Run | str] = []
    lock = threading.Lock()
    shared = _open_ctl() if shared_ctl else None

    def worker(path: str) -> None:
        try:
            ctl, dirfd = shared if shared is not None else _open_ctl()
            try:
                barrier.wait(60)
                got: Run | str = native_cycles(ctl, dirfd, path, cycles, stop.is_set)
            finally:
                if shared is None:
                    os.close(dirfd)
                    os.close(ctl)
        except BaseException as exc:
            got = f"{type(exc).__name__}: {exc}"
        with lock:
            results.append(got)

    threads = [threading.Thread(target=worker, args=(p,), daemon=True) for p in ws.workers]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        # On Ctrl-C the workers stop after their current cycle, which closes its fd.
        stop.set()
        barrier.abort()
        for t in threads:
            if t.ident is not None:  # started
                t.join()
        if shared is not None:
            os.close(shared[1])
            os.close(shared[0])
    total = Run()
    for got in results:
        if isinstance(got, str):
            raise RuntimeError(f"worker thread failed: {got}")
        total.merge(got)
    return total


def run_threads_shared(ws: Workspace, cycles: int) -> Run:
    """Threads sharing one loop-control fd, as threads sharing one ``LoopControl`` do."""
    return run_threads(ws, cycles, shared_ctl=True)


# ------------------------------------------------------------------- import


def import_time_ms(runs: int = IMPORT_RUNS) -> list[float]:
    """Cumulative ``-X importtime`` of the ``loopdev`` line, once per fresh interpreter."""
    samples = []
    # One discarded run first: it may still write bytecode caches.
    for i in range(runs + 1):
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import loopdev"],
            check=True,
            capture_output=True,
            text=True,
        ).stderr
        for line in err.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[2].strip() == "loopdev":
                if i > 0:
                    samples.append(int(parts[1]) / 1000)
                break
        else:
            raise RuntimeError("no 'loopdev' line in the -X importtime output")
    return samples


# -------------------------------------------------------------------- report


SCENARIOS: list[tuple[str, str, Callable[[Workspace, int], Run], int]] = [
    # key, label, function, cycles divisor
    ("c", "raw C ioctls (cc -O2)", run_c, 1),
    ("compat", "LoopControl.loop_for_fd", run_compat, 1),
    ("native", "_native.attach + os.close", run_native, 1),
    ("losetup", "losetup -f --show / -d", run_losetup, 10),
    ("procs", f"{WORKERS} processes, _native.attach", run_processes, 1),
    ("threads", f"{WORKERS} threads, _native.attach", run_threads, 1),
    ("threads_shared", f"{WORKERS} threads, one shared ctl fd", run_threads_shared, 1),
]


class Row(TypedDict):
    """One table row; times in microseconds."""

    key: str
    scenario: str
    cycles: int
    median_us: float
    p90_us: float
    ratio_to_c: float
    round_spread_pct: float
    failures: int
    retries_per_cycle: float | None
    cycles_per_s: float
    first_error: str | None


class Target(TypedDict):
    """One target of the issue, the measured value and whether it is met."""

    target: str
    value: str
    met: bool


class Report(TypedDict):
    """Everything ``--json`` prints."""

    kernel: str
    python: str
    cpus: int | None
    loopdev: str
    backing_fs: str
    cycles: int
    rounds: int
    losetup_cycles: int
    workers: int
    scenarios: list[Row]
    round_medians_us: dict[str, list[float]]
    import_ms: float
    import_ms_samples: list[float]
    targets: list[Target]


def summarize(key: str, tally: Tally, c_median: float) -> Row:
    """Pool one scenario's rounds into its row."""
    times = tally.times_ns
    n = len(times)
    median = statistics.median(times) if times else float("nan")
    p90 = statistics.quantiles(times, n=10)[-1] if n >= 2 else median
    rm = tally.round_medians_ns
    return Row(
        key=key,
        scenario=tally.name,
        cycles=n,
        median_us=median / 1000,
        p90_us=p90 / 1000,
        ratio_to_c=median / c_median,
        round_spread_pct=100 * (max(rm) - min(rm)) / median if len(rm) > 1 else 0.0,
        failures=tally.failures,
        retries_per_cycle=None if tally.retries is None else tally.retries / max(n, 1),
        cycles_per_s=n / (tally.wall_ns / 1e9) if tally.wall_ns > 0 else float("nan"),
        first_error=tally.first_error,
    )


def targets(rows: dict[str, Row], import_ms: float) -> list[Target]:
    """The issue's targets against the measured values."""
    out = []
    for key in ("compat", "native"):
        ratio = rows[key]["ratio_to_c"]
        out.append(
            Target(
                target=f"single process, {rows[key]['scenario']} <= {TARGET_RATIO:.2f}x raw C",
                value=f"{ratio:.2f}x",
                met=ratio <= TARGET_RATIO,
            )
        )
    for key in ("procs", "threads"):
        row = rows[key]
        rpc = row["retries_per_cycle"] or 0.0
        out.append(
            Target(
                target=f"{row['scenario']}: 0 failures, < {TARGET_RETRIES} retries/cycle",
                value=f"{row['failures']} failures, {rpc:.3f} retries/cycle",
                met=row["failures"] == 0 and rpc < TARGET_RETRIES,
            )
        )
    out.append(
        Target(
            target=f"import loopdev < {TARGET_IMPORT_MS:g} ms",
            value=f"{import_ms:.1f} ms",
            met=import_ms < TARGET_IMPORT_MS,
        )
    )
    return out


def print_table(report: Report) -> None:
    """The human-readable report."""
    print(
        f"loopdev attach+detach: kernel {report['kernel']}, Python {report['python']}, "
        f"{report['cpus']} CPUs, loopdev {report['loopdev']}, backing files on "
        f"{report['backing_fs']}\n{report['rounds']} rounds x {report['cycles']} cycles "
        f"(losetup {report['losetup_cycles']}; contention: per worker)"
    )
    header = (
        f"{'scenario':<36} {'cycles':>7} {'median us':>10} {'p90 us':>9} {'x C':>6} "
        f"{'spread':>7} {'fail':>5} {'retry/cyc':>9} {'cycles/s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in report["scenarios"]:
        rpc = r["retries_per_cycle"]
        print(
            f"{r['scenario']:<36} {r['cycles']:>7} {r['median_us']:>10.1f} "
            f"{r['p90_us']:>9.1f} {r['ratio_to_c']:>6.2f} {r['round_spread_pct']:>6.1f}% "
            f"{r['failures']:>5} {'n/a' if rpc is None else f'{rpc:.3f}':>9} "
            f"{r['cycles_per_s']:>9.0f}"
        )
        if r["first_error"]:
            print(f"    first failure: {r['first_error']}")
    samples = report["import_ms_samples"]
    print(
        f"import loopdev: median {report['import_ms']:.1f} ms cumulative "
        f"(-X importtime, {len(samples)} runs, {min(samples):.1f}..{max(samples):.1f} ms)"
    )
    print(
        "x C: median / raw C median (contention rows: latency under contention).  "
        "spread: max - min\nof the per-round medians / pooled median.  cycles/s: cycles / "
        "wall time (all workers)."
    )
    print("targets:")
    for t in report["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT MET':>7}] {t['target']}: {t['value']}")


def benchmark(ws: Workspace, cycles: int, rounds: int, progress: bool) -> Report:
    """Run every scenario ``rounds`` times, interleaved, and build the report."""
    tallies = {key: Tally(label) for key, label, _, _ in SCENARIOS}
    # Warm-up outside the measurement: the first attach probes LOOP_CONFIGURE.
    run_native(ws, 3)
    for rnd in range(rounds):
        # Rotate the order so no scenario always runs first or right after the forks.
        shift = rnd % len(SCENARIOS)
        for key, label, fn, divisor in SCENARIOS[shift:] + SCENARIOS[:shift]:
            if progress:
                print(f"round {rnd + 1}/{rounds}: {label}", file=sys.stderr, flush=True)
            tallies[key].add(fn(ws, max(1, cycles // divisor)))
    imports = import_time_ms()
    c_median = statistics.median(tallies["c"].times_ns)
    rows = {key: summarize(key, tallies[key], c_median) for key in tallies}
    import_ms = statistics.median(imports)
    return Report(
        kernel=platform.release(),
        python=platform.python_version(),
        cpus=os.cpu_count(),
        loopdev=loopdev.__version__,
        backing_fs=fs_type(ws.root),
        cycles=cycles,
        rounds=rounds,
        losetup_cycles=max(1, cycles // 10),
        workers=WORKERS,
        scenarios=list(rows.values()),
        round_medians_us={k: [m / 1000 for m in t.round_medians_ns] for k, t in tallies.items()},
        import_ms=import_ms,
        import_ms_samples=imports,
        targets=targets(rows, import_ms),
    )


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run, print, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--cycles", type=int, default=2500, help="cycles per scenario and round (default 2500)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--dir",
        help="where to make the temporary directory (default: the system's, $TMPDIR); "
        "its file system counts, as LOOP_CONFIGURE flushes the backing file",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if args.cycles < 1 or args.rounds < 1:
        parser.error("--cycles and --rounds must be at least 1")
    if os.geteuid() != 0:
        parser.error("attaching loop devices needs root")
    for tool in ("cc", "losetup"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: the C baseline needs cc, scenario (c) losetup")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    ws = None
    try:
        ws = make_workspace(args.dir)
        report = benchmark(ws, args.cycles, args.rounds, not args.quiet)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"bench_attach: interrupted ({exc or 'SIGINT'}), cleaning up", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        if ws is not None:
            cleanup(ws)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
