"""Render what runs a job spec on a cluster: KubeRay manifests and a `ray up` config.

Every manifest is built from one JobSpec and carries that spec, as TOML, in a ConfigMap
that the Ray head (RayJob, RayCronJob) or the submitting pod (CronJob) mounts at
``/etc/drn-label/job.toml``; the command that runs is ``drn-label run --job`` (or
``submit --job``) on that file. So what runs never drifts from the spec: change the
spec, render again, apply. The ConfigMap's name carries a hash of the spec, so a
re-rendered spec never changes under a run that already started.

Kinds (``drn-label schedule --kind``):
- ``raycronjob``: KubeRay >= 1.6 (feature gate ``RayCronJob``): each tick creates a
  RayJob that brings up its own GPU cluster, runs the spec, and tears the cluster down.
- ``rayjob``: one such run now (``kubectl create``), no schedule.
- ``cronjob``: a plain Kubernetes CronJob whose pod runs ``drn-label submit --wait``
  against a long-lived RayCluster (older KubeRay, or to share one cluster).
- ``raycluster``: that long-lived RayCluster (GPU workers scale to zero when idle).
- ``launcher``: a Ray cluster launcher config for ``ray up`` outside Kubernetes (AWS).

Scheduled runs are incremental because `run` is: each labels only the images without a
row for the same model identity and records itself in ``OUTPUT/_state/runs/``.

Closed by default: every Ray cluster checks a token (``authOptions.mode: token``); its
dashboard listens on the head pod's own address (``$MY_POD_IP``), never ``0.0.0.0``; and a
NetworkPolicy lets only the cluster's own pods, the pods that submit (the RayJob submitter,
the CronJob's pod: label ``app.kubernetes.io/component: submitter``) and the KubeRay
operator reach it. The CronJob's token secret is required: without it the pod does not
start. The `ray up` head keeps its dashboard on 127.0.0.1 (``ray dashboard`` tunnels to it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import spec as specmod
from pipeline.errors import UsageError

__all__ = ["KINDS", "ClusterShape", "cluster_shape", "local_path_warning", "render",
           "render_objects", "shipped_spec", "spec_toml"]

KINDS = ("raycronjob", "rayjob", "cronjob", "raycluster", "launcher")
RAY_VERSION = "2.60.0"  # the Ray the images in deploy/Dockerfile are built on
SPEC_DIR = "/etc/drn-label"
SPEC_PATH = f"{SPEC_DIR}/job.toml"
DASHBOARD_PORT = 8265
DASHBOARD_AGENT_PORT = 52365  # Ray's default; the agent answers the raylet health check
# The KubeRay operator polls RayJobs' dashboards; the NetworkPolicy admits it from here.
DEFAULT_OPERATOR_NAMESPACE = "kuberay-system"
# The pods of one rendered name, by role (app.kubernetes.io/component).
HEAD, WORKER, SUBMITTER = "ray-head", "ray-worker", "submitter"
# A run that outlives this is stopped (Kubernetes activeDeadlineSeconds); resumable anyway.
DEFAULT_DEADLINE_S = 6 * 3600
# Keep a finished RayJob (and its logs) this long before KubeRay deletes it.
DEFAULT_TTL_S = 3600
# Whole-run retries by KubeRay (a fresh cluster each): cheap, since a rerun is incremental.
DEFAULT_BACKOFF_LIMIT = 2


# -- the spec as TOML ----------------------------------------------------------------------
def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are valid TOML basic-string escapes; DEL must be escaped too.
        # "$" and "`" are escaped as well, so the text survives any shell it passes through.
        text = json.dumps(value, ensure_ascii=False)
        return text.replace("\x7f", "\\u007f").replace("$", "\\u0024").replace("`", "\\u0060")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} {value!r} as TOML")


def spec_toml(spec: specmod.JobSpec, *, header: str | None = None) -> str:
    """The spec as a TOML job file that `load_spec` reads back to the same spec."""
    data = spec.to_toml_dict()
    schedule_table = data.pop("schedule", {})
    lines = [f"# {line}" if line else "#" for line in (header or "").splitlines()]
    lines += [f"{key} = {_toml_value(value)}" for key, value in data.items()]
    if schedule_table:
        lines += ["", "[schedule]"]
        lines += [f"{key} = {_toml_value(value)}" for key, value in schedule_table.items()]
    return "\n".join(lines) + "\n"


# -- sizing -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClusterShape:
    """The Ray worker nodes a spec needs: `nodes` pods of `cpus`, `memory_gib`, `gpus` each."""

    nodes: int
    cpus: int
    memory_gib: int
    gpus: int
    actors_per_node: int


def cluster_shape(spec: specmod.JobSpec, *, gpus_per_node: int = 1,
                  node_cpus: int | None = None) -> ClusterShape:
    """Enough worker nodes for `workers` predict actors, plus room for decode tasks. Auto
    values are chosen as a run on one such node would choose them (JobSpec.resolved)."""
    spec = spec.resolved(cpus=node_cpus or 8, gpus=gpus_per_node)
    decode_room = 2 * spec.decode_cpus
    if spec.gpus_per_worker > 0:
        if spec.gpus_per_worker > gpus_per_node:
            raise UsageError(
                f"gpus_per_worker {spec.gpus_per_worker:g} is more than --gpus-per-node "
                f"{gpus_per_node}: one actor must fit on one node")
        per_node = max(1, int(gpus_per_node // spec.gpus_per_worker + 1e-9))
        cpus = node_cpus or max(8, math.ceil(per_node * spec.cpus_per_worker + decode_room))
        gpus = gpus_per_node
    else:
        cpus = node_cpus or 8
        per_node = max(1, int((cpus - decode_room) // spec.cpus_per_worker))
        gpus = 0
    workers = spec.worker_range()[1]  # room for the most actors the pool may grow to
    per_node = min(per_node, workers)
    return ClusterShape(nodes=math.ceil(workers / per_node), cpus=cpus,
                        memory_gib=4 * cpus, gpus=gpus, actors_per_node=per_node)


# -- names --------------------------------------------------------------------------------------
def job_name(spec: specmod.JobSpec) -> str:
    """A DNS-1123 name: [schedule] name, else drn-label-<spec file stem>."""
    raw = spec.schedule.name or ("drn-label-" + Path(spec.source).stem if spec.source else "drn-label")
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")[:40].rstrip("-")
    if not name:
        raise UsageError(f"schedule.name {raw!r} has no letters or digits for a Kubernetes name")
    return name


def _absolute(value: str | None, *, must_exist: bool = False) -> str | None:
    if not value or "://" in value:
        return value
    if must_exist and not os.path.exists(value):
        return value  # a preset name (classes = "cityscapes"), not a path
    return os.path.abspath(value)


def shipped_spec(spec: specmod.JobSpec) -> specmod.JobSpec:
    """The spec as a cluster runs it (`submit` and every rendered manifest): local paths
    absolute, the cluster's own Ray (no client-side address), no source file."""
    return spec.replace(input=_absolute(spec.input), output=_absolute(spec.output),
                        weights=_absolute(spec.weights, must_exist=True),
                        classes=_absolute(spec.classes, must_exist=True), address=None,
                        source=None, schedule=dataclasses.replace(spec.schedule, address=None))


