"""Torch-Pruning's users' recurring bugs, replayed on graphprune.

Each model is a small torch module with its channels flowing through a tricky op, exported the way users
export for pruning (legacy exporter, BN kept, eval mode, opset 17, dynamic batch), pruned from its file at
two ratios and verified against the masked reference.  Every case also checks that the input file is not
modified, that the pruned model runs at a new batch size, and that verification rejects a model pruned
with a different plan.  Graphprune's rule: exact, or leave the group whole and say why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import blocked_ops, export_torch, init_shape, prune_checked, sha256

from graphprune.api import PruneResult, analyze_model, prune
from graphprune.errors import VerificationError
from graphprune.planning import PlanOptions
from graphprune.surgery.verify import verify_pruning

torch = pytest.importorskip("torch")
nn = torch.nn

RATIOS = (0.3, 0.5)
SHAPE = (1, 3, 8, 8)


def cbr(cin: int, cout: int, groups: int = 1, k: int = 3) -> nn.Sequential:
    """conv -> BN -> ReLU with non-trivial BN statistics (so BN export and slicing both matter)."""
    bn = nn.BatchNorm2d(cout)
    generator = torch.Generator().manual_seed(cin * 100 + cout)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=generator)
        bn.bias.uniform_(-0.5, 0.5, generator=generator)
        bn.running_mean.uniform_(-0.5, 0.5, generator=generator)
        bn.running_var.uniform_(0.5, 2.0, generator=generator)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), bn, nn.ReLU())


class Net(nn.Module):
    """stem -> body (the case under test) -> cbr -> global pool -> linear classifier."""

    def __init__(self, body: Callable[[torch.Tensor], torch.Tensor], width: int, stem: int = 8) -> None:
        super().__init__()
        self.stem = cbr(3, stem)
        self.body = body
        self.tail = cbr(width, 8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.tail(self.body(self.stem(x)))
        return self.fc(y.mean((2, 3)))


class Lambda(nn.Module):
    """A body given as a function over named sub-modules."""

    def __init__(self, fn: Callable[..., torch.Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        self.parts = nn.ModuleDict(modules)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fn(y, **self.parts)


def shuffle(y: torch.Tensor, groups: int) -> torch.Tensor:
    n, c, h, w = y.shape
    return y.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)


# (body, width of the body's output); built lazily so collection stays fast.
CASES: dict[str, Callable[[], tuple[nn.Module, int]]] = {
    "cat_self": lambda: (Lambda(lambda y: torch.cat([y, y], 1)), 16),
    "concat_into_residual": lambda: (
        Lambda(lambda y, a, b, c: torch.cat([a(y), b(y)], 1) + c(y), a=cbr(8, 4), b=cbr(8, 4), c=cbr(8, 8)),
        8,
    ),
    "chunk_into_grouped_convs": lambda: (
        Lambda(
            lambda y, a, b: torch.cat([a(y.chunk(2, 1)[0]), b(y.chunk(2, 1)[1])], 1),
            a=cbr(4, 4, groups=2),
            b=cbr(4, 4, groups=4),
        ),
        8,
    ),
    "split_into_grouped_convs": lambda: (
        Lambda(
            lambda y, a, b: torch.cat([a(s) if i else b(s) for i, s in enumerate(y.split([2, 6], 1))], 1),
            a=cbr(6, 6, groups=2),
            b=cbr(2, 4, groups=2),
        ),
        10,
    ),
    "grouped_uneven": lambda: (nn.Sequential(cbr(8, 12, groups=4), cbr(12, 9, groups=3)), 9),
    "conv_with_bias": lambda: (
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Hardswish()),
        6,
    ),
    "shufflenet_v2_unit": lambda: (
        Lambda(
            lambda y, branch: shuffle(torch.cat([y.chunk(2, 1)[0], branch(y.chunk(2, 1)[1])], 1), 2),
            branch=nn.Sequential(cbr(4, 4, k=1), cbr(4, 4, groups=4), cbr(4, 4, k=1)),
        ),
        8,
    ),
    "shufflenet_v1_unit": lambda: (
        Lambda(
            lambda y, a, dw, b: b(dw(shuffle(a(y), 2))) + y,
            a=cbr(8, 8, groups=2, k=1),
            dw=cbr(8, 8, groups=8),
            b=cbr(8, 8, groups=2, k=1),
        ),
        8,
    ),
    "flip_channels": lambda: (Lambda(lambda y, a: a(y.flip(1)) + y, a=cbr(8, 8)), 8),
    "index_channels_reversed": lambda: (Lambda(lambda y: y[:, [7, 6, 5, 4, 3, 2, 1, 0]]), 8),
    "strided_channels": lambda: (Lambda(lambda y: y[:, ::2]), 4),
    "group_norm": lambda: (nn.GroupNorm(2, 8), 8),
    "layer_norm_over_channels": lambda: (
        Lambda(lambda y, ln: ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2), ln=nn.LayerNorm(8)),
        8,
    ),
    "layer_norm_chw": lambda: (nn.LayerNorm([8, 8, 8]), 8),
    "softmax_over_channels": lambda: (Lambda(lambda y: y * y.softmax(1)), 8),
    "mean_over_channels": lambda: (Lambda(lambda y: y - y.mean(1, keepdim=True)), 8),
    "pixel_shuffle": lambda: (nn.PixelShuffle(2), 2),
    "convnext_mlp": lambda: (
        Lambda(
            lambda y, up, down: y + down(nn.functional.gelu(up(y.permute(0, 2, 3, 1)))).permute(0, 3, 1, 2),
            up=nn.Linear(8, 16),
            down=nn.Linear(16, 8),
        ),
        8,
    ),
}

# Cases whose stem channels must be left whole, with the op type that blocks them.
LEFT_WHOLE = {
    "strided_channels": "Slice",
    "layer_norm_over_channels": "LayerNormalization",
    "layer_norm_chw": "LayerNormalization",
    "softmax_over_channels": "Softmax",
    "mean_over_channels": "ReduceMean",
    "pixel_shuffle": "DepthToSpace",
}


def exported(name: str, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    body, width = CASES[name]()
    path = tmp_path / f"{name}.onnx"
    export_torch(Net(body, width), SHAPE, path)
    return path


def stem_kept(result: PruneResult) -> int:
    return init_shape(result.model, "stem.0.weight")[0]


def assert_catches_wrong_plan(path: Path, result: PruneResult) -> None:
    """The model of a different (random) plan must fail verification against this plan's reference."""
    for seed in range(5):
        other = prune(path, PlanOptions(ratio=0.5), criterion="random", seed=seed, verify=False)
        if not np.array_equal(other.removed, result.removed):
            with pytest.raises(VerificationError):
                verify_pruning(result.dep, result.removed, other.model)
            return
    pytest.fail("five random plans all equal the l1 plan: the model has too few prunable channels")


