"""`drn-label report` on a real run's OUTPUT: content, ordering, and a real headless browser."""
from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import drn
from pipeline.cli import cli
from pipeline.store.output import decode_mask
from pipeline.store.reader import read_metadata
from pipeline.tools.report import Stats, gallery_item

CITYSCAPES = drn.get_preset("cityscapes")


@pytest.fixture(scope="module")
def report(run, tmp_path_factory):
    """The report with the default --limit (50: every one of the 10 ok images)."""
    from click.testing import CliRunner

    path = tmp_path_factory.mktemp("report") / "report.html"
    res = CliRunner().invoke(cli, ["report", str(run.output), "--html", str(path)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == (f"report of 12 rows (10 ok, 2 errors), 10 images in the "
                                  f"gallery: {path}")
    return path


class Page(HTMLParser):
    """The report's images (in order) and visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict] = []
        self.text: list[str] = []
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "img":
            self.images.append(attrs)

    def handle_data(self, data):
        self.text.append(data)


def parse(path) -> Page:
    page = Page()
    page.feed(path.read_text())
    return page


def ok_rows(run) -> list[dict]:
    return [r for r in run.table.to_pylist() if r["status"] == "ok"]


def test_report_is_one_self_contained_file(report):
    page = parse(report)
    html = report.read_text()
    assert oct(report.stat().st_mode & 0o777) != "0o600"
    gallery = [i for i in page.images if "gallery-image" in i.get("class", "")]
    assert len(gallery) == len(page.images) == 20
    for img in gallery:
        assert re.fullmatch(r"data:image/(jpeg|png|webp);base64,[A-Za-z0-9+/=]+", img["src"])
        # at most 30 KB per picture at the default thumbnail size (a PNG blend was 120+ KB)
        assert len(base64.b64decode(img["src"].split(",", 1)[1])) <= 30 * 1024, img["alt"]
    overlays = [i["src"] for i in gallery if i["alt"].startswith("mask ")]
    assert overlays and all(src.startswith("data:image/webp;") for src in overlays)
    for tag, attrs in page.tags:  # nothing fetched from anywhere: no CDN, no external file
        assert tag != "link" and not (tag == "script" and "src" in attrs), (tag, attrs)
        for key in ("src", "href"):
            assert not attrs.get(key, "data:").startswith(("http", "//", "file:")), attrs
    assert html.count("<svg") == 2 and 'id="class-chart"' in html and 'id="confidence-histogram"' in html


def test_report_shows_the_model_runs_classes_and_errors(run, report):
    text = " ".join(parse(report).text)
    meta = read_metadata(str(run.output))[0]
    assert meta.weights_sha256 in text and "drn_d_22" in text and str(run.checkpoint) in text
    run_id = run.table.column("run_id")[0].as_py()
    assert run_id in text and "finished" in text
    for name in CITYSCAPES.class_names:  # chart labels and legend
        assert text.count(name) >= 2, name
    for image_id in run.bad:
        assert image_id in text
    assert "not a decodable image (N bytes)" in text  # grouped reasons
    assert "Errors (2)" in text


def test_gallery_is_least_confident_first_and_bounded_by_limit(run, tmp_path, cli_runner):
    path = tmp_path / "r.html"
    res = cli_runner.invoke(cli, ["report", str(run.output), "--html", str(path), "--limit", "4"])
    assert res.exit_code == 0, res.output
    page = parse(path)
    shown = [img["alt"][len("image "):] for img in page.images if img["alt"].startswith("image ")]
    expected = sorted(ok_rows(run), key=lambda r: (r["confidence"], r["image_id"]))[:4]
    assert shown == [r["image_id"] for r in expected]
    assert len(page.images) == 8


def test_gallery_pairs_are_source_and_palette_overlay(run, report):
    page = parse(report)
    rows = {r["image_id"]: r for r in ok_rows(run)}
    pairs = {}
    for img in page.images:
        kind, image_id = img["alt"].split(" ", 1)
        pairs.setdefault(image_id, {})[kind] = img["src"]
    assert sorted(pairs) == sorted(rows)
    palette = np.asarray(CITYSCAPES.palette, np.float64)
    for image_id, srcs in pairs.items():
        mask = decode_mask(rows[image_id]["mask"])
        source, overlay = (_decode(srcs[k]) for k in ("image", "mask"))
        h, w = mask.shape
        scale = min(1.0, 256 / max(h, w))
        assert source.shape[:2] == overlay.shape[:2] == (round(h * scale), round(w * scale))
        # overlay = (source + palette colour) / 2, checked where the mask is flat
        from pipeline.store.decode import resize_mask

        small = resize_mask(mask, *source.shape[:2])
        expected = (source.astype(np.float64) + palette[small]) / 2
        # lossy WebP (chroma subsampled) of thumbnails as small as 29 x 41: a few levels off
        assert np.median(np.abs(overlay - expected)) <= 8, image_id


def _decode(uri: str) -> np.ndarray:
    import io

    data = base64.b64decode(uri.split(",", 1)[1])
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_an_unreadable_source_shows_the_mask_alone(run, tmp_path):
    row = ok_rows(run)[0]
    meta = read_metadata(str(run.output))[0]
    item = gallery_item(row["image_id"], str(tmp_path / "gone.png"), row["confidence"],
                        decode_mask(row["mask"]), meta)
    assert item.note.startswith("source not shown: ") and "gone.png" in item.note
    assert _decode(item.image_uri).shape == _decode(item.overlay_uri).shape


def test_stats_keep_the_n_lowest_confidences_in_a_bounded_heap():
    rng = np.random.default_rng(3)
    stats = Stats(num_classes=2, limit=7)
    everything = []
    for b in range(20):
        conf = rng.random(50).astype(np.float32)
        ids = [f"{b:02d}/{i:02d}" for i in range(50)]
        everything += zip(conf.tolist(), ids)
        frac = [[0.25, 0.75]] * 50
        stats.add(pa.record_batch({
            "image_id": ids, "uri": ids, "status": ["ok"] * 50, "error": pa.nulls(50, pa.string()),
            "class_fraction": pa.array(frac, pa.list_(pa.float32())),
            "confidence": pa.array(conf, pa.float32())}))
        assert len(stats.lowest) <= 7
    assert [i for _, i, _ in stats.least_confident()] == [i for _, i in sorted(everything)[:7]]
    assert stats.ok == 1000 and stats.confidence_hist.sum() == 1000
    np.testing.assert_allclose(stats.fraction_sum / stats.ok, [0.25, 0.75])


# -- a real browser ----------------------------------------------------------------------------
def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium; installed with apt-get when missing and this process may."""
    path = _find_chromium()
    if path is None and hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        try:
            subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True,
                           timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = _find_chromium()
    if path is None:
        pytest.skip("no chromium to open the report in (apt-get install chromium)")
    return path


def _chromium(binary: str, tmp_path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    shot = tmp_path / "report.png"
    res = _chromium(chromium, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000",
                    report.as_uri())
    assert shot.exists(), res.stderr[-2000:]
    with Image.open(shot) as img:
        pixels = np.asarray(img.convert("RGB")).astype(np.float64)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels.std() > 20, "blank screenshot"
    assert (pixels.min(axis=2) < 200).mean() > 0.03, "hardly anything drawn"
    # Every gallery image decoded: the page's own script counts them after load.
    res = _chromium(chromium, tmp_path, "--dump-dom", report.as_uri())
    body = re.search(r"<body[^>]*>", res.stdout)
    assert body, res.stderr[-2000:]
    assert 'data-images-loaded="20/20"' in body.group(0), body.group(0)


def test_report_of_an_output_without_rows_fails_with_exit_1(tmp_path, cli_runner):
    """No rows is not a bad option (exit 2) but a command that cannot do its job (exit 1)."""
    res = cli_runner.invoke(cli, ["report", str(tmp_path / "none"), "--html", str(tmp_path / "r.html")])
    assert res.exit_code == 1
    assert "Usage:" not in res.output
    assert f"error: {tmp_path / 'none'}: no labelled rows (no Parquet data files); run `drn-label run` first" in res.output
    assert not (tmp_path / "r.html").exists()
