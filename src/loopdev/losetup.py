"""``losetup`` drop-in: util-linux 2.38's syntax, stdout and exit codes on loopdev.

Run as ``loopdev losetup ARGS...``, or as ``losetup`` itself (a symlink to
``loopdev`` named ``losetup``, busybox style): put that first in ``PATH``
inside a container, where util-linux's losetup fails on a static ``/dev``.
Underneath it is loopdev: nodes for the device and its partitions where no
devtmpfs makes them, partitions registered where the kernel has no parser,
no race with other allocators.

This module maps arguments and formats output; the work is the library's.
Differences from util-linux: ``-V`` names loopdev; messages on stderr carry
loopdev's reasons; ``--direct-io=on`` falls back to buffered I/O where the
file cannot do direct I/O (as losetup does, silently); encryption, ``-v`` and
changing an existing device (``--direct-io``/``-b`` without a file) are not
supported (the last two are accepted and ignored / refused).
"""

from __future__ import annotations

import errno
import os
import sys

from loopdev import __version__
from loopdev.cli import UsageError, option, scan, spelled
from loopdev.errors import LoopError

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["COLUMNS", "OPTIONS", "main"]

# losetup's columns in --output-all's order: name, JSON type, help (as --help
# lists them). Numbers and flags are right-aligned, text left-aligned.
_COLUMN_TABLE = """
NAME          str   loop device name
AUTOCLEAR     bool  autoclear flag set
BACK-FILE     str   device backing file
BACK-INO      num   backing file inode number
BACK-MAJ:MIN  str   backing file major:minor device number
MAJ:MIN       str   loop device major:minor number
OFFSET        num   offset from the beginning
PARTSCAN      bool  partscan flag set
RO            bool  read-only device
SIZELIMIT     num   size limit of the file in bytes
DIO           bool  access backing file with direct-io
LOG-SEC       num   logical sector size in bytes
"""
# Column -> (right-aligned, JSON type, help).
COLUMNS: dict[str, tuple[bool, str, str]] = {
    name: (kind != "str", kind, text)
    for name, kind, text in (line.split(None, 2) for line in _COLUMN_TABLE.strip().splitlines())
}
DEFAULT_COLUMNS = ("NAME", "SIZELIMIT", "OFFSET", "AUTOCLEAR", "RO", "BACK-FILE", "DIO", "LOG-SEC")

# util-linux 2.38's options, grouped as its --help groups them: the parser and
# --help (and loopdev(8), the completions: loopdev._clidoc) are made from this.
_GROUPS = (
    (
        option("-a --all", "list all used devices"),
        option("-d --detach", "detach one or more devices", "<loopdev>..."),
        option("-D --detach-all", "detach all used devices"),
        option("-f --find", "find first unused device"),
        option("-c --set-capacity", "resize the device", "<loopdev>"),
        option("-j --associated", "list all devices associated with <file>", "<file>"),
        option("-L --nooverlap", "avoid possible conflict between devices"),
    ),
    (
        option("-o --offset", "start at offset <num> into file", "<num>"),
        option("--sizelimit", "device is limited to <num> bytes of the file", "<num>"),
        option("-b --sector-size", "set the logical sector size to <num>", "<num>"),
        option("-P --partscan", "create a partitioned loop device"),
        option("-r --read-only", "set up a read-only loop device"),
        option("--direct-io", "open backing file with O_DIRECT", "<on|off>", bare="on"),
        option("--show", "print device name after setup (with -f)"),
        option("-v --verbose", "verbose mode"),
    ),
    (
        option("-J --json", "use JSON --list output format"),
        option("-l --list", "list info about all or specified (default)"),
        option("-n --noheadings", "don't print headings for --list output"),
        option("-O --output", "specify columns to output for --list", "<cols>"),
        option("--output-all", "output all columns"),
        option("--raw", "use raw --list output format"),
    ),
    (
        option("-h --help", "display this help"),
        option("-V --version", "display version"),
    ),
)
OPTIONS = tuple(o for group in _GROUPS for o in group)
# util-linux's mutually exclusive groups (err_exclusive_options), by first name.
_EXCLUSIVE = (
    {"-D", "-a", "-c", "-d", "-f", "-j"},
    {"-D", "-c", "-d", "-f", "-l"},
    {"-D", "-c", "-d", "-f", "-O"},
    {"-J", "--raw"},
    {"-O", "--output-all"},
)
_LONG_OF = {o.names[0]: o.names[-1] for o in OPTIONS}

Cell = str | None
Row = dict[str, Cell]


