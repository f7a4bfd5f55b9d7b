"""The `drn-label` command line: a click group whose commands load only when they run.

Thin: each command parses options and calls functions that the tests call too. Library
code raises `pipeline.errors.DrnLabelError` subclasses; `main` prints them as one
``error:`` line and exits with their code (docs in pipeline/errors.py and the README).
Every option reads ``DRN_LABEL_<COMMAND>_<OPTION>`` from the environment, derived from
the flag's own name (``--batch-size`` of `run`: ``DRN_LABEL_RUN_BATCH_SIZE``; shown in
--help).
"""
from __future__ import annotations

import importlib
import logging
import os
import shlex

import click

from pipeline.errors import DrnLabelError, UsageError

ENV_PREFIX = "DRN_LABEL"
# Every option can also be set as DRN_LABEL_<COMMAND>_<OPTION> (e.g. DRN_LABEL_RUN_JOB,
# DRN_LABEL_RUN_BATCH_SIZE), so a scheduled run configures the same command through its
# environment; `with_envvars` names each option's variable after its flag, and --help
# shows it.
CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C

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
    "doctor": "pipeline.cli.doctor:doctor",
}

# How `drn-label --help` groups the commands: a newcomer's three first, then by task.
SECTIONS = (
    ("Start here", ("demo", "run", "inspect")),
    ("Follow and review a run", ("status", "report", "select", "export", "push", "compare", "eval")),
    ("Train on corrections", ("synth", "train", "import")),
    ("Clusters and schedules", ("submit", "logs", "stop", "list", "schedule")),
    ("Set up and measure", ("doctor", "models", "bench")),
)


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
            return with_envvars(getattr(importlib.import_module(module), attr), cmd_name)
        return super().get_command(ctx, cmd_name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands in SECTIONS' order (a newcomer's first), not alphabetically."""
        names = [name for _, section in SECTIONS for name in section]
        names += [name for name in self.list_commands(ctx) if name not in names]
        width = max(map(len, names))
        limit = formatter.width - 6 - width
        placed = set()
        for title, section in (*SECTIONS, ("Other commands", tuple(names))):
            rows = []
            for name in section:
                command = self.get_command(ctx, name) if name not in placed else None
                if command is not None and not command.hidden:
                    rows.append((name.ljust(width), command.get_short_help_str(limit)))
                    placed.add(name)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows, col_max=width + 2)

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # The command line as typed (after the program name): what a message that says
        # "rerun the same command" prints.
        ctx.meta["drn_label.argv"] = list(args)
        return super().parse_args(ctx, args)

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
        except KeyboardInterrupt:  # click would print "Aborted!" and exit 1
            raise CommandFailed("interrupted", EXIT_INTERRUPTED, prefix="") from None
        except OSError as exc:
            if ctx.params.get("verbose"):
                raise
            from pipeline.store.fs import os_error_text

            raise CommandFailed(f"storage error: {os_error_text(exc)} (-v shows where)", 1) from None


def envvar_name(command: str | None, option: click.Option) -> str:
    """DRN_LABEL_<COMMAND>_<OPTION> from the option's own flag (its first long name):
    `export --format` -> DRN_LABEL_EXPORT_FORMAT; the group's own options drop COMMAND."""
    flag = next((o for o in option.opts if o.startswith("--")), option.opts[0]).lstrip("-")
    parts = [ENV_PREFIX, *([command] if command else []), flag]
    return "_".join(p.upper().replace("-", "_") for p in parts)


class EnvOption(click.Option):
    """An option whose error names its environment variable only when the value came from
    there (click names it on every error once `show_envvar` is set)."""

    def get_error_hint(self, ctx: click.Context | None) -> str:
        hint = click.Parameter.get_error_hint(self, ctx)
        source = ctx.get_parameter_source(self.name) if ctx is not None and self.name else None
        if source is click.core.ParameterSource.ENVIRONMENT:
            found = next((v for v in self.envvar if os.environ.get(v)), self.envvar[0])
            hint += f" (from {found})"
        return hint


def with_envvars(command: click.Command, name: str | None) -> click.Command:
    """Give every option of `command` its DRN_LABEL_<COMMAND>_<OPTION> variable (first;
    a conventional one such as RAY_ADDRESS stays second) and show it in --help. click's
    automatic names come from the Python parameter (`fmt`, `as_json`), not the flag, so
    they are switched off. --help and --version read no variable."""
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        param.allow_from_autoenv = False
        if not param.expose_value:  # --help, --version: eager flags, never from the environment
            param.envvar = None
            continue
        own = envvar_name(name, param)
        given = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or ())
        param.envvar = [own, *(v for v in given if v != own)]
        param.show_envvar = not param.hidden
        if type(param) is click.Option:
            param.__class__ = EnvOption
    return command


def command_line(ctx: click.Context) -> str:
    """The command line this process was given, as a user would type it again."""
    args = ctx.meta.get("drn_label.argv")
    return shlex.join(["drn-label", *args]) if args is not None else ctx.command_path


class CommandFailed(click.ClickException):
    """A domain error, printed as one ``error:`` line with its own exit code."""

    def __init__(self, message: str, exit_code: int, prefix: str = "error: ") -> None:
        super().__init__(message)
        self.exit_code, self.prefix = exit_code, prefix

    def show(self, file=None) -> None:
        click.echo(f"{self.prefix}{self.format_message()}", err=True, file=file)


def quiet_ray() -> None:
    """Keep Ray's own start-up notices and progress bars out of the output (-v shows them)."""
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    # Read by ensure_ray, which starts Ray with this level: `import ray` resets the "ray"
    # logger, so setting it here alone would not hide the token-authentication notice.
    os.environ.setdefault("DRN_LABEL_RAY_LOG_LEVEL", "ERROR")
    # Ray's C++ side prints error-level lines on the driver's stderr that are not errors of
    # the run: Ray Data hands every actor pool its transform as an object reference, and
    # Ray core then warns on each actor's creation that restarts could fail if that object
    # were lost (ray-project/ray#57733; the driver holds it for the whole run). Real
    # failures reach us as Python exceptions; -v (or RAY_BACKEND_LOG_LEVEL) shows the rest.
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)


@click.group(cls=LazyGroup, lazy_commands=COMMANDS, context_settings=CONTEXT,
             epilog="Example:\n\n\b\n  drn-label demo\n  drn-label run photos/ labels/ "
                    "--weights drn_d_22:cityscapes\n  drn-label inspect labels/")
@click.version_option(package_name="drn-label")
@click.option("-v", "--verbose", is_flag=True, help="Log Ray Data's own messages too.")
def cli(verbose: bool) -> None:
    """Label image collections with dilated residual networks (DRN) on Ray Data.

    New here? `demo` labels sample images with a trained model in a few minutes;
    `run INPUT OUTPUT` labels yours; `inspect OUTPUT` shows what a run left; `doctor`
    checks this machine. Each command's --help ends with an example.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        quiet_ray()


with_envvars(cli, None)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script."""
    # Before any command loads torch (OpenMP reads it once, when it loads): idle OpenMP
    # threads sleep instead of spinning, so training and CPU labelling keep their share of
    # cores that other work also uses (docs/benchmarks.md, "Fair share"). A user's own
    # value wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cli.main(args=argv, prog_name="drn-label")


if __name__ == "__main__":
    main()
