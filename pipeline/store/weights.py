"""Checkpoints in object stores and on the Hugging Face Hub, fetched to a local cache.

`drn` reads local paths and http(s) URLs itself and knows nothing of stores; this module
turns ``s3://bucket/key``, ``gs://bucket/key`` and ``hf://OWNER/REPO/PATH`` (optionally
``hf://OWNER/REPO@REVISION/PATH``) into a cached local file that `drn.create_model` loads.
Everything else is passed through unchanged.

- s3:// and gs:// are read through `pipeline.store.fs.resolve` (the same endpoints and
  credentials as inputs and outputs) into ``$DRN_LABEL_CACHE/weights/<digest of the URI>/``
  (default ``~/.cache/drn-label``), written atomically; a cached copy whose size matches
  the object is reused.
- hf:// goes through ``huggingface_hub.hf_hub_download`` (its own cache; ``HF_ENDPOINT``
  and ``HF_TOKEN`` as usual), so a Hub mirror or a private repo works as with any other tool.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
from pathlib import Path

from drn.io import atomic_write
from pipeline.errors import JobError

REMOTE_SCHEMES = ("s3://", "gs://", "hf://")


class WeightsError(JobError):
    """A checkpoint URI that cannot be fetched; the message names it and the fix."""


def is_remote(weights: str | None) -> bool:
    return bool(weights) and weights.lower().startswith(REMOTE_SCHEMES)


def source_problem(weights: str) -> str | None:
    """Why `weights` names no checkpoint (a local path that does not exist, and neither a
    URL nor a released name), as the end of a message; None when it may be loaded."""
    from drn.checkpoints import RELEASED_WEIGHTS

    if "://" in weights or weights in RELEASED_WEIGHTS or Path(weights).expanduser().is_file():
        return None
    return ("no such file; give a checkpoint path, an http(s)://, s3://, gs:// or hf:// URL, or "
            "a released name such as drn_d_22:cityscapes (`drn-label models` lists them)")


def local_weights(weights: str | None) -> str | None:
    """A path `drn` can load for `weights` (fetched and cached when it is remote)."""
    if not is_remote(weights):
        problem = source_problem(weights) if weights else None
        if problem:
            raise WeightsError(f"--weights {weights}: {problem}")
        return weights
    if weights.lower().startswith("hf://"):
        return _from_hub(weights)
    return _from_store(weights)


def _cache_root() -> Path:
    return Path(os.environ.get("DRN_LABEL_CACHE") or Path.home() / ".cache" / "drn-label") / "weights"


def _from_store(uri: str) -> str:
    import pyarrow.fs as pafs

    from pipeline.store.fs import resolve

    try:
        fs, path = resolve(uri)
        info = fs.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"weights {uri}: {' '.join(str(exc).split())}") from None
    if info.type != pafs.FileType.File:
        raise WeightsError(f"weights {uri}: no such object; check the bucket and key")
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    target = _cache_root() / digest / posixpath.basename(path)
    if target.is_file() and target.stat().st_size == info.size:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with fs.open_input_stream(path) as src, atomic_write(target) as dst:
            while chunk := src.read(8 << 20):
                dst.write(chunk)
    except OSError as exc:
        raise WeightsError(f"weights {uri}: cannot be read ({' '.join(str(exc).split())})") from None
    return str(target)


def parse_hub_uri(uri: str) -> tuple[str, str | None, str]:
    """``hf://OWNER/REPO[@REVISION]/PATH`` -> (repo id, revision or None, file path)."""
    parts = uri[len("hf://"):].strip("/").split("/")
    if len(parts) < 3 or not all(parts):
        raise WeightsError(f"weights {uri}: expected hf://OWNER/REPO/FILE "
                           "(e.g. hf://acme/drn-cityscapes/drn_d_22.pth)")
    name, _, revision = parts[1].partition("@")
    return f"{parts[0]}/{name}", revision or None, "/".join(parts[2:])


def _from_hub(uri: str) -> str:
    repo_id, revision, filename = parse_hub_uri(uri)
    try:
        from huggingface_hub import hf_hub_download
    except ModuleNotFoundError:
        raise WeightsError(f"weights {uri}: hf:// needs huggingface_hub "
                           "(pip install huggingface_hub)") from None
    try:
        return hf_hub_download(repo_id, filename, revision=revision)
    except Exception as exc:  # noqa: BLE001 - the hub client raises many kinds; name the URI
        raise WeightsError(f"weights {uri}: cannot be downloaded from the Hub "
                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]})") from None
