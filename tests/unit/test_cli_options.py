"""Options that fail fast with exit 2 naming the option: cron expressions and time zones
(`schedule` and the spec's [schedule] table), `--workers MIN-MAX`; and the environment
variables shown in --help."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pipeline import spec as specmod
from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[2]
NIGHTLY = str(REPO / "jobs" / "nightly-s3.toml")


@pytest.mark.parametrize("args, message", [
    (["--cron", "bogus"], "Invalid value for '--cron': 'bogus' is not a cron expression"),
    (["--cron", "0 2 * * * *"], "Invalid value for '--cron': '0 2 * * * *' is not a cron expression"),
    (["--cron", "61 2 * * *"], "Invalid value for '--cron'"),
    (["--cron", "@sometimes"], "'@sometimes' is not a cron macro"),
    (["--time-zone", "Mars/Olympus"],
     "Invalid value for '--time-zone': 'Mars/Olympus' is not an IANA time zone"),
])
def test_schedule_refuses_bad_cron_and_time_zone(cli_runner, args, message):
    res = cli_runner.invoke(cli, ["schedule", "--job", NIGHTLY, *args])
    assert res.exit_code == 2 and message in res.output, res.output


@pytest.mark.parametrize("args", [["--cron", "0 2 * * 1-5", "--time-zone", "Europe/Berlin"],
                                  ["--cron", "@daily"]])
def test_schedule_accepts_good_values(cli_runner, args):
    res = cli_runner.invoke(cli, ["schedule", "--job", NIGHTLY, *args])
    assert res.exit_code == 0, res.output


def test_spec_schedule_table_is_validated_the_same_way(cli_runner, tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('input = "a"\noutput = "b"\n[schedule]\ncron = "0 2 * *"\ntime_zone = "UTC"\n')
    res = cli_runner.invoke(cli, ["schedule", "--job", str(job)])
    assert res.exit_code == 2
    assert f"schedule.cron in {job}: '0 2 * *' is not a cron expression" in res.output
    job.write_text('input = "a"\noutput = "b"\n[schedule]\ncron = "0 2 * * *"\ntime_zone = "Nowhere/X"\n')
    with pytest.raises(specmod.SpecError, match=r"schedule.time_zone in .*'Nowhere/X' is not an IANA"):
        specmod.load_spec(job).validate()


@pytest.mark.parametrize("value, expected", [(3, (3, 3)), ("2-8", (2, 8)), ("4", (4, 4)),
                                             (" 1-1 ", (1, 1))])
def test_worker_ranges(value, expected):
    assert specmod.worker_range(value) == expected


@pytest.mark.parametrize("value, message", [
    ("8-2", "Invalid value for '--workers': MAX must be at least MIN, got '8-2'"),
    ("0", "Invalid value for '--workers': must be at least 1, got 0"),
    ("many", "Invalid value for '--workers': must be a number (4) or a range MIN-MAX (2-8), got 'many'"),
])
def test_bad_workers_exit_2_naming_the_option(cli_runner, tmp_path, value, message):
    res = cli_runner.invoke(cli, ["run", str(tmp_path), str(tmp_path / "out"), "--workers", value])
    assert res.exit_code == 2 and message in res.output, res.output


def test_workers_range_in_a_job_spec(tmp_path):
    job = tmp_path / "job.toml"
    job.write_text('input = "a"\noutput = "b"\nworkers = "2-6"\n')
    spec = specmod.load_spec(job).validate()
    assert spec.worker_range() == (2, 6) and spec.to_toml_dict()["workers"] == "2-6"
    job.write_text('input = "a"\noutput = "b"\nworkers = "6-2"\n')
    with pytest.raises(specmod.SpecError, match="workers in .*MAX must be at least MIN"):
        specmod.load_spec(job).validate()


def test_help_shows_environment_variables(cli_runner):
    res = cli_runner.invoke(cli, ["run", "--help"], terminal_width=200)
    assert res.exit_code == 0
    assert "[env var: DRN_LABEL_RUN_JOB]" in res.output
    assert "DRN_LABEL_RUN_BATCH_SIZE" in res.output and "DRN_LABEL_RUN_JOB_FILE" not in res.output


def test_environment_variables_set_options(cli_runner, tmp_path):
    """DRN_LABEL_RUN_WORKERS reaches the option (and its validation) like the flag does."""
    res = cli_runner.invoke(cli, ["run", str(tmp_path), str(tmp_path / "o")],
                            env={"DRN_LABEL_RUN_WORKERS": "5-1"})
    assert res.exit_code == 2 and "Invalid value for '--workers'" in res.output


def _commands(group, path=()):
    import click

    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield (*path, name), cmd
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*path, name))


def test_every_help_example_names_options_the_command_has():
    """The example each --help ends with parses: no option it shows is unknown to the command
    (an input it names may not exist here; that is the user's to supply)."""
    import shlex

    import click

    checked = 0
    for path, cmd in _commands(cli):
        for line in (cmd.epilog or "").splitlines():
            lexer = shlex.shlex(line.strip(), posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = list(lexer)
            words = next((words[:i] for i, w in enumerate(words) if w in {">", "|", "&&", ";"}), words)
            if words[:1] != ["drn-label"] or tuple(words[1:1 + len(path)]) != path:
                continue
            try:
                cmd.make_context(" ".join(path), words[1 + len(path):])
            except (click.NoSuchOption, click.BadOptionUsage) as exc:
                pytest.fail(f"{line.strip()!r}: {exc.format_message()}")
            except click.UsageError as exc:
                assert "unexpected extra argument" not in exc.format_message(), line
            checked += 1
    assert checked >= 15, checked


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_entry_point_lets_idle_openmp_threads_sleep_unless_told(monkeypatch, given, expected):
    from pipeline.cli import main

    if given is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", given)
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert os.environ["OMP_WAIT_POLICY"] == expected
