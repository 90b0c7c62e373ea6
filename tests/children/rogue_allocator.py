"""An allocator that does not take the loop-control lock: GET_FREE, open, LOOP_CONFIGURE
(autoclear), close, for argv[2] seconds with backing file argv[1].

Prints "BUSY DONE": how often LOOP_CONFIGURE answered EBUSY, and succeeded.
"""

from __future__ import annotations

import errno
import os
import sys
import time

from _raw import configure, get_free, loop_config, open_control

from loopdev import _native

ctl = open_control()
back = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
config = loop_config(back, _native.LO_FLAGS_AUTOCLEAR)
deadline = time.monotonic() + float(sys.argv[2])
busy = done = 0
while time.monotonic() < deadline:
    minor = get_free(ctl)
    try:
        dev = os.open(f"/dev/loop{minor}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        continue
    try:
        configure(dev, config)
        done += 1
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
        busy += 1
    os.close(dev)
print(busy, done)
