"""`drn-label export` (PNG, COCO, Label Studio) and reading the output back (read_masks,
Hugging Face datasets, the snippets in docs/output.md), on a real run's OUTPUT."""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import drn
from pipeline import read_masks
from pipeline.cli import cli
from pipeline.store.formats import brush_rle, mask_png_name
from pipeline.store.output import METADATA_KEY, OutputMetadata, data_files

CITYSCAPES = drn.get_preset("cityscapes")
DOCS = Path(__file__).resolve().parents[2] / "docs" / "output.md"


def test_the_run_has_good_and_bad_rows(run, masks):
    assert sorted(masks) == sorted(run.good) and len(masks) == 10
    rows = {r["image_id"]: r for r in run.table.to_pylist()}
    assert all(rows[i]["status"] == "error" for i in run.bad)
    assert any(len(np.unique(m)) >= 3 for m in masks.values()), "masks must vary to test anything"


# -- png ---------------------------------------------------------------------------------------
def test_png_export_equals_the_parquet_masks(run, masks, tmp_path, cli_runner):
    out = tmp_path / "png"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "png", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == f"exported 10 images as png to {out} (2 error rows skipped)"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert written == sorted(mask_png_name(i) for i in masks)
    assert "street/day/e.png" in written and "fields/deep/h.png" in written
    for image_id, mask in masks.items():
        with Image.open(out / mask_png_name(image_id)) as img:  # Pillow, not OpenCV
            assert img.mode == "L"
            np.testing.assert_array_equal(np.asarray(img), mask, err_msg=image_id)


def test_png_export_in_colour_uses_the_palette(run, masks, tmp_path, cli_runner):
    out = tmp_path / "colour"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "png", "--colour", "--out", str(out)])
    assert res.exit_code == 0, res.output
    palette = np.asarray(CITYSCAPES.palette, np.uint8)
    for image_id, mask in masks.items():
        with Image.open(out / mask_png_name(image_id)) as img:
            assert img.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(img), palette[mask], err_msg=image_id)


def test_png_export_refuses_a_folder_with_files(run, tmp_path, cli_runner):
    (tmp_path / "old.png").write_bytes(b"x")
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "png", "--out", str(tmp_path)])
    assert res.exit_code == 2
    assert f"--out {tmp_path}: exists and is not an empty folder; choose a new folder" in res.output


@pytest.mark.parametrize("image_id, name, full", [
    ("a/b.jpg", "a/b.png", "a/b.jpg.png"),
    ("x.PNG", "x.png", "x.PNG.png"),
    ("noext", "noext.png", "noext.png"),
    ("a/./b.tar.gz", "a/b.tar.png", "a/b.tar.gz.png"),
    ("../../etc/passwd", "__/__/etc/passwd.png", "__/__/etc/passwd.png"),
    ("/abs/p.jpg", "abs/p.png", "abs/p.jpg.png"),
])
def test_mask_png_names_stay_inside_the_folder(image_id, name, full):
    assert mask_png_name(image_id) == name
    assert mask_png_name(image_id, keep_extension=True) == full


# -- coco --------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pycocotools' own use of numpy 2
def test_coco_export_loads_with_pycocotools_and_equals_the_masks(run, masks, tmp_path, cli_runner):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out = tmp_path / "coco.json"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "coco", "--out", str(out)])
    assert res.exit_code == 0, res.output
    coco = COCO(str(out))
    cats = coco.loadCats(coco.getCatIds())
    assert [(c["id"], c["name"]) for c in cats] == [(i + 1, n) for i, n in enumerate(CITYSCAPES.class_names)]
    images = coco.loadImgs(coco.getImgIds())
    assert sorted(i["file_name"] for i in images) == sorted(masks)
    n_annotations = 0
    for image in images:
        mask = masks[image["file_name"]]
        assert (image["height"], image["width"]) == mask.shape
        merged = np.full(mask.shape, 255, np.uint8)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert sorted(a["category_id"] - 1 for a in anns) == np.unique(mask).tolist()
        for ann in anns:
            region = coco.annToMask(ann).astype(bool)
            assert not (merged[region] != 255).any(), "one class per pixel"
            merged[region] = ann["category_id"] - 1
            assert isinstance(ann["segmentation"]["counts"], str) and ann["iscrowd"] == 0
            assert ann["area"] == int(region.sum())
            ys, xs = np.nonzero(region)
            assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert ann["bbox"] == mask_utils.toBbox(ann["segmentation"]).tolist()
        np.testing.assert_array_equal(merged, mask, err_msg=image["file_name"])
        n_annotations += len(anns)
    assert res.output.startswith(f"exported 10 images, {n_annotations} annotations as coco")


