"""The promptable-segmenter interface every family (SAM, MedSAM, SAM 2) presents.

An image is encoded once (:meth:`Segmenter.embed`); any number of prompts are then decoded on
that embedding (:meth:`Segmenter.predict`), each giving mask logits at the image's resolution.
:meth:`Segmenter.segment` does both for one image. For training, :meth:`Segmenter.encode` and
:meth:`Segmenter.decode_prompts` are the same steps with gradients and tensors in the model frame.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from clinadapt.errors import DataError, IncompatibleError
from clinadapt.segmentation.predict import MaskModel, ProbMap, union_by_class
from clinadapt.segmentation.preprocess import (
    Frame,
    SegPreprocessing,
    mask_to_model,
    prepare_image,
    upsample,
)
from clinadapt.segmentation.prompts import (
    DefaultPrompt,
    Prompts,
    make_prompts,
    mask_prompt_logits,
)

Features = torch.Tensor | list[torch.Tensor]

#: Prompts decoded at once on one image without gradients. The decoder runs on a copy of the
#: image embedding per prompt, so hundreds of objects (one prompt per cell or nodule) at once
#: exhaust a GPU; SAM's automatic mask generator decodes 64 points per batch
#: (segment_anything/automatic_mask_generator.py, points_per_batch=64).
PROMPT_BATCH = 64


@dataclass
class ModelPrompts:
    """One image's prompts as tensors in the model's input frame (P objects)."""

    boxes: torch.Tensor | None  # (P, 4)
    points: torch.Tensor | None  # (P, K, 2)
    labels: torch.Tensor | None  # (P, K)
    masks: torch.Tensor | None  # (P, 1, m, m) logits
    count: int
    use_default: bool = False

    def part(self, start: int, stop: int) -> ModelPrompts:
        """Objects ``start:stop`` (the learned default prompt is never split)."""
        if self.use_default or (start, stop) == (0, self.count):
            return self

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        stop = min(stop, self.count)
        return ModelPrompts(
            cut(self.boxes), cut(self.points), cut(self.labels), cut(self.masks), stop - start
        )


@dataclass
class ImageEmbedding:
    """The encoder's output for one image, reusable for any number of prompts."""

    features: Features  # batch of one
    frame: Frame


@dataclass
class SegmentationOutput:
    """Masks for P prompts on one image, at the image's resolution.

    ``probs`` (P, H, W) foreground probabilities; ``masks`` = probs > 0.5 (SAM: logit > 0;
    MedSAM: sigmoid, upsampled, > 0.5); ``scores`` (P,) the IoU head's estimate of the chosen
    mask; ``low_res_logits`` (P, h, w) in the model frame; ``class_ids`` (P,) the label each
    prompt asked for.
    """

    probs: torch.Tensor
    scores: torch.Tensor
    low_res_logits: torch.Tensor
    class_ids: np.ndarray
    threshold: float = 0.5

    @property
    def masks(self) -> torch.Tensor:
        return self.probs > self.threshold

    @property
    def logits(self) -> torch.Tensor:
        """Logits at the image's resolution (the inverse sigmoid of ``probs``)."""
        return torch.logit(self.probs, eps=1e-6)

    def class_masks(self, num_classes: int) -> np.ndarray:
        """(C, H, W) booleans: per class, the union of its prompts' masks (overlaps kept)."""
        return union_by_class(self.masks.cpu().numpy(), self.class_ids, num_classes)

    def label_map(self) -> np.ndarray:
        """(H, W) labels: each pixel takes the class of its most probable mask, 0 if none."""
        if len(self.probs) == 0:
            raise DataError("no prompt, no mask: the output holds zero masks")
        probs = self.probs.detach().cpu()
        best = probs.argmax(0).numpy()
        fg = (probs > self.threshold).any(0).numpy()
        ids = np.asarray(self.class_ids, dtype=np.int64)
        return np.where(fg, ids[best], 0).astype(np.int64)


def take(features: Features, i: int) -> Features:
    """Image ``i`` of a batch of features, kept as a batch of one."""
    if isinstance(features, list):
        return [f[i : i + 1] for f in features]
    return features[i : i + 1]