class _Usage(Exception):
    """A usage error: message, exit status 1 (as util-linux)."""


class Options:
    """The parsed command line."""

    def __init__(self) -> None:
        self.action = ""  # create, delete, delete-all, show, show-one, find-free, capacity
        self.devices: list[str] = []
        self.file: str | None = None
        self.offset: int | None = None
        self.sizelimit = 0
        self.block_size: int | None = None
        self.read_only = False
        self.partscan = False
        self.direct_io = False
        self.show = False
        self.nooverlap = False
        self.setup_only: list[str] = []  # setup options given (for the context check)
        self.list = False
        self.json = False
        self.raw = False
        self.noheadings = False
        self.columns: list[str] = []


def _size(text: str, what: str) -> int:
    from loopdev.cli import parse_size

    try:
        value = parse_size(text)
    except ValueError:
        value = -1
    if value < 0:
        raise _Usage(f"failed to parse {what}: '{text}': Invalid argument")
    return value


def _columns(text: str) -> list[str]:
    found = []
    for name in text.split(","):
        col = name.upper()
        if col not in COLUMNS:
            raise _Usage(f"unknown column: {name}")
        found.append(col)
    return found


def parse(argv: Sequence[str]) -> Options:
    """The command line as util-linux 2.38's losetup reads it."""
    try:
        pairs, rest = scan(argv, OPTIONS)
    except UsageError as exc:
        raise _Usage(f"{exc}\nTry 'losetup --help' for more information.") from None
    o = Options()
    seen: set[str] = set()
    for opt, text in pairs:
        key = opt.names[0]
        value = text or ""  # None for flags, which do not read it
        for group in _EXCLUSIVE:
            if key in group and seen & group - {key}:
                names = sorted(_LONG_OF.get(k, k) for k in group)
                raise _Usage("mutually exclusive arguments: " + " ".join(names))
        seen.add(key)
        if key == "-a":
            o.action = "show"
        elif key == "-c":
            o.action = "capacity"
            o.devices = [value]
        elif key == "-d":
            o.action = "delete"
            o.devices = [value]
        elif key == "-D":
            o.action = "delete-all"
        elif key == "-f":
            o.action = "find-free"
        elif key == "-h":
            raise _Help
        elif key == "-j":
            o.action = "show"
            o.file = value
        elif key == "-J":
            o.json = o.list = True
        elif key == "-l":
            o.list = True
        elif key == "-L":
            o.nooverlap = True
        elif key == "-n":
            o.noheadings = True
        elif key == "-o":
            o.offset = _size(value, "offset")
        elif key == "-O":
            o.columns = _columns(value)
            o.list = True
        elif key == "--output-all":
            o.columns = list(COLUMNS)
            o.list = True
        elif key == "--raw":
            o.raw = True
        elif key == "-V":
            raise _Version
        elif key == "--sizelimit":
            o.sizelimit = _size(value, "size")
            o.setup_only.append(key)
        elif key == "-b":
            o.block_size = _size(value, "sector size")
            o.setup_only.append(key)
        elif key == "-P":
            o.partscan = True
            o.setup_only.append(key)
        elif key == "-r":
            o.read_only = True
            o.setup_only.append(key)
        elif key == "--show":
            o.show = True
            o.setup_only.append(key)
        elif key == "--direct-io":
            if value not in ("on", "off"):
                raise _Usage(f"unsupported --direct-io argument: '{value}'")
            o.direct_io = value == "on"
            o.setup_only.append(key)
        # -v: nothing to say beyond what is said anyway.
    _positional(o, rest, not argv)
    return o


def _positional(o: Options, rest: list[str], no_args: bool) -> None:
    """What the arguments left after the options mean (losetup's main())."""
    if no_args:  # plain `losetup`: --list --all
        o.action, o.list = "show", True
    if o.list and not o.columns:
        o.columns = list(DEFAULT_COLUMNS)
    if o.action == "find-free" and rest:
        o.action, o.file = "create", rest.pop(0)
    if o.action == "delete":
        o.devices += rest
        rest = []
    if o.list and not o.action and not rest:
        o.action = "show"
    if not o.action and len(rest) == 1:
        o.action, o.devices = "show-one", [rest.pop(0)]
    if not o.action:
        o.action = "create"
        if not rest:
            raise _Usage("no loop device specified")
        o.devices = [rest.pop(0)]
        if not rest:
            raise _Usage("no file specified")
        o.file = rest.pop(0)
    if rest:
        raise _Usage("unexpected arguments")
    if o.action != "create" and o.setup_only:
        raise _Usage(
            "the options --{sizelimit,partscan,read-only,show,direct-io,sector-size} "
            "are allowed during loop device setup only"
        )
    if o.offset is not None and o.action != "create" and (o.action != "show" or not o.file):
        raise _Usage("the option --offset is not allowed in this context")


