"""Checkpoints: one loader for every source and key layout, and the project's format.

``load_checkpoint(source)`` reads a local path, a ``file://`` URL, an ``http(s)://``
URL (downloaded once into a cache, sha256-checked when the file name carries a hash
prefix such as ``drn_d_22-4bd2f8ea.pth``) or a name from ``RELEASED_WEIGHTS``, always
with ``torch.load(weights_only=True)``. It recognises these layouts:

- ``drn-label/1``: the project's own format (``save_checkpoint``), with its metadata;
- ``authors-drnseg``: the authors' DRNSeg (``base.<i>.*``, ``seg.*``, ``up.weight``);
- ``authors-drn``: the authors' DRN-C/D ImageNet classifiers (``layer0.*`` or
  ``conv1.*``, ``layer1..8.*``, ``fc.*`` as a 1x1 conv);
- ``torchvision-resnet``: torchvision ResNet classifiers (load into DRN-A);

each of them possibly wrapped as the authors' training scripts save them
(``{"state_dict": {"module.<key>": ...}, "epoch": ..., "arch": ...}``: the wrapper
goes to ``meta``, the ``module.`` prefix is stripped) and possibly from before
BatchNorm had ``num_batches_tracked`` (filled with 0).

``load_into(model, checkpoint, arch=...)`` then fits the state dict to a model built by
``drn.create_model`` and fails with a ``CheckpointError`` that names what does not fit.
"""
from __future__ import annotations

import functools
import hashlib
import http.client
import logging
import os
import re
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.hub
from torch import nn

from drn.catalog import get_builder, list_models
from drn.errors import ModelError, Setting
from drn.io import atomic_write
from drn.labels import LabelSet, get_preset
from drn.seg import DRNSeg

__all__ = [
    "FORMAT",
    "Checkpoint",
    "CheckpointError",
    "ReleasedWeights",
    "RELEASED_WEIGHTS",
    "default_cache_dir",
    "cache_path",
    "load_checkpoint",
    "save_checkpoint",
    "load_into",
    "guess_architecture",
    "state_dict_sha256",
]

logger = logging.getLogger(__name__)

FORMAT = "drn-label/1"
# Parameters that belong to a head (and so depend on num_classes), not to a backbone.
HEAD_PREFIXES = ("fc.", "seg.", "up.")
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")
# torch.hub.download_url_to_file's hash_prefix failure: 'invalid hash value (expected "..", got "..")'
_TORCH_HUB_HASH_ERROR = re.compile(r'invalid hash value \(expected "[0-9a-f]*", got "([0-9a-f]+)"\)')
_SHOWN_KEYS = 5
DOWNLOAD_TIMEOUT_S = 60.0  # seconds a download may wait for the next bytes


class CheckpointError(ModelError):
    """A checkpoint cannot be read, or does not fit the model asked for."""


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint. ``state_dict`` is normalised (no ``module.`` prefix,
    ``num_batches_tracked`` present); ``meta`` holds whatever travelled with it
    (the project's metadata, the authors' ``epoch``/``arch``, or the release table's
    facts), ``None`` for a bare state dict; ``sha256`` is of the file's bytes."""

    state_dict: Mapping[str, torch.Tensor]
    meta: dict[str, Any] | None
    sha256: str
    source: str
    layout: str

    @property
    def task(self) -> str:
        """``"segment"`` when the file holds a DRNSeg, else ``"classify"``."""
        if any(k.startswith(("base.", "seg.", "up.")) for k in self.state_dict):
            return "segment"
        return "classify"

    @property
    def num_classes(self) -> int | None:
        """Rows of the file's head (``seg.weight`` or ``fc.weight``), if it has one."""
        for key in ("seg.weight", "fc.weight"):
            if key in self.state_dict:
                return int(self.state_dict[key].shape[0])
        return None

    @property
    def head_key(self) -> str | None:
        return next((k for k in ("seg.weight", "fc.weight") if k in self.state_dict), None)

    @property
    def arch(self) -> str | None:
        """The architecture the metadata names (project format, authors' training
        checkpoints, release table), if any."""
        arch = (self.meta or {}).get("arch")
        return arch if isinstance(arch, str) else None

    @property
    def label_set(self) -> LabelSet | None:
        data = (self.meta or {}).get("label_set")
        return LabelSet.from_dict(data) if data else None

    @property
    def temperature(self) -> float:
        """The temperature the logits are divided by (drn.calibration), 1.0 unless the
        checkpoint was calibrated."""
        from drn.calibration import check_temperature

        value = (self.meta or {}).get("temperature", 1.0)
        try:
            return check_temperature(value)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{self.source}: {exc}") from None


