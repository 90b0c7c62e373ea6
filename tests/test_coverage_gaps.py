"""Paths of the engine, the node code and the C attach loop that no other test took,
found with the coverage pass (.ci/coverage, issue 19):

- ``lock=True`` passes over a free device another process holds locked;
- a wrong ``loopN`` node in a caller's directory is ``UnexpectedDevice``;
- loop-control that may not be opened is ``ControlDenied``, naming the broker;
- in a container, a device is opened by name, and found by its file, where
  its node is missing or wrong (through a private node); a read-only /dev
  gets no nodes, and a device is opened through a node in a scratch
  directory there;
- a table refused after the bind undoes the attach: compat ``loop_for_fd``
  with ``setup`` (the hooks) and compat ``configure``;
- without CAP_MKNOD: ``attach(node_dir=)`` fails with ``DeviceNodeError`` and
  leaves nothing bound; compat ``Loop.mknod`` bind-mounts the host's node, and
  refuses where that node is not the device.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import brokerlib
import nsrun
import pytest
from helpers import bound_under, poll, wait_unbound
from images import SFDISK, make_image

import loopdev
from loopdev import Loop, LoopControl, _engine, _native
from loopdev.errors import PartitionTableError, UnexpectedDevice


def test_lock_passes_over_a_free_device_someone_holds_locked(tmp_path: Path, devices: None) -> None:
    """The device GET_FREE names is flock()ed by another holder (as systemd does while it
    sets one up): ``lock=True`` takes another one (LOOP_CTL_ADD: one more minor)."""
    image = make_image(tmp_path / "locked.img")
    ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
    try:
        index = fcntl.ioctl(ctl, _native.LOOP_CTL_GET_FREE)
    finally:
        os.close(ctl)
    held = os.open(f"/dev/loop{index}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with loopdev.attach(image, lock=True) as dev:
            assert dev.index != index
            assert bound_under(tmp_path) == [dev.name]
    finally:
        os.close(held)


def test_wrong_node_in_a_callers_directory_is_unexpected_device(
    tmp_path: Path, devices: None
) -> None:
    """compat ``LoopControl(dir_fd)``: the directory's ``loopN`` is /dev/null's numbers.
    Not passed by (that is for /dev only): ``UnexpectedDevice``, nothing bound."""
    private = tmp_path / "dev"
    private.mkdir()
    with open("/sys/class/misc/loop-control/dev") as f:
        major, minor = (int(x) for x in f.read().split(":"))
    os.mknod(private / "loop-control", stat.S_IFCHR | 0o600, os.makedev(major, minor))
    present = [int(n[4:]) for n in os.listdir("/sys/block") if n[4:].isdigit()]
    for i in range(max(present, default=0) + 64):  # whatever GET_FREE names
        os.mknod(private / f"loop{i}", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    image = make_image(tmp_path / "wrong.img")
    dir_fd = os.open(private, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = LoopControl(dir_fd)
    try:
        with pytest.raises(UnexpectedDevice) as exc:
            ctl.loop_for_fd(fd, autoclear=True)
        assert exc.value.errno == errno.ENODEV, exc.value
    finally:
        ctl.close()
        os.close(fd)
        os.close(dir_fd)
    assert wait_unbound(tmp_path) == []


def test_control_denied_names_the_broker(devices: None) -> None:
    brokerlib.require_unprivileged()
    got = brokerlib.as_user(
        """
from loopdev import LoopControl
from loopdev.errors import ControlDenied
try:
    LoopControl()
except ControlDenied as exc:
    out(errno=exc.errno, message=str(exc), permission=isinstance(exc, PermissionError))