class _Help(Exception):
    pass


class _Version(Exception):
    pass


# --- output ----------------------------------------------------------------------


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def _read_int(path: str) -> int | None:
    try:
        with open(path, "rb") as f:
            return int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return None


def _loop_names() -> list[str]:
    """Loop devices in /sys/block's own order, which is losetup's listing order."""
    from loopdev import sysfs

    return [n for n in os.listdir(sysfs.SYS_BLOCK) if n[:4] == "loop" and n[4:].isdigit()]


def _backing_devt(name: str) -> tuple[int, int] | None:
    """``(lo_device, lo_inode)`` from LOOP_GET_STATUS64, as losetup asks; None if unbound."""
    from loopdev import _native
    from loopdev.device import open_device

    try:
        dev = open_device(name)
    except OSError:
        return None
    try:
        info = _native.get_status(dev.fd, device=dev.path)
    except OSError:
        return None
    finally:
        dev.close()
    return info.lo_device, info.lo_inode


def row(name: str, columns: Sequence[str]) -> Row:
    """One device's cells (None: empty), as losetup's table has them."""
    from loopdev import sysfs
    from loopdev.device import device_info

    info = device_info(name)
    cells: Row = dict.fromkeys(columns)
    cells["NAME"] = f"/dev/{name}"
    ro = info.read_only if info else bool(_read_int(f"{sysfs.SYS_BLOCK}/{name}/ro"))
    for col, flag in (
        ("AUTOCLEAR", info and info.autoclear),
        ("PARTSCAN", info and info.partscan),
        ("RO", ro),
        ("DIO", info and info.direct_io),
    ):
        cells[col] = "1" if flag else "0"
    sector = (
        info.block_size if info else _read_int(f"{sysfs.SYS_BLOCK}/{name}/queue/logical_block_size")
    )
    cells["LOG-SEC"] = None if sector is None else str(sector)
    devt = sysfs.devt(name)
    if devt is not None:
        cells["MAJ:MIN"] = f"{devt[0]:3d}:{devt[1]:<3d}"
    if info is not None:
        cells["BACK-FILE"] = info.backing_file
        cells["OFFSET"] = str(info.offset)
        cells["SIZELIMIT"] = str(info.sizelimit)
        if "BACK-INO" in columns or "BACK-MAJ:MIN" in columns:
            got = _backing_devt(name)
            if got is not None and got[1]:
                cells["BACK-INO"] = str(got[1])
            if got is not None and got[0]:
                major, minor = os.major(got[0]), os.minor(got[0])
                cells["BACK-MAJ:MIN"] = f"{major:8d}:{minor:<3d}"
    return {c: cells[c] for c in columns}


def _raw_cell(text: str) -> str:
    """libsmartcols' raw format: spaces, backslashes and unprintables as \\xNN."""
    out = []
    for char in text:
        if 0xDC80 <= ord(char) <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif ord(char) < 0x80 and (not char.isprintable() or char in " \\"):
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "".join(out)


def format_table(rows: Sequence[Row], columns: Sequence[str], *, raw: bool, headings: bool) -> str:
    """``losetup -l`` (and ``--raw``, ``-n``): nothing at all without rows."""
    from loopdev.cli import _printable

    if not rows:
        return ""
    cell = _raw_cell if raw else _printable
    lines = [list(columns)]
    for r in rows:
        lines.append([cell(v) if v is not None else "" for v in r.values()])
    # The headings count for the widths even where -n leaves them out.
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    if not headings:
        del lines[0]
    if raw:
        return "\n".join(" ".join(line) for line in lines)
    text = []
    for line in lines:
        cells = []
        for i, (value, width) in enumerate(zip(line, widths, strict=True)):
            if COLUMNS[columns[i]][0]:
                cells.append(value.rjust(width))
            elif i == len(columns) - 1:
                cells.append(value)  # the last column is not padded
            else:
                cells.append(value.ljust(width))
        text.append(" ".join(cells))
    return "\n".join(text)


