"""SAM and MedSAM on transformers' ``SamModel``; SAM 2 on ``Sam2Model``.

Both run their own prompt encoder and mask decoder on an embedding computed once per image.
Each object prompt is its own row in the decoder's batch (the image features repeated per
object), so a mask prompt can differ per object, as in segment-anything's ``Sam.forward``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from clinadapt.segmentation.base import Features, Segmenter
from clinadapt.segmentation.preprocess import SegPreprocessing


def fix_positional_embedding(sam: nn.Module) -> None:
    """Make SAM's random Fourier position matrix a buffer, as in segment-anything.

    segment-anything registers ``positional_encoding_gaussian_matrix`` as a buffer (it is never
    trained); transformers makes it a parameter shared by two modules. As a buffer it stays out
    of every target's trainable count and optimiser, and both modules keep sharing one tensor.
    """
    shared = sam.shared_image_embedding
    value = shared.positional_embedding.detach()
    for module in (shared, sam.prompt_encoder.shared_embedding):
        if isinstance(module._parameters.get("positional_embedding"), nn.Parameter):
            del module._parameters["positional_embedding"]
        module.register_buffer("positional_embedding", value)


class TransformersSam(Segmenter):
    """A transformers ``SamModel`` or ``Sam2Model`` (``self.sam``) and its preprocessing rule."""

    # SAM 2's decoder needs a sparse token: with no point and no box, one "not a point" is
    # embedded, as Sam2Model.forward does.
    pad_empty_prompt: bool = False

    def __init__(
        self, name: str, sam: nn.Module, preprocessing: SegPreprocessing, source: str
    ) -> None:
        cfg = sam.config.prompt_encoder_config
        super().__init__(
            name,
            preprocessing,
            mask_input_size=4 * (cfg.image_size // cfg.patch_size),
            source=source,
        )
        self.sam = sam

    @property
    def encoder(self) -> nn.Module:
        return self.sam.vision_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.sam.prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam.mask_decoder

    def embed_prompts(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        count: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.pad_empty_prompt and points is None and boxes is None:
            dev = self.sam.prompt_encoder.no_mask_embed.weight.device
            points = torch.zeros(count, 1, 2, device=dev)
            labels = -torch.ones(count, 1, dtype=torch.int64, device=dev)
        # each object is its own row: (N, 1, ...) with a point batch of one
        sparse, dense = self.sam.prompt_encoder(
            input_points=None if points is None else points[:, None],
            input_labels=None if labels is None else labels[:, None],
            input_boxes=None if boxes is None else boxes[:, None],
            input_masks=masks,
        )
        if dense.shape[0] != count:
            dense = dense.expand(count, *dense.shape[1:])
        return sparse, dense

    def _decode(
        self,
        features: torch.Tensor,
        sparse: torch.Tensor | None,
        dense: torch.Tensor,
        multimask: bool,
        **extra: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = features.shape[0]
        pe = self.sam.get_image_wide_positional_embeddings().expand(n, -1, -1, -1)
        low, iou, *_ = self.sam.mask_decoder(
            image_embeddings=features,
            image_positional_embeddings=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
            **extra,
        )
        return low[:, 0], iou[:, 0]


class SamSegmenter(TransformersSam):
    """SAM ViT-B/L/H and MedSAM on transformers' ``SamModel``."""

    family = "sam"

    def __init__(
        self, name: str, sam: nn.Module, preprocessing: SegPreprocessing, source: str
    ) -> None:
        fix_positional_embedding(sam)
        super().__init__(name, sam, preprocessing, source)

    def encode(self, pixel_values: torch.Tensor) -> Features:
        return self.sam.vision_encoder(pixel_values).last_hidden_state

    def decode(
        self, features: Features, sparse: torch.Tensor | None, dense: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(features, torch.Tensor)
        return self._decode(features, sparse, dense, multimask)


class Sam2Segmenter(TransformersSam):
    """SAM 2 (Hiera image encoder, FPN neck, high-resolution skip features in the decoder).

    Only the image path of SAM 2 is used (no memory): each image is segmented on its own, with
    the no-memory embedding added to the lowest-resolution features as ``Sam2Model`` does.
    """

    family = "sam2"
    pad_empty_prompt = True

    def encoder_modules(self) -> list[nn.Module]:
        # the decoder's conv_s0/conv_s1 project the high-resolution features once per image
        d = self.sam.mask_decoder
        return [self.sam.vision_encoder, d.conv_s0, d.conv_s1]

    def encode(self, pixel_values: torch.Tensor) -> Features:
        # Sam2Model.get_image_embeddings without its torch.no_grad, so encoders can be trained
        b = pixel_values.shape[0]
        out = self.sam.get_image_features(pixel_values, return_dict=True)
        maps = list(out.fpn_hidden_states)
        maps[-1] = maps[-1] + self.sam.no_memory_embedding
        return [
            f.permute(1, 2, 0).reshape(b, -1, *size)
            for f, size in zip(maps, self.sam.backbone_feature_sizes, strict=True)
        ]

    def decode(
        self, features: Features, sparse: torch.Tensor | None, dense: torch.Tensor, multimask: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert isinstance(features, list)
        return self._decode(
            features[-1], sparse, dense, multimask, high_resolution_features=features[:-1]
        )


def build_sam(kind: str, config: dict[str, Any]) -> nn.Module:
    """A randomly initialised transformers ``SamModel`` (kind ``sam``) or ``Sam2Model``."""
    import transformers

    if kind == "sam2":
        return transformers.Sam2Model(transformers.Sam2Config(**config))
    return transformers.SamModel(transformers.SamConfig(**config))
