"""The attach/release path against the kernel's raw cost: issue 8's figures in one run.

Run as root: ``python bench/bench_attach.py [--quick] [--json] [--dir D]``. Needs
loopdev installed, ``gcc`` and ``losetup``; takes about a minute (``--quick``: a
few seconds, for a smoke run). Prints each figure with its target and whether it
is met, then the measurements behind them:

- single process, medians of interleaved rounds: the compat cycle
  (``LoopControl().loop_for_fd`` + ``clear_fd`` + ``close``) against the raw C
  cycle (``raw_cycle.c``: GET_FREE, open, LOOP_CONFIGURE, CLR_FD, close), and
  ``_native.attach`` + ``close`` against the same C cycle without CLR_FD (the
  last close releases an autoclear device); ``losetup`` for scale;
- 8 processes running the compat cycle at once (without CLR_FD: the close
  releases the autoclear device): p90 per cycle, failures;
- another process holding the ``loop-control`` flock: how long compat attach
  takes (on a private copy of the control node, so that the lock stops no other
  program on the machine; the bench lets go after ``--lock-cap`` seconds);
- release latency after the last other holder's close (bench_detach_latency.py);
- ``devices()`` and ``find()`` with 256 bound devices against ``losetup -J -l``
  (bench_devices.py);
- ``import loopdev`` time.

All backing files live in a temporary directory below ``--dir`` (its file system
matters: LOOP_CONFIGURE flushes the backing file), removed at exit; every device
bound to them is released, on errors, Ctrl-C and SIGTERM too, and the minors the
run made the kernel add are removed again.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import multiprocessing
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier as SyncBarrier

import bench_detach_latency
import bench_devices
from benchlib import (
    Interrupted,
    Target,
    compile_raw_cycle,
    deferred_signals,
    ignoring_signals,
    loop_minors,
    make_files,
    median,
    native_attach,
    native_config,
    p90,
    release_under,
    remove_added,
    stop_on_signals,
)

import loopdev
from loopdev import LoopControl, _native

WORKERS = 8


@dataclass
class Sizes:
    """How much of each measurement to run."""

    cycles: int = 2000  # per single-process scenario and round
    rounds: int = 5
    contention_cycles: int = 400  # per worker
    lock_attempts: int = 3
    lock_cap: float = 5.0
    latency_rounds: int = 20
    listing_count: int = 256
    listing_runs: int = 9
    import_runs: int = 9


QUICK = Sizes(
    cycles=200,
    rounds=1,
    contention_cycles=50,
    lock_attempts=1,
    lock_cap=2.0,
    latency_rounds=5,
    listing_count=64,
    listing_runs=3,
    import_runs=3,
)


@dataclass
class Scenario:
    """Per-cycle times (ns) of one scenario, pooled over rounds or workers."""

    label: str
    times_ns: list[int] = field(default_factory=list)
    failures: int = 0
    first_error: str | None = None

    def add(self, other: Scenario) -> None:
        self.times_ns += other.times_ns
        self.failures += other.failures
        self.first_error = self.first_error or other.first_error

    @property
    def median_us(self) -> float:
        return median([t / 1000 for t in self.times_ns])

    @property
    def p90_us(self) -> float:
        return p90([t / 1000 for t in self.times_ns])


@dataclass
class Workspace:
    root: str
    single: str
    workers: list[str]
    raw_cycle: str


# --- single process -----------------------------------------------------------------------


def run_raw(ws: Workspace, cycles: int, mode: str) -> Scenario:
    """``raw_cycle`` (times itself: process start-up is not counted)."""
    done = subprocess.run(
        [ws.raw_cycle, str(cycles), ws.single, mode], capture_output=True, text=True
    )
    out = done.stdout.split()
    if done.returncode != 0 or out[:1] != ["retries"]:
        raise RuntimeError(f"raw_cycle {mode} failed: {done.stderr.strip() or out[:2]}")
    return Scenario(mode, [int(t) for t in out[2:]])


def compat_cycles(ctl: LoopControl, fd: int, cycles: int, clear: bool = True) -> Scenario:
    """``loop_for_fd`` + ``clear_fd`` (with ``clear``) + ``close``; failures are counted,
    not raised. Without ``clear`` the close releases the autoclear device."""
    run = Scenario("compat")
    clock = time.perf_counter_ns
    for _ in range(cycles):
        t0 = clock()
        try:
            lo = ctl.loop_for_fd(fd, autoclear=True)
            try:
                if clear:
                    lo.clear_fd()
            finally:
                lo.close()
        except OSError as exc:
            run.failures += 1
            run.first_error = run.first_error or f"{type(exc).__name__}: {exc}"
            continue
        run.times_ns.append(clock() - t0)
    return run


def run_compat(ws: Workspace, cycles: int) -> Scenario:
    fd = os.open(ws.single, os.O_RDWR | os.O_CLOEXEC)
    ctl = LoopControl()
    try:
        return compat_cycles(ctl, fd, cycles)
    finally:
        ctl.close()
        os.close(fd)


@contextlib.contextmanager
def control_and_dev() -> Iterator[tuple[int, int]]:
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        dirfd = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield ctl, dirfd
        finally:
            os.close(dirfd)
    finally:
        os.close(ctl)


def run_native(ws: Workspace, cycles: int) -> Scenario:
    """``_native.attach`` + ``os.close`` (autoclear releases at the close)."""
    run = Scenario("native")
    config = native_config()
    backing = os.open(ws.single, os.O_RDWR | os.O_CLOEXEC)
    try:
        with control_and_dev() as (ctl, dirfd):
            clock = time.perf_counter_ns
            for _ in range(cycles):
                t0 = clock()
                os.close(native_attach(ctl, dirfd, backing, config))
                run.times_ns.append(clock() - t0)
    finally:
        os.close(backing)
    return run


def run_losetup(ws: Workspace, cycles: int) -> Scenario:
    """``losetup -f --show FILE`` + ``losetup -d DEV``: two process starts per cycle.

    losetup does not retry a minor another allocator took after its GET_FREE: such a
    cycle is counted as a failure.
    """
    run = Scenario("losetup")
    losetup = shutil.which("losetup") or "losetup"
    clock = time.perf_counter_ns
    for _ in range(max(1, cycles // 100)):
        # No autoclear here: a signal inside subprocess.run could orphan a losetup
        # that binds after the clean-up looked. Hold signals for the cycle.
        with deferred_signals():
            t0 = clock()
            try:
                dev = subprocess.run(
                    [losetup, "-f", "--show", ws.single],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                subprocess.run([losetup, "-d", dev], check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as exc:
                run.failures += 1
                run.first_error = run.first_error or f"{exc.cmd[1]}: {exc.stderr.strip()}"
                continue
            run.times_ns.append(clock() - t0)
    return run


SINGLE: dict[str, tuple[str, Callable[[Workspace, int], Scenario]]] = {
    "raw_clr": (
        "raw C: GET_FREE, open, CONFIGURE, CLR_FD, close",
        lambda ws, n: run_raw(ws, n, "clr"),
    ),
    "raw_close": (
        "raw C: GET_FREE, open, CONFIGURE, close",
        lambda ws, n: run_raw(ws, n, "close"),
    ),
    "compat": ("compat loop_for_fd + clear_fd + close", run_compat),
    "native": ("_native.attach + close", run_native),
    "losetup": ("losetup -f --show + losetup -d", run_losetup),
}


def single_process(
    ws: Workspace, sizes: Sizes, progress: Callable[[str], None]
) -> dict[str, Scenario]:
    results = {key: Scenario(label) for key, (label, _) in SINGLE.items()}
    run_native(ws, 3)  # warm-up: the first attach probes LOOP_CONFIGURE
    keys = list(SINGLE)
    for rnd in range(sizes.rounds):
        # Rotated so that no scenario always runs first or after the same one.
        for key in keys[rnd % len(keys) :] + keys[: rnd % len(keys)]:
            progress(f"round {rnd + 1}/{sizes.rounds}: {SINGLE[key][0]}")
            results[key].add(SINGLE[key][1](ws, sizes.cycles))
    return results


# --- contention ---------------------------------------------------------------------------


def _contender(conn: Connection, path: str, cycles: int, barrier: SyncBarrier) -> None:
    """One of the forked allocators, with its own LoopControl as a separate program has."""
    # The parent alone reacts to Ctrl-C and ends the workers with SIGTERM,
    # whose default action closes their fds, and autoclear then releases.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        ctl = LoopControl()
        barrier.wait(60)
        # No CLR_FD: on 6.18 a CLR_FD by the last opener waits for an RCU grace
        # period (about 4 ms, the raw C cycle's too), which would hide the
        # allocation contention this measures.
        conn.send(compat_cycles(ctl, fd, cycles, clear=False))
    except BaseException as exc:
        conn.send(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()


def contention(ws: Workspace, cycles: int) -> Scenario:
    """``WORKERS`` processes running the compat cycle (autoclear, released at close)."""
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(WORKERS)
    procs = []
    conns = []
    done = False
    try:
        for path in ws.workers:
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_contender, args=(child_end, path, cycles, barrier))
            conns.append(parent_end)
            with deferred_signals():  # a signal inside start() would orphan the child
                proc.start()
                procs.append(proc)
            child_end.close()  # only the child holds the write end: a dead child reads EOF
        total = Scenario(f"{WORKERS} processes, compat loop_for_fd + close")
        for conn in conns:
            got = conn.recv()
            if isinstance(got, str):
                raise RuntimeError(f"worker process failed: {got}")
            total.add(got)
        done = True
        return total
    finally:
        for proc in procs:
            if not done:
                proc.terminate()
            proc.join()
        for conn in conns:
            conn.close()


# --- the loop-control lock held by another process ----------------------------------------


def _loop_rdev(index: int, part_shift: int) -> int:
    """dev_t of ``loop{index}``: from sysfs where it exists, else as the kernel will
    number it (minor ``index << part_shift`` with ``loop.max_part``)."""
    try:
        with open(f"/sys/class/block/loop{index}/dev") as f:
            major, minor = f.read().split(":")
        return os.makedev(int(major), int(minor))
    except OSError:
        return os.makedev(_native.LOOP_MAJOR, index << part_shift)


def private_dev(directory: str) -> int:
    """A copy of /dev's loop nodes in ``directory`` (loop-control, and loopN for every
    device and 64 more); returns an O_PATH fd on it. Its loop-control is another inode
    than /dev's, so a flock on it stops only who opens it there."""
    os.mkdir(directory, 0o700)
    control = os.stat("/dev/loop-control").st_rdev
    os.mknod(os.path.join(directory, "loop-control"), stat.S_IFCHR | 0o600, control)
    with open("/sys/module/loop/parameters/max_part") as f:
        part_shift = int(f.read()).bit_length()  # the kernel's fls(max_part)
    for index in range(max(loop_minors(), default=0) + 64):
        rdev = _loop_rdev(index, part_shift)
        os.mknod(os.path.join(directory, f"loop{index}"), stat.S_IFBLK | 0o600, rdev)
    return os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _lock_holder(conn: Connection, control: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX)
    conn.send("locked")
    with contextlib.suppress(EOFError):  # EOF: the parent went away
        conn.recv()  # until told to let go; exiting drops the lock