@dataclass(frozen=True)
class ReleasedWeights:
    """A published checkpoint: where it is and what it holds."""

    url: str
    arch: str
    task: str
    preset: str | None  # label set preset of its outputs


_YF = "http://dl.yf.io/drn/"  # the authors' mirror; their README links the Cityscapes models
_TORCHVISION = "https://download.pytorch.org/models/"


def _released() -> dict[str, ReleasedWeights]:
    table = {}
    for arch, file_name in [
        ("drn_c_26", "drn_c_26-ddedf421.pth"),
        ("drn_c_42", "drn_c_42-9d336e8c.pth"),
        ("drn_c_58", "drn_c_58-0a53a92c.pth"),
        ("drn_d_22", "drn_d_22-4bd2f8ea.pth"),
        ("drn_d_38", "drn_d_38-eebb45f0.pth"),
        ("drn_d_54", "drn_d_54-0e0534ff.pth"),
        ("drn_d_105", "drn_d_105-12b40979.pth"),
    ]:
        table[f"{arch}:imagenet"] = ReleasedWeights(_YF + file_name, arch, "classify", "imagenet")
    for arch in ("drn_d_22", "drn_d_38"):
        table[f"{arch}:cityscapes"] = ReleasedWeights(
            _YF + f"{arch}_cityscapes.pth", arch, "segment", "cityscapes")
    # torchvision's ResNet (V1) weights: trained without dilation, they fit DRN-A's keys.
    for arch, file_name in [
        ("drn_a_18", "resnet18-f37072fd.pth"),
        ("drn_a_34", "resnet34-b627a593.pth"),
        ("drn_a_50", "resnet50-0676ba61.pth"),
        ("drn_a_101", "resnet101-63fe2227.pth"),
        ("drn_a_152", "resnet152-394f9c45.pth"),
    ]:
        table[f"{arch}:torchvision-imagenet"] = ReleasedWeights(
            _TORCHVISION + file_name, arch, "classify", "imagenet")
    return table


# Name -> release; a name can be passed wherever a checkpoint source is accepted.
RELEASED_WEIGHTS: dict[str, ReleasedWeights] = _released()


def default_cache_dir() -> Path:
    """``$DRN_LABEL_CACHE`` or ``~/.cache/drn-label``."""
    return Path(os.environ.get("DRN_LABEL_CACHE") or Path.home() / ".cache" / "drn-label")


