"""The `drn-label` command line: a click group whose commands load only when they run.

Thin: each command parses options and calls functions that the tests call too. Library
code raises `pipeline.errors.DrnLabelError` subclasses; `main` prints them as one
``error:`` line and exits with their code (docs in pipeline/errors.py and the README).
Options read ``DRN_LABEL_<COMMAND>_<OPTION>`` environment variables (shown in --help).
"""
from __future__ import annotations

import importlib
import logging
import os

import click

from pipeline.errors import DrnLabelError, UsageError

# Every option can also be set as DRN_LABEL_<COMMAND>_<OPTION> (e.g. DRN_LABEL_RUN_JOB,
# DRN_LABEL_RUN_BATCH_SIZE), so a scheduled run configures the same command through its
# environment; --help shows each option's variable.
CONTEXT = {"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "DRN_LABEL",
           "show_default": True}

# name -> "module:attribute"; a command's module is imported only when the command runs
# (or when --help lists it: only the one-line help is read then).
COMMANDS = {
    "run": "pipeline.cli.run:run",
    "status": "pipeline.cli.run:status",
    "inspect": "pipeline.cli.run:inspect",
    "models": "pipeline.cli.run:models",
    "submit": "pipeline.cli.jobs:submit",
    "logs": "pipeline.cli.jobs:logs",
    "stop": "pipeline.cli.jobs:stop",
    "list": "pipeline.cli.jobs:list_jobs",
    "schedule": "pipeline.cli.schedule:schedule",
    "export": "pipeline.cli.tools:export",
    "select": "pipeline.cli.tools:select",
    "compare": "pipeline.cli.tools:compare",
    "report": "pipeline.cli.tools:report",
    "push": "pipeline.cli.tools:push",
    "bench": "pipeline.cli.tools:bench",
    "demo": "pipeline.cli.tools:demo",
    "synth": "pipeline.cli.training:synth",
    "train": "pipeline.cli.training:train",
    "import": "pipeline.cli.training:import_command",
    "eval": "pipeline.cli.training:eval_command",
}


class LazyGroup(click.Group):
    """click's documented lazily loaded sub-commands: a table of "name -> module:attr"."""

    def __init__(self, *args, lazy_commands: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = lazy_commands

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy_commands:
            module, attr = self.lazy_commands[cmd_name].split(":")
            return show_envvars(getattr(importlib.import_module(module), attr))
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context):
        """The one error handler: domain errors become click's, with the right exit code. A
        storage error that no layer translated (a full disk, an I/O error) is one line too;
        -v shows its traceback."""
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            raise click.UsageError(str(exc)) from None
        except DrnLabelError as exc:
            raise CommandFailed(str(exc), exc.exit_code) from None
        except OSError as exc:
            if ctx.params.get("verbose"):
                raise
            from pipeline.store.fs import os_error_text

            raise CommandFailed(f"storage error: {os_error_text(exc)} (-v shows where)", 1) from None


def show_envvars(command: click.Command) -> click.Command:
    """List each option's environment variable in --help (click shows the automatic
    DRN_LABEL_<COMMAND>_<OPTION> names only when an option asks for it)."""
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            param.show_envvar = True
    return command


class CommandFailed(click.ClickException):
    """A domain error, printed as one ``error:`` line with its own exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(f"error: {self.format_message()}", err=True, file=file)


def quiet_ray() -> None:
    """Keep Ray's own start-up notices and progress bars out of the output (-v shows them)."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    # Read by ensure_ray, which starts Ray with this level: `import ray` resets the "ray"
    # logger, so setting it here alone would not hide the token-authentication notice.
    os.environ.setdefault("DRN_LABEL_RAY_LOG_LEVEL", "ERROR")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings=CONTEXT)
@click.version_option(package_name="drn-label")
@click.option("-v", "--verbose", is_flag=True, help="Log Ray Data's own messages too.")
def cli(verbose: bool) -> None:
    """Label image collections with dilated residual networks (DRN) on Ray Data."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_ray()


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    cli.main(args=argv, prog_name="drn-label")


if __name__ == "__main__":
    main()
