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
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

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


class Predictor:
    """Wraps a segmentation model built by `drn.create_model`."""

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
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.device = pick_device(device)
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
        model = model.eval().to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        cfg = getattr(model, "drn_config", None)
        self.num_classes = int(cfg.num_classes) if cfg is not None else None
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255.0
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

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
        """N x H x W x 3 uint8 (RGB) on any device -> N x 3 x H x W float32 normalised."""
        x = batch_hwc_uint8.to(self.device, non_blocking=True)
        x = x.permute(0, 3, 1, 2).float()
        x = (x - self._mean) / self._std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _bucket(self, h: int, w: int) -> tuple[int, int]:
        if not self.size_bucket:
            return h, w
        b = self.size_bucket
        return -(-h // b) * b, -(-w // b) * b

    @torch.inference_mode()
    def _forward_same_size(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        sizes = {img.shape[:2] for img in images}
        if len(sizes) > 1:  # one size bucket, several sizes: pad each, label, crop back
            return self._forward_padded(images)
        host = torch.from_numpy(np.stack(images))
        if self.device.type == "cuda":
            host = host.pin_memory()
        x = self.normalise(host)
        bh, bw = self._bucket(*x.shape[2:])
        h, w = x.shape[2:]
        if (bh, bw) != (h, w):
            x = torch.nn.functional.pad(x, (0, bw - w, 0, bh - h))
        logits = self._logits(x)[:, :, :h, :w]
        return self._statistics(logits)

    @torch.inference_mode()
    def _forward_padded(self, images: Sequence[np.ndarray]) -> list[Prediction]:
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

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
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

    def _statistics(self, logits: torch.Tensor) -> list[Prediction]:
        """Softmax statistics, uncertainty and arg-max on the device; only masks, a few
        floats per image (and, when asked, block-averaged uint8 probabilities) come back."""
        n, c, h, w = logits.shape
        probs = torch.softmax(logits, dim=1)
        class_scores = probs.mean(dim=(2, 3))
        best = probs.max(dim=1)  # the mask's arg-max (the same tie-breaking as before v2)
        top = best.values
        confidence = top.mean(dim=(1, 2))
        second = probs.topk(2, dim=1).values[:, 1] if c > 1 else torch.zeros_like(top)
        margin = (top - second).mean(dim=(1, 2))
        uncertain = (top < 0.5).float().mean(dim=(1, 2))
        # -sum p log p from the log-probabilities (stable where p underflows to 0).
        entropy = -(probs * torch.log_softmax(logits, dim=1)).sum(dim=1).mean(dim=(1, 2))
        mask = best.indices  # N x H x W, int64
        offsets = torch.arange(n, device=mask.device).view(n, 1, 1) * c
        counts = torch.bincount((mask + offsets).reshape(-1), minlength=n * c).view(n, c)
        class_fraction = counts.float() / float(h * w)
        dtype = mask_dtype(c)
        # uint8 travels as is; a uint16 mask as int32 (torch's uint16 support is partial).
        mask_host = mask.to(torch.uint8 if dtype == np.uint8 else torch.int32).cpu().numpy()
        mask_host = mask_host.astype(dtype, copy=False)
        floats = torch.stack([confidence, entropy, margin, uncertain], dim=1).cpu().numpy()
        scores_host = class_scores.cpu().numpy().astype(np.float32)
        fraction_host = class_fraction.cpu().numpy().astype(np.float32)
        probs_host = None
        if self.probs_stride:
            stride = self.probs_stride
            # Blocks aligned to the top-left corner; the last row/column of blocks may be
            # partial (its mean is over the pixels it holds).
            small = torch.nn.functional.avg_pool2d(probs, stride, stride, ceil_mode=True)
            probs_host = (small * 255).round_().to(torch.uint8).cpu().numpy()
        return [
            Prediction(mask_host[i], scores_host[i], fraction_host[i], float(floats[i, 0]),
                       entropy=float(floats[i, 1]), margin=float(floats[i, 2]),
                       uncertain_fraction=float(floats[i, 3]),
                       probs=None if probs_host is None else probs_host[i])
            for i in range(n)
        ]

    def _forward_splitting(self, images: Sequence[np.ndarray]) -> list[Prediction]:
        try:
            return self._forward_same_size(images)
        except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
            if not _is_oom(exc):
                raise
            if self.device.type == "cuda":
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
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                preds = self._forward_splitting([images[i] for i in chunk])
                for i, pred in zip(chunk, preds):
                    results[i] = pred
        return results  # type: ignore[return-value]
