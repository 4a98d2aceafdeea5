"""clinadapt.run takes the objects load_model and load_dataset return, as well as names."""

import pytest
import torch

import clinadapt

SMALL = {"patients_per_site": 8}


def test_run_with_objects_matches_the_run_by_names(tmp_path):
    model = clinadapt.load_model("tiny-vit")
    data = clinadapt.load_dataset("clinical-shift", **SMALL)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    by_object = clinadapt.run(
        model=model,
        data=data,
        method="finetune",
        method_options={"epochs": 1},
        out_dir=str(tmp_path / "a"),
    )
    by_name = clinadapt.run(
        model="tiny-vit",
        data="clinical-shift",
        data_options=SMALL,
        method="finetune",
        method_options={"epochs": 1},
        out_dir=str(tmp_path / "b"),
    )
    assert by_object["config"]["model"] == "tiny-vit"
    assert by_object["config"]["weights"].startswith("object:")
    assert by_object["config"]["data"] == f"clinical-shift@{data.fingerprint()[:12]}"
    assert by_object["data"]["fingerprint"] == by_name["data"]["fingerprint"]
    for name, metrics in by_name["metrics"].items():
        got = by_object["metrics"][name]["balanced_accuracy"]
        assert got == pytest.approx(metrics["balanced_accuracy"], abs=1e-9)
    after = model.state_dict()  # the object was copied, not trained
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_different_objects_never_share_a_run_or_a_fit(tmp_path):
    data = clinadapt.load_dataset("clinical-shift", **SMALL)
    model = clinadapt.load_model("tiny-resnet")
    first = clinadapt.run(model=model, data=data, method="linear-probe", out_dir=str(tmp_path))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    second = clinadapt.run(model=model, data=data, method="linear-probe", out_dir=str(tmp_path))
    assert first["run_id"] != second["run_id"]
    assert first["training"]["weights"] != second["training"]["weights"]
    other = data.subset(range(len(data) - 4), name=data.name)
    third = clinadapt.run(model=model, data=other, method="linear-probe", out_dir=str(tmp_path))
    assert third["config"]["data"] != second["config"]["data"]


def test_run_says_what_model_and_data_take(tmp_path):
    with pytest.raises(clinadapt.ConfigError, match=r"model=: .* not a torch\.nn\..*Linear"):
        clinadapt.run(model=torch.nn.Linear(2, 2), out_dir=str(tmp_path))
    with pytest.raises(clinadapt.ConfigError, match=r"data=: .* not a list"):
        clinadapt.run(data=[1, 2, 3], out_dir=str(tmp_path))


def test_run_takes_a_path_object_for_data(tmp_path):
    """A pathlib.Path names a dataset as its string does (it reaches the config as text)."""
    from clinadapt.runner import object_overrides

    names, objects = object_overrides("tiny-vit", tmp_path / "manifest.csv")
    assert names == {"model": "tiny-vit", "data": str(tmp_path / "manifest.csv")}
    assert objects == {}
