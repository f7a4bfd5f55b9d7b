"""Job specs and the CLI's validation: errors name the key (or option) and the file."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import cli
from pipeline.spec import JobSpec, SpecError, load_spec, merge

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_example_specs_load_and_validate():
    demo = load_spec(ROOT / "jobs" / "demo.toml").validate()
    assert demo.input == str(ROOT / "demo" / "images") and demo.model == "drn_d_22"
    assert demo.weights == str(ROOT / "demo" / "drn_d_22-synthetic.pth")
    nightly = load_spec(ROOT / "jobs" / "nightly-s3.toml").validate()
    assert nightly.output.startswith("s3://") and nightly.gpus_per_worker == 0.5
    assert nightly.schedule.cron == "0 2 * * *" and nightly.schedule.kind == "raycronjob"


def test_dashes_and_underscores_and_tta_scales(tmp_path):
    spec = load_spec(write(tmp_path, 'input = "a"\noutput = "b"\nbatch-size = 8\n'
                                     'tta = true\ntta_scales = [1, 1.5]\n'))
    assert spec.batch_size == 8 and spec.tta and spec.tta_scales == (1.0, 1.5)


@pytest.mark.parametrize("text, message", [
    ('bach_size = 4\n', "job.toml: unknown key 'bach_size' (did you mean batch_size?)"),
    ('rows_per_file = "4"\n', "job.toml: key 'rows_per_file' must be int, got str '4'"),
    ('overwrite = 1\n', "job.toml: key 'overwrite' must be bool, got int 1"),
    ('precision = "fp8"\n', "job.toml: key 'precision' must be one of auto, fp32, bf16, fp16, got 'fp8'"),
    ('[schedule]\nkind = "cron"\n', "job.toml: key 'schedule.kind' must be one of raycronjob, rayjob, cronjob, got 'cron'"),
    ('[schedule]\ncorn = "x"\n', "job.toml: unknown key 'schedule.corn' (did you mean schedule.cron?)"),
    ('tta_scales = ["a"]\n', "job.toml: key 'tta_scales' must be a list of numbers, got ['a']"),
    ('input = \n', "job.toml: not valid TOML"),
])
def test_bad_keys_and_values_name_the_key_and_file(tmp_path, text, message):
    with pytest.raises(SpecError) as exc:
        load_spec(write(tmp_path, text))
    assert str(exc.value).endswith(message) or str(exc.value).split(": ", 1)[1].startswith(
        message.split(": ", 1)[1]), str(exc.value)
    assert str(tmp_path / "job.toml") in str(exc.value)


def test_validation_names_the_key_and_file(tmp_path):
    spec = load_spec(write(tmp_path, 'input = "a"\noutput = "b"\nbatch_size = 0\n'))
    with pytest.raises(SpecError, match=r"^batch_size in .*job.toml: must be at least 1 or auto, got 0$"):
        spec.validate()
    bad = load_spec(write(tmp_path, 'input = "a"\noutput = "b"\nworkers = "many"\n'))
    with pytest.raises(SpecError, match=r"^workers in .*job.toml: must be a number \(4\) or a range MIN-MAX"):
        bad.validate()
    with pytest.raises(SpecError) as missing:
        JobSpec(input="a").validate()
    assert str(missing.value) == ('OUTPUT is missing: give it on the command line (INPUT OUTPUT) '
                                  'or as `output = "..."` of a --job spec')
    spec = load_spec(write(tmp_path, 'output = "b"\n'))
    with pytest.raises(SpecError) as missing:
        spec.validate()
    assert str(missing.value) == (f'INPUT is missing: give it on the command line (INPUT OUTPUT) '
                                  f'or as `input = "..."` in {tmp_path / "job.toml"}')


def test_flags_override_the_file(tmp_path):
    spec = load_spec(write(tmp_path, 'input = "a"\noutput = "b"\nbatch_size = 8\n[schedule]\ncron = "0 1 * * *"\n'))
    merged = merge(spec, {"batch_size": 2, "workers": None, "schedule_cron": "0 3 * * *"})
    assert merged.batch_size == 2 and merged.workers == "auto" and merged.schedule.cron == "0 3 * * *"


@pytest.mark.parametrize(("cpus", "gpus", "chosen"), [
    (2, 0, dict(workers=2, gpus_per_worker=0.0, cpus_per_worker=0.5, torch_threads=1,
                batch_size=4, precision="fp32")),
    (16, 2, dict(workers=4, gpus_per_worker=0.5, cpus_per_worker=1.0, torch_threads=None,
                 batch_size=16, precision="bf16")),
    (1, 0, dict(workers=1, gpus_per_worker=0.0, cpus_per_worker=0.5, decode_cpus=0.5)),
])
def test_auto_values_fill_the_cluster(cpus, gpus, chosen):
    """auto: every GPU (two actors each), else one single-threaded actor per core that
    leaves one decode task its CPU; values that were given are kept."""
    spec = JobSpec(input="a", output="b").validate()
    resolved = spec.resolved(cpus=cpus, gpus=gpus)
    assert {k: getattr(resolved, k) for k in chosen} == chosen
    assert resolved.worker_range()[1] * resolved.cpus_per_worker + resolved.decode_cpus <= cpus
    given = JobSpec(input="a", output="b", workers=3, batch_size=2, precision="bf16",
                    gpus_per_worker=0, cpus_per_worker=0.25).validate()
    kept = given.resolved(cpus=cpus, gpus=gpus)
    assert (kept.workers, kept.batch_size, kept.precision, kept.gpus_per_worker,
            kept.cpus_per_worker) == (3, 2, "bf16", 0, 0.25)
    assert given.resolved(cpus=cpus, gpus=gpus).chosen(given) == ""
    if gpus:
        assert resolved.chosen(spec) == ("--workers 4, --gpus-per-worker 0.5, --cpus-per-worker 1, "
                                         "--batch-size 16, --precision bf16")


@pytest.mark.parametrize(("workers", "cpus_per_worker", "torch_threads"), [
    ("auto", 0.5, 1), (2, 1.0, 2), ("1-4", 0.5, 1)])
def test_every_node_keeps_room_for_a_decode_task(workers, cpus_per_worker, torch_threads):
    """Two nodes of 2 CPUs: actors spread over both, and each node keeps a CPU for a decode
    task (2 actors of 1.5 CPUs, one a node, starved the decoding and the run waited forever)."""
    spec = JobSpec(input="a", output="b", workers=workers).validate()
    resolved = spec.resolved(cpus=4, gpus=0, nodes=2, node_cpus=2)
    assert (resolved.cpus_per_worker, resolved.torch_threads) == (cpus_per_worker, torch_threads)
    per_node = -(-resolved.worker_range()[1] // 2)
    assert per_node * resolved.cpus_per_worker + resolved.decode_cpus <= 2
    one_node = spec.resolved(cpus=2, gpus=0, nodes=1, node_cpus=2)  # after one is lost
    assert one_node.worker_range()[1] * one_node.cpus_per_worker + one_node.decode_cpus <= 2


@pytest.mark.parametrize("args, message", [
    (["run", "in", "out", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["run", "in", "out", "--precision", "fp8"], "Invalid value for '--precision'"),
    (["run", "in", "out", "--model", "drn_x"], "Invalid value for '--model': 'drn_x' is not one of drn_a_18"),
    (["run", "in", "out", "--tta-scales", "a,b"], "Invalid value for '--tta-scales': 'a,b': expected numbers"),
    (["run", "in", "out", "--max-error-rate", "2"], "Invalid value for '--max-error-rate'"),
    (["run", "in"], 'Error: OUTPUT is missing: give it on the command line (INPUT OUTPUT) or as '
                    '`output = "..."` of a --job spec'),
    (["run"], 'Error: INPUT is missing: give it on the command line (INPUT OUTPUT) or as '
              '`input = "..."` of a --job spec'),
    (["run", "--job", "nope.toml"], "Invalid value for '--job': File 'nope.toml' does not exist."),
    (["run", "in", "out", "--overwrite", "--retry-errors"],
     "Error: --overwrite and --retry-errors cannot be combined: --overwrite relabels every image, "
     "error rows included"),
])
def test_bad_options_are_usage_errors(cli_runner, args, message):
    result = cli_runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_job_file_errors_are_usage_errors(cli_runner, tmp_path):
    job = write(tmp_path, 'input = "a"\noutput = "b"\nworkerz = 2\n')
    result = cli_runner.invoke(cli, ["run", "--job", str(job)])
    assert result.exit_code == 2
    assert f"{job}: unknown key 'workerz' (did you mean workers?)" in result.output


def test_paths_in_a_spec_are_relative_to_the_spec_file(tmp_path, monkeypatch, cli_runner):
    """The same spec means the same folders from any working directory; URIs, absolute
    paths, release names and presets stay as written; a command-line INPUT/OUTPUT is
    relative to the current folder, as on any command line."""
    jobs = tmp_path / "project" / "jobs"
    jobs.mkdir(parents=True)
    (jobs / "labels.json").write_text('["a", "b"]')
    spec_file = jobs / "job.toml"
    spec_file.write_text('input = "../photos/**/*.jpg"\noutput = "../labels"\n'
                         'weights = "../ckpt/model.pth"\nclasses = "labels.json"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    spec = load_spec(Path("..") / "project" / "jobs" / "job.toml")
    project = tmp_path / "project"
    assert spec.input == f"{project}/photos/**/*.jpg"
    assert spec.output == str(project / "labels")
    assert spec.weights == str(project / "ckpt" / "model.pth")
    assert spec.classes == str(jobs / "labels.json")
    spec_file.write_text('input = "s3://bucket/in/"\noutput = "/data/labels"\n'
                         'weights = "drn_d_22:cityscapes"\nclasses = "cityscapes"\n')
    spec = load_spec(spec_file)
    assert (spec.input, spec.output, spec.weights, spec.classes) == (
        "s3://bucket/in/", "/data/labels", "drn_d_22:cityscapes", "cityscapes")
    from pipeline.cli.options import spec_from_cli

    spec_file.write_text('input = "../photos"\noutput = "../labels"\n')
    merged = spec_from_cli(None, "here-out", spec_file)
    assert merged.input == str(project / "photos") and merged.output == "here-out"


def test_the_spec_the_demo_writes_works_from_any_folder(tmp_path, monkeypatch):
    from pipeline.tools.demo import write_demo_spec

    root = tmp_path / "demo"
    root.mkdir()
    (root / "drn_d_22-synthetic.pth").write_bytes(b"")
    spec_file = write_demo_spec(root, root / "drn_d_22-synthetic.pth")
    monkeypatch.chdir(tmp_path.parent)
    spec = load_spec(spec_file).validate()
    assert (spec.input, spec.output, spec.weights) == (
        str(root / "images"), str(root / "out"), str(root / "drn_d_22-synthetic.pth"))
    assert f"#   drn-label run --job {spec_file}\n" in spec_file.read_text()
