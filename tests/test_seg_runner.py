"""Segmentation runs end to end on tiny SAM configs: records, baselines, cache, protocols."""

import numpy as np
import pytest

from clinadapt.config import RunConfig, load_config
from clinadapt.data.segmentation import MaskSource
from clinadapt.data.synthetic_seg import make_clinical_shift_seg
from clinadapt.errors import ConfigError, DataError, IncompatibleError
from clinadapt.evaluation.seg_metrics import score_images, summarise_table
from clinadapt.methods.base import Context
from clinadapt.methods.seg.base import fill_boxes, predict_with_prompts
from clinadapt.methods.seg.sam import few_shot_images
from clinadapt.runner import run_experiment
from clinadapt.segmentation import load_segmenter
from clinadapt.segmentation.prompts import PromptSpec

SMALL = {
    "shift": "domain",
    "shift_options": {"source": "site-a", "target_split": "test"},
    "data_options": {"patients_per_site": 8},
    "evaluation": {"n_boot": 10},
    "batch_size": 8,
}


def run(tmp_path, method, **over):
    return run_experiment(
        load_config(None, method=method, out_dir=str(tmp_path), **{**SMALL, **over})
    )


@pytest.fixture(scope="module")
def zeroshot(tmp_path_factory):
    out = tmp_path_factory.mktemp("zs")
    return out, run(out, "seg-zeroshot")


def test_config_prompt_is_checked_and_only_for_segmentation():
    assert RunConfig().prompt is None and "prompt" not in RunConfig().identity()
    assert RunConfig(method="seg-zeroshot", prompt={"kind": "points", "k": 3}).prompt["k"] == 3
    with pytest.raises(ConfigError, match="prompt applies to segmentation"):
        load_config(None, method="finetune", prompt={"kind": "box"})
    with pytest.raises(ConfigError, match=r"prompt: option 'kind': .*got 'scribble'"):
        load_config(None, method="seg-zeroshot", prompt={"kind": "scribble"})


def test_config_defaults_follow_the_method_task():
    assert (RunConfig().model, RunConfig().data) == ("tiny-resnet", "clinical-shift")
    seg = RunConfig(method="seg-finetune")
    assert (seg.model, seg.data) == ("tiny-sam", "clinical-shift-seg")
    assert RunConfig(method="unet").model == "monai-unet"
    assert RunConfig(method="seg-zeroshot", model="tiny-medsam").model == "tiny-medsam"
    # the defaults resolve to values: a classification run keeps its identity
    assert RunConfig(model="tiny-resnet", data="clinical-shift").run_id() == RunConfig().run_id()


def test_zero_shot_record(zeroshot):
    _, rec = zeroshot
    assert rec["task"] == "segmentation" and rec["method"]["name"] == "seg-zeroshot"
    assert rec["model"]["name"] == "tiny-sam" and rec["target"]["trainable"] == 0
    assert set(rec["metrics"]) == {"site-a", "site-b", "site-c", "site-d"}
    for key in ("dice", "dice_present", "nsd", "hd95", "dice/lesion", "false_detection"):
        assert key in rec["metrics"]["site-b"]
    assert set(rec["summary"]) == {"dice", "dice_present", "nsd", "hd95"}
    assert rec["summary"]["dice"]["in_domain"] == pytest.approx(rec["metrics"]["site-a"]["dice"])
    assert rec["ci"]["site-b"]["unit"] == "patient"
    assert rec["prompts"]["kind"] == "box" and rec["prompts"]["jitter"] == 20
    assert (
        rec["config"]["prompt"]["kind"] == "box"
        and rec["config"]["source"]["method"] == "seg-finetune"
    )
    assert "lesion" in rec["size_bins"]["site-c"]
    assert rec["data"]["spacing_origin"].startswith("simulated")


