"""Behaviours no other test pinned down, found by putting small bugs in by hand (issue 19).

- an attach that had to wait (retrying a device another process holds with
  O_EXCL) gives the calling thread its signal mask back exactly as it was;
- a signal whose handler returns, arriving (twice) during that wait, runs
  the handler and the attach still succeeds;
- the C private-node path makes the node with the caller's ``part_shift``;
- detach leaves a node in ``node_dir`` that someone replaced since (another
  device's node, a file) where it is;
- ``--nooverlap`` takes a range that only touches a device's range (either
  side) as free, not as overlapping.
"""

from __future__ import annotations

import json
import os
import select
import signal
import stat
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helpers
import pytest
from helpers import bound_under, poll
from helpers import run_cli as run
from images import gpt_image, make_image

import loopdev
from loopdev import _native

MiB = 1 << 20


# --- the wait for the loop-control lock ------------------------------------------------


def _attach_while_held(
    image: Path,
    body: str,
    during: Callable[[subprocess.Popen[str], subprocess.Popen[str]], None],
    hold: str = "0.6",
) -> dict[str, Any]:
    """Run a child that attaches ``image`` while another holds the next free minor with
    O_EXCL (for ``hold`` seconds, or with "stdin" until told on its stdin): LOOP_CONFIGURE
    answers EBUSY, and the attach loop retries with naps (signals blocked between them)
    until the holder lets go. ``during(child, holder)`` runs here meanwhile. ``body``
    gets ``attach()`` (returning the device) and prints its JSON with ``out`` as its
    last line; the result has ``held``, the minor that was held."""
    child = textwrap.dedent(
        """
        import json, os, signal, sys, time
        import loopdev
        def out(**kw):
            print(json.dumps(kw), flush=True)
        def attach():
            print("ready", flush=True)
            return loopdev.attach(sys.argv[1])
        """
    ) + textwrap.dedent(body)
    holder = helpers.child("hold_exclusive", hold)
    proc = None
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline().split()
        assert line, holder.stderr.read() if holder.stderr else ""
        proc = subprocess.Popen(
            [sys.executable, "-c", child, str(image)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready", proc.communicate()
        during(proc, holder)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr
        return {**json.loads(stdout.splitlines()[-1]), "held": int(line[0])}
    finally:
        helpers.reap(holder)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def test_signal_mask_is_restored_after_waiting_for_a_busy_device(
    tmp_path: Path, devices: None
) -> None:
    """The retries block signals between naps; afterwards the thread's mask is the one it
    had (SIGUSR2 blocked by the caller stays blocked, nothing else is)."""
    image = make_image(tmp_path / "mask.img")
    got = _attach_while_held(
        image,
        """
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])
        before = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        started = time.monotonic()
        dev = attach()
        waited = time.monotonic() - started
        after = sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))
        minor = dev.index
        dev.detach()
        out(before=before, after=after, waited=waited, minor=minor)
        """,
        lambda proc, holder: None,
    )
    assert got["before"] == [int(signal.SIGUSR2)]
    assert got["after"] == got["before"]
    if got["minor"] == got["held"]:  # else another process took it meanwhile
        assert got["waited"] > 0.1  # it did wait


def _napping(pid: int) -> bool:
    """Whether ``pid`` sleeps in poll: the attach loop's backoff nap (ppoll), the only
    place the child sleeps in poll. From its first nap on the loop blocks signals
    between naps, so a signal sent now interrupts this nap or the next one."""
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return "poll" in f.read()
    except OSError:
        return False


def _read_line(fd: int, timeout: float) -> str:
    """A line the child wrote (one write each); "" at EOF or when none came in time."""
    got = b""
    while not got.endswith(b"\n") and select.select([fd], [], [], timeout)[0]:
        chunk = os.read(fd, 1)
        if not chunk:
            break
        got += chunk
    return got.decode()


def _two_signals(proc: subprocess.Popen[str], holder: subprocess.Popen[str]) -> None:
    """Twice: wait until the attach naps between retries, send SIGUSR1 and wait for its
    handler to say so on stdout; then let the holder go (the child ends when its stdin
    closes). Not sooner: a signal before the loop's first nap would be handled before
    the attach began, or taken by Python's C-level handler during the first immediate
    tries (signals not blocked yet) with its Python handler run only once the attach
    returned; under load that window is long (the test failed so)."""
    assert proc.stdout is not None and holder.stdin is not None
    fd = proc.stdout.fileno()  # read raw: select() must see what is not read yet

    def done() -> bool:
        return bool(select.select([fd], [], [], 0)[0])

    def napping_or_done() -> bool:
        return _napping(proc.pid) or done()

    try:
        for _ in range(2):
            assert poll(napping_or_done, 30), "the attach never napped"
            # Not "not napping now": between two naps (a retry) the child is not in
            # poll either, and a signal then is let in at the next nap. Only output
            # says it attached without waiting (another minor was freed meanwhile).
            if done():
                break
            proc.send_signal(signal.SIGUSR1)
            assert _read_line(fd, 30) == "handled\n", "the handler did not run"
    finally:
        holder.stdin.write("go\n")  # the holder lets go: the attach succeeds
        holder.stdin.flush()


def test_signal_whose_handler_returns_does_not_end_the_attach(
    tmp_path: Path, devices: None
) -> None:
    """SIGUSR1 twice during the retries: the handler runs each time, the attach goes on
    and then succeeds (the call is retried after EINTR, every time).

    Each signal is sent while the attach naps, and the holder keeps the minor until
    both handlers have run, however slowly this machine runs. Where the attach got
    another minor (another process freed a lower one meanwhile) it may have ended
    before: such a run proves nothing and is repeated."""
    image = make_image(tmp_path / "usr1.img")
    for _ in range(5):
        got = _attach_while_held(
            image,
            """
            seen = []
            def handler(signum, frame):
                seen.append(signum)
                print("handled", flush=True)
            signal.signal(signal.SIGUSR1, handler)
            dev = attach()
            print("attached", flush=True)
            name = dev.name
            bound = open(f"/sys/block/{name}/loop/backing_file").read().strip()
            minor = dev.index
            dev.detach()
            sys.stdin.read()  # alive until the parent is done with signals
            out(seen=len(seen), bound=bound, minor=minor)
            """,
            _two_signals,
            hold="stdin",
        )
        assert got["bound"] == str(image)
        if got["minor"] == got["held"]:  # held until both handlers had run
            assert got["seen"] == 2, got
            break
    else:
        pytest.fail(f"another process freed a lower minor during each of 5 attaches: {got}")
    assert bound_under(tmp_path) == []


# --- the C private-node path ------------------------------------------------------------


def test_private_node_has_the_part_shift_given(tmp_path: Path, devices: None) -> None:
    """``ld_open_private`` makes ``7:(index << part_shift)``: with max_part=0 on this
    machine the attach path never passes a non-zero shift, so call it directly.
    Devices that exist are opened (unbound ones open fine), so no minor is added."""
    present = {n for n in os.listdir("/sys/block") if n.startswith("loop")}
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    tried = []
    try:
        for shift in (1, 2, 3, 4):
            for index in (1, 2, 3):
                if f"loop{index}" not in present or f"loop{index << shift}" not in present:
                    continue
                tried.append((index, shift))
                try:
                    fd = _native.open_private(dir_fd, index, shift)
                except OSError:
                    continue  # in rundown or removed meanwhile: another one
                try:
                    st = os.fstat(fd)
                finally:
                    os.close(fd)
                assert stat.S_ISBLK(st.st_mode)
                assert st.st_rdev == os.makedev(7, index << shift), (index, shift)
                assert os.listdir(tmp_path) == []  # node and its directory are gone
                return
    finally:
        os.close(dir_fd)
    pytest.skip(f"no loop device pair index/index<<shift to open here (tried {tried})")


# --- nodes someone replaced -------------------------------------------------------------


def test_detach_leaves_replaced_nodes_alone(tmp_path: Path, devices: None) -> None:
    """Nodes made in ``node_dir``, then replaced by a node of another device, a regular
    file, and nothing (removed): detach removes none of the replacements, and does not
    mind the one that is gone."""
    image = gpt_image(tmp_path / "parts.img")
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    dev = loopdev.attach(image, partscan=True, node_dir=node_dir)
    try:
        names = sorted(dev.nodes)
        assert names == [dev.name, f"{dev.name}p1", f"{dev.name}p2"]
        whole, p1, p2 = (node_dir / n for n in names)
        for path in (whole, p1, p2):
            path.unlink()
        other = os.makedev(7, (1 << 20) - 2)  # a loop minor nobody has
        os.mknod(whole, stat.S_IFBLK | 0o600, other)
        p1.write_bytes(b"not a node")
    finally:
        dev.detach()
    assert stat.S_ISBLK(os.stat(whole).st_mode) and os.stat(whole).st_rdev == other
    assert p1.read_bytes() == b"not a node"
    assert sorted(os.listdir(node_dir)) == [whole.name, p1.name]


def test_detach_removes_the_nodes_it_made(tmp_path: Path, devices: None) -> None:
    """The counterpart: nodes still as made are removed (the check above is not a no-op)."""
    image = gpt_image(tmp_path / "parts.img")
    node_dir = tmp_path / "nodes"
    node_dir.mkdir()
    dev = loopdev.attach(image, partscan=True, node_dir=node_dir)
    assert len(os.listdir(node_dir)) == 3
    dev.detach()
    assert os.listdir(node_dir) == []


# --- --nooverlap at the edges of a range -------------------------------------------------


@pytest.fixture
def mine(tmp_path: Path, devices: None) -> Iterator[Path]:
    """``tmp_path``; every device bound below it is detached afterwards, pass or fail."""
    yield tmp_path
    from loopdev.device import open_device

    for name in bound_under(tmp_path):
        try:
            open_device(name, owned=True).detach()
        except OSError:
            pass
    poll(lambda: not bound_under(tmp_path), 10)


def _attach(*args: str) -> str:
    res = run("attach", "--show", *args)
    assert res.returncode == 0, (args, res.stderr)
    return res.stdout.strip()


def test_nooverlap_range_starting_where_a_device_ends(mine: Path) -> None:
    """A device covers exactly [0, 4096); ``-o 4096`` touches it but does not overlap."""
    img = make_image(mine / "after.img", 1 * MiB)
    first = _attach("--sizelimit", "4096", str(img))
    second = _attach("--nooverlap", "-o", "4096", str(img))
    assert second != first
    assert sorted(bound_under(mine)) == sorted(os.path.basename(d) for d in (first, second))


def test_nooverlap_range_ending_where_a_device_starts(mine: Path) -> None:
    """A device covers [8192, end); ``--sizelimit 8192`` from 0 ends where it starts."""
    img = make_image(mine / "before.img", 1 * MiB)
    first = _attach("-o", "8192", str(img))
    second = _attach("--nooverlap", "--sizelimit", "8192", str(img))
    assert second != first
    assert len(bound_under(mine)) == 2
    # One byte more on either side overlaps: refused.
    res = run("attach", "--nooverlap", "--show", "--sizelimit", "8704", str(img))
    assert res.returncode == 1 and "overlapping" in res.stderr
