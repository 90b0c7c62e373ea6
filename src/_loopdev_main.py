"""Where the ``loopdev`` command starts (and ``python -m loopdev``).

Outside the package on purpose: ``import loopdev`` takes a few ms, and Python
turns a Ctrl-C during it into a ``KeyboardInterrupt`` traceback. Importing
this module (the command script's first import) puts the command's handling
of Ctrl-C in place before anything of loopdev is imported: Ctrl-C then ends
the command as SIGINT ends losetup, killed by SIGINT and silent, so a shell
script that ran it stops too (a shell goes on after a child that merely
exits 130). Clean-up in ``finally`` blocks still runs first. Only CPython's
own start (``site``, a few ms) and the two lines of ``scripts/loopdev`` come
before this module.
"""

import sys  # and nothing else: `from __future__` too would import a module first

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from types import TracebackType

    from loopdev.cli import Args


def excepthook(kind: type[BaseException], value: BaseException, tb: "TracebackType | None") -> None:
    """Python's report of an uncaught exception, except Ctrl-C: die of SIGINT."""
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, tb)
        return
    # Imported here: signal costs ~1 ms before re or enum are (python -m), a
    # window in which Ctrl-C would still print a traceback.
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C ends it at once
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()  # what the command printed before (the kill skips Python's exit)
        except (OSError, ValueError):
            pass
    os.kill(os.getpid(), signal.SIGINT)


# At import, not in main(): Python may run the pending KeyboardInterrupt of a
# Ctrl-C at the start of any frame, main()'s too. Before this line only the
# module's first instruction (a traceback "line 0") can still take it.
sys.excepthook = excepthook


def main() -> int:
    """The ``loopdev`` console script (and ``python -m loopdev``): ``loopdev.cli.main``,
    which gets ``serve`` from here: the broker is a layer above the CLI, which does
    not import it (tests/test_layers.py)."""
    from loopdev.cli import main as cli_main

    return cli_main(serve=_serve)


def _serve(args: "Args") -> int:
    from loopdev import broker  # only serve pays for importing it

    return broker.run(args)
