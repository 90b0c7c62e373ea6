"""The one idiom for loopdev's value types: frozen, slotted, typed.

Not ``dataclasses`` nor ``typing.NamedTuple`` (costly to import: see
``loopdev/__init__.py``; and a record is not a tuple).  A subclass annotates
its fields, names them in ``__match_args__`` (constructor order), and its
typed ``__init__`` stores them with one ``self._values = (...)``
(``_from_values`` for values that come whole, as from C): construction is a
single slot store, each field a read-only property over that tuple.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: see loopdev/__init__.py
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import TypeVar

    R = TypeVar("R", bound="Record")


def _getter(index: int) -> Callable[[Record], object]:
    def get(self: Record) -> object:
        return self._values[index]

    return get


def _make(cls: type[R], values: tuple[object, ...]) -> R:
    record = cls.__new__(cls)
    record._values = values
    return record


class Record:
    """Equality, hash, repr, pickling and read-only fields from ``__match_args__``."""

    __slots__ = ("_values",)
    __match_args__: tuple[str, ...] = ()
    _values: tuple[object, ...]

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        for index, field in enumerate(cls.__match_args__):
            setattr(cls, field, property(_getter(index)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, type(self)):
            return NotImplemented
        return self._values == other._values

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        fields = zip(self.__match_args__, self._values, strict=True)
        return f"{type(self).__name__}({', '.join(f'{f}={v!r}' for f, v in fields)})"

    @classmethod
    def _from_values(cls: type[R], values: tuple[object, ...]) -> R:
        """A record of ``values``, in field order, stored as they come (no copy)."""
        return _make(cls, values)

    def __reduce__(self) -> tuple[object, ...]:
        # Not type(self)(*values): a constructor may take keywords only.
        return (_make, (type(self), self._values))
