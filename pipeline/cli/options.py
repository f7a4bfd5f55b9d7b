"""Options that several commands share; `run`'s options are derived from JobSpec's fields."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Callable

import click

from pipeline import spec as specmod


def example(*lines: str) -> str:
    """A command's epilog: the example its --help ends with (lines kept as written)."""
    return "Example:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def check_checkpoint(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A checkpoint option names a file that exists, a URL or a released name (exit 2 otherwise)."""
    from pipeline.store.weights import source_problem

    problem = source_problem(value) if value else None
    if problem:
        raise click.BadParameter(f"{value}: {problem}", ctx=ctx, param=param)
    return value


def check_model(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Validate an architecture name against the registry, only when given (torch costs seconds)."""
    if value is None:
        return None
    import drn

    names = drn.list_models()
    if value not in names:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(names)}", ctx=ctx, param=param)
    return value


def parse_numbers(ctx: click.Context, param: click.Parameter, value: str | None):
    """"0.5,1,1.5" -> (0.5, 1.0, 1.5); positive numbers only."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected numbers separated by commas, e.g. 0.5,1,1.5",
                                 ctx=ctx, param=param) from None
    if not numbers or min(numbers) <= 0:
        raise click.BadParameter(f"{value!r}: scales must be positive", ctx=ctx, param=param)
    return numbers


def parse_with(parse: Callable[[Any], Any]) -> Callable:
    """A click callback over a JobSpec field's `parse`: its ValueError becomes a usage error
    (exit 2) that names the option."""
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from None
    return callback


def _click_type(f: dataclasses.Field, annotation: Any):
    meta = f.metadata
    if meta.get("choices"):
        return click.Choice(meta["choices"])
    base = specmod.toml_types_of(annotation)
    low, high = meta.get("min"), meta.get("max")
    if int in base and float not in base:
        return click.IntRange(min=low, max=high, min_open=meta.get("min_open", False))
    if float in base:
        return click.FloatRange(min=low, max=high, min_open=meta.get("min_open", False))
    return None


def _spec_option(f: dataclasses.Field, annotation: Any) -> Callable:
    """One click option for JobSpec field `f` (None default: "not given", so a --job file's
    value stays unless the flag is on the command line)."""
    name = "--" + f.name.replace("_", "-")
    help_text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, False, ()):
        shown = ",".join(f"{v:g}" for v in default) if isinstance(default, tuple) else default
        help_text += f" [default: {shown}]"
    base = specmod.toml_types_of(annotation)
    if bool in base:
        return click.option(name, is_flag=True, default=None, help=help_text)
    if f.metadata.get("parse"):
        return click.option(name, default=None, callback=parse_with(f.metadata["parse"]),
                            metavar=f.metadata.get("metavar"), help=help_text, show_default=False)
    if list in base:
        return click.option(name, default=None, callback=parse_numbers, help=help_text)
    kwargs: dict[str, Any] = {"default": None, "help": help_text, "show_default": False}
    click_type = _click_type(f, annotation)
    if click_type is not None:
        kwargs["type"] = click_type
    if f.name == "model":
        kwargs["callback"] = check_model
    if f.name == "address":
        kwargs["envvar"] = "RAY_ADDRESS"
    return click.option(name, **kwargs)


def run_options(f: Callable) -> Callable:
    """`--job` plus one option per JobSpec key (the options `run` and `submit` share)."""
    hints = typing.get_type_hints(specmod.JobSpec)
    opts = [click.option("--job", "job", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                         help="TOML job spec (jobs/*.toml); flags override its keys.")]
    opts += [_spec_option(field, hints[field.name]) for field in specmod.cli_fields()]
    for opt in reversed(opts):
        f = opt(f)
    return f


def spec_from_cli(input_: str | None, output: str | None, job: Path | None,
                  **options: Any) -> specmod.JobSpec:
    """JobSpec from a --job file and flags (a flag left out keeps the file's value)."""
    base = specmod.load_spec(job) if job else specmod.JobSpec()
    overrides = {f.name: options.get(f.name) for f in specmod.cli_fields()}
    overrides = {k: (None if v is False else v) for k, v in overrides.items()}  # absent flags
    overrides["input"], overrides["output"] = input_, output
    return specmod.merge(base, overrides).validate()


def checkpoint_sha256(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A checkpoint file stands for its sha256 (what the rows it labelled carry)."""
    if value is not None and Path(value).is_file():
        from drn.checkpoints import sha256_file

        return sha256_file(Path(value))
    return value


def identity_options(f: Callable) -> Callable:
    """--model / --weights-sha256: which model identity's rows a command reads."""
    f = click.option("--weights-sha256", default=None, callback=checkpoint_sha256,
                     help="Rows of the checkpoint with this sha256 (or a unique prefix of it, or "
                          "the checkpoint file itself), when OUTPUT holds several.")(f)
    return click.option("--model", default=None,
                        help="Rows of this architecture, when OUTPUT holds several.")(f)
