"""The `drn-label` command line. Thin: every command calls functions the tests call too."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import click

from pipeline import spec as specmod

CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DRN_LABEL"}


def _check_model(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Validate --model against the registry only when given (importing torch costs seconds)."""
    if value is None:
        return None
    import drn

    names = drn.list_models()
    if value not in names:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(names)}", ctx=ctx, param=param)
    return value


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="drn-label")
@click.option("-v", "--verbose", is_flag=True, help="Log Ray Data's own messages too.")
def cli(verbose: bool) -> None:
    """Label image collections with dilated residual networks (DRN) on Ray Data."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)


# -- models ----------------------------------------------------------------------------
@cli.command()
def models() -> None:
    """List the architectures (with parameter counts) and the label-set presets."""
    import drn

    click.echo(f"{'architecture':<12} {'params (1000-class)':>20}")
    for name in drn.list_models():
        info = drn.model_info(name)
        click.echo(f"{name:<12} {info.num_params / 1e6:>19.3f}M")
    click.echo("\npresets:")
    for name in drn.list_presets():
        ls = drn.get_preset(name)
        click.echo(f"  {name:<12} {len(ls.class_names)} classes, mean {list(ls.mean)}, std {list(ls.std)}")


# -- run -------------------------------------------------------------------------------
def _parse_scales(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    try:
        scales = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected numbers separated by commas, e.g. 0.5,1,1.5",
                                 ctx=ctx, param=param) from None
    if not scales or min(scales) <= 0:
        raise click.BadParameter(f"{value!r}: scales must be positive", ctx=ctx, param=param)
    return scales


def run_options(f):
    """The options `run` and `submit` share; each maps to a JobSpec key."""
    opts = [
        click.option("--job", "job_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TOML job spec (jobs/*.toml); flags override its keys."),
        click.option("--model", default=None, callback=_check_model,
                     help="Architecture, see `drn-label models` [default: drn_d_22]."),
        click.option("--weights", default=None,
                     help="Checkpoint: path, file:// or http(s):// URL (authors', torchvision or own format)."),
        click.option("--classes", default=None, help="Label set: a preset (cityscapes) or a classes file."),
        click.option("--num-classes", type=click.IntRange(min=1), default=None,
                     help="Number of classes when neither weights nor --classes tell it."),
        click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Images per forward pass [default: 4]."),
        click.option("--workers", type=click.IntRange(min=1), default=None, help="Predict actors [default: 1]."),
        click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None,
                     help="GPUs per predict actor; fractions share a GPU [default: 0]."),
        click.option("--cpus-per-worker", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="CPUs reserved per predict actor [default: 1]."),
        click.option("--torch-threads", type=click.IntRange(min=1), default=None,
                     help="Torch threads per predict actor [default: on CPU, cluster CPUs / workers]."),
        click.option("--max-side", type=click.IntRange(min=8), default=None,
                     help="Scale larger images down for inference; masks come back at source size [default: 2048]."),
        click.option("--size-bucket", type=click.IntRange(min=8), default=None,
                     help="Pad images to multiples of this many pixels so mixed sizes batch together "
                          "(labels may change near the bottom/right edges) [default: exact sizes]."),
        click.option("--tta", is_flag=True, default=None,
                     help="Test-time augmentation: average log-probabilities over --tta-scales (slower, better labels)."),
        click.option("--tta-scales", callback=_parse_scales, default=None,
                     help="Comma-separated scales for --tta [default: 0.5,0.75,1,1.25,1.5,1.75]."),
        click.option("--tta-flip", is_flag=True, default=None, help="With --tta, also average a horizontal flip."),
        click.option("--precision", type=click.Choice(specmod.PRECISIONS), default=None,
                     help="Inference precision [default: fp32]."),
        click.option("--retries", type=click.IntRange(min=0), default=None,
                     help="Retries of transient read failures per image [default: 3]."),
        click.option("--max-error-rate", type=click.FloatRange(0, 1), default=None,
                     help="Exit 3 when the share of error rows exceeds this."),
        click.option("--rows-per-file", type=click.IntRange(min=1), default=None,
                     help="Rows per Parquet file [default: 1000]."),
        click.option("--overwrite", is_flag=True, default=None, help="Relabel everything this model already labelled."),
        click.option("--retry-errors", is_flag=True, default=None, help="Relabel images whose row is an error."),
        click.option("--address", default=None, envvar="RAY_ADDRESS",
                     help="Ray cluster address (RAY_ADDRESS); `run` without one starts an embedded local Ray."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


SPEC_KEYS = ("model", "weights", "classes", "num_classes", "batch_size", "workers",
             "gpus_per_worker", "cpus_per_worker", "torch_threads", "max_side", "size_bucket", "tta", "tta_scales", "tta_flip", "precision",
             "retries", "max_error_rate", "rows_per_file", "overwrite", "retry_errors", "address")


def spec_from_cli(input_: str | None, output: str | None, job_file: Path | None, **options) -> specmod.JobSpec:
    """JobSpec from a --job file and flags; a bad spec is a click usage error."""
    try:
        base = specmod.load_spec(job_file) if job_file else specmod.JobSpec()
        overrides = {k: options.get(k) for k in SPEC_KEYS}
        overrides["input"], overrides["output"] = input_, output
        if overrides.get("overwrite") is False:
            overrides["overwrite"] = None
        for flag in ("retry_errors", "tta", "tta_flip"):
            if overrides.get(flag) is False:
                overrides[flag] = None
        return specmod.merge(base, overrides).validate()
    except specmod.SpecError as exc:
        raise click.UsageError(str(exc)) from None


@cli.command()
@click.argument("input_", metavar="INPUT", required=False)
@click.argument("output", required=False)
@run_options
def run(input_, output, job_file, **options) -> None:
    """Label every image in INPUT; write masks and class scores to OUTPUT (Parquet).

    INPUT is a directory (recursive), a glob, or a manifest (.txt, .csv, .parquet);
    INPUT and OUTPUT may be local paths or s3:// URIs. Rerunning the same command
    labels only what is missing.
    """
    from pipeline.run import JobError, run_job

    spec = spec_from_cli(input_, output, job_file, **options)
    try:
        result = run_job(spec, echo=lambda m: click.echo(m, err=True))
    except JobError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    click.echo(result.summary())
    if result.exit_code:
        labelled = result.ok + result.errors
        click.echo(f"error: {result.errors} of {labelled} images failed, more than "
                   f"--max-error-rate {spec.max_error_rate}", err=True)
    sys.exit(result.exit_code)


# -- status / inspect ------------------------------------------------------------------
def _looks_like_output(target: str) -> bool:
    return "://" in target or os.path.exists(target)


@cli.command()
@click.argument("target")
@click.option("--address", default=None, envvar="RAY_ADDRESS", help="Ray cluster (for a job id).")
def status(target: str, address: str | None) -> None:
    """Progress of the run writing OUTPUT (its _progress.json), or the state of a submitted job ID."""
    if _looks_like_output(target):
        from pipeline.inspect import read_progress

        progress = read_progress(target)
        if progress is None:
            raise click.UsageError(f"{target} has no _progress.json: no run has written there yet")
        click.echo(json.dumps(progress, indent=2, sort_keys=True))
        return
    from pipeline import jobs_cli  # cluster jobs (submit/status/logs/stop/list)

    jobs_cli.print_status(target, address)


@cli.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(output: str, as_json: bool) -> None:
    """Summarise OUTPUT: rows, ok/error counts, runs, mean class fractions, common errors."""
    from pipeline.inspect import format_summary, summarise

    try:
        summary = summarise(output)
    except FileNotFoundError as exc:
        raise click.UsageError(str(exc)) from None
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))


# -- commands defined beside the code they drive (one line each) ----------------------------
# (each module defines click commands and keeps Ray imports inside their bodies)
from pipeline import jobs_cli, schedule as schedule_module  # noqa: E402

jobs_cli.register(cli)  # submit, logs, stop, list
cli.add_command(schedule_module.schedule)
from pipeline.export import export_command  # noqa: E402
from pipeline.report import report_command  # noqa: E402

cli.add_command(export_command)
cli.add_command(report_command)
from pipeline.bench import bench  # noqa: E402
from pipeline.demo import demo  # noqa: E402

cli.add_command(bench)
cli.add_command(demo)
from pipeline.trust_cli import eval_command, synth, train  # noqa: E402

cli.add_command(synth)
cli.add_command(train)
cli.add_command(eval_command)


def main() -> None:
    cli(prog_name="drn-label")


if __name__ == "__main__":
    main()
