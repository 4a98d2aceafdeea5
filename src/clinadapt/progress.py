"""Progress bars and console output that a ``--quiet`` run silences."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

from clinadapt.env import env_flag

T = TypeVar("T")

_QUIET: bool | None = None  # None: read CLINADAPT_QUIET on first use


def set_quiet(quiet: bool) -> None:
    """Silence (or restore) every progress bar and status line."""
    global _QUIET
    _QUIET = bool(quiet)


def is_quiet() -> bool:
    global _QUIET
    if _QUIET is None:
        _QUIET = env_flag("CLINADAPT_QUIET")
    return _QUIET


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kw) -> Iterator[T]:
    """A tqdm bar on stderr, or the bare iterable when quiet."""
    if is_quiet():
        return iter(iterable)
    return iter(tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, **kw))


def bar(total: int, desc: str, **kw) -> tqdm:
    """A manual bar (``update``/``set_postfix``) that is disabled when quiet."""
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=is_quiet(), **kw)


def status(message: str) -> None:
    """A one-line status message on stderr, unless quiet."""
    if not is_quiet():
        tqdm.write(message)


def warn(message: str) -> None:
    """A one-line warning on stderr, shown even when quiet: something was skipped or replaced."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