def repeat(features: Features, n: int) -> Features:
    """A batch-of-one embedding repeated for ``n`` objects."""
    if isinstance(features, list):
        return [f.expand(n, *f.shape[1:]) for f in features]
    return features.expand(n, *features.shape[1:])


class Segmenter(nn.Module, MaskModel):
    """A promptable segmenter: image encoder, prompt encoder, mask decoder, preprocessing.

    ``encoder`` is the image encoder (the ``lora``/``adapter``/``norm``/``bias`` targets act on
    it), ``prompt_encoder`` and ``mask_decoder`` the other two parts (``prompt-encoder`` and
    ``decoder`` targets). ``default_prompt`` holds a learned per-class prompt once
    :meth:`add_default_prompt` made one.
    """

    family: ClassVar[str] = "sam"

    def __init__(
        self,
        name: str,
        preprocessing: SegPreprocessing,
        *,
        mask_input_size: int,
        source: str = "random init",
    ) -> None:
        super().__init__()
        self.name = name
        self.preprocessing = preprocessing
        self.mask_input_size = int(mask_input_size)
        self.source = source
        self.default_prompt: DefaultPrompt | None = None
        # prompts per decoder call at inference; halved on out-of-memory (see decode_in_parts)
        self.prompt_batch = PROMPT_BATCH

    # --- the three parts, by family ----------------------------------------------------------

    @property
    @abc.abstractmethod
    def encoder(self) -> nn.Module:
        """The image encoder."""

    @property
    @abc.abstractmethod
    def prompt_encoder(self) -> nn.Module:
        """The prompt encoder."""

    @property
    @abc.abstractmethod
    def mask_decoder(self) -> nn.Module:
        """The mask decoder."""

    @abc.abstractmethod
    def encode(self, pixel_values: torch.Tensor) -> Features:
        """(B, 3, S, S) preprocessed images -> image features (with gradients when enabled)."""

    @abc.abstractmethod
    def embed_prompts(
        self,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        masks: torch.Tensor | None,
        count: int,
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Sparse (N, 1, T, D) and dense (N, D, h, w) embeddings of N object prompts."""

    @abc.abstractmethod
    def decode(
        self,
        features: Features,
        sparse: torch.Tensor | None,
        dense: torch.Tensor,
        multimask: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-object features and prompts -> low-res logits (N, M, h, w) and IoU (N, M)."""

    def encoder_modules(self) -> list[nn.Module]:
        """The modules :meth:`encode` runs (an embedding cache is valid while they are frozen)."""
        return [self.encoder]

    # --- preprocessing and prompts in the model frame ---------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def input_size(self) -> int:
        return self.preprocessing.size

    def preprocess(
        self, images: Sequence[np.ndarray | torch.Tensor], modality: str | None = None
    ) -> tuple[torch.Tensor, list[Frame]]:
        """Images (H, W) / (H, W, C), each its own size -> (B, 3, S, S) input and frames."""
        out = [prepare_image(im, self.preprocessing, modality) for im in images]
        if not out:
            raise DataError("no image to preprocess")
        return torch.stack([x for x, _ in out]).to(self.device), [f for _, f in out]

    def model_prompts(self, prompts: Prompts, frame: Frame) -> ModelPrompts:
        """One image's checked prompts moved into the model's input frame, on its device."""
        dev = self.device
        if prompts.is_empty:
            if self.default_prompt is None:
                raise IncompatibleError(
                    f"segmenter {self.name!r} got no prompt: give boxes, points or a mask, or "
                    "train a learned default prompt (add_default_prompt + target prompt-encoder)"
                )
            return ModelPrompts(None, None, None, None, self.default_prompt.num_classes, True)
        boxes = points = labels = masks = None
        if prompts.boxes is not None:
            boxes = frame.boxes_to_model(torch.as_tensor(prompts.boxes, dtype=torch.float32))
            boxes = boxes.to(dev)
        if prompts.points is not None:
            points = frame.coords_to_model(torch.as_tensor(prompts.points, dtype=torch.float32))
            points = points.to(dev)
            labels = torch.as_tensor(prompts.point_labels, dtype=torch.int64, device=dev)
        if prompts.masks is not None:
            logits = mask_prompt_logits(prompts.masks)
            masks = mask_to_model(logits, frame, self.mask_input_size, self.preprocessing).to(dev)
        return ModelPrompts(boxes, points, labels, masks, prompts.count)

    def decode_prompts(
        self, features: Features, prompts: ModelPrompts, multimask: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One image's features (batch of one) and its P prompts -> (P, M, h, w), (P, M)."""
        n = prompts.count
        if prompts.use_default:
            assert self.default_prompt is not None
            sparse = self.default_prompt()[:, None]  # (C, 1, T, D)
            _, dense = self.embed_prompts(None, None, None, None, n)
        else:
            sparse, dense = self.embed_prompts(
                prompts.points, prompts.labels, prompts.boxes, prompts.masks, n
            )
        return self.decode(repeat(features, n), sparse, dense, multimask)

    def upsample(self, low_res: torch.Tensor, frame: Frame) -> torch.Tensor:
        """(P, h, w) low-res logits -> (P, H, W) probabilities at the image's resolution."""
        return upsample(low_res, frame, self.preprocessing)

    def add_default_prompt(self, class_names: Sequence[str]) -> DefaultPrompt:
        """Give the segmenter a learned prompt per class (prompt-free use), whole-image boxes."""
        s = float(self.input_size - 1)
        box = torch.tensor([[0.0, 0.0, s, s]], device=self.device)
        with torch.no_grad():
            sparse, _ = self.embed_prompts(None, None, box, None, 1)
        assert sparse is not None
        self.default_prompt = DefaultPrompt(class_names, sparse[0, 0]).to(self.device)
        return self.default_prompt

    # --- inference: embed once, predict many ---------------------------------------------------

    @torch.no_grad()
    def embed(
        self, image: np.ndarray | torch.Tensor, modality: str | None = None
    ) -> ImageEmbedding:
        """Encode one image (H, W) or (H, W, C); reuse the result for every prompt on it."""
        pixel_values, frames = self.preprocess([image], modality)
        return ImageEmbedding(self.encode(pixel_values), frames[0])

    @torch.no_grad()
    def predict(
        self,
        embedding: ImageEmbedding,
        prompts: Prompts | None = None,
        multimask: bool | None = None,
    ) -> SegmentationOutput:
        """Masks for ``prompts`` on an embedded image (no prompt: the learned default).

        ``multimask=None`` follows SAM's advice: three candidate masks, the IoU head choosing,
        when each object has a single point and nothing else (an ambiguous prompt); one mask
        otherwise. MedSAM always predicts one mask (as its inference script).
        """
        prompts = prompts if prompts is not None else Prompts()
        if prompts.asks_nothing:
            h, w = embedding.frame.original
            m = self.mask_input_size
            return SegmentationOutput(
                torch.zeros(0, h, w), torch.zeros(0), torch.zeros(0, m, m), prompts.ids()
            )
        mp = self.model_prompts(prompts, embedding.frame)
        if multimask is None:
            multimask = self.preprocessing.rule != "medsam" and prompts.single_point()
        probs, score, low = self.decode_in_parts(embedding.features, mp, multimask, embedding.frame)
        ids = np.arange(1, mp.count + 1, dtype=np.int64) if mp.use_default else prompts.ids()
        return SegmentationOutput(probs.cpu(), score.cpu(), low.cpu(), ids)

    def decode_in_parts(
        self, features: Features, prompts: ModelPrompts, multimask: bool, frame: Frame
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode one image's prompts ``prompt_batch`` at a time, without gradients: (P, H, W)
        probabilities at the image's resolution, (P,) scores and (P, h, w) low-res logits.

        When the device runs out of memory the part is halved (down to one prompt) and the
        smaller size kept for the rest of the run; the masks are the same whatever the size.
        """
        outs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        start = 0
        while start < prompts.count:
            part = prompts.part(start, start + max(1, int(self.prompt_batch)))
            try:
                with torch.no_grad():
                    low, iou = self.decode_prompts(features, part, multimask)
                    low, score = choose_mask(low, iou)
                    outs.append((self.upsample(low, frame), score, low))
            except torch.OutOfMemoryError as e:
                if part.count <= 1:
                    e.add_note(
                        f"segmenter {self.name!r}: out of memory decoding a single prompt on "
                        f"{self.device}; use a smaller image, --precision bf16, or the CPU"
                    )
                    raise
                self.prompt_batch = max(1, part.count // 2)
            else:
                start += part.count
                continue
            if self.device.type == "cuda":  # the failed part's tensors are released by now
                torch.cuda.empty_cache()
        probs, scores, lows = (torch.cat(t) for t in zip(*outs, strict=True))
        return probs, scores, lows

    def mask_probs(
        self,
        images: Sequence[np.ndarray | torch.Tensor],
        prompts: Sequence[Prompts],
        modality: str | None = None,
    ) -> list[ProbMap]:
        """One probability map per prompt of each image, at its resolution (with gradients).

        The mask choice follows :meth:`predict`; training-time callers that want MedSAM's single
        mask everywhere pass box prompts, which never use the multimask output.
        """
        if len(images) != len(prompts):
            raise DataError(f"{len(prompts)} prompt sets for {len(images)} images")
        x, frames = self.preprocess(images, modality)
        feats = self.encode(x)
        out = []
        for i, frame in enumerate(frames):
            p = prompts[i]
            if p.asks_nothing:
                out.append(ProbMap(x.new_zeros(0, *frame.original), False, p.ids()))
                continue
            mp = self.model_prompts(p, frame)
            multimask = self.preprocessing.rule != "medsam" and p.single_point()
            if torch.is_grad_enabled():  # training: the whole image's prompts in one graph
                low, iou = self.decode_prompts(take(feats, i), mp, multimask)
                probs = self.upsample(choose_mask(low, iou)[0], frame)
            else:
                probs = self.decode_in_parts(take(feats, i), mp, multimask, frame)[0]
            ids = np.arange(1, mp.count + 1, dtype=np.int64) if mp.use_default else p.ids()
            out.append(ProbMap(probs, False, ids))
        return out

    def forward(
        self, images: Sequence[np.ndarray | torch.Tensor], prompts: Sequence[Prompts]
    ) -> list[ProbMap]:
        """``segmenter(images, prompts)`` is :meth:`mask_probs`."""
        return self.mask_probs(images, prompts)

    def segment(
        self,
        image: np.ndarray | torch.Tensor,
        boxes: Any = None,
        points: Any = None,
        point_labels: Any = None,
        mask: Any = None,
        *,
        class_ids: Any = None,
        multimask: bool | None = None,
        modality: str | None = None,
    ) -> SegmentationOutput:
        """Segment one image with boxes (P, 4), points (P, K, 2) + labels, and/or masks.

        Coordinates are pixels of ``image``; the masks come back at its resolution.
        ``modality="ct"`` windows raw Hounsfield units (level 40, width 400) first.
        """
        shape = tuple(np.shape(image))[:2]
        prompts = make_prompts(
            shape,  # type: ignore[arg-type]
            boxes=boxes,
            points=points,
            point_labels=point_labels,
            mask=mask,
            class_ids=class_ids,
        )
        return self.predict(self.embed(image, modality), prompts, multimask)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary for result records."""
        return {
            "name": self.name,
            "family": self.family,
            "task": "segmentation",
            "preprocess": self.preprocessing.to_dict(),
            "parameters": sum(p.numel() for p in self.parameters()),
            "default_prompt": None
            if self.default_prompt is None
            else self.default_prompt.class_names,
            "source": self.source,
        }


def choose_mask(low: torch.Tensor, iou: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, M, h, w), (P, M) -> the mask the IoU head rates highest: (P, h, w), (P,)."""
    if low.shape[1] == 1:
        return low[:, 0], iou[:, 0]
    best = iou.argmax(dim=1)
    rows = torch.arange(low.shape[0], device=low.device)
    return low[rows, best], iou[rows, best]
