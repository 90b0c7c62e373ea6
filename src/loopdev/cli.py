"""The ``loopdev`` command: attach, detach, list, find and resize loop devices like losetup.

Built on the high-level API only (``loopdev.device``), so the command exercises
the same code paths as library users. Errors are ``OSError``s; they become one
``loopdev: <message>`` line on stderr and exit status 1 (``--debug`` adds the
traceback). Usage errors exit 2, as argparse does. Ctrl-C leaves ``main()`` as
``KeyboardInterrupt``; the command then dies of SIGINT, silently, as losetup
does (``_loopdev_main``).

Where it differs from losetup: ``find`` prints device paths only, one a line
(``losetup -j`` prints its ``-a`` format); ``list DEVICE`` fails for an unbound
device (losetup prints a row of blanks); ``list --json`` writes backing paths
that are not UTF-8 with ``\\xNN`` escapes (losetup writes the raw bytes, which
is not valid JSON text).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import stat
import sys

from loopdev.errors import LoopError

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    from loopdev.device import DeviceInfo, DirectIO, LoopDevice

    _T = TypeVar("_T")
    _N = TypeVar("_N", int, float)

__all__ = ["main", "parse_size"]

PROG = "loopdev"

# Suffix -> multiplier. "K"/"KiB" are 1024-based like losetup's; "KB" is the
# 1000-based form util-linux also accepts.
_UNITS = {"": 1, "B": 1}
_binary = _decimal = 1
for _letter in "KMGTPE":
    _binary, _decimal = _binary * 1024, _decimal * 1000
    _UNITS[_letter] = _UNITS[_letter + "IB"] = _binary
    _UNITS[_letter + "B"] = _decimal
_SIZE_RE = re.compile(r"\s*(-?)(0[xX][0-9a-fA-F]+|[0-9]+)\s*([a-zA-Z]*)\s*\Z")

_DIRECT_IO: dict[str, DirectIO] = {"on": True, "off": False, "auto": "auto"}

# losetup -l's default columns: (header, right-aligned?).
_COLUMNS = (
    ("NAME", False),
    ("SIZELIMIT", True),
    ("OFFSET", True),
    ("AUTOCLEAR", True),
    ("RO", True),
    ("BACK-FILE", False),
    ("DIO", True),
    ("LOG-SEC", True),
)

JsonValue = str | int | bool


class Args(argparse.Namespace):
    """The parsed command line, typed (a plain Namespace's attributes are ``Any``).

    A subcommand's parser sets only its own options: reading another's fails
    (AttributeError) as with a plain Namespace.
    """

    command: str
    func: Callable[[Args], int]
    subparser: argparse.ArgumentParser
    debug: bool
    # attach, run (and find: file)
    file: str
    offset: int
    sizelimit: int
    read_only: bool
    partscan: bool
    direct_io: str
    sector_size: int | None
    show: bool
    nooverlap: bool
    cmd: list[str]
    # detach
    all: bool
    wait: float
    targets: list[str]
    # list, find, resize
    json: bool
    only: str | None
    broker: str | None
    at_offset: int | None
    device: str
    # serve
    socket: str | None
    allow_user: list[int]
    allow_group: list[int]
    max_per_client: int
    max_devices: int
    allow_block_devices: bool
    node_dir: str
    timeout: float


def parse_size(text: str) -> int:
    """``"4096"``, ``"0x1000"``, ``"4K"``, ``"4KiB"`` (1024-based) or ``"4KB"`` (1000-based).

    A minus sign is accepted so that the library, not the parser, rejects a
    negative offset with a message naming the file.
    """
    m = _SIZE_RE.match(text)
    suffix: str = m.group(3) if m else ""
    unit = _UNITS.get(suffix.upper()) if m else None
    if m is None or unit is None:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r} (bytes, or with a suffix K, M, G, T, KiB, MiB, ...)"
        )
    value = int(m.group(2), 0) * unit
    return -value if m.group(1) else value


def _loop_name(arg: str) -> str | None:
    """``loopN`` for ``loopN``, ``/dev/loopN`` or a node of it elsewhere; else None."""
    path = arg
    try:
        st = os.stat(arg)
    except OSError:
        pass  # not a path: may still be a bare name like "loop3"
    else:
        if not stat.S_ISBLK(st.st_mode):
            return None  # a file that happens to be called loopN
        path = os.path.realpath(arg)  # e.g. a symlink to /dev/loopN
    base = os.path.basename(path)
    if base.startswith("loop") and base[4:].isdigit():
        return base
    return None


def _device_arg(arg: str) -> str:
    name = _loop_name(arg)
    if name is None:
        raise LoopError(errno.EINVAL, "not a loop device", device=arg)
    return name


def _printable(text: str) -> str:
    """One line of valid text: undecodable bytes and control characters escaped.

    Backing paths come from the kernel as bytes; a newline in one must not
    break the one-row-per-device table.
    """
    decoded = os.fsencode(text).decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else _escape(c) for c in decoded)


def _escape(char: str) -> str:
    # \x0a rather than \n: what losetup's table shows.
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else ascii(char)[1:-1]


def _json_text(text: str) -> str:
    # Undecodable bytes arrive as lone surrogates, which stdout cannot encode.
    return os.fsencode(text).decode("utf-8", "backslashreplace")


def _row(info: DeviceInfo) -> dict[str, JsonValue]:
    """One device as ``losetup -J -l`` shows it (same keys, same JSON types)."""
    return {
        "name": info.path,
        "sizelimit": info.sizelimit,
        "offset": info.offset,
        "autoclear": info.autoclear,
        "ro": info.read_only,
        "back-file": _json_text(info.backing_file),
        "dio": info.direct_io,
        "log-sec": info.block_size,
    }


def format_table(infos: Sequence[DeviceInfo]) -> str:
    """losetup -l's table: text columns left-aligned, numbers and flags right-aligned."""
    rows = [[h for h, _ in _COLUMNS]]
    for info in infos:
        values = _row(info).values()
        # Flags show as 0/1, as in losetup's table.
        rows.append([_printable(v) if isinstance(v, str) else str(int(v)) for v in values])
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = []
    for r in rows:
        cells = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, (_, right) in zip(r, widths, _COLUMNS, strict=True)
        ]
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _warn(message: str) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")


