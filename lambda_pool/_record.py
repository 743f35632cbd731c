"""Plain value classes for the modules every ``create_engine`` imports.

``@dataclass`` generates and ``exec``s the source of ``__init__``, ``__repr__`` and
``__eq__`` when the class is defined: about a millisecond per class, paid at every Lambda
cold start.  These bases give the same behaviour (field-wise ``repr`` and ``==``; for
:class:`FrozenRecord` also ``hash`` and :class:`dataclasses.FrozenInstanceError` on
assignment) from ``__slots__``, with each class writing its own ``__init__``.
"""

from __future__ import annotations

from typing import Any, ClassVar, NoReturn


class Record:
    """Field-wise ``repr`` and ``==`` over the subclass's ``_fields``.

    A subclass declares ``__slots__ = _fields = (...)``, the fields in declaration order
    (the order of ``repr``, as a dataclass's).
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{type(self).__qualname__}({fields})"

    def __reduce__(self) -> tuple[type[Record], tuple[Any, ...]]:
        # copy, deepcopy and pickle rebuild through __init__ (which takes the fields in
        # order): setting slots one by one would trip a FrozenRecord's guard.
        return type(self), self._values()

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        assert isinstance(other, Record)
        return self._values() == other._values()

    # No __hash__ here: defining __eq__ alone makes the class unhashable, as a mutable
    # dataclass with eq=True.


class FrozenRecord(Record):
    """A :class:`Record` that cannot be changed after ``__init__`` (and so is hashable).

    ``__init__`` sets its fields with ``object.__setattr__``.
    """

    __slots__ = ()

    def __hash__(self) -> int:
        return hash(self._values())

    def __setattr__(self, name: str, value: object) -> NoReturn:
        import dataclasses  # only on this misuse: not every importer has it loaded

        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> NoReturn:
        import dataclasses

        raise dataclasses.FrozenInstanceError(f"cannot delete field {name!r}")
