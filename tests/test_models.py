"""The registry and the architectures, parametrised over the registry itself.

Facts (parameter counts, output shapes) are checked for every architecture on the meta
device (no memory, no arithmetic); every architecture also gets one backward pass on a
tiny input; one real forward and checkpoint round trip is run per family.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import drn
from drn.catalog import get_builder
from drn.labels import LabelSet
from drn.models import BasicBlock
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
# One architecture per family (the smallest) for the real forward passes and round trips.
PER_FAMILY = ["drn_a_18", "drn_c_26", "drn_d_22"]


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
        assert drn.model_info("drn_test_tiny").num_params == drn.model_info("drn_d_22").num_params
    finally:
        del registry._REGISTRY["drn_test_tiny"]
    assert drn.list_models("drn_test_*") == []


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


# --- every registered model, on the meta device ------------------------------------------

def _meta_input(height: int, width: int) -> torch.Tensor:
    return torch.empty(1, 3, height, width, device="meta")


@pytest.mark.parametrize("name", drn.list_models())
def test_classify_counts_and_shapes_on_meta(name):
    model = _meta(name)
    assert sum(p.numel() for p in model.parameters()) == drn.model_info(name).num_params
    assert round(drn.model_info(name).num_params / 1e6, 3) == PARAMS_M[name]
    features = []  # the stride-8 map, caught on its way into the pooling
    model.avgpool.register_forward_hook(lambda module, args, out: features.append(args[0]))
    assert model(_meta_input(37, 53)).shape == (1, 1000)
    assert features[0].shape == (1, drn.model_info(name).feature_channels, 5, 7)  # ceil(/8)


@pytest.mark.parametrize("name", drn.list_models())
def test_segment_counts_and_any_size_on_meta(name):
    info = drn.model_info(name)
    with torch.device("meta"):
        model = DRNSeg(get_builder(name)(num_classes=None), 3).eval()
    fc = 1000 * info.feature_channels + 1000  # the classifier's head, weight and bias
    seg, up = 3 * info.feature_channels + 3, 3 * 16 * 16
    assert sum(p.numel() for p in model.parameters()) == info.num_params - fc + seg + up
    for height, width in [(37, 53), (1, 1)]:
        assert model(_meta_input(height, width)).shape == (1, 3, height, width)


# --- one real model per family -----------------------------------------------------------

@pytest.mark.parametrize("name", PER_FAMILY)
def test_classify_builds_and_runs(name, odd_input):
    model = drn.create_model(name, task="classify")
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == drn.model_info(name).num_params
    with torch.no_grad():
        logits = model(odd_input)
        features = model.forward_features(torch.zeros(1, 3, 64, 48))
    assert logits.shape == (1, 1000)
    assert torch.isfinite(logits).all()
    assert features.shape == (1, drn.model_info(name).feature_channels, 8, 6)
    config = model.drn_config
    assert (config.arch, config.task, config.num_classes) == (name, "classify", 1000)
    assert config.label_set == LabelSet.default(1000)


@pytest.mark.parametrize("name", PER_FAMILY)
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
    assert [p.name for p in tmp_path.iterdir()] == [f"{name}.pth"]  # no temporary file left
    loaded = drn.create_model(name, weights=path)  # nothing else: the file says it all
    with torch.no_grad():
        assert torch.equal(loaded(odd_input), logits)
    config = loaded.drn_config
    assert (config.arch, config.task, config.num_classes) == (name, "segment", 3)
    assert config.label_set == model.drn_config.label_set == LabelSet.default(3)
    assert config.weights_source == str(path)
    assert config.weights_sha256 == drn.load_checkpoint(path).sha256
    assert not loaded.up.weight.requires_grad


# --- every registered model, one backward pass -------------------------------------------

def _unused_by_design(model: DRNSeg) -> set[str]:
    """Parameters the forward pass never reads: the 1x1 ``downsample`` DRN-C keeps in its
    non-residual degridding blocks (drn_c_58's layer7: 2048 -> 512) so that the authors'
    checkpoints load strictly."""
    unused = set()
    for module_name, module in model.named_modules():
        if isinstance(module, BasicBlock) and not module.residual and module.downsample is not None:
            unused |= {f"{module_name}.downsample.{p}" for p, _ in module.downsample.named_parameters()}
    return unused


@pytest.mark.parametrize("name", drn.list_models())
def test_backward_reaches_every_trainable_parameter(name):
    # 16 x 16 is the smallest input that trains: 2 x 2 at stride 8, so BatchNorm sees
    # more than one value per channel in training mode.
    generator = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DRNSeg(get_builder(name)(num_classes=None), 2).train()
    x = torch.randn(1, 3, 16, 16, generator=generator)
    target = torch.randint(0, 2, (1, 16, 16), generator=generator)
    loss = F.cross_entropy(model(x), target)
    assert torch.isfinite(loss)
    loss.backward()

    assert not model.up.weight.requires_grad and model.up.weight.grad is None
    unused = _unused_by_design(model)
    assert bool(unused) == (name == "drn_c_58")
    for param_name, param in model.named_parameters():
        if not param.requires_grad:
            assert param_name == "up.weight"
        elif param_name in unused:
            assert param.grad is None, param_name
        else:
            assert param.grad is not None, param_name
            assert torch.isfinite(param.grad).all(), param_name
    first = next(model.base.parameters())  # the stem conv: the far end from the loss
    assert model.seg.weight.grad.abs().sum() > 0 and first.grad.abs().sum() > 0


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
    with pytest.raises(ValueError, match=r"drn_d_22: the number of classes is unknown; pass num_classes, classes "):
        drn.create_model("drn_d_22")
    with pytest.raises(ValueError, match=r"num_classes 7 but label set 'cityscapes' \(classes\) has 19 classes"):
        drn.create_model("drn_d_22", num_classes=7, classes="cityscapes")
    model = drn.create_model("drn_d_22", classes="cityscapes")
    assert model.drn_config.num_classes == 19 and model.seg.out_channels == 19
    assert model.drn_config.label_set == drn.get_preset("cityscapes")
    assert model.drn_config.mean == drn.get_preset("cityscapes").mean
    classifier = drn.create_model("drn_d_22", task="classify", num_classes=10)
    assert classifier.fc.out_channels == 10 and classifier.drn_config.mean == (0.485, 0.456, 0.406)
    assert classifier.drn_config.label_set == LabelSet.default(10)


def test_label_set_is_never_none():
    model = drn.create_model("drn_d_22", num_classes=3)
    labels = model.drn_config.label_set
    assert labels == LabelSet.default(3)
    assert (labels.name, labels.class_names) == ("default", ("class_0", "class_1", "class_2"))
    assert (model.drn_config.mean, model.drn_config.std) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    config = dataclasses.replace(model.drn_config, label_set=None)
    assert config.label_set == LabelSet.default(3)


def test_too_many_classes_is_refused_before_building():
    message = "a mask holds at most 65,536 classes; got 65537"
    with pytest.raises(ValueError, match=f"^drn_d_22: {message}$"):
        drn.create_model("drn_d_22", num_classes=65537)
    with pytest.raises(ValueError, match=f"^drn_d_22: {message}$"):
        drn.create_model("drn_d_22", task="classify", num_classes=65537)
    with pytest.raises(ValueError, match=f"^{message}$"), torch.device("meta"):
        DRNSeg(get_builder("drn_d_22")(num_classes=None), 65537)
    with pytest.raises(ValueError, match="^drn_d_22: num_classes must be >= 1, got 0$"):
        drn.create_model("drn_d_22", num_classes=0)
    with torch.device("meta"):
        assert DRNSeg(get_builder("drn_d_22")(num_classes=None), 65536).num_classes == 65536


def test_import_drn_is_light_and_the_registry_imports_no_models():
    import subprocess
    import sys

    code = "\n".join([
        "import sys, drn",
        "print('torch' in sys.modules)",
        "import drn.registry, drn.labels, drn.io, drn.metrics",  # the torch-free modules
        "print('torch' in sys.modules, 'drn.models' in sys.modules)",
        "import drn.models",  # entering the cycle's old start directly works
        "print(len(drn.registry.registered_names()), 'drn.catalog' in sys.modules)",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n") == ["False", "False False", "16 False", ""]
