"""`submit`, `logs`, `stop` and `list`, and `status ID`: jobs on a Ray cluster (pipeline.cluster)."""
from __future__ import annotations

import os
import re
import sys
import time
from datetime import datetime, timezone

import click

from pipeline.cli.options import example, run_options, spec_from_cli
from pipeline.cluster.jobs import (POLL_S, TERMINAL, ClusterError, cluster_errors, connect,
                                   exit_code_for, failure_reason, follow_logs, job_state, network_reason,
                                   submit_spec, wait_for)

EXIT_INTERRUPTED = 130
insecure_option = click.option(
    "--insecure", is_flag=True,
    help="Talk to a cluster that does not check tokens (only where something else guards it: "
         "a private network, an authenticating proxy).")
SECRET_NAME = re.compile(r"(?i)secret|token|password|passwd|credential|private|_key$|^AWS_ACCESS_KEY_ID$")


def _finish(info, job_id: str) -> None:
    code = exit_code_for(info)
    state = job_state(info)
    if code == 0:
        click.echo(f"{job_id} SUCCEEDED", err=True)
        return
    reason = failure_reason(info)
    click.echo(f"error: job {job_id} {state}{': ' + reason if reason else ''}; "
               f"`drn-label logs {job_id}` shows more", err=True)
    sys.exit(code)


def _interrupted(job_id: str) -> None:
    click.echo(f"\n{job_id} keeps running on the cluster; `drn-label stop {job_id}` stops it", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        if SECRET_NAME.search(key):
            raise click.BadParameter(
                f"{key} looks like a credential, and Ray writes a job's environment to its logs; "
                "give the cluster its credentials through its service account or a secret mount "
                "(docs/clusters.md, 'Credentials')", param_hint="--env")
        env[key] = value
    return env


@click.command("submit", epilog=example(
    "drn-label submit --job jobs/nightly-s3.toml --wait",
    "drn-label submit s3://my-images/ s3://my-labels/ --address http://head:8265 --weights drn_d_22:cityscapes"))
@click.argument("input_", metavar="INPUT", required=False)
@click.argument("output", required=False)
@run_options
@click.option("--wait", is_flag=True,
              help="Wait for the job to end; exit 0 only when it SUCCEEDED.")
@click.option("--follow", is_flag=True, help="Stream the job's logs until it ends (implies --wait).")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE",
              help="An environment variable for the job on the cluster (repeatable).")
@insecure_option
def submit(input_, output, job, wait, follow, env_pairs, insecure, **options) -> None:
    """Run a labelling job on a Ray cluster (the Ray Jobs API); print its submission id.

    Takes what `run` takes: a --job spec and/or INPUT OUTPUT and flags. INPUT, OUTPUT and
    weights must be where the cluster can read them (s3://, http(s)://, or a shared
    path). --address (or RAY_ADDRESS) is the dashboard, http://HOST:8265.

    \b
    With --wait/--follow the exit code is 0 when the job SUCCEEDED, else the
    driver's (3: error rate above --max-error-rate, 4: OUTPUT leased by another
    run) or 1.
    """
    env = _parse_env(env_pairs)
    spec = spec_from_cli(input_, output, job, **options)
    client, url = connect(spec.address, insecure=insecure)
    job_id = submit_spec(client, url, spec, env=env)
    click.echo(job_id)
    if not (wait or follow):
        click.echo(f"follow it: drn-label logs {job_id} --follow   (status: drn-label status "
                   f"{job_id}; stop: drn-label stop {job_id})", err=True)
        return
    try:
        if follow:
            follow_logs(client, url, job_id)
        info = wait_for(client, url, job_id, on_state=None if follow else (
            lambda state: click.echo(f"{job_id}: {state}", err=True)))
    except KeyboardInterrupt:
        _interrupted(job_id)
    _finish(info, job_id)



# -- following ---------------------------------------------------------------------------------
address_option = click.option(
    "--address", default=None, envvar="RAY_ADDRESS",
    help="Ray dashboard, http://HOST:8265.")


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(info) -> str:
    if not info.start_time:
        return "-"
    end = info.end_time or time.time() * 1000
    seconds = max(0, int((end - info.start_time) / 1000))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _progress_line(info) -> str | None:
    output = (info.metadata or {}).get("drn_label_output")
    if not output:
        return None
    from pipeline.store.reader import read_progress

    try:
        progress = read_progress(output)
    except Exception as exc:  # noqa: BLE001 - any storage error: say so, the state still counts
        return f"progress:   cannot read {output}/_state/progress.json from here ({network_reason(exc)})"
    if progress is None:
        return "progress:   none yet (the run has not started labelling)"
    p = progress
    line = (f"progress:   {p.get('state')} run {p.get('run_id')}: {p.get('labelled', 0)}/{p.get('total', 0)} "
            f"labelled ({p.get('labelled_ok', 0)} ok, {p.get('labelled_errors', 0)} errors), "
            f"{p.get('committed', 0)} committed, {p.get('skipped', 0)} already labelled, "
            f"{p.get('images_per_s') or 0:.1f} images/s")
    if p.get("eta_s") and p.get("state") == "running":
        line += f", ETA {p['eta_s']:.0f}s"
    try:
        started = datetime.fromisoformat(p["started_at"]).timestamp() * 1000
        if info.start_time and started < info.start_time - 5000:
            line += " (an earlier run's: this job has not written progress yet)"
    except (KeyError, TypeError, ValueError):
        pass
    return line


