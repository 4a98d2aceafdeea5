"""Fine-tuning keeps the best epoch on validation: the right direction, a metric the task has."""

import numpy as np
import pytest

from clinadapt.classifier import ImageClassifier
from clinadapt.data.base import ArraySource, ClinicalDataset
from clinadapt.errors import ConfigError
from clinadapt.methods import Context
from clinadapt.methods.finetune import Finetune, FinetuneOptions, default_monitor
from clinadapt.models import load_model
from clinadapt.targets import apply_target


def _data(task, n=48, k=3, seed=0):
    rng = np.random.default_rng(seed)
    if task == "multilabel":
        labels = (rng.random((n, k)) < 0.4).astype(np.int64)
        labels[:k] = np.eye(k, dtype=np.int64)  # every label both present and absent
        labels[k : 2 * k] = 0
        key = labels @ (1 + np.arange(k))
    else:
        labels = np.arange(n) % k
        key = labels
    images = rng.integers(0, 60, (n, 16, 16)).astype(np.uint8)
    images += (40 * key[:, None, None]).astype(np.uint8)  # learnable: brightness by label
    return ClinicalDataset("toy", ArraySource(images), labels, [f"c{i}" for i in range(k)], task)


def _fit(task, **options):
    train, val = _data(task, seed=0), _data(task, seed=1)
    model = ImageClassifier(load_model("tiny-resnet"), train.num_classes)
    apply_target(model, "head")
    opts = FinetuneOptions(epochs=5, lr=0.05, patience=None, warmup_epochs=0, **options)
    return Finetune().fit(model, train, val, opts, Context(batch_size=16, seed=0))


@pytest.mark.parametrize("monitor", ["nll", "brier", "ece", "auroc"])
def test_the_best_epoch_is_the_best_value_in_the_metrics_direction(monitor):
    out = _fit("multiclass", monitor=monitor)
    values = [row[f"val_{monitor}"] for row in out["history"]]
    pick = np.argmax(values) if monitor == "auroc" else np.argmin(values)
    assert len(set(values)) > 1  # the choice is not trivial
    assert out["best_epoch"] == int(pick) and out["best_val"] == pytest.approx(values[pick])
    assert out["monitor"] == monitor


def test_multilabel_defaults_to_auroc():
    assert default_monitor("multilabel") == "auroc"
    assert default_monitor("binary") == default_monitor("multiclass") == "balanced_accuracy"
    out = _fit("multilabel")
    assert out["monitor"] == "auroc" and len(out["history"]) == 5
    values = [row["val_auroc"] for row in out["history"]]
    assert out["best_val"] == pytest.approx(max(values))


def test_a_monitor_the_task_lacks_fails_before_training():
    with pytest.raises(ConfigError, match=r"balanced_accuracy.*not a multilabel metric"):
        _fit("multilabel", monitor="balanced_accuracy")
    with pytest.raises(ConfigError, match="'val_loss' is not a multiclass metric"):
        _fit("multiclass", monitor="val_loss")
