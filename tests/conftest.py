"""Shared fixtures: torch models exported to ONNX once per test session and reused by every test.

Exporting (above all with the dynamo exporter) costs far more than pruning, so `exported` caches
each (model, exporter, fold_bn, external_data) export in a session folder; under pytest-xdist each
worker has its own cache. Tests must treat the cached files as read-only (copy one to tmp_path before
handing it to anything that could write next to it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# One thread per test process, set before anything imports torch: small models train several times
# faster single-threaded, above all when the cores are shared (pytest -n 2 on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every analysis in the tests checks each op rule's contract (graphprune.analysis.graph._check_rule_outputs).
os.environ["GRAPHPRUNE_STRICT_RULES"] = "1"

TORCHVISION = "torchvision:"
# Extra constructor arguments for torchvision models that need them (googlenet: no auxiliary heads,
# explicit init so torchvision does not warn).
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": False, "init_weights": True}}
# Smallest input each model accepts with the legacy exporter: VGG's adaptive 7x7 pool needs a feature
# map divisible by 7, so 224; every other torchvision classifier exports at 64x64.
TORCHVISION_SIZE: dict[str, int] = {"vgg11_bn": 224, "vgg16_bn": 224}
TORCHVISION_DEFAULT_SIZE = 64


def input_shape(name: str) -> tuple[int, ...]:
    """Batch-1 input: 1x28x28 for the project zoo, 3xSxS (S as small as the model allows) for torchvision."""
    if name.startswith(TORCHVISION):
        size = TORCHVISION_SIZE.get(name.removeprefix(TORCHVISION), TORCHVISION_DEFAULT_SIZE)
        return (1, 3, size, size)
    return (1, 1, 28, 28)


def build_module(name: str) -> Any:
    """A seeded, randomly initialised torch module for a zoo name or "torchvision:ARCH"."""
    import torch

    torch.manual_seed(0)
    if name.startswith(TORCHVISION):
        import torchvision

        arch = name.removeprefix(TORCHVISION)
        return torchvision.models.get_model(arch, weights=None, **TORCHVISION_KWARGS.get(arch, {}))
    from graphprune.zoo import build

    return build(name)


class ExportCache:
    """Exports each (model, exporter, fold_bn, external_data) combination once, into its own folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: dict[tuple[str, str, bool, bool | None], Path] = {}

    def __call__(
        self, name: str, *, exporter: str = "legacy", fold_bn: bool = False, external_data: bool | None = None
    ) -> Path:
        key = (name, exporter, fold_bn, external_data)
        if key not in self.paths:
            import torch

            from graphprune.torch_bridge.export import export

            folder = self.root / "-".join(str(part) for part in key).replace(":", "_")
            folder.mkdir()
            path = folder / "model.onnx"
            example = torch.randn(*input_shape(name), generator=torch.Generator().manual_seed(0))
            export(
                build_module(name),
                example,
                path,
                exporter=exporter,
                fold_bn=fold_bn,
                external_data=external_data,
            )
            self.paths[key] = path
        return self.paths[key]


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> ExportCache:
    """`exported(name, exporter=..., fold_bn=..., external_data=...)` -> path of the cached export."""
    pytest.importorskip("torch")
    return ExportCache(tmp_path_factory.mktemp("exported"))
