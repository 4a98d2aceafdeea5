"""The typed run configuration: the CLI flags, the YAML file and the Python API are views of it."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from clinadapt.compute import DeviceField, PrecisionField
from clinadapt.errors import ConfigError
from clinadapt.validate import parse_model

#: The most values (mappings, lists and scalars, each alias counted again) a YAML document may
#: expand to. A few hundred bytes of nested aliases expand to billions of values and would hang
#: every step that copies or prints the configuration.
YAML_VALUE_LIMIT = 100_000


class SourceConfig(BaseModel):
    """How the source model is trained before a test-time method adapts it, or where a model
    fitted earlier is read from (``from``)."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
    )
    method: str = Field(
        None,  # type: ignore[assignment]
        description="fit method that trains the source model (default: finetune, or "
        "seg-finetune for segmentation, seg3d-finetune for volumes)",
    )
    target: str | None = Field(
        None, description="what the source training updates (default: that method's own)"
    )
    options: dict[str, Any] = Field(default_factory=dict, description="options of that method")
    from_: str | None = Field(
        None,
        alias="from",
        description="adapt (or, with method source, evaluate) a model fitted earlier instead of "
        "training one: a result record (.json) or an adapted-weights file (.safetensors)",
    )


class EvaluationConfig(BaseModel):
    """How each test set is evaluated beyond the headline metrics."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    n_boot: int = Field(200, ge=0, description="bootstrap resamples for the CIs (0: no CIs)")
    alpha: float = Field(0.05, gt=0, lt=1, description="CI level is 1 - alpha")
    target_error: float = Field(
        0.1, gt=0, lt=1, description="selective prediction: report the coverage at this error"
    )
    target_sensitivity: float = Field(
        0.9, gt=0, le=1, description="binary tasks: operating point chosen on validation"
    )
    threshold: float | None = Field(
        None, ge=0, le=1, description="binary tasks: a fixed operating point instead"
    )
    subgroup_keys: list[str] = Field(
        default_factory=lambda: ["domain", "scanner", "sex", "age_group"],
        description="metadata keys whose groups get per-group metrics, worst group and gap",
    )
    nsd_tolerance_mm: float = Field(
        2.0, gt=0, description="segmentation: tolerance of the normalised surface Dice, in mm"
    )
    size_edges_mm: list[float] = Field(
        default_factory=lambda: [10.0, 30.0],
        description="segmentation: object-size bin edges (diameter of a disc of the same area, mm)",
    )


class RunConfig(BaseModel):
    """One experiment: model x target x method x data x shift, plus a seed."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, protected_namespaces=())
    model: str = Field(
        None,  # type: ignore[assignment]
        description="registered model name or timm:/hf:/open_clip: id (default: the task's "
        "offline model, tiny-resnet for classification, tiny-sam for segmentation)",
    )
    weights: str | None = Field(None, description="local weights file or directory (offline use)")
    pretrained: bool = Field(
        True, description="load pretrained weights (tiny-* models never have any)"
    )
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the model's builder, checked per family: image_size (input "
        "side in pixels, any model), timm arguments (in_chans, drop_path_rate, ...), open_clip "
        "or transformers config fields",
    )
    data: str = Field(
        None,  # type: ignore[assignment]
        description="registered dataset name or a path (default: the method's task's built-in "
        "data, clinical-shift or clinical-shift-seg)",
    )
    data_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the dataset loader"
    )
    shift: str = Field("domain", description="shift protocol")
    shift_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the shift protocol"
    )
    method: str = Field("finetune", description="how to adapt")
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="typed options of the method"
    )
    target: str | None = Field(None, description="what to adapt (default: the method's own)")
    target_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the target"
    )
    source: SourceConfig = Field(
        default_factory=SourceConfig, description="source training for test-time methods"
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="confidence intervals, operating point"
    )
    tta_protocol: Literal["per-shift", "episodic", "continual"] = Field(
        "per-shift",
        description="test-time streams: per-shift (each test set from a fresh source model), "
        "episodic (reset after every batch) or continual (one stream through all test sets)",
    )
    stream_order: Literal["random", "class-sorted", "imbalanced", "size-sorted"] = Field(
        "random",
        description="order of each test stream: random, class-sorted, or imbalanced "
        "(long-tailed label prevalence, ratio 10); segmentation: random or size-sorted "
        "(ascending object area, empty images first)",
    )
    stream_executor: Literal["local", "ray"] = Field(
        "local",
        description="where the independent test streams of a test-time method run: one after "
        "another here, or each as a Ray task (per-shift and episodic; $RAY_ADDRESS names the "
        "cluster); the results are the same",
    )
    prompt: dict[str, Any] | None = Field(
        None,
        description="segmentation: how each image's prompts derive from its reference, the "
        "fields of clinadapt.segmentation.PromptSpec (kind box|points|box+points|mask|none, "
        "per class|component, jitter, k, negatives, point_mode, classes; or kind file with "
        "file: a JSON/CSV of the user's prompts per image); default a MedSAM box; none for "
        "classification",
    )
    seed: int = Field(
        0, ge=0, description="seed of model init, data order and sampling (numpy takes no negative)"
    )
    batch_size: int = Field(
        32,
        ge=1,
        description="batch size of training and inference, the source model's included "
        "(test-time streams: stream_batch_size)",
    )
    stream_batch_size: int = Field(
        32,
        ge=1,
        description="batch size of the test streams of test-time methods (1: single images); "
        "changing it reuses the trained source model",
    )
    adaptive_temperature: bool = Field(
        False,
        description="at evaluation, sharpen ViT attention and output softmax with the "
        "entropy-based adaptive temperature of Velickovic et al. (ICML 2025); no training",
    )
    device: DeviceField = "auto"
    precision: PrecisionField = "fp32"
    loader_workers: int | None = Field(
        None,
        ge=0,
        description="processes that decode image files ahead of the model (default: up to 4 "
        "for files, none for images in memory; 0: decode in the main process); results do not "
        "depend on it",
    )
    out_dir: str = Field("clinadapt-runs", description="where result records are written")
    tensorboard: bool = Field(
        False,
        description="also write TensorBoard events (history, TTA trace, metrics) under "
        'out_dir/tensorboard/<run id>; needs pip install -e ".[tensorboard]"',
    )

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_installed(cls, v: bool) -> bool:
        from clinadapt.evaluation.events import INSTALL_HINT, tensorboard_available

        if v and not tensorboard_available():
            raise ValueError(f"TensorBoard logging needs the tensorboard package: {INSTALL_HINT}")
        return v

    @model_validator(mode="after")
    def _task_defaults(self) -> RunConfig:
        """Fill unset fields with the defaults of the method's task (model, dataset, source
        method, prompts) and refuse prompts for classification."""
        from clinadapt.tasks.base import TASKS, method_task, task_defaults

        task = method_task(self.method)
        if self.source.method is None:
            import clinadapt.tasks  # noqa: F401  (registers the tasks)

            self.source.method = TASKS.get(task).default_source
        model, data = task_defaults(self.method, self.source.method)
        self.model = self.model or model
        self.data = self.data or data
        if task == "segmentation":
            self.prompt = parse_prompt(self.prompt or {})
        elif self.prompt is not None:
            raise ConfigError(
                f"prompt applies to segmentation; method {self.method!r} is a {task} method"
            )
        return self

    def identity(self) -> dict[str, Any]:
        """The fields that define the experiment (not where its results go or which device ran
        it). Fields added later are left out at their defaults, so earlier run ids still hold."""
        exclude: set[str] = {
            "out_dir",
            "device",
            "loader_workers",
            "stream_executor",
            "tensorboard",
        } | ({"prompt"} if self.prompt is None else set())
        if self.precision == "fp32":
            exclude.add("precision")
        data = self.model_dump(exclude=exclude)
        if self.source.from_ is None:
            data["source"].pop("from", None)
        return data

    def run_id(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True, default=str).encode())
        target = (self.target or "default").replace("+", "-")
        return f"{self.model}_{target}_{self.method}_{self.shift}_s{self.seed}_{digest.hexdigest()[:8]}".replace(
            "/", "-"
        ).replace(":", "-")


