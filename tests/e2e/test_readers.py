"""Every reader the README promises reads OUTPUT/data of a real run with no glue.

One test per reader, each on the session's small labelled output (tests/outputs.py): the
rows it sees are the run's rows, and the mask cell decodes to the Parquet's mask.
"""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import decode_mask


@pytest.fixture(scope="module")
def data_dir(run) -> str:
    """The path the README tells readers to use."""
    return str(run.output / "data")


@pytest.fixture(scope="module")
def expected(run) -> dict[str, str]:
    return {r["image_id"]: r["status"] for r in run.table.to_pylist()}


def first_ok_mask(run) -> tuple[str, np.ndarray]:
    row = next(r for r in run.table.to_pylist() if r["status"] == "ok")
    return row["image_id"], decode_mask(row["mask"])


def test_pandas(data_dir, run, expected):
    import pandas as pd

    df = pd.read_parquet(data_dir)
    assert dict(zip(df["image_id"], df["status"])) == expected
    image_id, mask = first_ok_mask(run)
    cell = df.set_index("image_id").loc[image_id, "mask"]
    np.testing.assert_array_equal(decode_mask(cell), mask)


def test_pyarrow(data_dir, run, expected):
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    table = pq.read_table(data_dir)
    assert dict(zip(table["image_id"].to_pylist(), table["status"].to_pylist())) == expected
    assert ds.dataset(data_dir, format="parquet").count_rows() == len(expected)


def test_duckdb(data_dir, expected):
    import duckdb

    rows = duckdb.sql(f"SELECT image_id, status FROM read_parquet('{data_dir}/*.parquet')").fetchall()
    assert dict(rows) == expected
    [(metadata,)] = duckdb.sql(f"SELECT value FROM parquet_kv_metadata('{data_dir}/*.parquet') "
                               "WHERE key = 'huggingface' LIMIT 1").fetchall()
    assert b'"mask": {"_type": "Image"}' in metadata


def test_polars_read_and_scan(data_dir, run, expected):
    import polars as pl

    df = pl.read_parquet(data_dir)
    assert dict(zip(df["image_id"].to_list(), df["status"].to_list())) == expected
    ok = pl.scan_parquet(data_dir).filter(pl.col("status") == "ok").select("image_id").collect()
    assert sorted(ok["image_id"].to_list()) == sorted(run.good)


def test_ray_data(data_dir, expected, ray_session):
    import ray

    rows = ray.data.read_parquet(data_dir, columns=["image_id", "status"]).take_all()
    assert {r["image_id"]: r["status"] for r in rows} == expected


def test_hugging_face_datasets_yields_the_mask_as_an_image(data_dir, run, expected, tmp_path,
                                                           monkeypatch):
    import datasets
    from PIL import Image

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    ds = datasets.load_dataset("parquet", data_dir=data_dir, split="train")  # no cast_column
    assert isinstance(ds.features["mask"], datasets.Image)
    assert dict(zip(ds["image_id"], ds["status"])) == expected
    masks = {r["image_id"]: decode_mask(r["mask"]) for r in run.table.to_pylist()}
    for row in ds:
        if row["status"] != "ok":
            assert row["mask"] is None
            continue
        assert isinstance(row["mask"], Image.Image) and row["mask"].mode == "L"
        assert row["mask"].size == (row["width"], row["height"])
        np.testing.assert_array_equal(np.asarray(row["mask"]), masks[row["image_id"]])


def test_spark(data_dir, expected, spark_session):
    rows = spark_session.read.parquet(data_dir).select("image_id", "status").collect()
    assert {r["image_id"]: r["status"] for r in rows} == expected