# -- label studio ------------------------------------------------------------------------------
# The task format of Label Studio's docs: "Import pre-annotated data" (a list of tasks, each a
# `data` object and a `predictions` list whose items hold `result`, optional `model_version`
# and `score`) and the BrushLabels tag's result (original_width/height, image_rotation,
# value.format "rle", value.rle a list of byte values, value.brushlabels).
LABEL_STUDIO_TASKS = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data", "predictions"],
        "properties": {
            "data": {"type": "object", "required": ["image"],
                     "properties": {"image": {"type": "string", "minLength": 1}}},
            "predictions": {
                "type": "array", "minItems": 1,
                "items": {
                    "type": "object", "required": ["result"],
                    "properties": {
                        "model_version": {"type": "string"},
                        "score": {"type": "number", "minimum": 0, "maximum": 1},
                        "result": {"type": "array", "items": {"$ref": "#/$defs/brush_result"}},
                    },
                },
            },
        },
    },
    "$defs": {
        "brush_result": {
            "type": "object",
            "required": ["from_name", "to_name", "type", "value", "original_width", "original_height"],
            "properties": {
                "id": {"type": "string"},
                "from_name": {"type": "string"},
                "to_name": {"type": "string"},
                "type": {"const": "brushlabels"},
                "original_width": {"type": "integer", "minimum": 1},
                "original_height": {"type": "integer", "minimum": 1},
                "image_rotation": {"type": "number"},
                "value": {
                    "type": "object",
                    "required": ["format", "rle", "brushlabels"],
                    "properties": {
                        "format": {"const": "rle"},
                        "rle": {"type": "array", "minItems": 1,
                                "items": {"type": "integer", "minimum": 0, "maximum": 255}},
                        "brushlabels": {"type": "array", "minItems": 1, "items": {"type": "string"}},
                    },
                },
            },
        },
    },
}


def decode_brush_rle(rle: list[int]) -> np.ndarray:
    """Label Studio's brush RLE back to its flat value array (the editor's decoder, as
    published in label-studio-converter's brush.py): 32-bit count, 5-bit word size - 1,
    four 4-bit length-field sizes - 1, then runs of (repeat bit, 2-bit field choice,
    length - 1, value or values)."""
    bits = "".join(f"{b:08b}" for b in rle)
    pos = 0

    def read(n: int) -> int:
        nonlocal pos
        value = int(bits[pos:pos + n], 2)
        pos += n
        return value

    num = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.zeros(num, np.uint8)
    i = 0
    while i < num:
        repeat = read(1)
        j = i + 1 + read(sizes[read(2)])
        if repeat:
            out[i:j] = read(word)
            i = j
        else:
            while i < j:
                out[i] = read(word)
                i += 1
    return out


def brush_region(result: dict) -> np.ndarray:
    values = decode_brush_rle(result["value"]["rle"])
    rgba = values.reshape(result["original_height"], result["original_width"], 4)
    return rgba[..., 3] > 0  # the editor draws the alpha channel


@pytest.mark.parametrize("shape, kind", [((1, 1), "ones"), ((1, 1), "zeros"), ((8, 8), "noise"),
                                         ((37, 53), "noise"), ((300, 400), "block"),
                                         ((300, 400), "ones"), ((129, 517), "lines")])
