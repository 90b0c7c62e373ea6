"""The container case for real (issue 9): a private mount namespace with a tmpfs /dev.

Each ``test_*`` runs a ``body_*`` of this module through :func:`nsrun.run`:
in a "bare" /dev (character devices only) or a "static" one (plus the
``loopN`` nodes of "container start"), as docker/podman/Kubernetes give it.
The bodies assert in the child; the harness re-raises their failures and
checks afterwards that nothing stayed bound to the image (by device and
inode), registered, or created in the host's /dev.

Names these tests assume of the library: ``loopdev.attach(..., partscan=,
node_dir=)``, ``LoopDevice.path/.name/.partitions/.nodes/.detach()``,
``PartitionDevice.number/.start/.size/.name/.path``, compat
``LoopControl().loop_for_fd()``, ``Loop.devname/.mknod(dir_fd)/.close()``,
``loopdev.errors.LoopError`` and ``loopdev.sysfs.loop_devt(index,
part_shift=None)``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nsrun
import pytest
from images import GPT3, kernel_spans, make_image, sfdisk_image

import loopdev
from loopdev import LoopControl
from loopdev.errors import LoopError

BLOCK = 4096
ATTACH_BOUND = 1.0  # seconds: attach(partscan=True) in a container (issue 9 acceptance)
FAIL_BOUND = 0.5  # seconds: a clear failure where nothing can work
# Words of a message that tells a container user how to get device nodes.
FIXES = ("CAP_MKNOD", "--cap-add", "--privileged", "devtmpfs")
LOOP_CTL_ADD = 0x4C80
LOOP_CTL_REMOVE = 0x4C81
LOOP_CTL_GET_FREE = 0x4C82

Spans = list[list[int]]  # [number, start, size] in bytes, from sfdisk


@pytest.fixture
def container(devices: None) -> None:
    if nsrun.UNSHARE is None or nsrun.SETPRIV is None:
        pytest.skip("unshare/setpriv (util-linux) not installed")


@pytest.fixture
def gpt(tmp_path: Path, container: None) -> tuple[str, Spans]:
    """A 32 MiB image with a 3-partition GPT made by sfdisk, and its partitions' spans."""
    path = tmp_path / "gpt.img"
    spans = [list(span) for span in kernel_spans(sfdisk_image(path, GPT3))]
    assert [s[0] for s in spans] == [1, 2, 3]
    return str(path), spans


@pytest.fixture
def plain_image(tmp_path: Path, container: None) -> str:
    return str(make_image(tmp_path / "disk.img", 16 << 20))


# --- helpers run in the child -----------------------------------------------------


def _diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    added = {n: after[n] for n in after.keys() - before.keys()}
    removed = {n: before[n] for n in before.keys() - after.keys()}
    changed = {
        n: (before[n], after[n]) for n in before.keys() & after.keys() if before[n] != after[n]
    }
    return f"added {added}, removed {removed}, changed {changed}"


