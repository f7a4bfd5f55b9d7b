"""`schedule`: render the manifests that run a job spec on Kubernetes (pipeline.cluster.manifests)."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline import spec as specmod
from pipeline.cli.options import example, parse_with
from pipeline.cluster.manifests import (DEFAULT_DEADLINE_S, DEFAULT_OPERATOR_NAMESPACE, DEFAULT_TTL_S,
                                        KINDS, RenderOptions, local_path_warning, render)


@click.command(epilog=example(
    'drn-label schedule --job jobs/nightly-s3.toml --cron "0 2 * * *" > nightly.yaml',
    'drn-label schedule --job jobs/nightly-s3.toml | kubectl apply -f -'))
@click.option("--job", "job", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="TOML job spec; its [schedule] table gives the defaults of the flags below.")
@click.option("--cron", default=None, callback=parse_with(specmod.ScheduleSpec.parse_cron),
              help='Cron schedule, five fields, e.g. "0 2 * * *" (raycronjob, cronjob).')
@click.option("--time-zone", default=None, callback=parse_with(specmod.ScheduleSpec.parse_time_zone),
              help="IANA time zone of the schedule, e.g. Europe/Berlin [default: UTC].")
@click.option("--image", default=None, help="Container image with drn-label installed (deploy/Dockerfile).")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="What to render [default: the spec's schedule.kind, else raycronjob].")
@click.option("--namespace", default=None, help="Kubernetes namespace [default: default].")
@click.option("--name", default=None, help="Object name [default: drn-label-<spec file name>].")
@click.option("--address", default=None,
              help="Dashboard of the long-lived cluster (cronjob) [default: the RayCluster --kind "
                   "raycluster renders].")
@click.option("--gpus-per-node", type=click.IntRange(min=1), default=1, show_default=True,
              help="GPUs per worker node.")
@click.option("--node-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs per worker node [default: enough for its actors plus decoding, at least 8].")
@click.option("--deadline", "deadline_s", type=click.IntRange(min=60), default=DEFAULT_DEADLINE_S,
              show_default=True, help="Seconds a run may take (activeDeadlineSeconds).")
@click.option("--ttl", "ttl_s", type=click.IntRange(min=0), default=DEFAULT_TTL_S, show_default=True,
              help="Seconds a finished run is kept (ttlSecondsAfterFinished).")
@click.option("--operator-namespace", default=DEFAULT_OPERATOR_NAMESPACE, show_default=True,
              help="Namespace of the KubeRay operator, which the NetworkPolicy lets reach the dashboard.")
@click.option("--out", "out", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              default=None, help="Write the YAML here [default: stdout].")
def schedule(job: Path, cron, time_zone, image, kind, namespace, name, address, gpus_per_node,
             node_cpus, deadline_s, ttl_s, operator_namespace, out: Path | None) -> None:
    """Render the manifests that run a job spec on Kubernetes (or a `ray up` config)."""
    spec = specmod.load_spec(job)
    overrides = {"schedule_cron": cron, "schedule_time_zone": time_zone, "schedule_image": image,
                 "schedule_namespace": namespace, "schedule_name": name, "schedule_address": address}
    if kind in specmod.SCHEDULE_KINDS:
        overrides["schedule_kind"] = kind
    spec = specmod.merge(spec, overrides).validate()
    warning = local_path_warning(spec)
    if warning:
        click.echo(warning, err=True)
    options = RenderOptions(gpus_per_node=gpus_per_node, node_cpus=node_cpus, deadline_s=deadline_s,
                            ttl_s=ttl_s, operator_namespace=operator_namespace)
    text = render(spec, kind or spec.schedule.kind, options)
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
        click.echo(f"wrote {out}", err=True)
