import os

import pytest

# Tests never reach a hub: loaders must fail fast or use local files.
os.environ.setdefault("CLINADAPT_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("CLINADAPT_QUIET", "1")


@pytest.fixture(scope="session")
def small_shift():
    """A small built-in clinical-shift dataset shared by tests (deterministic)."""
    from clinadapt.data.synthetic import make_clinical_shift

    return make_clinical_shift(seed=0, patients_per_site=40)


TINY = {
    "data_options": {"patients_per_site": 12, "size": 32},
    "evaluation": {"n_boot": 40},
    "method_options": {},
}
TINY_SOURCE = {"options": {"epochs": 2}}
TINY_CORRUPTION = {
    "source": "site-a",
    "corruptions": ["gaussian-noise", "blur"],
    "severities": [1, 3],
}


def _binary_manifest(folder):
    """The built-in data as a binary task (normal 0, abnormal 1) in a CSV manifest of PNGs."""
    import csv

    from PIL import Image

    from clinadapt.data.synthetic import make_clinical_shift

    ds = make_clinical_shift(seed=0, size=32, patients_per_site=12, sites=["site-a", "site-b"])
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "site", "sex", "age_group", "patient_id", "split"])
        for i in range(len(ds)):
            name = f"img{i:04d}.png"
            Image.fromarray(ds.image(i)).save(folder / name)
            m = {k: str(ds.metadata[k][i]) for k in ds.metadata}
            w.writerow(
                [
                    name,
                    int(ds.labels[i] != 0),
                    m["domain"],
                    m["sex"],
                    m["age_group"],
                    m["patient_id"],
                    m["split"],
                ]
            )
    return folder / "manifest.csv"


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Real runs of the runner in a tiny setting, written as `clinadapt run` writes them:

    - ``single``: one seed of finetune and tent (domain shift), source and bn (corruption shift);
    - ``seeds``: finetune and bn on the domain shift with seeds 0 and 1;
    - ``binary``: finetune on a two-class manifest of two sites.
    Returns ``{name: (directory, [records])}``.
    """
    from clinadapt.config import RunConfig
    from clinadapt.runner import run_experiment

    root = tmp_path_factory.mktemp("tiny-runs")

    def run(out, method, shift="domain", seed=0, **extra):
        fields = {**TINY, "out_dir": str(root / out), "method": method, "shift": shift}
        if method == "finetune":
            fields["method_options"] = {"epochs": 2}
        else:
            fields["source"] = TINY_SOURCE
        if shift == "corruption":
            fields["shift_options"] = TINY_CORRUPTION
        return run_experiment(RunConfig(seed=seed, **{**fields, **extra}))

    runs = {
        "single": [
            run("single", "finetune"),
            run("single", "tent"),
            run("single", "source", "corruption"),
            run("single", "bn", "corruption"),
        ],
        "seeds": [run("seeds", m, seed=s) for s in (0, 1) for m in ("finetune", "bn")],
    }
    manifest = _binary_manifest(root / "binary-data")
    runs["binary"] = [
        run(
            "binary",
            "finetune",
            data=str(manifest),
            data_options={},
            shift_options={"source": "site-a"},
        )
    ]
    return {name: (root / name, records) for name, records in runs.items()}
