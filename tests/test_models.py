"""The registry and the architectures, parametrised over the registry itself."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drn
from drn.registry import get_builder
from drn.seg import DRNSeg, bilinear_kernel

ISSUE_ORDER = [
    "drn_a_18", "drn_a_34", "drn_a_50", "drn_a_101", "drn_a_152",
    "drn_c_26", "drn_c_42", "drn_c_58",
    "drn_d_22", "drn_d_24", "drn_d_38", "drn_d_40", "drn_d_54", "drn_d_56", "drn_d_105", "drn_d_107",
]
# Parameters of the 1000-class classifiers, in millions (the paper / the authors' README).
PARAMS_M = {
    "drn_a_18": 11.690, "drn_a_34": 21.798, "drn_a_50": 25.557, "drn_a_101": 44.549,
    "drn_a_152": 60.193, "drn_c_26": 21.127, "drn_c_42": 31.235, "drn_c_58": 41.592,
    "drn_d_22": 16.394, "drn_d_24": 21.114, "drn_d_38": 26.502, "drn_d_40": 31.223,
    "drn_d_54": 35.809, "drn_d_56": 40.530, "drn_d_105": 54.801, "drn_d_107": 59.522,
}
LAYERS = {
    "drn_c_26": (1, 1, 2, 2, 2, 2, 1, 1), "drn_d_22": (1, 1, 2, 2, 2, 2, 1, 1),
    "drn_d_24": (1, 1, 2, 2, 2, 2, 2, 2), "drn_c_42": (1, 1, 3, 4, 6, 3, 1, 1),
    "drn_d_38": (1, 1, 3, 4, 6, 3, 1, 1), "drn_d_40": (1, 1, 3, 4, 6, 3, 2, 2),
    "drn_c_58": (1, 1, 3, 4, 6, 3, 1, 1), "drn_d_54": (1, 1, 3, 4, 6, 3, 1, 1),
    "drn_d_56": (1, 1, 3, 4, 6, 3, 2, 2), "drn_d_105": (1, 1, 3, 4, 23, 3, 1, 1),
    "drn_d_107": (1, 1, 3, 4, 23, 3, 2, 2), "drn_a_18": (2, 2, 2, 2), "drn_a_34": (3, 4, 6, 3),
    "drn_a_50": (3, 4, 6, 3), "drn_a_101": (3, 4, 23, 3), "drn_a_152": (3, 8, 36, 3),
}
BOTTLENECK = {"drn_a_50", "drn_a_101", "drn_a_152", "drn_c_58", "drn_d_54", "drn_d_56", "drn_d_105", "drn_d_107"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def odd_input() -> torch.Tensor:
    return torch.randn(1, 3, 37, 53, generator=torch.Generator().manual_seed(0))


def _meta(name: str, num_classes: int | None = 1000) -> nn.Module:
    with torch.device("meta"):
        return get_builder(name)(num_classes=num_classes)


# --- registry -------------------------------------------------------------------------

def test_list_models_in_issue_order():
    assert drn.list_models() == ISSUE_ORDER


def test_list_models_pattern():
    assert drn.list_models("drn_d_*") == ISSUE_ORDER[8:]
    assert drn.list_models("drn_?_5*") == ["drn_a_50", "drn_c_58", "drn_d_54", "drn_d_56"]
    assert drn.list_models("resnet*") == []


def test_register_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="model 'drn_d_22' is already registered"):
        drn.register_model(name="drn_d_22")(lambda *, num_classes=1000: None)


def test_register_new_model_is_listed():
    from drn import registry

    @drn.register_model
    def drn_test_tiny(*, num_classes=1000):
        return get_builder("drn_d_22")(num_classes=num_classes)

    try:
        assert "drn_test_tiny" in drn.list_models("drn_test_*")
    finally:
        del registry._REGISTRY["drn_test_tiny"]
        registry.model_info.cache_clear()


def test_unknown_model_names_close_matches():
    with pytest.raises(ValueError) as info:
        drn.create_model("drn_d_23", num_classes=2)
    assert str(info.value) == (
        "unknown model 'drn_d_23' (close matches: drn_d_22, drn_d_24, drn_d_38, drn_a_34, "
        "drn_c_26); drn.list_models() lists all 16"
    )


@pytest.mark.parametrize("name", ISSUE_ORDER)
def test_model_info(name):
    info = drn.model_info(name)
    assert round(info.num_params / 1e6, 3) == PARAMS_M[name]
    assert info.name == name
    assert info.family == name[:5]
    assert info.layers == LAYERS[name]
    assert info.block == ("bottleneck" if name in BOTTLENECK else "basic")
    expected_channels = 2048 if name.startswith("drn_a") and name in BOTTLENECK else 512
    assert info.feature_channels == expected_channels
    assert drn.model_info(name) is info  # cached
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.num_params = 0


# --- every registered model, both tasks -------------------------------------------------

@pytest.mark.parametrize("name", drn.list_models())
def test_classify_builds_counts_and_runs(name, odd_input):
    model = drn.create_model(name, task="classify")
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == drn.model_info(name).num_params
    assert round(drn.model_info(name).num_params / 1e6, 3) == PARAMS_M[name]
    with torch.no_grad():
        logits = model(odd_input)
        features = model.forward_features(torch.zeros(1, 3, 64, 48))
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()
    assert features.shape == (1, drn.model_info(name).feature_channels, 8, 6)
    config = model.drn_config
    assert (config.arch, config.task, config.num_classes, config.label_set) == (name, "classify", 1000, None)


@pytest.mark.parametrize("name", drn.list_models())
def test_segment_any_size_and_checkpoint_round_trip(name, odd_input, tmp_path):
    model = drn.create_model(name, num_classes=3)
    assert isinstance(model, DRNSeg) and not model.training
    with torch.no_grad():
        logits = model(odd_input)
    assert logits.shape == (1, 3, 37, 53)
    assert torch.isfinite(logits).all()
    assert model.drn_config.weights_sha256.startswith("init:")
    assert model.drn_config.weights_source is None

    path = drn.save_checkpoint(model, tmp_path / f"{name}.pth")
    loaded = drn.create_model(name, weights=path)  # nothing else: the file says it all
    with torch.no_grad():
        assert torch.equal(loaded(odd_input), logits)
    config = loaded.drn_config
    assert (config.arch, config.task, config.num_classes) == (name, "segment", 3)
    assert config.weights_source == str(path)
    assert config.weights_sha256 == drn.load_checkpoint(path).sha256
    assert not loaded.up.weight.requires_grad


# --- architecture facts ------------------------------------------------------------------

def _dilations(stage: nn.Module) -> list[int]:
    return [m.dilation[0] for m in stage.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]


@pytest.mark.parametrize("name", ["drn_c_26", "drn_c_58", "drn_d_22", "drn_d_40", "drn_d_105"])
def test_drn_stages_dilate_and_degrid(name):
    model = _meta(name)
    for stage, dilation in [("layer3", 1), ("layer4", 1), ("layer5", 2), ("layer6", 4), ("layer7", 2), ("layer8", 1)]:
        assert set(_dilations(getattr(model, stage))) == {dilation}, stage
    strides = {s: max(m.stride[0] for m in getattr(model, s).modules() if isinstance(m, nn.Conv2d))
               for s in ["layer1", "layer2", "layer3", "layer4", "layer5", "layer6", "layer7", "layer8"]}
    assert strides == {"layer1": 1, "layer2": 2, "layer3": 2, "layer4": 2,
                       "layer5": 1, "layer6": 1, "layer7": 1, "layer8": 1}
    if name.startswith("drn_c"):
        assert all(not block.residual for block in [*model.layer7, *model.layer8])
        assert all(block.residual for block in model.layer1)
    else:  # DRN-D: plain conv-BN-ReLU stacks, no blocks at the ends
        for stage in ["layer0", "layer1", "layer2", "layer7", "layer8"]:
            kinds = {type(m) for m in getattr(model, stage).children()}
            assert kinds == {nn.Conv2d, nn.BatchNorm2d, nn.ReLU}, stage
    assert isinstance(model.fc, nn.Conv2d) and model.fc.weight.shape == (1000, 512, 1, 1)
    assert model.fc.bias is not None


def test_bottleneck_dilates_only_its_3x3_conv():
    block = _meta("drn_d_54").layer6[0]
    assert (block.conv1.dilation, block.conv2.dilation, block.conv3.dilation) == ((1, 1), (4, 4), (1, 1))
    assert block.conv2.padding == (4, 4)


@pytest.mark.parametrize("name", ["drn_a_18", "drn_a_50"])
def test_drn_a_dilation_follows_torchvision(name):
    model = _meta(name)
    conv = "conv1" if name == "drn_a_18" else "conv2"
    first3, rest3 = getattr(model.layer3[0], conv), getattr(model.layer3[1], conv)
    first4, rest4 = getattr(model.layer4[0], conv), getattr(model.layer4[1], conv)
    assert (first3.dilation[0], rest3.dilation[0], first4.dilation[0], rest4.dilation[0]) == (1, 2, 2, 4)
    assert first3.stride == first4.stride == (1, 1)
    assert isinstance(model.fc, nn.Linear) and isinstance(model.avgpool, nn.AdaptiveAvgPool2d)


def test_checkpoint_key_layouts():
    """Key names the published checkpoints use, spot-checked."""
    d22 = _meta("drn_d_22").state_dict()
    for key in ["layer0.0.weight", "layer0.1.running_var", "layer1.0.weight", "layer2.1.num_batches_tracked",
                "layer3.0.downsample.0.weight", "layer5.0.conv2.weight", "layer8.0.weight", "fc.bias"]:
        assert key in d22, key
    c26 = _meta("drn_c_26").state_dict()
    for key in ["conv1.weight", "bn1.running_mean", "layer1.0.conv1.weight", "layer2.0.downsample.1.weight",
                "layer7.0.conv2.weight", "layer8.0.bn2.bias", "fc.weight"]:
        assert key in c26, key
    assert "layer7.0.downsample.0.weight" in _meta("drn_c_58").state_dict()  # 2048 -> 512
    a50 = _meta("drn_a_50").state_dict()
    for key in ["conv1.weight", "bn1.bias", "layer1.0.downsample.0.weight", "layer4.2.bn3.running_var", "fc.weight"]:
        assert key in a50, key
    assert a50["fc.weight"].shape == (1000, 2048)
    assert len(_meta("drn_a_18").state_dict()) == 122  # as torchvision's resnet18


@pytest.mark.parametrize(("name", "first_keys"), [
    ("drn_d_22", ["base.0.0.weight", "base.1.0.weight", "base.8.0.weight"]),
    ("drn_c_26", ["base.0.weight", "base.1.weight", "base.3.0.conv1.weight", "base.10.0.conv1.weight"]),
    ("drn_a_18", ["base.0.weight", "base.1.weight", "base.4.0.conv1.weight", "base.7.1.conv2.weight"]),
])
def test_segmentation_keys_number_backbone_children(name, first_keys):
    with torch.device("meta"):
        keys = DRNSeg(get_builder(name)(num_classes=None), 19).state_dict().keys()
    assert all(k in keys for k in first_keys)
    assert {k.split(".")[0] for k in keys} == {"base", "seg", "up"}
    assert [k for k in keys if not k.startswith("base.")] == ["seg.weight", "seg.bias", "up.weight"]


def test_up_is_a_frozen_bilinear_x8():
    model = drn.create_model("drn_d_22", num_classes=2)
    up = model.up
    assert (up.kernel_size, up.stride, up.padding, up.groups, up.bias) == ((16, 16), (8, 8), (4, 4), 2, None)
    assert not up.weight.requires_grad
    assert torch.equal(up.weight[1, 0], bilinear_kernel(16))
    assert bilinear_kernel(16)[7, 7] == pytest.approx((1 - 1 / 16) ** 2)
    with torch.no_grad():
        smooth = up(torch.ones(1, 2, 5, 5))
    assert smooth.shape == (1, 2, 40, 40)
    assert torch.allclose(smooth[..., 4:-4, 4:-4], torch.ones(1, 2, 32, 32))


def test_padding_is_zeros_bottom_right_then_crop(odd_input):
    model = drn.create_model("drn_d_22", num_classes=4)
    with torch.no_grad():
        cropped = model(odd_input)
        padded = model(F.pad(odd_input, (0, 3, 0, 3)))  # 37 x 53 -> 40 x 56
    assert padded.shape == (1, 4, 40, 56)
    assert torch.equal(cropped, padded[..., :37, :53])


def test_init_is_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = drn.create_model("drn_d_22", num_classes=3, seed=0)
    b = drn.create_model("drn_d_22", num_classes=3, seed=0)
    c = drn.create_model("drn_d_22", num_classes=3, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.drn_config.weights_sha256 == b.drn_config.weights_sha256 != c.drn_config.weights_sha256
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert len(a.drn_config.weights_sha256) == len("init:") + 64


def test_create_model_arguments():
    with pytest.raises(ValueError, match="unknown task 'detect'; use one of segment, classify"):
        drn.create_model("drn_d_22", task="detect")
    with pytest.raises(ValueError, match=r"drn_d_22: the number of classes is unknown; pass num_classes="):
        drn.create_model("drn_d_22")
    with pytest.raises(ValueError, match="num_classes=7 but label set 'cityscapes' has 19 classes"):
        drn.create_model("drn_d_22", num_classes=7, classes="cityscapes")
    model = drn.create_model("drn_d_22", classes="cityscapes")
    assert model.drn_config.num_classes == 19 and model.seg.out_channels == 19
    assert model.drn_config.label_set == drn.get_preset("cityscapes")
    assert model.drn_config.mean == drn.get_preset("cityscapes").mean
    classifier = drn.create_model("drn_d_22", task="classify", num_classes=10)
    assert classifier.fc.out_channels == 10 and classifier.drn_config.mean == (0.485, 0.456, 0.406)


def test_import_drn_is_light():
    import subprocess
    import sys

    code = "import sys, drn; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
