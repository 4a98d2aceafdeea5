"""`tent`: test entropy minimisation (Wang et al., "Tent: Fully test-time adaptation by entropy
minimization", ICLR 2021).

Configure: BatchNorm normalises with the test batch's statistics. Collect: the parameters the
target opened (by default the norm layers' affine scale and shift, as in the paper). Update: one
step of the mean prediction entropy per batch; the prediction is the one from that same forward
pass. State: the adapted parameters and the optimizer's moments, kept across batches (episodic
resets are the protocol's business).
"""

from __future__ import annotations

import torch
from pydantic import Field

from clinadapt.classifier import ImageClassifier
from clinadapt.methods.base import METHODS, Context
from clinadapt.methods.tta.adapter import (
    Adapter,
    Step,
    StreamMethod,
    StreamOptions,
    check_model,
    collect_params,
    configure_model,
    make_optimizer,
    resolve_bn_prior,
    softmax_entropy,
)


class TentOptions(StreamOptions):
    # Published defaults (DequanWang/tent: conf.py and cfgs/tent.yaml): Adam, lr 1e-3, beta1 0.9,
    # no weight decay, one step per batch, not episodic. Its ImageNet setting is SGD lr 2.5e-4
    # with momentum 0.9 (--set method_options.optimizer=sgd method_options.lr=0.00025); its SGD
    # is Nesterov (conf.py: OPTIM.NESTEROV = True, passed to optim.SGD in cifar10c.py).
    lr: float = Field(1e-3, gt=0, description="learning rate (paper: Adam 1e-3)")
    nesterov: bool = Field(True, description="SGD: Nesterov momentum (tent's config: on)")


class TentAdapter(Adapter):
    """Tent: minimise the entropy of the batch's predictions, predict from the same pass."""

    def __init__(self, model: ImageClassifier, optimizer: torch.optim.Optimizer, steps: int):
        super().__init__(model, optimizer)
        self.steps = steps

    def forward_and_adapt(self, x: torch.Tensor) -> Step:
        updates = 0
        for _ in range(self.steps):
            logits = self.model(x)
            loss = softmax_entropy(logits).mean()
            # backward first, then the finite check: on a GPU the check waits for the device,
            # and placed between the passes it would leave the device idle while the backward
            # is launched (a non-finite loss leaves non-finite gradients, dropped unused)
            loss.backward()
            if torch.isfinite(loss):
                self.optimizer.step()
                updates += 1
            self.optimizer.zero_grad(set_to_none=True)
        return Step(logits, loss.detach(), updates=updates, used=len(x))


@METHODS.register("tent")
class Tent(StreamMethod):
    """Adapt by test entropy minimisation on each batch of the stream."""

    name = "tent"
    default_target = "norm"
    Options = TentOptions

    def build(
        self, model: ImageClassifier, num_classes: int, options: TentOptions, ctx: Context
    ) -> TentAdapter:
        configure_model(model, resolve_bn_prior(options, ctx))
        params = collect_params(model)
        check_model(model, params, self.name)
        return TentAdapter(model, make_optimizer(params, options), options.steps)
