"""The labelling loop's tools on a real run's OUTPUT: uncertainty columns, saved
probabilities, selection manifests, `export --ids`, exact export/import round trips,
comparing two model identities, and reading version-1 outputs."""
from __future__ import annotations

import csv
import json
import math
import shutil

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import decode_mask, read_masks, read_probs
from pipeline.cli import cli
from pipeline.store.output import METADATA_KEY, SCHEMA, data_files
from pipeline.tools.select import read_ids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ok_rows(run) -> dict[str, dict]:
    return {r["image_id"]: r for r in run.table.to_pylist() if r["status"] == "ok"}


def test_every_ok_row_carries_its_uncertainty(run, ok_rows):
    assert len(ok_rows) == 10
    for row in ok_rows.values():
        assert 0.0 <= row["entropy"] <= math.log(19) + 1e-4
        assert 0.0 <= row["margin"] <= row["confidence"] + 1e-6
        assert 0.0 <= row["uncertain_fraction"] <= 1.0
        assert row["probs"] is None  # only with --save-probs
    errors = [r for r in run.table.to_pylist() if r["status"] != "ok"]
    assert errors and all(r["entropy"] is None and r["margin"] is None for r in errors)
    meta = json.loads(pq.read_schema(data_files(str(run.output))[0]).metadata[METADATA_KEY])
    assert meta["schema_version"] == 2


def test_save_probs_stores_probabilities_that_agree_with_the_mask(run, tmp_path, cli_runner):
    out = tmp_path / "probs"
    res = cli_runner.invoke(cli, ["run", str(run.input / "street"), str(out), "--weights",
                                  str(run.checkpoint), "--classes", "cityscapes", "--save-probs"])
    assert res.exit_code == 0, res.output
    masks = {r.image_id: r.mask for r in read_masks(str(out))}
    probs = dict(read_probs(str(out)))
    assert sorted(probs) == sorted(masks) == ["c.png", "day/d.png", "day/e.jpg"]
    for image_id, p in probs.items():
        mask = masks[image_id]
        assert p.dtype == np.float32 and p.shape == (19, *mask.shape)
        np.testing.assert_allclose(p.sum(0), 1.0, atol=19 / 510 + 1e-6)
        # Block-averaged probabilities: their arg-max is the mask away from class edges.
        assert (p.argmax(0) == mask).mean() > 0.6
    small = dict(read_probs(str(out), full_size=False))
    assert small["c.png"].shape == (19, 15, 25)  # 120 x 200 in 8 x 8 blocks


def test_select_strategies_and_manifests(run, ok_rows, tmp_path, cli_runner):
    def select(strategy: str, out, *extra):
        res = cli_runner.invoke(cli, ["select", str(run.output), "--strategy", strategy, "--limit", "4",
                                      "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        assert res.output.startswith(f"selected 4 of 10 images by {strategy}")
        return read_ids(out)

    by = lambda key, reverse=False: sorted(ok_rows, key=lambda i: ok_rows[i][key], reverse=reverse)[:4]
    assert select("least-confident", tmp_path / "lc.txt") == by("confidence")
    assert select("entropy", tmp_path / "e.csv") == by("entropy", reverse=True)
    assert select("margin", tmp_path / "m.parquet") == by("margin")
    with (tmp_path / "e.csv").open() as f:
        first = next(csv.DictReader(f))
    assert float(first["score"]) == pytest.approx(ok_rows[first["image_id"]]["entropy"])
    random_a = select("random", tmp_path / "r1.txt", "--seed", "3")
    assert random_a == select("random", tmp_path / "r2.txt", "--seed", "3")
    assert random_a != select("random", tmp_path / "r3.txt", "--seed", "4")
    balanced = select("class-balanced", tmp_path / "cb.txt")
    assert len(set(balanced)) == 4 and set(balanced) <= set(ok_rows)
    # The rarest predicted class has its least confident image picked first.
    fractions = {i: np.array(r["class_fraction"]) > 0 for i, r in ok_rows.items()}
    counts = sum(fractions.values())
    rarest = min((k for k in range(19) if counts[k]), key=lambda k: (counts[k], k))
    holders = [i for i in ok_rows if fractions[i][rarest]]
    assert balanced[0] == min(holders, key=lambda i: (ok_rows[i]["confidence"], i))

    # export --ids: exactly the selected images, in every format.
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "coco", "--out",
                                  str(tmp_path / "sel.json"), "--ids", str(tmp_path / "lc.txt")])
    assert res.exit_code == 0, res.output
    coco = json.loads((tmp_path / "sel.json").read_text())
    assert sorted(i["file_name"] for i in coco["images"]) == sorted(by("confidence"))
    (tmp_path / "stranger.txt").write_text("a.png\nnot/there.png\n")
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "png", "--out",
                                  str(tmp_path / "x"), "--ids", str(tmp_path / "stranger.txt")])
    assert res.exit_code == 2 and "1 of 2 image ids have no row" in res.output
    assert "not/there.png" in res.output
    res = cli_runner.invoke(cli, ["select", str(run.output), "--limit", "3", "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 2 and "must end in .txt, .csv, .parquet" in res.output


def _imported_masks(folder) -> dict[str, np.ndarray]:
    return {p.relative_to(folder / "masks").as_posix(): cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            for p in (folder / "masks").rglob("*.png")}


@pytest.mark.parametrize("fmt", ["label-studio", "coco", "png"])
def test_export_then_import_gives_back_the_parquet_masks_exactly(fmt, run, ok_rows, tmp_path, cli_runner):
    from pipeline.store.formats import mask_png_name
    from pipeline.training.train import list_samples

    target = tmp_path / ("export" if fmt == "png" else "export.json")
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", fmt, "--out", str(target)])
    assert res.exit_code == 0, res.output
    args = ["import", str(target), "--out", str(tmp_path / "data")]
    if fmt == "label-studio":
        args.append("--with-predictions")  # the pre-labels accepted as they are
    else:
        args += ["--images", str(run.input), "--classes", "cityscapes" if fmt == "png" else str(run.output)]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"imported 10 images with masks from {fmt}")
    got = _imported_masks(tmp_path / "data")
    assert sorted(got) == sorted(mask_png_name(i) for i in ok_rows)
    for image_id, row in ok_rows.items():
        np.testing.assert_array_equal(got[mask_png_name(image_id)], decode_mask(row["mask"]), err_msg=image_id)
        assert (tmp_path / "data" / "images" / image_id).read_bytes() == (run.input / image_id).read_bytes()
    classes = json.loads((tmp_path / "data" / "classes.json").read_text())
    assert classes["classes"][:2] == ["road", "sidewalk"] and len(classes["classes"]) == 19
    assert len(list_samples(tmp_path / "data")) == 10  # the layout `train` reads


def test_label_studio_annotations_win_over_predictions(run, ok_rows, tmp_path, cli_runner):
    from pipeline.store.formats import brush_rle, mask_png_name

    target = tmp_path / "tasks.json"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "label-studio", "--out", str(target)])
    assert res.exit_code == 0, res.output
    tasks = json.loads(target.read_text())
    task = next(t for t in tasks if t["data"]["image_id"] == "a.png")
    h, w = decode_mask(ok_rows["a.png"]["mask"]).shape
    region = np.zeros((h, w), bool)
    region[:10] = True  # an annotator paints the top rows "sky", leaves the rest unpainted
    task["annotations"] = [{"was_cancelled": False, "result": [{
        "type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": w,
        "original_height": h, "value": {"format": "rle", "rle": brush_rle(region), "brushlabels": ["sky"]}}]}]
    target.write_text(json.dumps(tasks))
    res = cli_runner.invoke(cli, ["import", str(target), "--out", str(tmp_path / "data")])
    assert res.exit_code == 0, res.output
    assert "imported 1 images" in res.output and "9 without an annotation skipped" in res.output
    mask = _imported_masks(tmp_path / "data")[mask_png_name("a.png")]
    assert (mask[:10] == 10).all() and (mask[10:] == 255).all()  # sky = 10; unpainted = ignore