def _write_block(path: str) -> bytes:
    """One random block written (and synced) at offset 0 of ``path``."""
    payload = os.urandom(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        assert os.pwrite(fd, payload, 0) == BLOCK
        os.fsync(fd)
    finally:
        os.close(fd)
    return payload


def _landed(image: str, offset: int, payload: bytes) -> None:
    with open(image, "rb") as f:
        f.seek(offset)
        got = f.read(len(payload))
    assert got == payload, f"the block written through partition 2 is not at {offset} in the image"


def _sysfs_spans(name: str) -> list[list[int]]:
    spans = []
    for part in nsrun.partitions_of(name):
        base = f"/sys/block/{name}/{part}"
        with (
            open(f"{base}/partition") as f1,
            open(f"{base}/start") as f2,
            open(f"{base}/size") as f3,
        ):
            spans.append([int(f1.read()), int(f2.read()) * 512, int(f3.read()) * 512])
    return sorted(spans)


def _clean(image: str, name: str | None, before: dict[str, Any]) -> None:
    """Nothing bound to ``image``, no partition left on ``name``, /dev as ``before``."""
    left = nsrun.wait_unbound(image)
    assert not left, f"still bound to the image: {left}"
    if name is not None:
        stale = nsrun.stale_partitions([name])
        assert not stale, f"partitions left registered: {stale}"
    after = nsrun.dev_listing()
    assert after == before, f"/dev changed: {_diff(before, after)}"


def _top_index() -> int:
    """An index above any loop device the next attach can get, even on a busy machine."""
    return max(int(n[4:]) for n in nsrun.loop_names()) + 32


def _wrong_devt(index: int) -> tuple[int, int]:
    """The dev_t of an existing loop device other than ``loop{index}``."""
    names = nsrun.loop_names()
    for name in names[index % len(names) :] + names:
        if name != f"loop{index}":
            return nsrun.sysfs_devt(name)
    raise AssertionError("only one loop device")


# --- the harness itself (passes on any loopdev) -----------------------------------


def body_probe(host_ns: str, flavour: str) -> dict[str, Any]:
    assert os.readlink("/proc/self/ns/mnt") != host_ns, "not in a new mount namespace"
    assert nsrun.mounts_at("/dev")[-1][1] == "tmpfs", nsrun.mounts_at("/dev")
    listing = nsrun.dev_listing()
    with open("/sys/class/misc/loop-control/dev") as f:
        control = [int(x) for x in f.read().split(":")]
    assert listing["loop-control"][:3] == ["chr", *control]
    blocks = {n: e for n, e in listing.items() if e[0] == "blk"}
    if flavour == "bare":
        assert not blocks, f"block nodes in a bare /dev: {blocks}"
    else:
        assert blocks, "no loop node in a static /dev"
        for name in blocks:
            assert nsrun.LOOP_NAME.fullmatch(name), f"{name} in a static /dev"
            if not os.path.exists(f"/sys/class/block/{name}"):
                continue  # removed since by others
            try:
                nsrun.assert_opens_as(f"/dev/{name}", name)
            except OSError as exc:
                # Another process's autoclear device in rundown opens with ENXIO (6.x).
                if exc.errno != errno.ENXIO:
                    raise
    with open("/dev/nsrun-probe", "w") as f:
        f.write("only in the child's /dev\n")
    return listing


@pytest.mark.parametrize("flavour", ["bare", "static"])
def test_harness_dev_is_private(container: None, flavour: str) -> None:
    listing = nsrun.run(body_probe, os.readlink("/proc/self/ns/mnt"), flavour, dev=flavour)
    assert "null" in listing and "urandom" in listing
    assert not os.path.exists("/dev/nsrun-probe")


def body_by_hand(name: str, part: str) -> str:
    """Reach a device the host attached through nodes made by hand, as a container user does."""
    before = nsrun.dev_listing()
    old = os.umask(0)
    try:
        for node in (name, part):
            os.mknod(f"/dev/{node}", stat.S_IFBLK | 0o600, os.makedev(*nsrun.sysfs_devt(node)))
    finally:
        os.umask(old)
    try:
        nsrun.assert_opens_as(f"/dev/{name}", name)
        nsrun.assert_opens_as(f"/dev/{part}", part)
        payload = _write_block(f"/dev/{part}")
    finally:
        os.unlink(f"/dev/{name}")
        os.unlink(f"/dev/{part}")
    assert nsrun.dev_listing() == before
    return payload.hex()


def test_harness_reaches_host_device(gpt: tuple[str, Spans]) -> None:
    """Proves the harness on today's loopdev: host attach, I/O from the container."""
    image, spans = gpt
    with loopdev.attach(image, partscan=True) as dev:
        part = next(p for p in dev.partitions if p.number == 2)
        payload = nsrun.run(body_by_hand, dev.name, part.name)
    _landed(image, spans[1][1], bytes.fromhex(payload))
    assert not nsrun.wait_unbound(image)


def body_fails(kind: str) -> None:
    if kind == "assert":
        raise AssertionError("boom from the child")
    raise LoopError(errno.ENOENT, "typed failure", device="/dev/loop99")


def test_harness_reraises_child_failures(container: None) -> None:
    with pytest.raises(nsrun.ChildFailed, match="boom from the child") as info:
        nsrun.run(body_fails, "assert")
    assert "in body_fails" in str(info.value)  # the child's traceback
    with pytest.raises(nsrun.ChildFailed) as info:
        nsrun.run(body_fails, "typed")
    assert info.value.result["type"] == "LoopError"
    assert info.value.result["errno"] == errno.ENOENT
    assert "/dev/loop99" in info.value.result["message"]


def body_no_mknod() -> None:
    assert not nsrun.has_cap(nsrun.CAP_MKNOD)
    with pytest.raises(PermissionError):
        os.mknod("/dev/loop-probe", stat.S_IFBLK | 0o600, os.makedev(7, 0))


def test_harness_drops_mknod(container: None) -> None:
    nsrun.run(body_no_mknod, drop_mknod=True)


def _bind_by_hand(image: str, *extra: list[str], index: int | None = None) -> str:
    """Bind ``image`` with losetup through a node made by hand; run ``extra`` commands on it.

    ``index`` asks for that device (made if missing) instead of a free one.
    The node is removed again: returns the device name.
    """
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        if index is not None and not os.path.exists(f"/sys/block/loop{index}"):
            fcntl.ioctl(ctl, LOOP_CTL_ADD, index)
        for _ in range(20):  # other processes allocate devices too
            got = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE) if index is None else index
            name = f"loop{got}"
            node = f"/dev/{name}"
            os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(*nsrun.sysfs_devt(name)))
            try:
                out = subprocess.run(["losetup", node, image], capture_output=True, text=True)
                if out.returncode == 0:
                    nsrun.used(name)
                    for argv in extra:
                        subprocess.run([*argv, node], check=True, capture_output=True)
                    return name
            finally:
                os.unlink(node)
        raise AssertionError(f"losetup kept failing: {out.stderr}")
    finally:
        os.close(ctl)


