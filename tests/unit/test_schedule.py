"""`drn-label schedule`: manifests rendered from a job spec, and incremental scheduled runs."""
from __future__ import annotations

import gzip

import functools
import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from pipeline.cluster import manifests as sched
from pipeline import spec as specmod
from pipeline.cli import cli

REPO = Path(__file__).resolve().parents[2]
K8S_SCHEMAS = REPO / "tests" / "data" / "kuberay"
NIGHTLY = "jobs/nightly-s3.toml"


@pytest.fixture
def in_repo(monkeypatch):
    """Render from the repository root, as the docs do (manifests name the spec file)."""
    monkeypatch.chdir(REPO)


def render(cli_runner, *args: str) -> list[dict]:
    result = cli_runner.invoke(cli, ["schedule", *args])
    assert result.exit_code == 0, result.output
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d.get("kind") == kind]
    return doc


def _strict(schema):
    """Forbid fields a CRD does not know: the API server would silently drop them."""
    if isinstance(schema, dict):
        if (schema.get("type") == "object" and "properties" in schema
                and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


@functools.lru_cache(maxsize=None)
def _crd_schema(file_name: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    crd = yaml.load(gzip.decompress((K8S_SCHEMAS / f"{file_name}.gz").read_bytes()), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    return _strict(version["schema"]["openAPIV3Schema"])


def crd_validator(file_name: str):
    import jsonschema

    return jsonschema.Draft7Validator(_crd_schema(file_name))


def assert_valid(validator, obj: dict) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    assert not errors, errors


def embedded_spec(docs: list[dict], tmp_path: Path) -> specmod.JobSpec:
    path = tmp_path / "embedded.toml"
    path.write_text(by_kind(docs, "ConfigMap")["data"]["job.toml"])
    return specmod.load_spec(path)


# -- the spec as TOML ----------------------------------------------------------------------------
def test_spec_toml_reads_back_to_the_same_spec(tmp_path):
    spec = specmod.load_spec(REPO / NIGHTLY).replace(
        input="s3://b/in $HOME `x` \"quoted\" ünï\tcode/", max_error_rate=1e-05, torch_threads=3)
    path = tmp_path / "job.toml"
    path.write_text(sched.spec_toml(spec, header="a header\nover two lines"))
    back = specmod.load_spec(path)
    assert back == spec.replace(source=str(path))
    assert "$" not in path.read_text() and "`" not in path.read_text()


# -- KubeRay manifests -------------------------------------------------------------------------------
def test_raycronjob_validates_and_carries_the_spec(cli_runner, in_repo, tmp_path):
    docs = render(cli_runner, "--job", NIGHTLY)  # kind, cron, zone, image from [schedule]
    cron = by_kind(docs, "RayCronJob")
    assert_valid(crd_validator("ray.io_raycronjobs.yaml"), cron)
    spec = specmod.load_spec(NIGHTLY)
    assert cron["metadata"] == {"name": "drn-label-nightly-s3", "namespace": "labelling",
                                "labels": sched._labels("drn-label-nightly-s3")}
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["timeZone"] == "Europe/Berlin"
    job = cron["spec"]["jobTemplate"]
    assert job["entrypoint"] == "drn-label run --job /etc/drn-label/job.toml"
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] == sched.DEFAULT_TTL_S
    assert job["activeDeadlineSeconds"] == sched.DEFAULT_DEADLINE_S
    assert job["backoffLimit"] == sched.DEFAULT_BACKOFF_LIMIT
    assert job["submitterConfig"] == {"backoffLimit": 0}
    assert job["metadata"]["drn_label_output"] == spec.output
    # The head (which runs the driver) mounts the ConfigMap holding the spec.
    cm = by_kind(docs, "ConfigMap")
    head = job["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"] == [{"name": "job-spec", "configMap": {"name": cm["metadata"]["name"]}}]
    assert head["containers"][0]["volumeMounts"][0]["mountPath"] == "/etc/drn-label"
    assert head["containers"][0]["image"] == spec.schedule.image
    assert embedded_spec(docs, tmp_path).replace(source=None) == sched.shipped_spec(spec)


def test_rayjob_validates_and_sizes_the_gpu_worker_group(cli_runner, in_repo):
    docs = render(cli_runner, "--job", NIGHTLY, "--kind", "rayjob", "--image", "reg/drn:9-gpu",
                  "--deadline", "7200", "--ttl", "60")
    job = by_kind(docs, "RayJob")
    assert_valid(crd_validator("ray.io_rayjobs.yaml"), job)
    spec = job["spec"]
    assert (spec["activeDeadlineSeconds"], spec["ttlSecondsAfterFinished"]) == (7200, 60)
    assert spec["shutdownAfterJobFinishes"] is True and spec["submitterConfig"]["backoffLimit"] == 0
    # 4 workers x 0.5 GPU on 1-GPU nodes: two GPU pods, and the head takes no work.
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["groupName"] == "gpu" and group["replicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]["containers"][0]
    assert worker["image"] == "reg/drn:9-gpu"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_raycluster_spec_validates_against_the_rayjob_cluster_schema(cli_runner, in_repo):
    cluster = by_kind(render(cli_runner, "--job", NIGHTLY, "--kind", "raycluster"), "RayCluster")
    validator = crd_validator("ray.io_rayjobs.yaml")
    cluster_schema = validator.schema["properties"]["spec"]["properties"]["rayClusterSpec"]
    assert_valid(type(validator)(cluster_schema), cluster["spec"])
    assert cluster["spec"]["authOptions"] == {"mode": "token",
                                              "secretName": "drn-label-nightly-s3-ray-token"}
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 2)  # scales to zero between runs
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


def test_flags_override_the_schedule_table(cli_runner, in_repo, tmp_path):
    out = tmp_path / "cron.yaml"
    result = cli_runner.invoke(cli, ["schedule", "--job", NIGHTLY, "--cron", "*/15 * * * *",
                                     "--time-zone", "UTC", "--image", "me/drn:1", "--namespace", "ml",
                                     "--name", "Hourly Labels", "--out", str(out)])
    assert result.exit_code == 0, result.output
    docs = list(yaml.safe_load_all(out.read_text()))
    cron = by_kind(docs, "RayCronJob")
    assert_valid(crd_validator("ray.io_raycronjobs.yaml"), cron)
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("*/15 * * * *", "UTC")
    assert cron["metadata"]["name"] == "hourly-labels" and cron["metadata"]["namespace"] == "ml"
    embedded = embedded_spec(docs, tmp_path)
    assert embedded.schedule.cron == "*/15 * * * *" and embedded.schedule.image == "me/drn:1"


def test_cronjob_submits_the_spec_to_the_long_lived_cluster(cli_runner, in_repo, tmp_path):
    docs = render(cli_runner, "--job", NIGHTLY, "--kind", "cronjob")
    cron = by_kind(docs, "CronJob")
    assert cron["apiVersion"] == "batch/v1"
    assert (cron["spec"]["schedule"], cron["spec"]["timeZone"]) == ("0 2 * * *", "Europe/Berlin")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "ghcr.io/example/drn-label:0.1.0-gpu"
    assert container["command"] == ["drn-label", "submit", "--job", "/etc/drn-label/job.toml", "--wait"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_ADDRESS"]["value"] == (
        "http://drn-label-nightly-s3-head-svc.labelling.svc.cluster.local:8265")
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {  # required: no `optional`
        "name": "drn-label-nightly-s3-ray-token", "key": "auth_token"}
    assert pod["volumes"][0]["configMap"]["name"] == by_kind(docs, "ConfigMap")["metadata"]["name"]
    assert embedded_spec(docs, tmp_path).output == "s3://my-labels/cityscapes-drn_d_22/"


def test_launcher_config_validates_against_rays_schema(cli_runner, in_repo):
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    (config,) = render(cli_runner, "--job", NIGHTLY, "--kind", "launcher")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    assert config["docker"]["image"] == "ghcr.io/example/drn-label:0.1.0-gpu"
    workers = config["available_node_types"]["workers"]
    assert workers["resources"]["GPU"] == 1 and workers["max_workers"] == 2
    assert all("RAY_AUTH_MODE=token" in c for c in config["head_start_ray_commands"][1:])
    # The head's dashboard stays on its loopback; `ray dashboard` tunnels to it over SSH.
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][1]


def test_a_schedule_needs_a_cron(cli_runner, in_repo):
    result = cli_runner.invoke(cli, ["schedule", "--job", "jobs/demo.toml", "--kind", "raycronjob"])
    assert result.exit_code == 2
    assert "--kind raycronjob needs a schedule: --cron '0 2 * * *'" in result.output


def test_deploy_manifests_are_the_rendered_nightly_spec(cli_runner, in_repo):
    """deploy/ holds `drn-label schedule` output for jobs/nightly-s3.toml, not hand edits."""
    files = {"raycronjob": "deploy/kuberay/raycronjob.yaml", "rayjob": "deploy/kuberay/rayjob.yaml",
             "cronjob": "deploy/kuberay/cronjob.yaml", "raycluster": "deploy/kuberay/raycluster.yaml",
             "launcher": "deploy/cluster-launcher.yaml"}
    for kind, path in files.items():
        result = cli_runner.invoke(cli, ["schedule", "--job", NIGHTLY, "--kind", kind])
        assert result.exit_code == 0, result.output
        assert (REPO / path).read_text() == result.stdout, (
            f"{path} is stale: drn-label schedule --job {NIGHTLY} --kind {kind} --out {path}")


def matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and In/NotIn/Exists matchExpressions) on a pod's labels."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        ok = {"In": value in expr.get("values", []), "NotIn": value not in expr.get("values", []),
              "Exists": expr["key"] in labels, "DoesNotExist": expr["key"] not in labels}[expr["operator"]]
        if not ok:
            return False
    return True