"""
    )
    assert len(got) == 1, got
    assert got[0]["errno"] == errno.EACCES and got[0]["permission"] is True
    assert "broker" in got[0]["message"] and "loop-control" in got[0]["message"]


# --- in a container (nsrun: a private mount namespace with a tmpfs /dev) ---------------

LOSETUP = nsrun.LOSETUP
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 0x1, 0x2, 0x4, 0x20, 0x1000


def body_open_by_name_and_read_only_dev(image: str) -> list[str]:
    dev = loopdev.attach(image)
    nsrun.used(dev.name)
    path = f"/dev/{dev.name}"
    want = os.stat(path).st_rdev
    opened = []
    try:
        os.unlink(path)  # no node: reached through a private one
        other = loopdev.open(dev.index)
        opened.append(os.fstat(other.fd).st_rdev == want)
        other.close()
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # a wrong node: the same
        other = loopdev.open(dev.index)
        opened.append(os.fstat(other.fd).st_rdev == want)
        other.close()
        os.unlink(path)
        assert [d.name for d in loopdev.find(image)] == [dev.name]  # read-only, private
        assert opened == [True, True]
        # A read-only /dev: no node, a warning, no error.
        records: list[logging.LogRecord] = []
        handler = logging.Handler()
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger("loopdev").addHandler(handler)
        # A read-only bind mount over it (our device fd keeps the tmpfs itself busy).
        nsrun._mount("/dev", "/dev", "", MS_BIND, "")
        try:
            nsrun._mount("none", "/dev", "", MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID, "")
            _engine.publish_nodes(dev.index, _native.Config(flags=_engine.flags(0, 1, 0)))
            # Opened by number all the same: a private node in a scratch directory.
            other = loopdev.open(dev.index)
            opened.append(os.fstat(other.fd).st_rdev == want)
            other.close()
            assert [d.name for d in loopdev.find(image)] == [dev.name]
        finally:
            _native.unmount("/dev")
        assert not os.path.lexists(path)
        assert opened == [True, True, True]
        return [r.getMessage() for r in records]
    finally:
        dev.detach()


def test_container_opens_by_name_without_a_right_node_and_survives_read_only_dev(
    tmp_path: Path, devices: None
) -> None:
    if nsrun.UNSHARE is None:
        pytest.skip("unshare (util-linux) not installed")
    image = make_image(tmp_path / "ns.img")
    messages = nsrun.run(body_open_by_name_and_read_only_dev, str(image), images=[image])
    assert any("read-only" in m for m in messages), messages


def test_without_cap_mknod(tmp_path: Path, devices: None) -> None:
    """In a private mount namespace (host /dev) without CAP_MKNOD: private nodes for
    ``attach(node_dir=)`` cannot be made (DeviceNodeError, nothing bound); compat
    ``Loop.mknod`` bind-mounts /dev/loopN instead, and refuses a node that is not it."""
    if nsrun.UNSHARE is None or nsrun.SETPRIV is None:
        pytest.skip("unshare/setpriv (util-linux) not installed")
    image = make_image(tmp_path / "nomknod.img")
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    code = textwrap.dedent(
        """
        import json, os, stat, sys
        import loopdev
        from loopdev import LoopControl, nodes
        from loopdev.errors import DeviceNodeError
        image, node_dir = sys.argv[1:3]
        res = {}
        try:
            loopdev.attach(image, node_dir=node_dir).detach()
        except DeviceNodeError as exc:
            res["attach"] = [exc.errno, "CAP_MKNOD" in str(exc)]
        ctl = LoopControl()
        fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
        lo = ctl.loop_for_fd(fd, autoclear=True)
        dfd = os.open(node_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        name = f"loop{lo.minor}"
        lo.mknod(dfd)
        st = os.stat(os.path.join(node_dir, name))
        res["mirrored"] = stat.S_ISBLK(st.st_mode) and st.st_rdev == os.stat(f"/dev/{name}").st_rdev
        try:  # /dev/loopN is not the device asked for: no bind mount of it
            nodes._bind_host_node(dfd, name, (7, (1 << 20) - 2))
        except DeviceNodeError as exc:
            res["refused"] = exc.errno
        try:
            os.mknod(os.path.join(node_dir, "probe"), stat.S_IFBLK, os.makedev(7, 0))
        except PermissionError:
            res["no_mknod"] = True
        lo.close()
        os.close(fd)
        ctl.close()
        print(json.dumps(res))
        """
    )
    argv = [nsrun.UNSHARE, "-m", "--propagation", "private", nsrun.SETPRIV]
    argv += ["--inh-caps=-mknod", "--bounding-set=-mknod", sys.executable, "-c", code]
    done = subprocess.run(
        [*argv, str(image), str(node_dir)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got == {
        "attach": [errno.EPERM, True],
        "mirrored": True,
        "refused": errno.EPERM,
        "no_mknod": True,
    }
    assert wait_unbound(tmp_path) == []


def test_refused_table_after_the_bind_undoes_compat_attach_and_configure(
    tmp_path: Path, devices: None
) -> None:
    """A GPT written for 4096-byte sectors, attached with blocksize=512 and partscan:
    refused once the device is bound; the device is let go (through the hooks of
    ``loop_for_fd(setup=)``, or by ``Loop.configure`` itself), nothing stays bound."""
    if SFDISK is None:
        pytest.skip("sfdisk (util-linux) not installed")
    image = make_image(tmp_path / "gpt4k.img", 16 << 20)
    with loopdev.attach(image, block_size=4096) as dev:  # sfdisk 2.38 has no --sector-size
        script = "label: gpt\nsize=4M\n"
        subprocess.run([SFDISK, "-q", dev.path], input=script, text=True, check=True)
    assert wait_unbound(tmp_path) == []
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    ctl = LoopControl()
    seen: list[int] = []
    try:
        with pytest.raises(PartitionTableError):
            ctl.loop_for_fd(
                fd,
                setup=lambda lo: seen.append(lo.minor),
                partscan=True,
                blocksize=512,
                autoclear=True,
            )
        assert seen and wait_unbound(tmp_path) == []
        lo = Loop(ctl.get_unbound())
        try:
            with pytest.raises(PartitionTableError):
                lo.configure(fd, partscan=True, blocksize=512, autoclear=True)
        finally:
            lo.close()
        assert wait_unbound(tmp_path) == []
    finally:
        ctl.close()
        os.close(fd)


def test_attach_passes_over_a_free_device_whose_stale_partition_is_open(
    tmp_path: Path, devices: None
) -> None:
    """A partition added with BLKPG outlives ``losetup -d`` (no partscan); opened then, it
    cannot be deleted, so its free device cannot be used: attach takes another one."""
    if LOSETUP is None:
        pytest.skip("losetup (util-linux) not installed")
    image = make_image(tmp_path / "stale.img", 4 << 20)
    fresh = make_image(tmp_path / "fresh.img")
    done = subprocess.run(
        [LOSETUP, "-f", "--show", str(image)], capture_output=True, text=True, check=True
    )
    dev = done.stdout.strip()
    index = int(dev.removeprefix("/dev/loop"))
    holder = -1
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            _native.blkpg(fd, _native.BLKPG_ADD_PARTITION, 1, 1 << 20, 1 << 20, device=dev)
        finally:
            os.close(fd)
        subprocess.run([LOSETUP, "-d", dev], check=True)
        assert wait_unbound(tmp_path) == []
        # Opened once the device is free (held open, it would not have been released).
        poll(lambda: os.path.exists(f"{dev}p1"), 5)
        holder = os.open(f"{dev}p1", os.O_RDONLY | os.O_CLOEXEC)
        with loopdev.attach(fresh) as got:
            assert got.index != index
    finally:
        if holder >= 0:
            os.close(holder)
        fd = os.open(dev, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _native.delete_partitions(fd, index)
        finally:
            os.close(fd)
    assert not os.path.exists(f"/sys/block/loop{index}/loop{index}p1")


def test_place_node_replaces_a_node_of_no_device_and_refuses_a_file(
    tmp_path: Path, devices: None
) -> None:
    """In the way of a node to make: a block node of loop numbers no device has is
    loopdev's kind (replaced); a regular file is not (``DeviceNodeError`` EEXIST, kept)."""
    from loopdev import nodes
    from loopdev.errors import DeviceNodeError

    dir_fd = os.open(tmp_path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    want = os.stat("/dev/loop-control").st_rdev  # any numbers: nothing opens the node
    want_devt = (os.major(want), os.minor(want))
    try:
        os.mknod(tmp_path / "stale", stat.S_IFBLK | 0o600, os.makedev(7, (1 << 20) - 2))
        assert nodes.place_node(dir_fd, "stale", want_devt, 0o640, where=str(tmp_path))
        st = os.stat(tmp_path / "stale")
        assert stat.S_ISBLK(st.st_mode) and st.st_rdev == want
        assert stat.S_IMODE(st.st_mode) == 0o640
        (tmp_path / "file").write_text("mine")
        with pytest.raises(DeviceNodeError) as exc:
            nodes.place_node(dir_fd, "file", want_devt, where=str(tmp_path))
        assert exc.value.errno == errno.EEXIST and "in the way" in str(exc.value)
        assert (tmp_path / "file").read_text() == "mine"
    finally:
        os.close(dir_fd)
