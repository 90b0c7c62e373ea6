"""Inside a private mount namespace with a ramfs at the parent of argv[1]: make the 1 MiB
file argv[1], then attach it with forced direct I/O (API argv[2]: attach, or cli with
the command line argv[3:]).

Prints JSON: "backing" is [st_dev, st_ino] of the file (only we can see it: the parent
registers it for the leak check), plus {"ok": true}, the error's type/errno/text, or the
CLI's rc/stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import loopdev

path, api, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
with open(path, "wb") as f:
    f.truncate(1 << 20)
st = os.stat(path)
result: dict[str, object] = {"backing": [st.st_dev, st.st_ino]}
if api == "cli":
    out = subprocess.run([*argv, path], capture_output=True, text=True)
    result.update(rc=out.returncode, stderr=out.stderr)
else:
    try:
        with loopdev.attach(path, direct_io=True):
            result["ok"] = True
    except OSError as exc:
        result.update(type=type(exc).__name__, errno=exc.errno, text=str(exc))
print(json.dumps(result))
