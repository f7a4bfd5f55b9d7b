"""The predictor core: RGB uint8 images in, masks and class statistics out.

Plain PyTorch (no Ray, no I/O), so it runs and is benchmarked on a GPU machine alone.

- Images are grouped by exact size, so a mask never depends on which other images share
  its batch (padding a small image onto a larger canvas would change a DRN's output near
  the edges). The model itself pads each batch to a multiple of 8 and crops back.
- Normalisation, softmax, the statistics and the arg-max run on the device; only the
  mask (``drn.labels.mask_dtype``: uint8, or uint16 above 256 classes), C floats and three
  uncertainty figures per image come back (mean per-pixel entropy in nats, mean margin
  between the two most probable classes, share of pixels whose top probability is below
  0.5): the figures a labelling team sorts by to pick what people should check.
- Keeping an accelerator busy: the batches of one `predict` call form a pipeline. While
  the device runs batch k, batch k+1 is copied in on a side stream from a reused pinned
  host buffer (uint8: a quarter of the bytes of the normalised floats), and batch k-1's
  results are copied out on a third stream into pinned buffers and turned into
  `Prediction`s. On a CPU the same steps run in order.
- The statistics avoid the reductions that are slow along the class dimension (arg-max
  with indices, top-k): the arg-max is the first class equal to the maximum (the same
  tie-breaking as ``argmax``), the second-best probability a masked maximum, and the
  log-sum-exp comes from the softmax's top probability. ``compile=True`` compiles the
  model and the statistics together with ``torch.compile`` (falling back to eager
  execution, with a warning, where compilation fails).
- The module given is never changed: when the device, memory format or mode must
  change, the predictor runs a copy.
- ``probs_stride=S`` (opt-in) also brings back the class probabilities, averaged over
  S x S pixel blocks and quantised to uint8 (value / 255) on the device: C x ceil(H/S) x
  ceil(W/S) bytes. S = 8 is the model's own output stride (DRN computes its logits at 1/8
  resolution and up-samples them bilinearly), so little is lost at a 64th of the size.
- Out of memory: the batch is split in halves and retried; an image that alone does not
  fit becomes a failed `Prediction` naming the memory it needed.
- Collections where nearly every image has its own size (web crawls) batch poorly by
  exact size. ``size_bucket=B`` pads each image (after normalisation, with zeros, as the
  model's own pad to a multiple of 8 does) up to the next multiple of B and batches
  images of the same padded shape. The padding depends only on the image's own size, so
  masks still do not depend on batch neighbours; they can differ from exact-size
  inference near the bottom and right edges (docs/benchmarks.md measures by how much).
- Test-time augmentation (opt-in, as the authors evaluated): log-probabilities averaged
  over input scales and optionally a horizontal flip, all on the device.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from drn.calibration import check_temperature
from drn.labels import IMAGENET_MEAN, IMAGENET_STD, mask_dtype

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


@dataclass(frozen=True)
class Prediction:
    """One image's result. ``error`` is set (and the rest None) when it could not be labelled."""

    mask: np.ndarray | None
    class_scores: np.ndarray | None  # float32, length C, sums to 1
    class_fraction: np.ndarray | None  # float32, length C, the mask's histogram / pixels
    confidence: float | None  # mean over pixels of the top softmax probability
    error: str | None = None
    entropy: float | None = None  # mean over pixels of -sum(p log p), in nats (0 .. ln C)
    margin: float | None = None  # mean over pixels of top-1 minus top-2 probability
    uncertain_fraction: float | None = None  # share of pixels whose top probability < 0.5
    probs: np.ndarray | None = None  # uint8 C x h x w (probability * 255), with probs_stride


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg
        or isinstance(exc, MemoryError)
    )


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU that has it (fp16 on older ones), fp32 on a CPU (mixed
    precision on a CPU is slower than fp32 without matrix extensions). bf16 asked of a
    GPU without it becomes fp16."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        log.warning("%s has no bf16: using fp16", torch.cuda.get_device_name(device))
        return "fp16"
    return precision


