"""The simple targets: the head, norm affine parameters, biases, everything."""

from __future__ import annotations

from torch import nn

from clinadapt.errors import IncompatibleError
from clinadapt.targets._arch import backbone, model_name
from clinadapt.targets.base import TARGETS, Target

__all__ = ["NORM_TYPES", "backbone", "model_name", "norm_layers"]

#: Normalisation layers whose affine parameters the ``norm`` target opens (Tent's choice).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def norm_layers(module: nn.Module) -> list[nn.Module]:
    """Normalisation layers of ``module`` that carry affine parameters, plus timm/HF look-alikes.

    Besides torch's own classes, any module whose class name ends in ``Norm`` or ``Norm2d`` and
    that has a ``weight`` parameter counts (timm's ``LayerNorm2d``, ``RmsNorm``, HF's norms).
    """
    out = []
    for m in module.modules():
        has_affine = isinstance(getattr(m, "weight", None), nn.Parameter)
        if not has_affine:
            continue
        name = type(m).__name__
        if isinstance(m, NORM_TYPES) or name.endswith(("Norm", "Norm2d", "Norm1d")):
            out.append(m)
    return out


@TARGETS.register("head")
class HeadTarget(Target):
    """Train only the classification head; the backbone stays frozen."""

    name = "head"

    def apply(self, model: nn.Module) -> None:
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Module):
            raise IncompatibleError(
                f"target 'head' needs a classifier with a .head; got {type(model).__name__}"
            )
        for p in head.parameters():
            p.requires_grad_(True)


@TARGETS.register("norm")
class NormTarget(Target):
    """Train the scale and shift of every normalisation layer of the backbone."""

    name = "norm"

    def apply(self, model: nn.Module) -> None:
        layers = norm_layers(backbone(model))
        if not layers:
            raise IncompatibleError(
                f"target 'norm': model {model_name(model)!r} has no normalisation layer with "
                "affine parameters"
            )
        for m in layers:
            for p in m.parameters(recurse=False):
                p.requires_grad_(True)


@TARGETS.register("bias")
class BiasTarget(Target):
    """Train every parameter named ``bias`` in the backbone (Ben Zaken et al., ACL 2022)."""

    name = "bias"

    def apply(self, model: nn.Module) -> None:
        found = False
        for n, p in backbone(model).named_parameters():
            if n.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
                found = True
        if not found:
            raise IncompatibleError(
                f"target 'bias': model {model_name(model)!r} has no bias parameters"
            )


@TARGETS.register("full")
class FullTarget(Target):
    """Train everything."""

    name = "full"

    def apply(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad_(True)
