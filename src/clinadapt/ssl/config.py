"""The typed configuration of one pre-training run (the CLI and the Python API are views of it)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clinadapt.compute import DeviceField, PrecisionField
from clinadapt.validate import parse_model


class PretrainConfig(BaseModel):
    """Model, unlabelled data, self-supervised method and the training budget."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field("tiny-vit", description="model name or library id to pre-train")
    model_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the model's builder (image_size, in_chans, drop_path_rate, ...)",
    )
    data: str = Field("clinical-shift", description="dataset name or path; labels are not used")
    data_options: dict[str, Any] = Field(
        default_factory=dict, description="keyword arguments of the dataset loader"
    )
    method: str = Field(
        "simclr",
        description="self-supervised method: simclr, dino or mae (volumes: mae-3d, simclr-3d)",
    )
    method_options: dict[str, Any] = Field(
        default_factory=dict, description="the method's options (see each method's Options)"
    )
    init_from: str | None = Field(
        None, description="start from these weights (a file, folder or earlier pre-training run)"
    )
    pretrained: bool = Field(
        True, description="start from the model's published weights (false: random init)"
    )
    domains: list[str] | None = Field(
        None, description="unlabelled images from these domains only (default: all)"
    )
    splits: list[str] | None = Field(
        None,
        description="unlabelled images from these splits only (default: the probe's train "
        "and val parts, never its test images)",
    )
    transductive: bool = Field(
        False,
        description="also pre-train on the test images the probe is evaluated on (unlabelled); "
        "the summary records it",
    )
    out_dir: str = Field(
        "clinadapt-pretrain", description="folder for checkpoint, weights, summary"
    )
    max_steps: int = Field(200, ge=1, description="optimiser steps (the schedules span them)")
    max_minutes: float | None = Field(
        None, gt=0, description="stop early after this much training time (checkpointed, resumable)"
    )
    batch_size: int = Field(64, ge=2, description="unlabelled images per step")
    lr: float | None = Field(
        None, gt=0, description="peak learning rate; default: the method's base rate * batch/256"
    )
    weight_decay: float | None = Field(
        None, ge=0, description="AdamW weight decay; default: the method's"
    )
    warmup_steps: int | None = Field(
        None, ge=0, description="linear warm-up steps; default: 5% of max_steps"
    )
    checkpoint_every: int = Field(
        50, ge=1, description="write the resumable checkpoint every N steps"
    )
    seed: int = Field(0, ge=0, description="seed of initialisation, data order and augmentation")
    device: DeviceField = "auto"
    precision: PrecisionField = "fp32"
    evaluate: bool = Field(
        True, description="linear probe and k-NN on the labelled splits at the end"
    )
    eval_baseline: bool = Field(
        True, description="also evaluate the starting backbone, for a before/after comparison"
    )

    def identity(self) -> dict[str, Any]:
        """The fields a resumed run must share with the run that wrote the checkpoint
        (precision only when it is not fp32, so earlier checkpoints still resume)."""
        extra = {"precision"} if self.precision != "fp32" else set()
        return self.model_dump(
            include=extra
            | {
                "model",
                "model_options",
                "data",
                "data_options",
                "method",
                "method_options",
                "init_from",
                "pretrained",
                "domains",
                "splits",
                "transductive",
                "batch_size",
                "seed",
            }
        )


def make_config(**fields: Any) -> PretrainConfig:
    """Build a :class:`PretrainConfig`, dropping ``None`` overrides; bad fields raise ConfigError."""
    data = {k: v for k, v in fields.items() if v is not None}
    return parse_model(PretrainConfig, data, "pre-training configuration", hint=_option_home)


def _option_home(key: str) -> str | None:
    """``method_options.<key>`` when ``key`` is an option of some pre-training method."""
    from clinadapt.ssl.base import SSL_METHODS

    for entry in SSL_METHODS.entries():
        if key in entry.obj.Options.model_fields:
            return f"method_options.{key}"
    return None