# -- Kubernetes objects ---------------------------------------------------------------------------
def _labels(name: str, component: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "drn-label", "app.kubernetes.io/instance": name}
    if component:
        labels["app.kubernetes.io/component"] = component
    return labels


def config_map(spec: specmod.JobSpec, name: str) -> dict:
    text = spec_toml(shipped_spec(spec), header=f"Rendered by `drn-label schedule` from {spec.source or 'flags'}.")
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec-{digest}", "namespace": spec.schedule.namespace,
                     "labels": _labels(name)},
        "data": {"job.toml": text},
    }


def _spec_volume(cm_name: str) -> tuple[dict, dict]:
    volume = {"name": "job-spec", "configMap": {"name": cm_name}}
    mount = {"name": "job-spec", "mountPath": SPEC_DIR, "readOnly": True}
    return volume, mount


def _ray_container(name: str, image: str, cpus: int | str, memory: str, gpus: int = 0,
                   mounts: list | None = None) -> dict:
    limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    container: dict[str, Any] = {
        "name": name, "image": image,
        "resources": {"limits": limits, "requests": {"cpu": str(cpus), "memory": memory}},
    }
    if name == "ray-head":
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
        # The dashboard listens on the pod's own address (rayStartParams), so the health
        # checks ask it there; KubeRay's own probes would ask localhost.
        container["env"] = [{"name": "MY_POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}]
        container["readinessProbe"] = _head_probe(initial_delay_s=10, failures=10)
        container["livenessProbe"] = _head_probe(initial_delay_s=30, failures=120)
    if mounts:
        container["volumeMounts"] = mounts
    return container


# The raylet (through the dashboard agent, which listens on every address) and the GCS
# (through the dashboard, on the pod's address): what KubeRay's own head probes check.
HEAD_HEALTH_CHECK = (
    f"wget -T 4 --tries 1 -q -O- http://localhost:{DASHBOARD_AGENT_PORT}/api/local_raylet_healthz"
    f" | grep success && wget -T 4 --tries 1 -q -O- http://$MY_POD_IP:{DASHBOARD_PORT}/api/gcs_healthz"
    " | grep success")


def _head_probe(*, initial_delay_s: int, failures: int) -> dict:
    return {"exec": {"command": ["bash", "-c", HEAD_HEALTH_CHECK]}, "initialDelaySeconds": initial_delay_s,
            "periodSeconds": 5, "timeoutSeconds": 5, "failureThreshold": failures}


def ray_cluster_spec(spec: specmod.JobSpec, name: str, *, cm_name: str | None, shape: ClusterShape,
                     autoscale: bool, token_secret: str | None = None) -> dict:
    """A head without work (num-cpus 0: it runs the driver) and one worker group sized by `shape`."""
    image = spec.schedule.image
    head_volumes, head_mounts = [], []
    if cm_name:
        volume, mount = _spec_volume(cm_name)
        head_volumes, head_mounts = [volume], [mount]
    head_pod: dict[str, Any] = {"containers": [_ray_container("ray-head", image, 2, "8Gi",
                                                              mounts=head_mounts)]}
    if head_volumes:
        head_pod["volumes"] = head_volumes
    worker_pod: dict[str, Any] = {"containers": [_ray_container(
        "ray-worker", image, shape.cpus, f"{shape.memory_gib}Gi", gpus=shape.gpus)]}
    if shape.gpus:
        worker_pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists",
                                      "effect": "NoSchedule"}]
    group = {
        "groupName": "gpu" if shape.gpus else "cpu",
        "replicas": 0 if autoscale else shape.nodes,
        "minReplicas": 0 if autoscale else shape.nodes,
        "maxReplicas": shape.nodes,
        "rayStartParams": {},
        "template": {"metadata": {"labels": _labels(name, WORKER)}, "spec": worker_pod},
    }
    auth: dict[str, str] = {"mode": "token"}
    if token_secret:
        auth["secretName"] = token_secret
    cluster: dict[str, Any] = {
        "rayVersion": RAY_VERSION,
        "authOptions": auth,
        # KubeRay runs `ray start` in bash, which expands $MY_POD_IP (the head container's env).
        "headGroupSpec": {"rayStartParams": {"num-cpus": "0", "dashboard-host": "$MY_POD_IP"},
                          "template": {"metadata": {"labels": _labels(name, HEAD)}, "spec": head_pod}},
        "workerGroupSpecs": [group],
    }
    if autoscale:
        cluster["enableInTreeAutoscaling"] = True
        cluster["autoscalerOptions"] = {"idleTimeoutSeconds": 300}
    return cluster


