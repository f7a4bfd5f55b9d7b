"""The command line speaks its own language (issue 21): environment variables named after
each flag, --help that starts where a newcomer starts and ends each command with an
example, `models` listing the released checkpoints, `status` readable by a person,
`doctor` checking the machine without starting anything, messages that name flags."""
from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import click
import pytest

from drn.checkpoints import RELEASED_WEIGHTS, cache_path
from pipeline.cli import COMMANDS, SECTIONS, cli, envvar_name
from pipeline.job.progress import Progress
from pipeline.store.fs import write_bytes_atomic
from pipeline.store.output import PROGRESS_FILE, RUNS_DIR
from pipeline.tools import doctor

REPO = Path(__file__).resolve().parents[2]


def _commands():
    ctx = click.Context(cli, info_name="drn-label")
    return ctx, [(name, cli.get_command(ctx, name)) for name in sorted(COMMANDS)]


# -- environment variables ---------------------------------------------------------------------
def test_every_option_of_every_command_reads_drn_label_command_option(monkeypatch):
    """Walk the whole tree: each option's first variable is DRN_LABEL_<COMMAND>_<FLAG> and
    click reads exactly that name (not one made from the Python parameter's name)."""
    root, commands = _commands()
    walked = [(None, cli, root)] + [(name, cmd, click.Context(cmd, info_name=name, parent=root))
                                    for name, cmd in commands]
    checked = 0
    for name, command, ctx in walked:
        for param in command.params:
            if not isinstance(param, click.Option) or not param.expose_value:
                continue  # arguments; --help and --version
            flag = next(o for o in param.opts if o.startswith("--"))
            expected = "_".join(["DRN_LABEL", *([name.upper()] if name else []),
                                 flag[2:].upper().replace("-", "_")])
            assert param.envvar[0] == expected == envvar_name(name, param), (name, flag, param.envvar)
            monkeypatch.setenv(expected, "from-the-environment")
            assert param.resolve_envvar_value(ctx) == "from-the-environment", (name, flag)
            monkeypatch.delenv(expected)
            if param.name and param.name.upper() != flag[2:].upper().replace("-", "_"):
                # click's automatic name (from the parameter, e.g. EXPORT_FMT) is not read
                monkeypatch.setenv(f"DRN_LABEL_{name.upper()}_{param.name.upper()}", "x")
                assert param.resolve_envvar_value(ctx) is None, (name, param.name)
            checked += 1
    assert checked > 100


@pytest.mark.parametrize("command, flag, variable", [
    ("export", "--format", "DRN_LABEL_EXPORT_FORMAT"),
    ("report", "--html", "DRN_LABEL_REPORT_HTML"),
    ("inspect", "--json", "DRN_LABEL_INSPECT_JSON"),
    ("train", "--model", "DRN_LABEL_TRAIN_MODEL"),
    ("eval", "--json", "DRN_LABEL_EVAL_JSON"),
    ("run", "--address", "DRN_LABEL_RUN_ADDRESS"),
])
def test_the_names_that_broke_the_rule(cli_runner, command, flag, variable):
    root, _ = _commands()
    cmd = cli.get_command(root, command)
    ctx = click.Context(cmd, info_name=command, parent=root)
    option = next(p for p in cmd.params if flag in p.opts)
    assert f"env var: {variable}" in option.get_help_record(ctx)[1]  # what --help shows
    res = cli_runner.invoke(cli, [command, "--help"], terminal_width=400)
    assert f"env var: {variable}" in res.output


def test_an_environment_value_is_used_and_named_when_it_is_wrong(cli_runner):
    res = cli_runner.invoke(cli, ["run", "in", "out"], env={"DRN_LABEL_RUN_WORKERS": "8-2"})
    assert res.exit_code == 2
    assert ("Error: Invalid value for '--workers' (from DRN_LABEL_RUN_WORKERS): MAX must be at "
            "least MIN, got '8-2'") in res.output
    res = cli_runner.invoke(cli, ["run", "in", "out", "--workers", "8-2"])
    assert "Error: Invalid value for '--workers': MAX must be at least MIN, got '8-2'" in res.output


# -- --help ----------------------------------------------------------------------------------
def test_help_starts_with_the_three_commands_a_newcomer_needs(cli_runner):
    res = cli_runner.invoke(cli, ["--help"])
    assert res.exit_code == 0
    after_options = res.output.split("\n\n", 3)[3]
    start = after_options[after_options.index("Start here:"):].splitlines()
    assert [line.split()[0] for line in start[1:4]] == ["demo", "run", "inspect"]
    assert "Start here:" in res.output.split("Follow and review a run:")[0]
    placed = [name for _, names in SECTIONS for name in names]
    assert sorted(placed) == sorted(COMMANDS), "every command in exactly one section"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_help_ends_with_an_example_that_parses(cli_runner, name):
    res = cli_runner.invoke(cli, [name, "--help"], terminal_width=200)
    assert res.exit_code == 0, res.output
    head, _, example = res.output.rstrip().rpartition("\n  Example:\n\n")
    assert head and example, res.output[-300:]
    lines = [line.strip() for line in example.splitlines()]
    assert lines and all(line[line.index("drn-label "):].startswith(f"drn-label {name}")
                         for line in lines), lines
    root, _ = _commands()
    command = cli.get_command(root, name)
    for line in lines:
        args = shlex.split(line[line.index("drn-label "):].split(" |")[0].split(" >")[0])[2:]
        # flags and argument counts are checked; values (files that exist here) are not
        command.make_context(name, args, parent=root, resilient_parsing=True)


