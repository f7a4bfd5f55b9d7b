"""Label sets: presets, files, and what travels with a model."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import drn
from drn.labels import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_CLASSES,
    LabelSet,
    default_ignore_index,
    generate_palette,
    mask_dtype,
)

CITYSCAPES_NAMES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)


def test_presets_are_listed():
    assert drn.list_presets() == ["cityscapes", "imagenet"]


def test_cityscapes_preset():
    city = drn.get_preset("cityscapes")
    assert city.class_names == CITYSCAPES_NAMES and city.num_classes == 19
    assert city.palette[0] == (128, 64, 128) and city.palette[10] == (70, 130, 180)
    assert city.palette[13] == (0, 0, 142) and city.palette[18] == (119, 11, 32)
    assert len(set(city.palette)) == 19
    assert [round(v, 5) for v in city.mean] == [0.29010, 0.32808, 0.28696]
    assert [round(v, 5) for v in city.std] == [0.18295, 0.18657, 0.18448]
    assert city.ignore_index == 255


def test_imagenet_preset():
    imagenet = drn.get_preset("imagenet")
    assert imagenet.num_classes == 1000 and imagenet.class_names[999] == "class_999"
    assert (imagenet.mean, imagenet.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert imagenet.ignore_index == 65535  # 255 is a class id here


def test_unknown_preset():
    with pytest.raises(ValueError, match="^unknown label set preset 'ade20k'; presets: cityscapes, imagenet$"):
        drn.get_preset("ade20k")


def test_label_set_is_frozen_hashable_and_round_trips():
    city = drn.get_preset("cityscapes")
    with pytest.raises(dataclasses.FrozenInstanceError):
        city.name = "other"
    assert hash(city) == hash(LabelSet.from_dict(city.to_dict()))
    data = json.loads(json.dumps(city.to_dict()))
    assert LabelSet.from_dict(data) == city
    assert data["classes"][0] == "road" and data["palette"][0] == [128, 64, 128]


def test_json_file_full(tmp_path):
    path = tmp_path / "roads.json"
    path.write_text(json.dumps({
        "name": "roads", "classes": ["background", "road"], "palette": [[0, 0, 0], [255, 0, 0]],
        "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
    }))
    labels = drn.load_label_set(path)
    assert labels == LabelSet("roads", ("background", "road"), ((0, 0, 0), (255, 0, 0)),
                              (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 255)


def test_json_file_minimal_gets_palette_and_imagenet_statistics(tmp_path):
    path = tmp_path / "animals.json"
    path.write_text(json.dumps({"classes": ["cat", "dog", "bird"]}))
    labels = drn.load_label_set(str(path))
    assert labels.name == "animals"
    assert labels.palette == generate_palette(3) == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert (labels.mean, labels.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_text_file(tmp_path):
    path = tmp_path / "parts.txt"
    path.write_text("wheel\nframe \nseat\n\n")
    labels = drn.load_label_set(path)
    assert (labels.name, labels.class_names) == ("parts", ("wheel", "frame", "seat"))


def test_more_than_256_classes(tmp_path):
    path = tmp_path / "many.txt"
    path.write_text("\n".join(f"thing {i}" for i in range(300)))
    labels = drn.load_label_set(path)
    assert labels.num_classes == 300 and labels.ignore_index == 65535
    assert len(set(labels.palette)) == 300


@pytest.mark.parametrize(("file_name", "content", "message"), [
    ("gap.txt", "a\n\nb\n", "label file {path}: line 2 is empty; write one class name per line"),
    ("bad.json", "{not json", "label file {path}: not valid JSON"),
    ("list.json", "[1, 2]", "label file {path}: expected a JSON object"),
    ("nocls.json", '{"name": "x"}', "label file {path}: label set: missing 'classes'"),
    ("pal.json", '{"classes": ["a", "b"], "palette": [[1, 2, 3]]}',
     "label file {path}: label set 'pal': 1 palette colours for 2 classes"),
    ("dup.txt", "car\nbus\ncar\n", "label file {path}: label set 'dup': class name 'car' is used twice (ids 0 and 2)"),
    ("color.json", '{"classes": ["a"], "palette": [[0, 0, 300]]}',
     "label file {path}: label set 'color': palette entry 0 [0, 0, 300] is not [r, g, b] in 0..255"),
    ("labels.csv", "a,b", "label file {path}: unknown format '.csv'; use .json or .txt"),
])
def test_bad_files_name_the_file_and_the_fix(tmp_path, file_name, content, message):
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(ValueError) as info:
        drn.load_label_set(path)
    assert str(info.value).startswith(message.format(path=path))


def test_neither_preset_nor_file():
    with pytest.raises(ValueError) as info:
        drn.load_label_set("citiscapes")
    assert str(info.value) == (
        "label set 'citiscapes': not a preset (cityscapes, imagenet) and no such file; "
        "pass a preset name or the path of a .json or .txt label file"
    )


def test_ignore_index_must_not_be_a_class():
    with pytest.raises(ValueError, match="ignore_index 1 is a class id"):
        LabelSet("x", ("a", "b"), generate_palette(2), ignore_index=1)


def test_generated_palette_is_deterministic_and_distinct():
    assert generate_palette(1000) == generate_palette(1000)
    assert len(set(generate_palette(4096))) == 4096


def test_model_carries_label_set_from_file(tmp_path):
    path = tmp_path / "two.txt"
    path.write_text("sky\nground\n")
    model = drn.create_model("drn_d_22", classes=path)
    config = model.drn_config
    assert config.num_classes == 2 and config.label_set.class_names == ("sky", "ground")
    assert model.seg.out_channels == 2


# --- mask facts and the default label set ---------------------------------------------------

@pytest.mark.parametrize(("num_classes", "dtype"), [
    (1, np.uint8), (19, np.uint8), (255, np.uint8), (256, np.uint8),
    (257, np.uint16), (1000, np.uint16), (65535, np.uint16), (65536, np.uint16),
])
def test_mask_dtype(num_classes, dtype):
    assert mask_dtype(num_classes) == np.dtype(dtype)
    assert isinstance(mask_dtype(num_classes), np.dtype)
    assert np.iinfo(mask_dtype(num_classes)).max >= num_classes - 1


def test_mask_dtype_refuses_what_no_mask_holds():
    assert MAX_CLASSES == 65536
    with pytest.raises(ValueError, match="^a mask holds at most 65,536 classes; got 65537$"):
        mask_dtype(65537)
    with pytest.raises(ValueError, match="^num_classes must be >= 1, got 0$"):
        mask_dtype(0)


@pytest.mark.parametrize(("num_classes", "ignore"), [
    (2, 255), (255, 255), (256, 65535), (65535, 65535), (65536, 65536),
])
def test_default_ignore_index_is_never_a_class(num_classes, ignore):
    assert default_ignore_index(num_classes) == ignore >= num_classes
    assert LabelSet.default(num_classes).ignore_index == ignore


def test_default_label_set():
    labels = LabelSet.default(3)
    assert labels.name == "default"
    assert labels.class_names == ("class_0", "class_1", "class_2")
    assert labels.palette == generate_palette(3)
    assert (labels.mean, labels.std, labels.ignore_index) == (IMAGENET_MEAN, IMAGENET_STD, 255)
    assert LabelSet.default(3) is labels  # immutable: shared
    assert LabelSet.from_dict(labels.to_dict()) == labels
    with pytest.raises(ValueError, match="^a mask holds at most 65,536 classes; got 70000$"):
        LabelSet.default(70000)


def test_label_set_with_more_classes_than_a_mask_holds():
    names = [f"c{i}" for i in range(MAX_CLASSES + 1)]
    with pytest.raises(ValueError, match="^label set 'huge': a mask holds at most 65,536 classes; got 65537$"):
        LabelSet("huge", names, [(0, 0, 0)] * len(names))