def sha256_file(path: Path) -> str:
    """sha256 of a file's bytes (what `load_checkpoint` reports as ``sha256``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _show_progress() -> bool:
    # A progress bar for a person at a terminal; none in logs, pipes and Ray workers.
    try:
        return sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def cache_path(url: str, cache_dir: Path | None = None) -> Path:
    """Where a download of ``url`` is kept in the cache (present or not): a hash-named
    file is its own identity; other names get a folder per URL."""
    file_name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name
    if not file_name:
        raise CheckpointError(f"{url}: the URL names no file; point it at a .pth file")
    folder = Path(cache_dir or default_cache_dir()) / "checkpoints"
    if _HASH_IN_NAME.search(file_name) is None:
        folder = folder / hashlib.sha256(url.encode()).hexdigest()[:16]
    return folder / file_name


def _download(url: str, cache_dir: Path) -> Path:
    """Fetch ``url`` into the cache once (``torch.hub.download_url_to_file``, with a
    progress bar when stderr is a terminal); concurrent workers are safe (each downloads
    into a private temporary file and renames it into place)."""
    dest = cache_path(url, cache_dir)
    folder, file_name = dest.parent, dest.name
    match = _HASH_IN_NAME.search(file_name)
    expected = match.group(1) if match else None
    if dest.is_file() and (expected is None or sha256_file(dest).startswith(expected)):
        return dest
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f".{file_name}.{os.getpid()}.{uuid.uuid4().hex}.part"
    try:
        logger.info("downloading %s to %s", url, dest)
        # torch.hub streams into its own temporary file next to `part`, checks the sha256
        # prefix, then moves it to `part`; the rename below puts the whole file in place.
        # torch.hub takes no timeout: bound every socket read of the download instead, so a
        # stalled server fails the call rather than hanging it.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
        try:
            torch.hub.download_url_to_file(url, str(part), hash_prefix=expected, progress=_show_progress())
        finally:
            socket.setdefaulttimeout(previous)
        os.replace(part, dest)
    except RuntimeError as exc:
        mismatch = _TORCH_HUB_HASH_ERROR.search(str(exc))
        if expected is None or mismatch is None:
            raise
        raise CheckpointError(
            f"{url}: sha256 mismatch: expected {expected}... (from the file name) but got "
            f"{mismatch.group(1)}; the download is corrupt or the file changed: retry, or check the URL"
        ) from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise CheckpointError(
            f"{url}: download failed ({exc}); check the URL and the network, or download "
            "the file yourself and pass its local path"
        ) from None
    finally:
        part.unlink(missing_ok=True)
    return dest


def _resolve(source: str | os.PathLike, cache_dir: Path | None) -> tuple[Path, ReleasedWeights | None]:
    text = os.fspath(source)
    released = RELEASED_WEIGHTS.get(text)
    if released is None:
        released = next((r for r in RELEASED_WEIGHTS.values() if r.url == text), None)
    url = released.url if released else text
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in ("http", "https"):
        return _download(url, Path(cache_dir) if cache_dir else default_cache_dir()), released
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise CheckpointError(f"{text}: file:// URLs must name a local file (file:///path)")
        path = Path(urllib.request.url2pathname(parsed.path))
    else:
        path = Path(text)
    if not path.is_file():
        raise CheckpointError.spelled(
            "{source}: no such file; pass a path, a file:// or http(s):// URL, or a released "
            "checkpoint's name ({examples}, ...; {list:weights} has them all)", source=text,
            examples=", ".join(list(RELEASED_WEIGHTS)[:3]))
    return path, released


def _plain(value: Any) -> Any:
    # Metadata values as plain Python (the authors store best_prec1 as a 0-d tensor).
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return value


def _unwrap(raw: Any, source: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None, bool]:
    """(state_dict, meta, is_project_format) from whatever ``torch.load`` returned."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(
            f"{source}: holds a {type(raw).__name__}, not a state dict; save "
            "model.state_dict() (or use drn.save_checkpoint)"
        )
    fmt = raw.get("format")
    if isinstance(fmt, str) and fmt.startswith("drn-label/"):
        if fmt != FORMAT:
            raise CheckpointError(
                f"{source}: format {fmt!r} is not supported by this version (reads {FORMAT!r}); "
                "upgrade drn-label"
            )
        if not isinstance(raw.get("state_dict"), Mapping):
            raise CheckpointError(f"{source}: a {fmt} file without a state_dict; the file is damaged")
        meta = {k: v for k, v in raw.items() if k != "state_dict"}
        return dict(raw["state_dict"]), meta, True
    if isinstance(raw.get("state_dict"), Mapping):  # a training checkpoint
        meta = {k: _plain(v) for k, v in raw.items() if k != "state_dict"}
        meta["wrapper"] = "training"
        return dict(raw["state_dict"]), meta, False
    not_tensors = [k for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"{source}: not a state dict (keys {not_tensors[:_SHOWN_KEYS]} are not tensors) "
            "and no 'state_dict' entry; save model.state_dict() (or use drn.save_checkpoint)"
        )
    return dict(raw), None, False


