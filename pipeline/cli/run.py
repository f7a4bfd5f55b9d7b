"""`run`, `status`, `inspect` and `models`: label locally, and look at what a run left."""
from __future__ import annotations

import json
import os
import sys

import click

from pipeline.cli.options import run_options, spec_from_cli
from pipeline.errors import ErrorRateExceeded, UsageError


@click.command()
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


@click.command()
@click.argument("input_", metavar="INPUT", required=False)
@click.argument("output", required=False)
@run_options
def run(input_, output, job, **options) -> None:
    """Label every image in INPUT; write masks and class scores to OUTPUT (Parquet).

    INPUT is a directory (recursive), a glob, or a manifest (.txt, .csv, .parquet);
    INPUT and OUTPUT may be local paths or s3:// URIs. Rerunning the same command
    labels only what is missing.
    """
    from pipeline.job.run import run_job

    spec = spec_from_cli(input_, output, job, **options)
    _stop_on_sigterm()
    result = run_job(spec, echo=lambda m: click.echo(m, err=True))
    click.echo(result.summary())
    if result.exit_code:
        labelled = result.ok + result.errors
        raise ErrorRateExceeded(f"{result.errors} of {labelled} images failed, more than "
                                f"--max-error-rate {spec.max_error_rate}")


def _stop_on_sigterm() -> None:
    """SIGTERM (`drn-label stop`, Kubernetes, systemd) ends the run like Ctrl-C does: the
    run record says "interrupted" and counts what was committed, and the lease is released."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _looks_like_output(target: str) -> bool:
    return "://" in target or os.path.exists(target)


@click.command()
@click.argument("target")
@click.option("--address", default=None, envvar="RAY_ADDRESS", help="Ray cluster (for a job id).")
@click.option("--insecure", is_flag=True,
              help="For a job id: talk to a cluster that does not check tokens (see `submit --insecure`).")
def status(target: str, address: str | None, insecure: bool) -> None:
    """Progress of the run writing OUTPUT (its _state/progress.json), or the state of a submitted job ID."""
    if not target.strip():
        raise UsageError("TARGET is empty: give an OUTPUT folder or a submitted job's id")
    if _looks_like_output(target):
        from pipeline.store.reader import read_progress

        progress = read_progress(target)
        if progress is None:
            raise UsageError(f"{target} has no _state/progress.json: no run has written there yet")
        click.echo(json.dumps(progress, indent=2, sort_keys=True))
        return
    from pipeline.cli.jobs import print_status

    print_status(target, address, insecure=insecure)


@click.command()
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(output: str, as_json: bool) -> None:
    """Summarise OUTPUT: rows, ok/error counts, runs, mean class fractions, common errors."""
    from pipeline.tools.summary import format_summary, summarise

    summary = summarise(output)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