def test_brush_rle_round_trips(shape, kind):
    rng = np.random.default_rng(sum(shape))
    region = {"ones": np.ones(shape, bool), "zeros": np.zeros(shape, bool),
              "noise": rng.random(shape) < 0.5}.get(kind)
    if kind == "block":  # runs far longer than the widest length field (65536 values)
        region = np.zeros(shape, bool)
        region[100:, :250] = True
    if kind == "lines":
        region = np.zeros(shape, bool)
        region[::3] = True
        region[:, 7] = True
    rle = brush_rle(region)
    assert all(0 <= b <= 255 for b in rle)
    values = decode_brush_rle(rle).reshape(*shape, 4)
    assert (values == values[..., :1]).all(), "all four channels carry the region"
    assert set(np.unique(values).tolist()) <= {0, 255}
    np.testing.assert_array_equal(values[..., 3] > 0, region)


def test_label_studio_export_validates_and_decodes_to_the_masks(run, masks, tmp_path, cli_runner):
    import jsonschema

    out = tmp_path / "ls" / "tasks.json"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "label-studio", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert f"labelling config: {tmp_path / 'ls' / 'tasks_config.xml'}" in res.output
    tasks = json.loads(out.read_text())
    jsonschema.validate(tasks, LABEL_STUDIO_TASKS)
    # The results name the tags of the labelling config written beside the tasks.
    view = ET.fromstring((tmp_path / "ls" / "tasks_config.xml").read_text())
    brush = view.find("BrushLabels")
    assert view.find("Image").get("name") == brush.get("toName") == "image"
    assert [lab.get("value") for lab in brush.findall("Label")] == list(CITYSCAPES.class_names)
    uris = {r["image_id"]: r["uri"] for r in run.table.to_pylist()}
    assert sorted(t["data"]["image_id"] for t in tasks) == sorted(masks)
    for task in tasks:
        image_id = task["data"]["image_id"]
        mask = masks[image_id]
        assert task["data"]["image"] == uris[image_id]
        prediction = task["predictions"][0]
        assert prediction["model_version"].startswith("drn_d_22@")
        merged = np.full(mask.shape, 255, np.uint8)
        for result in prediction["result"]:
            assert result["from_name"] == brush.get("name") and result["to_name"] == "image"
            assert (result["original_height"], result["original_width"]) == mask.shape
            region = brush_region(result)
            assert not (merged[region] != 255).any()
            merged[region] = CITYSCAPES.class_names.index(result["value"]["brushlabels"][0])
        np.testing.assert_array_equal(merged, mask, err_msg=image_id)


def test_label_studio_url_prefix_and_tag_names(run, tmp_path, cli_runner):
    out = tmp_path / "t.json"
    res = cli_runner.invoke(cli, ["export", str(run.output), "--format", "label-studio", "--out", str(out),
                                  "--url-prefix", "/data/local-files/?d=images/",
                                  "--from-name", "seg", "--to-name", "img"])
    assert res.exit_code == 0, res.output
    task = json.loads(out.read_text())[0]
    assert task["data"]["image"] == "/data/local-files/?d=images/" + task["data"]["image_id"]
    assert {(r["from_name"], r["to_name"]) for r in task["predictions"][0]["result"]} == {("seg", "img")}
    assert '<BrushLabels name="seg" toName="img">' in (tmp_path / "t_config.xml").read_text()


# -- several models in one OUTPUT ------------------------------------------------------------
def test_export_chooses_among_several_models(run, tmp_path, cli_runner):
    out = tmp_path / "two"
    out.mkdir()
    files = data_files(str(run.output))
    for f in files:
        shutil.copy(f, out)
    # The first file again, as if a second checkpoint had labelled its images.
    table = pq.read_table(files[0])
    meta = OutputMetadata.from_json(table.schema.metadata[METADATA_KEY])
    other = "f" * 64
    meta = OutputMetadata(**{**meta.__dict__, "weights_sha256": other})
    table = table.set_column(table.schema.get_field_index("weights_sha256"), "weights_sha256",
                             pa.array([other] * table.num_rows, pa.string()))
    pq.write_table(table.replace_schema_metadata({METADATA_KEY: meta.to_json().encode()}),
                   out / "part-other.parquet")
    res = cli_runner.invoke(cli, ["export", str(out), "--format", "png", "--out", str(tmp_path / "a")])
    assert res.exit_code == 2
    assert f"{out} holds rows of several models: drn_d_22 (weights " in res.output
    assert "choose one with --model and/or --weights-sha256" in res.output
    res = cli_runner.invoke(cli, ["export", str(out), "--format", "png", "--out", str(tmp_path / "b"),
                                  "--weights-sha256", "ffff"])
    assert res.exit_code == 0, res.output
    n_ok = sum(s == "ok" for s in table.column("status").to_pylist())
    assert len(list((tmp_path / "b").rglob("*.png"))) == n_ok
    res = cli_runner.invoke(cli, ["export", str(out), "--format", "coco", "--out", str(tmp_path / "c.json"),
                                  "--model", "drn_a_18"])
    assert res.exit_code == 2 and "no rows of model drn_a_18" in res.output


