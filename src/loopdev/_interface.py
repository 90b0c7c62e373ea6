"""The io.loopdev Varlink interface, from its one definition: ``io.loopdev.varlink``.

Both sides of the broker take from here: the server its method schemas and
the text it describes itself with; both the error names and the
``loopdev.errors`` class each one stands for.
"""

from __future__ import annotations

import errno
import re
from pathlib import Path

from loopdev import _varlink
from loopdev.errors import (
    BackingFileError,
    ConfigureError,
    DeviceBusy,
    LoopError,
    NoFreeDevice,
    PartitionTableError,
    UnsupportedByKernel,
    WriteBackError,
)

NAME = "io.loopdev"
TEXT = Path(__file__).with_name("io.loopdev.varlink").read_text()

_SCALARS = ("int", "bool", "string", "float")  # what _varlink.check_parameters knows


def _declarations(text: str) -> str:
    return "\n".join(line.partition("#")[0] for line in text.splitlines())


def _schema(method: str, fields: str) -> _varlink.Schema:
    schema: dict[str, tuple[str, bool]] = {}
    for field in filter(None, (f.strip() for f in fields.split(","))):
        name, _, kind = (part.strip() for part in field.partition(":"))
        if kind.lstrip("?") not in _SCALARS:
            raise ValueError(f"{method}: parameter {name!r} of type {kind!r} is not a scalar")
        schema[name] = (kind.lstrip("?"), kind.startswith("?"))
    return schema


_DECLARED = _declarations(TEXT)
_METHODS: list[tuple[str, str]] = re.findall(r"\bmethod\s+(\w+)\s*\(([^)]*)\)", _DECLARED)
_ERRORS: list[str] = re.findall(r"\berror\s+(\w+)", _DECLARED)
# Each method's input parameters: {"io.loopdev.Attach": {"file": ("int", False), ...}}.
METHODS: dict[str, _varlink.Schema] = {
    f"{NAME}.{method}": _schema(method, fields) for method, fields in _METHODS
}
ERRORS = frozenset(f"{NAME}.{error}" for error in _ERRORS)

# The errors that are loopdev.errors classes, most specific first: the first
# class an exception is an instance of names its error.
LOOP_ERRORS: dict[str, type[LoopError]] = {
    f"{NAME}.{cls.__name__}": cls
    for cls in (
        WriteBackError,
        BackingFileError,
        ConfigureError,
        NoFreeDevice,
        DeviceBusy,
        PartitionTableError,
        UnsupportedByKernel,
        LoopError,
    )
}


def error_name(exc: OSError) -> str:
    """The Varlink error for a ``loopdev.errors`` exception (``LoopError`` for others)."""
    return next(name for name, cls in LOOP_ERRORS.items() if isinstance(exc, cls))


def loop_error(name: str, params: _varlink.JsonObject) -> LoopError | None:
    """The exception a loop error reply stands for; None if ``name`` is none of them."""
    cls = LOOP_ERRORS.get(name)
    if cls is None:
        return None
    message, device, backing = (params.get(k) for k in ("message", "device", "backing"))
    text = message if isinstance(message, str) else name
    device = device if isinstance(device, str) else None
    backing = backing if isinstance(backing, str) else None
    if cls is PartitionTableError:
        return PartitionTableError(text, device=device, backing=backing)
    err = params.get("errno")
    code = err if type(err) is int and err > 0 else errno.EIO
    return cls(code, text, device=device, backing=backing)


class Refusal(Exception):
    """A request answered with a Varlink error (``error``, with ``parameters``)."""

    def __init__(self, error: str, **parameters: object) -> None:
        super().__init__(error)
        self.error = error
        self.parameters = parameters

    @classmethod
    def of(cls, exc: OSError) -> Refusal:
        """The error reply for an ``OSError`` (a ``loopdev.errors`` class keeps its name)."""
        return cls(
            error_name(exc) if isinstance(exc, LoopError) else f"{NAME}.LoopError",
            errno=exc.errno or 0,
            message=exc.strerror or str(exc),
            device=exc.device if isinstance(exc, LoopError) else None,
            backing=exc.backing if isinstance(exc, LoopError) else None,
        )

    def reply(self) -> _varlink.JsonObject:
        return {"error": self.error, "parameters": self.parameters}
