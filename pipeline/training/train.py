"""Train or fine-tune a DRN segmentation model on a folder of images and masks.

The folder is the layout ``pipeline.training.synth`` writes, which is also what users produce
from their own labels::

    DATA/images/<id>.<png|jpg|...>   RGB images
    DATA/masks/<id>.png              one channel, class index per pixel, 255 = ignore
    DATA/classes.json                {"classes": [...], "palette", "mean", "std"} (optional
                                     when ``classes=`` is given)

Recipe (the authors' ``segment.py``): random scale (bilinear image, nearest mask; the
authors used [0.5, 2], the default here is [0.5, 1.5], which suits small images),
random crop to ``size`` padding the mask with the ignore index (the image with its mean
colour), horizontal flip, normalisation with the label set's mean/std (measured on the
training images when the classes file has none, and stored in the checkpoint), SGD with
momentum and weight decay, the "poly" schedule ``lr * (1 - iteration / max_iterations)
** 0.9`` applied every iteration, and cross-entropy that skips the ignore index.

Defaults that work without tuning (a user who does not know the right flags should still
get a good model):

- **Validation**: without ``val_dir``, ``val_split`` of the images (10%, at least one,
  chosen by ``seed``) are held out and scored (mIoU at full size) after every epoch.
- **Best epoch kept**: ``out`` holds the weights of the epoch with the best validation
  mIoU, not the last one.
- **Early stop**: in the second half of the schedule, training ends when validation mIoU
  has not improved for ``patience`` epochs, so ``epochs`` is a ceiling rather than a
  guess. Not in the first half: a model trained on few images often predicts only the
  commonest class for several epochs (a flat validation mIoU while the loss falls), and
  the poly schedule's rate is still high there.
- **Learning rate**: ``lr=None`` picks one: 0.05 for batch 8 from scratch, scaled
  linearly with the batch size (the linear scaling rule), and half of that when
  fine-tuning a segmentation checkpoint of the same classes (``init``), which already
  sits nearer a good minimum. If the loss turns non-finite the run restarts from its
  initial weights with a quarter of the rate (twice at most).

Files: ``out`` is the project's checkpoint (``drn.save_checkpoint``, with the label set),
rewritten whenever an epoch is the best so far, so it is usable at any time;
``<out>.state`` holds what resuming needs (current model, optimizer, epoch, history, the
best epoch), written atomically after every epoch. When training finishes (the last
epoch, or an early stop) the state shrinks to a record of the run (no tensors), so
calling ``train`` again with the same arguments does nothing, and with more epochs a run
that was not stopped early continues from ``out`` with fresh momentum.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from drn.io import atomic_write
from drn.metrics import ConfusionMatrix
from pipeline.store.decode import decode_image
from pipeline.training.threads import ThreadTuner, candidate_counts

if TYPE_CHECKING:
    import drn

STATE_FORMAT = "drn-label-train/1"
HEAD_INIT_STD = 0.01
BASE_LR = 0.05
"""Learning rate for batch 8 from scratch; measured in docs/labelling-loop.md and the README."""
FINE_TUNE_LR_FACTOR = 0.5
MIN_SPLIT_IMAGES = 10
"""Below this many images no validation split is held out (every image is needed to train)."""
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class EpochStats:
    epoch: int  # 1-based
    loss: float  # mean training loss over the epoch's batches
    lr: float  # learning rate at the epoch's last iteration
    seconds: float
    images_per_second: float
    val_miou: float | None = None


class DivergedError(FloatingPointError):
    """The loss became non-finite: the learning rate is too high for this data."""

    def __init__(self, message: str, lr: float) -> None:
        super().__init__(message)
        self.lr = lr


@dataclass(frozen=True)
class Calibration:
    """The temperature stored with the checkpoint and what it did on the validation pixels."""

    temperature: float
    pixels: int
    ece_before: float  # expected calibration error of the raw logits
    ece_after: float  # ... of the logits divided by the temperature


@dataclass(frozen=True)
class TrainResult:
    checkpoint: Path
    arch: str
    epochs: int  # epochs completed in total (this call and the ones it resumed)
    iterations: int
    resumed_from: int  # epochs already done when this call started
    seconds: float  # training time of this call
    label_set: "drn.LabelSet"  # the label set stored in the checkpoint
    history: tuple[EpochStats, ...]
    best_epoch: int | None = None  # the epoch whose weights `checkpoint` holds (None: the last)
    stopped_early: bool = False
    lr: float | None = None  # the base learning rate used
    calibration: "Calibration | None" = None  # fitted on the validation images (None: none held out)

    @property
    def best_miou(self) -> float | None:
        if self.best_epoch is None:
            return None
        return next((h.val_miou for h in self.history if h.epoch == self.best_epoch), None)

    @property
    def loss(self) -> float | None:
        return self.history[-1].loss if self.history else None

    @property
    def val_miou(self) -> float | None:
        return self.history[-1].val_miou if self.history else None


# ---------------------------------------------------------------------------------------
# Data


def split_validation(pairs: Sequence[tuple[Path, Path]], fraction: float, seed: int
                     ) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]]]:
    """(training, validation) pairs: `fraction` of the images (at least one) chosen by
    `seed`, or none when there are fewer than MIN_SPLIT_IMAGES or `fraction` is 0."""
    pairs = list(pairs)
    if fraction <= 0 or len(pairs) < MIN_SPLIT_IMAGES:
        return pairs, []
    count = min(len(pairs) - 1, max(1, round(len(pairs) * fraction)))
    held = set(np.random.default_rng([seed, 7]).permutation(len(pairs))[:count].tolist())
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


def list_samples(data_dir: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``DATA/images`` and ``DATA/masks``, matched by file stem."""
    root = Path(data_dir)
    images_dir, masks_dir = root / "images", root / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise FileNotFoundError(f"training data {root}: no {d.name}/ folder (expected images/ and masks/)")
    images = sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"training data {root}: no images in {images_dir}")
    pairs, missing = [], []
    for image in images:
        mask = (masks_dir / image.relative_to(images_dir)).with_suffix(".png")
        (pairs.append((image, mask)) if mask.is_file() else missing.append(image.name))
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise FileNotFoundError(f"training data {root}: {len(missing)} images have no mask in "
                                f"{masks_dir} ({shown}); masks are <stem>.png")
    return pairs


