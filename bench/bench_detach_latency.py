"""How soon detach() returns after the last other holder closes the device.

A program, not a test: prints the median and maximum over 30 detaches.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time

import loopdev


def main(rounds: int = 30) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        image = os.path.join(tmp, "lat.img")
        with open(image, "wb") as f:
            f.truncate(1 << 20)
        latencies = []
        for _ in range(rounds):
            dev = loopdev.attach(image)
            holder = os.open(dev.path, os.O_RDONLY | os.O_CLOEXEC)
            closed_at: list[float] = []

            def close_later(fd: int = holder, stamp: list[float] = closed_at) -> None:
                time.sleep(0.05)
                stamp.append(time.monotonic())
                os.close(fd)

            thread = threading.Thread(target=close_later)
            thread.start()
            dev.detach(timeout=5)
            latencies.append(time.monotonic() - closed_at[0])
            thread.join()
    print(
        f"detach latency after the last holder closed: median "
        f"{statistics.median(latencies) * 1e3:.2f} ms, max {max(latencies) * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    main()
