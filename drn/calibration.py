"""Calibrated confidence: one temperature for a model's logits, and how well calibrated
its confidences are.

A segmentation network trained with cross-entropy is usually over-confident: pixels it
labels with probability 0.95 are right less often than 95% of the time. Dividing the
logits by one temperature T > 0 (fitted on held-out pixels by minimising their negative
log-likelihood) fixes most of that without changing any label: the arg-max of z / T is the
arg-max of z. ``expected_calibration_error`` measures the gap.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

T_MIN, T_MAX = 0.05, 20.0
"""The temperatures searched; a fit at either end says the logits carry no information."""


def check_temperature(value: float) -> float:
    t = float(value)
    if not math.isfinite(t) or not T_MIN <= t <= T_MAX:
        raise ValueError(f"temperature must be a number in [{T_MIN}, {T_MAX}], got {value!r}")
    return t


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, *, steps: int = 60) -> float:
    """The T in [T_MIN, T_MAX] minimising the mean cross-entropy of ``logits / T``
    (P x C floats) against ``targets`` (P class indices): a golden-section search over
    log T (the loss is convex in 1 / T). Deterministic; ``logits`` stay unchanged."""
    if logits.ndim != 2 or targets.shape != logits.shape[:1] or logits.shape[0] == 0:
        raise ValueError(f"need P x C logits and P targets (P > 0), got {tuple(logits.shape)} "
                         f"and {tuple(targets.shape)}")
    z = logits.detach().float()
    y = targets.detach().long()

    def loss(log_t: float) -> float:
        return float(F.cross_entropy(z / math.exp(log_t), y))

    a, b = math.log(T_MIN), math.log(T_MAX)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(steps):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def expected_calibration_error(logits: torch.Tensor, targets: torch.Tensor, *,
                               temperature: float = 1.0, bins: int = 15) -> float:
    """The mean over equal-width confidence bins of |accuracy - confidence|, weighted by
    the bin's share of pixels, for the top class of ``logits / temperature``."""
    probs = torch.softmax(logits.detach().float() / temperature, dim=1)
    confidence, label = probs.max(dim=1)
    correct = (label == targets.long()).float()
    index = (confidence * bins).long().clamp_(0, bins - 1)
    count = torch.bincount(index, minlength=bins).float()
    gap = (torch.bincount(index, weights=correct, minlength=bins)
           - torch.bincount(index, weights=confidence, minlength=bins)).abs()
    return float(gap.sum() / count.sum().clamp_min(1.0))
