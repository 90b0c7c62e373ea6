"""The ``loopdev`` command: attach, detach, list, find and resize loop devices like losetup.

Built on the high-level API only (``loopdev.device``), so the command exercises
the same code paths as library users. Errors are ``OSError``s; they become one
``loopdev: <message>`` line on stderr and exit status 1 (``--debug`` adds the
traceback). Usage errors exit 2 with the command's usage line. Ctrl-C leaves ``main()`` as
``KeyboardInterrupt``; the command then dies of SIGINT, silently, as losetup
does (``_loopdev_main``).

Where it differs from losetup: ``find`` prints device paths only, one a line
(``losetup -j`` prints its ``-a`` format); ``list DEVICE`` fails for an unbound
device (losetup prints a row of blanks); ``list --json`` writes backing paths
that are not UTF-8 with ``\\xNN`` escapes (losetup writes the raw bytes, which
is not valid JSON text).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from loopdev._record import Record
from loopdev.errors import LoopError

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    import subprocess
    from collections.abc import Callable, Sequence
    from typing import TypeVar

    from loopdev.device import DeviceInfo, DirectIO, LoopDevice

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


class Args:
    """The parsed command line, typed. The parser sets the options and arguments of the
    command given (and ``debug``): reading another command's fails (AttributeError).
    """

    command: str
    func: Callable[[Args], int]
    debug: bool
    help: bool
    # the program's own: --version, and the command with its arguments
    version: bool
    words: list[str]
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


class UsageError(ValueError):
    """A command line the parser refuses: exit status 2 with ``command``'s usage
    (None: the program's)."""

    def __init__(self, message: str, command: Command | None = None) -> None:
        super().__init__(message)
        self.command = command


def parse_size(text: str) -> int:
    """``"4096"``, ``"0x1000"``, ``"4K"``, ``"4KiB"`` (1024-based) or ``"4KB"`` (1000-based).

    A minus sign is accepted so that the library, not the parser, rejects a
    negative offset with a message naming the file. ``UsageError`` (a
    ``ValueError``) for anything else.
    """
    rest = text.strip()
    sign = -1 if rest[:1] == "-" else 1
    rest = rest[1:] if sign < 0 else rest
    # Written out, not a regular expression: re costs 4 ms at start (loopdev list).
    digits, base = (
        ("0123456789abcdefABCDEF", 16) if rest[:2] in ("0x", "0X") else ("0123456789", 10)
    )
    start = end = 2 if base == 16 else 0
    while end < len(rest) and rest[end] in digits:
        end += 1
    suffix = rest[end:].strip()
    unit = _UNITS.get(suffix.upper()) if suffix.isascii() else None
    if end == start or unit is None:
        raise UsageError(
            f"invalid size {text!r} (bytes, or with a suffix K, M, G, T, KiB, MiB, ...)"
        )
    return sign * int(rest[start:end], base) * unit


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
        import json  # only --json needs it (1 ms at start)

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


# --- parser ------------------------------------------------------------------------------
#
# Each command's options and arguments are one table of Arg records. The parser,
# --help, the usage line of an error and (python -m loopdev._clidoc) the man page,
# the CLI reference and the shell completions are all made from it. Not argparse:
# with the re, enum and gettext it imports it cost 6 ms of every start, more than
# `loopdev list` does.


class Arg(Record):
    """An option (``names``: ``("-o", "--offset")``) or a positional argument (none).

    ``nargs``, for an option: "0" (a flag), "1" (takes a value), "?" (a value only
    after "=", else ``bare``: getopt's optional argument) or "*" (a value,
    repeatable: a list); for an argument: "1", "?", "*" or "..." (everything from
    there on, options too: run's COMMAND). ``convert`` turns the text into the
    value (``ValueError``: a usage error).
    """

    __match_args__ = ("names", "dest", "help", "metavar", "nargs", "convert", "default", "bare")
    names: tuple[str, ...]
    dest: str
    help: str
    metavar: str
    nargs: str
    convert: Callable[[str], object] | None
    default: object
    bare: str | None

    def __init__(
        self,
        names: tuple[str, ...],
        dest: str,
        help: str,
        metavar: str,
        nargs: str,
        convert: Callable[[str], object] | None,
        default: object,
        bare: str | None,
    ) -> None:
        self._values = (names, dest, help, metavar, nargs, convert, default, bare)


def option(
    names: str,
    help: str,
    metavar: str = "",
    convert: Callable[[str], object] | None = None,
    default: object = None,
    *,
    dest: str = "",
    bare: str | None = None,
    many: bool = False,
) -> Arg:
    """An option called ``names`` ("-o --offset"); a flag where it has no ``metavar``."""
    spelled = tuple(names.split())
    nargs = "0" if not metavar else "?" if bare is not None else "*" if many else "1"
    dest = dest or spelled[-1].lstrip("-").replace("-", "_")
    return Arg(
        spelled, dest, help, metavar, nargs, convert, False if nargs == "0" else default, bare
    )


def argument(dest: str, metavar: str, nargs: str = "1") -> Arg:
    """A positional argument."""
    return Arg((), dest, "", metavar, nargs, None, None, None)


class Command(Record):
    """A subcommand: its name, what it does, its options and arguments, its function."""

    __match_args__ = ("name", "help", "args", "func")
    name: str
    help: str
    args: tuple[Arg, ...]
    func: Callable[[Args], int] | None

    def __init__(
        self, name: str, help: str, args: tuple[Arg, ...], func: Callable[[Args], int] | None
    ) -> None:
        self._values = (name, help, args, func)


class _Done(Exception):
    """``--help`` or ``--version``: print the text, exit 0."""


def _names(arg: Arg) -> str:
    return "/".join(arg.names) or arg.metavar


def _long(options: dict[str, Arg], name: str, given: str) -> Arg:
    """The option ``name`` is, or is the unique start of (as getopt_long allows)."""
    found = options.get(name)
    if found is not None:
        return found
    matches = [n for n in options if n[:2] == "--" and n.startswith(name)]
    if len({id(options[n]) for n in matches}) == 1:  # -o and --offset are one
        return options[matches[0]]
    if matches:
        raise UsageError(f"ambiguous option: {name} could match {', '.join(matches)}")
    raise UsageError(f"unrecognized arguments: {given}")


def scan(
    argv: Sequence[str], options: Sequence[Arg], stop: int | None = None
) -> tuple[list[tuple[Arg, str | None]], list[str]]:
    """``argv`` read as GNU getopt_long reads it: options and arguments in any order,
    "--" ends the options, long names by a unique start, ``--name=value``, ``-rP``
    and ``-o4096``. Returns the options given, in order, with their text (None
    for a flag; ``bare`` for an optional value not given), and the arguments.
    After ``stop`` arguments the rest are arguments as they stand (run's COMMAND).
    """
    by_name = {name: o for o in options for name in o.names}
    found: list[tuple[Arg, str | None]] = []
    words: list[str] = []
    i, options_end = 0, False
    while i < len(argv):
        arg = argv[i]
        i += 1
        if options_end or arg == "-" or arg[:1] != "-":
            words.append(arg)
            if stop is not None and len(words) > stop:
                return found, words + list(argv[i:])
        elif arg == "--":
            options_end = True
        elif arg[:2] == "--":
            name, eq, value = arg.partition("=")
            opt = _long(by_name, name, arg)
            if opt.nargs == "0" and eq:
                raise UsageError(f"argument {_names(opt)}: ignored explicit argument {value!r}")
            if opt.nargs == "0" or (opt.nargs == "?" and not eq):
                found.append((opt, opt.bare))
            elif eq:
                found.append((opt, value))
            elif i < len(argv):
                found.append((opt, argv[i]))
                i += 1
            else:
                raise UsageError(f"argument {_names(opt)}: expected one argument")
        else:
            for j in range(1, len(arg)):
                short = by_name.get(f"-{arg[j]}")
                if short is None:
                    raise UsageError(f"unrecognized arguments: {arg}")
                if short.nargs == "0":
                    found.append((short, None))
                    continue
                if j + 1 < len(arg):
                    # -o=4096 as argparse took it (getopt would read "=4096").
                    found.append((short, arg[j + 2 :] if arg[j + 1] == "=" else arg[j + 1 :]))
                elif i < len(argv):
                    found.append((short, argv[i]))
                    i += 1
                else:
                    raise UsageError(f"argument {_names(short)}: expected one argument")
                break
    return found, words


def _convert(arg: Arg, text: str | None) -> object:
    if arg.nargs == "0":
        return True
    if arg.convert is None or text is None:
        return text
    try:
        return arg.convert(text)
    except ValueError as exc:
        reason = str(exc) if isinstance(exc, UsageError) else f"invalid value: {text!r}"
        raise UsageError(f"argument {_names(arg)}: {reason}") from None


def _read(table: Sequence[Arg], argv: Sequence[str], into: Args) -> None:
    """Set ``into``'s attributes from ``argv`` by ``table``. A default does not replace
    a value already there: ``--debug`` before the command stays."""
    positional = [a for a in table if not a.names]
    stop = next((n for n, a in enumerate(positional) if a.nargs == "..."), None)
    found, words = scan(argv, table, stop)
    values = {a.dest: [] if a.nargs in ("*", "...") else a.default for a in table}
    given = {a.dest for a in positional}
    for opt, text in found:
        value = _convert(opt, text)
        current = values[opt.dest]
        if opt.nargs == "*" and isinstance(current, list):
            current.append(value)
        else:
            values[opt.dest] = value
        given.add(opt.dest)
    missing = []
    for arg in positional:
        if arg.nargs in ("*", "..."):
            values[arg.dest], words = words, []
        elif words:
            values[arg.dest] = words.pop(0)
        elif arg.nargs == "1":
            missing.append(arg.metavar)
    for dest, value in values.items():
        if dest in given or not hasattr(into, dest):
            setattr(into, dest, value)
    if values.get("help"):
        return  # --help with whatever else
    if words:
        raise UsageError(f"unrecognized arguments: {' '.join(words)}")
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)}")


