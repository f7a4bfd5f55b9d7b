"""`drn-label synth`, `train` and `eval`: labels you can check against ground truth."""
from __future__ import annotations

import json
from pathlib import Path

import click

from pipeline.cli.options import check_checkpoint, example


@click.command(epilog=example("drn-label synth data/train --count 300 --size 96 --seed 0"))
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(min=1), required=True, help="Images to write.")
@click.option("--size", type=click.IntRange(min=16), default=128, show_default=True, help="Side in pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Another seed gives a held-out set.")
@click.option("--num-classes", type=click.IntRange(2, 5), default=5, show_default=True)
def synth(directory: Path, count: int, size: int, seed: int, num_classes: int) -> None:
    """Write a synthetic segmentation set with exact ground truth to DIRECTORY.

    DIRECTORY/images/<id>.png, DIRECTORY/masks/<id>.png (class index per pixel, 255 =
    ignore) and DIRECTORY/classes.json (names, palette, mean, std).
    """
    from pipeline.training.synth import make_synthetic_set

    info = make_synthetic_set(directory, count=count, size=size, seed=seed, num_classes=num_classes)
    click.echo(f"wrote {count} images and masks ({size}x{size}, classes: {', '.join(info.class_names)}) "
               f"to {directory}")


@click.command(epilog=example("drn-label train data/train --out ckpt.pth",
                               "drn-label train round1/ --init ckpt.pth --out round1.pth"))
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "arch", default="drn_d_22", show_default=True, help="Architecture.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint to write (the project's format, with the label set): the best epoch.")
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many epochs (validation usually stops the run earlier).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Crop size.")
@click.option("--init", default=None, callback=check_checkpoint,
              help="Start from a checkpoint: an earlier round's `train` output (fine-tuning, with a "
                   "lower default --lr), or the authors' ImageNet or DRNSeg checkpoints (released "
                   "names such as drn_d_22:imagenet: `drn-label models`).")
@click.option("--classes", default=None, help="Preset or classes file when DATA has no classes.json.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning rate [default: 0.05 x batch/8 from scratch, half of it with a "
                   "same-classes --init; quartered and restarted if the loss diverges].")
@click.option("--scale-range", default="0.5,1.5", show_default=True,
              help="Random scale augmentation, MIN,MAX (the authors used 0.5,2 on large images).")
@click.option("--val", "val_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A held-out set (same layout) scored after every epoch [default: hold out --val-split of DATA].")
@click.option("--val-split", type=click.FloatRange(0, 1, max_open=True), default=0.1, show_default=True,
              help="Share of DATA held out for validation when --val is not given (0: none, keep the last epoch).")
@click.option("--patience", type=click.IntRange(min=0), default=5, show_default=True,
              help="In the second half of --epochs, stop after this many epochs without a better "
                   "validation mIoU (0: never).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="Torch threads on a CPU; 0 picks the fastest count by timing batches, "
                   "and picks again as the machine's load changes.")
@click.option("--restart", is_flag=True, help="Start over instead of resuming from OUT's training state.")
def train(data, arch, out, epochs, batch_size, size, init, classes, lr, scale_range, val_dir, val_split,
          patience, seed, device, threads, restart) -> None:
    """Train or fine-tune a DRN segmentation model on DATA (images/ + masks/ [+ classes.json]).

    The authors' recipe (random scale, crop, flip, SGD with the poly schedule, ignore index
    255) with defaults that work untuned: a validation split, the best epoch kept, an early
    stop, a learning rate picked from the batch size. Resumable: rerunning continues from
    OUT's saved state.
    """
    from pipeline.errors import UsageError
    from pipeline.training.train import train as train_fn

    import drn

    if arch not in drn.list_models():
        raise UsageError(f"--model {arch!r} is not one of {', '.join(drn.list_models())}")
    try:
        lo, hi = (float(v) for v in scale_range.split(","))
        assert 0 < lo <= hi
    except (ValueError, AssertionError):
        raise UsageError(f"--scale-range {scale_range!r}: expected MIN,MAX with 0 < MIN <= MAX, "
                         "e.g. 0.5,1.5") from None
    try:
        result = train_fn(data, arch=arch, out=out, epochs=epochs, batch_size=batch_size, size=size,
                          init=init, classes=classes, lr=lr, scale_range=(lo, hi), seed=seed,
                          device=device, val_dir=val_dir, val_split=val_split,
                          patience=patience or None, resume=not restart, threads=threads,
                          log=click.echo)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:  # the data or checkpoint given
        raise UsageError(str(exc)) from None
    best = (f", best epoch {result.best_epoch} (val mIoU {result.best_miou:.4f})"
            if result.best_miou is not None else "")
    early = " (stopped early)" if result.stopped_early else ""
    click.echo(f"checkpoint {result.checkpoint}: {arch}, {result.epochs} epochs{early}{best}, "
               f"{result.seconds:.0f}s this call, loss {result.loss if result.loss is not None else float('nan'):.4f}")