def body_leave_bound(image: str, view: str) -> None:
    """Bind ``image`` from inside the namespace under a path only the namespace has."""
    nsrun._mount(os.path.dirname(image), view, "", 0x1000, "")  # MS_BIND
    _bind_by_hand(os.path.join(view, os.path.basename(image)))


def test_harness_sees_devices_bound_in_the_namespace(plain_image: str, tmp_path: Path) -> None:
    """A device bound in the namespace names a path the host lacks: found by dev+ino."""
    if shutil.which("losetup") is None:
        pytest.skip("losetup missing")
    view = tmp_path / "view"
    view.mkdir()
    with pytest.raises(nsrun.Leaked, match="left bound to"):
        nsrun.run(body_leave_bound, plain_image, str(view), images=[plain_image])
    assert not nsrun.bound_to(plain_image)


def body_leave_partitions(image: str, index: int) -> str:
    """Register partitions with BLKPG (partx), then unbind: they outlive LOOP_CLR_FD."""
    return _bind_by_hand(image, ["partx", "-a"], ["losetup", "-d"], index=index)


def test_harness_sees_partitions_left_registered(gpt: tuple[str, Spans]) -> None:
    if shutil.which("losetup") is None or nsrun.PARTX is None:
        pytest.skip("losetup/partx missing")
    image, _ = gpt
    # A device no other allocator is offered (GET_FREE names the lowest free one):
    # one that binds it would delete the partitions before the harness sees them.
    index = _top_index() + 64
    try:
        with pytest.raises(nsrun.Leaked, match="partitions left registered") as info:
            nsrun.run(body_leave_partitions, image, index, images=[image])
        assert f"loop{index} unbound with partitions" in str(info.value)
        assert not nsrun.stale_partitions([f"loop{index}"], timeout=0)
    finally:
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(ctl, LOOP_CTL_REMOVE, index)
        except OSError:
            pass  # bound by someone after all
        finally:
            os.close(ctl)


# --- attach with partitions in a container --------------------------------------


def body_attach_partscan(image: str, spans: Spans) -> None:
    before = nsrun.dev_listing()
    start = time.monotonic()
    dev = loopdev.attach(image, partscan=True)
    elapsed = time.monotonic() - start
    nsrun.used(dev.name)
    try:
        assert elapsed < ATTACH_BOUND, f"attach(partscan=True) took {elapsed:.2f} s"
        nsrun.assert_opens_as(dev.path, dev.name)
        parts = {p.number: p for p in dev.partitions}
        assert sorted([n, p.start, p.size] for n, p in parts.items()) == spans
        for p in parts.values():
            nsrun.assert_opens_as(p.path, p.name)
        payload = _write_block(parts[2].path)
    finally:
        dev.detach()
    _clean(image, dev.name, before)
    _landed(image, spans[1][1], payload)


