"""The predictor core: plain PyTorch, real forward passes on tiny images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import drn
from drn.labels import IMAGENET_MEAN, IMAGENET_STD
from drn.predictor import Predictor, device_statistics
from tests.imagegen import scene
from tests.modelkit import content_model

MEAN, STD = (0.29010, 0.32808, 0.28696), (0.18295, 0.18657, 0.18448)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return content_model("drn_d_22", num_classes=5)


@pytest.fixture(scope="module")
def predictor(model):
    return Predictor(model, mean=MEAN, std=STD, batch_size=4)


def direct_mask(model, rgb: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(x).argmax(1)[0].numpy()


def test_statistics_follow_the_mask(predictor):
    images = [scene(37, 53, 1), scene(64, 48, 2), scene(37, 53, 3)]
    preds = predictor.predict(images)
    for img, p in zip(images, preds):
        assert p.error is None
        assert p.mask.shape == img.shape[:2] and p.mask.dtype == np.uint8
        assert p.class_scores.dtype == np.float32 and p.class_scores.shape == (5,)
        assert abs(float(p.class_scores.sum()) - 1.0) < 1e-4
        hist = np.bincount(p.mask.ravel(), minlength=5) / p.mask.size
        np.testing.assert_allclose(p.class_fraction, hist, atol=1e-6)
        assert 1 / 5 <= p.confidence <= 1.0
        assert len(np.unique(p.mask)) >= 2, "masks must follow content, not a constant class"


def test_mask_equals_the_models_own_argmax(model, predictor):
    for seed, (h, w) in enumerate([(37, 53), (40, 40), (17, 90)]):
        img = scene(h, w, seed)
        np.testing.assert_array_equal(predictor.predict([img])[0].mask, direct_mask(model, img))


def test_mask_does_not_depend_on_batch_neighbours(predictor):
    target = scene(45, 61, 7)
    alone = predictor.predict([target])[0]
    crowd = predictor.predict([scene(120, 90, 8), target, scene(45, 61, 9), scene(33, 33, 10)])[1]
    np.testing.assert_array_equal(alone.mask, crowd.mask)
    np.testing.assert_allclose(alone.class_scores, crowd.class_scores, atol=1e-5)


def test_rejects_non_rgb_input(predictor):
    with pytest.raises(ValueError, match=r"image 0: expected H x W x 3 uint8 RGB, got shape \(8, 8\)"):
        predictor.predict([np.zeros((8, 8), np.uint8)])


def test_fp16_on_cpu_is_refused(model):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: fp16 is allowed there")
    with pytest.raises(ValueError, match="precision fp16 needs a GPU; use bf16 or fp32 on CPU"):
        Predictor(model, mean=MEAN, std=STD, precision="fp16", device="cpu")


def test_bf16_on_cpu_agrees_with_fp32_mostly(model, predictor):
    img = scene(64, 64, 11)
    ref = predictor.predict([img])[0].mask
    bf16 = Predictor(model, mean=MEAN, std=STD, precision="bf16", device="cpu").predict([img])[0]
    assert (bf16.mask == ref).mean() > 0.8


class _OutOfMemoryAbove(torch.nn.Module):
    """Fault injection at the device boundary: the real model, but a batch whose pixel
    count exceeds a budget raises torch.OutOfMemoryError as an allocator would."""

    def __init__(self, model, max_pixels: int):
        super().__init__()
        self.model, self.max_pixels = model, max_pixels
        self.drn_config = model.drn_config
        self.calls: list[int] = []

    def forward(self, x):
        self.calls.append(x.shape[0])
        if x.shape[0] * x.shape[2] * x.shape[3] > self.max_pixels:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.model(x)


def test_out_of_memory_splits_the_batch_and_reports_what_alone_does_not_fit(model, predictor):
    small = [scene(32, 32, s) for s in range(4)]
    big = scene(64, 64, 99)
    wrapped = _OutOfMemoryAbove(model, max_pixels=2 * 32 * 32)
    oom = Predictor(wrapped, mean=MEAN, std=STD, batch_size=4)
    preds = oom.predict(small + [big])
    assert oom.model.calls[:3] == [4, 2, 2]  # split in halves, then fits (the module it runs)
    for img, p in zip(small, preds[:4]):
        np.testing.assert_array_equal(p.mask, predictor.predict([img])[0].mask)
    assert preds[4].mask is None
    assert preds[4].error.startswith("out of memory labelling a 64x64 image (needs about ")
    assert preds[4].error.endswith("MiB on cpu); lower --max-side")


def test_size_buckets_batch_mixed_sizes_without_neighbour_effects(model, predictor):
    bucketed = Predictor(model, mean=MEAN, std=STD, batch_size=4, size_bucket=32)
    target = scene(45, 61, 7)
    alone = bucketed.predict([target])[0]
    crowd = bucketed.predict([scene(50, 60, 8), target, scene(33, 40, 9)])
    np.testing.assert_array_equal(alone.mask, crowd[1].mask)
    assert crowd[1].mask.shape == (45, 61)
    hist = np.bincount(alone.mask.ravel(), minlength=5) / alone.mask.size
    np.testing.assert_allclose(alone.class_fraction, hist, atol=1e-6)
    # Padding to 64 x 64 instead of 48 x 64 changes labels near the edges only.
    exact = predictor.predict([target])[0].mask
    assert (alone.mask == exact).mean() > 0.5


def test_size_bucket_must_be_at_least_8(model):
    with pytest.raises(ValueError, match="size_bucket must be at least 8 pixels, got 4"):
        Predictor(model, mean=MEAN, std=STD, size_bucket=4)


def test_tta_averages_scales_and_flip(model, predictor):
    img = scene(40, 56, 12)
    plain = predictor.predict([img])[0]
    same = Predictor(model, mean=MEAN, std=STD, tta_scales=[1.0]).predict([img])[0]
    np.testing.assert_array_equal(plain.mask, same.mask)  # one scale, no flip: unchanged
    tta = Predictor(model, mean=MEAN, std=STD, tta_scales=[0.75, 1.0, 1.25], tta_flip=True)
    pred = tta.predict([img])[0]
    assert pred.mask.shape == (40, 56)
    assert abs(float(pred.class_scores.sum()) - 1) < 1e-4
    hist = np.bincount(pred.mask.ravel(), minlength=5) / pred.mask.size
    np.testing.assert_allclose(pred.class_fraction, hist, atol=1e-6)
    # Flip-averaging makes the labels of a mirrored image the mirror of the labels.
    flip_only = Predictor(model, mean=MEAN, std=STD, tta_scales=[1.0], tta_flip=True)
    a = flip_only.predict([img])[0].mask
    b = flip_only.predict([np.ascontiguousarray(img[:, ::-1])])[0].mask
    np.testing.assert_array_equal(a, b[:, ::-1])


@pytest.mark.parametrize(("num_classes", "dtype"), [(2, np.uint8), (256, np.uint8), (257, np.uint16), (300, np.uint16)])
def test_mask_dtype_follows_the_class_count(predictor, num_classes, dtype):
    logits = torch.full((2, num_classes, 3, 4), -10.0)
    logits[0, num_classes - 1] = 10.0  # the last class id: 255 or 299 must survive the trip
    logits[1, 0] = 10.0
    first, second = predictor._statistics(logits)
    assert first.mask.dtype == second.mask.dtype == np.dtype(dtype)
    assert (first.mask == num_classes - 1).all() and (second.mask == 0).all()


def test_from_model_uses_the_label_set_statistics(model):
    city = drn.create_model("drn_d_22", classes="cityscapes")
    predictor = Predictor.from_model(city, device="cpu")
    assert torch.allclose(predictor._mean.flatten(), torch.tensor(city.drn_config.mean) * 255)
    assert torch.allclose(predictor._std.flatten(), torch.tensor(city.drn_config.std) * 255)
    default = Predictor.from_model(model, device="cpu")  # no label set given: ImageNet's
    assert torch.allclose(default._mean.flatten(), torch.tensor(IMAGENET_MEAN) * 255)
    bare = Predictor.from_model(torch.nn.Conv2d(3, 2, 1), device="cpu")  # not from create_model
    assert torch.allclose(bare._std.flatten(), torch.tensor(IMAGENET_STD) * 255)


def test_uncertainty_and_saved_probabilities_match_the_softmax(model):
    """Entropy, margin, the share of unsure pixels and the block-averaged probabilities,
    computed on the device, equal the same figures computed here from the logits."""
    rgb = scene(37, 53, 4)
    (p,) = Predictor(model, mean=MEAN, std=STD, probs_stride=8).predict([rgb])
    x = torch.from_numpy(rgb).permute(2, 0, 1).float().unsqueeze(0) / 255.0
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        probs = torch.softmax(model(x), dim=1)[0].numpy().astype(np.float64)
    ordered = np.sort(probs, axis=0)
    assert p.entropy == pytest.approx(float((-(probs * np.log(probs)).sum(0)).mean()), rel=1e-4)
    assert p.margin == pytest.approx(float((ordered[-1] - ordered[-2]).mean()), rel=1e-4)
    assert p.uncertain_fraction == pytest.approx(float((ordered[-1] < 0.5).mean()), abs=1e-6)
    assert 0 < p.uncertain_fraction < 1, "the scene must have sure and unsure pixels to test this"
    assert p.probs.dtype == np.uint8 and p.probs.shape == (5, 5, 7)  # ceil(37/8), ceil(53/8)
    block = probs[:, 8:16, 16:24].mean(axis=(1, 2))
    np.testing.assert_allclose(p.probs[:, 1, 2] / 255.0, block, atol=0.5 / 255 + 1e-6)
    assert Predictor(model, mean=MEAN, std=STD).predict([rgb])[0].probs is None  # opt-in


def test_the_module_given_is_never_changed(model):
    """The predictor runs a copy when the mode, device or memory format must change."""
    training = content_model("drn_d_22", num_classes=5).train()
    weight = training.seg.weight
    runner = Predictor(training, mean=MEAN, std=STD, channels_last=True, device="cpu")
    assert training.training and weight.is_contiguous() and training.seg.weight is weight
    assert runner.model is not training and not runner.model.training
    assert runner.model.seg.weight.is_contiguous(memory_format=torch.channels_last)
    same = Predictor(model, mean=MEAN, std=STD, device="cpu")  # already as needed: no copy
    assert same.model is model


def _reference(logits: torch.Tensor):
    """The statistics written the plain way (softmax, argmax, sort) in float64."""
    probs = torch.softmax(logits.double(), dim=1)
    ordered = probs.sort(dim=1, descending=True).values
    second = ordered[:, 1] if logits.shape[1] > 1 else torch.zeros_like(ordered[:, 0])
    entropy = -(probs * torch.log_softmax(logits.double(), dim=1)).sum(1)
    return logits.argmax(1), ordered[:, 0], second, entropy, probs.mean((2, 3))


@pytest.mark.parametrize("num_classes", [1, 2, 19, 256, 300])
def test_device_statistics_equal_the_plain_formulas_ties_included(num_classes):
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randn(2, num_classes, 6, 7, generator=g) * 4
    logits[:, :, :2, :3] = 1.5  # every class tied: class 0, no margin
    if num_classes > 2:
        logits[0, [1, num_classes - 1], 3, 3] = 99.0  # two classes tied above the rest
    mask, floats, scores, _ = device_statistics(logits, num_classes, None)
    ref_mask, top, second, entropy, ref_scores = _reference(logits)
    assert torch.equal(mask.long(), ref_mask)
    if num_classes > 2:
        assert mask[0, 3, 3] == 1 and float((top - second)[0, 3, 3]) == 0.0
    np.testing.assert_allclose(floats[:, 0], top.mean((1, 2)), rtol=1e-5)
    np.testing.assert_allclose(floats[:, 1], entropy.mean((1, 2)), atol=1e-5)
    np.testing.assert_allclose(floats[:, 2], (top - second).mean((1, 2)), atol=1e-6)
    np.testing.assert_allclose(floats[:, 3], (top < 0.5).double().mean((1, 2)), atol=1e-7)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu.sh runs it)")
def test_on_cuda_the_pipelined_and_compiled_paths_equal_the_cpu(model):
    """Several batches of several sizes through pinned buffers and side streams (and
    through torch.compile) give the CPU's masks, on a module left on the CPU."""
    images = [scene(*size, seed) for seed, size in enumerate([(37, 53), (64, 48)] * 5)]
    cpu = Predictor(model, mean=MEAN, std=STD, batch_size=2, device="cpu").predict(images)
    for compiled in (False, True):
        gpu = Predictor(model, mean=MEAN, std=STD, batch_size=2, device="cuda", compile=compiled)
        for a, b in zip(cpu, gpu.predict(images)):
            assert (a.mask == b.mask).mean() > 0.999
            np.testing.assert_allclose(a.class_scores, b.class_scores, atol=1e-3)
    assert next(model.parameters()).device.type == "cpu"