# The library's messages name its keyword arguments; the CLI user typed flags.
_CLI_TERMS = (
    ("pass read_only=True", "use --read-only"),
    ("read_only=True", "--read-only"),
    ("direct_io='auto' or False", "--direct-io=auto or off"),
    ("block_size=", "--sector-size "),
    ("node_dir", "a node directory"),
)


def _message(exc: BaseException) -> str:
    """One line for ``exc``: LoopError's own text, else ``path: reason``; in CLI terms."""
    if isinstance(exc, OSError) and not isinstance(exc, LoopError) and exc.strerror:
        # typeshed: Any
        source: object = exc.filename
        target: object = exc.filename2
        where = [str(f) for f in (source, target) if f is not None]
        text = f"{' -> '.join(where)}: {exc.strerror}" if where else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    for api, cli in _CLI_TERMS:
        text = text.replace(api, cli)
    return " ".join(text.splitlines())


def _report(exc: OSError, debug: bool) -> None:
    if debug:
        import traceback  # imported late: only --debug needs it

        traceback.print_exception(exc)
    _warn(_message(exc))


# --- subcommands -------------------------------------------------------------------


def _overlapping(path: str, offset: int, sizelimit: int, read_only: bool) -> DeviceInfo | None:
    """A device to reuse for ``--nooverlap``: same file, offset and size limit.

    Raises ``DeviceBusy`` where a device of the file overlaps the requested range
    without being identical, or is read-only while read-write was asked (as
    losetup does: the kernel cannot change either afterwards).
    """
    from loopdev.device import find
    from loopdev.errors import DeviceBusy

    for info in find(path):
        if info.offset == offset and info.sizelimit == sizelimit:
            if info.read_only and not read_only:
                raise DeviceBusy(
                    errno.EBUSY,
                    "an overlapping read-only loop device exists",
                    device=info.path,
                    backing=path,
                )
            return info
        # Ranges [offset, offset + sizelimit); a size limit of 0 runs to the end.
        if info.sizelimit and offset >= info.offset + info.sizelimit:
            continue
        if sizelimit and offset + sizelimit <= info.offset:
            continue
        raise DeviceBusy(
            errno.EBUSY, "an overlapping loop device exists", device=info.path, backing=path
        )
    return None


