"""`drn-label synth`, `train` and `eval`: labels you can check against ground truth."""
from __future__ import annotations

import json
from pathlib import Path

import click


@click.command()
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


@click.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "arch", default="drn_d_22", show_default=True, help="Architecture.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Checkpoint to write (the project's format, with the label set).")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--size", type=click.IntRange(min=8), default=64, show_default=True, help="Crop size.")
@click.option("--init", default=None, help="Start from the authors' ImageNet or DRNSeg checkpoint.")
@click.option("--classes", default=None, help="Preset or classes file when DATA has no classes.json.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True)
@click.option("--scale-range", default="0.5,2", show_default=True,
              help="Random scale augmentation, MIN,MAX (the authors used 0.5,2).")
@click.option("--val", "val_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="A held-out set (same layout) scored after every epoch.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--restart", is_flag=True, help="Start over instead of resuming from OUT's training state.")
def train(data, arch, out, epochs, batch_size, size, init, classes, lr, scale_range, val_dir, seed, device,
          restart) -> None:
    """Train or fine-tune a DRN segmentation model on DATA (images/ + masks/ [+ classes.json]).

    The authors' recipe: random scale 0.5-2, crop, flip, SGD with the poly schedule,
    ignore index 255. Resumable: rerunning continues from OUT's saved state.
    """
    from pipeline.training.train import train as train_fn

    import drn

    if arch not in drn.list_models():
        raise click.BadParameter(f"{arch!r} is not one of {', '.join(drn.list_models())}",
                                 param_hint="'--model'")
    try:
        lo, hi = (float(v) for v in scale_range.split(","))
        assert 0 < lo <= hi
    except (ValueError, AssertionError):
        raise click.BadParameter(f"{scale_range!r}: expected MIN,MAX with 0 < MIN <= MAX, e.g. 0.5,2",
                                 param_hint="'--scale-range'") from None
    try:
        result = train_fn(data, arch=arch, out=out, epochs=epochs, batch_size=batch_size, size=size,
                          init=init, classes=classes, lr=lr, scale_range=(lo, hi), seed=seed, device=device,
                          val_dir=val_dir, resume=not restart, log=click.echo)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"checkpoint {result.checkpoint}: {arch}, {result.epochs} epochs, "
               f"{result.seconds:.0f}s this call, loss {result.loss if result.loss is not None else float('nan'):.4f}")


@click.command(name="eval")
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
    from pipeline.tools.evaluate import evaluate_output

    try:
        scores = evaluate_output(output, ground_truth, model=model, weights_sha256=weights_sha256)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"mIoU {scores['miou']:.4f}  pixel accuracy {scores['pixel_accuracy']:.4f}  "
               f"({scores['images_evaluated']} images; {scores['images_missing_prediction']} without a "
               f"prediction, {scores['images_missing_ground_truth']} without ground truth)")
    for name, iou in scores["per_class"].items():
        click.echo(f"  {name:<20} {'-' if iou is None else f'{iou:.4f}'}")
    if json_file:
        json_file.write_text(json.dumps(scores, indent=2))
        click.echo(f"wrote {json_file}")
