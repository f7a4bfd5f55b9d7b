"""`drn-label doctor`: what this machine offers a run, and what to do about what is missing.

Each check reads the environment and a few files; none starts Ray, downloads anything or
opens a connection other than one TCP connect (1 s) to RAY_ADDRESS when it is set.
Credentials are reported as found or not found, by the variable or file that holds them:
their values are never read into a message.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

OK, NOTE, PROBLEM = "ok", "note", "problem"
"""A check's verdict: fine; missing but optional (no GPU, no S3 credentials); in the way
of a run (torch cannot load, the cache cannot be written, RAY_ADDRESS unreachable)."""


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""  # what to do, when status is not OK

    def to_dict(self) -> dict:
        return asdict(self)


def run_checks() -> list[Check]:
    """Every check, in the order a run needs them."""
    return [check_torch(), check_devices(), check_ray(), check_s3(), check_gcs(), check_hub(),
            check_cache()]


def environment_line() -> str:
    return (f"drn-label {_version('drn-label') or '?'}, Python {platform.python_version()} on "
            f"{platform.system()} {platform.machine()}, {_cpus()} CPUs")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def _found(names: list[str]) -> list[str]:
    return [n for n in names if os.environ.get(n)]


# -- torch and devices ---------------------------------------------------------------------
def check_torch() -> Check:
    try:
        import torch
    except Exception as exc:  # noqa: BLE001 - any import failure is the finding
        return Check("torch", PROBLEM, f"cannot be imported ({type(exc).__name__}: {exc})",
                     'reinstall it: pip install "torch==2.13.0" (or your own build, TORCH_SPEC)')
    return Check("torch", OK, f"{torch.__version__}, {torch.get_num_threads()} threads")


def check_devices() -> Check:
    try:
        import torch
    except Exception:  # noqa: BLE001 - reported by check_torch
        return Check("devices", PROBLEM, "unknown: torch cannot be imported", "fix torch first")
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return Check("devices", OK, f"{len(names)} CUDA GPU(s): {', '.join(names)} "
                                    f"(CUDA {torch.version.cuda}); use --gpus-per-worker")
    if shutil.which("nvidia-smi"):
        return Check("devices", NOTE, f"an NVIDIA driver is installed but torch {torch.__version__} "
                                      "sees no GPU: runs use the CPU",
                     "install a CUDA build of torch (TORCH_SPEC=torch pip install ...), then "
                     "check that `nvidia-smi` lists the GPU")
    return Check("devices", NOTE, f"no GPU seen: runs use the {_cpus()} CPUs",
                 "fine for small sets; for millions of images use a GPU machine or a cluster "
                 "(`drn-label submit`)")


# -- Ray -------------------------------------------------------------------------------------
def _ray_target(address: str) -> tuple[str, int] | None:
    """(host, port) that a Ray address names, or None ("auto", "local")."""
    if address in ("auto", "local"):
        return None
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    if not parts.hostname:
        return None
    default = {"http": 80, "https": 443, "ray": 10001}.get(parts.scheme, 6379)
    try:
        return parts.hostname, parts.port or default
    except ValueError:  # a port that is not a number
        return None


def check_ray() -> Check:
    version = _version("ray")
    if version is None:
        return Check("ray", PROBLEM, "not installed", 'pip install "ray[data,default]>=2.60"')
    token = " (token: RAY_AUTH_TOKEN found)" if os.environ.get("RAY_AUTH_TOKEN") else ""
    address = os.environ.get("RAY_ADDRESS")
    if not address:
        return Check("ray", OK, f"{version}; RAY_ADDRESS not set: `run` starts an embedded Ray on "
                                f"this machine{token}")
    target = _ray_target(address)
    if target is None:
        return Check("ray", OK, f"{version}; RAY_ADDRESS={address}: a Ray started on this machine "
                                f"(`ray start`) is joined{token}")
    try:
        with socket.create_connection(target, timeout=1.0):
            pass
    except OSError as exc:
        return Check("ray", PROBLEM, f"{version}; RAY_ADDRESS={address}: {target[0]}:{target[1]} "
                                     f"not reachable ({exc.strerror or type(exc).__name__})",
                     "check the address and that the cluster is up, or unset RAY_ADDRESS to "
                     "run on an embedded local Ray")
    return Check("ray", OK, f"{version}; RAY_ADDRESS={address}: {target[0]}:{target[1]} "
                            f"reachable{token}")


# -- storage credentials (found or not; never their values) ----------------------------------
def check_s3() -> Check:
    env = _found(["AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                  "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"])
    files = [f for f in (os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials",
                         os.environ.get("AWS_CONFIG_FILE") or "~/.aws/config")
             if Path(f).expanduser().is_file()]
    endpoint = _found(["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"])
    where = f"; endpoint from {endpoint[0]}" if endpoint else ""
    if env or files:
        return Check("s3", OK, f"credentials found ({', '.join(env + files)}){where}")
    return Check("s3", NOTE, f"no AWS credentials found in the environment or ~/.aws{where}",
                 "for s3:// set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, a profile "
                 "(`aws configure`), or run where an instance or pod role provides them")


def check_gcs() -> Check:
    emulator = " (STORAGE_EMULATOR_HOST set: an emulator)" if os.environ.get("STORAGE_EMULATOR_HOST") else ""
    named = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    if named:
        if Path(named).expanduser().is_file():
            return Check("gcs", OK, f"credentials found (GOOGLE_APPLICATION_CREDENTIALS){emulator}")
        return Check("gcs", PROBLEM, "GOOGLE_APPLICATION_CREDENTIALS names a file that does not exist",
                     "point it at the service account's key file, or unset it")
    config = Path(os.environ.get("CLOUDSDK_CONFIG") or "~/.config/gcloud").expanduser()
    if (config / "application_default_credentials.json").is_file():
        return Check("gcs", OK, f"credentials found (gcloud application-default login){emulator}")
    return Check("gcs", NOTE, f"no Google credentials found{emulator}",
                 "for gs:// run `gcloud auth application-default login` or set "
                 "GOOGLE_APPLICATION_CREDENTIALS (on GCP a service account needs neither)")


def check_hub() -> Check:
    endpoint = " (HF_ENDPOINT set: a mirror)" if os.environ.get("HF_ENDPOINT") else ""
    env = _found(["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
    hf_home = Path(os.environ.get("HF_HOME") or "~/.cache/huggingface").expanduser()
    token_file = Path(os.environ.get("HF_TOKEN_PATH") or hf_home / "token").expanduser()
    if env or token_file.is_file():
        return Check("hub", OK, f"token found ({(env or ['huggingface-cli login'])[0]}){endpoint}")
    return Check("hub", NOTE, f"no Hugging Face token found{endpoint}",
                 "public hf:// checkpoints need none; for private ones set HF_TOKEN or run "
                 "`huggingface-cli login`")


# -- the weights cache -----------------------------------------------------------------------
def check_cache() -> Check:
    from drn.checkpoints import default_cache_dir

    root = default_cache_dir()
    origin = "DRN_LABEL_CACHE" if os.environ.get("DRN_LABEL_CACHE") else "default; DRN_LABEL_CACHE not set"
    existing = next(p for p in (root, *root.parents) if p.exists())
    fix = "set DRN_LABEL_CACHE to a folder this user can write (checkpoints are downloaded there once)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check("cache", PROBLEM, f"{root} ({origin}): {existing} is not writable", fix)
    free = shutil.disk_usage(existing).free
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")] if root.is_dir() else []
    held = (f"{len(files)} file(s), {sum(p.stat().st_size for p in files) / 1e6:.1f} MB"
            if root.is_dir() else "not created yet")
    if free < 1 << 30:
        return Check("cache", NOTE, f"{root} ({origin}): {held}; only {free / 1e6:.0f} MB free",
                     "free some space there, or set DRN_LABEL_CACHE to a larger disk")
    return Check("cache", OK, f"{root} ({origin}): writable, {held}; {free / 1e9:.0f} GB free")