def device_statistics(logits: torch.Tensor, num_classes: int, probs_stride: int | None):
    """The per-image results of an N x C x H x W batch of float logits, on their device:
    the mask (N x H x W, uint8 up to 255 classes, else int32; the first class of the
    largest logit, as ``argmax``), and
    N x 4 floats (confidence, entropy, margin, uncertain fraction), the N x C mean
    probabilities, and (with ``probs_stride``) the block-averaged probabilities as uint8.

    Written with the reductions that are fast along the class dimension on every device
    (max and sum, not arg-max or top-k), so that `Predictor(compile=True)` fuses it too.
    """
    c = num_classes
    top_logit = logits.amax(dim=1, keepdim=True)
    # The first class at the maximum: weights C .. 1 on the maxima, the largest wins.
    wtype = torch.uint8 if c <= 255 else torch.int32
    weights = torch.arange(c, 0, -1, dtype=wtype, device=logits.device).view(1, c, 1, 1)
    weighted = (logits == top_logit) * weights
    best = weighted.amax(dim=1, keepdim=True)
    mask = (c - best).squeeze(1)
    probs = torch.softmax(logits, dim=1)
    top = probs.amax(dim=1)
    if c > 1:  # without the first top class; a class tied with it keeps the margin at 0
        second = probs.masked_fill(weighted == best, 0.0).amax(dim=1)
    else:
        second = torch.zeros_like(top)
    # -sum p log p = lse - sum p * logit, with lse = top logit - log(top probability).
    lse = top_logit.squeeze(1) - torch.log(top)
    entropy = (lse - (probs * logits).sum(dim=1)).clamp_min_(0.0)
    floats = torch.stack([top.mean(dim=(1, 2)), entropy.mean(dim=(1, 2)),
                          (top - second).mean(dim=(1, 2)), (top < 0.5).float().mean(dim=(1, 2))],
                         dim=1)
    class_scores = probs.mean(dim=(2, 3))
    small = None
    if probs_stride:
        # Blocks aligned to the top-left corner; the last row/column of blocks may be
        # partial (its mean is over the pixels it holds).
        small = torch.nn.functional.avg_pool2d(probs, probs_stride, probs_stride, ceil_mode=True)
        small = (small * 255).round_().to(torch.uint8)
    return mask, floats, class_scores, small


