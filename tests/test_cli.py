"""The ``loopdev`` command line, run as ``python -m loopdev`` on real devices.

Every test works only on files below its own ``tmp_path`` and only ever
detaches devices bound to those files: other processes on this machine use
loop devices too. ``losetup`` is the reference for what the output must say.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import bound_under
from helpers import run_cli as run

from loopdev import cli

needs_losetup = pytest.mark.skipif(shutil.which("losetup") is None, reason="losetup missing")

# A loop device nobody has: tests must not name a device they released, which
# another process may have taken since.
NO_SUCH_DEVICE = "/dev/loop999999"

KEYS = ["name", "sizelimit", "offset", "autoclear", "ro", "back-file", "dio", "log-sec"]


def ok(*args: str) -> str:
    """Run the CLI, expect success, return stdout."""
    res = run(*args)
    assert res.returncode == 0, (args, res.returncode, res.stderr)
    return res.stdout


def mine(tmp_path: Path) -> list[str]:
    """Loop devices bound to a file below ``tmp_path`` (and nowhere else)."""
    return sorted(f"/dev/{name}" for name in bound_under(tmp_path))


def make_file(path: Path, size: int = 16 << 20) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def losetup_json(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """``losetup -J -l`` entries of our devices, by name."""
    raw = subprocess.run(["losetup", "-J", "-l"], capture_output=True, check=True).stdout
    # Other processes' backing paths need not be UTF-8; losetup passes them raw.
    out = raw.decode("utf-8", "surrogateescape")
    return _ours(json.loads(out) if out.strip() else {"loopdevices": []}, tmp_path)


def loopdev_json(tmp_path: Path, *extra: str) -> dict[str, dict[str, Any]]:
    return _ours(json.loads(ok("list", "--json", *extra)), tmp_path)


def _ours(doc: dict[str, Any], tmp_path: Path) -> dict[str, dict[str, Any]]:
    assert list(doc) == ["loopdevices"]
    prefix = f"{tmp_path}/"
    return {
        d["name"]: d
        for d in doc["loopdevices"]
        if isinstance(d.get("back-file"), str) and d["back-file"].startswith(prefix)
    }


def losetup_attach(*args: str) -> str:
    return subprocess.run(
        ["losetup", "-f", "--show", *args], capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture
def work(tmp_path: Path, devices: None) -> Iterator[Path]:
    """``tmp_path``; afterwards every device bound below it is detached, pass or fail."""
    yield tmp_path
    for dev in mine(tmp_path):
        if shutil.which("losetup"):
            subprocess.run(["losetup", "-d", dev], check=False)
        else:
            from loopdev.device import open_device

            open_device(dev, owned=True).detach()
    # losetup -d returns before the unbind when another process has the device
    # open for a moment (anything scanning devices does): wait for it.
    deadline = time.monotonic() + 10
    while mine(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.01)


# --- without devices ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("4K", 4096),
        ("4k", 4096),
        ("4KiB", 4096),
        ("1M", 1 << 20),
        ("1MiB", 1 << 20),
        ("2G", 2 << 30),
        ("1GiB", 1 << 30),
        ("1T", 1 << 40),
        ("2KB", 2000),
        ("0x200", 512),
        ("-1", -1),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert cli.parse_size(text) == value


def test_table_escapes_like_losetup() -> None:
    # Undecodable bytes and control characters as \xNN: one line per device.
    assert cli._printable(os.fsdecode(b"/a b\nc\xff\xc3\xa9")) == "/a b\\x0ac\\xff\u00e9"


@pytest.mark.parametrize("text", ["", "x", "1Q", "1.5M", "K", "--1", "1 2"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        cli.parse_size(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["attach", "--bogus", "x.img"],
        ["--bogus", "list"],
        ["frobnicate"],
        [],
        ["attach"],
        ["attach", "--offset", "lots", "x.img"],
        ["attach", "--direct-io=maybe", "x.img"],
        ["detach"],
        ["detach", "--all", "x.img"],  # parsing refuses it before anything runs
        ["resize"],
    ],
)
def test_usage_errors_exit_2(argv: list[str]) -> None:
    res = run(*argv)
    assert res.returncode == 2, res
    assert "usage:" in res.stderr
    assert res.stdout == ""


def test_detach_all_parses() -> None:
    # Parsing only: detach --all on this machine would take other processes' devices.
    for flag in ("--all", "-a"):
        args = cli.parse(["detach", flag])
        assert args.all is True and args.targets == [] and args.func is cli.cmd_detach


def test_debug_before_or_after_command() -> None:
    assert cli.parse(["--debug", "list"]).debug is True
    assert cli.parse(["list", "--debug"]).debug is True
    assert cli.parse(["list"]).debug is False


def test_attach_options_parse() -> None:
    args = cli.parse(
        [
            "attach",
            "-o",
            "1MiB",
            "--sizelimit=2M",
            "-r",
            "-P",
            "--direct-io",
            "-b",
            "4K",
            "--show",
            "-L",
            "f.img",
        ]
    )
    assert (args.offset, args.sizelimit, args.sector_size) == (1 << 20, 2 << 20, 4096)
    assert args.read_only and args.partscan and args.show and args.nooverlap
    assert args.direct_io == "on"  # alone means on, as in losetup
    assert cli.parse(["attach", "f.img"]).direct_io == "off"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # getopt_long's ways: a unique start of a long name, clusters, attached values.
        (["attach", "--sizel=1K", "--read", "f.img"], {"sizelimit": 1024, "read_only": True}),
        (["attach", "-rPo4096", "f.img"], {"read_only": True, "partscan": True, "offset": 4096}),
        (["attach", "-o=1K", "f.img"], {"offset": 1024}),
        (["attach", "-o", "-1", "f.img"], {"offset": -1}),  # the library refuses it
        (["attach", "f.img", "--show"], {"show": True, "file": "f.img"}),
        (["attach", "--", "-x.img"], {"file": "-x.img"}),
        # An optional value only after "=": the next word is an argument.
        (["attach", "--direct-io", "f.img"], {"direct_io": "on", "file": "f.img"}),
        (["attach", "--direct-io=auto", "f.img"], {"direct_io": "auto"}),
        (["detach", "--wait", "/dev/loop3"], {"wait": 10.0, "targets": ["/dev/loop3"]}),
        (["detach", "--wait=2.5", "a", "b"], {"wait": 2.5, "targets": ["a", "b"]}),
        (["detach", "x"], {"wait": 0.0, "all": False}),
        (["list"], {"json": False, "only": None, "broker": None}),
        (["list", "-J", "loop3"], {"json": True, "only": "loop3"}),
        (["find", "-o", "1M", "f.img"], {"at_offset": 1 << 20, "file": "f.img"}),
        (["find", "f.img"], {"at_offset": None}),
        # run: options before FILE or after it, COMMAND's own after "--" or after FILE.
        (["run", "f.img", "-r", "--", "sh", "-r"], {"read_only": True, "cmd": ["sh", "-r"]}),
        (["run", "-P", "f.img", "sh", "-c", "--", "x"], {"cmd": ["sh", "-c", "--", "x"]}),
        (["run", "--", "f.img", "true"], {"file": "f.img", "cmd": ["true"]}),
        (
            ["serve", "--allow-user", "0", "--allow-user=root", "--max-devices", "9"],
            {"allow_user": [0, 0], "allow_group": [], "max_devices": 9, "timeout": 10.0},
        ),
        (["losetup", "--debug", "-a"], {"words": ["--debug", "-a"]}),
    ],
)
def test_parse(argv: list[str], expected: dict[str, object]) -> None:
    args = cli.parse(argv)
    assert args.command == argv[0]
    assert {key: getattr(args, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("argv", "command", "message"),
    [
        (["attach", "--bogus", "x.img"], "attach", "unrecognized arguments: --bogus"),
        (["attach", "x.img", "y.img"], "attach", "unrecognized arguments: y.img"),
        (["attach", "--s", "x.img"], "attach", "ambiguous option: --s could match"),
        (["attach", "x.img", "-o"], "attach", "argument -o/--offset: expected one argument"),
        (["attach", "--show=yes", "x.img"], "attach", "ignored explicit argument 'yes'"),
        (["attach"], "attach", "the following arguments are required: FILE"),
        (["run", "x.img"], "run", "run needs a command"),
        (["detach", "--wait=soon", "x"], "detach", "argument --wait: invalid value: 'soon'"),
        (["--bogus", "list"], None, "unrecognized arguments: --bogus"),
        (["frobnicate"], None, "invalid choice: 'frobnicate'"),
        ([], None, "the following arguments are required: COMMAND"),
    ],
)
def test_usage_error_names_the_command(argv: list[str], command: str | None, message: str) -> None:
    with pytest.raises(cli.UsageError, match=re.escape(message)) as caught:
        cli.parse(argv)
    assert (caught.value.command and caught.value.command.name) == command


@pytest.mark.parametrize("command", [None, *(c for c in cli.COMMANDS if c.func is not None)])
def test_help_lists_every_option(
    command: cli.Command | None, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--help"] if command is None else [command.name, "-h"]
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    assert err == "" and out.startswith(f"usage: {cli.PROG}")
    table = cli.TOP if command is None else command.args
    for arg in table:
        assert cli.spelled(arg) in out
    assert all(len(line) <= 80 for line in out.splitlines() if " " in line.strip())


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from loopdev import __version__

    assert cli.main(["--version", "list"]) == 0
    assert capsys.readouterr().out == f"loopdev {__version__}\n"


def test_list_runs_without_heavy_imports() -> None:
    """The command's way in (``_loopdev_main``) through ``list``: no argparse, nor the
    re, enum, json or gettext it would bring (6 ms of every start together)."""
    program = (
        "import sys\n"
        "sys.argv = ['loopdev', 'list']\n"
        "import _loopdev_main\n"
        "status = _loopdev_main.main()\n"
        "heavy = ('argparse', 're', 'enum', 'json', 'gettext', 'getopt', 'typing')\n"
        "print(status, sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "0 []"


# --- attach ------------------------------------------------------------------------


@needs_losetup
def test_attach_show_configures(work: Path) -> None:
    img = make_file(work / "disk.img")
    out = ok(
        "attach",
        "--show",
        "--offset",
        "4KiB",
        "--sizelimit",
        "1M",
        "--read-only",
        "--sector-size",
        "4096",
        str(img),
    )
    dev = out.strip()
    assert out == f"{dev}\n" and re.fullmatch(r"/dev/loop\d+", dev)
    # Still bound after the CLI exited (no autoclear), as losetup leaves it.
    entry = losetup_json(work)[dev]
    assert entry == {
        "name": dev,
        "sizelimit": 1 << 20,
        "offset": 4096,
        "autoclear": False,
        "ro": True,
        "back-file": str(img),
        "dio": False,
        "log-sec": 4096,
    }
    assert ok("detach", dev) == ""
    assert mine(work) == []


def test_attach_without_show_prints_nothing(work: Path) -> None:
    img = make_file(work / "disk.img")
    assert ok("attach", str(img)) == ""
    assert len(mine(work)) == 1


def test_attach_partscan_and_direct_io(work: Path) -> None:
    img = make_file(work / "disk.img")
    dev = ok("attach", "--show", "-P", "--direct-io=on", str(img)).strip()
    name = os.path.basename(dev)
    with open(f"/sys/block/{name}/loop/partscan") as f:
        assert f.read().strip() == "1"
    assert loopdev_json(work)[dev]["dio"] is True
    ok("detach", name)  # a bare name works too
    assert mine(work) == []


@needs_losetup
def test_nooverlap_reuses_the_same_device(work: Path) -> None:
    img = make_file(work / "disk.img")
    first = ok("attach", "--nooverlap", "--show", "--offset", "4096", str(img))
    second = ok("attach", "-L", "--show", "-o", "4096", str(img))
    assert first == second and first.strip() in mine(work)
    assert len(mine(work)) == 1
    # Without --show the reuse is as quiet as an attach.
    assert ok("attach", "-L", "-o", "4096", str(img)) == ""
    # Another range of the same file that overlaps the device's: refused.
    res = run("attach", "-L", "--show", "-o", "8192", "--sizelimit", "4096", str(img))
    assert res.returncode == 1 and "overlapping" in res.stderr and res.stdout == ""
    assert len(mine(work)) == 1
    # A device read-only where read-write is asked cannot be reused either.
    other = make_file(work / "ro.img")
    losetup_attach("-r", str(other))
    res = run("attach", "-L", "--show", str(other))
    assert res.returncode == 1 and "read-only" in res.stderr
    assert len(mine(work)) == 2


# --- list --------------------------------------------------------------------------


@needs_losetup
def test_list_json_equals_losetup(work: Path) -> None:
    from loopdev.device import attach

    files = [make_file(work / f"f{i}.img") for i in range(6)]
    expected = {
        losetup_attach(str(files[0])),
        losetup_attach("-o", "512", "--sizelimit", "1M", "-r", str(files[1])),
        losetup_attach("-b", "4096", "--direct-io=on", str(files[2])),
        ok("attach", "--show", "-b", "2048", "-o", "1M", str(files[3])).strip(),
        ok("attach", "--show", "--direct-io=on", "-r", str(files[4])).strip(),
    }
    # Unlinked backing file: both show the kernel's "(deleted)" suffix.
    files[0].unlink()
    # autoclear=True, held open by this process.
    with attach(files[5]) as held:
        expected.add(held.path)
        theirs = losetup_json(work)
        ours = loopdev_json(work)
    assert set(ours) == set(theirs) == expected
    for name, entry in ours.items():
        assert list(entry) == KEYS
        for key in KEYS:
            # type() too: True == 1 in Python, but not in JSON.
            assert (type(entry[key]), entry[key]) == (
                type(theirs[name][key]),
                theirs[name][key],
            ), (name, key)
    assert any(e["back-file"].endswith(" (deleted)") for e in ours.values())
    assert any(e["autoclear"] for e in ours.values())


@needs_losetup
def test_list_one_device(work: Path) -> None:
    a = ok("attach", "--show", str(make_file(work / "a.img"))).strip()
    ok("attach", "--show", str(make_file(work / "b.img")))
    doc = json.loads(ok("list", "--json", a))
    assert [d["name"] for d in doc["loopdevices"]] == [a]
    assert doc["loopdevices"][0] == losetup_json(work)[a]
    table = ok("list", a).splitlines()
    assert len(table) == 2 and table[0].split()[0] == "NAME" and table[1].startswith(a + " ")
    # Not the device just detached: another process may have it by now.
    res = run("list", NO_SUCH_DEVICE)
    assert res.returncode == 1 and "not bound" in res.stderr and NO_SUCH_DEVICE in res.stderr


@needs_losetup
def test_long_backing_path_shown_in_full(work: Path) -> None:
    img = make_file(work / ("d" * 70) / ("long-name-" * 4 + ".img"))
    assert len(os.fsencode(str(img))) > 64  # the ioctl's lo_file_name holds 64 bytes
    dev = ok("attach", "--show", str(img)).strip()
    assert loopdev_json(work)[dev]["back-file"] == str(img)
    assert losetup_json(work)[dev]["back-file"] == str(img)
    row = [line for line in ok("list").splitlines() if line.startswith(dev + " ")]
    assert len(row) == 1 and f" {img} " in row[0]


@needs_losetup
@pytest.mark.parametrize(
    # No undecodable names here: conftest's leak check reads every device's
    # backing path as UTF-8, so one bound would break concurrent test runs.
    "name",
    [b"plain.img", b"with space.img", b"new\nline.img", b"tab\tand-\xc3\xa9.img"],
)
def test_one_device_table_equals_losetup(work: Path, name: bytes) -> None:
    # One row, so the column widths are decided by that row alone: byte-identical.
    path = os.fsdecode(os.path.join(os.fsencode(work), name))
    make_file(Path(path))
    dev = ok("attach", "--show", "-o", "1M", "-b", "1024", path).strip()
    # losetup escapes non-ASCII too unless the locale is UTF-8.
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    theirs = subprocess.run(["losetup", "-l", dev], capture_output=True, check=True, env=env)
    assert ok("list", dev).encode() == theirs.stdout


@needs_losetup
def test_table_columns_aligned(work: Path) -> None:
    devs = {
        ok("attach", "--show", str(make_file(work / "short.img"))).strip(),
        ok(
            "attach",
            "--show",
            "-o",
            "1M",
            "--sizelimit",
            "2M",
            "-r",
            "-b",
            "4096",
            str(make_file(work / "a-much-longer-file-name-for-the-table.img")),
        ).strip(),
    }
    info = losetup_json(work)
    lines = ok("list").splitlines()
    header = lines[0]
    spans = [(m.group(), m.start(), m.end()) for m in re.finditer(r"\S+", header)]
    assert [s[0] for s in spans] == [
        "NAME",
        "SIZELIMIT",
        "OFFSET",
        "AUTOCLEAR",
        "RO",
        "BACK-FILE",
        "DIO",
        "LOG-SEC",
    ]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert devs <= set(rows)
    left = {"NAME", "BACK-FILE"}
    for dev in devs:
        row = rows[dev]
        e = info[dev]
        cells = [
            e["name"],
            e["sizelimit"],
            e["offset"],
            e["autoclear"],
            e["ro"],
            e["back-file"],
            e["dio"],
            e["log-sec"],
        ]
        for (title, start, end), value in zip(spans, cells, strict=True):
            text = str(int(value)) if not isinstance(value, str) else value
            if title in left:  # starts under the title
                assert row[start : start + len(text)] == text, (title, row)
                assert start == 0 or row[start - 1] == " "
            else:  # ends under the title's end
                assert row[end - len(text) : end] == text, (title, row)
                assert end == len(row) or row[end] == " "


# --- find, detach, resize ----------------------------------------------------------


def test_find(work: Path) -> None:
    a = make_file(work / "a.img")
    b = make_file(work / "b.img")
    a0 = ok("attach", "--show", str(a)).strip()
    a1 = ok("attach", "--show", "-o", "512", str(a)).strip()
    b0 = ok("attach", "--show", str(b)).strip()
    assert sorted(ok("find", str(a)).split("\n")[:-1]) == sorted([a0, a1])
    assert ok("find", "-o", "512", str(a)) == f"{a1}\n"
    assert ok("find", str(b)) == f"{b0}\n"
    # Found by inode, not by name: a hard link finds the same devices.
    os.link(a, work / "link.img")
    assert sorted(ok("find", str(work / "link.img")).split()) == sorted([a0, a1])
    assert ok("find", str(make_file(work / "unused.img"))) == ""
    res = run("find", str(work / "missing.img"))
    assert res.returncode == 1 and "missing.img" in res.stderr


def test_detach_file_detaches_all_its_devices(work: Path) -> None:
    a = make_file(work / "a.img")
    b = make_file(work / "b.img")
    for off in ("0", "512", "1M"):
        ok("attach", "-o", off, str(a))
    keep = ok("attach", "--show", str(b)).strip()
    assert len(mine(work)) == 4
    assert ok("detach", str(a)) == ""
    assert mine(work) == [keep]
    assert ok("find", str(a)) == ""
    assert ok("detach", keep) == ""
    assert mine(work) == []


def test_detach_all_touches_only_what_devices_returns(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``detach --all`` in-process, with the device list and open_device fenced in.

    Every way the CLI could reach ``devices()`` or ``open_device()`` is
    replaced, and the open_device stand-in refuses any device that is not
    ours, so no other process's device can be detached.
    """
    import loopdev
    import loopdev.device as device

    imgs = [make_file(work / f"{i}.img") for i in range(2)]
    ours = {ok("attach", "--show", str(p)).strip() for p in imgs}
    real_devices, real_open = device.devices, device.open_device

    def fenced_devices() -> list[device.DeviceInfo]:
        return [i for i in real_devices() if i.backing_file.startswith(f"{work}/")]

    def fenced_open(name: str | int, *, owned: bool = False) -> device.LoopDevice:
        path = f"/dev/{os.path.basename(str(name))}"
        if path not in ours:
            raise AssertionError(f"detach --all reached {name}, which is not ours")
        return real_open(name, owned=owned)

    # Resolve loopdev's lazy attributes first: resolved after device.* is
    # patched, they would cache the stand-ins, and undo would restore those.
    assert loopdev.devices is real_devices and loopdev.open is real_open
    for module in (device, loopdev, cli):
        monkeypatch.setattr(module, "devices", fenced_devices, raising=False)
    for module in (device, cli):
        monkeypatch.setattr(module, "open_device", fenced_open, raising=False)
    monkeypatch.setattr(loopdev, "open", fenced_open, raising=False)
    assert cli.main(["detach", "--all"]) == 0
    assert mine(work) == []


