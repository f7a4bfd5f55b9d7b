"""Calibrated confidence: a temperature fitted on held-out pixels, stored with the
checkpoint, applied by the predictor before any probability (masks unchanged)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import drn
from drn.calibration import expected_calibration_error, fit_temperature
from drn.checkpoints import CheckpointError
from drn.predictor import Predictor


def _sampled(temperature: float, seed: int = 0):
    """Logits, and classes drawn from softmax(logits / temperature): T is the truth."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(100_000, 5, generator=g) * 3
    classes = torch.multinomial(torch.softmax(logits / temperature, 1), 1, generator=g).squeeze(1)
    return logits, classes


@pytest.mark.parametrize("truth", [0.5, 1.0, 2.5])
def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with(truth):
    logits, classes = _sampled(truth)
    fitted = fit_temperature(logits, classes)
    assert fitted == pytest.approx(truth, rel=0.05)
    before = expected_calibration_error(logits, classes)
    after = expected_calibration_error(logits, classes, temperature=fitted)
    assert after < 0.01
    if truth != 1.0:
        assert before > 5 * after  # over- or under-confident raw logits, put right


def test_expected_calibration_error_by_hand():
    # Two pixels at confidence 0.9 (bin 13 of 15), one right: |0.5 - 0.9| over all pixels.
    z = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    assert expected_calibration_error(z, torch.tensor([0, 1])) == pytest.approx(0.4, abs=1e-6)
    assert expected_calibration_error(z, torch.tensor([0, 0])) == pytest.approx(0.1, abs=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="P x C logits"):
        fit_temperature(torch.zeros(0, 3), torch.zeros(0))
    with pytest.raises(ValueError, match="temperature must be a number"):
        Predictor.from_model(drn.create_model("drn_d_22", num_classes=3), device="cpu", temperature=0)


def test_a_checkpoint_keeps_its_temperature_and_the_predictor_applies_it(tmp_path):
    model = drn.create_model("drn_d_22", num_classes=3, seed=1)
    plain = drn.save_checkpoint(model, tmp_path / "plain.pt")
    assert drn.load_checkpoint(plain).temperature == 1.0
    assert "temperature" not in torch.load(plain, weights_only=True)
    import dataclasses

    model.drn_config = dataclasses.replace(model.drn_config, temperature=2.0)
    hot = drn.save_checkpoint(model, tmp_path / "hot.pt")
    loaded = drn.create_model("drn_d_22", weights=hot)
    assert loaded.drn_config.temperature == 2.0

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (40, 56, 3), dtype=np.uint8) for _ in range(2)]
    raw = Predictor.from_model(drn.create_model("drn_d_22", weights=plain), device="cpu").predict(images)
    cooled = Predictor.from_model(loaded, device="cpu").predict(images)
    for a, b in zip(raw, cooled):
        assert np.array_equal(a.mask, b.mask)  # the same labels
        assert b.confidence < a.confidence  # T > 1 spreads the probabilities
        assert b.entropy > a.entropy


def test_a_forged_temperature_is_a_checkpoint_error(tmp_path):
    model = drn.create_model("drn_d_22", num_classes=3)
    path = drn.save_checkpoint(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["temperature"] = float("nan")
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="m.pt: temperature must be a number"):
        drn.create_model("drn_d_22", weights=path)