@pytest.mark.parametrize("name", list(CASES))
def test_prunes_exactly_or_leaves_whole(name: str, tmp_path: Path) -> None:
    path = exported(name, tmp_path)
    digest = sha256(path)
    dep = analyze_model(onnx.load(str(path)))
    results = [prune_checked(path, ratio, batch=3) for ratio in RATIOS]
    assert sha256(path) == digest  # the input file is never modified
    if name in LEFT_WHOLE:
        assert LEFT_WHOLE[name] in blocked_ops(dep)
        assert all(stem_kept(r) == 8 for r in results)
    else:
        assert stem_kept(results[1]) < 8
    assert_catches_wrong_plan(path, results[1])


def test_channels_folded_into_the_batch_axis(tmp_path: Path) -> None:
    """x.reshape(n * c, h * w).softmax(-1).reshape(n, c, h, w): per-channel, so prunable, but the
    reshape targets are computed from Shape at run time and must stay batch-dynamic."""
    torch.manual_seed(0)

    def body(y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.shape
        return y.reshape(n * c, h * w).softmax(-1).reshape(n, c, h, w)

    path = tmp_path / "fold.onnx"
    export_torch(Net(Lambda(body), 8), SHAPE, path)
    for ratio in RATIOS:
        prune_checked(path, ratio, batch=3)


def test_interpolate_to_a_size_keeps_the_batch_dynamic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    body = Lambda(lambda y: nn.functional.interpolate(y, size=(16, 16), mode="nearest"))
    path = tmp_path / "interpolate.onnx"
    export_torch(Net(body, 8), SHAPE, path)
    for ratio in RATIOS:
        assert stem_kept(prune_checked(path, ratio)) < 8


def test_prelu_as_exported_is_pruned(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "prelu.onnx"
    export_torch(Net(nn.PReLU(8), 8), SHAPE, path)
    for ratio in RATIOS:
        assert stem_kept(prune_checked(path, ratio)) < 8


def test_verification_rejects_wrong_concat_offsets(tmp_path: Path) -> None:
    """A consumer that reads a concat's channels at the wrong offsets (the classic concat bug) is caught."""
    path = exported("concat_into_residual", tmp_path)
    result = prune(path, PlanOptions(ratio=0.5))
    broken = onnx.ModelProto()
    broken.CopyFrom(result.model)
    weight = next(init for init in broken.graph.initializer if init.name == "tail.0.weight")
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(np.roll(values, 1, axis=1), weight.name))
    with pytest.raises(VerificationError):
        verify_pruning(result.dep, result.removed, broken)


def test_grouped_conv_after_shuffle_is_never_split_unevenly(tmp_path: Path) -> None:
    """ShuffleNet v1: the shuffle ties channels across the groups of the next grouped conv; whatever is
    removed, every grouped conv loses the same count per group."""
    path = exported("shufflenet_v1_unit", tmp_path)
    for ratio in RATIOS:
        result = prune_checked(path, ratio)
        for node in result.model.graph.node:
            if node.op_type == "Conv":
                group = next(a.i for a in node.attribute if a.name == "group")
                weight = init_shape(result.model, node.input[1])
                assert weight[0] % group == 0


def test_residual_concat_ties_branches(tmp_path: Path) -> None:
    """cat([a, b]) + c: c's channels are tied to a's and b's at the concat offsets (one group of 8)."""
    dep = analyze_model(onnx.load(str(exported("concat_into_residual", tmp_path))))
    group = next(g for g in dep.prunable_groups if any(b.node == "/body/c/c.0/Conv" for b in g.blocks))
    assert {b.node for b in group.blocks} == {f"/body/{m}/{m}.0/Conv" for m in "abc"}
    assert group.size == group.prunable.size == 8
