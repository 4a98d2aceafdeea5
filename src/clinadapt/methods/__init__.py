"""How to adapt: methods registered by short name (declared in ``methods.json``).

Each method's module is imported the first time the method is used.
"""

from clinadapt._lazy import lazy_exports
from clinadapt.methods.registry import METHODS

__getattr__ = lazy_exports(
    __name__,
    {
        name: "clinadapt.methods.base"
        for name in ("Context", "FitMethod", "Method", "Options", "TTAMethod", "predict_proba")
    }
    | {"StreamResult": "clinadapt.methods.trace"},
)

__all__ = [
    "METHODS",
    "Context",
    "FitMethod",
    "Method",
    "Options",
    "StreamResult",
    "TTAMethod",
    "predict_proba",
]
