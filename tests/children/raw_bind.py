"""Bind argv[1] with bare ioctls (GET_FREE, open, LOOP_CONFIGURE) WITHOUT autoclear,
recording argv[2] as the name (lo_file_name), and exit: the device stays bound until
someone clears it. argv[3] "make": create the 1 MiB file first.

Prints JSON {"minor": N, "backing": [st_dev, st_ino]}.
"""

from __future__ import annotations

import json
import os
import sys

from _raw import configured, loop_config, open_control, open_free

path, name = sys.argv[1], os.fsencode(sys.argv[2])
if sys.argv[3:] == ["make"]:
    with open(path, "wb") as f:
        f.truncate(1 << 20)
back = os.open(path, os.O_RDWR | os.O_CLOEXEC)
ctl = open_control()
for _ in range(100):  # others allocate at the same time, without our lock
    got = open_free(ctl)
    if got is None:
        continue
    minor, dev = got
    try:
        if configured(dev, loop_config(back, 0, name)):
            break
    finally:
        os.close(dev)
else:
    sys.exit("no free minor stayed free")
st = os.fstat(back)
print(json.dumps({"minor": minor, "backing": [st.st_dev, st.st_ino]}))
