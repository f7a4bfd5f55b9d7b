"""One description of a job's model: the driver's check and every predict actor build it
from the same (resolved) job spec; drn's messages reach the user in terms of flags."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

import drn
from pipeline.errors import JobError
from pipeline.job.model import build_model, describe_model, predictor_for
from pipeline.job.stages import DECODED, PredictActor
from pipeline.spec import JobSpec
from tests.modelkit import authors_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def spec(**kw) -> JobSpec:
    return JobSpec(input="in", output="out", **kw).validate()


def decoded(images: list[np.ndarray]) -> pa.Table:
    rows = {name: [] for name in DECODED.names}
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        for name, value in (("image_id", f"{i}.png"), ("uri", f"/x/{i}.png"), ("status", "ok"),
                            ("error", None), ("height", h), ("width", w), ("in_height", h),
                            ("in_width", w), ("pixels", img.tobytes())):
            rows[name].append(value)
    return pa.table(rows, schema=DECODED)


def test_the_actor_builds_the_model_the_driver_described(tmp_path):
    ckpt = authors_checkpoint(tmp_path / "seg.pth", num_classes=4)
    job = spec(weights=str(ckpt), batch_size=2)
    meta = describe_model(job)
    actor = PredictActor(job)
    assert actor.predictor.model.drn_config.weights_sha256 == meta.weights_sha256
    assert (meta.model, meta.num_classes) == ("drn_d_22", 4)
    images = [np.random.default_rng(i).integers(0, 255, (16, 24, 3), np.uint8) for i in range(3)]
    out = actor(decoded(images))
    assert out.column("status").to_pylist() == ["ok"] * 3
    expected = predictor_for(job, drn.create_model("drn_d_22", weights=str(ckpt))).predict(images)
    for raw, pred in zip(out.column("mask_raw").to_pylist(), expected):
        assert np.array_equal(np.frombuffer(raw, np.uint8).reshape(16, 24), pred.mask)


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "error: cannot build model drn_d_22: drn_d_22: the number of classes is unknown; pass "
         "--num-classes, --classes (a preset such as 'cityscapes' or a label file) or --weights "
         "that carry them"),
    ({"num_classes": 7, "classes": "cityscapes"},
     "error: cannot build model drn_d_22: drn_d_22: --num-classes 7 but label set 'cityscapes' "
     "(--classes) has 19 classes; pass one of them, or make them agree"),
])
def test_model_errors_name_flags(kw, message):
    with pytest.raises(JobError) as info:
        describe_model(spec(**kw))
    assert "error: " + str(info.value) == message


def test_a_checkpoint_of_another_architecture_names_the_model_flag(tmp_path):
    ckpt = authors_checkpoint(tmp_path / "c26.pth", arch="drn_c_26", num_classes=3)
    with pytest.raises(JobError) as info:
        describe_model(spec(weights=str(ckpt)))
    assert str(info.value).endswith("the file looks like drn_c_26: use --model drn_c_26")
    assert "create_model" not in str(info.value)


def test_the_stand_in_costs_nothing_and_labels_uniformly():
    job = spec(stand_in=True, classes="cityscapes")
    meta = describe_model(job)
    assert (meta.model, meta.weights_sha256, meta.num_classes) == ("stand-in", "stand-in", 19)
    model = build_model(job)
    assert sum(p.numel() for p in model.parameters()) == 0
    pred = predictor_for(job, model).predict([np.zeros((9, 11, 3), np.uint8)])[0]
    assert not pred.mask.any() and np.allclose(pred.class_scores, 1 / 19)
    assert pred.class_fraction[0] == 1.0 and pred.confidence == pytest.approx(1 / 19)
    assert describe_model(spec(stand_in=True)).num_classes == 2