# -- reading back ------------------------------------------------------------------------------
def test_read_masks_streams_decoded_rows(run, masks):
    rows = list(read_masks(str(run.output)))
    assert sorted(r.image_id for r in rows) == sorted(masks)
    for r in rows:
        np.testing.assert_array_equal(r.mask, masks[r.image_id])
        assert r.mask.shape == masks[r.image_id].shape and r.status == "ok"
    every = list(read_masks(str(run.output), status=None))
    assert sorted(r.image_id for r in every if r.mask is None) == sorted(run.bad)


def _python_blocks() -> list[tuple[str, str]]:
    text = DOCS.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    return [(b.splitlines()[0].lstrip("# ").strip(), b) for b in blocks]


@pytest.mark.parametrize("which", ["cityscapes", "demo"])
@pytest.mark.parametrize("title, code", _python_blocks(), ids=[t for t, _ in _python_blocks()])
def test_docs_output_snippets_run_as_written(title, code, which, tmp_path, monkeypatch, request):
    """Every Python snippet of docs/output.md runs against a real OUTPUT, the Cityscapes
    one and the one `drn-label demo` leaves (other classes); only the line that names
    OUTPUT is replaced. Snippets for libraries not installed here are skipped."""
    output = request.getfixturevalue("run").output if which == "cityscapes" else \
        request.getfixturevalue("demo_output")
    monkeypatch.chdir(tmp_path)
    if "pyspark" in code:  # the snippet's getOrCreate() then finds the loopback session
        request.getfixturevalue("spark_session")
    try:
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))
    except ImportError:
        pass
    code = re.sub(r'^OUTPUT = .*$', f"OUTPUT = {str(output)!r}", code, flags=re.M)
    for module in re.findall(r"^(?:import|from) (\w+)", code, flags=re.M):
        pytest.importorskip(module, reason=f"the {title!r} snippet needs {module}")
    exec(compile(code, f"docs/output.md: {title}", "exec"), {"__name__": "docs_snippet"})


README = DOCS.parents[1] / "README.md"


def _shell_snippets() -> list[tuple[str, str, str]]:
    """(page, the OUTPUT path it names, line) of every `python -c` line in the README's and
    docs/output.md's shell blocks."""
    found = []
    for page, path in ((README, "demo/out"), (DOCS, "labels")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            found += [(page.name, path, line) for line in block.splitlines()
                      if line.startswith("python -c ")]
    return found


@pytest.mark.parametrize("page, path, line", _shell_snippets(),
                         ids=[f"{p}:{line.split()[3][:20]}" for p, _, line in _shell_snippets()])
def test_shell_snippets_read_the_demo_output(page, path, line, demo_output):
    """The README's and docs/output.md's `python -c` lines run as printed (with the OUTPUT
    they name replaced by the demo's), with only what the package installs."""
    import shlex
    import subprocess
    import sys

    args = shlex.split(line.replace(f"{path}/", f"{demo_output}/").replace(f"'{path}'", f"'{demo_output}'"))
    assert args[0] == "python" and str(demo_output) in args[2], args
    done = subprocess.run([sys.executable, *args[1:]], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (page, line, done.stderr[-2000:])
    assert done.stdout.strip(), (page, line)


def test_the_readme_python_block_reads_the_demo_output(demo_output, capsys):
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
                if "read_masks" in b]
    exec(compile(block.replace('"demo/out"', repr(str(demo_output))), "README.md", "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 6 and all(" (48, 48) " in line for line in printed), printed