def format_json(rows: Sequence[Row], columns: Sequence[str]) -> str:
    """``losetup -J -l``: libsmartcols' layout (3-space indent) and value types."""
    if not rows:
        return '{\n   "loopdevices": [\n\n   ]\n}'
    objects = []
    for r in rows:
        obj: dict[str, str | int | bool | None] = {}
        for col, value in r.items():
            kind = COLUMNS[col][1]
            if value is None:
                obj[col.lower()] = None
            elif kind == "num":
                obj[col.lower()] = int(value)
            elif kind == "bool":
                obj[col.lower()] = value == "1"
            else:
                obj[col.lower()] = os.fsencode(value).decode("utf-8", "backslashreplace")
        objects.append(obj)
    import json  # only -J needs it

    document = {"loopdevices": objects}
    text = json.dumps(document, indent=3, ensure_ascii=False)
    # libsmartcols closes one object and opens the next on the same line.
    return text.replace("\n      },\n      {\n", "\n      },{\n")


def _old_format(name: str) -> str | None:
    """``losetup -a``'s line for ``name``; None once it is unbound."""
    from loopdev.device import device_info

    info = device_info(name)
    got = _backing_devt(name)
    if info is None or got is None:
        return None
    dev, ino = got
    line = f"/dev/{name}: [{dev:04d}]:{ino} ({info.backing_file})"
    if info.offset:
        line += f", offset {info.offset}"
    if info.sizelimit:
        line += f", sizelimit {info.sizelimit}"
    return line


# --- actions -----------------------------------------------------------------------


def _loop_name(arg: str) -> str:
    """``loopN`` for a loop device argument, else LoopError ("failed to use device")."""
    from loopdev import sysfs
    from loopdev.cli import _loop_name as name_of

    name = name_of(arg) or name_of(f"/dev/{arg}")
    if name is None or sysfs.devt(name) is None:
        raise LoopError(errno.ENODEV, "failed to use device", device=arg)
    return name


def _matching(file: str | None, offset: int | None) -> list[str]:
    """Bound devices (of ``file`` at ``offset`` if given) in listing order."""
    from loopdev.device import device_info, find

    if file is None:
        return [n for n in _loop_names() if device_info(n) is not None]
    try:
        found = {i.name for i in find(file, offset)}
    except OSError:
        return []  # losetup -j of a missing file: nothing, status 0
    return [n for n in _loop_names() if n in found]


def _show(o: Options, names: Sequence[str]) -> int:
    if o.list:
        rows = [row(n, o.columns) for n in names]
        if o.json:
            _out(format_json(rows, o.columns))
        else:
            text = format_table(rows, o.columns, raw=o.raw, headings=not o.noheadings)
            if text:
                _out(text)
        return 0
    status = 0
    for name in names:
        line = _old_format(name)
        if line is not None:
            _out(line)
        elif o.action == "show-one":
            raise LoopError(errno.ENXIO, "device is not bound", device=f"/dev/{name}")
    return status


def _find_free() -> str:
    from loopdev.compat import LoopControl

    control = LoopControl()
    try:
        return f"/dev/loop{control.get_unbound()}"
    finally:
        control.close()


def _attach_to(name: str, o: Options, file: str | int, read_only: bool) -> None:
    """``losetup LOOPDEV FILE``: bind that device (made first if missing), as the engine does.

    ``file``: a path, or an fd open read-write (closed by the caller)."""
    from loopdev import _engine, _native, device, sysfs
    from loopdev.compat import LoopControl

    minor = int(name[4:])
    if sysfs.devt(name) is None:
        control = LoopControl()
        try:
            control.add(minor)
        finally:
            control.close()
    offset = o.offset or 0
    device._validate(offset, o.sizelimit, o.block_size, o.direct_io, o.file)
    fd, path, opened = device._open_backing(file, read_only)
    try:
        device._check_backing(fd, path, offset, read_only, opened)
        config = _native.Config(
            offset,
            o.sizelimit,
            o.block_size or 0,
            _engine.flags(read_only, False, o.partscan),
            _native.DIRECT_IO_TRY if o.direct_io else _native.DIRECT_IO_OFF,
            file_name=path,
        )
        dev = device.open_device(minor)
        try:
            _engine.configure(dev.fd, minor, fd, config)
        finally:
            dev.close()
    finally:
        if opened:
            os.close(fd)


def _create(o: Options, warn: Callable[[str], None]) -> int:
    from loopdev.cli import _open_writable, _overlapping, _warn_if_tiny

    assert o.file is not None
    file = o.file
    offset = o.offset or 0
    if o.nooverlap and not o.devices:
        reuse = _overlapping(file, offset, o.sizelimit, o.read_only)
        if reuse is not None:
            if o.show:
                _out(reuse.path)
            return 0
    # As losetup: read-write where the open succeeds (root, also for a mode-0444
    # file), read-only with a warning where it is refused.
    fd, read_only = (None, True) if o.read_only else _open_writable(file)
    if read_only and not o.read_only:
        warn(f"{file}: Warning: file is write-protected, attaching read-only")
    try:
        path = _bind(o, file if fd is None else fd, read_only)
    finally:
        if fd is not None:
            os.close(fd)
    if o.show:
        _out(path)
    _warn_if_tiny(file, offset)
    return 0


