"""A small name -> object registry shared by models, datasets, targets, methods and shifts."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from clinadapt.errors import RegistryError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    help: str
    tags: tuple[str, ...] = field(default_factory=tuple)


class Registry(Generic[T]):
    """Maps short lowercase names to objects; refuses duplicates so its listing is always true."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, obj: T | None = None, *, help: str = "", tags: tuple[str, ...] = ()
    ) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable directly or as a decorator."""
        if name != name.lower() or not name or " " in name:
            raise RegistryError(f"{self.kind} name {name!r} must be lowercase with no spaces")

        def add(o: T) -> T:
            if name in self._entries:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            text = help or (getattr(o, "__doc__", None) or "").strip().splitlines()[0:1]
            if isinstance(text, list):
                text = text[0] if text else ""
            self._entries[name] = Entry(name, o, text, tuple(tags))
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
