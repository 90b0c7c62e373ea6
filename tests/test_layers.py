"""The package's layers, read from the source (no devices).

- no module imports a module above it: from the bottom, the binding and what
  it stands on, the engine, the faces (with the broker's client side), the
  CLI, the broker, and ``__main__``. The program (``_loopdev_main``, outside
  the package, above it all) hands ``serve`` to the broker. Every import
  counts: inside functions and under TYPE_CHECKING too;
- mypy's ``disallow_any_expr`` covers every module but the binding
  (``_native``, whose cffi values are ``Any``).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "loopdev"

LAYERS = [
    {"_loopdev_ffi", "_native", "_record", "errors", "parttable", "sysfs"},
    {"_engine", "nodes", "partitions"},
    {"__init__", "compat", "device", "broker_client", "_interface", "_varlink"},
    {"cli", "losetup", "_clidoc"},
    {"broker", "_broker_grant", "_broker_ledger", "_broker_methods", "_broker_pool"},
    {"__main__"},
]
LEVEL = {module: level for level, layer in enumerate(LAYERS) for module in layer}
MODULES = sorted(path.stem for path in SRC.glob("*.py"))


def imported(module: str) -> set[str]:
    """The package's modules that ``module`` imports (``__init__``: the package itself)."""
    found = set()
    for node in ast.walk(ast.parse((SRC / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: a relative import"
            # from loopdev import X: X is a module, or a name of the package.
            if node.module == "loopdev":
                found |= {a.name if a.name in LEVEL else "__init__" for a in node.names}
                continue
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "loopdev":
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found - {module}


def test_every_module_has_a_layer() -> None:
    assert set(MODULES) - LEVEL.keys() == set()


def test_no_module_imports_a_module_above_it() -> None:
    upward = [
        f"{module} (layer {LEVEL[module]}) imports {target} (layer {LEVEL[target]})"
        for module in MODULES
        for target in sorted(imported(module))
        if LEVEL[target] > LEVEL[module]
    ]
    assert upward == []


def test_the_check_sees_imports_inside_functions() -> None:
    # cli imports the faces only where a command runs them.
    assert {"device", "broker_client"} <= imported("cli")


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is 3.11's")
def test_no_any_outside_the_binding() -> None:
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]
    strict = {
        name
        for override in config["overrides"]
        if override.get("disallow_any_expr")
        for name in override["module"]
    }
    wanted = {"loopdev" if m == "__init__" else f"loopdev.{m}" for m in MODULES}
    wanted.add("_loopdev_main")  # the program, outside the package
    assert strict == wanted - {"loopdev._native"}


def test_the_cli_leaves_serve_to_the_program(capsys: pytest.CaptureFixture[str]) -> None:
    """``serve`` runs through the program (``_loopdev_main``: ``loopdev serve``,
    ``python -m loopdev serve``); the CLI alone says where, without importing the
    broker."""
    from loopdev import cli

    assert cli.main(["serve", "--socket", "/nonexistent/x.sock"]) == 1
    assert "python -m loopdev serve" in capsys.readouterr().err
    # As the CHANGELOG says: whoever embeds the CLI hands serve to the broker.
    got: list[str | None] = []
    assert (
        cli.main(["serve", "--socket", "/x.sock"], serve=lambda a: got.append(a.socket) or 7) == 7
    )
    assert got == ["/x.sock"]
