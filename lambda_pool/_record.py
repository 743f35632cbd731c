"""Plain value classes for the modules every ``create_engine`` imports.

``@dataclass`` generates and ``exec``s the source of ``__init__``, ``__repr__`` and
``__eq__`` when the class is defined: about a millisecond per class, paid at every Lambda
cold start.  These bases give the same behaviour (field-wise ``repr`` and ``==``; for
:class:`FrozenRecord` also ``hash`` and :class:`dataclasses.FrozenInstanceError` on
assignment) from ``__slots__``, with each class writing its own ``__init__``.
:class:`Constant` does the same for ``enum.Enum``: building an enum class costs about
0.1 ms at import, and reading a member (``Op.CLOSE``) goes through the enum's
descriptor on every step of a procedure.  :class:`StaticGeneric` does it for
``typing.Generic``, whose subscripted bases (``Base["Engine"]`` compiles the string)
cost about 0.1 ms per class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

__all__ = ["Constant", "FrozenRecord", "Record", "StaticGeneric"]


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


class Constant:
    """A member of a closed set of named constants, as an ``enum.Enum`` member.

    A subclass declares its members as ``NAME: ClassVar[Sub]`` and makes them with
    :meth:`_define`, right after the class.  A member has ``name`` and ``value``,
    compares and hashes by identity, prints as ``<Sub.NAME: 'value'>``, and copies and
    pickles as itself; reading one (``Sub.NAME``) is a plain class attribute lookup.
    """

    __slots__ = ("name", "value")

    name: str
    value: Any

    def __init__(self, name: str, value: Any) -> None:
        self.name = name
        self.value = value

    @classmethod
    def _define(cls, **members: Any) -> None:
        """Make each ``NAME=value`` a member: the class attribute ``cls.NAME``."""
        for name, value in members.items():
            setattr(cls, name, cls(name, value))

    def __repr__(self) -> str:
        return f"<{type(self).__qualname__}.{self.name}: {self.value!r}>"

    def __reduce__(self) -> tuple[Any, tuple[type[Constant], str]]:
        # copy, deepcopy and pickle give back the member itself (identity is equality).
        return getattr, (type(self), self.name)


if TYPE_CHECKING:
    from typing import Generic as StaticGeneric
else:

    class StaticGeneric:
        """``typing.Generic`` for type checkers, nothing at run time.

        ``class Box(StaticGeneric[T])`` is ``Generic[T]`` to a type checker; at run time
        ``StaticGeneric[T]`` and ``Box[int]`` are the classes themselves, so defining a
        generic class or subclassing ``Box[int]`` builds no ``typing`` alias.  (No
        ``__parameters__`` or ``__orig_bases__`` at run time: nothing here reads them.)
        """

        __slots__ = ()

        def __class_getitem__(cls, params: Any) -> Any:
            return cls
