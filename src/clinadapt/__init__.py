"""clinadapt: adapt foundation models to medical images and measure how well they hold up."""

from clinadapt.errors import (
    ClinadaptError,
    ConfigError,
    DataError,
    IncompatibleError,
    RegistryError,
    WeightsUnavailableError,
)

__version__ = "0.1.0"


def load_model(name: str, **kwargs):
    """Load a backbone by registered name or ``timm:``/``hf:``/``open_clip:`` id."""
    from clinadapt.models import load_model as _load

    return _load(name, **kwargs)


def load_dataset(name_or_path, **kwargs):
    """Load a registered dataset by name, or a folder, CSV manifest, MedMNIST .npz or NIfTI path."""
    from clinadapt.data import load_dataset as _load

    return _load(name_or_path, **kwargs)


def list_datasets() -> list[str]:
    from clinadapt.data import list_datasets as _list

    return _list()


def list_models() -> list[str]:
    from clinadapt.models import list_models as _list

    return _list()


def list_methods() -> list[str]:
    from clinadapt.methods import METHODS

    return METHODS.names()


def list_targets() -> list[str]:
    from clinadapt.targets import TARGETS

    return TARGETS.names()


def load_records(path, subgroups: bool = False):
    """Result records as a pandas DataFrame: one row per record x test set x metric, with the
    value, its bootstrap CI, n (images, patients) and the model, target, method, shift and seed."""
    from clinadapt.evaluation.tidy import load_records as _load

    return _load(path, subgroups=subgroups)


def run(config=None, *, model=None, data=None, **overrides):
    """Run one experiment from a YAML path and/or field overrides; returns the result record.

    ``model`` and ``data`` take names (``"tiny-vit"``, ``"clinical-shift"``, a path) or the
    objects :func:`load_model` and :func:`load_dataset` return. An object is used as it is (the
    model is copied, never changed); the record names it with a digest of its weights or
    images, so two different objects never share a run id or a cached fit.
    """
    from clinadapt.config import load_config
    from clinadapt.runner import object_overrides, run_experiment

    names, objects = object_overrides(model, data)
    return run_experiment(load_config(config, **{**overrides, **names}), **objects)


__all__ = [
    "ClinadaptError",
    "ConfigError",
    "DataError",
    "IncompatibleError",
    "RegistryError",
    "WeightsUnavailableError",
    "__version__",
    "list_datasets",
    "list_methods",
    "list_models",
    "list_targets",
    "load_dataset",
    "load_model",
    "load_records",
    "run",
]