def test_compare_two_identities_and_the_report_section(run, tmp_path, cli_runner):
    from tests.modelkit import authors_checkpoint

    out = tmp_path / "out"
    shutil.copytree(run.output, out)
    other = authors_checkpoint(tmp_path / "other.pth", num_classes=19, seed=1)
    manifest = tmp_path / "fields.csv"  # the same image ids as the first run's
    ids = ["fields/f.png", "fields/deep/g.png", "fields/deep/h.jpg"]
    manifest.write_text("uri,image_id\n" + "".join(f"{run.input / i},{i}\n" for i in ids))
    res = cli_runner.invoke(cli, ["run", str(manifest), str(out), "--weights", str(other),
                                  "--classes", "cityscapes"])
    assert res.exit_code == 0, res.output
    a = run.table.column("weights_sha256")[0].as_py()
    res = cli_runner.invoke(cli, ["compare", str(out), "--a", a[:10], "--b", str(other),
                                  "--out", str(tmp_path / "agree.csv")])
    assert res.exit_code == 0, res.output
    assert "3 images in both (7 only in A, 0 only in B)" in res.output
    with (tmp_path / "agree.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["image_id"] for r in rows) == ["fields/deep/g.png", "fields/deep/h.jpg", "fields/f.png"]
    assert all(0.0 <= float(r["pixel_agreement"]) < 1.0 for r in rows)
    res = cli_runner.invoke(cli, ["compare", str(out), "--a", a, "--b", a])
    assert res.exit_code == 2 and "name the same model identity" in res.output
    res = cli_runner.invoke(cli, ["report", str(out), "--html", str(tmp_path / "r.html"), "--weights-sha256",
                                  a[:12], "--compare-to", str(other)])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r.html").read_text()
    assert 'id="compare"' in page and "fields/deep/g.png" in page


def test_version_1_outputs_still_read_select_and_resume(run, tmp_path, cli_runner):
    """Files written before schema version 2 lack the uncertainty columns: readers fill
    nulls, selection by confidence works, and a rerun labels nothing twice."""
    out = tmp_path / "v1"
    out.mkdir()
    v1_columns = [n for n in SCHEMA.names if n not in ("entropy", "margin", "uncertain_fraction", "probs")]
    for path in data_files(str(run.output)):
        table = pq.read_table(path)
        meta = json.loads(table.schema.metadata[METADATA_KEY])
        meta["schema_version"] = 1
        table = table.select(v1_columns).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        pq.write_table(table, out / path.rsplit("/", 1)[1])
    rows = list(read_masks(str(out)))
    assert len(rows) == 10 and all(r.entropy is None and r.mask is not None for r in rows)
    res = cli_runner.invoke(cli, ["select", str(out), "--limit", "2", "--out", str(tmp_path / "s.txt")])
    assert res.exit_code == 0, res.output
    res = cli_runner.invoke(cli, ["select", str(out), "--strategy", "entropy", "--limit", "2",
                                  "--out", str(tmp_path / "e.txt")])
    assert res.exit_code == 2 and "schema version 1" in res.output
    files = set(data_files(str(out)))
    res = cli_runner.invoke(cli, ["run", str(run.input), str(out), "--weights", str(run.checkpoint),
                                  "--classes", "cityscapes"])
    assert res.exit_code == 0, res.output
    assert set(data_files(str(out))) == files  # every image had a row: nothing relabelled
