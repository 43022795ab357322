"""Enumerations for the boot path without the ``enum`` module.

``import enum`` (with the functools and collections it pulls in) is the largest
single import of the init, and ``socket``/``signal`` would pull it in again; the
boot path uses ``_socket``/``_signal`` and these classes instead. Modules declare
``class Mode(StrEnum)`` against ``enum.StrEnum`` for the type checker and against
``StrChoice`` at run time (see ``config.py``); what the init uses behaves the
same: ``Mode("gpu") is Mode.GPU``, ``Mode.GPU == "gpu"``, ``str()``, ``.value``,
``.name``, ``Mode["GPU"]``, ``for m in Mode``, ``ValueError`` for a value that is
not a member.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator


class _ChoiceType(type):
    """Iterating a choice class yields its members in definition order."""

    _members: dict[object, object]

    def __iter__(cls) -> Iterator[object]:
        return iter(cls._members.values())

    def __len__(cls) -> int:
        return len(cls._members)

    def __getitem__(cls, name: str) -> object:
        """``Cls["NAME"]``: the member by name, KeyError if none."""
        member = getattr(cls, name, None) if name.isupper() else None
        if member is None or type(member) is not cls:
            raise KeyError(name)
        return member


class _Choice:
    """Members are instances of the class itself, one per value (so ``is`` works)."""

    __slots__ = ()
    _members: dict[object, object] = {}
    _names: dict[object, str] = {}

    def __init_subclass__(cls) -> None:
        super().__init_subclass__()
        base = next(b for b in cls.__mro__ if b is str or b is int)
        members: dict[object, object] = {}
        names: dict[object, str] = {}
        for name, value in list(vars(cls).items()):
            if name.isupper() and isinstance(value, base):
                member = base.__new__(cls, value)  # type: ignore[type-var]
                setattr(cls, name, member)
                members[value] = member
                names[value] = name
        cls._members = members
        cls._names = names

    def __new__(cls, value: object) -> _Choice:
        try:
            return cls._members[value]  # type: ignore[return-value]
        except (KeyError, TypeError):
            raise ValueError(f"{value!r} is not a valid {cls.__name__}") from None

    @property
    def name(self) -> str:
        return self._names[self]  # a member hashes and compares as its value

    def __repr__(self) -> str:
        # super(): the str or int repr that follows _Choice in the member's MRO
        return f"<{type(self).__name__}.{self.name}: {super().__repr__()}>"


class StrChoice(_Choice, str, metaclass=_ChoiceType):
    """``enum.StrEnum``'s stand-in: members are the strings themselves."""

    __slots__ = ()

    @property
    def value(self) -> str:
        return str.__str__(self)

    def __str__(self) -> str:
        return str.__str__(self)

    __format__ = str.__format__
    __hash__ = str.__hash__
    __eq__ = str.__eq__


class IntChoice(_Choice, int, metaclass=_ChoiceType):
    """``enum.IntEnum``'s stand-in: members are the integers themselves."""

    __slots__ = ()

    @property
    def value(self) -> int:
        return int(self)

    def __str__(self) -> str:
        return str(int(self))

    __format__ = int.__format__
    __hash__ = int.__hash__
    __eq__ = int.__eq__
