"""`drn-label run` end to end on a real local Ray: mixed images in, Parquet out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import drn
from pipeline.cli import cli
from pipeline.store.output import SCHEMA, METADATA_KEY, class_fraction_of, data_files, decode_mask
from tests.imagegen import make_collection
from tests.modelkit import authors_checkpoint

CITYSCAPES = drn.get_preset("cityscapes")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory, ray_session, cli_runner_module):
    root = tmp_path_factory.mktemp("e2e")
    cases = make_collection(root / "in")
    ckpt = authors_checkpoint(root / "drn_d_22_seg.pth", num_classes=19)
    out = root / "out"
    # The exact call the README documents, with small files so that several are written.
    result = cli_runner_module.invoke(cli, [
        "run", str(root / "in"), str(out), "--model", "drn_d_22", "--weights", str(ckpt),
        "--classes", "cityscapes", "--batch-size", "4", "--rows-per-file", "10"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(data_files(str(out)), schema=SCHEMA)
    return cases, ckpt, out, table, result


@pytest.fixture(scope="module")
def cli_runner_module():
    from click.testing import CliRunner

    return CliRunner()


def test_one_row_per_input_with_status(labelled):
    cases, _, _, table, result = labelled
    assert len(cases) >= 30 + 4
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert len(rows) == table.num_rows == len(cases)
    for image_id, case in cases.items():
        row = rows[image_id]
        if case.ok:
            assert row["status"] == "ok", (image_id, row["error"])
            assert row["error"] is None
        else:
            assert row["status"] == "error"
            assert "\n" not in row["error"]
            assert row["error"].startswith(str(case.path)), row["error"]
            assert row["mask"] is None and row["class_scores"] is None
    n_ok = sum(c.ok for c in cases.values())
    assert f"finished: {n_ok} ok, {len(cases) - n_ok} errors" in result.output


def test_rows_keep_the_output_contract(labelled):
    cases, ckpt, _, table, _ = labelled
    assert table.schema.remove_metadata().equals(SCHEMA)
    sha = drn.load_checkpoint(str(ckpt)).sha256
    for row in table.to_pylist():
        assert row["model"] == "drn_d_22" and row["weights_sha256"] == sha
        assert row["labelled_at"] is not None and row["run_id"]
        case = cases[row["image_id"]]
        if not case.ok:
            continue
        mask = decode_mask(row["mask"])
        assert mask.dtype == np.uint8 and mask.ndim == 2
        assert mask.shape == case.size == (row["height"], row["width"])
        assert mask.max() < 19
        np.testing.assert_allclose(row["class_fraction"], class_fraction_of(mask, 19), atol=1e-6)
        assert abs(sum(row["class_scores"]) - 1) < 1e-4 and len(row["class_scores"]) == 19
        assert 0 < row["confidence"] <= 1


def test_file_metadata_and_layout(labelled):
    _, _, out, _, _ = labelled
    files = data_files(str(out))
    assert len(files) >= 3, "rows_per_file=10 over 40+ rows gives several files"
    for f in files:
        meta = json.loads(pq.read_schema(f).metadata[METADATA_KEY])
        assert meta["schema_version"] == 2 and meta["model"] == "drn_d_22"
        assert meta["classes"] == list(CITYSCAPES.class_names)
        assert meta["palette"] == [list(c) for c in CITYSCAPES.palette]
        assert meta["mean"] == list(CITYSCAPES.mean) and meta["std"] == list(CITYSCAPES.std)
        assert meta["num_classes"] == 19 and meta["ignore_index"] == 255
    # data/ holds Parquet data files only; everything else lives in _state/
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(Path(f).name for f in files)
    assert sorted(p.name for p in out.iterdir()) == ["_state", "data"]
    runs = list((out / "_state" / "runs").glob("*.json"))
    assert len(runs) == 1
    record = json.loads(runs[0].read_text())
    assert record["state"] == "finished" and record["counts"]["to_label"] == len(list(_inputs(labelled)))
    progress = json.loads((out / "_state" / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["labelled"] == progress["total"]


def _inputs(labelled):
    return labelled[0].values()


def test_duckdb_reads_the_output(labelled):
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra")
    cases, _, out, _, _ = labelled
    con = duckdb.connect()
    n, n_ok, top_road = con.execute(
        f"SELECT count(*), count(*) FILTER (WHERE status = 'ok'), "
        f"max(class_fraction[1]) FROM read_parquet('{out}/**/*.parquet')").fetchone()
    assert n == len(cases) and n_ok == sum(c.ok for c in cases.values())
    assert 0 <= top_road <= 1


def test_masks_equal_the_models_own_argmax(labelled):
    """No shift, flip, transpose or channel swap between the file and the model."""
    cases, ckpt, _, table, _ = labelled
    model = drn.create_model("drn_d_22", weights=str(ckpt), classes="cityscapes")
    rows = {r["image_id"]: r for r in table.to_pylist()}
    mean = torch.tensor(CITYSCAPES.mean).view(1, 3, 1, 1)
    std = torch.tensor(CITYSCAPES.std).view(1, 3, 1, 1)
    checked = 0
    for case in cases.values():
        if not (case.ok and case.lossless) or max(case.size) > 300 or min(case.size) < 32:
            continue
        x = torch.from_numpy(case.rgb).permute(2, 0, 1).float().unsqueeze(0) / 255.0
        with torch.no_grad():
            expected = model((x - mean) / std).argmax(1)[0].numpy()
        mask = decode_mask(rows[case.image_id]["mask"])
        assert len(np.unique(expected)) >= 2, "weights must make masks follow content"
        np.testing.assert_array_equal(mask, expected, err_msg=case.image_id)
        checked += 1
        if checked == 6:
            break
    assert checked >= 4


def test_status_and_inspect_commands(labelled, cli_runner):
    cases, _, out, _, _ = labelled
    res = cli_runner.invoke(cli, ["status", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["state"] == "finished"
    res = cli_runner.invoke(cli, ["status", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(f"{out}: finished (run ")
    res = cli_runner.invoke(cli, ["inspect", str(out)])
    assert res.exit_code == 0, res.output
    n_ok = sum(c.ok for c in cases.values())
    assert res.output.startswith(f"{out}: {len(cases)} rows, {n_ok} ok, {len(cases) - n_ok} errors")
    assert "mean class fraction, drn_d_22" in res.output
    assert "1  not a decodable image (N bytes)" in res.output  # reasons grouped, numbers as N


def test_rerun_labels_nothing_new(labelled, cli_runner):
    cases, ckpt, out, _, _ = labelled
    in_dir = Path(next(iter(cases.values())).path).parent
    while not (in_dir / "..").resolve().name == "e2e" and in_dir.name != "in":
        in_dir = in_dir.parent
    res = cli_runner.invoke(cli, ["run", str(in_dir), str(out), "--weights", str(ckpt),
                                  "--classes", "cityscapes"])
    assert res.exit_code == 0, res.output
    assert f"0 ok, 0 errors, {len(cases)} already labelled" in res.output


def test_s3_round_trip_input_and_output(tmp_path, ray_session, s3_server, cli_runner):
    """Images read from and labels written to a local S3-compatible server over real HTTP."""
    import pyarrow.dataset as pads

    from pipeline.store.fs import resolve

    import cv2

    from tests.imagegen import scene

    local = tmp_path / "in"
    (local / "sub").mkdir(parents=True)
    for name, (h, w), seed in [("img0.png", (40, 56), 0), ("sub/img1.png", (64, 48), 1),
                               ("img2.png", (33, 71), 2), ("sub/img3.png", (48, 48), 3)]:
        cv2.imwrite(str(local / name), scene(h, w, seed)[:, :, ::-1])
    (local / "broken.jpg").write_bytes(b"not an image")
    bucket = s3_server.make_bucket()
    s3_in = s3_server.upload_tree(local, bucket, "in")
    s3_out = f"s3://{bucket}/labels"
    args = ["run", s3_in, s3_out, "--num-classes", "3", "--batch-size", "2", "--rows-per-file", "2"]
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "finished: 4 ok, 1 errors" in res.output
    keys = s3_server.keys(bucket, "labels/")
    data = [k for k in keys if k.endswith(".parquet")]
    assert data and all(k.startswith("labels/data/part-") for k in data)
    assert "labels/_state/progress.json" in keys and any(k.startswith("labels/_state/runs/") for k in keys)
    assert not any(k.endswith(".part") or k.endswith("lease.json") for k in keys)
    fs, root = resolve(s3_out)
    table = pads.dataset([f"{bucket}/{k}" for k in data], filesystem=fs, format="parquet").to_table()
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ["broken.jpg", "img0.png", "img2.png", "sub/img1.png", "sub/img3.png"]
    assert rows["broken.jpg"]["status"] == "error" and rows["broken.jpg"]["uri"] == f"{s3_in}/broken.jpg"
    mask = decode_mask(rows["img2.png"]["mask"])
    assert mask.shape == (33, 71)
    # Resume on S3: the same command labels nothing twice.
    res = cli_runner.invoke(cli, args)
    assert res.exit_code == 0 and "0 ok, 0 errors, 5 already labelled" in res.output, res.output


def test_max_error_rate_exits_3_after_writing_every_row(tmp_path, ray_session, cli_runner):
    import cv2

    from tests.imagegen import scene

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f"good{i}.png"), scene(32, 40, i))
    (src / "empty.jpg").write_bytes(b"")
    (src / "text.png").write_text("not a picture")
    out = tmp_path / "out"
    res = cli_runner.invoke(cli, ["run", str(src), str(out), "--num-classes", "3",
                                  "--max-error-rate", "0.25"])
    assert res.exit_code == 3, res.output
    assert "finished: 2 ok, 2 errors" in res.output
    assert "error: 2 of 4 images failed, more than --max-error-rate 0.25" in res.output
    assert pq.read_table(data_files(str(out))).num_rows == 4  # nothing lost: every row written
    assert "labels will be meaningless" in res.output  # no weights: the warning says so
