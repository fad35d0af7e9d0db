"""The model zoo: every model builds, runs on 28x28 and 32x32, and has the structure its paper describes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from graphprune.errors import InvalidModelError
from graphprune.zoo import ZOO_NAMES, build, default_input_shape


def _convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_every_zoo_model_builds_and_runs(name: str) -> None:
    model = build(name).eval()
    with torch.no_grad():
        for size in (28, 32):
            out = model(torch.randn(2, 1, size, size))
            assert out.shape == (2, 10)
            assert torch.isfinite(out).all()
    assert default_input_shape(name) == (1, 1, 28, 28)


def test_zoo_names_are_the_contract_names() -> None:
    assert set(ZOO_NAMES) == {
        "resnet20",
        "resnet56",
        "resnet110",
        "vgg11_bn",
        "vgg16_bn",
        "vgg19_bn",
        "mobilenetv2",
        "densenet_bc40",
        "regnetx",
    }


def test_channels_and_classes_are_configurable() -> None:
    model = build("resnet20", in_channels=3, num_classes=7).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert default_input_shape("resnet20", in_channels=3) == (1, 3, 28, 28)


@pytest.mark.parametrize(
    ("name", "convs"), [("resnet20", 19 + 2), ("resnet56", 55 + 2), ("resnet110", 109 + 2)]
)
def test_resnets_have_option_b_projections(name: str, convs: int) -> None:
    model = build(name)
    assert len(_convs(model)) == convs  # 6n+1 3x3 convs plus two 1x1 projection shortcuts
    projections = [m for m in _convs(model) if m.kernel_size == (1, 1)]
    assert [(p.in_channels, p.out_channels, p.stride) for p in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    assert {m.out_channels for m in _convs(model)} == {16, 32, 64}


@pytest.mark.parametrize(("name", "convs"), [("vgg11_bn", 8), ("vgg16_bn", 13), ("vgg19_bn", 16)])
def test_vgg_has_bn_after_every_conv(name: str, convs: int) -> None:
    model = build(name)
    assert len(_convs(model)) == convs
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == convs
    assert isinstance(model.classifier[0], nn.Flatten)
    assert model.classifier[1].in_features == 512


def test_mobilenetv2_has_depthwise_inverted_residuals() -> None:
    model = build("mobilenetv2")
    depthwise = [m for m in _convs(model) if m.groups > 1]
    assert len(depthwise) == 17
    assert all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert sum(getattr(m, "use_residual", False) for m in model.modules()) == 10


def test_mobilenetv2_width_scales_channels() -> None:
    from graphprune.zoo.mobilenetv2 import MobileNetV2

    half = MobileNetV2(width=0.5)
    assert half.features[0][0].out_channels == 16
    assert half(torch.randn(1, 1, 28, 28)).shape == (1, 10)


def test_regnetx_has_x_blocks_with_16_channel_conv_groups() -> None:
    model = build("regnetx")
    grouped = [m for m in _convs(model) if m.groups > 1]
    assert len(grouped) == 13  # one per X block: depths 1, 1, 4, 7
    assert {m.in_channels // m.groups for m in grouped} == {16}
    assert [m.out_channels for m in grouped] == [32, 64] + [160] * 4 + [400] * 7
    assert [m.stride for m in grouped if m.stride != (1, 1)] == [(2, 2)] * 3
    assert model.classifier.in_features == 400


def test_densenet_bc40_concatenates_and_compresses() -> None:
    model = build("densenet_bc40")
    assert len(_convs(model)) == 39  # stem + 18 bottlenecks x 2 + 2 transitions
    # 24 + 6*12 = 96 -> 48; 48 + 72 = 120 -> 60; 60 + 72 = 132
    transitions = [m.conv for m in model.modules() if type(m).__name__ == "Transition"]
    assert [(t.in_channels, t.out_channels) for t in transitions] == [(96, 48), (120, 60)]
    assert model.fc.in_features == 132


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(InvalidModelError, match="resnet20.*densenet_bc40"):
        build("resnet21")
    with pytest.raises(InvalidModelError):
        default_input_shape("resnet21")


def test_torchvision_models_are_random_and_adaptable() -> None:
    model = build("torchvision:resnet18")
    assert model.fc.out_features == 1000
    assert default_input_shape("torchvision:resnet18") == (1, 3, 224, 224)
    gray = build("torchvision:resnet18", in_channels=1, num_classes=10).eval()
    assert gray.conv1.in_channels == 1 and gray.conv1.out_channels == 64
    assert gray(torch.randn(2, 1, 64, 64)).shape == (2, 10)
    with pytest.raises(InvalidModelError, match="resnet18"):
        build("torchvision:resnet19")


def test_module_callable_spec() -> None:
    model = build("graphprune.zoo.mobilenetv2:MobileNetV2", in_channels=3, num_classes=5).eval()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 5)
    with pytest.raises(InvalidModelError, match="Cannot import"):
        build("graphprune.zoo:no_such_model")
    with pytest.raises(InvalidModelError, match="not a torch.nn.Module"):
        build("builtins:dict")