def test_fill_box_baseline_is_the_filled_evaluation_boxes(zeroshot):
    out, rec = zeroshot
    cfg = load_config(None, method="seg-zeroshot", out_dir=str(out), **SMALL)
    test = make_clinical_shift_seg(patients_per_site=8).where(domain="site-b", split="test")
    test = test.with_prompts(PromptSpec(), cfg.seed)
    seg = load_segmenter("tiny-sam")
    pred = predict_with_prompts(seg, test, Context(seed=cfg.seed))
    refs = [test.mask(i) for i in range(len(test))]
    filled = [fill_boxes(p, r.shape, 2) for p, r in zip(pred.prompts, refs, strict=True)]
    by_hand = summarise_table(score_images(filled, refs, test.spacing, test.class_names))
    got = rec["baselines"]["site-b"]["fill-box"]["metrics"]
    assert got["dice"] == pytest.approx(by_hand["dice"])
    assert got["dice_present"] == pytest.approx(by_hand["dice_present"])
    # and the run's own predictions are those of the same prompts
    own = summarise_table(score_images(pred.masks, refs, test.spacing, test.class_names))
    assert rec["metrics"]["site-b"]["dice"] == pytest.approx(own["dice"])


def test_cases_and_tables_are_written(zeroshot):
    out, rec = zeroshot
    cases = rec["cases"]["site-c"]
    assert cases["best"]["dice"] >= cases["median"]["dice"] >= cases["worst"]["dice"]
    npz = np.load(out / "predictions" / f"{rec['run_id']}.npz")
    assert npz["cases/site-c/worst/image"].dtype == np.uint8
    assert npz["cases/site-c/worst/prediction"].shape[0] == 2  # (C, H, W)
    assert npz["cases/site-c/best/boxes"].shape[1] == 4
    n = rec["shift"]["tests"]["site-c"]
    assert npz["table/site-c/dice"].shape == (n, 2)
    assert rec["counts"]["site-c"]["images"] == n == len(npz["meta/site-c/patient_id"])
    assert rec["counts"]["site-c"]["patients"] == len(set(npz["meta/site-c/patient_id"].tolist()))
    assert int(npz["cases/site-c/best/position"]) == cases["best"]["position"]


def test_prompts_are_the_same_for_every_method_and_corrupted_copy():
    ds = make_clinical_shift_seg(patients_per_site=6).where(domain="site-a")
    from clinadapt.shifts import corrupted

    spec = PromptSpec()
    a = predict_with_prompts(load_segmenter("tiny-sam"), ds.with_prompts(spec, 3), Context())
    b = predict_with_prompts(
        load_segmenter("tiny-medsam"), corrupted(ds.with_prompts(spec, 3), "blur", 4), Context()
    )
    for pa, pb in zip(a.prompts, b.prompts, strict=True):
        if pa is not None:
            assert np.array_equal(pa.boxes, pb.boxes)
    # a view in another order gets the same prompt per image
    rev = ds.with_prompts(spec, 3).subset(np.arange(len(ds))[::-1])
    assert np.array_equal(
        rev.prompts(len(ds) - 1).prompts.boxes, ds.with_prompts(spec, 3).prompts(0).prompts.boxes
    )
    c = predict_with_prompts(load_segmenter("tiny-sam"), ds.with_prompts(spec, 4), Context())
    assert any(
        not np.array_equal(pa.boxes, pc.boxes)
        for pa, pc in zip(a.prompts, c.prompts, strict=True)
        if pa is not None
    )


def test_finetune_trains_then_reuses_its_fit(tmp_path):
    rec = run(tmp_path, "seg-finetune", method_options={"epochs": 2})
    assert rec["target"]["spec"] == "image-encoder+decoder"  # MedSAM: prompt encoder frozen
    hist = rec["training"]["history"]
    assert len(hist) == 2 and "val_dice" in hist[0] and "checkpoint" in rec["training"]
    again = run(tmp_path, "seg-finetune", method_options={"epochs": 2})
    assert "reused" in again["training"]
    assert again["metrics"]["site-b"]["dice"] == pytest.approx(rec["metrics"]["site-b"]["dice"])


def test_learned_default_prompt_runs_prompt_free(tmp_path):
    rec = run(
        tmp_path,
        "seg-finetune",
        method_options={"epochs": 1},
        prompt={"kind": "none"},
        target="prompt-encoder+decoder",
    )
    assert rec["prompts"]["kind"] == "none" and "baselines" not in rec
    assert rec["model"]["default_prompt"] == ["lung", "lesion"]
    with pytest.raises(ConfigError, match="learned default prompt"):
        run(tmp_path, "seg-zeroshot", prompt={"kind": "none"})