def print_status(job_id: str, address: str | None, *, insecure: bool = False) -> None:
    """The job's state, times and OUTPUT, plus the run's progress where OUTPUT is readable."""
    if not (address or os.environ.get("RAY_ADDRESS")):
        raise ClusterError(f"{job_id} is no OUTPUT here, and there is no Ray cluster to ask for a job "
                           f"of that id: pass --address http://HOST:8265 or set RAY_ADDRESS")
    client, url = connect(address, insecure=insecure)
    with cluster_errors(url, job_id):
        info = client.get_job_info(job_id)
    meta = info.metadata or {}
    click.echo(f"{job_id}: {job_state(info)}")
    if info.message:
        click.echo(f"message:    {failure_reason(info)}")
    click.echo(f"started:    {_when(info.start_time)}")
    if info.end_time:
        click.echo(f"ended:      {_when(info.end_time)}")
    click.echo(f"duration:   {_duration(info)}")
    click.echo(f"entrypoint: {info.entrypoint}")
    if getattr(info, "driver_exit_code", None) is not None:
        click.echo(f"exit code:  {info.driver_exit_code}")
    for key in ("drn_label_input", "drn_label_output", "drn_label_model", "drn_label_spec"):
        if meta.get(key):
            click.echo(f"{key[len('drn_label_'):] + ':':<11} {meta[key]}")
    line = _progress_line(info)
    if line:
        click.echo(line)


@click.command(epilog=example("drn-label logs raysubmit_4b1Zq7 --follow"))
@click.argument("job_id", metavar="ID")
@click.option("--follow", "-f", is_flag=True, help="Keep streaming until the job ends.")
@address_option
@insecure_option
def logs(job_id: str, follow: bool, address: str | None, insecure: bool) -> None:
    """Print the logs of submitted job ID (its driver's stdout and stderr)."""
    client, url = connect(address, insecure=insecure)
    if follow:
        try:
            follow_logs(client, url, job_id)
        except KeyboardInterrupt:
            sys.exit(EXIT_INTERRUPTED)
        return
    with cluster_errors(url, job_id):
        text = client.get_job_logs(job_id)
    sys.stdout.write(text)


@click.command(epilog=example("drn-label stop raysubmit_4b1Zq7"))
@click.argument("job_id", metavar="ID")
@click.option("--timeout", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="Seconds to wait for the job to reach STOPPED.")
@click.option("--no-wait", is_flag=True, help="Ask the job to stop and return at once.")
@address_option
@insecure_option
def stop(job_id: str, timeout: float, no_wait: bool, address: str | None, insecure: bool) -> None:
    """Stop submitted job ID and wait until it is STOPPED.

    The labels it committed stay; rerunning the same spec labels only the rest.
    """
    client, url = connect(address, insecure=insecure)
    with cluster_errors(url, job_id):
        info = client.get_job_info(job_id)
        if job_state(info) in TERMINAL:
            click.echo(f"{job_id} already {job_state(info)}: nothing to stop")
            return
        client.stop_job(job_id)
    deadline = time.monotonic() + (0 if no_wait else timeout)
    while True:
        with cluster_errors(url, job_id):
            state = job_state(client.get_job_info(job_id))
        if state in TERMINAL:
            suffix = "" if state == "STOPPED" else " (it ended before the stop took effect)"
            click.echo(f"{job_id}: {state}{suffix}")
            return
        if time.monotonic() >= deadline:
            click.echo(f"{job_id} is stopping (still {state}); `drn-label status {job_id}` "
                       f"shows when it has stopped")
            return
        time.sleep(POLL_S / 2)


@click.command("list", epilog=example("drn-label list --address http://head:8265"))
@click.option("--all", "show_all", is_flag=True, help="Also list jobs that drn-label did not submit.")
@address_option
@insecure_option
def list_jobs(show_all: bool, address: str | None, insecure: bool) -> None:
    """List the jobs submitted to the cluster, oldest first."""
    client, url = connect(address, insecure=insecure)
    with cluster_errors(url):
        jobs = client.list_jobs()
    rows = []
    for job in jobs:
        if not job.submission_id:
            continue  # a driver that connected by itself, not a submitted job
        meta = job.metadata or {}
        if not show_all and "drn_label_output" not in meta:
            continue
        rows.append((job.start_time or 0, job.submission_id, job_state(job), _when(job.start_time),
                     _duration(job), meta.get("drn_label_output", "-")))
    if not rows:
        click.echo(f"no {'' if show_all else 'drn-label '}jobs on the Ray cluster at {url}")
        return
    rows.sort()
    widths = [max(len(r[i]) for r in rows + [(0, "ID", "STATUS", "STARTED", "DURATION", "OUTPUT")])
              for i in range(1, 5)]
    header = ("ID", "STATUS", "STARTED", "DURATION")
    click.echo("  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  OUTPUT")
    for row in rows:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row[1:5], widths)) + f"  {row[5]}")
