"""`run`, `status`, `inspect` and `models`: label locally, and look at what a run left."""
from __future__ import annotations

import json
import os
import sys

import click

from pipeline.cli import command_line
from pipeline.cli.options import example, run_options, spec_from_cli
from pipeline.errors import ErrorRateExceeded, UsageError, stop_exit_code


@click.command(epilog=example("drn-label models"))
def models() -> None:
    """List the architectures (--model), the label-set presets (--classes) and the released
    checkpoints (--weights NAME, downloaded once into the cache)."""
    import drn
    from drn.checkpoints import RELEASED_WEIGHTS, cache_path, default_cache_dir

    click.echo("architectures (--model):")
    click.echo(f"  {'name':<12} {'parameters (1000-class head)':>28}")
    for name in drn.list_models():
        info = drn.model_info(name)
        click.echo(f"  {name:<12} {info.num_params / 1e6:>27.3f}M")
    click.echo("\nlabel-set presets (--classes):")
    for name in drn.list_presets():
        ls = drn.get_preset(name)
        click.echo(f"  {name:<12} {len(ls.class_names)} classes, mean {list(ls.mean)}, std {list(ls.std)}")
    click.echo(f"\nreleased checkpoints (a name is a --weights or --init value; downloaded once into "
               f"{default_cache_dir()}):")
    width = max(map(len, RELEASED_WEIGHTS))
    for name, release in RELEASED_WEIGHTS.items():
        classes = (f"{release.preset} ({len(drn.get_preset(release.preset).class_names)} classes)"
                   if release.preset else "-")
        use = "--weights: labels as released" if release.task == "segment" else \
            "--init: a backbone to fine-tune"
        cached = cache_path(release.url)
        held = f"cached, {cached.stat().st_size / 1e6:.1f} MB" if cached.is_file() else "not downloaded"
        click.echo(f"  {name:<{width}}  {classes:<25} {use:<33} {held}")
        click.echo(f"  {'':<{width}}  {release.url}")


@click.command(epilog=example(
    "drn-label run photos/ labels/ --weights drn_d_22:cityscapes --batch-size 8",
    "drn-label run --job jobs/demo.toml"))
@click.argument("input_", metavar="INPUT", required=False)
@click.argument("output", required=False)
@run_options
@click.pass_context
def run(ctx: click.Context, input_, output, job, **options) -> None:
    """Label every image in INPUT; write masks and class scores to OUTPUT (Parquet).

    INPUT is a directory (recursive), a glob, or a manifest (.txt, .csv, .parquet);
    INPUT and OUTPUT may be local paths or s3:// URIs. Rerunning the same command
    labels only what is missing. Ctrl-C (exit 130) or SIGTERM (exit 143) stop it keeping
    what it committed, and print the command that resumes.
    """
    from pipeline.job.run import RunInterrupted, run_job

    spec = spec_from_cli(input_, output, job, **options)
    _stop_on_sigterm()
    try:
        result = run_job(spec, echo=lambda m: click.echo(m, err=True))
    except RunInterrupted as exc:
        _interrupted(ctx, exc.result.summary(), exc.exit_code)
    except (KeyboardInterrupt, SystemExit) as exc:  # before the run was set up, or while it ended
        code = stop_exit_code(exc)
        if code is None:
            raise
        _interrupted(ctx, f"interrupted; rows committed to {spec.output} stay", code)
    click.echo(result.summary())
    if result.exit_code:
        labelled = result.ok + result.errors
        raise ErrorRateExceeded(f"{result.errors} of {labelled} images failed, more than "
                                f"--max-error-rate {spec.max_error_rate}")


def _interrupted(ctx: click.Context, what: str, code: int) -> None:
    click.echo(f"\n{what}", err=True)
    click.echo(f"rerun the same command to label the rest (nothing is labelled twice):\n  "
               f"{command_line(ctx)}", err=True)
    ctx.exit(code)


def _stop_on_sigterm() -> None:
    """SIGTERM (`drn-label stop`, Kubernetes, systemd) ends the run like Ctrl-C does: the
    run record says "interrupted" and counts what was committed, and the lease is released.
    (Once Ray starts, its own driver handler raises SystemExit(15): read the same way.)"""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _looks_like_output(target: str) -> bool:
    return "://" in target or os.path.exists(target)


@click.command(epilog=example("drn-label status labels/", "drn-label status labels/ --json"))
@click.argument("target")
@click.option("--address", default=None, envvar="RAY_ADDRESS", help="Ray cluster (for a job id).")
@click.option("--json", "as_json", is_flag=True,
              help="OUTPUT: print the progress as JSON (_state/progress.json's keys, plus host, "
                   "input and startup_s).")
@click.option("--insecure", is_flag=True,
              help="For a job id: talk to a cluster that does not check tokens (see `submit --insecure`).")
def status(target: str, address: str | None, as_json: bool, insecure: bool) -> None:
    """How the last run on OUTPUT went or goes (state, counts, rate, ETA, when, where), or
    the state of a submitted job ID."""
    if not target.strip():
        raise UsageError("TARGET is empty: give an OUTPUT folder or a submitted job's id")
    if _looks_like_output(target):
        from pipeline.tools.summary import format_status, run_status

        progress = run_status(target)
        click.echo(json.dumps(progress, indent=2, sort_keys=True) if as_json else format_status(progress))
        return
    from pipeline.cli.jobs import print_status

    print_status(target, address, insecure=insecure)


@click.command(epilog=example("drn-label inspect labels/"))
@click.argument("output")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(output: str, as_json: bool) -> None:
    """Summarise OUTPUT: rows, ok/error counts, runs, mean class fractions, common errors."""
    from pipeline.tools.summary import format_summary, summarise

    summary = summarise(output)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
