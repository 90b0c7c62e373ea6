"""argv[2] attach/release cycles on argv[1], alternating compat ``loop_for_fd`` and the
native loop below it (which counts its retries).

Prints JSON: {"failures": [repr, ...], "retries": N}.
"""

from __future__ import annotations

import json
import os
import sys

import loopdev
from loopdev import _native

path, cycles = sys.argv[1], int(sys.argv[2])
ctl = loopdev.LoopControl()
fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
dev_dir = os.open("/dev", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
failures: list[str] = []
retries = 0
config = _native.Config(flags=_native.LO_FLAGS_AUTOCLEAR)
for i in range(cycles):
    try:
        if i % 2:
            lo = ctl.loop_for_fd(fd, autoclear=True)
            if not lo.is_bound_to(fd):
                failures.append("not bound")
            lo.close()
        else:  # the engine of loop_for_fd, to count its retries
            got = _native.attach(ctl.fd, dev_dir, fd, config)
            retries += got.retries
            os.close(got.fd)
    except OSError as exc:
        failures.append(repr(exc))
print(json.dumps({"failures": failures, "retries": retries}))