def job_metadata(spec: specmod.JobSpec) -> dict[str, str]:
    """Ray job metadata: `drn-label status ID` reads OUTPUT's progress from it."""
    meta = {"drn_label_output": spec.output or "", "drn_label_input": spec.input or "",
            "drn_label_model": spec.model}
    return {k: v for k, v in meta.items() if v}


def rayjob_spec(spec: specmod.JobSpec, name: str, cm_name: str, shape: ClusterShape, *,
                deadline_s: int, ttl_s: int, backoff_limit: int) -> dict:
    return {
        "entrypoint": f"drn-label run --job {SPEC_PATH}",
        "metadata": job_metadata(spec),
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": ttl_s,
        "activeDeadlineSeconds": deadline_s,
        "backoffLimit": backoff_limit,
        # One submission per attempt: a resubmitting submitter would start a second
        # driver on the same OUTPUT (it would wait on the first one's lease).
        "submitterConfig": {"backoffLimit": 0},
        "submitterPodTemplate": submitter_pod_template(spec, name),
        "rayClusterSpec": ray_cluster_spec(spec, name, cm_name=cm_name, shape=shape, autoscale=False),
    }


def submitter_pod_template(spec: specmod.JobSpec, name: str) -> dict:
    """KubeRay's default submitter pod with the submitter label the NetworkPolicy admits
    (KubeRay fills in the `ray job submit` command and the token)."""
    return {"metadata": {"labels": _labels(name, SUBMITTER)},
            "spec": {"restartPolicy": "Never", "containers": [{
                "name": "ray-job-submitter", "image": spec.schedule.image,
                "resources": {"limits": {"cpu": "1", "memory": "1Gi"},
                              "requests": {"cpu": "500m", "memory": "200Mi"}}}]}}