def parse(argv: Sequence[str]) -> Args:
    """The command line as ``loopdev`` reads it. ``UsageError`` (its ``command``: whose
    usage to show) where it is refused; for ``losetup``, its arguments in ``words``."""
    args = Args()
    _read(TOP, argv, args)
    if args.help:
        raise _Done(help_text(None))
    if args.version:
        raise _Done(f"{PROG} {_version()}")
    if not args.words:
        raise UsageError("the following arguments are required: COMMAND")
    name = args.words[0]
    command = next((c for c in COMMANDS if c.name == name), None)
    if command is None:
        names = ", ".join(c.name for c in COMMANDS)
        raise UsageError(f"argument COMMAND: invalid choice: {name!r} (choose from {names})")
    args.command = name
    if command.func is None:  # losetup: the drop-in reads its own arguments
        del args.words[0]
        return args
    try:
        _read(command.args, args.words[1:], args)
        if args.help:
            raise _Done(help_text(command))
        _check(command.name, args)
    except UsageError as exc:
        raise UsageError(str(exc), command) from None
    args.func = command.func
    return args


def _check(command: str, args: Args) -> None:
    """What the table cannot say."""
    if command == "detach" and args.all == bool(args.targets):
        raise UsageError("detach needs DEVICE or FILE arguments, or --all (not both)")
    if command == "run" and not args.cmd:
        raise UsageError("run needs a command: loopdev run [OPTIONS] FILE -- COMMAND [ARG...]")