class _PinnedPool:
    """Reused page-locked host buffers, so no batch pays for pinning fresh memory: two per
    role (the input, each kind of result) and shape, used in turn. A batch's buffers are
    filled while the previous batch's are still copied or read, never later: `predict`
    launches batch k before it collects batch k-1, and stages k+1 while k's copy runs."""

    def __init__(self) -> None:
        self._slots: dict[tuple, list] = {}

    def take(self, role: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        key = (role, tuple(shape), dtype)
        slots = self._slots.setdefault(key, [])
        if len(slots) < 2:
            buf = [torch.empty(shape, dtype=dtype, pin_memory=True), None]
            slots.append(buf)
        else:
            buf = slots.pop(0)
            slots.append(buf)
            if buf[1] is not None:
                buf[1].synchronize()  # its last copy must be done before it is refilled
        return buf[0]

    def used_until(self, tensor: torch.Tensor, event) -> None:
        for slots in self._slots.values():
            for buf in slots:
                if buf[0] is tensor:
                    buf[1] = event


@dataclass
class _Staged:
    """A batch on its way to the device."""

    indices: list[int]
    images: list[np.ndarray]
    host: torch.Tensor  # N x H x W x 3 uint8
    ready: object = None  # the copy stream's event, on CUDA


@dataclass
class _Launched:
    """A batch whose results are on their way back to the host."""

    indices: list[int]
    sizes: list[tuple[int, int]]
    outputs: tuple  # host tensors (pinned on CUDA)
    done: object = None  # the copy-out stream's event, on CUDA
    failed: list | None = None  # Predictions, when the batch took the out-of-memory path


class Predictor:
    """Wraps a segmentation model built by `drn.create_model` (or any module mapping a
    normalised N x 3 x H x W batch to N x C x H x W logits)."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device | None = "auto",
        precision: str = "fp32",
        channels_last: bool | None = None,
        batch_size: int = 4,
        size_bucket: int | None = None,
        tta_scales: Sequence[float] | None = None,
        tta_flip: bool = False,
        probs_stride: int | None = None,
        compile: bool = False,  # noqa: A002 - torch's word for it
        temperature: float | None = None,
    ) -> None:
        self.device = pick_device(device)
        precision = pick_precision(precision, self.device)
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} or auto, got {precision!r}")
        if self.device.type == "cpu" and precision == "fp16":
            # fp16 convolutions on CPU are slow or unsupported; bf16 is the CPU's mixed precision.
            raise ValueError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        self.precision = precision
        self.batch_size = max(1, int(batch_size))
        if size_bucket is not None and size_bucket < 8:
            raise ValueError(f"size_bucket must be at least 8 pixels, got {size_bucket}")
        self.size_bucket = size_bucket
        if tta_scales is not None and (not tta_scales or min(tta_scales) <= 0):
            raise ValueError(f"tta_scales must be positive numbers, got {list(tta_scales)}")
        self.tta_scales = tuple(float(s) for s in tta_scales) if tta_scales else None
        self.tta_flip = bool(tta_flip)
        if probs_stride is not None and probs_stride < 1:
            raise ValueError(f"probs_stride must be at least 1 pixel, got {probs_stride}")
        self.probs_stride = probs_stride
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.model = _runnable(model, self.device, self.channels_last)
        cfg = getattr(model, "drn_config", None)
        self.num_classes = int(cfg.num_classes) if cfg is not None else None
        # Logits are divided by the model's calibrated temperature (drn.calibration) before
        # any probability: the masks stay the same, the confidences become honest.
        self.temperature = check_temperature(
            getattr(cfg, "temperature", 1.0) if temperature is None else temperature)
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        # The same constants for the channels-last (N x H x W x 3) layout images arrive in.
        self._mean_hwc = self._mean.view(3)
        self._inv_std_hwc = 1.0 / self._std.view(3)
        self._inv_std = 1.0 / self._std
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            torch.backends.cudnn.benchmark = True
            self._copy_in = torch.cuda.Stream(self.device)
            self._copy_out = torch.cuda.Stream(self.device)
            self._pinned = _PinnedPool()
        self._step = self._device_step
        if compile:
            try:
                self._step = torch.compile(self._device_step)
            except Exception as exc:  # noqa: BLE001 - no compiler here: run eagerly
                log.warning("torch.compile is not available (%s); running eagerly", exc)
        self._compiled = self._step is not self._device_step

    @classmethod
    def from_model(cls, model: torch.nn.Module, **kwargs) -> "Predictor":
        """Use the model's own label set for mean/std (ImageNet's for a module that was
        not built by ``drn.create_model``)."""
        cfg = getattr(model, "drn_config", None)
        label_set = getattr(cfg, "label_set", None)
        mean = label_set.mean if label_set is not None else IMAGENET_MEAN
        std = label_set.std if label_set is not None else IMAGENET_STD
        return cls(model, mean=mean, std=std, **kwargs)

    # -- the device part ---------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def normalise(self, batch_hwc_uint8: torch.Tensor) -> torch.Tensor:
        """N x H x W x 3 uint8 (RGB) on any device -> N x 3 x H x W float32 normalised.

        Channels-last: normalised in the layout the images arrive in, then viewed as
        N x 3 x H x W without a copy. Contiguous: the uint8 pixels are reordered first (a
        quarter of the bytes of floats), then converted and normalised in place."""
        x = batch_hwc_uint8.to(self.device, non_blocking=True)
        if self.channels_last:
            return x.float().sub_(self._mean_hwc).mul_(self._inv_std_hwc).permute(0, 3, 1, 2)
        x = x.permute(0, 3, 1, 2).contiguous().float()
        return x.sub_(self._mean).mul_(self._inv_std)

    def _bucket(self, h: int, w: int) -> tuple[int, int]:
        if not self.size_bucket:
            return h, w
        b = self.size_bucket
        return -(-h // b) * b, -(-w // b) * b

    def _device_step(self, host_uint8: torch.Tensor):
        """Normalise, pad to the size bucket, forward, statistics: one batch of one size."""
        x = self.normalise(host_uint8)
        h, w = x.shape[2:]
        bh, bw = self._bucket(h, w)
        if (bh, bw) != (h, w):
            x = torch.nn.functional.pad(x, (0, bw - w, 0, bh - h))
        logits = self._logits(x)[:, :, :h, :w]
        return device_statistics(logits, logits.shape[1], self.probs_stride)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits for a normalised batch, divided by the temperature."""
        logits = self._raw_logits(x)
        return logits if self.temperature == 1.0 else logits.div_(self.temperature)

    def _raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits for a normalised batch; with TTA, the mean over scales
        (and flips) of the log-probabilities, resized back to the input size."""
        if not self.tta_scales and not self.tta_flip:
            with self._autocast():
                return self.model(x).float()
        h, w = x.shape[2:]
        total, count = None, 0
        for scale in self.tta_scales or (1.0,):
            size = (max(8, round(h * scale)), max(8, round(w * scale)))
            xs = x if size == (h, w) else torch.nn.functional.interpolate(
                x, size=size, mode="bilinear", align_corners=False)
            for flip in ((False, True) if self.tta_flip else (False,)):
                inp = torch.flip(xs, dims=[3]) if flip else xs
                with self._autocast():
                    out = self.model(inp).float()
                if flip:
                    out = torch.flip(out, dims=[3])
                if out.shape[2:] != (h, w):
                    out = torch.nn.functional.interpolate(out, size=(h, w), mode="bilinear",
                                                          align_corners=False)
                logp = torch.log_softmax(out, dim=1)
                total = logp if total is None else total + logp
                count += 1
        return total / count

    def _run_step(self, host_uint8: torch.Tensor):
        if self._compiled:
            try:
                return self._step(host_uint8)
            except Exception as exc:  # noqa: BLE001 - a graph the compiler cannot take
                if _is_oom(exc):
                    raise
                log.warning("torch.compile failed (%s); running eagerly from now on",
                            str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                self._step, self._compiled = self._device_step, False
        return self._device_step(host_uint8)

    # -- the pipeline of one call ------------------------------------------------------
    def _stage(self, indices: list[int], images: list[np.ndarray]) -> _Staged:
        """Stack a batch (into a reused pinned buffer on CUDA) and start its copy in."""
        h, w = images[0].shape[:2]
        if not self._cuda:
            return _Staged(indices, images, torch.from_numpy(np.stack(images)))
        host = self._pinned.take("images", (len(images), h, w, 3), torch.uint8)
        np.stack(images, out=host.numpy())
        with torch.cuda.stream(self._copy_in):
            dev = host.to(self.device, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self._copy_in)
        self._pinned.used_until(host, ready)
        return _Staged(indices, images, dev, ready)

    @torch.inference_mode()
    def _launch(self, staged: _Staged, *, split_on_oom: bool = True) -> _Launched:
        """Run a staged batch and start copying its results out. Out of memory, the batch
        is labelled in halves (`_forward_splitting`) unless the caller does that itself."""
        sizes = [img.shape[:2] for img in staged.images]
        try:
            if self._cuda:
                torch.cuda.current_stream(self.device).wait_event(staged.ready)
                staged.host.record_stream(torch.cuda.current_stream(self.device))
            outputs = self._device_outputs(*self._run_step(staged.host))
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_oom(exc) or not split_on_oom:
                raise
            return _Launched(staged.indices, sizes, (), failed=self._after_oom(staged.images))
        if not self._cuda:
            return _Launched(staged.indices, sizes, tuple(t.cpu() if t is not None else None
                                                          for t in outputs))
        done_computing = torch.cuda.Event()
        done_computing.record(torch.cuda.current_stream(self.device))
        host = []
        with torch.cuda.stream(self._copy_out):
            self._copy_out.wait_event(done_computing)
            for role, t in zip(("mask", "floats", "scores", "fraction", "probs"), outputs):
                if t is None:
                    host.append(None)
                    continue
                t.record_stream(self._copy_out)
                buf = self._pinned.take(role, tuple(t.shape), t.dtype)
                buf.copy_(t, non_blocking=True)
                host.append(buf)
            done = torch.cuda.Event()
            done.record(self._copy_out)
        for buf in host:
            if buf is not None:
                self._pinned.used_until(buf, done)
        return _Launched(staged.indices, sizes, tuple(host), done)

    def _device_outputs(self, mask, floats, class_scores, probs):
        """Masks as uint8 (uint16 masks travel as int32: torch's uint16 is partial) and the
        class fractions from a per-image histogram, still on the device."""
        n, c = class_scores.shape
        small = mask.to(torch.uint8) if c <= 256 else mask
        counts = torch.stack([torch.bincount(small[i].reshape(-1), minlength=c) for i in range(n)])
        fraction = counts.float() / float(mask.shape[1] * mask.shape[2])
        return small, floats.float(), class_scores.float(), fraction, probs

    def _collect(self, launched: _Launched) -> list[Prediction]:
        """Wait for a batch's results on the host and make its Predictions (copied out of
        the reused buffers)."""
        if launched.failed is not None:
            return launched.failed
        if launched.done is not None:
            launched.done.synchronize()
        mask, floats, scores, fraction, probs = launched.outputs
        c = scores.shape[1]
        masks = mask.numpy().astype(mask_dtype(c), copy=True)
        floats, scores, fraction = floats.numpy().copy(), scores.numpy().copy(), fraction.numpy().copy()
        probs = probs.numpy().copy() if probs is not None else None
        return [
            Prediction(masks[i], scores[i], fraction[i], float(floats[i, 0]),
                       entropy=float(floats[i, 1]), margin=float(floats[i, 2]),
                       uncertain_fraction=float(floats[i, 3]),
                       probs=None if probs is None else probs[i])
            for i in range(len(launched.indices))
        ]

    def _statistics(self, logits: torch.Tensor) -> list[Prediction]:
        """Predictions from an N x C x H x W batch of logits (the statistics alone)."""
        n = logits.shape[0]
        outputs = self._device_outputs(*device_statistics(logits.float(), logits.shape[1],
                                                          self.probs_stride))
        host = tuple(t.cpu() if t is not None else None for t in outputs)
        return self._collect(_Launched(list(range(n)), [], host))

    @torch.inference_mode()
    def _forward_padded(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Images of several sizes in one size bucket: pad each, label, crop back."""
        bh, bw = self._bucket(*images[0].shape[:2])
        parts = []
        for img in images:
            x = self.normalise(torch.from_numpy(np.ascontiguousarray(img)).unsqueeze(0))
            parts.append(torch.nn.functional.pad(x, (0, bw - x.shape[3], 0, bh - x.shape[2])))
        logits = self._logits(torch.cat(parts))
        out: list[Prediction] = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            out.extend(self._statistics(logits[i:i + 1, :, :h, :w]))
        return out

    def _forward_one_size(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        if len({img.shape[:2] for img in images}) > 1:
            return self._forward_padded(images)
        staged = self._stage(list(range(len(images))), list(images))
        return self._collect(self._launch(staged, split_on_oom=False))

    def _forward_splitting(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        try:
            return self._forward_one_size(images)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_oom(exc):
                raise
            return self._after_oom(images)

    def _after_oom(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """A batch that ran out of memory: its halves, or the error of an image alone."""
        if self._cuda:
            torch.cuda.empty_cache()
        if len(images) == 1:
            h, w = images[0].shape[:2]
            need = self.estimate_bytes(h, w)
            return [Prediction(None, None, None, None,
                               error=f"out of memory labelling a {w}x{h} image "
                                     f"(needs about {need / 2**20:.0f} MiB on {self.device.type}); "
                                     f"lower --max-side")]
        half = len(images) // 2
        log.warning("out of memory on a batch of %d; retrying as %d + %d",
                    len(images), half, len(images) - half)
        return self._forward_splitting(images[:half]) + self._forward_splitting(images[half:])

    def batch_limit(self, height: int, width: int) -> int:
        """Images of this size per forward pass: `batch_size`, fewer when half the device's
        free memory would not hold their activations (`estimate_bytes`)."""
        if not self._cuda:
            return self.batch_size
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int(0.5 * free // max(self.estimate_bytes(height, width), 1))
        return max(1, min(self.batch_size, fits))

    def estimate_bytes(self, height: int, width: int) -> int:
        """A rough size of one image's activations: the figure an OOM error reports."""
        c = self.num_classes or 1
        h8, w8 = -(-height // 8) * 8, -(-width // 8) * 8
        # input, stage-1/2 activations (16+32 channels at full size), logits and probabilities
        return int(4 * h8 * w8 * (3 + 2 * 16 + 2 * 32 + 3 * c))

    # -- the public part ---------------------------------------------------------------
    def predict(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        """Label H x W x 3 uint8 RGB images of any sizes; results in input order."""
        for i, img in enumerate(images):
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"image {i}: expected H x W x 3 uint8 RGB, got shape {img.shape} dtype {img.dtype}"
                )
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault(self._bucket(*img.shape[:2]), []).append(i)
        results: list[Prediction | None] = [None] * len(images)
        batches = []
        for idx in groups.values():
            step = self.batch_limit(*images[idx[0]].shape[:2])
            batches += [idx[start:start + step] for start in range(0, len(idx), step)]
        same_size = [b for b in batches if len({images[i].shape[:2] for i in b}) == 1]
        for chunk in batches:  # mixed sizes in one bucket: padded, batch by batch
            if chunk not in same_size:
                for i, pred in zip(chunk, self._forward_splitting([images[i] for i in chunk])):
                    results[i] = pred
        # Same-size batches in a pipeline: stage k+1 and collect k-1 while k runs.
        pending: _Launched | None = None
        staged = self._stage(same_size[0], [images[i] for i in same_size[0]]) if same_size else None
        for k in range(len(same_size)):
            current = staged
            following = same_size[k + 1] if k + 1 < len(same_size) else None
            staged = self._stage(following, [images[i] for i in following]) if following else None
            launched = self._launch(current)
            if pending is not None:
                for i, pred in zip(pending.indices, self._collect(pending)):
                    results[i] = pred
            pending = launched
        if pending is not None:
            for i, pred in zip(pending.indices, self._collect(pending)):
                results[i] = pred
        return results  # type: ignore[return-value]


def _runnable(model: torch.nn.Module, device: torch.device, channels_last: bool) -> torch.nn.Module:
    """`model` in eval mode, on `device`, in the memory format asked for: the module
    itself when it already is, else a copy (the caller's module is never changed)."""
    tensors = [*model.parameters(), *model.buffers()]
    moves = any(t.device != device for t in tensors)
    reformat = channels_last and any(
        p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in tensors)
    if not (model.training or moves or reformat):
        return model
    model = copy.deepcopy(model).eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model
