"""A small name -> object registry shared by models, datasets, targets, methods and shifts.

Entries are declared as data (a JSON file beside the code: name, module, help, tags), so that
listing what exists imports nothing heavy; the module that defines an entry is imported the
first time the entry is used, and registers the object under its name. Code may also register
names it did not declare (a user's own method, say).
"""

from __future__ import annotations

import difflib
import importlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from clinadapt.errors import RegistryError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One name: its one-line help, tags, and the module that defines it."""

    name: str
    help: str
    tags: tuple[str, ...] = ()
    module: str | None = None
    registry: Registry[T] | None = field(default=None, repr=False, compare=False)
    #: the declaration's other fields (e.g. ``options``: a description per option)
    info: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def obj(self) -> T:
        """The registered object (imports its module on first use)."""
        if self.registry is None:
            raise RegistryError(f"{self.name!r} belongs to no registry")
        return self.registry.get(self.name)


class Registry(Generic[T]):
    """Maps short lowercase names to objects; refuses duplicates so its listing is always true."""

    def __init__(self, kind: str, index: str | Path | None = None) -> None:
        self.kind = kind
        self.index = Path(index) if index is not None else None
        self._entries: dict[str, Entry[T]] = {}
        self._objects: dict[str, T] = {}
        if self.index is not None:
            self.declare_index(self.index)

    def _check_name(self, name: str) -> None:
        if not isinstance(name, str) or name != name.lower() or not name or " " in name:
            raise RegistryError(f"{self.kind} name {name!r} must be lowercase with no spaces")

    def declare(
        self,
        name: str,
        module: str,
        help: str,
        tags: tuple[str, ...] = (),
        info: Mapping[str, Any] | None = None,
    ) -> None:
        """Declare that ``module`` registers ``name`` (listed now, imported when used)."""
        self._check_name(name)
        if name in self._entries:
            raise RegistryError(f"{self.kind} {name!r} is declared twice")
        self._entries[name] = Entry(name, help, tuple(tags), module, self, dict(info or {}))

    def declare_index(self, path: str | Path) -> None:
        """Declare every entry of a JSON file ``{name: {module, help, tags}}``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RegistryError(f"cannot read the {self.kind} index {path}: {e}") from e
        for name, item in data.items():
            if not isinstance(item, dict) or not isinstance(item.get("module"), str):
                raise RegistryError(f"{path}: entry {name!r} needs a 'module'")
            info = {k: v for k, v in item.items() if k not in ("module", "help", "tags")}
            self.declare(
                name, item["module"], item.get("help", ""), tuple(item.get("tags", ())), info
            )

    def register(
        self, name: str, obj: T | None = None, *, help: str = "", tags: tuple[str, ...] = ()
    ) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; usable directly or as a decorator.

        A declared name takes its help and tags from the declaration; a ``help`` or ``tags``
        given here must then agree with it.
        """
        self._check_name(name)

        def add(o: T) -> T:
            if name in self._objects:
                raise RegistryError(f"{self.kind} {name!r} is already registered")
            declared = self._entries.get(name)
            if declared is not None:
                if (help and help != declared.help) or (tags and tuple(tags) != declared.tags):
                    where = self.index or "its declaration"
                    raise RegistryError(
                        f"{self.kind} {name!r}: help and tags are declared in {where}; "
                        "change them there, not at registration"
                    )
            else:
                text = help or next(
                    iter((getattr(o, "__doc__", None) or "").strip().splitlines()), ""
                )
                module = getattr(o, "__module__", None)
                self._entries[name] = Entry(name, text, tuple(tags), module, self)
            self._objects[name] = o
            return o

        return add(obj) if obj is not None else add

    def get(self, name: str) -> T:
        """The object registered as ``name``, importing its module the first time."""
        if name in self._objects:
            return self._objects[name]
        entry = self.entry(name)
        if entry.module is not None:
            importlib.import_module(entry.module)
        if name not in self._objects:
            raise RegistryError(
                f"{self.kind} {name!r} is declared to live in {entry.module}, which does not "
                f"register it (declared in {self.index})"
            )
        return self._objects[name]

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(str(name), list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}"
            ) from None

    def load_all(self) -> dict[str, T]:
        """Import every declared entry; return name -> object."""
        return {name: self.get(name) for name in self.names()}

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
