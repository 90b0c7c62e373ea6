"""Hold argv[1] open read-only (after one read) until stdin is closed.

Prints "held" once it holds the device.
"""

import os
import sys

fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
os.pread(fd, 4096, 0)
print("held", flush=True)
sys.stdin.read()  # until the parent closes our stdin
os.close(fd)
