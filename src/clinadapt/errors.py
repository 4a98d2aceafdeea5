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
