"""`doctor`: check this machine for a run (pipeline.tools.doctor does the checking)."""
from __future__ import annotations

import json

import click

from pipeline.cli.options import example


@click.command(epilog=example("drn-label doctor", "drn-label doctor --json"))
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """Check this machine: torch, GPUs, Ray (version, RAY_ADDRESS reachable), storage
    credentials (found or not; never shown), and the weights cache.

    Starts nothing. Exit 1 when something would stop a run (each such line says what to do).
    """
    from pipeline.tools.doctor import PROBLEM, environment_line, run_checks

    checks = run_checks()
    if as_json:
        click.echo(json.dumps({"environment": environment_line(),
                               "checks": [c.to_dict() for c in checks]}, indent=2))
    else:
        click.echo(environment_line())
        width = max(len(c.name) for c in checks)
        for c in checks:
            click.echo(f"  {c.status:<8}{c.name:<{width}}  {c.detail}")
            if c.fix:
                click.echo(f"  {'':<8}{'':<{width}}  -> {c.fix}")
    if any(c.status == PROBLEM for c in checks):
        ctx.exit(1)