# -- models ------------------------------------------------------------------------------------
def test_models_lists_the_released_checkpoints(cli_runner, tmp_path, monkeypatch):
    monkeypatch.setenv("DRN_LABEL_CACHE", str(tmp_path))
    cached = cache_path(RELEASED_WEIGHTS["drn_d_22:cityscapes"].url)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"\0" * 2_500_000)
    res = cli_runner.invoke(cli, ["models"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert (f"released checkpoints (a name is a --weights or --init value; downloaded once into "
            f"{tmp_path}):") in res.output
    lines = res.output.splitlines()
    for name, release in RELEASED_WEIGHTS.items():
        row = next(i for i, line in enumerate(lines) if line.split()[:1] == [name])
        assert lines[row + 1].strip() == release.url
    row = next(line for line in lines if line.startswith("  drn_d_22:cityscapes "))
    assert row.split() == ["drn_d_22:cityscapes", "cityscapes", "(19", "classes)", "--weights:",
                           "labels", "as", "released", "cached,", "2.5", "MB"]
    row = next(line for line in lines if line.startswith("  drn_d_22:imagenet "))
    assert "--init: a backbone to fine-tune" in row and row.endswith("not downloaded")


def test_messages_about_checkpoints_point_at_models(cli_runner, tmp_path):
    res = cli_runner.invoke(cli, ["train", str(tmp_path), "--out", str(tmp_path / "c.pth"),
                                  "--init", "nowhere.pth"])
    assert res.exit_code == 2
    assert ("Error: Invalid value for '--init': nowhere.pth: no such file; give a checkpoint path, "
            "an http(s)://, s3://, gs:// or hf:// URL, or a released name such as "
            "drn_d_22:cityscapes (`drn-label models` lists them)") in res.output
    res = cli_runner.invoke(cli, ["run", "--help"], terminal_width=200)
    assert "`drn-label models` lists them" in res.output.split("--weights", 1)[1].split("--classes")[0]


# -- status ------------------------------------------------------------------------------------
def _write_run(output: Path, **fields) -> None:
    progress = Progress(run_id="20260102T030405Z-abc123", output=str(output), **fields)
    write_bytes_atomic(str(output), PROGRESS_FILE, progress.to_json().encode())
    record = {"run_id": progress.run_id, "host": "labeller-1", "spec": {"input": "/data/photos"},
              "timings": {"startup_s": 13.04, "label_s": 16.7}}
    write_bytes_atomic(str(output), f"{RUNS_DIR}/{progress.run_id}.json", json.dumps(record).encode())


def test_status_prints_one_readable_summary_and_json_for_machines(cli_runner, tmp_path):
    out = tmp_path / "labels"
    _write_run(out, state="finished", total=150, labelled=150, labelled_ok=148, labelled_errors=2,
               committed=150, committed_ok=148, committed_errors=2, committed_files=2, skipped=10,
               images_per_s=8.982, eta_s=0.0, elapsed_s=16.7,
               started_at="2026-01-02T03:04:05+00:00", updated_at="2026-01-02T03:04:35+00:00")
    res = cli_runner.invoke(cli, ["status", str(out)])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0] == f"{out}: finished (run 20260102T030405Z-abc123 on labeller-1)"
    assert lines[1] == ("  labelled 150 of 150 (100%): 148 ok, 2 errors; 150 committed in 2 files; "
                        "10 already labelled before")
    assert lines[2] == "  9.0 images/s over 16.7s of labelling, after 13.0s of start-up"
    assert lines[3].startswith("  started 2026-01-02 03:04:05 UTC, last update 2026-01-02 03:04:35 UTC (")
    assert lines[4] == "  input /data/photos"
    res = cli_runner.invoke(cli, ["status", str(out), "--json"])
    data = json.loads(res.output)
    assert data["state"] == "finished" and data["labelled"] == 150 and data["host"] == "labeller-1"
    assert data["startup_s"] == 13.04 and data["input"] == "/data/photos"


def test_status_of_a_run_that_stopped_updating_says_how_to_resume(tmp_path):
    from pipeline.tools.summary import format_status, run_status

    out = tmp_path / "labels"
    _write_run(out, state="running", total=140, labelled=110, labelled_ok=110, committed=104,
               committed_ok=104, committed_files=11, images_per_s=9.0, eta_s=3.3, elapsed_s=12.0,
               started_at="2026-01-02T03:04:05+00:00", updated_at="2026-01-02T03:04:17+00:00")
    text = format_status(run_status(str(out)), now=datetime(2026, 1, 2, 3, 9, 17, tzinfo=timezone.utc))
    assert "  9.0 images/s over 12.0s of labelling, after 13.0s of start-up; ETA 3.3s" in text
    assert "last update 2026-01-02 03:04:17 UTC (5m00s ago)" in text
    assert text.endswith("  no update for 5m00s: if its process is gone, the run was killed; rerun "
                         "the same command to label the 36 images not committed")


def test_status_of_an_output_without_runs(cli_runner, tmp_path):
    res = cli_runner.invoke(cli, ["status", str(tmp_path)])
    assert res.exit_code == 2
    assert f"Error: {tmp_path} has no _state/progress.json: no run has written there yet" in res.output


# -- doctor --------------------------------------------------------------------------------------
SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLEKEYID0000", "AWS_SECRET_ACCESS_KEY": "s3cr3t-aws-value",
           "HF_TOKEN": "hf_s3cr3tvalue", "RAY_AUTH_TOKEN": "ray-s3cr3t-token"}