def held_lock(ws: Workspace, attempts: int, cap: float) -> list[float]:
    """Seconds compat ``loop_for_fd`` took while another process held the control flock;
    where it was still waiting at ``cap``, the holder let go (the value is then ``cap``
    and more)."""
    dir_fd = private_dev(os.path.join(ws.root, "dev"))
    ctx = multiprocessing.get_context("fork")
    times = []
    try:
        for _ in range(attempts):
            parent, child = ctx.Pipe()
            holder = ctx.Process(
                target=_lock_holder, args=(child, os.path.join(ws.root, "dev", "loop-control"))
            )
            holder.start()
            child.close()
            try:
                if parent.recv() != "locked":
                    raise RuntimeError("the lock holder failed")
                outcome: list[BaseException | float] = []

                def attach(outcome: list[BaseException | float] = outcome) -> None:
                    fd = os.open(ws.single, os.O_RDWR | os.O_CLOEXEC)
                    ctl = LoopControl(dir_fd)
                    start = time.monotonic()
                    try:
                        lo = ctl.loop_for_fd(fd, autoclear=True)
                        outcome.append(time.monotonic() - start)
                        lo.clear_fd()
                        lo.close()
                    except BaseException as exc:
                        outcome.append(exc)
                    finally:
                        ctl.close()
                        os.close(fd)

                worker = threading.Thread(target=attach)
                worker.start()
                worker.join(cap)
                parent.send("unlock")
                worker.join()
            finally:
                parent.close()
                holder.join(5)
                if holder.is_alive():
                    holder.kill()
            if isinstance(outcome[0], BaseException):
                raise outcome[0]
            times.append(outcome[0])
    finally:
        os.close(dir_fd)
    return times