def read_rgb(path: Path) -> np.ndarray:
    """The image as labelling sees it: the one decode path (`pipeline.store.decode`)."""
    return decode_image(Path(path).read_bytes(), f"image {path}")


def read_mask(path: Path, num_classes: int, ignore_index: int) -> np.ndarray:
    mask = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if mask is None or mask.ndim != 2:
        raise ValueError(f"mask {path}: expected a one-channel PNG of class indices")
    bad = (mask >= num_classes) & (mask != ignore_index)
    if bad.any():
        raise ValueError(f"mask {path}: class index {int(mask[bad].max())} but the label set has "
                         f"{num_classes} classes (0..{num_classes - 1}, {ignore_index} = ignore)")
    return mask


def measure_mean_std(images: Sequence[Path]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of RGB values in [0, 1] over all pixels of ``images``."""
    total = np.zeros(3)
    square = np.zeros(3)
    count = 0
    for path in images:
        pixels = read_rgb(path).reshape(-1, 3).astype(np.float64) / 255.0
        total += pixels.sum(0)
        square += (pixels**2).sum(0)
        count += len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(square / count - mean**2, 1e-12))
    return tuple(round(float(v), 5) for v in mean), tuple(round(float(v), 5) for v in std)


class SegmentationFolder(torch.utils.data.Dataset):
    """Augmented crops: random scale, random crop (pad with ignore), horizontal flip.

    Sample ``i`` of epoch ``e`` draws its randomness from ``(seed, e, i)`` only, so an
    epoch is the same whatever the number of workers, and a resumed run repeats it.
    """

    def __init__(self, pairs, *, size, mean, std, num_classes, ignore_index=255,
                 scale_range=(0.5, 2.0), flip=True, seed=0) -> None:
        self.pairs = list(pairs)
        self.size = int(size)
        self.mean = np.asarray(mean, np.float32)
        self.std = np.asarray(std, np.float32)
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.scale_range = scale_range
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, mask_path = self.pairs[index]
        image = read_rgb(image_path)
        mask = read_mask(mask_path, self.num_classes, self.ignore_index)
        if image.shape[:2] != mask.shape:
            raise ValueError(f"image {image_path} is {image.shape[1]}x{image.shape[0]} but its "
                             f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, mask = augment(rng, image, mask, size=self.size, fill=self.mean * 255,
                              ignore_index=self.ignore_index, scale_range=self.scale_range,
                              flip=self.flip)
        x = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(x.transpose(2, 0, 1).copy()), torch.from_numpy(mask.astype(np.int64))


def augment(rng, image, mask, *, size, fill, ignore_index=255, scale_range=(0.5, 2.0), flip=True):
    """Random scale, random crop/pad to ``size`` x ``size``, random horizontal flip."""
    low, high = scale_range
    if (low, high) != (1.0, 1.0):
        ratio = rng.uniform(low, high)
        h, w = mask.shape
        nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_LINEAR)
        mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    h, w = mask.shape
    if h < size or w < size:
        ph, pw = max(size - h, 0), max(size - w, 0)
        top, left = int(rng.integers(0, ph + 1)), int(rng.integers(0, pw + 1))
        canvas = np.empty((h + ph, w + pw, 3), np.uint8)
        canvas[:] = np.asarray(fill, np.float32).round().astype(np.uint8)
        canvas[top:top + h, left:left + w] = image
        padded = np.full((h + ph, w + pw), ignore_index, mask.dtype)
        padded[top:top + h, left:left + w] = mask
        image, mask, (h, w) = canvas, padded, (h + ph, w + pw)
    y, x = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    image, mask = image[y:y + size, x:x + size], mask[y:y + size, x:x + size]
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


# ---------------------------------------------------------------------------------------
# Label set and model


def resolve_label_set(data_dir: Path, classes, pairs, log: Callable[[str], None]):
    """``classes`` (preset, LabelSet or file) if given, else ``DATA/classes.json``; mean/std
    measured on the training images when the file does not give them."""
    import drn

    if classes is None:
        classes = data_dir / "classes.json"
        if not classes.is_file():
            raise FileNotFoundError(f"training data {data_dir}: no classes.json; give --classes "
                                    "(a preset or a classes file) to say what the mask values mean")
    label_set = drn.load_label_set(classes)
    given = isinstance(classes, drn.LabelSet) or str(classes) in drn.list_presets()
    if not given:
        path = Path(classes)
        data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else {}
        given = bool(data.get("mean")) and bool(data.get("std"))
    if not given:
        mean, std = measure_mean_std([image for image, _ in pairs])
        log(f"mean/std not given: measured on {len(pairs)} training images: mean {list(mean)} std {list(std)}")
        label_set = dataclasses.replace(label_set, mean=mean, std=std)
    return label_set


def build_model(arch: str, label_set, *, init, seed: int, log: Callable[[str], None]):
    """A DRNSeg for ``label_set``; ``init`` fills it from a checkpoint: all of it when the
    checkpoint is a DRNSeg of the same classes, else its backbone (an ImageNet classifier,
    or a DRNSeg of other classes whose head is dropped)."""
    import drn

    if init is None:
        return _small_head(drn.create_model(arch, classes=label_set, seed=seed))
    checkpoint = drn.load_checkpoint(init)
    if checkpoint.task == "segment" and checkpoint.num_classes != label_set.num_classes:
        if checkpoint.arch is not None and checkpoint.arch != arch:
            raise drn.CheckpointError(f"{init}: the checkpoint holds {checkpoint.arch}, not {arch}")
        model = drn.create_model(arch, classes=label_set, seed=seed)
        base = {k[len("base."):]: v for k, v in checkpoint.state_dict.items() if k.startswith("base.")}
        try:
            model.base.load_state_dict(base, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise drn.CheckpointError(f"{init}: its backbone does not fit {arch} ({first})") from None
        log(f"init: backbone of {init}; its {checkpoint.num_classes}-class head is replaced by a "
            f"new {label_set.num_classes}-class one")
        return _small_head(model)
    model = drn.create_model(arch, classes=label_set, weights=checkpoint, seed=seed)
    log(f"init: {'all' if checkpoint.task == 'segment' else 'backbone'} weights from {init}")
    return model if checkpoint.task == "segment" else _small_head(model)


def _small_head(model):
    """Start a new ``seg`` head near zero. The authors' N(0, sqrt(2 / C)) on 512 features
    gives logits in the tens (a first loss near 10), and SGD spends the first epoch
    shrinking them; near-zero logits start at ln(C) and learn from the first batch."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        weight = torch.randn(model.seg.weight.shape, generator=generator) * HEAD_INIT_STD
        model.seg.weight.copy_(weight)
        model.seg.bias.zero_()
    return model


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------------------
# Training


def poly_lr(base_lr: float, iteration: int, max_iterations: int, power: float = 0.9) -> float:
    """The authors' schedule: ``base_lr * (1 - iteration / max_iterations) ** power``."""
    return base_lr * max(0.0, 1.0 - iteration / max_iterations) ** power


def pick_lr(batch_size: int, *, fine_tune: bool) -> float:
    """The default learning rate: BASE_LR at batch 8, linear in the batch size, and
    FINE_TUNE_LR_FACTOR of it when starting from a trained model of the same classes."""
    lr = BASE_LR * batch_size / 8
    return lr * FINE_TUNE_LR_FACTOR if fine_tune else lr


def state_path(out: str | os.PathLike) -> Path:
    """Where the training state of checkpoint ``out`` lives."""
    out = Path(out)
    return out.with_name(out.name + ".state")


def train(
    data_dir: str | os.PathLike,
    *,
    arch: str,
    out: str | os.PathLike,
    epochs: int = 20,
    batch_size: int = 8,
    size: int = 64,
    init: str | os.PathLike | None = None,
    classes=None,
    lr: float | None = None,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    scale_range: tuple[float, float] = (0.5, 1.5),
    seed: int = 0,
    workers: int = 0,
    device: str = "auto",
    val_dir: str | os.PathLike | None = None,
    val_split: float = 0.1,
    patience: int | None = 5,
    log: Callable[[str], None] = print,
    resume: bool = True,
    threads: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
) -> TrainResult:
    """Train ``arch`` on ``data_dir`` and write the checkpoint ``out`` (see module doc).

    ``resume=True`` continues from ``<out>.state`` when it exists (same architecture and
    classes required); ``resume=False`` starts over and overwrites ``out``.
    ``val_dir`` (same layout) is scored after every epoch at full image size; without
    it ``val_split`` of ``data_dir`` is held out instead (0 disables validation, and then
    the last epoch is kept). ``patience`` epochs without a better validation mIoU stop
    the run (None: never). ``lr=None`` picks the rate (`pick_lr`).
    ``threads`` fixes torch's thread count on a CPU; 0 lets the run pick it by timing
    batches, and pick again as the machine's load changes (`ThreadTuner`). ``on_batch``
    is called with (iterations done, iterations in all) after every batch.
    """
    if epochs < 1 or batch_size < 1 or size < 8:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and size >= 8; got {epochs}, {batch_size}, {size}")
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    if patience is not None and patience < 1:
        raise ValueError(f"patience must be at least 1 epoch (or None), got {patience}")
    if threads < 0:
        raise ValueError(f"threads must be 0 (pick by timing batches) or more, got {threads}")
    retries = 2 if lr is None else 0
    while True:
        try:
            return _train(data_dir, arch=arch, out=out, epochs=epochs, batch_size=batch_size, size=size,
                          init=init, classes=classes, lr=lr, momentum=momentum,
                          weight_decay=weight_decay, scale_range=scale_range, seed=seed,
                          workers=workers, device=device, val_dir=val_dir, val_split=val_split,
                          patience=patience, log=log, resume=resume, threads=threads,
                          on_batch=on_batch)
        except DivergedError as exc:
            if retries == 0:
                raise
            retries -= 1
            lr = exc.lr / 4
            log(f"{exc}; starting over with lr {lr:g}")
            resume = False


def _train(data_dir, *, arch, out, epochs, batch_size, size, init, classes, lr, momentum,
           weight_decay, scale_range, seed, workers, device, val_dir, val_split, patience, log,
           resume, threads, on_batch) -> TrainResult:
    import drn

    data_dir, out = Path(data_dir), Path(out)
    all_pairs = list_samples(data_dir)
    device_ = pick_device(device)
    state_file = state_path(out)
    state = _load_state(state_file, device_) if resume and state_file.is_file() else None
    if resume and state is None and out.exists():
        raise FileExistsError(f"{out} exists but has no training state ({state_file.name}) to resume "
                              "from; give --restart (resume=False) to overwrite it, or another --out")

    if state is not None:
        label_set = drn.LabelSet.from_dict(state["label_set"])
        if state["arch"] != arch:
            raise ValueError(f"{state_file}: resuming a {state['arch']} run, but --model {arch} was asked "
                             "for; give --restart (resume=False) to start over")
    else:
        label_set = resolve_label_set(data_dir, classes, all_pairs, log)

    if val_dir is not None:
        pairs, val_pairs = all_pairs, list_samples(val_dir)
    else:
        pairs, val_pairs = split_validation(all_pairs, val_split, seed)
    if lr is None:
        fine_tune = False
        if init is not None:
            checkpoint = drn.load_checkpoint(init)
            fine_tune = checkpoint.task == "segment" and checkpoint.num_classes == label_set.num_classes
        lr = pick_lr(min(batch_size, len(pairs)), fine_tune=fine_tune)
        log(f"learning rate {lr:g} (batch {min(batch_size, len(pairs))}"
            f"{', fine-tuning ' + str(init) if fine_tune else ''}; --lr sets another)")

    # Model: fresh (or from init), or the saved run's weights.
    if state is None:
        model = build_model(arch, label_set, init=init, seed=seed, log=log)
    else:
        model = drn.create_model(arch, classes=label_set, seed=seed)
        weights = state.get("model")
        if weights is None:  # a finished run: its weights are in the checkpoint
            checkpoint = drn.load_checkpoint(out)
            if checkpoint.sha256 != state["checkpoint_sha256"]:
                raise ValueError(f"{out} is not the checkpoint its finished training state records "
                                 "(changed since?); give --restart (resume=False) to start over")
            weights = checkpoint.state_dict
        model.load_state_dict(weights)
    # Training changes the logits: a temperature that came with --init no longer holds.
    model.drn_config = dataclasses.replace(model.drn_config, temperature=1.0)
    model.to(device_).train()

    params = [p for p in model.parameters() if p.requires_grad]  # the bilinear `up` stays fixed
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    done = 0
    history: list[EpochStats] = []
    best_epoch: int | None = None
    stopped_early = False
    settings = {"batch_size": batch_size, "size": size, "lr": lr, "momentum": momentum,
                "weight_decay": weight_decay, "scale_range": list(scale_range), "seed": seed}
    if state is not None:
        done = int(state["epoch"])
        history = [EpochStats(**h) for h in state["history"]]
        best_epoch = state.get("best_epoch")
        stopped_early = bool(state.get("stopped_early"))
        changed = [f"{k} {v} -> {settings[k]}" for k, v in (state.get("settings") or {}).items()
                   if k in settings and v != settings[k]]
        if changed:
            log(f"resuming with other settings than the saved run: {', '.join(changed)}")
        if state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
            if best_epoch == done:
                # The state is written before the checkpoint: an interrupted write of the
                # best epoch's checkpoint is redone from the state's (identical) weights.
                _save_checkpoint(model, out)
        elif done < epochs and not stopped_early:
            log(f"resuming a finished run of {done} epochs: optimizer momentum starts afresh")
        if done >= epochs or stopped_early:
            why = f"stopped early after epoch {done}" if stopped_early else f"trained for {done} epochs"
            log(f"{out}: already {why} (asked for {epochs}); nothing to do")
            return TrainResult(out, arch, done, int(state["iteration"]), done, 0.0, label_set,
                               tuple(history), best_epoch, stopped_early, lr)
        log(f"resuming {out} after epoch {done}/{epochs}")

    dataset = SegmentationFolder(
        pairs, size=size, mean=label_set.mean, std=label_set.std, num_classes=label_set.num_classes,
        ignore_index=label_set.ignore_index, scale_range=scale_range, seed=seed,
    )
    batch = min(batch_size, len(dataset))
    iters_per_epoch = len(dataset) // batch  # drop the last partial batch (BatchNorm)
    max_iterations = epochs * iters_per_epoch
    iteration = done * iters_per_epoch
    held = (f", validation: {len(val_pairs)} images of {val_dir}" if val_dir is not None
            else f", validation: {len(val_pairs)} held-out images" if val_pairs else ", no validation")
    log(f"training {arch} on {len(dataset)} images of {data_dir} ({label_set.num_classes} classes), "
        f"crops {size}px, batch {batch}, {iters_per_epoch} iterations/epoch, on {device_}{held}")

    def best_miou() -> float:
        return next((h.val_miou for h in history if h.epoch == best_epoch), -1.0) or -1.0

    calibration: list[Calibration] = []

    def calibrate() -> None:
        calibration.append(calibrate_checkpoint(out, arch, val_pairs, label_set, device_))
        c = calibration[-1]
        log(f"calibrated on {c.pixels} validation pixels: temperature {c.temperature:.3f}, "
            f"expected calibration error {c.ece_before:.4f} -> {c.ece_after:.4f}")

    started = time.perf_counter()
    own_threads = torch.get_num_threads()
    tuner = None
    if device_.type == "cpu" and threads == 0:
        tuner = ThreadTuner(candidate_counts(own_threads), torch.set_num_threads, on_change=lambda n, timed: log(
            f"torch threads: {n} ({', '.join(f'{k}: {v:.3f}s' for k, v in timed.items())} a batch)"))
    elif device_.type == "cpu":
        torch.set_num_threads(threads)
    try:
        for epoch in range(done, epochs):
            dataset.set_epoch(epoch)
            order = np.random.default_rng([seed, epoch]).permutation(len(dataset))
            batches = [order[i * batch:(i + 1) * batch].tolist() for i in range(iters_per_epoch)]
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers)
            model.train()
            t0 = time.perf_counter()
            losses = []
            current_lr = lr
            for images, targets in loader:
                current_lr = poly_lr(lr, iteration, max_iterations)
                for group in optimizer.param_groups:
                    group["lr"] = current_lr
                images, targets = images.to(device_, non_blocking=True), targets.to(device_, non_blocking=True)
                logits = model(images)
                if not (targets != label_set.ignore_index).any():
                    iteration += 1  # nothing labelled in this batch (all padding/ignore)
                    continue
                loss = F.cross_entropy(logits, targets, ignore_index=label_set.ignore_index)
                if not torch.isfinite(loss):
                    raise DivergedError(f"epoch {epoch + 1}: the loss is {loss.item()} at lr {current_lr:g}; "
                                        "lower --lr", lr)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                iteration += 1
                if tuner is not None:
                    tuner.step()
                if on_batch is not None:
                    on_batch(iteration, max_iterations)
            if tuner is not None:
                tuner.pause()  # validation and saving are not a batch's time
            seconds = time.perf_counter() - t0
            if not losses:
                raise ValueError(f"epoch {epoch + 1}: no batch had a labelled pixel (masks all {label_set.ignore_index}?)")
            mean_loss = float(np.mean(losses))
            val_miou = None
            if val_pairs:
                val_miou = evaluate_pairs(model, val_pairs, label_set, device_).miou()
                model.train()
            stats = EpochStats(epoch + 1, mean_loss, current_lr, seconds,
                               iters_per_epoch * batch / seconds if seconds > 0 else math.nan, val_miou)
            history.append(stats)
            improved = val_miou is None or val_miou > best_miou()
            if improved:
                best_epoch = stats.epoch
            stale = stats.epoch - best_epoch
            stopped_early = (patience is not None and val_miou is not None and stale >= patience
                             and stats.epoch >= epochs // 2)
            finished = epoch + 1 == epochs or stopped_early
            _save(model, optimizer, out, state_file, label_set, arch, settings, stats.epoch, iteration,
                  history, finished, best=improved, best_epoch=best_epoch, stopped_early=stopped_early,
                  calibrate=calibrate if val_pairs else None)
            log(f"epoch {stats.epoch}/{epochs}  loss {stats.loss:.4f}  lr {stats.lr:.5f}  "
                f"{stats.seconds:.1f}s  {stats.images_per_second:.1f} images/s"
                + (f"  val mIoU {val_miou:.4f}" + (" (best)" if improved else "")
                   if val_miou is not None else ""))
            if stopped_early:
                log(f"no better validation mIoU for {patience} epochs: stopped; {out} holds epoch "
                    f"{best_epoch} (val mIoU {best_miou():.4f})")
                break
    finally:
        torch.set_num_threads(own_threads)
    model.eval()
    return TrainResult(out, arch, history[-1].epoch if history else done, iteration, done,
                       time.perf_counter() - started, label_set, tuple(history), best_epoch,
                       stopped_early, lr, calibration[-1] if calibration else None)


def _save(model, optimizer, out, state_file, label_set, arch, settings, epoch, iteration, history,
          finished, *, best: bool, best_epoch: int | None, stopped_early: bool,
          calibrate: Callable[[], None] | None = None):
    """Training state and, when `best`, the checkpoint (the project's format), atomically."""
    from drn.checkpoints import sha256_file

    model.eval()
    record = {
        "format": STATE_FORMAT,
        "arch": arch,
        "settings": settings,
        "label_set": label_set.to_dict(),
        "epoch": epoch,
        "iteration": iteration,
        "history": [dataclasses.asdict(h) for h in history],
        "best_epoch": best_epoch,
        "stopped_early": stopped_early,
    }
    if finished:
        # Checkpoint first, then a small record that names it: the run is complete.
        if best:
            _save_checkpoint(model, out)
        if calibrate is not None:
            calibrate()  # rewrites the checkpoint with its temperature
        record.update(model=None, optimizer=None, checkpoint_sha256=sha256_file(out))
        _atomic_torch_save(record, state_file)
    else:
        # State first (self-contained), then the checkpoint: a crash between the two loses
        # nothing, the next run resumes from the state and rewrites the checkpoint.
        record.update(
            model={k: v.detach().cpu() for k, v in model.state_dict().items()},
            optimizer=_to_cpu(optimizer.state_dict()),
        )
        _atomic_torch_save(record, state_file)
        if best:
            _save_checkpoint(model, out)
    model.train()


def _save_checkpoint(model, out: Path) -> None:
    from drn import save_checkpoint

    was_training = model.training
    model.eval()
    save_checkpoint(model, out)
    model.train(was_training)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(obj, f)


def _load_state(path: Path, device: torch.device) -> dict:
    state = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path}: not a drn-label training state ({STATE_FORMAT}); delete it to start over")
    return state