def _bind(o: Options, backing: str | int, read_only: bool) -> str:
    """The device ``o`` asks for bound to ``backing``; its path."""
    from loopdev.device import attach

    if o.devices:
        name = _loop_name(o.devices[0]) if os.path.basename(o.devices[0])[:4] == "loop" else None
        if name is None:
            raise LoopError(errno.EINVAL, "not a loop device", device=o.devices[0])
        _attach_to(name, o, backing, read_only)
        return f"/dev/{name}"
    dev = attach(
        backing,
        offset=o.offset or 0,
        sizelimit=o.sizelimit,
        read_only=read_only,
        partscan=o.partscan,
        direct_io="auto" if o.direct_io else False,
        block_size=o.block_size,
        autoclear=False,  # the device outlives us, as losetup's does
        lock=True,
    )
    path = dev.path
    dev.close()
    return path


def _delete(names: Sequence[str], args: Sequence[str], warn: Callable[[str], None]) -> int:
    from loopdev.cli import _message
    from loopdev.device import open_device

    failed = 0
    for name, arg in zip(names, args, strict=True):
        try:
            dev = open_device(name, owned=True)
            try:
                dev.detach(timeout=0)
            finally:
                dev.close()
        except OSError as exc:
            reason = "No such device or address" if exc.errno == errno.ENXIO else _message(exc)
            warn(f"{arg}: detach failed: {reason}")
            failed = 1
    return failed


def run(o: Options, warn: Callable[[str], None]) -> int:
    """Carry out ``o``; returns the exit status."""
    if o.action == "create":
        return _create(o, warn)
    if o.action == "find-free":
        _out(_find_free())
        return 0
    if o.action == "delete":
        names = []
        for arg in o.devices:
            names.append(_loop_name(arg))  # losetup checks them all first
        return _delete(names, o.devices, warn)
    if o.action == "delete-all":
        names = _matching(None, None)
        return _delete(names, [f"/dev/{n}" for n in names], warn)
    if o.action == "capacity":
        from loopdev.device import open_device

        name = _loop_name(o.devices[0])
        with open_device(name) as dev:
            try:
                dev.resize()
            except OSError as exc:
                warn(f"{dev.path}: set capacity failed: {os.strerror(exc.errno or errno.EIO)}")
                return 1
        return 0
    if o.action == "show-one":
        return _show(o, [_loop_name(o.devices[0])])
    return _show(o, _matching(o.file, o.offset))


# --- help, version, entry ----------------------------------------------------------


def help_text(prog: str) -> str:
    """``losetup --help``: the same options and columns as util-linux's."""
    lines = [
        "",
        "Usage:",
        f" {prog} [options] [<loopdev>]",
        f" {prog} [options] -f | <loopdev> <file>",
        "",
        "Set up and control loop devices (loopdev's losetup drop-in).",
        "",
        "Options:",
    ]
    for group in _GROUPS:
        for opt in group:
            indent = "    " if opt.names[0][:2] == "--" else ""
            lines.append(f" {indent + spelled(opt):<29} {opt.help}")
        lines.append("")
    lines += ["Available output columns:"]
    lines += [f" {col:>12}  {info[2]}" for col, info in COLUMNS.items()]
    lines += ["", "For more details see loopdev(8)."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, prog: str = "losetup") -> int:
    """Run ``losetup ARGS``; returns the exit status (0 or 1, as util-linux)."""
    from loopdev.cli import _message

    def warn(message: str) -> None:
        sys.stderr.write(f"{prog}: {message}\n")

    args = list(sys.argv[1:] if argv is None else argv)
    o = Options()
    try:
        o = parse(args)
        status = run(o, warn)
        sys.stdout.flush()
        return status
    except _Help:
        _out(help_text(prog))
        return 0
    except _Version:
        _out(f"{prog} from loopdev {__version__} (util-linux 2.38 compatible)")
        return 0
    except _Usage as exc:
        warn(str(exc))
        return 1
    except BrokenPipeError:
        from loopdev.cli import _output_cut

        return _output_cut()
    except OSError as exc:
        what = f"{o.file}: failed to set up loop device: " if o.action == "create" else ""
        warn(f"{what}{_message(exc)}")
        return 1