def _open_writable(path: str) -> tuple[int | None, bool]:
    """``(fd, read_only)`` for attaching ``path`` as losetup would.

    Read-only where a read-write open is refused (losetup's fallback). A file
    without write permission that opens read-write anyway (root) comes as a
    read-write fd: ``attach()`` refuses such a path but binds a caller's fd,
    and losetup attaches it read-write. Otherwise ``(None, False)``:
    ``attach(path)`` opens it, or says what is wrong (a missing file, a
    directory, a FIFO that must not be opened).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None, False
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        return None, False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return None, exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
    if stat.S_ISREG(mode) and not mode & 0o222:
        return fd, False
    os.close(fd)
    return None, False


def _warn_if_tiny(path: str, offset: int) -> None:
    """losetup's warning for a file that holds less than one sector past the offset."""
    try:
        st = os.stat(path)
    except OSError:
        return  # attach says why
    remaining = st.st_size - offset
    # Past the end (offset >= size) is an error the library reports instead.
    if stat.S_ISREG(st.st_mode) and (remaining > 0 or st.st_size == 0) and remaining < 512:
        _warn(
            f"{path}: Warning: file is smaller than 512 bytes; the loop device may be "
            "useless or invisible for system tools."
        )


def cmd_attach(args: Args) -> int:
    """Attach FILE to a free device that stays bound after we exit."""
    if os.environ.get("LOOPDEV_BROKER"):
        raise LoopError(
            errno.EINVAL,
            "through the broker (LOOPDEV_BROKER) a device lives only as long as the process "
            "that asked for it, so `loopdev attach` cannot leave one bound; run what needs "
            "it as `loopdev run [OPTIONS] FILE -- COMMAND [ARG...]` (the device is in "
            "$LOOPDEV, its partitions in $LOOPDEV_PARTITIONS)",
            backing=args.file,
        )
    if args.nooverlap:
        reuse = _overlapping(args.file, args.offset, args.sizelimit, args.read_only)
        if reuse is not None:
            if reuse.autoclear:
                # losetup clears autoclear here; the high-level API cannot.
                _warn(
                    f"warning: reusing {reuse.path}, which is released when its last "
                    "user closes it (autoclear)"
                )
            if args.show:
                _out(reuse.path)
            return 0
    fd, read_only = (None, True) if args.read_only else _open_writable(args.file)
    if read_only and not args.read_only:
        _warn(f"{args.file}: Warning: file is write-protected, attaching read-only")
    _warn_if_tiny(args.file, args.offset)
    try:
        dev = _attach_file(args, args.file if fd is None else fd, read_only)
    finally:
        if fd is not None:
            os.close(fd)
    # close(), not detach(): the binding is the point.
    try:
        if args.show:
            _out(dev.path)
    finally:
        dev.close()
    return 0


def _attach_file(
    args: Args, backing: str | int, read_only: bool, *, run: bool | None = None
) -> LoopDevice:
    """``attach`` (``run`` None): a device that outlives us, locked while configured.
    ``run`` True/False: an autoclear device, locked where ``run`` is True (through
    the broker that ``LOOPDEV_BROKER`` names, if any: ``loopdev.attach``)."""
    from loopdev import attach

    return attach(
        backing,
        offset=args.offset,
        sizelimit=args.sizelimit,
        read_only=read_only,
        partscan=args.partscan,
        direct_io=_DIRECT_IO[args.direct_io],
        block_size=args.sector_size,
        # The device outlives this process, like losetup's (not so for run).
        autoclear=run is not None,
        # Keeps probers off the device while it is configured (losetup locks too).
        lock=run is None or run,
    )


# What a shell exits with for a command it cannot run.
_CANNOT_EXECUTE, _NOT_FOUND = 126, 127


