"""`clinadapt segment` and `clinadapt segmenters`: masks, overlays, prompts files, NIfTI, weights."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from clinadapt.cli import app
from clinadapt.errors import ConfigError, DataError
from clinadapt.segmentation import load_segmenter, make_prompts
from clinadapt.segmentation.apply import class_names_metadata, cli_prompts, load_for_inference
from clinadapt.segmentation.io import overlay, read_input
from clinadapt.targets import apply_target, save_adapted

runner = CliRunner(env={"COLUMNS": "200"})


def _png(path, seed=0, shape=(48, 64)):
    rng = np.random.default_rng(seed)
    img = (rng.random(shape) * 80).astype(np.uint8)
    img[10:30, 20:50] += 150
    Image.fromarray(img).save(path)
    return img


def _ok(result):
    assert result.exit_code == 0, result.output
    return result


def _segment_json(*args: str) -> list[dict]:
    """`clinadapt segment ARGS --json`, checked, parsed."""
    return json.loads(_ok(runner.invoke(app, ["segment", *args, "--json"])).stdout)


def test_segmenters_listing():
    names = {
        e["name"] for e in json.loads(_ok(runner.invoke(app, ["segmenters", "--json"])).stdout)
    }
    assert {"sam-vit-b", "medsam", "sam2-hiera-tiny", "tiny-medsam"} <= names


def test_segment_one_png_with_a_box_writes_the_mask_and_overlay(tmp_path):
    img = _png(tmp_path / "scan.png")
    out = tmp_path / "masks"
    args = ["--model", "tiny-medsam", "--image", str(tmp_path / "scan.png")]
    (item,) = _segment_json(*args, "--box", "20,10,49,29", "--out", str(out))
    mask = np.asarray(Image.open(item["mask"]))
    assert mask.shape == img.shape and set(np.unique(mask)) <= {0, 1}
    # the written mask is what the Python API gives for the same prompt
    want = load_segmenter("tiny-medsam").segment(img, boxes=[[20, 10, 49, 29]]).label_map()
    np.testing.assert_array_equal(mask, want)
    (picture,) = item["overlays"]
    assert np.asarray(Image.open(picture)).shape == (*img.shape, 3)


def test_segment_a_folder_with_a_csv_prompts_file(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "a.png", 0)
    _png(folder / "b.png", 1, (40, 40))
    (tmp_path / "p.csv").write_text(
        "image,object,x1,y1,x2,y2,x,y,label,class\n"
        "a.png,1,20,10,49,29,,,,1\n"
        "a.png,2,0,0,10,10,,,,2\n"
        "b.png,,,,,,20,20,1,\n"
    )
    out = tmp_path / "masks"
    items = _segment_json(
        "--model",
        "tiny-sam",
        "--images",
        str(folder),
        "--prompts",
        str(tmp_path / "p.csv"),
        "--out",
        str(out),
    )
    assert [i["objects"] for i in items] == [2, 1]
    assert (out / "a_mask.png").is_file() and (out / "b_overlay.png").is_file()
    assert set(np.unique(np.asarray(Image.open(out / "a_mask.png")))) <= {0, 1, 2}


def test_segment_a_nifti_volume_keeps_its_geometry(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 30, size=(40, 50, 3)).astype(np.float32)
    hu[10:25, 15:35, :] = 200.0  # bright soft tissue / contrast
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    out = tmp_path / "masks"
    image = str(tmp_path / "ct.nii.gz")
    (item,) = _segment_json(
        "--model",
        "tiny-medsam",
        "--image",
        image,
        "--box",
        "15,10,34,24",
        "--modality",
        "ct",
        "--out",
        str(out),
    )
    assert item["objects"] == 3  # one per slice
    written = nib.load(item["mask"])
    assert written.shape == (40, 50, 3)
    np.testing.assert_allclose(written.affine, affine)
    assert np.asarray(written.dataobj).dtype == np.uint8
    seg = load_segmenter("tiny-medsam")
    want = seg.segment(hu[:, :, 1], boxes=[[15, 10, 34, 24]], modality="ct").label_map()
    np.testing.assert_array_equal(np.asarray(written.dataobj)[:, :, 1], want)


def test_segment_with_adapted_weights_and_a_learned_prompt(tmp_path):
    seg = load_segmenter("tiny-sam")
    seg.add_default_prompt(["lung", "lesion"])
    info = apply_target(seg, "lora+prompt-encoder")
    with torch.no_grad():
        for p in seg.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    path = save_adapted(
        seg, tmp_path / "adapted.safetensors", target=info, metadata=class_names_metadata(seg)
    )
    img = _png(tmp_path / "scan.png")
    (item,) = _segment_json(
        "--weights", str(path), "--image", str(tmp_path / "scan.png"), "--out", str(tmp_path / "m")
    )
    mask = np.asarray(Image.open(item["mask"]))
    np.testing.assert_array_equal(mask, seg.segment(img).label_map())
    loaded = load_for_inference(None, str(path))
    assert loaded.default_prompt.class_names == ["lung", "lesion"]
    with pytest.raises(ConfigError, match="adapted from 'tiny-sam'"):
        load_for_inference("tiny-medsam", str(path))


def test_cli_prompt_errors_are_clear(tmp_path):
    _png(tmp_path / "scan.png")
    base = ["segment", "--model", "tiny-sam", "--image", str(tmp_path / "scan.png")]
    res = runner.invoke(app, [*base, "--box", "1,2,3"])
    assert res.exit_code != 0 and "expected 4 comma-separated numbers" in str(res.exception)
    res = runner.invoke(app, base)
    assert res.exit_code != 0 and "no prompt" in str(res.exception)
    res = runner.invoke(app, [*base, "--box", "0,0,500,10"])
    assert "outside" in str(res.exception)
    with pytest.raises(ConfigError, match="several --box"):
        cli_prompts((48, 64), ["0,0,5,5", "1,1,6,6"], ["2,2"])
    p = cli_prompts((48, 64), ["0,0,20,20"], ["5,5"], ["30,30"])
    assert p.point_labels.tolist() == [[1, 0]] and p.boxes.shape == (1, 4)
    with pytest.raises(DataError, match="no such image"):
        read_input(tmp_path / "missing.png")


def test_overlay_draws_masks_contours_reference_and_prompts():
    img = np.zeros((20, 30), dtype=np.uint8)
    labels = np.zeros((20, 30), dtype=np.int64)
    labels[5:15, 5:15] = 1
    ref = np.zeros((20, 30), dtype=np.uint8)
    ref[2:18, 18:28] = 1
    prompts = make_prompts((20, 30), boxes=[[4, 4, 16, 16]], points=[[10, 10]], point_labels=[1])
    pic = overlay(img, labels, prompts, reference=ref)
    assert pic.shape == (20, 30, 3) and pic.dtype == np.uint8
    assert tuple(pic[5, 10]) == (31, 119, 180)  # class-1 contour in its colour
    assert pic[10, 12].sum() > 0  # filled inside (blended)
    assert tuple(pic[2, 22]) == (255, 255, 255)  # reference contour
    assert tuple(pic[4, 7]) == (255, 215, 0)  # the box outline
    assert pic[0, 0].sum() == 0  # untouched background
    with pytest.raises(DataError, match="does not fit"):
        overlay(img, labels[:5], None)


def test_segment_a_dataset_with_prompts_derived_from_its_masks(tmp_path):
    out = tmp_path / "masks"
    items = _segment_json(
        "--model",
        "tiny-medsam",
        "--data",
        "clinical-shift-seg",
        "--limit",
        "3",
        "--derive",
        "box",
        "--jitter",
        "5",
        "--out",
        str(out),
    )
    assert len(items) == 3
    assert (out / "clinical-shift-seg_00000_mask.png").is_file()
    assert (out / "clinical-shift-seg_00000_overlay.png").is_file()
    from clinadapt.data import load_dataset
    from clinadapt.segmentation.prompts import PromptSpec

    ds = load_dataset("clinical-shift-seg")
    d = PromptSpec(kind="box", jitter=5).derive(ds.mask(1), 1, seed=0)
    want = load_segmenter("tiny-medsam").predict(
        load_segmenter("tiny-medsam").embed(ds.image(1)), d.prompts
    )
    got = np.asarray(Image.open(out / "clinical-shift-seg_00001_mask.png"))
    np.testing.assert_array_equal(got, want.label_map() if len(want.probs) else 0)
    res = runner.invoke(
        app,
        ["segment", "--model", "tiny-sam", "--data", "clinical-shift-seg", "--derive", "scribble"],
    )
    assert res.exit_code != 0 and "prompt options" in str(res.exception)
    res = runner.invoke(app, ["segment", "--model", "tiny-sam", "--data", "clinical-shift"])
    assert res.exit_code != 0 and "segmentation dataset" in str(res.exception)
    res = runner.invoke(app, ["segment", "--model", "tiny-sam"])
    assert res.exit_code != 0 and "--data DATASET" in str(res.exception)
