"""Environment variables: one reading of every yes/no flag (CLINADAPT_OFFLINE, ...)."""

from __future__ import annotations

import os

from clinadapt.errors import ConfigError

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"", "0", "false", "no", "off"})


def env_flag(name: str, default: bool = False) -> bool:
    """Whether the flag ``name`` is set: 1/true/yes/on or 0/false/no/off (any case), else an error.

    An unset variable gives ``default``; a value that is neither (``offline``, ``2``) is a
    ConfigError naming the variable, rather than a guess that differs between readers.
    """
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ConfigError(
        f"environment variable {name}={raw!r} is not a yes/no flag; "
        "use 1, true, yes or on (or 0, false, no, off)"
    )