def test_few_shot_sees_k_images_of_k_patients(tmp_path):
    train = make_clinical_shift_seg(patients_per_site=20, classes=["lesion"]).split("train")
    two, four = few_shot_images(train, 2, seed=1), few_shot_images(train, 4, seed=1)
    assert set(two) <= set(four)  # nested across K
    pid = train.meta("patient_id")
    assert len(set(pid[four])) == 4 and train.labels[four].all()  # K patients, all annotated
    with pytest.raises(DataError, match="need 500 patients"):
        few_shot_images(train, 500, seed=0)
    rec = run(tmp_path, "seg-fewshot", method_options={"shots": 2, "epochs": 1})
    support = rec["training"]["support"]
    assert support["images"] == 2 and len(support["patients"]) == 2
    # K labelled images is all it sees: no labelled validation set picks its epoch
    assert rec["training"]["best_val_dice"] is None and rec["target"]["spec"] == "decoder"


def test_unet_baseline_from_scratch(tmp_path):
    rec = run(tmp_path, "unet", method_options={"epochs": 2, "channels": [8, 16]})
    assert rec["model"]["name"] == "monai-unet" and rec["target"]["fraction"] == 1.0
    assert "baselines" not in rec and "prompts" not in rec
    assert rec["training"]["history"][1]["loss"] < rec["training"]["history"][0]["loss"]
    with pytest.raises(ConfigError, match="brings its own network"):
        run(tmp_path, "unet", model="tiny-sam")


def test_methods_and_data_of_different_tasks_are_refused(tmp_path):
    with pytest.raises(IncompatibleError, match=r"segmentation method.*classification data"):
        run(tmp_path, "seg-zeroshot", data="clinical-shift")
    with pytest.raises(IncompatibleError, match=r"classification method.*segmentation data"):
        run(tmp_path, "finetune", data="clinical-shift-seg")


def test_fill_boxes_by_hand():
    from clinadapt.segmentation import Prompts

    p = Prompts(boxes=np.array([[1.0, 2.0, 3.0, 4.0]]), class_ids=np.array([2]))
    out = fill_boxes(p, (6, 6), 2)
    assert not out[0].any() and out[1].sum() == 3 * 3 and out[1][2:5, 1:4].all()
    assert not fill_boxes(None, (6, 6), 2).any()


def test_test_time_adaptation_of_a_segmenter_and_a_unet(tmp_path):
    rec = run(
        tmp_path,
        "seg-tent",
        source={"options": {"epochs": 1}},
        stream_order="size-sorted",
    )
    assert rec["source"]["method"] == "seg-finetune" and rec["tta"]["stream_order"] == "size-sorted"
    assert rec["tta"]["protocol"] == "per-shift" and set(rec["metrics"]) == {
        "site-a",
        "site-b",
        "site-c",
        "site-d",
    }
    assert "fill-box" in rec["baselines"]["site-b"] and rec["target"]["spec"] == "norm"
    vs = rec["vs_source"]["site-b"]["dice"]
    assert vs["change"] == pytest.approx(vs["adapted"] - vs["source"])
    assert vs["adapted"] == pytest.approx(rec["metrics"]["site-b"]["dice"])
    assert rec["source_metrics"]["site-b"]["dice"] == pytest.approx(vs["source"])
    # a method that changes nothing scores exactly as its source, on every set
    still = run(
        tmp_path, "seg-tent", source={"options": {"epochs": 1}}, method_options={"lr": 1e-12}
    )
    for name, per_metric in still["vs_source"].items():
        assert per_metric["dice"]["change"] == 0.0, name
        assert per_metric["dice_present"]["low"] <= 0.0 <= per_metric["dice_present"]["high"]
    assert still["degraded"] == {} or all(v == [] for v in still["degraded"].values())
    unet = run(
        tmp_path,
        "intent",
        source={"method": "unet", "options": {"epochs": 1, "channels": [8, 16], "norm": "batch"}},
    )
    assert unet["model"]["name"] == "monai-unet" and unet["target"]["trainable"] == 0
    assert "baselines" not in unet and unet["metrics"]["site-c"]["dice"] >= 0
    with pytest.raises(ConfigError, match="cannot train a segmentation model"):
        run(tmp_path, "seg-tent", source={"method": "finetune"})