def cmd_run(args: Args) -> int:
    """Attach FILE for exactly the life of COMMAND; exit with COMMAND's status.

    The device is released afterwards whatever happens to COMMAND; if loopdev
    itself is killed, autoclear (or, through a broker, the broker) releases
    it. Ctrl-C reaches COMMAND from the terminal as for any foreground job;
    loopdev ignores it and waits. SIGTERM and SIGHUP sent to loopdev are
    passed on to COMMAND.
    """
    import signal

    broker = bool(os.environ.get("LOOPDEV_BROKER"))
    fd, read_only = (None, True) if args.read_only else _open_writable(args.file)
    if read_only and not args.read_only:
        _warn(f"{args.file}: Warning: file is write-protected, attaching read-only")
    _warn_if_tiny(args.file, args.offset)
    try:
        # autoclear: a SIGKILLed loopdev leaves nothing bound. No lock through a
        # broker: it keeps probers off by itself.
        dev = _attach_file(args, args.file if fd is None else fd, read_only, run=not broker)
    finally:
        if fd is not None:
            os.close(fd)
    child: list[subprocess.Popen[bytes]] = []
    pending: list[int] = []

    def forward(signum: int, frame: object) -> None:
        if child:
            child[0].send_signal(signum)
        else:
            pending.append(signum)

    def ignore(signum: int, frame: object) -> None:
        pass  # a Python handler, not SIG_IGN: COMMAND gets the default again at exec

    handlers = {
        signal.SIGINT: ignore,
        signal.SIGQUIT: ignore,
        signal.SIGTERM: forward,
        signal.SIGHUP: forward,
    }
    old = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
    try:
        status = _run_command(dev, args.cmd, child, pending)
        try:
            # lazy: a partition COMMAND left open (a background prober) defers the
            # release to its close, as losetup -d would.
            dev.detach(lazy=True)
        except OSError as exc:
            _report(exc, args.debug)
            status = status or 1
    finally:
        dev.close()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    return status


def _run_command(
    dev: LoopDevice, cmd: list[str], child: list[subprocess.Popen[bytes]], pending: list[int]
) -> int:
    """Run ``cmd`` with the device in its environment; its exit status, shell style."""
    import subprocess  # only run needs it

    env = dict(os.environ)
    env["LOOPDEV"] = dev.path
    env["LOOPDEV_PARTITIONS"] = " ".join(p.path for p in dev.partitions)
    try:
        proc = subprocess.Popen(cmd, env=env)
    except FileNotFoundError:
        _warn(f"{cmd[0]}: command not found")
        return _NOT_FOUND
    except OSError as exc:
        _warn(f"{cmd[0]}: {exc.strerror}")
        return _CANNOT_EXECUTE
    child.append(proc)
    for signum in pending:
        proc.send_signal(signum)
    code = proc.wait()
    return code if code >= 0 else 128 - code


def _not_bound(exc: OSError, path: str) -> OSError:
    """ENXIO from a loop ioctl means "not bound"; say so instead of naming the ioctl."""
    if exc.errno == errno.ENXIO:
        return LoopError(errno.ENXIO, "device is not bound", device=path)
    return exc


def _detach_device(name: str, backing: str | None, wait: float) -> None:
    """Detach ``name``; with ``backing``, only while it is still bound to that file."""
    from loopdev.device import find, open_device

    dev = open_device(name, owned=True)
    try:
        # Our open fd pins the binding: re-checking now closes the window in
        # which the device was released and rebound to another file.
        if backing is not None:
            file = backing
            if name not in {i.name for i in find(file)}:
                return
        try:
            # lazy: a partition in use (a prober, a reader) defers the release to
            # its last close instead of failing, as with losetup -d.
            dev.detach(timeout=wait, lazy=True)
        except OSError as exc:
            raise _not_bound(exc, dev.path) from exc
    finally:
        dev.close()


