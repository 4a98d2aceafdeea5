"""A fitted classifier rebuilt from what a run left: its record, or an adapted-weights file.

Used to test-time adapt or evaluate an existing model (``source.from``) and to export it in a
library's own format. Only JSON records and safetensors files are read (no pickle), and every
failure names the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinadapt.errors import ConfigError, DataError

if TYPE_CHECKING:
    from clinadapt.classifier import ImageClassifier
    from clinadapt.targets.base import TargetInfo

#: safetensors metadata keys written beside the adapted tensors (all JSON strings but the names)
META_CLASS_NAMES = "class_names"
META_PREPROCESS = "preprocess"
META_METHOD = "method"
META_MODEL_OPTIONS = "model_options"
META_BASE_SOURCE = "base_source"
META_RUN_ID = "run_id"


@dataclass
class Fitted:
    """A fitted classifier and where it came from."""

    model: ImageClassifier
    target: TargetInfo
    method: str
    class_names: list[str]
    origin: dict[str, Any] = field(default_factory=dict)  # file, record, run_id, weights


def classifier_metadata(model: ImageClassifier, method: str | None = None) -> dict[str, str]:
    """What a weights file needs besides its tensors to be used on its own: class names,
    preprocessing, the base model's options and origin, and the method that fitted it."""
    enc = model.encoder
    meta = {
        META_PREPROCESS: json.dumps(enc.preprocess.to_dict()),
        META_MODEL_OPTIONS: json.dumps(getattr(enc, "options", {}) or {}, default=str),
        META_BASE_SOURCE: str(getattr(enc, "source", "")),
    }
    if model.class_names is not None:
        meta[META_CLASS_NAMES] = json.dumps(list(model.class_names))
    if method is not None:
        meta[META_METHOD] = method
    return meta


