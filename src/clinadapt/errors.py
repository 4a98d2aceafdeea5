"""Errors raised by clinadapt; each message says what was wrong and what to do."""

from __future__ import annotations


class ClinadaptError(Exception):
    """Base class of every error clinadapt raises on purpose."""


class RegistryError(ClinadaptError, KeyError):
    """An unknown or duplicate name in one of the registries."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class WeightsUnavailableError(ClinadaptError):
    """Pretrained weights are neither in a local directory, nor in the cache, nor reachable."""


class DataError(ClinadaptError, ValueError):
    """A dataset, file, column or label that cannot be used as given."""


class ConfigError(ClinadaptError, ValueError):
    """A run configuration that does not make sense."""


class IncompatibleError(ClinadaptError, ValueError):
    """A combination of model, target and method that cannot work together."""


#: The most characters of one value an error message shows.
BRIEF_LIMIT = 200
#: The most characters of a whole error message the command line prints.
MESSAGE_LIMIT = 4000


def brief(value: object, limit: int = BRIEF_LIMIT) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters in bounded time.

    A YAML alias bomb is a small object whose full repr is astronomically long, so nested
    containers are shown only a few levels and items deep before anything is joined.
    """
    import reprlib

    r = reprlib.Repr()  # Python 3.11 takes no keyword arguments here
    r.maxlevel, r.maxdict, r.maxlist, r.maxtuple, r.maxset = 3, 8, 8, 8, 8
    r.maxstring = r.maxother = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def clip_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]} ... ({len(text) - limit} more characters)"
