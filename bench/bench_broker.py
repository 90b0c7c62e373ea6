"""Time attach+detach through the broker against a direct in-process attach.

Run as root: ``python bench/bench_broker.py [--cycles N] [--rounds R] [--json]``.
Starts ``loopdev serve`` on a socket in a temporary directory, stops it with
SIGTERM at the end and removes the directory.

Scenarios, interleaved cycle by cycle (the order rotated each time) so that
load from other processes hits all of them alike; ``N`` cycles per round:

- direct: ``loopdev.attach(file)`` then ``detach()`` (waits until released);
- broker: ``loopdev.attach(file, broker=SOCKET)`` then ``detach()`` (the
  broker detaches and waits, then answers);
- broker List: connect, ``io.loopdev.List``, close: the protocol alone.

The table shows medians and p90 of the per-cycle times, the ratio to direct
and what the broker adds: the median of the differences between each broker
cycle and the direct cycle next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

try:
    import loopdev
    from loopdev import broker_client
except ImportError as exc:
    sys.exit(f"bench_broker: cannot import loopdev ({exc}); pip install the package first")


def start_server(directory: str) -> tuple[list[subprocess.Popen[bytes]], str]:
    """The broker; its log goes through a pipe to another process, as to journald."""
    path = os.path.join(directory, "broker.sock")
    log_path = os.path.join(directory, "broker.log")
    env = {k: v for k, v in os.environ.items() if k != "LOOPDEV_BROKER"}
    with open(log_path, "wb") as log:
        sink = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
    assert sink.stdin is not None
    proc = subprocess.Popen(
        [sys.executable, "-m", "loopdev", "serve", "--socket", path], stderr=sink.stdin, env=env
    )
    sink.stdin.close()  # cat ends when the broker does
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sink.wait()
            sys.exit(f"bench_broker: the broker exited: {open(log_path).read()}")
        try:
            broker_client.list_devices(path)
            return [proc, sink], path
        except OSError:
            time.sleep(0.02)
    proc.kill()
    proc.wait()
    sink.wait()
    sys.exit("bench_broker: the broker did not start")


def stop_server(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to the broker; then its log reader ends by itself."""
    proc, sink = procs
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    sink.wait()


def timed(cycle: Callable[[], None]) -> float:
    start = time.perf_counter()
    cycle()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_broker: run as root (the broker and the direct attach need it)")

    directory = tempfile.mkdtemp(prefix="loopdev-bench-broker.")
    procs = None
    try:
        image = os.path.join(directory, "disk.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        procs, sock = start_server(directory)

        def direct() -> None:
            loopdev.attach(image, broker="").detach()

        def brokered() -> None:
            loopdev.attach(image, broker=sock).detach()

        def listing() -> None:
            broker_client.list_devices(sock)

        scenarios: dict[str, Callable[[], None]] = {
            "direct attach+detach": direct,
            "broker attach+detach": brokered,
            "broker List round trip": listing,
        }
        for cycle in list(scenarios.values()) * 20:  # warm up: imports, first devices
            timed(cycle)
        results: dict[str, list[float]] = {name: [] for name in scenarios}
        names = list(scenarios)
        for i in range(args.rounds * args.cycles):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                results[name].append(timed(scenarios[name]))
    finally:
        if procs is not None:
            stop_server(procs)
        shutil.rmtree(directory, ignore_errors=True)

    def p90(values: list[float]) -> float:
        return statistics.quantiles(values, n=10)[-1]

    direct_times = results["direct attach+detach"]
    base = statistics.median(direct_times)
    rows: list[dict[str, Any]] = []
    for name, values in results.items():
        median = statistics.median(values)
        added = statistics.median(v - d for v, d in zip(values, direct_times, strict=True))
        rows.append(
            {
                "scenario": name,
                "median_us": round(median * 1e6, 1),
                "p90_us": round(p90(values) * 1e6, 1),
                "x_direct": round(median / base, 2),
                "added_us": round(added * 1e6, 1),
            }
        )
    if args.json:
        print(json.dumps({"cycles": args.cycles, "rounds": args.rounds, "results": rows}))
        return 0
    print(f"{args.rounds} rounds x {args.cycles} cycles, medians (kernel {os.uname().release})")
    print(f"{'scenario':<26} {'median':>10} {'p90':>10} {'x direct':>9} {'added':>10}")
    for row in rows:
        shown = f"{row['added_us']:.0f} us" if row["scenario"].endswith("detach") else ""
        print(
            f"{row['scenario']:<26} {row['median_us']:>7.0f} us {row['p90_us']:>7.0f} us "
            f"{row['x_direct']:>9.2f} {shown:>10}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
