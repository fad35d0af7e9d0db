"""Reference models: CIFAR-style ResNets, VGG-BN, MobileNetV2, DenseNet-BC, RegNetX, plus torchvision and
any callable.

`build` accepts three spellings:
- a zoo name from `ZOO_NAMES` (defaults: 1 input channel, 10 classes, sized for 28x28 / 32x32 images);
- "torchvision:NAME", a torchvision classification model, randomly initialised (weights=None, nothing is
  downloaded; defaults 3 channels, 1000 classes; another `in_channels` replaces the stem conv);
- "pkg.module:callable", called with whichever of in_channels / num_classes were given.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import partial

from torch import nn

from graphprune.errors import InvalidModelError
from graphprune.zoo.densenet import DenseNetBC
from graphprune.zoo.mobilenetv2 import MobileNetV2
from graphprune.zoo.regnet import RegNetX
from graphprune.zoo.resnet import resnet
from graphprune.zoo.vgg import vgg_bn

__all__ = ["TORCHVISION_SUITE", "ZOO_NAMES", "build", "default_input_shape"]

_ZOO: dict[str, Callable[..., nn.Module]] = {
    "resnet20": partial(resnet, 20),
    "resnet56": partial(resnet, 56),
    "resnet110": partial(resnet, 110),
    "vgg11_bn": partial(vgg_bn, 11),
    "vgg16_bn": partial(vgg_bn, 16),
    "vgg19_bn": partial(vgg_bn, 19),
    "mobilenetv2": MobileNetV2,
    "densenet_bc40": partial(DenseNetBC, 40, 12, 0.5),
    "regnetx": RegNetX,
}
ZOO_NAMES: tuple[str, ...] = tuple(_ZOO)
# The torchvision classifiers graphprune is tested and benchmarked on (Torch-Pruning's usual suite plus
# the two it cannot handle, shufflenet_v2 and convnext).
TORCHVISION_SUITE: tuple[str, ...] = (
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "shufflenet_v2_x0_5",
    "googlenet",
    "squeezenet1_1",
    "mnasnet0_5",
    "vgg11_bn",
    "convnext_tiny",
)
TORCHVISION_PREFIX = "torchvision:"


def build(name: str, *, in_channels: int | None = None, num_classes: int | None = None) -> nn.Module:
    """Build a randomly initialised model from a zoo name, "torchvision:NAME" or "pkg.module:callable"."""
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(name.removeprefix(TORCHVISION_PREFIX), in_channels, num_classes)
    if ":" in name:
        return _build_callable(name, in_channels, num_classes)
    factory = _ZOO.get(name.lower())
    if factory is None:
        raise InvalidModelError(
            f"Unknown model '{name}'; use one of {', '.join(ZOO_NAMES)}, 'torchvision:NAME' or 'pkg.module:callable'."
        )
    return factory(in_channels=in_channels or 1, num_classes=num_classes or 10)


def default_input_shape(name: str, *, in_channels: int | None = None) -> tuple[int, ...]:
    """Batch-1 input shape a model from `build(name)` expects: (1,C,28,28) for the zoo, (1,C,224,224) for torchvision."""
    if name.startswith(TORCHVISION_PREFIX):
        return (1, in_channels or 3, 224, 224)
    if name.lower() in _ZOO:
        return (1, in_channels or 1, 28, 28)
    raise InvalidModelError(
        f"No default input shape is known for model '{name}'; give the input shape explicitly."
    )


def _build_torchvision(arch: str, in_channels: int | None, num_classes: int | None) -> nn.Module:
    """A torchvision classification model with random weights; a non-RGB input gets a new stem conv."""
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch not in known:
        raise InvalidModelError(
            f"Unknown torchvision classification model '{arch}'; use one of {', '.join(sorted(known))}."
        )
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes or 1000)
    if in_channels is not None and in_channels != 3:
        _replace_stem(model, in_channels)
    return model


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    """Swap the first Conv2d for one reading `in_channels` channels (same geometry, fresh weights)."""
    name, stem = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    new = nn.Conv2d(
        in_channels,
        stem.out_channels,
        stem.kernel_size,
        stem.stride,
        stem.padding,
        stem.dilation,
        stem.groups,
        stem.bias is not None,
        stem.padding_mode,
    )
    parent_name, _, child = name.rpartition(".")
    model.get_submodule(parent_name).register_module(child, new)


def _build_callable(spec: str, in_channels: int | None, num_classes: int | None) -> nn.Module:
    """Import "pkg.module:callable" and call it with the channel/class counts that were given."""
    module_name, _, attr = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attr.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise InvalidModelError(
            f"Cannot import model factory '{spec}' ({exc}); check the 'pkg.module:callable' spelling."
        ) from exc
    if not callable(target):
        raise InvalidModelError(f"Model factory '{spec}' is not callable; point it at a function or class.")
    kwargs = {
        key: value
        for key, value in (("in_channels", in_channels), ("num_classes", num_classes))
        if value is not None
    }
    model = target(**kwargs)
    if not isinstance(model, nn.Module):
        raise InvalidModelError(
            f"Model factory '{spec}' returned {type(model).__name__}, not a torch.nn.Module; return a module."
        )
    return model