def _detach_targets(arg: str) -> list[tuple[str, str | None]]:
    """What ``detach ARG`` means: (loop name, backing file to re-check or None) pairs."""
    from loopdev.device import find

    name = _loop_name(arg)
    try:
        mode = os.stat(arg).st_mode
    except OSError:
        if name is None:
            raise
        return [(name, None)]  # "loop3" or a missing /dev/loop3: open_device says why
    if stat.S_ISREG(mode) or (stat.S_ISBLK(mode) and name is None):
        # A backing file, or a block device used as one.
        return [(info.name, arg) for info in find(arg)]
    if stat.S_ISBLK(mode) and name is not None:
        return [(name, None)]
    raise LoopError(errno.EINVAL, "neither a loop device nor a backing file", backing=arg)


def cmd_detach(args: Args) -> int:
    """Detach devices, every device of a backing file, or (``--all``) every device."""
    from loopdev.device import devices

    # Pairs of (loop name, backing file to re-check or None).
    targets: list[tuple[str, str | None]] = []
    failed = False
    if args.all:
        targets = [(info.name, None) for info in devices()]
    for arg in args.targets:
        try:
            targets.extend(_detach_targets(arg))
        except OSError as exc:
            # Go on with the others, like losetup -d; the status says it failed.
            _warn(_message(exc))
            failed = True
    for name, backing in targets:
        try:
            _detach_device(name, backing, args.wait)
        except OSError as exc:
            # Go on with the others, like losetup -d; the status says it failed.
            _report(exc, args.debug)
            failed = True
    return 1 if failed else 0


def cmd_list(args: Args) -> int:
    """Show bound devices as losetup -l (or -J -l) does."""
    from loopdev.device import devices

    infos = devices()
    if args.broker is not None:
        from loopdev.broker_client import list_devices

        names = {d.get("name") for d in list_devices(args.broker)}
        infos = [i for i in infos if i.name in names]
    if args.only is not None:
        name = _device_arg(args.only)
        infos = [i for i in infos if i.name == name]
        if not infos:
            raise LoopError(errno.ENXIO, "device is not bound", device=f"/dev/{name}")
    if args.json:
        document = {"loopdevices": [_row(i) for i in infos]}
        _out(json.dumps(document, indent=3, ensure_ascii=False))
    elif infos:
        # Like losetup: no devices, no output (not even the header).
        _out(format_table(infos))
    return 0


def cmd_find(args: Args) -> int:
    """Print the devices backed by FILE (optionally at an offset), one path a line."""
    from loopdev.device import find

    for info in find(args.file, args.at_offset):
        _out(info.path)
    return 0


def cmd_resize(args: Args) -> int:
    """Make DEVICE pick up its backing file's new size (losetup -c)."""
    from loopdev.device import open_device

    with open_device(_device_arg(args.device)) as dev:
        try:
            dev.resize()
        except OSError as exc:
            raise _not_bound(exc, dev.path) from exc
    return 0


# --- parser ------------------------------------------------------------------------


