"""``python -m loopdev``: the command line (Ctrl-C: see _loopdev_main.py)."""

import sys

from _loopdev_main import main

if __name__ == "__main__":
    sys.exit(main())
