"""COCO polygons, YOLO segmentation labels and CVAT "Segmentation mask 1.1", each read back
on the session's real run. COCO is read with pycocotools (the format's own reader). YOLO
and CVAT have no reader that installs lightly from PyPI (ultralytics and datumaro pull in
hundreds of MB and their own numpy/OpenCV pins), so their files are parsed here as the
formats' specifications describe them: YOLO's segment label lines, CVAT's labelmap.txt and
Pascal VOC SegmentationClass/SegmentationObject PNGs."""
from __future__ import annotations

import zipfile

import cv2
import numpy as np
import pytest
import yaml

import drn
from pipeline.cli import cli
from pipeline.store.formats import mask_png_name

CITYSCAPES = drn.get_preset("cityscapes")


def painted(polygons_by_class: list[tuple[int, list[list[float]]]], shape) -> np.ndarray:
    """Rasterise (class, polygons) pairs with pycocotools, first come first painted; 255
    where no polygon covers a pixel."""
    from pycocotools import mask as mask_utils

    out = np.full(shape, 255, np.uint8)
    for class_id, polygons in polygons_by_class:
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, *shape))
        region = mask_utils.decode(rle).astype(bool)
        out[region & (out == 255)] = class_id
    return out


# Polygons through the boundary pixels' centres cannot draw 1-pixel-wide strokes and fill
# holes, so on the test run's speckled masks (8-13 classes on images of 29 x 41 to
# 240 x 320 pixels) they reproduce 81-94% of the pixels; 75% is the floor checked here.
MIN_PIXEL_AGREEMENT = 0.75


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_coco_polygons_load_with_pycocotools(run, masks, tmp_path, cli_runner):
    from pycocotools.coco import COCO

    out = tmp_path / "coco.json"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "coco", "--polygons",
                                  "--out", str(out)])
    assert res.exit_code == 0, res.output
    coco = COCO(str(out))
    images = coco.loadImgs(coco.getImgIds())
    assert sorted(i["file_name"] for i in images) == sorted(masks)
    for image in images:
        mask = masks[image["file_name"]]
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert {a["category_id"] - 1 for a in anns} <= set(np.unique(mask).tolist())
        for ann in anns:
            assert isinstance(ann["segmentation"], list) and ann["segmentation"]
            assert ann["area"] == int(coco.annToMask(ann).sum())
        drawn = painted([(a["category_id"] - 1, a["segmentation"]) for a in anns], mask.shape)
        assert (drawn == mask).mean() >= MIN_PIXEL_AGREEMENT, image["file_name"]


def test_yolo_segmentation_labels(run, masks, tmp_path, cli_runner):
    out = tmp_path / "yolo"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "yolo", "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load((out / "data.yaml").read_text())
    assert data["names"] == dict(enumerate(CITYSCAPES.class_names))
    for image_id, mask in masks.items():
        h, w = mask.shape
        label_file = out / "labels" / (mask_png_name(image_id)[:-4] + ".txt")
        pairs = []
        for line in label_file.read_text().splitlines():
            class_id, *coords = line.split()
            xy = np.asarray(coords, float).reshape(-1, 2)
            assert len(xy) >= 3 and (xy >= 0).all() and (xy <= 1).all()
            pairs.append((int(class_id), [(xy * [w, h]).reshape(-1).tolist()]))
        assert {c for c, _ in pairs} <= set(np.unique(mask).tolist())
        drawn = painted(pairs, mask.shape)
        assert (drawn == mask).mean() >= MIN_PIXEL_AGREEMENT, image_id


def test_cvat_segmentation_mask_zip(run, masks, tmp_path, cli_runner):
    out = tmp_path / "cvat.zip"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "cvat", "--out", str(out)])
    assert res.exit_code == 0, res.output
    with zipfile.ZipFile(out) as zf:
        labelmap = zf.read("labelmap.txt").decode().splitlines()
        assert labelmap[0].startswith("# label:color_rgb:parts:actions")
        colours = {}
        for k, line in enumerate(labelmap[1:]):
            name, rgb, parts, actions = line.split(":")
            assert name == CITYSCAPES.class_names[k] and parts == actions == ""
            colours[tuple(int(v) for v in rgb.split(","))] = k
        names = zf.read("ImageSets/Segmentation/default.txt").decode().split()
        assert sorted(names) == sorted(mask_png_name(i)[:-4] for i in masks)
        for image_id, mask in masks.items():
            name = mask_png_name(image_id)[:-4]
            rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(zf.read(f"SegmentationClass/{name}.png"),
                                                          np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            decoded = np.vectorize(lambda r, g, b: colours[(r, g, b)])(rgb[..., 0], rgb[..., 1], rgb[..., 2])
            np.testing.assert_array_equal(decoded, mask, err_msg=image_id)
            objects = cv2.imdecode(np.frombuffer(zf.read(f"SegmentationObject/{name}.png"), np.uint8),
                                   cv2.IMREAD_COLOR)
            assert len(np.unique(objects.reshape(-1, 3), axis=0)) == len(np.unique(mask))
