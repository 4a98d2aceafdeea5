"""MedSAM's medsam_vit_b.pth path: segment-anything checkpoints mapped onto transformers' SAM.

The reference is the segment-anything package itself: a tiny ``Sam`` built with the tiny
segmenters' architecture, its state dict saved as MedSAM saves ``medsam_vit_b.pth``, must give
the same embeddings, masks and IoU scores through clinadapt as through segment-anything.
"""

from __future__ import annotations

import pickle
from functools import partial

import numpy as np
import pytest
import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from segment_anything.utils.transforms import ResizeLongestSide

from clinadapt.errors import IncompatibleError
from clinadapt.segmentation import SEGMENTERS, load_segmenter, make_prompts
from clinadapt.segmentation.checkpoint import map_segment_anything_state, read_state


def tiny_segment_anything(seed: int = 0, embed_dim: int = 32) -> Sam:
    """segment-anything's Sam at the size of the tiny-sam config, random weights."""
    torch.manual_seed(seed)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=2,
            embed_dim=embed_dim,
            img_size=64,
            mlp_ratio=2,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=2,
            patch_size=8,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=[1],
            window_size=4,
            out_chans=32,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=32, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=8
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=32, mlp_dim=64, num_heads=2),
            transformer_dim=32,
            iou_head_depth=3,
            iou_head_hidden_dim=32,
        ),
    ).eval()
    with torch.no_grad():  # SAM zero-initialises rel-pos and pos-embed: randomise everything
        for p in sam.parameters():
            p.normal_(0.0, 0.2)
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.normal_(0.0, 1.0)
    return sam


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    sam = tiny_segment_anything()
    path = tmp_path_factory.mktemp("medsam") / "medsam_vit_b.pth"
    torch.save(sam.state_dict(), path)  # as MedSAM releases it: a bare state dict
    return sam, path


def _image() -> np.ndarray:
    rng = np.random.default_rng(3)
    return (rng.random((48, 60, 3)) * 255).astype(np.uint8)


def _reference(sam: Sam, emb, mp, multimask: bool):
    points = None if mp.points is None else (mp.points, mp.labels)
    sparse, dense = sam.prompt_encoder(points=points, boxes=mp.boxes, masks=mp.masks)
    return sam.mask_decoder(
        image_embeddings=emb,
        image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=multimask,
    )


@pytest.mark.parametrize(
    ("prompt", "multimask"),
    [
        (dict(boxes=[[5, 6, 40, 30], [0, 0, 59, 47]]), False),
        (dict(points=[[[10, 12], [30, 20]]], point_labels=[[1, 0]]), True),
        (dict(boxes=[[5, 6, 40, 30]], points=[[20, 15]], point_labels=[1]), False),
        ("mask", False),
    ],
)
def test_medsam_checkpoint_gives_the_same_masks_as_segment_anything(checkpoint, prompt, multimask):
    sam, path = checkpoint
    seg = load_segmenter("tiny-medsam", weights=path)
    img = _image()
    x, frames = seg.preprocess([img])
    if prompt == "mask":
        m = np.zeros(img.shape[:2], dtype=bool)
        m[10:30, 12:40] = True
        prompt = dict(mask=m)
    mp = seg.model_prompts(make_prompts(img.shape[:2], **prompt), frames[0])
    with torch.no_grad():
        emb = seg.encode(x)
        ref_emb = sam.image_encoder(x)
        torch.testing.assert_close(emb, ref_emb, atol=1e-5, rtol=1e-5)
        low, iou = seg.decode_prompts(emb, mp, multimask)
        ref_low, ref_iou = _reference(sam, ref_emb, mp, multimask)
    assert low.abs().mean() > 1e-2  # a meaningful comparison, not of zeros
    torch.testing.assert_close(low, ref_low, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)


def test_sam_preprocessing_matches_segment_anything_and_postprocess_too(checkpoint):
    """tiny-sam's rule against segment-anything's SamPredictor steps on the same model."""
    sam, path = checkpoint
    seg = load_segmenter("tiny-sam", weights=path)
    img = _image()
    x, frames = seg.preprocess([img])
    transform = ResizeLongestSide(64)
    assert frames[0].resized == transform.get_preprocess_shape(48, 60, 64)
    # SamPredictor.set_torch_image: resize (tested above), then Sam.preprocess (normalise, pad)
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(img).permute(2, 0, 1)[None].float(),
        size=frames[0].resized,
        mode="bilinear",
        align_corners=False,
        antialias=True,
    )
    torch.testing.assert_close(x, sam.preprocess(resized), atol=1e-5, rtol=1e-5)
    boxes = np.array([[5.0, 6.0, 40.0, 30.0]])
    torch.testing.assert_close(
        frames[0].boxes_to_model(torch.tensor(boxes)),
        torch.tensor(transform.apply_boxes(boxes, (48, 60))),
    )
    low = torch.randn(1, 8 * 4, 8 * 4) * 3
    want = torch.sigmoid(sam.postprocess_masks(low[None], frames[0].resized, (48, 60))[0])
    torch.testing.assert_close(seg.upsample(low, frames[0]), want, atol=1e-5, rtol=1e-5)


def test_checkpoint_of_another_size_says_which_segmenter_to_use(tmp_path):
    sam = tiny_segment_anything(embed_dim=48)
    path = tmp_path / "sam_other.pth"
    torch.save(sam.state_dict(), path)
    with pytest.raises(IncompatibleError, match="does not fit segmenter 'tiny-medsam'"):
        load_segmenter("tiny-medsam", weights=path)


def test_training_checkpoints_and_ddp_prefixes_are_unwrapped(checkpoint, tmp_path):
    sam, _ = checkpoint
    path = tmp_path / "medsam_model_best.pth"
    state = {f"module.{k}": v for k, v in sam.state_dict().items()}
    torch.save({"model": state, "epoch": 3}, path)
    got = read_state(path)
    assert set(got) == set(sam.state_dict())
    seg = load_segmenter("tiny-medsam", weights=path)
    out = seg.segment(_image(), boxes=[[5, 6, 40, 30]])
    assert out.probs.shape == (1, 48, 60)


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoints_are_read_without_running_code(tmp_path):
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        pickle.dump({"image_encoder.x": _Evil()}, f, protocol=2)
    with pytest.raises(IncompatibleError, match="tensors-only"):
        read_state(path)


def test_medsam_checkpoint_found_in_the_model_dir(checkpoint, tmp_path, monkeypatch):
    _, path = checkpoint
    folder = tmp_path / "models" / "medsam"
    folder.mkdir(parents=True)
    (folder / "medsam_vit_b.pth").write_bytes(path.read_bytes())
    monkeypatch.setenv("CLINADAPT_MODEL_DIR", str(tmp_path / "models"))
    # the published entry with the tiny architecture (the real one is ViT-B)
    seg = load_segmenter("medsam", config=SEGMENTERS.get("tiny-sam").config)
    assert seg.source.startswith("model dir") and seg.preprocessing.rule == "medsam"
    ref = load_segmenter("tiny-medsam", weights=path)
    img = _image()
    torch.testing.assert_close(
        seg.segment(img, boxes=[[5, 6, 40, 30]]).probs,
        ref.segment(img, boxes=[[5, 6, 40, 30]]).probs,
    )


def test_every_segment_anything_key_has_a_transformers_name(checkpoint):
    sam, _ = checkpoint
    mapped = map_segment_anything_state(sam.state_dict())
    own = load_segmenter("tiny-sam").sam.state_dict()
    assert set(mapped) == set(own)