# --- import -------------------------------------------------------------------------------


def import_time_ms(runs: int) -> list[float]:
    """Cumulative ``-X importtime`` of the ``loopdev`` line, once per fresh interpreter."""
    samples = []
    for i in range(runs + 1):  # the first one may still write bytecode caches
        err = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import loopdev"],
            check=True,
            capture_output=True,
            text=True,
        ).stderr
        for line in err.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[2].strip() == "loopdev":
                if i:
                    samples.append(int(parts[1]) / 1000)
                break
        else:
            raise RuntimeError("no 'loopdev' line in the -X importtime output")
    return samples


# --- the report ---------------------------------------------------------------------------


def targets(
    single: dict[str, Scenario],
    contended: Scenario,
    lock_s: list[float],
    lock_cap: float,
    latency: dict[str, list[float]],
    listing: bench_devices.Listing,
    import_ms: list[float],
) -> list[Target]:
    compat = single["compat"].median_us / single["raw_clr"].median_us
    native = single["native"].median_us / single["raw_close"].median_us
    losetup = median(listing["times_ms"][bench_devices.LOSETUP])
    out = [
        Target("compat cycle / raw C cycle (medians)", f"{compat:.2f}x", "<= 1.20x", compat <= 1.2),
        Target(
            "_native.attach + close / raw C without CLR_FD",
            f"{native:.2f}x",
            "<= 1.10x",
            native <= 1.1,
        ),
    ]
    for name in (bench_devices.DEVICES, bench_devices.FIND):
        ratio = median(listing["times_ms"][name]) / losetup
        out.append(
            Target(
                f"{name}, {listing['count']} bound / losetup -J -l",
                f"{ratio:.2f}x",
                "<= 0.33x",
                ratio <= 1 / 3,
            )
        )
    for name, ms in latency.items():
        out.append(
            Target(
                f"{name} return - last close",
                f"{median(ms):.2f} ms",
                "<= 2 ms",
                median(ms) <= 2.0,
            )
        )
    p90_ms = contended.p90_us / 1000
    out.append(
        Target(
            f"{contended.label}: p90, failures",
            f"{p90_ms:.2f} ms, {contended.failures}",
            "<= 1 ms, 0",
            p90_ms <= 1.0 and contended.failures == 0,
        )
    )
    worst = max(lock_s)
    capped = " (cap: still waiting)" if worst >= lock_cap else ""
    out.append(
        Target(
            "compat attach, another process holding the lock (max)",
            f"{worst:.2f} s{capped}",
            "<= 1.1 s",
            worst <= 1.1,
        )
    )
    out.append(
        Target(
            "import loopdev (median)",
            f"{median(import_ms):.1f} ms",
            "< 5 ms",
            median(import_ms) < 5,
        )
    )
    return out