def _fit_part(record: dict[str, Any], path: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(method, target dict, training summary) of the model a record's run fitted or started from."""
    kind = record.get("method", {}).get("kind")
    if kind == "fit":
        return record["method"]["name"], record["target"], record.get("training") or {}
    if kind == "tta":
        source = record.get("source") or {}
        return source["method"], source["target"], source.get("training") or {}
    raise DataError(f"{path}: not a result record of a fit or test-time run (method kind {kind!r})")


def weights_of(record: dict[str, Any], path: Path) -> Path:
    """The adapted-weights file of the model a record describes (beside the record)."""
    _, _, training = _fit_part(record, path)
    if "from" in (record.get("source") or {}):
        origin = record["source"]["from"]
        return Path(origin["weights"])
    name = training.get("weights") or training.get("checkpoint") or training.get("reused")
    if not name:
        raise DataError(f"{path}: the record names no adapted-weights file")
    file = path.parent / name if "/" in str(name) else path.parent / "cache" / str(name)
    if not file.is_file():
        raise DataError(
            f"{path}: its adapted weights {file} are gone (the run cache was cleared?); run the "
            "same configuration again to recreate them"
        )
    return file


def load_fitted(path: str | Path, device: str = "cpu") -> Fitted:
    """The fitted classifier of a result record (JSON) or an adapted-weights file (safetensors).

    A record gives the model its run fitted, or, for a test-time run, the source model it
    started from (test-time adaptation happens on a stream; its end state is not kept).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{p}: no such result record or weights file")
    if p.is_dir():
        raise ConfigError(f"{p} is a folder; give a result record (.json) or a .safetensors file")
    if p.suffix == ".json":
        return _from_record(p, device)
    if p.suffix == ".safetensors":
        return _from_weights(p, device)
    raise ConfigError(f"{p}: expected a result record (.json) or adapted weights (.safetensors)")


def _build(
    model_name: str,
    weights: str | None,
    pretrained: bool,
    model_options: dict[str, Any],
    class_names: list[str],
    seed: int,
    device: str,
) -> ImageClassifier:
    import torch

    from clinadapt.classifier import ImageClassifier
    from clinadapt.models import load_model

    torch.manual_seed(seed)
    encoder = load_model(model_name, weights=weights, pretrained=pretrained, **model_options)
    return ImageClassifier(encoder, len(class_names), class_names).to(device)


def _load_into(model: ImageClassifier, method: str | None, file: Path, device: str) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from clinadapt.methods import METHODS

    try:
        state = load_file(str(file), device=device)
    except (SafetensorError, OSError) as e:
        raise DataError(f"{file}: not a readable safetensors file ({e})") from None
    if method is not None:
        METHODS.get(method)().load_adapted(model, state)
    else:
        model.load_state_dict(state, strict=False)


def _check_fits(model: ImageClassifier, file: Path) -> None:
    """Every backbone tensor of ``file`` must have its place in ``model`` (same name and shape);
    a head may be another kind (feature heads are rebuilt by their method)."""
    from safetensors import safe_open

    own = model.state_dict()
    with safe_open(str(file), framework="pt") as f:
        bad = [
            k
            for k in f.keys()  # noqa: SIM118  (a safetensors handle, not a dict)
            if not k.startswith("head.")
            and (k not in own or tuple(f.get_slice(k).get_shape()) != tuple(own[k].shape))
        ]
    if bad:
        raise DataError(
            f"{file}: {len(bad)} tensor(s) do not fit the rebuilt model, e.g. {bad[:3]}"
        )


def _from_record(path: Path, device: str) -> Fitted:
    from clinadapt.config import run_config
    from clinadapt.store import read_record
    from clinadapt.targets import apply_target

    record = read_record(path)
    try:
        cfg = run_config(dict(record["config"]), f"the configuration in {path}")
        method, target, _ = _fit_part(record, path)
        class_names = list(record["data"]["class_names"])
    except KeyError as e:
        raise DataError(f"{path}: not a clinadapt result record (no {e})") from None
    file = weights_of(record, path)
    model = _build(
        cfg.model,
        cfg.weights,
        cfg.pretrained,
        dict(getattr(cfg, "model_options", {}) or {}),
        class_names,
        cfg.seed,
        device,
    )
    spec, options = target["spec"], target.get("options") or {}
    if spec == "none":  # a method that trains no parameter records none; it loads its default
        from clinadapt.methods import METHODS

        spec, options = METHODS.get(method).default_target, {}
    info = apply_target(model, spec, options)
    _load_into(model, method, file, device)
    origin = {
        "record": str(path.resolve()),
        "run_id": record.get("run_id"),
        "weights": str(file.resolve()),
    }
    return Fitted(model, info, method, class_names, origin)


def _base_of(source: str) -> tuple[str | None, bool]:
    """(weights, pretrained) that rebuild the base model a file's ``base_source`` names."""
    if not source or source == "random init":
        return None, False
    for prefix in ("file: ", "local dir: "):
        if source.startswith(prefix):
            local = source[len(prefix) :]
            if Path(local).exists():
                return local, True
    return None, True  # published weights: found again in the cache, model dir or hub


def _from_weights(path: Path, device: str) -> Fitted:
    from clinadapt.targets import apply_target
    from clinadapt.targets.io import read_metadata

    meta = read_metadata(path)
    base = meta.get("base_model")
    if not base:
        raise DataError(
            f"{path}: no base_model in its metadata; not a clinadapt adapted-weights file"
        )
    try:
        class_names = json.loads(meta[META_CLASS_NAMES])
    except (KeyError, json.JSONDecodeError):
        raise DataError(
            f"{path}: its metadata holds no class names (written by an older clinadapt?); give "
            "the run's result record instead"
        ) from None
    weights, pretrained = _base_of(meta.get(META_BASE_SOURCE, ""))
    options = json.loads(meta.get(META_MODEL_OPTIONS) or "{}")
    model = _build(base, weights, pretrained, options, class_names, 0, device)
    spec = meta.get("target")
    target_options = json.loads(meta.get("target_options") or "{}")
    if spec is None:
        raise DataError(f"{path}: no target in its metadata; cannot tell which parameters it holds")
    info = apply_target(model, spec, target_options)
    _check_fits(model, path)
    method = meta.get(META_METHOD)
    _load_into(model, method, path, device)
    origin = {"weights": str(path.resolve()), "run_id": meta.get(META_RUN_ID)}
    return Fitted(model, info, method or "finetune", class_names, origin)
