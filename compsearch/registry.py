"""Registries: names mapped to the objects that implement them (techniques, storage formats, metrics).

A name written out in a second place is a list waiting to drift; everything that needs to know which
implementations exist asks their registry, and an unknown name is an error that lists the known ones.
"""
from __future__ import annotations

import contextlib
from typing import Generic, Iterator, TypeVar

T = TypeVar("T")


class UnknownName(ValueError):
    """A name that no entry of a registry has."""


class Registry(Generic[T]):
    """Entries by their `name` attribute, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, entry: T) -> T:
        """Add `entry` under its name; a second entry of the same name is refused."""
        name = getattr(entry, "name")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered already")
        self._entries[name] = entry
        return entry

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    @contextlib.contextmanager
    def registered(self, entry: T) -> Iterator[T]:
        """`entry` registered for the duration of a `with` block (tests, plug-ins tried out)."""
        self.register(entry)
        try:
            yield entry
        finally:
            self.unregister(getattr(entry, "name"))

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise UnknownName(f"{self.kind} {name!r} is unknown; use one of {self.names()}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        return len(self._entries)