def test_attach_partscan_bare_dev(gpt: tuple[str, Spans]) -> None:
    image, spans = gpt
    nsrun.run(body_attach_partscan, image, spans, dev="bare", images=[image])


def body_static_attach_partscan(image: str, spans: Spans) -> None:
    listing = nsrun.dev_listing()
    assert any(nsrun.LOOP_NAME.fullmatch(n) for n in listing), "no loop node at start"
    assert not any(nsrun.LOOP_PART_NAME.fullmatch(n) for n in listing)
    body_attach_partscan(image, spans)


def test_attach_partscan_static_dev(gpt: tuple[str, Spans]) -> None:
    """Nodes loop0..7 from "container start", none for partitions."""
    image, spans = gpt
    nsrun.run(body_static_attach_partscan, image, spans, dev="static", images=[image])


def body_compat(image: str, spans: Spans, node_dir: str) -> None:
    before = nsrun.dev_listing()
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = None
    lo = None
    name = None
    try:
        start = time.monotonic()
        ctl = LoopControl()
        lo = ctl.loop_for_fd(fd, partscan=True, autoclear=True)
        elapsed = time.monotonic() - start
        name = lo.devname
        nsrun.used(name)
        assert elapsed < ATTACH_BOUND, f"loop_for_fd(partscan=True) took {elapsed:.2f} s"
        dir_fd = os.open(node_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lo.mknod(dir_fd)
            node = os.path.join(node_dir, name)
            try:
                nsrun.assert_opens_as(node, name)
            finally:
                nsrun.remove_node(node)
        finally:
            os.close(dir_fd)
        # The paths a user passes to tools, as devtmpfs would have made them.
        nsrun.assert_opens_as(f"/dev/{name}", name)
        assert _sysfs_spans(name) == spans
        for part in nsrun.partitions_of(name):
            nsrun.assert_opens_as(f"/dev/{part}", part)
        payload = _write_block(f"/dev/{name}p2")
    finally:
        if lo is not None:
            lo.close()  # autoclear: released at this last close
        if ctl is not None:
            ctl.close()
        os.close(fd)
    _clean(image, name, before)
    _landed(image, spans[1][1], payload)


def test_compat_loop_for_fd_and_mknod_bare_dev(gpt: tuple[str, Spans], tmp_path: Path) -> None:
    image, spans = gpt
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    nsrun.run(body_compat, image, spans, str(node_dir), images=[image])
    assert os.listdir(node_dir) == []


def body_cli(image: str, spans: Spans) -> None:
    before = nsrun.dev_listing()
    cli = [sys.executable, "-m", "loopdev"]
    start = time.monotonic()
    out = subprocess.run(
        [*cli, "attach", "--show", "-P", image], capture_output=True, text=True, timeout=60
    )
    elapsed = time.monotonic() - start
    assert out.returncode == 0, f"attach failed after {elapsed:.1f} s: {out.stderr}"
    path = out.stdout.strip()
    name = os.path.basename(path)
    nsrun.used(name)
    try:
        assert nsrun.LOOP_NAME.fullmatch(name), path
        # The command has exited: the printed path must still work.
        nsrun.assert_opens_as(path, name)
        assert _sysfs_spans(name) == spans
        for part in nsrun.partitions_of(name):
            nsrun.assert_opens_as(os.path.join(os.path.dirname(path), part), part)
        payload = _write_block(f"{path}p2")
    finally:
        det = subprocess.run([*cli, "detach", path], capture_output=True, text=True, timeout=60)
    assert det.returncode == 0, f"detach {path}: {det.stderr}"
    _clean(image, name, before)
    _landed(image, spans[1][1], payload)


def test_cli_attach_detach_bare_dev(gpt: tuple[str, Spans]) -> None:
    image, spans = gpt
    nsrun.run(body_cli, image, spans, images=[image])


# --- nodes left behind ------------------------------------------------------------


def body_stale_loop_nodes(image: str, spans: Spans) -> None:
    """Every ``/dev/loopK`` a killed process could have left points at another loop device."""
    top = _top_index()
    old = os.umask(0)
    try:
        for k in range(top):
            os.mknod(f"/dev/loop{k}", stat.S_IFBLK | 0o600, os.makedev(*_wrong_devt(k)))
    finally:
        os.umask(old)
    before = nsrun.dev_listing()
    start = time.monotonic()
    dev = loopdev.attach(image, partscan=True)
    elapsed = time.monotonic() - start
    nsrun.used(dev.name)
    try:
        assert int(dev.name[4:]) < top, f"{dev.name} is above the stale nodes: inconclusive"
        assert elapsed < ATTACH_BOUND, f"attach(partscan=True) took {elapsed:.2f} s"
        nsrun.assert_opens_as(dev.path, dev.name)
        for p in dev.partitions:
            nsrun.assert_opens_as(p.path, p.name)
        payload = _write_block(next(p.path for p in dev.partitions if p.number == 2))
    finally:
        dev.detach()
    assert not nsrun.wait_unbound(image)
    assert not nsrun.stale_partitions([dev.name])
    after = nsrun.dev_listing()
    # The stale node loopdev replaced is gone (or right); no other entry changed.
    mine = after.pop(dev.name, None)
    assert mine is None or mine[:3] == ["blk", *nsrun.sysfs_devt(dev.name)], mine
    del before[dev.name]
    assert after == before, f"/dev changed: {_diff(before, after)}"
    _landed(image, spans[1][1], payload)


def test_stale_loop_node_is_replaced(gpt: tuple[str, Spans]) -> None:
    image, spans = gpt
    nsrun.run(body_stale_loop_nodes, image, spans, images=[image])


def body_foreign_partition_node(image: str) -> None:
    """``/dev/loopKp1`` points at block 1:3, a device loopdev does not own: refuse."""
    top = _top_index()
    old = os.umask(0)
    try:
        for k in range(top):
            os.mknod(f"/dev/loop{k}p1", stat.S_IFBLK | 0o600, os.makedev(1, 3))
    finally:
        os.umask(old)
    before = nsrun.dev_listing()
    start = time.monotonic()
    try:
        dev = loopdev.attach(image, partscan=True)
    except LoopError as exc:
        elapsed = time.monotonic() - start
        err: LoopError = exc
    else:
        nsrun.used(dev.name)
        dev.detach()
        raise AssertionError(f"attach used /dev/{dev.name}p1, which is block 1:3")
    assert elapsed < ATTACH_BOUND, f"refusing took {elapsed:.2f} s: {err}"
    named = re.search(r"/dev/(loop\d+)p1\b", str(err))
    assert named, f"the error does not name the node: {err}"
    nsrun.used(named.group(1))
    _clean(image, named.group(1), before)


def test_foreign_partition_node_is_refused(gpt: tuple[str, Spans]) -> None:
    image, _ = gpt
    nsrun.run(body_foreign_partition_node, image, images=[image])


def hold_attached(image: str, node_dir: str) -> None:
    """Attach with private nodes, say which, and wait to be killed."""
    dev = loopdev.attach(image, partscan=True, node_dir=node_dir)
    print(dev.name, flush=True)
    time.sleep(600)


def test_node_dir_reused_after_crash(gpt: tuple[str, Spans], tmp_path: Path) -> None:
    """A process SIGKILLed while it held attach(node_dir=D) leaves its nodes in D."""
    image, spans = gpt
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    holder = nsrun.spawn(hold_attached, image, str(node_dir))
    try:
        line = holder.stdout.readline() if holder.stdout else ""
    finally:
        holder.kill()
        _, err = holder.communicate()
    assert line, f"the holder did not attach: {err}"
    crashed = line.split()[0]
    assert not nsrun.wait_unbound(image, 5.0), (
        "autoclear did not release the killed holder's device"
    )
    assert not nsrun.stale_partitions([crashed])
    left = {n: os.lstat(node_dir / n).st_rdev for n in os.listdir(node_dir)}
    assert crashed in left and f"{crashed}p2" in left, left
    # Whichever device the next attach gets, its names are taken by such leftovers.
    for k in range(_top_index()):
        for suffix in ("", "p1", "p2", "p3"):
            if f"loop{k}{suffix}" not in left and f"{crashed}{suffix}" in left:
                os.mknod(
                    node_dir / f"loop{k}{suffix}", stat.S_IFBLK | 0o600, left[crashed + suffix]
                )
    try:
        with loopdev.attach(image, partscan=True, node_dir=node_dir) as dev:
            names = [dev.name] + [p.name for p in dev.partitions]
            assert sorted(dev.nodes) == sorted(names)
            for name in names:
                nsrun.assert_opens_as(str(node_dir / name), name)
            payload = _write_block(str(node_dir / f"{dev.name}p2"))
        remaining = set(os.listdir(node_dir))
        assert not remaining & set(names), f"nodes left after detach: {remaining & set(names)}"
        _landed(image, spans[1][1], payload)
        assert not nsrun.wait_unbound(image)
        assert not nsrun.stale_partitions(names[:1])
    finally:
        for name in os.listdir(node_dir):
            os.unlink(node_dir / name)


# --- clear failures -------------------------------------------------------------


def _expect_failure(api: str, image: str) -> tuple[BaseException | str, float]:
    """What ``api`` raises (or the CLI prints) trying to attach ``image``, and how long it took."""
    start = time.monotonic()
    if api == "cli":
        out = subprocess.run(
            [sys.executable, "-m", "loopdev", "attach", "--show", image],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode == 0:
            name = os.path.basename(out.stdout.strip())
            nsrun.used(name)
            raise AssertionError(f"the CLI attached {out.stdout.strip()}")
        lines = out.stderr.splitlines()
        assert out.returncode == 1 and len(lines) == 1, out.stderr
        return lines[0], time.monotonic() - start
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    try:
        if api == "attach":
            dev = loopdev.attach(image)
            nsrun.used(dev.name)
            dev.detach()
        else:
            ctl = LoopControl()
            try:
                lo = ctl.loop_for_fd(fd, autoclear=True)
                nsrun.used(lo.devname)
                lo.close()
            finally:
                ctl.close()
    except OSError as exc:
        return exc, time.monotonic() - start
    finally:
        os.close(fd)
    raise AssertionError(f"{api} attached although it cannot work here")


def body_no_loop_control(image: str, api: str, errnos: list[int]) -> None:
    before = nsrun.dev_listing()
    err, elapsed = _expect_failure(api, image)
    assert elapsed < FAIL_BOUND or api == "cli", f"failing took {elapsed:.2f} s: {err}"
    if api == "attach":
        assert isinstance(err, LoopError), f"not a loopdev.errors type: {err!r}"
    if isinstance(err, OSError):
        assert err.errno in errnos, err
    assert "/dev/loop-control" in str(err), f"the error does not name /dev/loop-control: {err}"
    _clean(image, None, before)


@pytest.mark.parametrize("drop_mknod", [False, True], ids=["caps", "no-mknod"])
@pytest.mark.parametrize("api", ["attach", "compat", "cli"])
def test_no_loop_control_fails_fast(plain_image: str, api: str, drop_mknod: bool) -> None:
    nsrun.run(
        body_no_loop_control,
        plain_image,
        api,
        # Without CAP_MKNOD it cannot be made either: EPERM may be the better answer.
        [errno.ENOENT, errno.EPERM] if drop_mknod else [errno.ENOENT],
        loop_control=False,
        drop_mknod=drop_mknod,
        images=[plain_image],
    )


def body_mknod_refused(image: str, api: str) -> None:
    before = nsrun.dev_listing()
    err, elapsed = _expect_failure(api, image)
    assert elapsed < FAIL_BOUND or api == "cli", f"failing took {elapsed:.2f} s: {err}"
    if api == "attach":
        assert isinstance(err, LoopError), f"not a loopdev.errors type: {err!r}"
    if isinstance(err, OSError):
        assert err.errno == errno.EPERM, err
    assert any(fix in str(err) for fix in FIXES), f"the error names no fix ({FIXES}): {err}"
    _clean(image, None, before)


@pytest.mark.parametrize("api", ["attach", "compat", "cli"])
def test_no_mknod_fails_clearly(plain_image: str, api: str) -> None:
    """No /dev/loopN, no CAP_MKNOD: one error that says how to fix it, nothing bound."""
    nsrun.run(body_mknod_refused, plain_image, api, drop_mknod=True, images=[plain_image])


# --- dev_t arithmetic -------------------------------------------------------------


@pytest.mark.parametrize("part_shift", [0, 1, 4, 8])
def test_loop_devt_part_shift(part_shift: int) -> None:
    """With ``loop.max_part=M`` the minor of loopN is N << fls(M), not N."""
    from loopdev.sysfs import loop_devt

    for index in (0, 1, 7, 8, 255, 1000):
        assert loop_devt(index, part_shift=part_shift) == (7, index << part_shift)


def test_loop_devt_matches_sysfs(devices: None) -> None:
    from loopdev.sysfs import loop_devt

    checked = 0
    for name in nsrun.loop_names():
        try:
            want = nsrun.sysfs_devt(name)
        except FileNotFoundError:
            continue  # removed meanwhile
        assert loop_devt(int(name[4:])) == want, name
        checked += 1
    assert checked


# --- a refused detach leaves every node right -----------------------------------


def body_refused_detach_keeps_nodes_right(image: str) -> None:
    """Hold each partition in turn and detach: refused (DeviceBusy), and every
    partition node loopdev made still opens the partition of its name. The
    release deletes partitions one by one and adds back those deleted before
    the busy one; they come back under new minors (major 259 minors go to the
    next partition of any disk), so nodes made for the old ones would reach
    whatever disk gets those numbers next."""
    dev = loopdev.attach(image, partscan=True)
    nsrun.used(dev.name)
    try:
        for held in dev.partitions:
            fd = os.open(held.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                with pytest.raises(loopdev.DeviceBusy):
                    dev.detach()
            finally:
                os.close(fd)
            assert len(dev.partitions) == 3
            for p in dev.partitions:
                nsrun.assert_opens_as(p.path, p.name)
    finally:
        dev.detach()


def test_refused_detach_keeps_nodes_right(gpt: tuple[str, Spans]) -> None:
    image, _ = gpt
    nsrun.run(body_refused_detach_keeps_nodes_right, image, images=[image])


def body_moved_span_keeps_nodes_right(image: str) -> None:
    """compat ``set_status`` with a new size limit on a device with partscan: its
    partitions are registered again (new minors), and the nodes loopdev made
    for them in /dev follow."""
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = LoopControl()
    try:
        lo = ctl.loop_for_fd(fd, partscan=True)
        name = lo.devname
        nsrun.used(name)
        try:
            assert len(nsrun.partitions_of(name)) == 3
            lo.set_status(sizelimit=32 << 20)  # the whole file, but a new span
            after = nsrun.partitions_of(name)
            assert len(after) == 3
            for part in after:
                nsrun.assert_opens_as(f"/dev/{part}", part)
        finally:
            lo.clear_fd()
            lo.close()
    finally:
        ctl.close()
        os.close(fd)


def test_moved_span_keeps_nodes_right(gpt: tuple[str, Spans]) -> None:
    image, _ = gpt
    nsrun.run(body_moved_span_keeps_nodes_right, image, images=[image])


# --- a /dev mounted after the first attach ------------------------------------------------


def body_dev_mounted_after_first_attach(image: str) -> None:
    """attach() keeps loop-control and /dev open for the process (issue 17); a /dev
    mounted over the first one later is still served: the device opens, and its node
    is published in the /dev of the moment and removed again at detach."""
    for turn in range(2):
        before = nsrun.dev_listing()
        dev = loopdev.attach(image)
        nsrun.used(dev.name)
        try:
            nsrun.assert_opens_as(dev.path, dev.name)
        finally:
            dev.detach()
        assert nsrun.dev_listing() == before, f"turn {turn}"
        if turn == 0:
            nsrun._make_dev("bare", loop_control=True)  # a fresh /dev over the first


def test_dev_mounted_after_first_attach(plain_image: str) -> None:
    nsrun.run(body_dev_mounted_after_first_attach, plain_image, images=[plain_image])
