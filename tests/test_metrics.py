"""The metric on hand-made confusion cases, and evaluate_output on a hand-made OUTPUT."""
from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import drn
from drn.metrics import ConfusionMatrix
from pipeline.tools.evaluate import evaluate_output, match_key
from pipeline.errors import NoRows, UsageError
from pipeline.store.output import SCHEMA, METADATA_KEY, encode_mask


def test_confusion_with_ignore_and_a_class_absent_from_both():
    gt = np.array([[0, 0, 1, 1], [0, 255, 1, 2]], np.uint8)
    pred = np.array([[0, 1, 1, 1], [0, 3, 2, 2]], np.uint8)  # the 3 sits on an ignored pixel
    cm = ConfusionMatrix(5)
    cm.update(pred, gt)
    assert cm.matrix.tolist() == [
        [2, 1, 0, 0, 0],
        [0, 2, 1, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ]
    iou = cm.iou()
    assert iou[:3].tolist() == pytest.approx([2 / 3, 2 / 4, 1 / 2])
    assert math.isnan(iou[3]) and math.isnan(iou[4])  # absent from both: no IoU
    assert cm.miou() == pytest.approx((2 / 3 + 1 / 2 + 1 / 2) / 3)  # 5/9, classes 3, 4 excluded
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)  # the ignored pixel is not counted
    d = cm.to_dict(["bg", "a", "b", "c", "d"])
    assert d["per_class"] == {"bg": pytest.approx(2 / 3), "a": 0.5, "b": 0.5, "c": None, "d": None}
    assert d["miou"] == pytest.approx(5 / 9)
    assert d["pixels"] == 7
    json.dumps(d, allow_nan=False)  # strict JSON: no NaN


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    gt = np.zeros((2, 2), np.uint8)
    pred = np.array([[0, 0], [0, 1]], np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    assert cm.iou()[:2].tolist() == [0.75, 0.0]
    assert cm.miou() == pytest.approx(0.375)
    assert cm.pixel_accuracy() == 0.75


def test_one_matrix_accumulated_over_images_not_a_mean_of_images():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[1]]), np.array([[1]]))  # a perfect one-pixel image
    cm.update(np.zeros((1, 3), np.int64), np.array([[0, 1, 1]]))  # a bad three-pixel image
    # class 1: TP 1, FN 2 -> 1/3; class 0: TP 1, FP 2 -> 1/3. A mean of images would say 2/3.
    assert cm.iou().tolist() == pytest.approx([1 / 3, 1 / 3])
    assert cm.pixel_accuracy() == pytest.approx(0.5)


def test_all_ignored_gives_no_numbers():
    cm = ConfusionMatrix(2)
    cm.update(np.array([[0, 1]]), np.array([[255, 255]]))
    assert cm.total == 0
    d = cm.to_dict(["a", "b"])
    assert d["miou"] is None and d["pixel_accuracy"] is None
    assert d["per_class"] == {"a": None, "b": None}


def test_values_outside_the_classes_are_an_error():
    cm = ConfusionMatrix(2)
    with pytest.raises(ValueError, match="prediction holds class index 7"):
        cm.update(np.array([[7]]), np.array([[0]]))
    with pytest.raises(ValueError, match="ground truth holds class index 3"):
        cm.update(np.array([[0]]), np.array([[3]]))
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="expected 2 class names but got 1"):
        cm.to_dict(["a"])


def test_merge_adds_matrices():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(np.array([0, 1]), np.array([0, 1]))
    b.update(np.array([1]), np.array([0]))
    assert a.merge(b).matrix.tolist() == [[1, 1], [0, 1]]


def test_confusion_matrix_is_exported_by_drn():
    assert drn.ConfusionMatrix is ConfusionMatrix


def test_16_bit_masks_and_large_counts():
    cm = ConfusionMatrix(300)
    gt = np.full((64, 64), 299, np.uint16)
    cm.update(gt.copy(), gt)
    assert cm.iou()[299] == 1.0 and cm.miou() == 1.0


@pytest.mark.parametrize(
    "image_id, key",
    [("images/0001.png", "0001"), ("0001.png", "0001"), ("a/b.jpg", "a/b"),
     ("set/images/x/0002.jpeg", "x/0002"), ("masks/0001.png", "masks/0001")],
)
def test_match_key(image_id, key):
    assert match_key(image_id) == key


# -- evaluate_output ---------------------------------------------------------------------
CLASSES = ["background", "thing"]


def _row(image_id, mask=None, status="ok", model="drn_d_22", sha="abc"):
    return {
        "image_id": image_id, "uri": f"file:///in/{image_id}", "status": status,
        "error": None if status == "ok" else "broken",
        "height": None if mask is None else mask.shape[0],
        "width": None if mask is None else mask.shape[1],
        "mask": None if mask is None else {"bytes": encode_mask(mask), "path": None},
        "class_scores": None, "class_fraction": None, "confidence": None,
        "model": model, "weights_sha256": sha, "run_id": "r", "labelled_at": None,
    }


