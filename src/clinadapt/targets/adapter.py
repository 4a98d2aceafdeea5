"""``adapter``: bottleneck adapters beside (AdaptFormer) or after (sequential) each block's MLP.

An adapter is down-projection -> ReLU -> up-projection, scaled by ``scale``. In parallel mode
(AdaptFormer, Chen et al., NeurIPS 2022) it reads the MLP's input and its output is added to
the MLP's; in sequential mode (Houlsby et al., ICML 2019) it reads the MLP's output and adds a
residual to it. The adapter lives in the block (``<block>.mlp_adapter``) and is called by a
forward hook on the MLP, so the base model's parameter names do not change. The up-projection
starts at zero: the adapted model starts equal to the base.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from clinadapt.errors import ConfigError, IncompatibleError
from clinadapt.targets._arch import backbone, linear_dims, mlp_modules, model_name
from clinadapt.targets.base import TARGETS, Target, TargetOptions

Mode = Literal["parallel", "sequential"]


class AdapterOptions(TargetOptions):
    bottleneck: int = Field(64, ge=1, description="hidden width of each adapter (AdaptFormer: 64)")
    scale: float = Field(0.1, description="multiplier of the adapter output (AdaptFormer: 0.1)")
    mode: Mode = Field(
        "parallel",
        description="parallel: beside the MLP (AdaptFormer); sequential: after it (Houlsby)",
    )


class Adapter(nn.Module):
    """A bottleneck MLP ``up(relu(down(x))) * scale`` with a zero-initialised up-projection."""

    def __init__(self, d_in: int, d_out: int, bottleneck: int, scale: float, mode: Mode) -> None:
        super().__init__()
        self.down = nn.Linear(d_in, bottleneck)
        self.act = nn.ReLU()
        self.up = nn.Linear(bottleneck, d_out)
        self.scale = float(scale)
        self.mode = mode
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x))) * self.scale


class _AdapterHook:
    """Forward hook of an MLP that adds its adapter's output.

    A class rather than a closure so that ``copy.deepcopy`` of the model gives the copy's hook
    the copy's adapter.
    """

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter

    def __call__(
        self, mlp: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        source = args[0] if self.adapter.mode == "parallel" else output
        return output + self.adapter(source)


def adapters(model: nn.Module) -> list[Adapter]:
    """Every adapter inserted into ``model``."""
    return [m for m in model.modules() if isinstance(m, Adapter)]


@TARGETS.register("adapter")
class AdapterTarget(Target):
    """Insert one adapter per transformer block and train only the adapters."""

    name = "adapter"
    Options = AdapterOptions

    def apply(
        self, model: nn.Module, bottleneck: int = 64, scale: float = 0.1, mode: Mode = "parallel"
    ) -> None:
        module = backbone(model)
        name = model_name(model)
        mlps = mlp_modules(module)
        if not mlps:
            raise IncompatibleError(
                f"target 'adapter': model {name!r} has no transformer blocks with an MLP; "
                "adapters need a ViT-like backbone"
            )
        for mlp_name, mlp in mlps:
            parent_name, _, _ = mlp_name.rpartition(".")
            parent = module.get_submodule(parent_name)
            existing = getattr(parent, "mlp_adapter", None)
            if isinstance(existing, Adapter):  # already inserted (a source model re-targeted)
                same = (existing.down.out_features, existing.scale, existing.mode) == (
                    bottleneck,
                    float(scale),
                    mode,
                )
                if not same:
                    raise ConfigError(
                        f"target 'adapter': model {name!r} already has adapters of another "
                        f"configuration at {parent_name}"
                    )
            else:
                d_in, d_out = linear_dims(mlp)
                if mode == "sequential":
                    d_in = d_out
                ref = next(mlp.parameters())
                adapter = Adapter(d_in, d_out, bottleneck, scale, mode).to(ref.device, ref.dtype)
                parent.add_module("mlp_adapter", adapter)
                mlp.register_forward_hook(_AdapterHook(adapter))
            for p in parent.mlp_adapter.parameters():
                p.requires_grad_(True)
