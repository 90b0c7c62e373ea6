"""The losetup drop-in (``loopdev losetup``, or loopdev run as ``losetup``) against
util-linux's losetup, on real devices.

- ``tests/losetup_forms.sh`` runs once with util-linux's losetup and once with
  the drop-in first in PATH; stdout and exit status must agree form by form
  (device names aside, and runs of blanks, which follow the names' lengths);
- listings of the same devices by both tools agree byte for byte;
- in a container-like private mount namespace with a tmpfs ``/dev`` the same
  script fails with util-linux's losetup and gives the host's answers with
  the drop-in (which also registers the GPT's partitions there).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nsrun
import pytest
from helpers import register_backing
from images import gpt_image, make_image

MiB = 1 << 20
SCRIPT = Path(__file__).resolve().parent / "losetup_forms.sh"
UTIL_LINUX = shutil.which("losetup", path="/usr/sbin:/sbin:/usr/bin:/bin")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Forms whose output may differ by design (documented in loopdev.losetup).
NOT_COMPARED = ("x-partitions",)
# Listings of several devices: their order is /sys/block's, which depends on
# which devices each run got.
UNORDERED = ("all", "list-all", "list-default", "list-raw-all")

pytestmark = pytest.mark.skipif(UTIL_LINUX is None, reason="util-linux losetup not installed")


def drop_in(where: Path) -> Path:
    """A directory with ``losetup``: the installed ``loopdev`` under that name."""
    where.mkdir(exist_ok=True)
    link = where / "losetup"
    if not link.exists():
        script = Path(sys.executable).parent / "loopdev"
        if script.exists():
            link.symlink_to(script)
        else:  # an install without console scripts: the same entry point
            entry = "import sys\nfrom _loopdev_main import main\nsys.exit(main())\n"
            link.write_text(f"#!{sys.executable}\n{entry}")
            link.chmod(0o755)
    return where


def images(where: Path) -> list[Path]:
    made = [make_image(where / n, 10 * MiB) for n in ("a.img", "c.img", "d.img")]
    made.append(make_image(where / "b c.img", 4 * MiB))
    made.append(gpt_image(where / "gpt.img"))
    made.append(make_image(where / "ro.img", 4 * MiB))
    made[-1].chmod(0o444)
    for image in made:
        register_backing(image)
    return made


def run_forms(workdir: str, path_first: str | None) -> str:
    """The script's output with ``path_first`` (or the system's losetup) first in PATH."""
    path = f"{path_first}:{SYSTEM_PATH}" if path_first else SYSTEM_PATH
    out = subprocess.run(
        ["bash", str(SCRIPT)],
        cwd=workdir,
        env=dict(os.environ, PATH=path, LC_ALL="C"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return out.stdout


def numbered(text: str) -> str:
    """Device names as /dev/LOOP0, /dev/LOOP1, ... in order of appearance."""
    names = list(dict.fromkeys(re.findall(r"/dev/loop\d+", text)))
    return re.sub(r"/dev/loop\d+", lambda m: f"/dev/LOOP{names.index(m.group(0))}", text)


def forms(output: str) -> dict[str, str]:
    """Form name -> its stdout and status, device names numbered per form by appearance."""
    found: dict[str, str] = {}
    for block in output.split("== ")[1:]:
        name, _, body = block.partition("\n")
        name = name.split(" ")[0]
        if name in UNORDERED:
            lines = re.sub(r"/dev/loop\d+ *", "/dev/LOOP ", body).splitlines()
            lines = [re.sub(r"[ \t]+", " ", line) for line in lines]
            body = "\n".join(sorted(lines[:-1]) + lines[-1:]) + "\n"
        body = re.sub(r"\b7:\d+\b", "7:N", numbered(body))
        found[name] = re.sub(r"[ \t]+", " ", body)
    return found


def reference(workdir: str) -> dict[str, str]:
    """util-linux's answers; run again where one of its attaches lost a race with
    another allocator on this shared machine (EBUSY/EAGAIN, which it does not
    retry in every case), up to three times."""
    for _ in range(3):
        found = forms(run_forms(workdir, None))
        if all(found[n].endswith("rc=0\n") for n in found if n.startswith("attach-")):
            break
    return found


def compare(expected: dict[str, str], got: dict[str, str]) -> list[str]:
    return [
        f"{name}:\n--- util-linux\n{expected[name]}--- drop-in\n{got.get(name)}"
        for name in expected
        if name not in NOT_COMPARED and got.get(name) != expected[name]
    ]


def test_forms_like_util_linux(tmp_path: Path, devices: None) -> None:
    work = tmp_path / "work"
    work.mkdir()
    images(work)
    bindir = drop_in(tmp_path / "bin")
    expected = reference(str(work))
    got = forms(run_forms(str(work), str(bindir)))
    assert len(expected) > 40, expected
    assert got.keys() == expected.keys()
    problems = compare(expected, got)
    assert not problems, "\n".join(problems)
    # Where the kernel has no partition parser, only the drop-in registers them.
    device = got["attach-partscan"].splitlines()[0]
    assert got["x-partitions"].split() == [f"{device}p1", f"{device}p2", "rc=0"]


LISTINGS = [
    ["-a"],
    ["-j", "{b}"],
    ["-j", "{b}", "-o", "1048576"],
    ["-l", "-j", "{b}"],
    ["-l", "-n", "-j", "{b}"],
    ["-l", "--raw", "-j", "{b}"],
    ["--output-all", "-l", "-j", "{b}"],
    ["--output-all", "--raw", "-l", "-j", "{b}"],
    ["-J", "--output-all", "-l", "-j", "{b}"],
    ["-l", "{dev}"],
    ["-J", "-l", "{dev}"],
    ["--output-all", "-l", "{gpt}"],
    ["-J", "-O", "name,back-ino,back-maj:min,maj:min,partscan,log-sec", "-l", "{gpt}"],
    ["{dev}"],
]


def test_listings_byte_for_byte(tmp_path: Path, devices: None) -> None:
    """Both tools list the same devices identically (alignment, JSON, raw escapes)."""
    made = images(tmp_path)
    b, gpt = str(made[3]), str(made[4])
    bindir = str(drop_in(tmp_path / "bin"))
    tool = os.path.join(bindir, "losetup")
    attached = []
    try:
        for args in (
            ["-r", "-o", "1M", "--sizelimit", "2M", b],
            ["-b", "4096", "--direct-io=on", b],
            ["-P", gpt],
        ):
            out = subprocess.run([tool, "-f", "--show", *args], capture_output=True, text=True)
            assert out.returncode == 0, out.stderr
            attached.append(out.stdout.strip())
        values = {"b": b, "gpt": attached[2], "dev": attached[0]}
        for listing in LISTINGS:
            args = [a.format(**values) for a in listing]
            theirs = subprocess.run([UTIL_LINUX, *args], capture_output=True, text=True)
            ours = subprocess.run([tool, *args], capture_output=True, text=True)
            if args == ["-a"]:
                keep = [line for line in theirs.stdout.splitlines() if str(tmp_path) in line]
                mine = [line for line in ours.stdout.splitlines() if str(tmp_path) in line]
                assert sorted(mine) == sorted(keep), args
            else:
                assert ours.stdout == theirs.stdout, args
            assert ours.returncode == theirs.returncode, args
    finally:
        subprocess.run([UTIL_LINUX, "-d", *attached], check=False)


def test_invocations(tmp_path: Path) -> None:
    """``loopdev losetup`` and ``losetup`` (by name) are the same drop-in."""
    tool = drop_in(tmp_path / "bin") / "losetup"
    by_name = subprocess.run([tool, "--help"], capture_output=True, text=True)
    sub = subprocess.run(
        [sys.executable, "-m", "loopdev", "losetup", "--help"], capture_output=True, text=True
    )
    assert by_name.returncode == sub.returncode == 0
    assert by_name.stdout.startswith("\nUsage:\n losetup [options]")
    assert sub.stdout.startswith("\nUsage:\n loopdev losetup [options]")
    # Scripts probe --help for options before using them.
    for option in ("--partscan", "--show", "--sizelimit", "--direct-io", "--json", "--raw"):
        assert option in by_name.stdout
    version = subprocess.run([tool, "-V"], capture_output=True, text=True)
    assert version.returncode == 0 and "util-linux 2.38" in version.stdout


# --- in a container ------------------------------------------------------------------


def body_forms(workdir: str, path_first: str | None) -> str:
    """In the child (tmpfs /dev): the script's output."""
    return run_forms(workdir, path_first)