class _Watched(MaskSource):
    """A mask source that records which source positions were read."""

    def __init__(self, masks):
        self.masks, self.read = masks, set()
        self.num_classes = masks.num_classes

    def __len__(self):
        return len(self.masks)

    def load(self, i):
        self.read.add(int(i))
        return self.masks.load(i)

    def describe(self, i):
        return self.masks.describe(i)

    def fingerprint(self):
        return self.masks.fingerprint()


@pytest.mark.parametrize("method", ["seg-finetune", "seg-fewshot"])
def test_fitting_reads_only_the_masks_its_protocol_allows(method):
    from clinadapt.methods import METHODS

    ds = make_clinical_shift_seg(patients_per_site=8, sites=["site-a"])
    watched = _Watched(ds.masks)
    ds = ds.replace(masks=watched).with_prompts(PromptSpec(), 0)
    train, val = ds.split("train"), ds.split("val")
    m = METHODS.get(method)()
    opts = m.parse_options({"epochs": 1, **({"shots": 2} if method == "seg-fewshot" else {})})
    seg = load_segmenter("tiny-sam")
    from clinadapt.targets import apply_target

    apply_target(seg, "decoder")
    summary = m.fit(seg, train, val, opts, Context(batch_size=4))
    allowed = set(train.index.tolist()) | set(val.index.tolist())
    if method == "seg-fewshot":  # K labelled images and nothing else
        allowed = {int(train.index[p]) for p in summary["support"]["positions"]}
    assert watched.read and watched.read <= allowed
    assert not watched.read & set(ds.split("test").index.tolist())


def test_classification_only_commands_refuse_segmentation_data(tmp_path):
    from clinadapt.fewshot_sweep import run_fewshot_sweep
    from clinadapt.models import load_model
    from clinadapt.ssl.evaluate import evaluate_backbone

    base = load_config(None, model="tiny-resnet", data="clinical-shift-seg", out_dir=str(tmp_path))
    with pytest.raises(IncompatibleError, match="'prototype' is a classification method"):
        run_fewshot_sweep(base, ["prototype"], [1], [0])
    seg = make_clinical_shift_seg(patients_per_site=6)
    with pytest.raises(DataError, match="not segmentation; pre-train without it"):
        evaluate_backbone(load_model("tiny-resnet"), seg)


@pytest.mark.slow
def test_a_seeded_run_reproduces_its_record_and_predictions(tmp_path):
    """Same config, fresh folders (no fit cache): the same weights, masks, metrics and CIs."""
    from safetensors.numpy import load_file

    opts = {"method_options": {"epochs": 1}, "data_options": {"patients_per_site": 5}}
    a, b = (run(tmp_path / d, "seg-finetune", **opts) for d in ("a", "b"))
    assert a["run_id"] == b["run_id"]
    assert a["metrics"] == b["metrics"] and a["ci"] == b["ci"] and a["cases"] == b["cases"]
    assert a["training"]["history"] == b["training"]["history"]
    wa = load_file(tmp_path / "a" / "cache" / a["training"]["checkpoint"])
    wb = load_file(tmp_path / "b" / "cache" / b["training"]["checkpoint"])
    assert wa.keys() == wb.keys() and all(np.array_equal(wa[k], wb[k]) for k in wa)
    za = np.load(tmp_path / "a" / "predictions" / f"{a['run_id']}.npz")
    zb = np.load(tmp_path / "b" / "predictions" / f"{b['run_id']}.npz")
    assert za.files == zb.files
    assert all(np.array_equal(za[k], zb[k], equal_nan=za[k].dtype.kind == "f") for k in za.files)
    # the seed is what changes them: another seed draws other prompts
    small = {"data_options": opts["data_options"]}
    z0, z1 = (run(tmp_path / "z", "seg-zeroshot", seed=s, **small) for s in (0, 1))
    assert z0["metrics"]["site-b"]["dice"] != z1["metrics"]["site-b"]["dice"]


