"""Small real OUTPUTs for the report, export and docs tests, made once per test session.

`small_run(request.config, tmp_path_factory)` labels 12 images (10 good in nested folders,
2 bad files) with `drn-label run` on the session's local Ray and an authors'-layout
checkpoint (Cityscapes classes), and caches the result in the pytest config's stash, so
that every module that asks gets the same run. `demo_like_run` labels what `drn-label
demo` labels, the same way: synthetic scenes, a drn_d_22 checkpoint of the project's
format that carries the synthetic label set (untrained: the docs need its layout and
classes, not good masks), `drn-label run --job DIR/job.toml` as the demo writes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.store.output import SCHEMA, data_files
from tests.imagegen import scene
from tests.modelkit import authors_checkpoint

# (image_id, height, width): nested folders, odd sizes, one larger than a thumbnail.
GOOD = [
    ("a.png", 48, 64), ("b.jpg", 61, 97), ("street/c.png", 120, 200),
    ("street/day/d.png", 37, 53), ("street/day/e.jpg", 96, 96), ("fields/f.png", 64, 40),
    ("fields/deep/g.png", 29, 41), ("fields/deep/h.jpg", 150, 100), ("big/i.png", 240, 320),
    ("big/j.png", 80, 300),
]
BAD = {"bad/empty.jpg": b"", "bad/not_an_image.png": b"this is not an image\n"}


@dataclass(frozen=True)
class SmallRun:
    input: Path
    output: Path
    checkpoint: Path
    table: pa.Table          # every row, read back with the output schema
    good: tuple[str, ...]    # image ids expected ok
    bad: tuple[str, ...]     # image ids expected error


_KEY = pytest.StashKey[SmallRun]()


def small_run(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> SmallRun:
    if _KEY not in config.stash:
        config.stash[_KEY] = _label(tmp_path_factory.mktemp("small_run"))
    return config.stash[_KEY]


def _label(root: Path) -> SmallRun:
    from click.testing import CliRunner

    from pipeline.cli import cli

    images = root / "in"
    for k, (image_id, h, w) in enumerate(GOOD):
        path = images / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        rgb = scene(h, w, seed=300 + k)
        Image.fromarray(rgb).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)
    for image_id, data in BAD.items():
        (images / image_id).parent.mkdir(parents=True, exist_ok=True)
        (images / image_id).write_bytes(data)
    ckpt = authors_checkpoint(root / "drn_d_22_seg.pth", num_classes=19)
    out = root / "out"
    result = CliRunner().invoke(cli, [
        "run", str(images), str(out), "--model", "drn_d_22", "--weights", str(ckpt),
        "--classes", "cityscapes", "--batch-size", "4", "--rows-per-file", "5"])
    assert result.exit_code == 0, result.output
    table = pq.read_table(data_files(str(out)), schema=SCHEMA).sort_by("image_id")
    return SmallRun(images, out, ckpt, table, tuple(i for i, _, _ in GOOD), tuple(BAD))


_DEMO_KEY = pytest.StashKey[Path]()


def demo_like_run(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OUTPUT of a demo-like run (see the module's docstring), made once per session."""
    if _DEMO_KEY not in config.stash:
        config.stash[_DEMO_KEY] = _label_like_the_demo(tmp_path_factory.mktemp("demo_like"))
    return config.stash[_DEMO_KEY]


def _label_like_the_demo(root: Path) -> Path:
    from click.testing import CliRunner

    import drn
    from pipeline.cli import cli
    from pipeline.tools.demo import DEMO_ARCH, write_demo_spec
    from pipeline.training.synth import make_synthetic_set
    from tests.modelkit import content_model

    make_synthetic_set(root, count=6, size=48, seed=1)
    classes = drn.load_label_set(root / "classes.json")
    checkpoint = drn.save_checkpoint(content_model(DEMO_ARCH, classes=classes), root / "demo.pth")
    spec_file = write_demo_spec(root, Path(checkpoint))
    result = CliRunner().invoke(cli, ["run", "--job", str(spec_file)])
    assert result.exit_code == 0, result.output
    return root / "out"
