"""`export`, `report`, `bench` and `demo`: commands over a labelled OUTPUT, and the showcase."""
from __future__ import annotations

from pathlib import Path

import click

from pipeline.cli.options import example, identity_options


@click.command("report", epilog=example("drn-label report labels/ --html report.html"))
@click.argument("output")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The HTML file to write (self-contained: images and charts inlined).")
@click.option("--limit", type=click.IntRange(min=0), default=50, help="Gallery size: the N least confident images.")
@identity_options
@click.option("--compare-to", default=None,
              help="Add a section comparing with another model identity of OUTPUT (as `compare --b`).")
def report(output: str, html_path: Path, limit: int, model: str | None, weights_sha256: str | None,
           compare_to: str | None) -> None:
    """Write a self-contained HTML report of OUTPUT: run summary, class frequency,
    confidence histogram, the least confident images with their masks, and errors."""
    from pipeline.tools.report import write_report

    result = write_report(output, html_path, limit=limit, model=model, weights_sha256=weights_sha256,
                          compare_to=compare_to)
    click.echo(f"report of {result.rows} rows ({result.ok} ok, {result.errors} errors), "
               f"{result.gallery} images in the gallery: {result.path}")


@click.command("export", epilog=example(
    "drn-label export labels/ --format coco --out labels.coco.json",
    "drn-label export labels/ --format label-studio --ids picked.txt --out tasks.json"))
@click.argument("output")
@click.option("--format", "fmt", type=click.Choice(("png", "coco", "yolo", "cvat", "label-studio")),
              required=True,
              help="png: a folder of mask PNGs; coco: one COCO JSON (RLE, or --polygons); yolo: "
                   "YOLO segmentation labels; cvat: a CVAT 'Segmentation mask 1.1' zip; "
                   "label-studio: tasks JSON.")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The folder (png, yolo), JSON file (coco, label-studio) or zip (cvat) to write.")
@click.option("--colour", "--color", "colour", is_flag=True,
              help="png: RGB masks in the palette instead of class ids.")
@click.option("--polygons", is_flag=True, help="coco: polygon segmentations instead of RLE.")
@identity_options
@click.option("--from-name", default="tag", help="label-studio: the BrushLabels tag name.")
@click.option("--to-name", default="image", help="label-studio: the Image tag name.")
@click.option("--url-prefix", default=None,
              help="label-studio: data.image = this prefix + image id [default: the row's uri].")