# --- usage and help ----------------------------------------------------------------


def spelled(arg: Arg) -> str:
    """``-o, --offset N``, ``--direct-io[=on|off|auto]``, ``--show``; an argument's metavar."""
    text = ", ".join(arg.names)
    if not arg.names:
        return arg.metavar
    if arg.nargs == "?":
        return f"{text}[={arg.metavar}]"
    return f"{text} {arg.metavar}" if arg.metavar else text


def _usage_part(arg: Arg) -> str:
    if not arg.names:
        forms = {"1": "{}", "?": "[{}]", "*": "[{}...]", "...": "{}"}
        return forms[arg.nargs].format(arg.metavar)
    name = arg.names[0]
    if arg.nargs == "?":
        return f"[{name}[={arg.metavar}]]"
    return f"[{name} {arg.metavar}]" if arg.metavar else f"[{name}]"


def _usage_parts(command: Command | None) -> list[str]:
    if command is None:
        return [PROG, *map(_usage_part, TOP)]
    return [f"{PROG} {command.name}", *map(_usage_part, command.args)]


def usage(command: Command | None) -> str:
    """``loopdev attach [-h] [--debug] ... FILE`` (None: the program's own), one line."""
    return " ".join(_usage_parts(command))


def _usage_lines(command: Command | None) -> str:
    """``usage: ...`` wrapped to 80 columns, continued under the first option."""
    name, *parts = _usage_parts(command)
    head = f"usage: {name}"
    lines = [head]
    for part in parts:
        if len(lines[-1]) + 1 + len(part) > 80 and len(lines[-1]) > len(head):
            lines.append(" " * len(head))
        lines[-1] += f" {part}"
    return "\n".join(lines)


