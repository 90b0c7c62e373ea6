"""The per-test leak check (conftest ``_no_leaked_devices``) on real devices.

A device bound from a private mount namespace shows that namespace's path in sysfs
(``/x.img``), so matching paths by ``tmp_path`` misses it: the check must still see
it, and must not blame devices that other processes bind meanwhile.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from helpers import (
    MOUNT,
    UNSHARE,
    Binding,
    binding_of,
    bindings,
    child_argv,
    in_private_mount,
    leaked_devices,
    poll,
    register_backing,
    release,
)
from images import make_image


def _bind_in_namespace(mount: list[str], target: Path, path: Path, name: str) -> dict[str, int]:
    """In a private mount namespace: ``mount MOUNT... TARGET``, then bind ``path`` without
    autoclear under the recorded name ``name``, and exit (the namespace goes with it)."""
    if UNSHARE is None or MOUNT is None:
        pytest.skip("unshare/mount (util-linux) not installed")
    out = in_private_mount(mount, target, child_argv("raw_bind", str(path), name, "make"))
    if out.returncode != 0 or not out.stdout.strip():
        pytest.skip(f"no private mount namespace here: {out.stderr.strip()}")
    result: dict[str, int] = json.loads(out.stdout)
    return {"minor": result["minor"], "dev": result["backing"][0], "ino": result["backing"][1]}


# How the bound file is known to be the test's, though sysfs shows "/x.img":
#   registered:    on a tmpfs only the child saw; the test registers its dev/ino;
#   recorded-name: on such a tmpfs mounted below tmp_path, bound under its path there
#                  (the shape of the ramfs case of test_bad_input_matrix);
#   inode:         a file below tmp_path, reached through a bind mount in the namespace.
@pytest.mark.parametrize("how", ["registered", "recorded-name", "inode"])
def test_sees_a_device_bound_from_a_private_namespace(
    tmp_path: Path, devices: None, how: str
) -> None:
    view = tmp_path / "view"
    view.mkdir()
    before = bindings()
    if how == "inode":
        data = tmp_path / "data"
        data.mkdir()
        bound = _bind_in_namespace(["--bind", str(data)], view, view / "x.img", "/x.img")
    else:
        name = str(view / "x.img") if how == "recorded-name" else "/x.img"
        bound = _bind_in_namespace(["-t", "tmpfs", "tmpfs"], view, view / "x.img", name)
    device = f"loop{bound['minor']}"
    binding = binding_of(device)
    assert binding is not None
    try:
        assert binding.backing == b"/x.img"  # sysfs says nothing about tmp_path
        if how == "registered":
            register_backing((bound["dev"], bound["ino"]))
        assert leaked_devices(before, tmp_path, timeout=0.2) == {device: binding}
    finally:
        release({device: binding})
    assert poll(lambda: binding_of(device) != binding, 3.0)


def test_ignores_devices_other_processes_bind(tmp_path: Path, devices: None) -> None:
    """Bound meanwhile, still bound, but not the test's: a file elsewhere (recorded under
    its own path), and a file on a tmpfs of another namespace that nobody registered."""
    view = tmp_path / "view"
    view.mkdir()
    elsewhere = Path(tempfile.mkdtemp(prefix="loopdev-leak-check."))
    before = bindings()
    theirs: dict[str, Binding] = {}

    def bound(minor: int) -> None:
        binding = binding_of(f"loop{minor}")
        assert binding is not None
        theirs[f"loop{minor}"] = binding

    try:
        other = make_image(elsewhere / "other.img")
        out = subprocess.run(
            child_argv("raw_bind", str(other), str(other)),
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        bound(json.loads(out.stdout)["minor"])
        hidden = _bind_in_namespace(["-t", "tmpfs", "tmpfs"], view, view / "x.img", "/x.img")
        bound(hidden["minor"])
        assert leaked_devices(before, tmp_path, timeout=0.2) == {}
    finally:
        release(theirs)
        shutil.rmtree(elsewhere, ignore_errors=True)
    assert poll(lambda: all(binding_of(n) != b for n, b in theirs.items()), 3.0)