@pytest.mark.parametrize(
    ("prompt", "boxed"),
    [
        ({"kind": "points", "k": 3}, False),
        ({"kind": "points", "k": 1, "negatives": 1, "per": "component"}, False),
        ({"kind": "box+points"}, True),
        ({"kind": "mask"}, False),
    ],
)
def test_each_prompt_kind_runs_and_is_recorded(tmp_path, prompt, boxed):
    rec = run(tmp_path, "seg-zeroshot", prompt=prompt, data_options={"patients_per_site": 5})
    assert {k: rec["prompts"][k] for k in prompt} == prompt
    assert rec["config"]["prompt"]["kind"] == prompt["kind"]
    assert ("baselines" in rec) == boxed  # fill-the-box exists only for box prompts
    npz = np.load(tmp_path / "predictions" / f"{rec['run_id']}.npz")
    key = "cases/site-b/median/points"
    assert (key in npz.files) == ("points" in prompt["kind"])


def _user_data(root):
    """A manifest of rectangles on noise (sites A, B) and a prompts CSV with each exact box."""
    from PIL import Image

    from filewriters import write_csv

    rng = np.random.default_rng(0)
    rows, boxes = [], []
    for n in range(10):
        site, split = ("A", "train") if n < 4 else (("A", "test") if n < 6 else ("B", "test"))
        img = rng.integers(0, 90, (32, 32), np.uint8)
        mask = np.zeros((32, 32), np.uint8)
        y0, x0 = 4 + n, 3 + n
        mask[y0 : y0 + 9, x0 : x0 + 12] = 1
        img[mask == 1] += 120
        for folder, arr in (("img", img), ("seg", mask)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / folder / f"case{n}.png")
        rows.append(
            {
                "path": f"img/case{n}.png",
                "mask": f"seg/case{n}.png",
                "site": site,
                "patient": f"p{n}",
                "split": split,
            }
        )
        boxes.append({"image": f"case{n}.png", "x1": x0, "y1": y0, "x2": x0 + 11, "y2": y0 + 8})
    return write_csv(root / "data.csv", rows), write_csv(root / "boxes.csv", boxes)


def test_a_run_with_the_users_own_prompts_file(tmp_path):
    data, boxes = _user_data(tmp_path)
    over = {
        "data": str(data),
        "data_options": {"class_names": ["tumour"]},
        "shift_options": {"source": "A"},
        "prompt": {"kind": "file", "file": str(boxes)},
    }
    rec = run(tmp_path, "seg-zeroshot", **over)
    assert rec["prompts"]["kind"] == "file" and rec["prompts"]["file"] == str(boxes)
    assert rec["prompts"]["source"].startswith("given") and len(rec["prompts"]["file_sha256"]) == 64
    # the given boxes are the objects' exact bounds: filling them is a perfect segmentation
    for name in ("A", "B"):
        assert rec["baselines"][name]["fill-box"]["metrics"]["dice_present"] == 1.0
    # training reads the same given prompts (no jitter), and the fit follows the file's content
    fit = run(tmp_path, "seg-finetune", method_options={"epochs": 1}, **over)
    assert "checkpoint" in fit["training"]
    lines = boxes.read_text().splitlines()
    boxes.write_text("\n".join(lines[:-1]) + "\n")  # case9 (site B) loses its prompt
    with pytest.raises(DataError, match=r"no prompts for image 'case9\.png'"):
        run(tmp_path, "seg-finetune", method_options={"epochs": 1}, **over)
    with pytest.raises(ConfigError, match="kind 'file' and a file"):
        load_config(None, method="seg-zeroshot", prompt={"kind": "file"})
    with pytest.raises(ConfigError, match="kind 'file' and a file"):
        load_config(None, method="seg-zeroshot", prompt={"file": str(boxes)})
    # derived-prompt configs keep their identity: no file key unless one is given
    assert "file" not in load_config(None, method="seg-zeroshot").prompt
