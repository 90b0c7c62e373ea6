"""Bind argv[1] with bare ioctls (GET_FREE, open, LOOP_CONFIGURE) WITHOUT autoclear,
recording argv[2] as the name (lo_file_name), and exit: the device stays bound until
someone clears it. argv[3] "make": create the 1 MiB file first.

Prints JSON {"minor": N, "backing": [st_dev, st_ino]}.
"""

from __future__ import annotations

import errno
import json
import os
import sys

from _raw import configure, get_free, loop_config, open_control

path, name = sys.argv[1], os.fsencode(sys.argv[2])
if sys.argv[3:] == ["make"]:
    with open(path, "wb") as f:
        f.truncate(1 << 20)
back = os.open(path, os.O_RDWR | os.O_CLOEXEC)
ctl = open_control()
for _ in range(100):  # others allocate at the same time, without our lock
    minor = get_free(ctl)
    try:
        dev = os.open(f"/dev/loop{minor}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        continue
    try:
        configure(dev, loop_config(back, 0, name))
        break
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise
    finally:
        os.close(dev)
else:
    sys.exit("no free minor stayed free")
st = os.fstat(back)
print(json.dumps({"minor": minor, "backing": [st.st_dev, st.st_ino]}))