@click.command(name="eval", epilog=example("drn-label eval val-out --ground-truth data/val"))
@click.argument("output")
@click.option("--ground-truth", "ground_truth", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="Folder with masks/<id>.png (class index per pixel, 255 = ignore).")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the scores as JSON (miou, pixel_accuracy, per_class, confusion).")
@click.option("--model", default=None, help="Which model's rows, when OUTPUT holds several.")
@click.option("--weights-sha256", default=None, help="Which checkpoint's rows, when OUTPUT holds several.")
def eval_command(output, ground_truth, json_file, model, weights_sha256) -> None:
    """Score OUTPUT's masks against ground truth: per-class IoU, mIoU, pixel accuracy.

    One confusion matrix over the whole set; ground-truth pixels of 255 are ignored;
    classes absent from both prediction and ground truth are left out of the mean.
    """
    from pipeline.errors import UsageError
    from pipeline.tools.evaluate import evaluate_output

    try:
        scores = evaluate_output(output, ground_truth, model=model, weights_sha256=weights_sha256)
    except UsageError:
        raise
    except (FileNotFoundError, ValueError) as exc:  # the ground-truth folder given
        raise UsageError(str(exc)) from None
    click.echo(f"mIoU {scores['miou']:.4f}  pixel accuracy {scores['pixel_accuracy']:.4f}  "
               f"({scores['images_evaluated']} images; {scores['images_missing_prediction']} without a "
               f"prediction, {scores['images_missing_ground_truth']} without ground truth)")
    for name, iou in scores["per_class"].items():
        click.echo(f"  {name:<20} {'-' if iou is None else f'{iou:.4f}'}")
    if json_file:
        json_file.write_text(json.dumps(scores, indent=2))
        click.echo(f"wrote {json_file}")


@click.command(name="import", epilog=example(
    "drn-label import export.json --out round1 --images photos/ --classes labels/"))
@click.argument("export", type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The training folder to write (images/, masks/, classes.json); may already "
                   "hold images of the same classes.")
@click.option("--format", "fmt", type=click.Choice(("label-studio", "coco", "png")), default=None,
              help="Force the format [default: detected: a JSON list of tasks is Label Studio, "
                   "a JSON with images + annotations COCO, a folder PNG masks].")
@click.option("--images", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The folder the image ids are relative to (the input of `drn-label run`) "
                   "[default: Label Studio's data.image when it is a local file].")
@click.option("--classes", default=None,
              help="A preset, classes file, or the OUTPUT the export was made from [default: the "
                   "label config beside a Label Studio export, COCO's categories, or OUT's classes.json].")
@click.option("--with-predictions", is_flag=True,
              help="Label Studio: tasks nobody annotated contribute their prediction.")
def import_command(export: Path, out: Path, fmt: str | None, images: Path | None, classes: str | None,
                   with_predictions: bool) -> None:
    """Read corrections from a labelling tool (Label Studio JSON, COCO, or PNG masks) into a
    training folder that `drn-label train` reads."""
    from pipeline.training.importer import import_corrections

    result = import_corrections(export, out, fmt=fmt, images=images, classes=classes,
                                with_predictions=with_predictions)
    click.echo(result.summary())
