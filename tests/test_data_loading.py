"""Image files decoded in worker processes give exactly what the main process gives."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clinadapt.config import RunConfig
from clinadapt.data import load_dataset
from clinadapt.data.loading import MAX_AUTO_WORKERS, ahead, auto_workers, keep_workers
from clinadapt.errors import DataError
from clinadapt.methods import Context
from clinadapt.models import load_model
from clinadapt.runner import run_experiment
from clinadapt.shifts.corruptions import corrupted


def write_folder(root: Path, per_class: int = 12, sizes=((40, 48),)) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["normal", "effusion"]):
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            img = rng.integers(0, 120, (h, w), dtype=np.uint8) + 100 * c  # classes differ
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / name / f"{name}-{i:02d}.png")
    return root


def collect(batches):
    return [(x.clone(), y.clone(), pos.copy()) for x, y, pos in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for (xa, ya, pa), (xb, yb, pb) in zip(a, b, strict=True):
        torch.testing.assert_close(xa, xb, rtol=0, atol=0)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        np.testing.assert_array_equal(pa, pb)


def test_workers_yield_the_main_process_batches(tmp_path):
    ds = load_dataset(write_folder(tmp_path / "pngs", sizes=((40, 48), (33, 30))))
    pp = load_model("tiny-resnet").preprocess
    for options in ({}, {"shuffle": True, "seed": 3}, {"drop_last": True}):
        main = collect(ds.batches(pp, 5, workers=0, **options))
        assert_same(collect(ds.batches(pp, 5, workers=2, **options)), main)
        assert_same(collect(ds.batches(pp, 5, workers=2, pin_memory=True, **options)), main)
    assert len(main) == 24 // 5  # drop_last
    # artefacts computed on load are decoded in the workers too, identically
    view = corrupted(ds, "gaussian-noise", 3)
    assert_same(collect(view.batches(pp, 8, workers=2)), collect(view.batches(pp, 8, workers=0)))


def test_workers_by_default_only_for_files(tmp_path):
    files = load_dataset(write_folder(tmp_path / "pngs", per_class=2))
    assert files.source.reads_files
    assert 1 <= auto_workers(files) <= MAX_AUTO_WORKERS
    assert auto_workers(corrupted(files, "gaussian-noise", 1)) == auto_workers(files)
    memory = load_dataset("clinical-shift", patients_per_site=5)
    assert not memory.source.reads_files and auto_workers(memory) == 0
    with pytest.raises(DataError, match="workers must be >= 0"):
        next(files.batches(lambda imgs: imgs, 2, workers=-1))


def test_a_corrupt_file_fails_with_its_name_from_a_worker(tmp_path):
    root = write_folder(tmp_path / "pngs", per_class=4)
    bad = root / "normal" / "normal-02.png"
    bad.write_bytes(b"not a png")
    ds = load_dataset(root)
    pp = load_model("tiny-resnet").preprocess
    with pytest.raises(DataError) as main:
        collect(ds.batches(pp, 3, workers=0))
    with pytest.raises(DataError) as worker:
        collect(ds.batches(pp, 3, workers=2))
    assert str(worker.value) == str(main.value)
    assert "normal-02.png" in str(worker.value) and "\n" not in str(worker.value)


def test_context_batches_use_its_workers_and_pin_for_cuda(tmp_path, monkeypatch):
    ds = load_dataset(write_folder(tmp_path / "pngs", per_class=2))
    seen = []
    monkeypatch.setattr(
        "clinadapt.data.base.iter_batches",
        lambda ds, pp, chunks, workers, pin, device: (
            seen.append((workers, pin, device)) or iter(())
        ),
    )
    list(Context(batch_size=2, loader_workers=3).batches(ds, None))
    list(Context(batch_size=2, device="cuda:0").batches(ds, None))
    assert seen == [(3, False, "cpu"), (auto_workers(ds), True, "cuda:0")]


def test_a_run_on_files_is_the_same_with_and_without_workers(tmp_path):
    root = write_folder(tmp_path / "pngs", per_class=10)
    common = dict(
        data=str(root),
        shift="none",
        method="finetune",
        method_options={"epochs": 2},
        batch_size=8,
        evaluation={"n_boot": 20},
    )
    runs = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        cfg = RunConfig(loader_workers=workers, out_dir=str(out), **common)
        rec = run_experiment(cfg)
        preds = np.load(out / "predictions" / f"{rec['run_id']}.npz")
        runs[workers] = (cfg.run_id(), rec, {k: preds[k] for k in preds.files})
    (id0, rec0, p0), (id2, rec2, p2) = runs[0], runs[2]
    assert id0 == id2  # the workers are not part of what the experiment is
    assert p0.keys() == p2.keys()
    for k in p0:
        np.testing.assert_array_equal(p0[k], p2[k])
    assert json.dumps(rec0["metrics"]) == json.dumps(rec2["metrics"])
    assert rec0["training"]["history"] == rec2["training"]["history"]


class WorkerPid:
    """A one-stage preprocessing that says which process built each image."""

    def __call__(self, imgs):
        return torch.full((len(imgs), 1), float(os.getpid()))


def pids(batches):
    return {int(p) for x, _, _ in batches for p in x.flatten().tolist()}


def test_kept_workers_serve_every_pass_and_stop_on_leaving(tmp_path):
    ds = load_dataset(write_folder(tmp_path / "pngs", per_class=6))
    pp = load_model("tiny-resnet").preprocess
    want = [collect(ds.batches(pp, 5, workers=0, shuffle=True, seed=s)) for s in (0, 1)]
    other = ds.subset(range(7))
    with keep_workers():
        # each pass its own order (the sampler is set anew), through the same workers
        first = collect(ds.batches(pp, 5, workers=2, shuffle=True, seed=0))
        second = collect(ds.batches(pp, 5, workers=2, shuffle=True, seed=1, device="cpu"))
        assert_same(first, want[0])
        assert_same(second, want[1])
        assert_same(
            collect(other.batches(pp, 3, workers=2)), collect(other.batches(pp, 3, workers=0))
        )
        where = WorkerPid()
        kept = [pids(ds.batches(where, 4, workers=2)) for _ in range(3)]
        assert kept[0] == kept[1] == kept[2] and os.getpid() not in kept[0]
        # a pass left half-way does not leak its batches into the next one
        next(iter(ds.batches(pp, 5, workers=2, device="cpu")))
        assert_same(collect(ds.batches(pp, 5, workers=2, device="cpu")), want_plain(ds, pp))
    for pid in kept[0]:  # the workers ended with the block
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    fresh = [pids(ds.batches(where, 4, workers=2)) for _ in range(2)]
    assert not fresh[0] & fresh[1]  # outside the block each pass starts its own


def want_plain(ds, pp):
    return collect(ds.batches(pp, 5, workers=0))


def test_a_kept_worker_still_reports_a_corrupt_file_by_name(tmp_path):
    root = write_folder(tmp_path / "pngs", per_class=4)
    (root / "normal" / "normal-02.png").write_bytes(b"not a png")
    ds = load_dataset(root)
    pp = load_model("tiny-resnet").preprocess
    with keep_workers():
        for _ in range(2):
            with pytest.raises(DataError, match=r"normal-02\.png"):
                collect(ds.batches(pp, 3, workers=2, device="cpu"))


def test_batches_ahead_come_in_order_with_errors_in_their_place():
    made = []

    def items():
        for i in range(6):
            made.append(i)
            if i == 4:
                raise DataError("image 4 is broken")
            yield i

    got = []
    with pytest.raises(DataError, match="image 4 is broken"):
        for i in ahead(items(), depth=2):
            got.append(i)
    assert got == [0, 1, 2, 3]
    # at most depth items wait in the queue (and one more is held, waiting for room)
    made.clear()

    def many():
        for i in range(100):
            made.append(i)
            yield i

    it = ahead(many(), depth=2)
    assert next(it) == 0
    deadline = time.monotonic() + 10
    while len(made) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)  # room for a thread that would run further ahead
    assert made == [0, 1, 2, 3]
    (thread,) = [t for t in threading.enumerate() if t.name == "clinadapt-batches"]
    it.close()  # leaving early stops the thread
    assert not thread.is_alive()


def test_pinned_batches_without_workers_are_built_ahead_and_unchanged(tmp_path):
    ds = load_dataset(write_folder(tmp_path / "pngs", per_class=5, sizes=((40, 48), (33, 30))))
    pp = load_model("tiny-resnet").preprocess
    main = collect(ds.batches(pp, 3, workers=0))
    assert_same(collect(ds.batches(pp, 3, workers=0, pin_memory=True)), main)
    assert_same(collect(ds.batches(pp, 3, workers=0, pin_memory=True, device="cpu")), main)