@click.option("--ids", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Only these images: a manifest of image ids (.txt, .csv or .parquet, as "
                   "`drn-label select` writes).")
def export(output: str, fmt: str, out: Path, colour: bool, polygons: bool, model: str | None,
           weights_sha256: str | None, from_name: str, to_name: str, url_prefix: str | None,
           ids: Path | None) -> None:
    """Export OUTPUT's masks for labelling tools: PNG folder, COCO JSON, YOLO labels, CVAT zip,
    or Label Studio tasks.

    Only rows with status ok are exported; reading is streamed, so any size of OUTPUT works.
    """
    from pipeline.tools import export as engine

    result = engine.export(output, fmt, out, colour=colour, model=model, weights_sha256=weights_sha256,
                           from_name=from_name, to_name=to_name, url_prefix=url_prefix,
                           polygons=polygons, ids=ids)
    click.echo(result.summary())
    if fmt == "label-studio":
        click.echo(f"labelling config: {engine.config_path(out)}")


@click.command(epilog=example("drn-label bench --images 64 --size 256 --skip-plain"))
@click.option("--images", "count", type=click.IntRange(min=8), default=300)
@click.option("--size", type=click.IntRange(min=16), default=512, help="Image height (and width).")
@click.option("--width", type=click.IntRange(min=16), default=None,
              help="Image width [default: --size]: e.g. --size 1024 --width 2048.")
@click.option("--model", "arch", default="drn_d_22")
@click.option("--num-classes", type=click.IntRange(min=2), default=19)
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Images per forward pass [default: run's default].")
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where images and outputs go [default: a temporary directory].")
@click.option("--device", default="auto")
@click.option("--skip-plain", is_flag=True, help="Leave out (c), one plain process.")
@click.option("--stand-in", is_flag=True,
              help="Replace the model by one that costs nothing: how fast the pipeline feeds a model.")
@click.option("--png-levels", is_flag=True, help="Also measure bytes and time per mask per PNG level.")
@click.option("--memory-sizes", default=None,
              help="Comma-separated image counts (e.g. 1000,5000): pipeline peak memory at each.")
@click.option("--run-arg", "run_args", multiple=True, help="Extra option for `drn-label run` (repeatable).")
def bench(count, size, width, arch, num_classes, batch_size, workdir, device, skip_plain, stand_in,
          png_levels, memory_sizes, run_args) -> None:
    """Measure the bare model, the full pipeline and one plain process on the same images."""
    from pipeline.tools.bench import run_bench

    run_bench(count=count, size=size, arch=arch, num_classes=num_classes, batch_size=batch_size,
              workdir=workdir, device=device, skip_plain=skip_plain, png_levels=png_levels,
              memory_sizes=memory_sizes, run_args=run_args, stand_in=stand_in, width=width,
              echo=click.echo)


@click.command(epilog=example("drn-label demo", "drn-label demo --dir /tmp/demo --images 8"))
@click.option("--dir", "root", type=click.Path(file_okay=False, path_type=Path), default=Path("demo"),
              help="Where samples, checkpoint and output go.")
@click.option("--images", "count", type=click.IntRange(min=1), default=24, help="Sample images to label.")
def demo(root: Path, count: int) -> None:
    """Label sample images with a trained DRN on an embedded local Ray, and score the labels."""
    from pipeline.tools.demo import run_demo

    run_demo(root, count, echo=click.echo)


@click.command("push", epilog=example(
    "LABEL_STUDIO_API_KEY=... drn-label push labels/ --url http://localhost:8080 --project 1"))
@click.argument("output")
@click.option("--url", required=True, help="Label Studio's address, e.g. http://localhost:8080.")
@click.option("--project", type=click.IntRange(min=1), required=True, help="The project's id.")
@click.option("--token", envvar="LABEL_STUDIO_API_KEY", required=True, show_envvar=True,
              help="API token (Account & Settings > Access Token); best set in the environment.")
@identity_options
@click.option("--from-name", default="tag", help="The BrushLabels tag name of the project's config.")
@click.option("--to-name", default="image", help="The Image tag name of the project's config.")
@click.option("--url-prefix", default=None,
              help="Match tasks whose data.image = this prefix + image id [default: the row's uri].")
def push(output: str, url: str, project: int, token: str, model: str | None,
         weights_sha256: str | None, from_name: str, to_name: str, url_prefix: str | None) -> None:
    """Push OUTPUT's masks into a running Label Studio project as predictions.

    Each image's prediction goes to the project's task whose data.image is the image's
    uri (or --url-prefix + image id); images without a task become new tasks.
    """
    from pipeline.tools.labelstudio import push_label_studio

    result = push_label_studio(output, url, project, token, model=model,
                               weights_sha256=weights_sha256, from_name=from_name,
                               to_name=to_name, url_prefix=url_prefix)
    click.echo(result.summary())


@click.command("select", epilog=example(
    "drn-label select labels/ --strategy least-confident --limit 50 --out picked.txt"))
@click.argument("output")
@click.option("--strategy", type=click.Choice(("least-confident", "entropy", "margin", "random",
                                                "class-balanced")),
              default="least-confident", help="How to rank the images (docs/labelling-loop.md).")
@click.option("--limit", type=click.IntRange(min=1), required=True, help="How many images to pick.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The manifest to write: .txt (one image id a line), .csv or .parquet.")
@click.option("--seed", type=int, default=0, help="random: which sample.")
@identity_options
def select(output: str, strategy: str, limit: int, out: Path, seed: int, model: str | None,
           weights_sha256: str | None) -> None:
    """Pick the images people should check, most useful first, as a manifest of image ids
    that `export --ids` takes."""
    from pipeline.tools.select import select as engine

    result = engine(output, strategy, limit, out, model=model, weights_sha256=weights_sha256, seed=seed)
    click.echo(result.summary())


@click.command("compare", epilog=example("drn-label compare labels/ --a ckpt.pth --b round1.pth"))
@click.argument("output")
@click.option("--a", "a", required=True, help="Model identity A: a checkpoint file, weights sha256 (or a unique prefix), "
                                               "a model name, or MODEL@SHA.")
@click.option("--b", "b", required=True, help="Model identity B, the same way.")
@click.option("--top", type=click.IntRange(min=0), default=20, help="How many of the most changed images to list.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write every image's agreement (.csv or .parquet).")
def compare(output: str, a: str, b: str, top: int, out: Path | None) -> None:
    """Per-image agreement between two model identities' masks in OUTPUT (pixel agreement,
    mean IoU between the masks) and the images that changed most."""
    from pipeline.tools.compare import compare as engine

    result = engine(output, a, b, top=top, out=out)
    for line in result.lines():
        click.echo(line)
    if out is not None:
        click.echo(f"wrote {out}")
