"""Progress bars and console output that a ``--quiet`` run silences.

Bars are drawn only on a terminal: in a log file or a pipe their carriage-return redraws would
pile up (``CLINADAPT_PROGRESS=1`` forces them, ``0`` hides them). Status lines and warnings are
plain lines on stderr either way.
"""

from __future__ import annotations

import os
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


def bars_enabled() -> bool:
    """Whether progress bars are drawn: not quiet, and stderr is a terminal (or forced)."""
    if is_quiet():
        return False
    forced = os.environ.get("CLINADAPT_PROGRESS")
    if forced is not None and forced.strip() != "":
        return env_flag("CLINADAPT_PROGRESS")
    return sys.stderr.isatty()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, **kw) -> Iterator[T]:
    """A tqdm bar on stderr, or the bare iterable when quiet or not on a terminal."""
    if not bars_enabled():
        return iter(iterable)
    return iter(
        tqdm(
            iterable,
            desc=desc,
            total=total,
            leave=False,
            dynamic_ncols=True,
            file=sys.stderr,
            **kw,
        )
    )


def bar(total: int, desc: str, **kw) -> tqdm:
    """A manual bar (``update``/``set_postfix``), disabled when quiet or not on a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        leave=False,
        dynamic_ncols=True,
        disable=not bars_enabled(),
        file=sys.stderr,
        **kw,
    )


def status(message: str) -> None:
    """A one-line status message on stderr, unless quiet."""
    if not is_quiet():
        tqdm.write(message, file=sys.stderr)


_SAID: set[str] = set()


def status_once(message: str) -> None:
    """:func:`status`, but each distinct message only the first time in this process (a demo
    or sweep reusing one trained model says so once, not once per run)."""
    if message not in _SAID:
        _SAID.add(message)
        status(message)


def warn(message: str) -> None:
    """A one-line warning on stderr, shown even when quiet: something was skipped or replaced."""
    tqdm.write(f"warning: {message}", file=sys.stderr)
