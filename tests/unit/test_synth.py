"""The synthetic set: deterministic, exact masks, classes that differ in colour and shape."""
from __future__ import annotations

import hashlib
import json

import cv2
import numpy as np
import pytest

from pipeline.training.synth import CLASS_NAMES, DISTRACTOR_COLOURS, PALETTE, make_synthetic_set, render_sample


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_layout_and_classes_file(tmp_path):
    info = make_synthetic_set(tmp_path / "s", count=3, size=48, seed=1)
    assert info.ids == ("0000", "0001", "0002")
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    assert sorted(p.name for p in (tmp_path / "s" / "masks").iterdir()) == ["0000.png", "0001.png", "0002.png"]
    classes = json.loads((tmp_path / "s" / "classes.json").read_text())
    assert classes["name"] == "synthetic"
    assert classes["classes"] == list(CLASS_NAMES)
    assert classes["palette"] == [list(c) for c in PALETTE]
    assert len(classes["mean"]) == 3 and len(classes["std"]) == 3
    assert classes["ignore_index"] == 255
    image = cv2.imread(str(tmp_path / "s" / "images" / "0000.png"), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(tmp_path / "s" / "masks" / "0000.png"), cv2.IMREAD_UNCHANGED)
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8
    assert mask.shape == (48, 48) and mask.dtype == np.uint8
    # mean/std are measured on the images written
    pixels = np.concatenate([
        cv2.imread(str(p))[..., ::-1].reshape(-1, 3) for p in sorted((tmp_path / "s" / "images").iterdir())
    ]) / 255.0
    assert classes["mean"] == pytest.approx(pixels.mean(0).tolist(), abs=1e-4)
    assert classes["std"] == pytest.approx(pixels.std(0).tolist(), abs=1e-4)


def test_deterministic_by_seed_and_prefix_stable(tmp_path):
    make_synthetic_set(tmp_path / "a", count=4, size=32, seed=3)
    make_synthetic_set(tmp_path / "b", count=4, size=32, seed=3)
    make_synthetic_set(tmp_path / "c", count=4, size=32, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert (tmp_path / "a" / "images" / "0000.png").read_bytes() != (tmp_path / "c" / "images" / "0000.png").read_bytes()
    # image i depends on (seed, i, size) only: a smaller set is a prefix of a larger one
    img, mask = render_sample(2, size=32, seed=3)
    assert np.array_equal(cv2.imread(str(tmp_path / "a" / "images" / "0002.png"))[..., ::-1], img)
    assert np.array_equal(cv2.imread(str(tmp_path / "a" / "masks" / "0002.png"), cv2.IMREAD_UNCHANGED), mask)


def test_masks_hold_every_class_and_a_thin_ignore_outline():
    masks = np.stack([render_sample(i, size=64)[1] for i in range(40)])
    values = set(np.unique(masks).tolist())
    assert values == {0, 1, 2, 3, 4, 255}
    ignored = (masks == 255).mean()
    assert 0.005 < ignored < 0.08  # an outline, not whole regions
    assert (masks == 0).mean() > 0.5  # background dominates, as in real data


def test_class_colours_differ_and_a_red_blue_swap_changes_the_class():
    # Mean colour of each class's interior (away from edges) over a few images.
    sums = np.zeros((5, 3))
    counts = np.zeros(5)
    for i in range(30):
        image, mask = render_sample(i, size=64)
        for c in range(1, 5):
            inner = cv2.erode((mask == c).astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
            sums[c] += image[inner].sum(0)
            counts[c] += inner.sum()
    assert (counts[1:] > 0).all()
    means = sums[1:] / counts[1:, None]
    for c, mean in enumerate(means, start=1):
        assert np.abs(mean - np.array(PALETTE[c]) * 0.93).max() < 30, (CLASS_NAMES[c], mean)
    red, blue, _, yellow = (np.array(PALETTE[c], float) for c in (1, 2, 3, 4))
    # The swap maps red <-> blue and yellow to the background's cyan distractors.
    assert np.abs(red[::-1] - blue).max() < 40 and np.abs(blue[::-1] - red).max() < 40
    assert np.abs(yellow[::-1] - np.array(DISTRACTOR_COLOURS[0])).max() < 40


def test_fewer_classes_and_bad_arguments(tmp_path):
    info = make_synthetic_set(tmp_path / "s", count=6, size=32, num_classes=3)
    assert info.class_names == CLASS_NAMES[:3]
    masks = [cv2.imread(str(tmp_path / "s" / "masks" / f"{i}.png"), cv2.IMREAD_UNCHANGED) for i in info.ids]
    assert set(np.unique(np.stack(masks)).tolist()) <= {0, 1, 2, 255}
    with pytest.raises(ValueError, match="count"):
        make_synthetic_set(tmp_path / "x", count=0)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_set(tmp_path / "x", count=1, num_classes=9)


def test_classes_file_loads_as_a_drn_label_set(tmp_path):
    import drn

    info = make_synthetic_set(tmp_path / "s", count=2, size=32)
    label_set = drn.load_label_set(tmp_path / "s" / "classes.json")
    assert tuple(label_set.class_names) == CLASS_NAMES
    assert tuple(tuple(c) for c in label_set.palette) == PALETTE
    assert tuple(label_set.mean) == pytest.approx(info.mean)
    assert label_set.ignore_index == 255