def parse_prompt(fields: dict[str, Any]) -> dict[str, Any]:
    """A segmentation prompt protocol, checked by PromptSpec, as the dict of all its fields
    (``file`` only when given: the run ids of derived-prompt runs do not change)."""
    from clinadapt.segmentation.prompts import PromptSpec

    spec = parse_model(PromptSpec, fields, "prompt")
    return spec.model_dump(exclude=None if spec.file else {"file"})


def read_yaml_mapping(path: str | Path, kind: str, expected: str) -> dict[str, Any]:
    """Read a YAML file whose top level must be a mapping; errors name the file."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{kind} file {str(p)!r} does not exist")
    if not p.is_file():
        raise ConfigError(f"{kind} file {str(p)!r} is not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {yaml_problem(e)}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read it as a YAML text file ({type(e).__name__})") from e
    check_expansion(data, str(p))
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping {expected}")
    return data


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's complaint in one line: what is wrong and where (line, column), without the
    quoted source lines and carets it prints over several lines."""
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        context = f" {error.context}" if error.context else ""
        return f"{error.problem or 'syntax error'}{where}{context}".strip()
    return " ".join(str(error).split())


def load_config(
    path: str | Path | None = None, settings: Iterable[str] = (), **overrides: Any
) -> RunConfig:
    """Read a YAML config (optional), apply field overrides, then ``--set`` strings.

    Errors name the file and the field, and suggest the closest known one.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "config", "of fields")
    for key, value in overrides.items():
        if value is not None:
            set_dotted(data, key, value)
    apply_settings(data, settings)
    return run_config(data, f"run configuration{f' {path}' if path else ''}")


def run_config(data: dict[str, Any], what: str = "run configuration") -> RunConfig:
    """Validate a run-config mapping; an option given at the top level is pointed to its place."""
    return parse_model(RunConfig, data, what, hint=lambda key: option_home(key, data))


def option_home(key: str, data: dict[str, Any]) -> str | None:
    """Where a misplaced top-level ``key`` belongs (``method_options.epochs``), if anywhere."""
    if key in EvaluationConfig.model_fields:
        return f"evaluation.{key}"
    try:
        from clinadapt.methods import METHODS

        options = METHODS.get(str(data.get("method", "finetune"))).Options
    except Exception:  # an unknown method is reported by its own check
        return None
    return f"method_options.{key}" if key in options.model_fields else None


def apply_settings(data: dict[str, Any], settings: Iterable[str]) -> dict[str, Any]:
    """Apply ``--set KEY=VALUE`` strings to a config mapping (in place) and return it.

    KEY is a dotted path of fields (``method_options.epochs``); VALUE is read as YAML. This is
    the one meaning of ``--set`` in every command: run, sweep, fewshot and pretrain.
    """
    for text in settings:
        key, value = parse_assignment(text)
        set_dotted(data, key, value)
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "method_options.lr", 1e-3)`` sets ``d["method_options"]["lr"]``."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"cannot set {key!r}: empty field name (write e.g. method_options.lr)")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {key!r}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``KEY=VALUE`` from the command line; VALUE is read as YAML (numbers, lists, ...)."""
    if "=" not in text:
        raise ConfigError(f"expected KEY=VALUE, got {text!r} (e.g. method_options.lr=0.001)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    check_expansion(value, f"--set {key.strip()}")
    if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string; a number was meant
        with contextlib.suppress(ValueError):
            value = float(value)
    return key.strip(), value


def check_expansion(value: Any, where: str, limit: int = YAML_VALUE_LIMIT) -> None:
    """Refuse a YAML value that expands (through aliases) to more than ``limit`` values."""
    count = 0
    stack = [value]
    while stack:
        node = stack.pop()
        count += 1
        if count > limit:
            raise ConfigError(
                f"{where}: the YAML expands to more than {limit:,} values (nested aliases?); "
                "write the values out instead"
            )
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
