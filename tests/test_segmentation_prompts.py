"""Prompts: checks of user input, derivation from reference masks (seeded), JSON/CSV files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clinadapt.errors import DataError
from clinadapt.segmentation import (
    Prompts,
    make_prompts,
    prompts_for,
    prompts_from_mask,
    read_prompts,
    write_prompts,
)


def _label_map() -> np.ndarray:
    lab = np.zeros((60, 80), dtype=np.uint8)
    lab[10:20, 10:30] = 1  # class 1, component A
    lab[40:50, 50:70] = 1  # class 1, component B
    lab[30:36, 5:15] = 2  # class 2
    return lab


# --- user prompts ----------------------------------------------------------------------------


def test_make_prompts_normalises_shapes():
    p = make_prompts((60, 80), boxes=[1, 2, 30, 40])
    assert p.boxes.shape == (1, 4) and p.count == 1 and p.kind == "box"
    p = make_prompts((60, 80), points=[[5, 5], [9, 9]], point_labels=[1, 0])
    assert p.points.shape == (1, 2, 2) and p.point_labels.tolist() == [[1, 0]]
    p = make_prompts(
        (60, 80),
        boxes=[[1, 2, 30, 40], [0, 0, 10, 10]],
        points=[[[5, 5]], [[3, 3]]],
        point_labels=[[1], [1]],
        class_ids=[1, 2],
    )
    assert p.count == 2 and p.kind == "box+points"
    assert Prompts().is_empty and Prompts().count == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(boxes=[[10, 10, 90, 20]]), "outside the 80x60"),
        (dict(boxes=[[-1, 0, 10, 10]]), "outside"),
        (dict(boxes=[[30, 10, 20, 20]]), "x1 > x2"),
        (dict(boxes=[[1, 2, 3]]), r"\(P, 4\)"),
        (dict(boxes=[[0, 0, float("nan"), 1]]), "NaN"),
        (dict(points=[[5, 5]]), "without point_labels"),
        (dict(points=[[5, 5]], point_labels=[1, 1]), "one label per point"),
        (dict(points=[[5, 5]], point_labels=[2]), "must be 1"),
        (dict(points=[[5, 5]], point_labels=[-1]), "all padding"),
        (dict(points=[[5, 95]], point_labels=[1]), "outside"),
        (dict(points=[5, 5, 5], point_labels=[1]), "points must be"),
        (dict(point_labels=[1]), "without points"),
        (dict(mask=np.zeros((10, 10), dtype=bool)), "image's size 60x80"),
        (dict(mask=np.full((60, 80), 3, dtype=np.uint8)), "only 0 and 1"),
        (dict(boxes=[[0, 0, 5, 5]] * 2, points=[[5, 5]], point_labels=[1]), "different numbers"),
    ],
)
def test_bad_prompts_get_clear_errors(kwargs, message):
    with pytest.raises(DataError, match=message):
        make_prompts((60, 80), **kwargs)


# --- derived from the reference mask ----------------------------------------------------------


def test_one_prompt_per_class_or_per_8_connected_component():
    lab = _label_map()
    per_class = prompts_from_mask(lab, "box", per="class", jitter=0)
    assert per_class.class_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(per_class.prompts.boxes[0], [10, 10, 69, 49])
    per_comp = prompts_from_mask(lab, "box", per="component", jitter=0)
    assert per_comp.class_ids.tolist() == [1, 1, 2]
    np.testing.assert_array_equal(per_comp.prompts.boxes[:2], [[10, 10, 29, 19], [50, 40, 69, 49]])
    assert per_comp.targets.sum(axis=(1, 2)).tolist() == [200, 200, 60]
    diag = np.zeros((5, 5), dtype=np.uint8)
    diag[0, 0] = diag[1, 1] = 1  # touching at a corner: one component (8-connectivity)
    assert prompts_from_mask(diag, per="component").prompts.count == 1


def test_jittered_boxes_stay_within_0_to_20_px_outside_the_object_and_the_image():
    lab = _label_map()
    for seed in range(30):
        d = prompts_from_mask(lab, "box", per="component", jitter=20, seed=seed)
        for box, target in zip(d.prompts.boxes, d.targets, strict=True):
            ys, xs = np.nonzero(target)
            extent = np.array([xs.min(), ys.min(), xs.max(), ys.max()])
            grow = np.array([-1, -1, 1, 1]) * (box - extent)  # outwards, per side
            assert (grow >= 0).all() and (grow <= 20).all()
            assert box[0] >= 0 and box[1] >= 0 and box[2] <= 79 and box[3] <= 59
    boxes = [prompts_from_mask(lab, "box", jitter=20, seed=s).prompts.boxes for s in range(10)]
    assert len({b.tobytes() for b in boxes}) > 1  # jitter is random across seeds


@pytest.mark.parametrize("k", [1, 3, 5])
def test_k_points_fall_inside_the_object(k):
    lab = _label_map()
    d = prompts_from_mask(lab, "points", per="component", k=k, seed=4)
    assert d.prompts.points.shape == (3, k, 2)
    assert (d.prompts.point_labels == 1).all()
    for pts, target in zip(d.prompts.points, d.targets, strict=True):
        for x, y in pts.astype(int):
            assert target[y, x]
    assert len({tuple(p) for p in d.prompts.points[0]}) == k  # distinct pixels


def test_center_point_is_farthest_from_the_boundary_and_negatives_are_outside():
    lab = np.zeros((21, 31), dtype=np.uint8)
    lab[5:16, 5:26] = 1  # 11 x 21 rectangle: centre (15, 10)
    d = prompts_from_mask(lab, "points", k=1, point_mode="center", negatives=2, seed=0)
    np.testing.assert_array_equal(d.prompts.points[0, 0], [15, 10])
    assert d.prompts.point_labels.tolist() == [[1, 0, 0]]
    for x, y in d.prompts.points[0, 1:].astype(int):
        assert lab[y, x] == 0


def test_derivation_is_seeded():
    lab = _label_map()
    a = prompts_from_mask(lab, "box+points", k=3, seed=7)
    b = prompts_from_mask(lab, "box+points", k=3, seed=7)
    c = prompts_from_mask(lab, "box+points", k=3, seed=8)
    np.testing.assert_array_equal(a.prompts.boxes, b.prompts.boxes)
    np.testing.assert_array_equal(a.prompts.points, b.prompts.points)
    assert not np.array_equal(a.prompts.points, c.prompts.points)


def test_mask_prompts_empty_maps_and_class_filter():
    lab = _label_map()
    d = prompts_from_mask(lab, "mask", per="class")
    np.testing.assert_array_equal(d.prompts.masks, d.targets)
    empty = prompts_from_mask(np.zeros((8, 8), dtype=np.uint8))
    assert empty.prompts.count == 0 and empty.targets.shape == (0, 8, 8)
    only2 = prompts_from_mask(lab, classes=[2])
    assert only2.class_ids.tolist() == [2]
    with pytest.raises(DataError, match="integer"):
        prompts_from_mask(lab.astype(float))
    with pytest.raises(DataError, match="kind"):
        prompts_from_mask(lab, "scribble")  # type: ignore[arg-type]


# --- files -------------------------------------------------------------------------------------


def test_json_prompts_round_trip(tmp_path):
    d = prompts_from_mask(_label_map(), "box+points", k=2, seed=1)
    path = write_prompts(tmp_path / "p.json", {"scan1.png": d.prompts})
    table = read_prompts(path)
    p = prompts_for(table, "some/dir/scan1.png", (60, 80))
    np.testing.assert_array_equal(p.boxes, d.prompts.boxes)
    np.testing.assert_array_equal(p.points, d.prompts.points)
    np.testing.assert_array_equal(p.class_ids, d.class_ids)
    with pytest.raises(DataError, match=r"no prompts for image 'other\.png'"):
        prompts_for(table, "other.png", (60, 80))


def test_csv_prompts_group_rows_by_object(tmp_path):
    path = tmp_path / "prompts.csv"
    path.write_text(
        "image,object,x1,y1,x2,y2,x,y,label,class\n"
        "scan1.png,a,10,20,50,40,,,,1\n"
        "scan1.png,a,,,,,30,30,1,\n"
        "scan1.png,b,0,0,9,9,5,5,1,2\n"
        "scan1.png,b,,,,,8,1,0,\n"
        "scan2.nii.gz,,5,5,20,20,,,,\n"
    )
    table = read_prompts(path)
    p = prompts_for(table, "scan1.png", (60, 80))
    assert p.boxes.tolist() == [[10, 20, 50, 40], [0, 0, 9, 9]]
    # object a has one point, b two: a is padded with a "not a point" (-1)
    assert p.point_labels.tolist() == [[1, -1], [1, 0]]
    assert p.class_ids.tolist() == [1, 2]
    assert prompts_for(table, "scan2.nii.gz", (30, 30)).boxes.tolist() == [[5, 5, 20, 20]]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("x1,y1,x2,y2\n1,2,3,4\n", "'image' column"),
        ("image,x1,y1,x2,y2\nscan.png,1,2,three,4\n", "line 2: not a number"),
        ("image,x1,y1,x2,y2\nscan.png,,,,\n", "line 2: neither a box"),
    ],
)
def test_bad_csv_prompts_name_the_line(tmp_path, text, message):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        read_prompts(path)


def test_bad_json_prompts_name_the_file_and_key(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"scan.png": {"box": [1, 2, 3, 4]}}))
    with pytest.raises(DataError, match=r"scan.png.*unknown key\(s\) \['box'\]"):
        read_prompts(path)
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="mapping from image file name"):
        read_prompts(path)
    table = {"scan.png": {"boxes": [[1, 2, 300, 4]]}}
    with pytest.raises(DataError, match=r"prompts of 'scan\.png': box 0"):
        prompts_for(table, "scan.png", (10, 10))
    with pytest.raises(DataError, match=r"\.json or \.csv"):
        (tmp_path / "p.txt").write_text("")
        read_prompts(tmp_path / "p.txt")