def _wrap(text: str, width: int) -> list[str]:
    lines = [""]
    for word in text.split():
        if lines[-1] and len(lines[-1]) + 1 + len(word) > width:
            lines.append(word)
        else:
            lines[-1] = f"{lines[-1]} {word}" if lines[-1] else word
    return lines


def _rows(rows: Sequence[tuple[str, str]]) -> list[str]:
    """argparse's layout: the names indented 2, their text from column 24 (below
    where the names are longer), wrapped to 80 columns."""
    lines = []
    for left, text in rows:
        wrapped = _wrap(text, 80 - 24)
        if len(left) + 4 > 24:
            lines.append(f"  {left}")
        else:
            lines.append(f"  {left:<20}  {wrapped.pop(0)}")
        lines += [" " * 24 + line for line in wrapped]
    return lines


def help_text(command: Command | None) -> str:
    """``loopdev --help`` (None) or ``loopdev COMMAND --help``."""
    about = DESCRIPTION if command is None else command.help
    table = TOP if command is None else command.args
    lines = [_usage_lines(command), "", *_wrap(about, 80), ""]
    if command is None:
        lines += ["commands:", *_rows([(c.name, c.help) for c in COMMANDS]), ""]
    lines += ["options:", *_rows([(spelled(a), a.help) for a in table if a.names])]
    return "\n".join(lines)


def _version() -> str:
    from loopdev import __version__

    return __version__


# --- serve -------------------------------------------------------------------------


def _positive(text: str, kind: Callable[[str], _N]) -> _N:
    """``text`` read as ``kind`` (int or float), greater than 0 (not NaN)."""
    try:
        value = kind(text)
    except ValueError:
        value = kind("0")
    if not value > 0:  # NaN too
        raise UsageError(f"invalid value {text!r} (a positive number)")
    return value


def _count(text: str) -> int:
    return _positive(text, int)


def _seconds(text: str) -> float:
    return _positive(text, float)


def _id(text: str, lookup: Callable[[str], int], what: str) -> int:
    """A number as it is, or a name that ``lookup`` finds (``KeyError`` where not)."""
    try:
        return int(text) if text.isdigit() else lookup(text)
    except KeyError:
        raise UsageError(f"no such {what}: {text}") from None


