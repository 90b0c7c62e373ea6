"""Read the first MiB of device argv[1] over and over for argv[2] seconds, dropping the
page cache each time so every read reaches the device. Prints "reading" once open.
"""

import os
import sys
import time

fd = os.open(sys.argv[1], os.O_RDONLY | os.O_CLOEXEC)
print("reading", flush=True)
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    for off in range(0, 1 << 20, 65536):
        try:
            os.pread(fd, 65536, off)
        except OSError:  # the offset moved under us: reads past the end fail
            pass
os.close(fd)