def admitted(policy: dict, labels: dict, port: int, namespace_labels: dict) -> bool:
    """Whether `policy` lets a pod with `labels` (in a namespace with `namespace_labels`)
    reach `port` of the pods it selects."""
    for rule in policy["spec"]["ingress"]:
        ports = [p["port"] for p in rule.get("ports", [])]
        if ports and port not in ports:
            continue
        for peer in rule["from"]:
            in_namespace = ("namespaceSelector" not in peer and namespace_labels.get("same")) or (
                "namespaceSelector" in peer and matches(peer["namespaceSelector"], namespace_labels))
            if in_namespace and matches(peer.get("podSelector", {}), labels):
                return True
    return False


@pytest.mark.parametrize("kind", ["raycronjob", "rayjob", "raycluster"])
def test_clusters_are_closed_by_default(cli_runner, in_repo, kind):
    """Token auth, the dashboard on the head pod's own address with probes that ask it there,
    and a NetworkPolicy that lets only the cluster's pods, its submitters and the KubeRay
    operator in. Submitters are the RayJob's submitter pod and the CronJob's pod."""
    docs = render(cli_runner, "--job", NIGHTLY, "--kind", kind, "--operator-namespace", "ops")
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    if kind == "raycronjob":
        job = by_kind(docs, "RayCronJob")["spec"]["jobTemplate"]
    cluster = (job["rayClusterSpec"] if kind == "raycronjob" else
               by_kind(docs, "RayJob")["spec"]["rayClusterSpec"] if kind == "rayjob" else
               by_kind(docs, "RayCluster")["spec"])
    assert cluster["authOptions"]["mode"] == "token"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$MY_POD_IP"
    (container,) = head["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["MY_POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    for probe in (container["readinessProbe"], container["livenessProbe"]):
        assert "http://$MY_POD_IP:8265/api/gcs_healthz" in probe["exec"]["command"][-1]
    text = yaml.safe_dump_all(docs)
    assert "0.0.0.0" not in text

    head_labels = head["template"]["metadata"]["labels"]
    worker_labels = cluster["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    assert matches(policy["spec"]["podSelector"], head_labels)
    assert matches(policy["spec"]["podSelector"], worker_labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    here = {"same": True}
    if kind == "raycluster":
        cron = by_kind(render(cli_runner, "--job", NIGHTLY, "--kind", "cronjob"), "CronJob")
        submitter = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    else:
        run = job if kind == "raycronjob" else by_kind(docs, "RayJob")["spec"]
        assert_valid(crd_validator("ray.io_rayjobs.yaml"),
                     {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"}, "spec": run})
        submitter = run["submitterPodTemplate"]["metadata"]["labels"]
        assert run["submitterPodTemplate"]["spec"]["containers"][0]["image"] == container["image"]
    assert admitted(policy, submitter, 8265, here)
    assert not admitted(policy, submitter, 6379, here)  # the dashboard only
    assert admitted(policy, worker_labels, 6379, here) and admitted(policy, head_labels, 8265, here)
    operator = {"app.kubernetes.io/component": "kuberay-operator", "app.kubernetes.io/name": "kuberay"}
    assert admitted(policy, operator, 8265, {"kubernetes.io/metadata.name": "ops"})
    assert not admitted(policy, operator, 8265, {"kubernetes.io/metadata.name": "kuberay-system"})
    for stranger in ({}, {"app": "web"}, {**submitter, "app.kubernetes.io/instance": "another-job"}):
        assert not admitted(policy, stranger, 8265, here), stranger
    assert not admitted(policy, submitter, 8265, {"kubernetes.io/metadata.name": "elsewhere"})


def test_cluster_shape_for_cpu_and_gpu_specs():
    gpu = specmod.JobSpec(input="x", output="y", workers=4, gpus_per_worker=0.5, cpus_per_worker=2)
    assert sched.cluster_shape(gpu) == sched.ClusterShape(nodes=2, cpus=8, memory_gib=32, gpus=1,
                                                          actors_per_node=2)
    assert sched.cluster_shape(gpu, gpus_per_node=4).nodes == 1
    cpu = specmod.JobSpec(input="x", output="y", workers=3, cpus_per_worker=4, gpus_per_worker=0)
    assert sched.cluster_shape(cpu) == sched.ClusterShape(nodes=3, cpus=8, memory_gib=32, gpus=0,
                                                          actors_per_node=1)


# -- incremental runs ------------------------------------------------------------------------------
