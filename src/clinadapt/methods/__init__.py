"""How to adapt: methods registered by short name."""

from clinadapt.methods import (  # noqa: F401  (registrations)
    coop,
    dapl,
    finetune,
    knn,
    probe,
    prototype,
    seg,
    tip_adapter,
    tta,
    zeroshot,
)
from clinadapt.methods.base import (
    METHODS,
    Context,
    FitMethod,
    Method,
    Options,
    TTAMethod,
    predict_proba,
)

__all__ = ["METHODS", "Context", "FitMethod", "Method", "Options", "TTAMethod", "predict_proba"]
