"""An allocator that does not take the loop-control lock: GET_FREE, open, LOOP_CONFIGURE
(autoclear), close, for argv[2] seconds with backing file argv[1].

Prints "BUSY DONE": how often LOOP_CONFIGURE answered EBUSY, and succeeded.
"""

from __future__ import annotations

import os
import sys
import time

from _raw import configured, loop_config, open_control, open_free

from loopdev import _native

ctl = open_control()
back = os.open(sys.argv[1], os.O_RDWR | os.O_CLOEXEC)
config = loop_config(back, _native.LO_FLAGS_AUTOCLEAR)
deadline = time.monotonic() + float(sys.argv[2])
busy = done = 0
while time.monotonic() < deadline:
    got = open_free(ctl)
    if got is None:
        continue
    if configured(got[1], config):
        done += 1
    else:
        busy += 1
    os.close(got[1])
print(busy, done)