def network_policy(spec: specmod.JobSpec, name: str, operator_namespace: str) -> dict:
    """Ingress to the Ray pods of `name`: from each other (every port), and to the
    dashboard only from its submitters and the KubeRay operator (which polls RayJobs)."""
    ray_pods = {"matchLabels": _labels(name),
                "matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "In",
                                      "values": [HEAD, WORKER]}]}
    dashboard = [{"protocol": "TCP", "port": DASHBOARD_PORT}]
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": f"{name}-ray", "namespace": spec.schedule.namespace, "labels": _labels(name)},
        "spec": {
            "podSelector": ray_pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [{"podSelector": ray_pods}]},
                {"from": [{"podSelector": {"matchLabels": _labels(name, SUBMITTER)}}], "ports": dashboard},
                {"from": [{"namespaceSelector": {"matchLabels": {
                               "kubernetes.io/metadata.name": operator_namespace}},
                           "podSelector": {"matchLabels": {
                               "app.kubernetes.io/component": "kuberay-operator"}}}],
                 "ports": dashboard},
            ],
        },
    }


def rayjob(spec, name, cm_name, shape, **kw) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": spec.schedule.namespace, "labels": _labels(name)},
            "spec": rayjob_spec(spec, name, cm_name, shape, **kw)}


def raycronjob(spec, name, cm_name, shape, **kw) -> dict:
    cron_spec: dict[str, Any] = {"schedule": spec.schedule.cron}
    if spec.schedule.time_zone:
        cron_spec["timeZone"] = spec.schedule.time_zone
    cron_spec["jobTemplate"] = rayjob_spec(spec, name, cm_name, shape, **kw)
    return {"apiVersion": "ray.io/v1", "kind": "RayCronJob",
            "metadata": {"name": name, "namespace": spec.schedule.namespace, "labels": _labels(name)},
            "spec": cron_spec}


def token_secret_name(name: str) -> str:
    return f"{name}-ray-token"


def default_address(spec: specmod.JobSpec, name: str) -> str:
    """The dashboard of the RayCluster that `--kind raycluster` renders (KubeRay's head service)."""
    return f"http://{name}-head-svc.{spec.schedule.namespace}.svc.cluster.local:{DASHBOARD_PORT}"


def raycluster(spec, name, shape) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster",
            "metadata": {"name": name, "namespace": spec.schedule.namespace, "labels": _labels(name)},
            "spec": ray_cluster_spec(spec, name, cm_name=None, shape=shape, autoscale=True,
                                     token_secret=token_secret_name(name))}