def test_detach_reports_each_failure_and_goes_on(work: Path) -> None:
    dev = ok("attach", "--show", str(make_file(work / "a.img"))).strip()
    res = run("detach", str(work / "missing.img"), dev)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "missing.img" in res.stderr
    assert mine(work) == []  # the device after the bad argument was still detached
    # Never name the released device again: another process may have it by now.
    res = run("detach", NO_SUCH_DEVICE)
    assert res.returncode == 1 and NO_SUCH_DEVICE in res.stderr
    res = run("detach", str(work))
    assert res.returncode == 1 and str(work) in res.stderr


def test_resize_after_file_grew(work: Path) -> None:
    img = make_file(work / "disk.img", 8 << 20)
    dev = ok("attach", "--show", str(img)).strip()
    size = Path(f"/sys/block/{os.path.basename(dev)}/size")
    assert int(size.read_text()) * 512 == 8 << 20
    os.truncate(img, 24 << 20)
    assert int(size.read_text()) * 512 == 8 << 20  # not before resize
    assert ok("resize", dev) == ""
    assert int(size.read_text()) * 512 == 24 << 20
    ok("detach", dev)
    res = run("resize", NO_SUCH_DEVICE)
    assert res.returncode == 1 and NO_SUCH_DEVICE in res.stderr


# --- errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "target"),
    [
        ([], "missing.img"),
        ([], "adir"),
        (["--offset", "-1"], "disk.img"),
        (["--offset", "16M"], "disk.img"),
        (["--sizelimit", "1000"], "disk.img"),
        (["--sector-size", "1000"], "disk.img"),
        (["-L", "--offset", "-1"], "disk.img"),
    ],
)
def test_bad_input_exits_1_and_binds_nothing(work: Path, options: list[str], target: str) -> None:
    make_file(work / "disk.img")
    (work / "adir").mkdir()
    before = mine(work)
    res = run("attach", "--show", *options, str(work / target))
    assert res.returncode == 1, res
    assert res.stdout == ""
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("loopdev: "), res.stderr
    assert target in lines[0]
    assert "Traceback" not in res.stderr
    assert mine(work) == before == []


def test_debug_shows_traceback(work: Path) -> None:
    missing = str(work / "missing.img")
    for argv in (["--debug", "attach", missing], ["attach", "--debug", missing]):
        res = run(*argv)
        assert res.returncode == 1
        assert res.stderr.startswith("Traceback (most recent call last):")
        assert "BackingFileError" in res.stderr
        assert res.stderr.splitlines()[-1].startswith("loopdev: ")
    assert mine(work) == []
