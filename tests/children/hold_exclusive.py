"""Open the next free loop device with O_EXCL and hold it for argv[1] seconds, or with
argv[1] "stdin" until a line (or EOF) comes on stdin, at most 60 s.

Prints "MINOR RELEASE_AT" (CLOCK_MONOTONIC, shared by every process; "inf" for "stdin")
once held.
"""

from __future__ import annotations

import os
import select
import sys
import time

from _raw import get_free, open_control

hold = sys.argv[1]
ctl = open_control()
# Another holder (a parallel run of the same tests) may have that minor for a while:
# GET_FREE names it again until it lets go.
deadline = time.monotonic() + 30
while True:
    minor = get_free(ctl)
    try:
        fd = os.open(f"/dev/loop{minor}", os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC)
        break
    except OSError as exc:  # taken, held or removed since GET_FREE
        if time.monotonic() > deadline:
            sys.exit(f"no free minor could be held: loop{minor}: {exc}")
        time.sleep(0.001)
if hold == "stdin":
    print(minor, "inf", flush=True)
    select.select([sys.stdin], [], [], 60.0)
else:
    print(minor, time.monotonic() + float(hold), flush=True)
    time.sleep(float(hold))
os.close(fd)