@dataclass
class Report:
    """Everything ``--json`` prints; times as their names say."""

    setup: str
    targets: list[Target]
    scenarios: list[dict[str, object]]
    lock_held_attach_s: list[float]
    release_latency_ms: dict[str, list[float]]
    listing_ms: dict[str, list[float]]
    import_ms: list[float]
    notes: list[str]


def print_report(report: Report) -> None:
    print(report.setup)
    print(f"\n{'figure':58} {'measured':>27} {'target':>10}  met")
    for t in report.targets:
        print(f"{t.figure:58} {t.value:>27} {t.target:>10}  {'yes' if t.met else 'NO'}")
    print(f"\n{'scenario':48} {'cycles':>7} {'median us':>10} {'p90 us':>9} {'fail':>5}")
    for r in report.scenarios:
        print(
            f"{r['label']!s:48} {r['cycles']!s:>7} {r['median_us']:>10.1f} "
            f"{r['p90_us']:>9.1f} {r['failures']!s:>5}"
        )
        if r["first_error"]:
            print(f"    first failure: {r['first_error']}")
    for line in report.notes:
        print(line)


def benchmark(ws: Workspace, sizes: Sizes, progress: Callable[[str], None]) -> Report:
    minors_before = loop_minors()
    single = single_process(ws, sizes, progress)
    progress(f"{WORKERS} processes")
    contended = contention(ws, sizes.contention_cycles)
    progress("loop-control lock held by another process")
    lock_s = held_lock(ws, sizes.lock_attempts, sizes.lock_cap)
    progress("release latency")
    latency = bench_detach_latency.measure(ws.root, sizes.latency_rounds)
    progress(f"listing with {sizes.listing_count} bound devices")
    listing = bench_devices.measure(
        os.path.join(ws.root, "listing"), sizes.listing_count, sizes.listing_runs
    )
    progress("import time")
    imports = import_time_ms(sizes.import_runs)
    removed = remove_added(loop_minors() - minors_before) + listing["minors_removed"]
    return Report(
        setup=(
            f"loopdev {loopdev.__version__}: kernel {platform.release()}, Python "
            f"{platform.python_version()}, {os.cpu_count()} CPUs, load "
            f"{os.getloadavg()[0]:.1f}, backing files on {fs_type(ws.root)}; "
            f"{sizes.rounds} rounds x {sizes.cycles} cycles (losetup "
            f"{max(1, sizes.cycles // 100)}), {WORKERS} x {sizes.contention_cycles} contending"
            + (" (--quick: a smoke run, too short for the ratios)" if sizes == QUICK else "")
        ),
        targets=targets(single, contended, lock_s, sizes.lock_cap, latency, listing, imports),
        scenarios=[
            {
                "label": s.label,
                "cycles": len(s.times_ns),
                "median_us": s.median_us,
                "p90_us": s.p90_us,
                "failures": s.failures,
                "first_error": s.first_error,
            }
            for s in [*single.values(), contended]
        ],
        lock_held_attach_s=lock_s,
        release_latency_ms=latency,
        listing_ms=listing["times_ms"],
        import_ms=imports,
        notes=[
            f"lock held: compat attach took {', '.join(f'{t:.2f}' for t in lock_s)} s "
            f"(the holder lets go after {sizes.lock_cap:g} s)",
            f"listing: {listing['count']} devices bound in {listing['bind_s']:.2f} s; medians "
            + ", ".join(f"{k} {median(v):.1f} ms" for k, v in listing["times_ms"].items()),
            "release latency, median/max ms: "
            + ", ".join(f"{k} {median(v):.2f}/{max(v):.2f}" for k, v in latency.items()),
            f"minors this run made the kernel add, removed again: {removed}",
        ],
    )


