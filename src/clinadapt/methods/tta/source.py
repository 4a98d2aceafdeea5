"""`source`: no adaptation; the source model predicts the stream as it is."""

from __future__ import annotations

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ClinicalDataset
from clinadapt.methods.base import (
    METHODS,
    Context,
    Options,
    StreamResult,
    TTAMethod,
    predict_proba,
)


@METHODS.register("source")
class Source(TTAMethod):
    """Predict the test stream with the frozen source model."""

    name = "source"
    changes = "nothing"
    default_target = "none"

    def adapt(
        self, model: ImageClassifier, stream: ClinicalDataset, options: Options, ctx: Context
    ) -> StreamResult:
        return StreamResult.of(predict_proba(model, stream, ctx, desc=f"source {stream.name}"))
