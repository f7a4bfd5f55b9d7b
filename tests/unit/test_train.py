"""Training: augmentation, schedule, a one-epoch smoke run, its checkpoint, and resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import drn
from pipeline.training.synth import make_synthetic_set
from pipeline.training.train import (
    augment,
    poly_lr,
    resolve_label_set,
    list_samples,
    state_path,
    train,
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    make_synthetic_set(root, count=8, size=32, seed=0)
    return root


def test_poly_schedule():
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_augment_crops_pads_with_ignore_and_keeps_pixels_aligned():
    rng = np.random.default_rng(0)
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = np.arange(30, dtype=np.uint8)[None, :]  # the mask is the image's red channel
    mask = image[..., 0].copy()
    for _ in range(20):
        img, m = augment(rng, image, mask, size=48, fill=(7, 7, 7), scale_range=(1.0, 1.0))
        assert img.shape == (48, 48, 3) and m.shape == (48, 48)
        inside = m != 255
        assert inside.sum() == 20 * 30  # all of the source, the rest is padding
        assert np.array_equal(img[..., 0][inside], m[inside])  # flips move both together
        assert (img[~inside] == 7).all()
    img, m = augment(rng, image, mask, size=16, fill=(0, 0, 0), scale_range=(0.5, 2.0))
    assert img.shape == (16, 16, 3) and m.shape == (16, 16)


def test_mean_std_measured_when_the_classes_file_has_none(tmp_path, tiny_set):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"name": "mine", "classes": ["a", "b", "c", "d", "e"]}))
    pairs = list_samples(tiny_set)
    label_set = resolve_label_set(tiny_set, classes, pairs, log=lambda s: None)
    given = json.loads((tiny_set / "classes.json").read_text())
    assert label_set.name == "mine"
    assert label_set.mean == pytest.approx(given["mean"], abs=1e-4)  # synth measured the same pixels
    assert label_set.std == pytest.approx(given["std"], abs=1e-4)
    assert drn.load_label_set("cityscapes").mean == resolve_label_set(tiny_set, "cityscapes", pairs, print).mean


def test_missing_masks_and_classes_are_named(tmp_path, tiny_set):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_bytes((tiny_set / "images" / "0000.png").read_bytes())
    with pytest.raises(FileNotFoundError, match="1 images have no mask"):
        list_samples(tmp_path)
    (tmp_path / "masks" / "a.png").write_bytes((tiny_set / "masks" / "0000.png").read_bytes())
    with pytest.raises(FileNotFoundError, match="no classes.json"):
        train(tmp_path, arch="drn_d_22", out=tmp_path / "m.pt", epochs=1, size=16)


def test_one_epoch_writes_a_loadable_checkpoint_and_resumes(tmp_path, tiny_set):
    out = tmp_path / "model.pt"
    lines: list[str] = []
    result = train(tiny_set, arch="drn_d_22", out=out, epochs=1, batch_size=4, size=32,
                   val_dir=tiny_set, log=lines.append)
    assert result.epochs == 1 and result.iterations == 2 and result.resumed_from == 0
    assert out.is_file() and state_path(out).is_file()
    assert any(line.startswith("epoch 1/1  loss ") and "images/s" in line and "val mIoU" in line
               for line in lines)
    assert result.val_miou is not None and 0.0 <= result.val_miou <= 1.0

    model = drn.create_model("drn_d_22", weights=out)
    config = model.drn_config
    assert config.num_classes == 5
    assert config.label_set.class_names[1] == "red disc"
    assert config.label_set.mean == pytest.approx(json.loads((tiny_set / "classes.json").read_text())["mean"])
    assert not model.training
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 20, 28)).shape == (1, 5, 20, 28)
    # The finished run's state is a small record, not a second copy of the weights.
    assert state_path(out).stat().st_size < 10_000

    # Same arguments again: nothing to do. More epochs: continue from the checkpoint.
    again = train(tiny_set, arch="drn_d_22", out=out, epochs=1, batch_size=4, size=32, log=lines.append)
    assert again.seconds == 0.0 and again.epochs == 1
    more = train(tiny_set, arch="drn_d_22", out=out, epochs=2, batch_size=4, size=32, log=lines.append)
    assert more.resumed_from == 1 and more.epochs == 2 and [h.epoch for h in more.history] == [1, 2]
    assert more.iterations == 4
    # Wrong architecture, or a checkpoint without state: explicit errors.
    with pytest.raises(ValueError, match="resuming a drn_d_22 run"):
        train(tiny_set, arch="drn_c_26", out=out, epochs=3, size=32, log=lines.append)
    state_path(out).unlink()
    with pytest.raises(FileExistsError, match=r"give --restart \(resume=False\) to overwrite it"):
        train(tiny_set, arch="drn_d_22", out=out, epochs=3, size=32, log=lines.append)


def test_resume_after_an_interrupted_epoch_matches_an_uninterrupted_run(tmp_path, tiny_set):
    """Stop after epoch 1 of 2 (the state holds model + optimizer), resume, compare."""
    full = train(tiny_set, arch="drn_d_22", out=tmp_path / "full.pt", epochs=2, batch_size=4,
                 size=32, log=lambda s: None)

    class Stop(Exception):
        pass

    def stop_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1/2"):
            raise Stop

    with pytest.raises(Stop):
        train(tiny_set, arch="drn_d_22", out=tmp_path / "part.pt", epochs=2, batch_size=4,
              size=32, log=stop_after_first_epoch)
    state = torch.load(state_path(tmp_path / "part.pt"), weights_only=True)
    assert state["epoch"] == 1 and state["optimizer"] is not None and state["model"] is not None
    resumed = train(tiny_set, arch="drn_d_22", out=tmp_path / "part.pt", epochs=2, batch_size=4,
                    size=32, log=lambda s: None)
    assert resumed.resumed_from == 1
    a = drn.load_checkpoint(tmp_path / "full.pt").state_dict
    b = drn.load_checkpoint(tmp_path / "part.pt").state_dict
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_init_from_a_drnseg_of_other_classes_keeps_its_backbone(tmp_path, tiny_set):
    first = train(tiny_set, arch="drn_d_22", out=tmp_path / "five.pt", epochs=1, batch_size=4,
                  size=32, log=lambda s: None)
    three = tmp_path / "three"
    make_synthetic_set(three, count=4, size=32, num_classes=3)
    lines: list[str] = []
    result = train(three, arch="drn_d_22", out=tmp_path / "three.pt", init=first.checkpoint, epochs=1,
                   batch_size=4, size=32, lr=0.0, momentum=0.0, weight_decay=0.0, log=lines.append)
    assert any("backbone of" in line and "5-class head is replaced by a new 3-class one" in line
               for line in lines)
    five, new = drn.load_checkpoint(first.checkpoint).state_dict, drn.load_checkpoint(result.checkpoint).state_dict
    assert new["seg.weight"].shape[0] == 3
    # lr 0: the weights are the init's (BatchNorm running statistics still move in training).
    torch.testing.assert_close(new["base.0.0.weight"], five["base.0.0.weight"])
    torch.testing.assert_close(new["base.6.0.conv1.weight"], five["base.6.0.conv1.weight"])


def test_samples_are_deterministic_per_epoch(tiny_set):
    from pipeline.training.train import SegmentationFolder

    ds = SegmentationFolder(list_samples(tiny_set), size=24, mean=(0.5,) * 3, std=(0.2,) * 3, num_classes=5)
    a, b = ds[3], ds[3]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[3][0], a[0])
    assert a[0].shape == (3, 24, 24) and a[1].dtype == torch.int64


def test_validation_split_and_learning_rate_defaults():
    from pipeline.training.train import BASE_LR, pick_lr, split_validation

    pairs = [(f"i{k}", f"m{k}") for k in range(30)]
    train_pairs, val = split_validation(pairs, 0.1, seed=0)
    assert len(val) == 3 and len(train_pairs) == 27 and not set(val) & set(train_pairs)
    assert split_validation(pairs, 0.1, seed=0) == (train_pairs, val)
    assert split_validation(pairs[:9], 0.1, seed=0) == (pairs[:9], [])  # too few to spare any
    assert split_validation(pairs, 0.0, seed=0) == (pairs, [])
    assert pick_lr(8, fine_tune=False) == BASE_LR and pick_lr(16, fine_tune=False) == 2 * BASE_LR
    assert pick_lr(8, fine_tune=True) == pytest.approx(BASE_LR / 2)


def test_best_epoch_is_kept_and_training_stops_when_validation_stalls(tmp_path):
    """lr ~ 0: validation mIoU cannot keep improving, so patience 1 stops the run; the
    checkpoint holds the best epoch's weights (scored again here: the same mIoU)."""
    from pipeline.training.train import evaluate_pairs, split_validation

    data = tmp_path / "data"
    make_synthetic_set(data, count=12, size=32, seed=0)
    out = tmp_path / "m.pt"
    lines: list[str] = []
    result = train(data, arch="drn_d_22", out=out, epochs=8, batch_size=8, size=32, lr=1e-12,
                   patience=1, log=lines.append)
    assert result.stopped_early and 4 <= result.epochs < 8  # never in the first half
    assert result.history[-1].epoch - result.best_epoch >= 1  # stopped once stale (patience 1)
    if result.epochs > 4:
        assert result.history[-2].epoch == result.best_epoch  # ... and at the first stale epoch
    assert result.best_miou == max(h.val_miou for h in result.history)
    assert any(line.startswith("no better validation mIoU for 1 epochs: stopped") for line in lines)
    model = drn.create_model("drn_d_22", weights=out)
    _, val = split_validation(list_samples(data), 0.1, seed=0)
    score = evaluate_pairs(model, val, model.drn_config.label_set, torch.device("cpu")).miou()
    assert score == pytest.approx(result.best_miou, abs=1e-9)
    # A stopped run is finished: the same call again does nothing.
    again = train(data, arch="drn_d_22", out=out, epochs=8, batch_size=8, size=32, lr=1e-12,
                  patience=1, log=lines.append)
    assert again.seconds == 0.0 and again.stopped_early and "stopped early" in lines[-1]