def _attach_options(p: argparse.ArgumentParser) -> None:
    """The options ``attach`` and ``run`` share: how the device is set up."""
    direct_io: list[str] = sorted(_DIRECT_IO)
    p.add_argument(
        "-o",
        "--offset",
        type=parse_size,
        default=0,
        metavar="N",
        help="start N bytes into the file",
    )
    p.add_argument(
        "--sizelimit",
        type=parse_size,
        default=0,
        metavar="N",
        help="use at most N bytes of the file (a multiple of 512)",
    )
    p.add_argument("-r", "--read-only", action="store_true", help="set up a read-only device")
    p.add_argument("-P", "--partscan", action="store_true", help="register partitions")
    p.add_argument(
        "--direct-io",
        nargs="?",
        const="on",
        default="off",
        choices=direct_io,
        metavar="on|off|auto",
        help="direct I/O on the backing file: on, off or auto (where the file allows it); "
        "default off, as in losetup; alone means on, so give a value as --direct-io=VALUE",
    )
    p.add_argument(
        "-b",
        "--sector-size",
        type=parse_size,
        default=None,
        metavar="N",
        help="logical sector size: 512, 1024, 2048 or 4096",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and shell-completion generators)."""
    # --debug works before and after the subcommand; SUPPRESS keeps the
    # subparser's default from overwriting a --debug given before it.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show the traceback on errors",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Set up and control loop devices (a losetup work-alike).",
    )
    parser.add_argument("--debug", action="store_true", help="show the traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str,
        func: Callable[[Args], int],
        help: str,
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[debug], help=help, description=help)
        # The subcommand's own parser: its usage goes with its errors.
        p.set_defaults(func=func, subparser=p)
        return p

    p = command("attach", cmd_attach, "attach FILE to a free loop device (losetup -f FILE)")
    _attach_options(p)
    p.add_argument("--show", action="store_true", help="print the device path")
    p.add_argument(
        "-L",
        "--nooverlap",
        action="store_true",
        help="reuse a device of FILE with the same offset and size limit; fail if one overlaps",
    )
    p.add_argument("file", metavar="FILE")

    p = command(
        "run",
        cmd_run,
        "attach FILE, run COMMAND with LOOPDEV (the device) and LOOPDEV_PARTITIONS "
        "(its partitions) in its environment, then detach; exits with COMMAND's status",
    )
    _attach_options(p)
    p.add_argument("file", metavar="FILE")
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG...]")

    p = command(
        "detach", cmd_detach, "detach devices, or every device of a backing FILE (losetup -d)"
    )
    p.add_argument(
        "-a", "--all", action="store_true", help="detach every bound loop device (losetup -D)"
    )
    p.add_argument(
        "--wait",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="--wait or --wait=SECONDS: wait (10 s, or SECONDS) until the kernel released "
        "each device; without it, return at once like losetup -d (the kernel releases a "
        "device still held open when its last user closes it)",
    )
    p.add_argument("targets", nargs="*", metavar="DEVICE|FILE")

    p = command("list", cmd_list, "show bound devices (losetup -l)")
    p.add_argument("-J", "--json", action="store_true", help="as losetup -J -l")
    p.add_argument("only", nargs="?", metavar="DEVICE")
    p.add_argument(
        "--broker",
        metavar="PATH",
        help="only the devices that the broker at socket PATH holds for this user",
    )

    p = command("find", cmd_find, "print the devices backed by FILE, one path a line (losetup -j)")
    p.add_argument(
        "-o",
        "--offset",
        dest="at_offset",
        type=parse_size,
        default=None,
        metavar="N",
        help="only devices starting N bytes into the file",
    )
    p.add_argument("file", metavar="FILE")

    p = command("resize", cmd_resize, "re-read the backing file's size (losetup -c)")
    p.add_argument("device", metavar="DEVICE")
    _serve_arguments(command("serve", cmd_serve, "serve loop devices to other users (root)"))
    # Documentation only: main() hands "losetup ..." to loopdev.losetup before parsing.
    p = sub.add_parser(
        "losetup",
        add_help=False,
        help="util-linux losetup's syntax and output (also run as `losetup`)",
        description="util-linux 2.38 losetup's options, output and exit codes",
    )
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS")
    return parser


def _version() -> str:
    from loopdev import __version__

    return __version__


# --- serve -------------------------------------------------------------------------


def _positive(text: str, value: _N) -> _N:
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"invalid value {text!r} (a positive number)")
    return value


def _count(text: str) -> int:
    try:
        return _positive(text, int(text))
    except ValueError:
        return _positive(text, 0)


def _seconds(text: str) -> float:
    try:
        return _positive(text, float(text))
    except ValueError:
        return _positive(text, 0.0)


def _id(text: str, lookup: Callable[[str], int], what: str) -> int:
    """A number as it is, or a name that ``lookup`` finds (``KeyError`` where not)."""
    try:
        return int(text) if text.isdigit() else lookup(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such {what}: {text}") from None


def _user_id(text: str) -> int:
    import pwd

    return _id(text, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _group_id(text: str) -> int:
    import grp

    return _id(text, lambda name: grp.getgrnam(name).gr_gid, "group")


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--socket",
        metavar="PATH",
        help="listen on PATH (default /run/loopdev/broker.sock; "
        "a socket passed by systemd socket activation comes first)",
    )
    for flag, parse, metavar, allowed in (
        (
            "--allow-user",
            _user_id,
            "USER|UID",
            "let this user attach devices (repeatable; root always may)",
        ),
        (
            "--allow-group",
            _group_id,
            "GROUP|GID",
            "let members of this group attach devices (repeatable)",
        ),
    ):
        ids: list[int] = []  # argparse appends to a copy
        p.add_argument(
            flag, action="append", type=parse, default=ids, metavar=metavar, help=allowed
        )
    for flag, most, held in (
        ("--max-per-client", 16, "devices one user may hold at once"),
        ("--max-devices", 256, "devices the broker holds at once in total"),
    ):
        p.add_argument(
            flag, type=_count, default=most, metavar="N", help=f"{held} (default {most})"
        )
    p.add_argument(
        "--allow-block-devices",
        action="store_true",
        help="accept block devices as backing files, not only regular files",
    )
    p.add_argument(
        "--node-dir",
        default="/dev",
        metavar="DIR",
        help="where the private directory for handing over nodes is made; "
        "its file system must allow devices (not nodev) (default /dev)",
    )
    p.add_argument(
        "--timeout",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="a request must arrive within SECONDS once started; a connection "
        "holding no device is closed after SECONDS idle (default 10)",
    )


def cmd_serve(args: Args) -> int:
    """``serve`` runs the broker, a layer above the CLI (which does not import it):
    the program (``loopdev``, ``python -m loopdev``) hands it to :func:`main`."""
    raise LoopError(
        errno.ENOTSUP,
        "serve runs the broker: start it as `loopdev serve` or `python -m loopdev serve`",
    )


# Options whose value is optional, as with getopt: the value only after "=",
# so that "--wait /dev/loop3" waits (10 s) for /dev/loop3 and
# "--direct-io disk.img" attaches disk.img with direct I/O (as losetup).
_OPTIONAL_VALUES = {
    "detach": {"--wait": "--wait=10"},
    "attach": {"--direct-io": "--direct-io=on"},
    "run": {"--direct-io": "--direct-io=on"},
}


def _with_values(given: list[str]) -> list[str]:
    """``given`` with the bare optional-value options of its subcommand completed
    (up to "--": what follows belongs to run's command)."""
    command = next((arg for arg in given if not arg.startswith("-")), None)
    table = _OPTIONAL_VALUES.get(command or "", {})
    out: list[str] = []
    for i, arg in enumerate(given):
        if arg == "--":
            return out + given[i:]
        out.append(table.get(arg, arg))
    return out


def _output_cut() -> int:
    """Output cut short (e.g. piped into head): not worth a message; status 1.

    Points stdout at /dev/null so the flush at exit does not fail again.
    """
    devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    stdout: int = sys.stdout.fileno()
    os.dup2(devnull, stdout)
    os.close(devnull)
    return 1


def main(argv: list[str] | None = None, *, serve: Callable[[Args], int] = cmd_serve) -> int:
    """Run the command line; returns the exit status. ``serve`` runs ``loopdev serve``
    (``loopdev.__main__`` passes the broker's)."""
    given = sys.argv[1:] if argv is None else argv
    # Busybox style: the same program under the name losetup is the drop-in.
    if argv is None and os.path.basename(sys.argv[0]) == "losetup":
        from loopdev import losetup

        return losetup.main(given)
    if given[:1] == ["losetup"]:
        from loopdev import losetup

        return losetup.main(given[1:], prog=f"{PROG} losetup")
    parser = build_parser()
    args, unknown = parser.parse_known_args(_with_values(given), namespace=Args())
    sub = args.subparser
    if unknown:
        sub.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "detach" and args.all == bool(args.targets):
        sub.error("detach needs DEVICE or FILE arguments, or --all (not both)")
    if args.command == "run":
        if args.cmd[:1] == ["--"]:  # argparse keeps it on some versions
            args.cmd = args.cmd[1:]
        if not args.cmd:
            sub.error("run needs a command: loopdev run [OPTIONS] FILE -- COMMAND [ARG...]")
    func = serve if args.command == "serve" else args.func
    try:
        status = func(args)
        sys.stdout.flush()  # here, where a broken pipe can still be caught
        return status
    except BrokenPipeError:
        return _output_cut()
    except OSError as exc:
        _report(exc, args.debug)
        return 1