def _write(path, rows, classes=CLASSES, model="drn_d_22", sha="abc"):
    meta = {"schema_version": 1, "model": model, "weights_sha256": sha, "weights": None,
            "num_classes": len(classes), "classes": classes, "palette": [[0, 0, 0]] * len(classes),
            "mean": [0.5] * 3, "std": [0.2] * 3, "ignore_index": 255}
    table = pa.Table.from_pylist(rows, schema=SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


@pytest.fixture
def ground_truth(tmp_path):
    gt = tmp_path / "gt"
    (gt / "masks").mkdir(parents=True)
    a = np.zeros((4, 4), np.uint8)
    a[:2] = 1
    a[3, 3] = 255
    b = np.ones((4, 4), np.uint8)
    for name, m in {"0000": a, "0001": b, "0002": a}.items():  # 0002 never predicted
        cv2.imwrite(str(gt / "masks" / f"{name}.png"), m)
    return gt, a, b


def test_evaluate_output_matches_by_id_and_counts_what_is_missing(tmp_path, ground_truth):
    gt, a, b = ground_truth
    out = tmp_path / "out"
    pred_a = a.copy()
    pred_a[3, 3] = 1  # on an ignored pixel: no effect
    pred_b = b.copy()
    pred_b[0, :] = 0  # 4 of 16 wrong
    _write(out / "part-0.parquet", [_row("images/0000.png", pred_a), _row("0001.png", pred_b)])
    _write(out / "data" / "part-1.parquet", [_row("images/0009.png", pred_a), _row("images/0002.png", status="error")])
    _write(out / "_state" / "junk.parquet", [_row("images/0002.png", a)])  # never read: "_" prefix
    _write(out / "nested" / "data" / "part-2.parquet", [_row("images/0002.png", a)])  # another output's
    (out / "_state" / "progress.json").write_text("{}")

    res = evaluate_output(str(out), gt)
    assert res["images_evaluated"] == 2
    assert res["images_missing_prediction"] == 1  # 0002 has only an error row
    assert res["images_missing_ground_truth"] == 1  # 0009
    assert res["error_rows"] == 1
    # pixels: a has 15 counted (8 thing, 7 background), b 16 thing of which 4 predicted bg.
    assert res["confusion"] == [[7, 0], [4, 20]]
    assert res["per_class"] == {"background": pytest.approx(7 / 11), "thing": pytest.approx(20 / 24)}
    assert res["miou"] == pytest.approx((7 / 11 + 20 / 24) / 2)
    assert res["pixel_accuracy"] == pytest.approx(27 / 31)
    assert res["model"] == "drn_d_22"


def test_evaluate_output_needs_one_model(tmp_path, ground_truth):
    gt, a, _ = ground_truth
    out = tmp_path / "out"
    _write(out / "data" / "part-a.parquet", [_row("0000.png", a)])
    _write(out / "data" / "part-b.parquet", [_row("0000.png", 1 - a % 2, model="drn_c_26", sha="def")],
           model="drn_c_26", sha="def")
    with pytest.raises(ValueError, match="several models"):
        evaluate_output(str(out), gt)
    res = evaluate_output(str(out), gt, model="drn_d_22")
    assert res["miou"] == 1.0 and res["images_evaluated"] == 1


def test_evaluate_output_class_names_given_override_the_outputs(tmp_path, ground_truth):
    gt, a, _ = ground_truth
    _write(tmp_path / "out" / "part-x.parquet", [_row("0000.png", a)], classes=["bg", "fg"])
    assert set(evaluate_output(str(tmp_path / "out"), gt)["per_class"]) == {"bg", "fg"}
    assert set(evaluate_output(str(tmp_path / "out"), gt, class_names=["x", "y"])["per_class"]) == {"x", "y"}


def test_evaluate_output_without_labelled_rows_is_an_error(tmp_path, ground_truth):
    """An empty OUTPUT, or one whose Parquet files drn-label did not write (no drn_label
    metadata), holds no labelled rows: NoRows (exit 1), naming OUTPUT and the fix."""
    gt, a, _ = ground_truth
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoRows, match="no labelled rows .*run `drn-label run` first"):
        evaluate_output(str(tmp_path / "empty"), gt)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    pq.write_table(pa.Table.from_pylist([_row("0000.png", a)], schema=SCHEMA), foreign / "x.parquet")
    with pytest.raises(NoRows, match="no labelled rows"):
        evaluate_output(str(foreign), gt)


def test_evaluate_output_picks_an_identity_by_sha_prefix(tmp_path, ground_truth):
    """The 12-character prefix `inspect` prints selects the rows, as in export and report."""
    gt, a, b = ground_truth
    _write(tmp_path / "out" / "data" / "part-1.parquet", [_row("0000.png", a, sha="aaaa1111" * 8)], sha="aaaa1111" * 8)
    _write(tmp_path / "out" / "data" / "part-2.parquet", [_row("0000.png", b, sha="bbbb2222" * 8)], sha="bbbb2222" * 8)
    with pytest.raises(UsageError, match="holds rows of several models"):
        evaluate_output(str(tmp_path / "out"), gt)
    scores = evaluate_output(str(tmp_path / "out"), gt, weights_sha256="aaaa1111aaaa")
    assert scores["weights_sha256"] == "aaaa1111" * 8 and scores["images_evaluated"] == 1
    with pytest.raises(UsageError, match="no rows of model any with weights cccc"):
        evaluate_output(str(tmp_path / "out"), gt, weights_sha256="cccc")
