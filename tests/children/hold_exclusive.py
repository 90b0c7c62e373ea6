"""Open the next free loop device with O_EXCL and hold it for argv[1] seconds.

Prints "MINOR RELEASE_AT" (CLOCK_MONOTONIC, shared by every process) once held.
"""

from __future__ import annotations

import os
import sys
import time

from _raw import get_free, open_control

hold = float(sys.argv[1])
ctl = open_control()
for _ in range(100):
    minor = get_free(ctl)
    try:
        fd = os.open(f"/dev/loop{minor}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        break
    except OSError:  # taken or removed since GET_FREE
        time.sleep(0.001)
else:
    sys.exit("no free minor could be held")
print(minor, time.monotonic() + hold, flush=True)
time.sleep(hold)
os.close(fd)