def test_forms_in_container(tmp_path: Path, devices: None) -> None:
    """With a static /dev only the drop-in works, and it answers as on the host."""
    if nsrun.UNSHARE is None:
        pytest.skip("unshare (util-linux) not installed")
    work = tmp_path / "work"
    work.mkdir()
    made = images(work)
    bindir = str(drop_in(tmp_path / "bin"))
    on_host = reference(str(work))
    theirs = forms(nsrun.run(body_forms, str(work), None, images=made))
    ours = forms(nsrun.run(body_forms, str(work), bindir, images=made))
    assert theirs["attach-show"].endswith("rc=1\n"), theirs["attach-show"]
    assert compare(on_host, theirs), "util-linux's losetup should fail in a static /dev"
    problems = compare(on_host, ours)
    assert not problems, "\n".join(problems)
    device = ours["attach-partscan"].splitlines()[0]
    assert ours["x-partitions"].split() == [f"{device}p1", f"{device}p2", "rc=0"]


def test_loopdev_version() -> None:
    import loopdev

    out = subprocess.run(
        [sys.executable, "-m", "loopdev", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert out.stdout == f"loopdev {loopdev.__version__}\n"


@pytest.mark.parametrize(
    ("argv", "action", "devices", "file"),
    [
        ([], "show", [], None),
        (["-f"], "find-free", [], None),
        (["-f", "--show", "-P", "x.img"], "create", [], "x.img"),
        (["/dev/loop7", "x.img"], "create", ["/dev/loop7"], "x.img"),
        (["-l", "/dev/loop7", "x.img"], "create", ["/dev/loop7"], "x.img"),
        (["/dev/loop7"], "show-one", ["/dev/loop7"], None),
        (["-d", "/dev/loop1", "/dev/loop2"], "delete", ["/dev/loop1", "/dev/loop2"], None),
        (["-D"], "delete-all", [], None),
        (["-a"], "show", [], None),
        (["-j", "x.img", "-o", "1M"], "show", [], "x.img"),
        (["-l", "-J", "--output-all"], "show", [], None),
        (["-c", "loop3"], "capacity", ["loop3"], None),
        (["--direct-io", "-f", "x.img"], "create", [], "x.img"),
    ],
)
def test_forms_parse_as_util_linux(
    argv: list[str], action: str, devices: list[str], file: str | None
) -> None:
    """What each form means, as util-linux 2.38's main() decides it (no devices needed)."""
    from loopdev import losetup

    o = losetup.parse(argv)
    assert (o.action, o.devices, o.file) == (action, devices, file)


@pytest.mark.parametrize(
    "argv",
    [
        ["-D", "-a"],
        ["-J", "--raw", "-l"],
        ["-O", "NAME", "--output-all"],
        ["-o", "1M", "-a"],
        ["-r", "-l"],
        ["-f", "a.img", "b.img"],
        ["-O", "NAME,BOGUS"],
        ["--direct-io=maybe", "-f", "a.img"],
        ["-o", "-5", "-f", "a.img"],
        ["--bogus"],
        ["-d"],
    ],
)
def test_usage_errors_exit_1(argv: list[str]) -> None:
    """Usage errors: one message on stderr and status 1 (util-linux's, not argparse's 2)."""
    out = subprocess.run(
        [sys.executable, "-m", "loopdev", "losetup", *argv], capture_output=True, text=True
    )
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr.startswith("loopdev losetup: "), out.stderr