def quiet_machine(tmp_path) -> dict:
    """An environment with no credentials, endpoints or credential files of this machine
    (the session's S3 and GCS test servers set some)."""
    nowhere = str(tmp_path / "nowhere")
    return {**{k: None for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE",
                                  "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                                  "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_ENDPOINT_URL",
                                  "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST", "HF_ENDPOINT",
                                  "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH",
                                  "GOOGLE_APPLICATION_CREDENTIALS", "RAY_ADDRESS", "RAY_AUTH_TOKEN")},
            "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere, "HF_HOME": nowhere,
            "CLOUDSDK_CONFIG": nowhere, "DRN_LABEL_CACHE": str(tmp_path / "cache")}


def test_doctor_reports_each_part_and_never_a_secret(cli_runner, tmp_path):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    try:
        res = cli_runner.invoke(cli, ["doctor"],
                                env={**quiet_machine(tmp_path), **SECRETS, "RAY_ADDRESS": address},
                                terminal_width=300)
    finally:
        listener.close()
    assert res.exit_code == 0, res.output
    for value in SECRETS.values():
        assert value not in res.output
    lines = res.output.splitlines()
    assert lines[0].startswith("drn-label ") and " CPUs" in lines[0]
    by_name = {line.split()[1]: line for line in lines[1:] if line.split()[0] in ("ok", "note", "problem")}
    assert list(by_name) == ["torch", "devices", "ray", "s3", "gcs", "hub", "cache"]
    assert by_name["ray"].split()[0] == "ok" and f"RAY_ADDRESS={address}" in by_name["ray"]
    assert "reachable (token: RAY_AUTH_TOKEN found)" in by_name["ray"]
    assert by_name["s3"].endswith("credentials found (AWS_ACCESS_KEY_ID)")
    assert by_name["hub"].endswith("token found (HF_TOKEN)")
    assert by_name["gcs"].split()[0] == "note"
    gcs = lines.index(by_name["gcs"])
    assert lines[gcs + 1].strip().startswith("-> for gs:// run `gcloud auth application-default login`")
    assert f"{tmp_path / 'cache'} (DRN_LABEL_CACHE): writable, not created yet" in by_name["cache"]


def test_doctor_exits_1_naming_what_stops_a_run(cli_runner, tmp_path):
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there now
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    res = cli_runner.invoke(cli, ["doctor", "--json"],
                            env={**quiet_machine(tmp_path), "RAY_ADDRESS": f"ray://127.0.0.1:{port}",
                                 "DRN_LABEL_CACHE": str(blocker / "cache")})
    assert res.exit_code == 1
    checks = {c["name"]: c for c in json.loads(res.output)["checks"]}
    assert checks["ray"]["status"] == "problem"
    assert f"127.0.0.1:{port} not reachable" in checks["ray"]["detail"]
    assert checks["ray"]["fix"].startswith("check the address and that the cluster is up")
    assert checks["s3"]["status"] == checks["gcs"]["status"] == checks["hub"]["status"] == "note"
    assert checks["cache"]["status"] == "problem"
    assert checks["cache"]["fix"].startswith("set DRN_LABEL_CACHE to a folder this user can write")


def test_doctor_starts_no_ray_and_imports_none():
    code = ("import sys; from pipeline.tools.doctor import run_checks; run_checks(); "
            "print('ray' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_ray_addresses_doctor_understands():
    assert doctor._ray_target("ray://head:10001") == ("head", 10001)
    assert doctor._ray_target("http://head:8265") == ("head", 8265)
    assert doctor._ray_target("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert doctor._ray_target("auto") is None