def fs_type(path: str) -> str:
    """The file system holding ``path``."""
    best, kind = "", "?"
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            mnt, fstype = line.split()[1:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fstype
    return kind


def make_workspace(parent: str | None) -> Workspace:
    root = os.path.realpath(tempfile.mkdtemp(prefix="bench_attach.", dir=parent))
    try:
        paths = make_files(root, ["single", *(f"worker{i}" for i in range(WORKERS))])
        os.mkdir(os.path.join(root, "listing"))
        return Workspace(root, paths[0], paths[1:], compile_raw_cycle(root))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a fast smoke run (a few s)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--dir", help="parent of the temporary directory (default $TMPDIR)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("attaching loop devices needs root")
    for tool in ("gcc", "losetup"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found")
    sizes = QUICK if args.quick else Sizes()

    def progress(what: str) -> None:
        if not args.quiet:
            print(f"bench_attach: {what}", file=sys.stderr, flush=True)

    stop_on_signals()
    ws = None
    try:
        ws = make_workspace(args.dir)
        report = benchmark(ws, sizes, progress)
    except (KeyboardInterrupt, Interrupted) as exc:
        print(f"bench_attach: interrupted ({exc or 'SIGINT'}), cleaning up", file=sys.stderr)
        return 130
    finally:
        if ws is not None:
            with ignoring_signals():
                left = release_under(ws.root)
                shutil.rmtree(ws.root, ignore_errors=True)
            if left:
                print(f"bench_attach: still bound after clean-up: {left}", file=sys.stderr)
    if args.json:
        json.dump(asdict(report), sys.stdout, indent=2)
        print()
    else:
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