def test_a_diverging_default_learning_rate_is_lowered_and_restarted(tmp_path, tiny_set, monkeypatch):
    from pipeline.training import train as train_module

    monkeypatch.setattr(train_module, "BASE_LR", 1e9)  # a rate no data survives
    lines: list[str] = []
    with pytest.raises(train_module.DivergedError, match="lower --lr"):
        train(tiny_set, arch="drn_d_22", out=tmp_path / "m.pt", epochs=2, batch_size=4, size=32,
              log=lines.append)
    restarts = [line for line in lines if "starting over with lr" in line]
    assert [r.rsplit(" ", 1)[1] for r in restarts] == ["1.25e+08", "3.125e+07"]  # 1e9 x 4/8, quartered twice


def test_training_with_validation_stores_a_calibrated_temperature(tmp_path, tiny_set):
    """The temperature is fitted on the validation images of the kept epoch, stored in
    the checkpoint (its state record names the rewritten file: a rerun has nothing to do)
    and said in the log with the calibration error before and after."""
    out = tmp_path / "model.pt"
    lines: list[str] = []
    result = train(tiny_set, arch="drn_d_22", out=out, epochs=2, batch_size=4, size=32,
                   val_dir=tiny_set, log=lines.append)
    cal = result.calibration
    assert cal is not None and cal.pixels > 0 and 0.05 <= cal.temperature <= 20
    assert cal.ece_after <= cal.ece_before + 1e-6
    assert drn.load_checkpoint(out).temperature == pytest.approx(cal.temperature)
    assert drn.create_model("drn_d_22", weights=out).drn_config.temperature == pytest.approx(cal.temperature)
    assert any(line.startswith("calibrated on ") and f"temperature {cal.temperature:.3f}" in line
               for line in lines)
    again = train(tiny_set, arch="drn_d_22", out=out, epochs=2, batch_size=4, size=32, log=lines.append)
    assert again.seconds == 0.0
    # Without validation images there is nothing to fit: the checkpoint stays at 1.
    plain = train(tiny_set, arch="drn_d_22", out=tmp_path / "p.pt", epochs=1, batch_size=4,
                  size=32, val_split=0, log=lines.append)
    assert plain.calibration is None and drn.load_checkpoint(tmp_path / "p.pt").temperature == 1.0