def _user_id(text: str) -> int:
    import pwd

    return _id(text, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _group_id(text: str) -> int:
    import grp

    return _id(text, lambda name: grp.getgrnam(name).gr_gid, "group")


def cmd_serve(args: Args) -> int:
    """``serve`` runs the broker, a layer above the CLI (which does not import it):
    the program (``loopdev``, ``python -m loopdev``) hands it to :func:`main`."""
    raise LoopError(
        errno.ENOTSUP,
        "serve runs the broker: start it as `loopdev serve` or `python -m loopdev serve`",
    )


def _direct_io(text: str) -> str:
    if text not in _DIRECT_IO:
        raise UsageError(f"invalid choice: {text!r} (choose from on, off, auto)")
    return text


# --- the commands ------------------------------------------------------------------

DESCRIPTION = "Set up and control loop devices (a losetup work-alike)."

_HELP = option("-h --help", "show this help and exit")
_DEBUG = option("--debug", "show the traceback on errors")
TOP = (
    _HELP,
    _DEBUG,
    option("--version", "show the version and exit"),
    argument("words", "COMMAND [ARG...]", "..."),
)
# How the device is set up: attach and run.
_SETUP = (
    option("-o --offset", "start N bytes into the file", "N", parse_size, 0),
    option(
        "--sizelimit", "use at most N bytes of the file (a multiple of 512)", "N", parse_size, 0
    ),
    option("-r --read-only", "set up a read-only device"),
    option("-P --partscan", "register partitions"),
    option(
        "--direct-io",
        "direct I/O on the backing file: on, off or auto (where the file allows it); "
        "default off, as in losetup; alone means on, so give a value as --direct-io=VALUE",
        "on|off|auto",
        _direct_io,
        "off",
        bare="on",
    ),
    option("-b --sector-size", "logical sector size: 512, 1024, 2048 or 4096", "N", parse_size),
)
_FILE = argument("file", "FILE")
COMMANDS = (
    Command(
        "attach",
        "attach FILE to a free loop device (losetup -f FILE)",
        (
            _HELP,
            _DEBUG,
            *_SETUP,
            option("--show", "print the device path"),
            option(
                "-L --nooverlap",
                "reuse a device of FILE with the same offset and size limit; fail if one overlaps",
            ),
            _FILE,
        ),
        cmd_attach,
    ),
    Command(
        "run",
        "attach FILE, run COMMAND with LOOPDEV (the device) and LOOPDEV_PARTITIONS "
        "(its partitions) in its environment, then detach; exits with COMMAND's status",
        (_HELP, _DEBUG, *_SETUP, _FILE, argument("cmd", "-- COMMAND [ARG...]", "...")),
        cmd_run,
    ),
    Command(
        "detach",
        "detach devices, or every device of a backing FILE (losetup -d)",
        (
            _HELP,
            _DEBUG,
            option("-a --all", "detach every bound loop device (losetup -D)"),
            option(
                "--wait",
                "wait (10 s, or SECONDS) until the kernel released each device; without "
                "it, return at once like losetup -d (the kernel releases a device still "
                "held open when its last user closes it)",
                "SECONDS",
                float,
                0.0,
                bare="10",
            ),
            argument("targets", "DEVICE|FILE", "*"),
        ),
        cmd_detach,
    ),
    Command(
        "list",
        "show bound devices (losetup -l)",
        (
            _HELP,
            _DEBUG,
            option("-J --json", "as losetup -J -l"),
            option(
                "--broker",
                "only the devices that the broker at socket PATH holds for this user",
                "PATH",
            ),
            argument("only", "DEVICE", "?"),
        ),
        cmd_list,
    ),
    Command(
        "find",
        "print the devices backed by FILE, one path a line (losetup -j)",
        (
            _HELP,
            _DEBUG,
            option(
                "-o --offset",
                "only devices starting N bytes into the file",
                "N",
                parse_size,
                dest="at_offset",
            ),
            _FILE,
        ),
        cmd_find,
    ),
    Command(
        "resize",
        "re-read the backing file's size (losetup -c)",
        (_HELP, _DEBUG, argument("device", "DEVICE")),
        cmd_resize,
    ),
    Command(
        "serve",
        "serve loop devices to other users (root)",
        (
            _HELP,
            _DEBUG,
            option(
                "--socket",
                "listen on PATH (default /run/loopdev/broker.sock; a socket passed by "
                "systemd socket activation comes first)",
                "PATH",
            ),
            option(
                "--allow-user",
                "let this user attach devices (repeatable; root always may)",
                "USER|UID",
                _user_id,
                many=True,
            ),
            option(
                "--allow-group",
                "let members of this group attach devices (repeatable)",
                "GROUP|GID",
                _group_id,
                many=True,
            ),
            option(
                "--max-per-client",
                "devices one user may hold at once (default 16)",
                "N",
                _count,
                16,
            ),
            option(
                "--max-devices",
                "devices the broker holds at once in total (default 256)",
                "N",
                _count,
                256,
            ),
            option(
                "--allow-block-devices",
                "accept block devices as backing files, not only regular files",
            ),
            option(
                "--node-dir",
                "where the private directory for handing over nodes is made; its file "
                "system must allow devices (not nodev) (default /dev)",
                "DIR",
                default="/dev",
            ),
            option(
                "--timeout",
                "a request must arrive within SECONDS once started; a connection holding "
                "no device is closed after SECONDS idle (default 10)",
                "SECONDS",
                _seconds,
                10.0,
            ),
        ),
        cmd_serve,
    ),
    Command(
        "losetup",
        "util-linux losetup's syntax and output (also run as `losetup`)",
        (argument("words", "ARGS...", "..."),),
        None,
    ),
)


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
    try:
        args = parse(given)
    except _Done as done:
        _out(str(done))
        return 0
    except UsageError as exc:
        prog = PROG if exc.command is None else f"{PROG} {exc.command.name}"
        sys.stderr.write(f"{_usage_lines(exc.command)}\n{prog}: error: {exc}\n")
        return 2
    if args.command == "losetup":
        from loopdev import losetup

        return losetup.main(args.words, prog=f"{PROG} losetup")
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