def cronjob(spec, name, cm_name, *, deadline_s: int, ttl_s: int) -> dict:
    address = spec.schedule.address or default_address(spec, name)
    volume, mount = _spec_volume(cm_name)
    container = {
        "name": "submit",
        "image": spec.schedule.image,
        "command": ["drn-label", "submit", "--job", SPEC_PATH, "--wait"],
        "env": [
            {"name": "RAY_ADDRESS", "value": address},
            # Required: a pod without the cluster's token must not start (it would be refused).
            {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": {
                "name": token_secret_name(name), "key": "auth_token"}}},
        ],
        "resources": {"requests": {"cpu": "250m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        "volumeMounts": [mount],
    }
    job_spec = {
        # The pod only submits and waits: a retry would submit a second run (which the
        # OUTPUT lease would refuse); the next tick picks up whatever is left.
        "backoffLimit": 0,
        "activeDeadlineSeconds": deadline_s,
        "ttlSecondsAfterFinished": ttl_s,
        "template": {"metadata": {"labels": _labels(name, SUBMITTER)},
                     "spec": {"restartPolicy": "Never", "containers": [container],
                              "volumes": [volume]}},
    }
    cron_spec: dict[str, Any] = {"schedule": spec.schedule.cron}
    if spec.schedule.time_zone:
        cron_spec["timeZone"] = spec.schedule.time_zone
    cron_spec.update({"concurrencyPolicy": "Forbid", "startingDeadlineSeconds": 3600,
                      "successfulJobsHistoryLimit": 3, "failedJobsHistoryLimit": 3,
                      "jobTemplate": {"spec": job_spec}})
    return {"apiVersion": "batch/v1", "kind": "CronJob",
            "metadata": {"name": name, "namespace": spec.schedule.namespace, "labels": _labels(name)},
            "spec": cron_spec}


# -- Ray cluster launcher (`ray up`) ------------------------------------------------------------
def launcher_config(spec: specmod.JobSpec, name: str, shape: ClusterShape, *,
                    instance_type: str, head_instance_type: str, region: str) -> dict:
    """An AWS cluster for `ray up`: a CPU head (runs the driver) and GPU (or CPU) workers that
    scale from zero. The job spec travels with `drn-label submit --job`, not in this file."""
    start_env = "export RAY_AUTH_MODE=token; ulimit -n 65536;"
    worker_resources: dict[str, int] = {"CPU": shape.cpus}
    if shape.gpus:
        worker_resources["GPU"] = shape.gpus
    return {
        "cluster_name": name,
        "max_workers": shape.nodes,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 10,
        "docker": {"image": spec.schedule.image, "container_name": "drn-label",
                   "pull_before_run": True, "run_options": ["--ulimit nofile=65536:65536"]},
        "provider": {"type": "aws", "region": region, "cache_stopped_nodes": False},
        "auth": {"ssh_user": "ubuntu"},
        "available_node_types": {
            "head": {"resources": {"CPU": 0},
                     "node_config": {"InstanceType": head_instance_type}},
            "workers": {"min_workers": 0, "max_workers": shape.nodes,
                        "resources": worker_resources,
                        "node_config": {"InstanceType": instance_type}},
        },
        "head_node_type": "head",
        # The same token on every node and on your laptop (`ray get-auth-token --generate`).
        "file_mounts": {"~/.ray/auth_token": "~/.ray/auth_token"},
        # The dashboard on the head's loopback only: `ray dashboard` reaches it through SSH.
        "head_start_ray_commands": [
            "ray stop",
            f"{start_env} ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"{start_env} ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076",
        ],
    }


# -- rendering -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RenderOptions:
    gpus_per_node: int = 1
    node_cpus: int | None = None
    deadline_s: int = DEFAULT_DEADLINE_S
    ttl_s: int = DEFAULT_TTL_S
    backoff_limit: int = DEFAULT_BACKOFF_LIMIT
    instance_type: str = "g5.2xlarge"
    head_instance_type: str = "m5.2xlarge"
    region: str = "us-west-2"
    operator_namespace: str = DEFAULT_OPERATOR_NAMESPACE


def render_objects(spec: specmod.JobSpec, kind: str, options: RenderOptions = RenderOptions()) -> list[dict]:
    """The objects (or, for `launcher`, the one config) that run `spec` as `kind`."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; one of {', '.join(KINDS)}")
    if kind in ("raycronjob", "cronjob") and not spec.schedule.cron:
        raise UsageError(f"--kind {kind} needs a schedule: --cron '0 2 * * *' or "
                               f"`cron = ...` under [schedule] in the job spec")
    name = job_name(spec)
    shape = cluster_shape(spec, gpus_per_node=options.gpus_per_node, node_cpus=options.node_cpus)
    run_kw = dict(deadline_s=options.deadline_s, ttl_s=options.ttl_s, backoff_limit=options.backoff_limit)
    policy = network_policy(spec, name, options.operator_namespace)
    if kind == "raycluster":
        return [raycluster(spec, name, shape), policy]
    if kind == "launcher":
        return [launcher_config(spec, name, shape, instance_type=options.instance_type,
                                head_instance_type=options.head_instance_type, region=options.region)]
    cm = config_map(spec, name)
    cm_name = cm["metadata"]["name"]
    if kind == "rayjob":
        return [cm, rayjob(spec, name, cm_name, shape, **run_kw), policy]
    if kind == "raycronjob":
        return [cm, raycronjob(spec, name, cm_name, shape, **run_kw), policy]
    # The CronJob's pods carry the submitter label that the RayCluster's policy admits.
    return [cm, cronjob(spec, name, cm_name, deadline_s=options.deadline_s, ttl_s=options.ttl_s)]


_NOTES = {
    "raycronjob": "Needs KubeRay >= 1.6 with the RayCronJob feature gate on. Each tick creates a RayJob\n"
                  "with its own Ray cluster, labels what is new, and deletes the cluster afterwards.",
    "rayjob": "One run now, on a cluster of its own that is deleted when the run ends.\n"
              "Use `kubectl create -f` (the name is fixed: delete the finished RayJob to run again).",
    "cronjob": "Submits to the long-lived RayCluster (`--kind raycluster`) with `drn-label submit --wait`.\n"
               "The token comes from the Secret {secret} (key auth_token), the RayCluster's token.",
    "raycluster": "A long-lived cluster for `--kind cronjob` and `drn-label submit`. Its token is the\n"
                  "Secret {secret} (key auth_token); create it first:\n"
                  "  kubectl -n {namespace} create secret generic {secret} \\\n"
                  "    --from-literal=auth_token=$(openssl rand -hex 32)\n"
                  "Its dashboard admits only pods labelled app.kubernetes.io/component=submitter\n"
                  "(the CronJob's) and the KubeRay operator: see docs/clusters.md to submit by hand.",
    "launcher": "For `ray up` on AWS (not Kubernetes). Token auth: run `ray get-auth-token --generate`\n"
                "first; the token file is copied to every node. Then: `ray dashboard THIS_FILE` and\n"
                "`drn-label submit --address http://127.0.0.1:8265 --job SPEC --wait`.",
}


def _yaml_dumper():
    import yaml

    class Dumper(yaml.SafeDumper):
        """Multi-line strings (the spec in the ConfigMap) as literal blocks, readable in kubectl;
        a value used twice is written twice (no YAML anchors)."""

        def ignore_aliases(self, data) -> bool:
            return True

    def text(dumper, value: str):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return Dumper


def render(spec: specmod.JobSpec, kind: str, options: RenderOptions = RenderOptions()) -> str:
    """YAML text: a header saying where it came from, then the objects as YAML documents."""
    import yaml

    _Dumper = _yaml_dumper()
    objects = render_objects(spec, kind, options)
    name = job_name(spec)
    note = _NOTES[kind].format(secret=token_secret_name(name), namespace=spec.schedule.namespace)
    source = spec.source or "command-line flags"
    header = [f"Rendered by `drn-label schedule --kind {kind}` from {source}: edit the spec and",
              "render again rather than editing this file.", *note.splitlines()]
    text = "\n".join(f"# {line}" for line in header) + "\n"
    docs = [yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
            for obj in objects]
    return text + "---\n".join(docs)


def local_path_warning(spec: specmod.JobSpec) -> str | None:
    local = [f"{key} {value}" for key, value in (("input", spec.input), ("output", spec.output))
             if value and "://" not in value]
    if not local:
        return None
    return (f"warning: {' and '.join(local)}: local paths, which the cluster must see at the same "
            f"path (a shared volume); s3:// URIs work everywhere")
