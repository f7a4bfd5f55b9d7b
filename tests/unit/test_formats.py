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
