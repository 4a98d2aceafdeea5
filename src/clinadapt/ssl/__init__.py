"""Self-supervised pre-training on unlabelled clinical images: SimCLR, DINO and MAE; on
volumes, 3D MAE (``mae-3d``) and 3D SimCLR (``simclr-3d``).

``pretrain(PretrainConfig(...))`` trains a backbone (from scratch or from published weights) on
the unlabelled images of a dataset, writes weights that ``load_model(name, weights=...)`` reads,
and judges them by a linear probe and k-NN on the labelled splits.
"""

from __future__ import annotations

# Imported for their registrations.
from clinadapt.ssl import dino, mae, simclr, volume  # noqa: F401
from clinadapt.ssl.augment import Augmenter, AugmentPolicy, policy_for_modality
from clinadapt.ssl.base import SSL_METHODS, SSLMethod
from clinadapt.ssl.checkpoint import read_metadata, save_backbone, weights_path
from clinadapt.ssl.config import PretrainConfig, make_config
from clinadapt.ssl.evaluate import evaluate_backbone
from clinadapt.ssl.trainer import pretrain

__all__ = [
    "SSL_METHODS",
    "AugmentPolicy",
    "Augmenter",
    "PretrainConfig",
    "SSLMethod",
    "evaluate_backbone",
    "make_config",
    "policy_for_modality",
    "pretrain",
    "read_metadata",
    "save_backbone",
    "weights_path",
]
