"""``python -m loopdev``: the command line."""

import sys

from loopdev.cli import main

if __name__ == "__main__":
    sys.exit(main())