# ---------------------------------------------------------------------------------------
# Scoring during training


@torch.no_grad()
def evaluate_pairs(model, pairs, label_set, device: torch.device) -> ConfusionMatrix:
    """One confusion matrix over ``pairs`` (image path, mask path), full-size images."""
    from drn.predictor import Predictor

    was_training = model.training
    model.eval()
    predictor = Predictor(model, mean=label_set.mean, std=label_set.std, device=device, batch_size=1)
    cm = ConfusionMatrix(label_set.num_classes, label_set.ignore_index)
    for image_path, mask_path in pairs:
        gt = read_mask(mask_path, label_set.num_classes, label_set.ignore_index)
        (prediction,) = predictor.predict([read_rgb(image_path)])
        cm.update(prediction.mask, gt)
    model.train(was_training)
    return cm


# ---------------------------------------------------------------------------------------
# Calibration (drn.calibration): one temperature, fitted on the validation images


@torch.no_grad()
def calibration_pixels(model, pairs, label_set, device: torch.device, *,
                       max_pixels: int = 1_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (P x C, on the CPU) and classes (P) of the labelled pixels of ``pairs`` at full
    image size: at most ``max_pixels``, spread evenly over the images and within each."""
    mean = torch.tensor(label_set.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(label_set.std, device=device).view(1, 3, 1, 1)
    per_image = max(1, max_pixels // max(1, len(pairs)))
    logits, classes = [], []
    for image_path, mask_path in pairs:
        rgb = torch.from_numpy(np.ascontiguousarray(read_rgb(image_path))).to(device)
        x = (rgb.permute(2, 0, 1)[None].float() / 255.0 - mean) / std
        z = model(x)[0].flatten(1).t()  # pixels x classes
        y = torch.from_numpy(read_mask(mask_path, label_set.num_classes,
                                       label_set.ignore_index).reshape(-1).astype(np.int64))
        keep = torch.nonzero(y != label_set.ignore_index).squeeze(1)
        if len(keep) > per_image:
            keep = keep[torch.linspace(0, len(keep) - 1, per_image).long()]
        logits.append(z[keep.to(device)].float().cpu())
        classes.append(y[keep])
    return torch.cat(logits), torch.cat(classes)


def calibrate_checkpoint(out: Path, arch: str, pairs, label_set, device: torch.device) -> Calibration:
    """Fit the temperature of the checkpoint ``out`` on ``pairs`` and store it there."""
    import drn
    from drn.calibration import expected_calibration_error, fit_temperature

    model = drn.create_model(arch, weights=out).to(device).eval()
    config = model.drn_config
    logits, classes = calibration_pixels(model, pairs, label_set, device)
    temperature = fit_temperature(logits, classes)  # the model's own logits, never divided
    model.drn_config = dataclasses.replace(config, temperature=temperature)
    _save_checkpoint(model, out)
    return Calibration(temperature, len(classes), expected_calibration_error(logits, classes),
                       expected_calibration_error(logits, classes, temperature=temperature))
