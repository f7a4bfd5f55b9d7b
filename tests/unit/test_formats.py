"""Labelling-tool encodings both ways (pipeline.store.formats) and id manifests."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UsageError
from pipeline.store.formats import _bits, brush_region, brush_rle, coco_annotations, coco_region


@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 300)])
def test_brush_rle_decodes_to_the_region_it_encodes(shape):
    rng = np.random.default_rng(shape[1])
    region = rng.random(shape) < 0.3
    region[: shape[0] // 2, : shape[1] // 2] = True  # long runs too
    np.testing.assert_array_equal(brush_region(brush_rle(region), *shape), region)


def test_brush_region_reads_the_editors_literal_runs():
    """Label Studio's editor also writes literal runs (repeat bit 0): 1 x 3 image, the
    first pixel painted as 4 literal values, then 8 zeros as a repeat run."""
    header = ([12, 7, 2, 3, 7, 15], [32, 5, 4, 4, 4, 4])
    literal = ([0, 0, 3, 255, 255, 255, 255], [1, 2, 3, 8, 8, 8, 8])
    repeat = ([1, 1, 7, 0], [1, 2, 4, 8])
    values = np.array(header[0] + literal[0] + repeat[0], np.int64)
    widths = np.array(header[1] + literal[1] + repeat[1], np.int64)
    rle = np.packbits(_bits(values, widths)).tolist()
    np.testing.assert_array_equal(brush_region(rle, 1, 3), [[True, False, False]])
    with pytest.raises(ValueError, match="holds 3 pixels, the image 2 x 2 = 4"):
        brush_region(rle, 2, 2)


def test_coco_regions_from_rle_uncompressed_rle_and_polygons():
    mask = np.zeros((20, 30), np.uint8)
    mask[2:12, 5:25] = 1
    mask[15:, :] = 2
    for class_id, rle, area, _ in coco_annotations(mask, 3):
        np.testing.assert_array_equal(coco_region(rle, 20, 30), mask == class_id)
        assert area == (mask == class_id).sum()
    column_major = (mask == 1).ravel(order="F")
    changes = np.flatnonzero(np.diff(column_major.astype(np.int8))) + 1
    counts = np.diff(np.concatenate([[0], changes, [column_major.size]])).tolist()  # starts with 0s
    np.testing.assert_array_equal(coco_region({"counts": counts, "size": [20, 30]}, 20, 30), mask == 1)
    square = coco_region([[5, 2, 25, 2, 25, 12, 5, 12]], 20, 30)  # x, y corners of the box
    assert square[3:11, 6:24].all() and not square[14:].any()
    with pytest.raises(ValueError, match="RLE of size"):
        coco_region({"counts": counts, "size": [30, 20]}, 20, 30)


def test_id_manifests_read_back(tmp_path):
    from pipeline.tools.select import Picked, read_ids, write_ids

    picked = [Picked("b.png", "/x/b.png", 0.25), Picked("a/c.jpg", "/x/a/c.jpg", 0.5)]
    for suffix in (".txt", ".csv", ".parquet"):
        write_ids(tmp_path / f"m{suffix}", picked)
        assert read_ids(tmp_path / f"m{suffix}") == ["b.png", "a/c.jpg"]
    (tmp_path / "hand.txt").write_text("# picked by hand\nb.png\n\nb.png\nz.png\n")
    assert read_ids(tmp_path / "hand.txt") == ["b.png", "z.png"]
    (tmp_path / "bad.csv").write_text("uri\n/x/b.png\n")
    with pytest.raises(UsageError, match="no image_id column"):
        read_ids(tmp_path / "bad.csv")


# -- file names from image ids ---------------------------------------------------------------------
def test_export_names_are_safe_unique_and_independent_of_order():
    from pipeline.store.formats import MAX_PART_BYTES, ExportNames, id_name

    ids = ["a.jpg", "a.png", "a.txt", "b/c.jpg", "B/C.jpg", "x" * 300 + ".jpg", "y" * 300 + ".jpg",
           "new\nline.png", "new_line.png", "../../up.png", "", "d~0123456789ab.jpg", "d~0123456789ab",
           "e.png/f.jpg", "e.jpg", "/".join(["g" * 150] * 10) + "/h.jpg", "plain/kept.jpg"]
    names = ExportNames(ids)
    named = {i: names.name(i) for i in ids}
    assert len(set(named.values())) == len(ids)
    assert len({n.casefold() for n in named.values()}) == len(ids)  # case-insensitive disks too
    assert named == {i: ExportNames(reversed(ids)).name(i) for i in ids}  # not the order
    assert named["plain/kept.jpg"] == "plain/kept"  # a name nobody shares stays as it was
    assert named["a.jpg"].startswith("a~") and named["a.png"].startswith("a~")
    assert named["e.jpg"].startswith("e~")  # "e.png" would be a file beside the folder "e.png/"
    for name in named.values():
        parts = name.split("/")
        assert ".." not in parts and "" not in parts and not any(c in name for c in "\n\r\0\\")
        assert all(len(p.encode()) <= MAX_PART_BYTES + 13 for p in parts)
        assert len(name.encode()) <= 1024
    assert named["x" * 300 + ".jpg"] != named["y" * 300 + ".jpg"]  # shortened, told apart
    long = id_name("ü" * 150)  # 300 bytes: cut on a character boundary
    assert long.startswith("ü" * 93) and len(long.encode()) <= MAX_PART_BYTES


def test_export_names_keep_one_row_per_id():
    from pipeline.store.formats import ExportNames

    names = ExportNames(["a.png", "b.png", "a.png"])
    assert [names.first(i) for i in ["a.png", "b.png", "a.png", "b.png"]] == [True, True, False, True]
    assert names.name("a.png") == "a"  # the same id twice is not a clash


def test_a_png_export_of_long_and_clashing_ids_imports_back(tmp_path):
    """The png export's names map back to the images on import: a 240-character id
    (shortened with a digest) and ids named apart (``a.jpg`` and ``A.png``; ``b.jpg`` and
    ``b.png``); a mask whose name several images share is a clear error, never a guess."""
    import cv2

    from pipeline.store.formats import ExportNames
    from pipeline.training.importer import import_corrections

    images, masks = tmp_path / "images", tmp_path / "masks"
    ids = ["L" * 240 + ".png", "a.jpg", "A.png", "b.jpg", "b.png"]
    names = ExportNames(ids)
    for k, image_id in enumerate(ids):
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(images / image_id), np.full((8, 10, 3), 40 * k, np.uint8))
        (masks / names.name(image_id)).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(masks / (names.name(image_id) + ".png")), np.full((8, 10), k, np.uint8))
    with pytest.raises(UsageError, match="would share the mask"):  # the training layout pairs by stem
        import_corrections(masks, tmp_path / "data", images=images, classes="cityscapes")
    (masks / (names.name("b.png") + ".png")).unlink()
    result = import_corrections(masks, tmp_path / "data", images=images, classes="cityscapes")
    assert result.images == 4
    cv2.imwrite(str(masks / "b.png"), np.zeros((8, 10), np.uint8))  # b.jpg's or b.png's?
    with pytest.raises(UsageError, match="share its name"):
        import_corrections(masks, tmp_path / "data2", images=images, classes="cityscapes")