def _normalise(state_dict: dict[str, torch.Tensor], meta: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    if state_dict and all(k.startswith("module.") for k in state_dict):  # nn.DataParallel
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
        if meta is not None:
            meta["stripped_prefix"] = "module."
    # Files saved before PyTorch 0.4.1 have no BatchNorm num_batches_tracked.
    for key in [k for k in state_dict if k.endswith(".running_var")]:
        counter = key[: -len("running_var")] + "num_batches_tracked"
        state_dict.setdefault(counter, torch.tensor(0, dtype=torch.long))
    return state_dict


def _layout(state_dict: Mapping[str, torch.Tensor], own_format: bool) -> str:
    if own_format:
        return FORMAT
    if any(k.startswith(("base.", "seg.")) for k in state_dict):
        return "authors-drnseg"
    if any(k.startswith("layer5.") for k in state_dict):
        return "authors-drn"
    fc = state_dict.get("fc.weight")
    if "conv1.weight" in state_dict and any(k.startswith("layer4.") for k in state_dict) and (
        fc is None or fc.dim() == 2
    ):
        return "torchvision-resnet"
    return "unknown"


def load_checkpoint(source: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Checkpoint:
    """Read a checkpoint from a path, ``file://`` / ``http(s)://`` URL, or a
    ``RELEASED_WEIGHTS`` name. Downloads go to ``cache_dir`` (default
    ``default_cache_dir()``) and are verified against the sha256 prefix in the file
    name when there is one. Only tensors and plain containers are unpickled
    (``weights_only=True``)."""
    text = os.fspath(source)
    path, released = _resolve(source, Path(cache_dir) if cache_dir else None)
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights only load failed" in first_line.lower():
            # torch's own advice is to load unsafely; never pass that on.
            first_line = "it holds Python objects other than tensors"
        raise CheckpointError(
            f"{text}: cannot be read with torch.load(weights_only=True) ({first_line}); "
            "it must be a PyTorch file holding tensors and plain containers only"
        ) from None
    state_dict, meta, own = _unwrap(raw, text)
    if released is not None:
        meta = dict(meta or {})
        meta.setdefault("arch", released.arch)
        if released.preset:
            meta.setdefault("label_set", get_preset(released.preset).to_dict())
        meta["released"] = released.url
    state_dict = _normalise(state_dict, meta)
    return Checkpoint(
        state_dict=state_dict,
        meta=meta,
        sha256=sha256_file(path),
        source=text,
        layout=_layout(state_dict, own),
    )


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write ``model`` (built by ``drn.create_model``) in the project's format:
    ``{"format": "drn-label/1", "arch", "task", "num_classes", "label_set",
    "state_dict"}`` (and ``"temperature"`` when it is not 1), so ``create_model(arch, weights=path)`` needs nothing else.
    The file is written to a temporary name and renamed into place
    (``drn.io.atomic_write``)."""
    config = getattr(model, "drn_config", None)
    if config is None:
        raise ValueError("save_checkpoint needs a model built by drn.create_model (it has no drn_config)")
    payload = {
        "format": FORMAT,
        "arch": config.arch,
        "task": config.task,
        "num_classes": config.num_classes,
        "label_set": config.label_set.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    if config.temperature != 1.0:
        payload["temperature"] = float(config.temperature)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def state_dict_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the state dict in sorted key order: for each key its UTF-8 name,
    dtype, shape and the tensor's raw (native-endian, contiguous) bytes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------
# Fitting a checkpoint to a model


@functools.lru_cache(maxsize=None)
def _signatures(arch: str) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """Backbone key -> shape of ``arch`` in both layouts (segmentation ``base.<i>``
    and classifier names), from models built on the meta device."""
    builder = get_builder(arch)
    with torch.device("meta"):
        backbone = builder(num_classes=None)
        seg = DRNSeg(builder(num_classes=None), 1)
    classifier = {k: tuple(v.shape) for k, v in backbone.state_dict().items()}
    base = {k: tuple(v.shape) for k, v in seg.state_dict().items() if k.startswith("base.")}
    return base, classifier


def guess_architecture(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Registered architectures whose backbone has exactly the keys and shapes of
    ``state_dict`` (its head ignored), in either layout."""
    body = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    return [arch for arch in list_models() if body in _signatures(arch)]


def _classifier_to_base(state_dict: Mapping[str, torch.Tensor], base_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Rename classifier keys (``layer3.0.conv1.weight``) to segmentation keys
    (``base.5.0.conv1.weight``); the classifier's ``fc`` is dropped. Unknown prefixes
    are kept as they are (and reported as unexpected)."""
    index = {name: i for i, name in enumerate(base_names)}
    out = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        head, _, rest = key.partition(".")
        out[f"base.{index[head]}.{rest}" if head in index else key] = value
    return out


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (", ..." if len(keys) > _SHOWN_KEYS else "")


def load_into(model: nn.Module, checkpoint: Checkpoint, *, arch: str, copy: bool = True) -> bool:
    """Load ``checkpoint`` into ``model`` (a ``DRNSeg`` or a backbone classifier of
    architecture ``arch``) strictly. A classifier checkpoint loads into a segmentation
    model's backbone (all of it), leaving the head as initialised; returns whether the
    checkpoint covered the whole model. Raises ``CheckpointError`` naming what does
    not fit: missing/unexpected keys, shapes, and the architecture the file looks like.

    A model built on the meta device takes the checkpoint's tensors themselves
    (``assign=True``; copies when ``copy`` is true, so models never share storage
    with a ``Checkpoint`` the caller keeps).
    """
    task = "segment" if isinstance(model, DRNSeg) else "classify"
    source = checkpoint.source
    target = model.state_dict()
    state_dict = dict(checkpoint.state_dict)
    backbone_only = False
    if task == "classify" and checkpoint.task == "segment":
        raise CheckpointError(
            f"{source}: holds a segmentation model (keys base.*, seg.*, up.weight), not a "
            f"classifier; create {arch} with task='segment'"
        )
    if task == "segment" and checkpoint.task == "classify":
        state_dict = _classifier_to_base(state_dict, model.base_names)
        target = {k: v for k, v in target.items() if k.startswith("base.")}
        backbone_only = True

    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    mismatched = [k for k in target if k in state_dict and state_dict[k].shape != target[k].shape]
    if not missing and not unexpected and mismatched and all(k.startswith(HEAD_PREFIXES) for k in mismatched):
        expected_classes = target[checkpoint.head_key].shape[0]
        raise CheckpointError(
            f"{source}: num_classes conflict: expected {expected_classes} (the model) but got "
            f"{checkpoint.num_classes} from the checkpoint's {checkpoint.head_key}"
        )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({_first(missing)})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({_first(unexpected)})")
        if mismatched:
            shapes = [
                f"{k} {list(state_dict[k].shape)} vs {list(target[k].shape)}" for k in mismatched
            ]
            problems.append(f"{len(mismatched)} shape mismatches, checkpoint vs model ({_first(shapes)})")
        guesses = [g for g in guess_architecture(checkpoint.state_dict) if g != arch]
        hint = ("the file looks like {guesses}: use {use}" if guesses
                else "the file matches no registered architecture")
        raise CheckpointError.spelled(
            "{source}: the weights do not fit {arch} (task {task!r}): {problems}; " + hint,
            source=source, arch=arch, task=task, problems="; ".join(problems),
            guesses=" or ".join(guesses), use=Setting("model", guesses[0]) if guesses else None)

    if backbone_only:
        model.base.load_state_dict({k[len("base."):]: v for k, v in state_dict.items()}, strict=True)
        logger.warning(
            "%s: loaded only the backbone from %s (a classifier checkpoint); the segmentation "
            "head (seg, up) keeps its seeded initialisation, so its masks mean nothing until "
            "the head is trained", arch, source,
        )
    elif any(t.is_meta for t in target.values()):
        # A model built on the meta device takes the checkpoint's tensors as they are
        # (as float32 where they are floating point: fp16 files give fp32 models).
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}
        if copy:
            tensors = {k: v.clone() for k, v in tensors.items()}
        model.load_state_dict(tensors, strict=True, assign=True)
    else:
        model.load_state_dict(state_dict, strict=True)
    return not backbone_only
