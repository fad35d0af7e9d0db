"""One test per op rule on tiny hand-built ONNX graphs (no torch).

Each test asserts the dependency structure (prunable groups and channels, which node blocked) and then
prunes at two ratios with verification against the masked reference, checking that output shapes and
the dynamic batch survive and that the weights actually shrank.  Most graphs follow one pattern:
stem (conv -> BN -> Relu, 8 channels) -> op under test -> head (conv 8 -> Relu -> conv 6 = output), so an
op that passes channels through leaves 2 prunable groups of 8 and an op that blocks leaves only 1.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import pytest
from helpers import (
    Net,
    blocked_ops,
    grouped_block,
    init_shape,
    node_attr,
    prunable_channels,
    prune_checked,
    structure,
)

from graphprune.analysis.graph import DependencyGraph
from graphprune.analysis.summary import analysis_summary
from graphprune.api import analyze_model, prune
from graphprune.errors import PlanError
from graphprune.planning import PlanOptions
from graphprune.planning.planner import predicted_macs
from graphprune.report.summary import render_analysis
from graphprune.runtime.cost import count_cost
from graphprune.surgery.apply import check_removal

RATIOS = (0.5, 0.3)
PASS = (2, 16)  # stem and head groups, 8 channels each
BLOCK = (1, 8)  # only the head group is left


def check(
    model: onnx.ModelProto,
    expected: tuple[int, int],
    *,
    blocked: Iterable[str] = (),
    shrinks: bool = True,
    batch: int = 3,
) -> DependencyGraph:
    """Assert (prunable groups, prunable channels) and the blocking op types, then prune at each ratio."""
    dep = analyze_model(model)
    assert (len(dep.prunable_groups), prunable_channels(dep)) == expected
    assert blocked_ops(dep) == set(blocked)
    for ratio in RATIOS:
        prune_checked(model, ratio, shrinks=shrinks, batch=batch)
    return dep


def pruned(model: onnx.ModelProto, ratio: float = 0.5) -> onnx.ModelProto:
    return prune_checked(model, ratio).model


def through(op_type: str, *extra: str, opset: int = 17, **attrs: object) -> onnx.ModelProto:
    """stem -> op_type(stem, *extra) -> head."""
    net = Net(opset=opset)
    return net.build(net.head(net.op(op_type, [net.stem(), *extra], **attrs)))


# convolutions -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_plain_conv_chain(bias: bool) -> None:
    net = Net()
    y = net.op("Relu", [net.conv(net.x, 8, bias=bias)])
    y = net.op("Relu", [net.conv(y, 8, bias=bias)])
    model = net.build(net.conv(y, 6, bias=bias))
    check(model, PASS)
    small = pruned(model)
    assert init_shape(small, "conv1.w") == (4, 4, 3, 3)
    assert init_shape(small, "conv3.w") == (4, 4, 3, 3)
    assert init_shape(small, "conv5.w") == (6, 4, 3, 3)
    if bias:
        assert init_shape(small, "conv1.b") == (4,)


def test_grouped_conv_removes_equally_per_group() -> None:
    net = Net()
    model = net.build(net.head(net.op("Relu", [net.conv(net.stem(), 8, group=2)])))
    dep = check(model, (3, 24))
    assert [(node, len(parts)) for node, parts in dep.segments] == [("conv4", 2), ("conv4", 2)]
    small = pruned(model)
    assert init_shape(small, "conv4.w") == (4, 2, 3, 3)
    assert node_attr(small, "conv4", "group") == 2


def test_grouped_conv_loses_whole_conv_groups_when_widths_keep_them() -> None:
    """RegNet's bottleneck: the grouped conv's inputs and outputs are each a group of their own, so
    conv groups can go whole (fewer groups, same width per group); a --round-to of a conv group's
    width plans that way, and the pruned model equals the masked reference."""
    model = grouped_block()
    dep = analyze_model(model)
    assert dep.droppable == {"conv4"}
    summary = analysis_summary(dep, "block", 0, 0)
    assert summary["grouped_convs"] == {
        "conv4": {"groups": 4, "channels_per_group": [4, 4], "droppable": True}
    }
    assert summary["conv_groups_round_to"] == 4
    text = render_analysis(summary)
    assert "grouped convs: 1, 1 of them can lose whole conv groups (with --round-to 4, or a latency" in text
    cost = count_cost(dep.model, dep.shapes)
    result = prune_checked(model, PlanOptions(ratio=0.5, round_to=4))
    assert node_attr(result.model, "conv4", "group") == 2
    assert init_shape(result.model, "conv4.w") == (8, 4, 3, 3)
    assert predicted_macs(dep, cost, result.removed) == pytest.approx(result.after.macs)
    # removing fewer channels than a conv group's width thins every conv group instead
    thin = prune_checked(model, 0.5)
    assert node_attr(thin.model, "conv4", "group") == 4
    assert init_shape(thin.model, "conv4.w") == (8, 2, 3, 3)
    assert predicted_macs(dep, cost, thin.removed) == pytest.approx(thin.after.macs)


def test_conv_groups_go_whole_when_they_write_more_channels_than_they_read() -> None:
    """4 conv groups of 4 inputs and 8 outputs each: two go, inputs and outputs together."""
    result = prune_checked(grouped_block(widen=2), PlanOptions(ratio=0.5, round_to=8))
    assert node_attr(result.model, "conv4", "group") == 2
    assert init_shape(result.model, "conv4.w") == (16, 4, 3, 3)


def test_conv_groups_go_with_their_inputs_and_outputs_or_not_at_all() -> None:
    dep = analyze_model(grouped_block())
    conv = dep.grouped_convs[0]
    removed = np.zeros(dep.roots.size, dtype=bool)
    removed[conv.inputs[0]] = True
    with pytest.raises(PlanError, match="every input channel of a conv group but not every output"):
        check_removal(dep, removed)
    removed[conv.outputs[0]] = True
    check_removal(dep, removed)
    removed[conv.outputs[1][:2]] = True
    with pytest.raises(PlanError, match="unequal channel counts"):
        check_removal(dep, removed)


def test_grouped_conv_tied_to_its_own_input_keeps_its_groups() -> None:
    """A residual sum ties the grouped conv's inputs to its outputs: dropping a conv group would remove
    channels it both reads and writes, so it only loses equal counts per conv group."""
    model = grouped_block(residual=True)
    dep = analyze_model(model)
    assert dep.droppable == frozenset()
    assert analysis_summary(dep, "block", 0, 0)["grouped_convs"]["conv4"]["droppable"] is False
    result = prune_checked(model, PlanOptions(ratio=0.5, round_to=4))
    assert node_attr(result.model, "conv4", "group") == 4


def test_grouped_conv_channels_not_divisible_by_ratio() -> None:
    net = Net()
    model = net.build(net.head(net.conv(net.stem(6), 6, group=3)))
    dep = analyze_model(model)
    assert len(dep.prunable_groups) == 3
    small = pruned(model, 0.5)
    assert init_shape(small, "conv4.w") == (3, 1, 3, 3)  # one channel out of each group, both sides
    prune_checked(model, 0.3)  # 1 of 6 cannot be split evenly over 3 groups: stays exact


def test_depthwise_conv_ties_input_and_output() -> None:
    net = Net()
    dw = net.op("Relu", [net.bn(net.conv(net.stem(), 8, group=8))])
    model = net.build(net.head(net.conv(dw, 8, k=1)))
    dep = check(model, (3, 24))
    stem = dep.prunable_groups[0]
    assert {"conv1.w", "bn2.gamma", "conv4.w", "bn5.gamma"} <= {m.name for m in stem.members}
    small = pruned(model)
    assert init_shape(small, "conv4.w") == (4, 1, 3, 3)
    assert node_attr(small, "conv4", "group") == 4


def test_depthwise_conv_with_channel_multiplier() -> None:
    net = Net()
    model = net.build(net.head(net.op("Relu", [net.conv(net.stem(4), 8, group=4)])))
    dep = check(model, (2, 12))
    assert dep.prunable_groups[0].size == 4  # 8 depthwise outputs follow 4 input channels
    small = pruned(model)
    assert init_shape(small, "conv4.w") == (4, 1, 3, 3)
    assert node_attr(small, "conv4", "group") == 2


def test_conv_transpose() -> None:
    net = Net()
    model = net.build(net.head(net.op("Relu", [net.conv_transpose(net.stem(), 8)])))
    check(model, (3, 24))
    small = pruned(model)
    assert init_shape(small, "convtranspose4.w") == (4, 4, 2, 2)
    assert init_shape(small, "convtranspose4.b") == (4,)


# normalisation ----------------------------------------------------------------------------------
def test_batch_norm_parameters_follow_channels() -> None:
    net = Net()
    model = net.build(net.head(net.stem()))
    check(model, PASS)
    small = pruned(model)
    for param in ("gamma", "beta", "mean", "var"):
        assert init_shape(small, f"bn2.{param}") == (4,)


def test_instance_norm() -> None:
    net = Net()
    model = net.build(net.head(net.instance_norm(net.conv(net.x, 8))))
    check(model, PASS)
    assert init_shape(pruned(model), "inorm2.gamma") == (4,)


# per-channel activations -----------------------------------------------------------------------
UNARY = [
    ("Relu", {}, 17),
    ("LeakyRelu", {"alpha": 0.1}, 17),
    ("Sigmoid", {}, 17),
    ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, 17),
    ("HardSwish", {}, 17),
    ("Tanh", {}, 17),
    ("Elu", {"alpha": 0.7}, 17),
    ("Softplus", {}, 17),
    ("Erf", {}, 17),
    ("Identity", {}, 17),
    ("Dropout", {}, 17),
    ("Mish", {}, 18),
    ("Gelu", {}, 20),
    ("Gelu", {"approximate": "tanh"}, 20),
]


@pytest.mark.parametrize(("op_type", "attrs", "opset"), UNARY, ids=[f"{u[0]}-{u[2]}" for u in UNARY])
def test_unary_activation_passes_channels(op_type: str, attrs: dict, opset: int) -> None:
    check(through(op_type, opset=opset, **attrs), PASS)


def test_clip_with_constant_bounds() -> None:
    net = Net()
    low, high = net.const(0.0), net.const(6.0)
    check(net.build(net.head(net.op("Clip", [net.stem(), low, high]))), PASS)


@pytest.mark.parametrize("slope_shape", [(8, 1, 1), (1,)])
def test_prelu_slope_follows_channels(slope_shape: tuple[int, ...]) -> None:
    net = Net()
    slope = net.random(*slope_shape, name="slope", low=0.0, high=0.5)
    model = net.build(net.head(net.op("PRelu", [net.stem(), slope])))
    check(model, PASS)
    expected = (4, 1, 1) if slope_shape[0] == 8 else (1,)
    assert init_shape(pruned(model), "slope") == expected


def test_erf_gelu_decomposition() -> None:
    net = Net()
    y = net.stem()
    erf = net.op("Erf", [net.op("Div", [y, net.const(np.sqrt(2.0))])])
    gelu = net.op("Mul", [net.op("Mul", [y, net.op("Add", [erf, net.const(1.0)])]), net.const(0.5)])
    check(net.build(net.head(gelu)), PASS)


# elementwise and broadcasting -------------------------------------------------------------------
@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
def test_binary_op_ties_its_operands(op_type: str) -> None:
    net = Net()
    a = net.conv(net.x, 8)
    b = net.conv(net.x, 8)
    if op_type == "Div":
        b = net.op("Add", [net.op("Sigmoid", [b]), net.const(0.5)])
    model = net.build(net.head(net.op(op_type, [a, b])))
    dep = check(model, PASS)
    assert [blk.node for blk in dep.prunable_groups[0].blocks] == ["conv1", "conv2"]
    small = pruned(model)
    assert init_shape(small, "conv1.w")[0] == init_shape(small, "conv2.w")[0] == 4


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div"])
@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 8, 1, 1), (8, 8, 8)])
def test_per_channel_constant_is_sliced(op_type: str, shape: tuple[int, ...]) -> None:
    net = Net()
    const = net.random(*shape, name="k", low=0.5, high=1.5)
    model = net.build(net.head(net.op(op_type, [net.stem(), const])))
    check(model, PASS)
    expected = list(shape)
    expected[-3] = 4
    assert init_shape(pruned(model), "k") == tuple(expected)


def test_constant_on_the_left_of_sub() -> None:
    net = Net()
    const = net.random(8, 1, 1, name="k")
    model = net.build(net.head(net.op("Sub", [const, net.stem()])))
    check(model, PASS)
    assert init_shape(pruned(model), "k") == (4, 1, 1)


def test_squeeze_excitation_mul() -> None:
    """[N,C,1,1] x [N,C,H,W]: the excitation conv's outputs are tied to the scaled channels."""
    net = Net()
    y = net.stem()
    squeeze = net.op("Relu", [net.conv(net.op("GlobalAveragePool", [y]), 2, k=1)])
    excite = net.op("Sigmoid", [net.conv(squeeze, 8, k=1)])
    model = net.build(net.head(net.op("Mul", [y, excite])))
    dep = check(model, (3, 18))
    stem_group = next(g for g in dep.prunable_groups if g.name == "conv1")
    assert {b.node for b in stem_group.blocks} == {"conv1", "conv7"}
    small = pruned(model)
    assert init_shape(small, "conv5.w") == (1, 4, 1, 1)
    assert init_shape(small, "conv7.w") == (4, 1, 1, 1)


def test_residual_sum_with_the_graph_input_blocks() -> None:
    net = Net(channels=8)
    y = net.op("Relu", [net.conv(net.x, 8)])
    model = net.build(net.head(net.op("Add", [y, net.x])))
    dep = check(model, BLOCK, blocked={"Add"})
    assert "without a channel mapping" in dep.blocked_nodes["add3 (Add)"]


def test_where_ties_its_branches() -> None:
    net = Net()
    y = net.stem()
    positive = net.op("Greater", [y, net.const(0.5)])
    check(net.build(net.head(net.op("Where", [positive, y, net.op("Neg", [y])]))), PASS)


def test_intermediate_model_output_is_never_narrowed() -> None:
    net = Net()
    y = net.stem()
    model = net.build(net.head(y), y)
    dep = check(model, BLOCK)
    assert "output relu3" in dep.blocked_nodes


def test_weight_shared_by_two_convs_ties_both_axes() -> None:
    """One initializer used by two convs (a recurrent block): its rows and columns go together."""
    net = Net()
    y = net.stem(4)
    shared = net.random(4, 4, 3, 3, name="shared", low=-0.3, high=0.3)
    first = net.op("Relu", [net.op("Conv", [y, shared], kernel_shape=[3, 3], pads=[1] * 4)])
    model = net.build(net.head(net.op("Conv", [first, shared], kernel_shape=[3, 3], pads=[1] * 4)))
    check(model, (2, 12))
    assert init_shape(pruned(model), "shared") == (2, 2, 3, 3)


# concat, split, slice, gather -------------------------------------------------------------------
def test_concat_lays_channels_at_offsets() -> None:
    net = Net()
    a = net.op("Relu", [net.conv(net.x, 4)])
    b = net.op("Relu", [net.conv(net.x, 6)])
    model = net.build(net.head(net.op("Concat", [a, b], axis=1)))
    check(model, (3, 18))
    assert init_shape(pruned(model), "conv6.w")[1] == 2 + 3


def test_concat_of_a_tensor_with_itself() -> None:
    net = Net()
    y = net.stem(4)
    model = net.build(net.head(net.op("Concat", [y, y], axis=1)))
    check(model, (2, 12))
    assert init_shape(pruned(model), "conv5.w")[1] == 4  # each removed channel goes from both copies


def test_concat_with_the_graph_input_keeps_that_part() -> None:
    net = Net()
    model = net.build(net.head(net.op("Concat", [net.x, net.stem()], axis=1)))
    check(model, PASS)
    assert init_shape(pruned(model), "conv5.w")[1] == 4 + 4


def test_inception_branches_concat() -> None:
    net = Net()
    y = net.stem()
    branches = [
        net.conv(y, 4, k=1),
        net.conv(y, 4),
        net.op("MaxPool", [y], kernel_shape=[3, 3], pads=[1] * 4),
    ]
    model = net.build(net.head(net.op("Concat", branches, axis=1)))
    check(model, (4, 24))
    assert init_shape(pruned(model), "conv8.w")[1] == 2 + 2 + 4


def test_concat_on_a_spatial_axis_ties_channels() -> None:
    net = Net()
    a, b = net.conv(net.x, 8), net.conv(net.x, 8)
    model = net.build(net.head(net.op("Concat", [a, b], axis=2)))
    dep = check(model, PASS)
    assert len(dep.prunable_groups[0].blocks) == 2


@pytest.mark.parametrize(
    ("opset", "sizes", "attrs"),
    [(17, [3, 5], {}), (17, None, {}), (18, None, {"num_outputs": 3})],
    ids=["sizes", "equal", "num_outputs-uneven"],
)
def test_split_on_channels(opset: int, sizes: list[int] | None, attrs: dict) -> None:
    net = Net(opset=opset)
    inputs = [net.stem()] + ([net.const(sizes, dtype=np.int64)] if sizes else [])
    parts = net.op("Split", inputs, outputs=attrs.get("num_outputs", 2), axis=1, **attrs)
    summed = net.op("Sum", [net.conv(p, 6) for p in parts])
    model = net.build(net.conv(net.op("Relu", [summed]), 6))
    check(model, (2, 14))
    small = pruned(model)
    in_channels = [init_shape(small, n.input[1])[1] for n in small.graph.node if n.input[0] in parts]
    assert min(in_channels) >= 1  # each part keeps at least one channel
    assert sum(in_channels) == init_shape(small, "conv1.w")[0] < 8


def test_split_on_a_spatial_axis_passes_channels() -> None:
    net = Net()
    top, bottom = net.op("Split", [net.stem()], outputs=2, axis=2)
    check(net.build(net.head(net.op("Concat", [bottom, top], axis=2))), PASS)


@pytest.mark.parametrize(
    ("starts", "ends", "axes"), [([2], [7], [1]), ([-6], [-1], [-3]), ([1], [100], [1])], ids=str
)
def test_unit_step_channel_slice(starts: list[int], ends: list[int], axes: list[int]) -> None:
    net = Net()
    bounds = [net.const(v, dtype=np.int64) for v in (starts, ends, axes)]
    model = net.build(net.head(net.op("Slice", [net.stem(), *bounds])))
    check(model, PASS)


def test_overlapping_channel_slices_summed() -> None:
    net = Net()
    y = net.stem()
    first, last = ([net.const(v, dtype=np.int64) for v in (b, e, [1])] for b, e in (([0], [5]), ([3], [8])))
    model = net.build(net.head(net.op("Add", [net.op("Slice", [y, *first]), net.op("Slice", [y, *last])])))
    check(model, (2, 11))  # channel i is tied to channel i + 3


def test_slice_of_channels_and_strided_space_together() -> None:
    net = Net()
    bounds = [net.const(v, dtype=np.int64) for v in ([1, 0], [6, 8], [1, 3], [1, 2])]
    check(net.build(net.head(net.op("Slice", [net.stem(), *bounds]))), PASS)


def test_spatial_slice_with_step_passes_channels() -> None:
    net = Net()
    bounds = [net.const(v, dtype=np.int64) for v in ([0], [8], [3], [2])]
    check(net.build(net.head(net.op("Slice", [net.stem(), *bounds]))), PASS)


def test_strided_channel_slice_blocks() -> None:
    net = Net()
    bounds = [net.const(v, dtype=np.int64) for v in ([0], [8], [1], [2])]
    model = net.build(net.head(net.op("Slice", [net.stem(), *bounds])))
    dep = check(model, BLOCK, blocked={"Slice"})
    assert "strided" in dep.blocked_nodes["slice4 (Slice)"]
    assert init_shape(pruned(model), "conv1.w")[0] == 8


def test_reversed_channel_slice_is_exact() -> None:
    """x[:, ::-1] as ONNX writes it, and a reversed sub-range: both prune exactly."""
    for bounds in ([-1], [-(2**62)]), ([6], [1]):
        net = Net()
        constants = [net.const(v, dtype=np.int64) for v in (*bounds, [1], [-1])]
        model = net.build(net.head(net.op("Slice", [net.stem(), *constants])))
        for ratio in RATIOS:
            prune_checked(model, ratio)
        assert init_shape(pruned(model), "conv1.w")[0] < 8


@pytest.mark.parametrize("indices", [[7, 6, 5, 4, 3, 2, 1, 0], [0, 0, 3, 5, 7, 1], [-1, -2, 0, 3]], ids=str)
def test_gather_constant_channel_indices(indices: list[int]) -> None:
    net = Net()
    picked = net.op("Gather", [net.stem(), net.const(indices, dtype=np.int64)], axis=1)
    model = net.build(net.head(picked))
    check(model, PASS)


def test_reversed_gather_added_to_its_input() -> None:
    net = Net()
    y = net.stem()
    flipped = net.op("Gather", [y, net.const(list(range(7, -1, -1)), dtype=np.int64)], axis=1)
    check(net.build(net.head(net.op("Add", [y, flipped]))), (2, 12))  # channel i tied to 7 - i


def test_gather_single_channel_blocks() -> None:
    net = Net()
    one = net.op("Gather", [net.stem(), net.const(3, dtype=np.int64)], axis=1)
    model = net.build(net.head(net.op("Unsqueeze", [one, net.const([1], dtype=np.int64)])))
    check(model, BLOCK, blocked={"Gather"})


def test_gather_on_a_spatial_axis_passes_channels() -> None:
    net = Net()
    picked = net.op("Gather", [net.stem(), net.const([7, 0, 3], dtype=np.int64)], axis=3)
    check(net.build(net.head(picked)), PASS)


# pooling, reductions, padding, resizing ---------------------------------------------------------
@pytest.mark.parametrize(
    ("op_type", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_pooling_passes_channels(op_type: str, attrs: dict) -> None:
    check(through(op_type, **attrs), PASS)


def test_maxpool_with_indices_blocks() -> None:
    net = Net()
    values, _ = net.op("MaxPool", [net.stem()], outputs=2, kernel_shape=[2, 2], strides=[2, 2])
    check(net.build(net.head(values)), BLOCK, blocked={"MaxPool"})


@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceMax"])
def test_spatial_reduction_passes_channels(op_type: str) -> None:
    check(through(op_type, axes=[2, 3], keepdims=1), PASS)


def test_reduction_with_axes_input_and_no_keepdims_into_gemm() -> None:
    net = Net(opset=18)
    pooled = net.op("ReduceMean", [net.stem(), net.const([-2, -1], dtype=np.int64)], keepdims=0)
    model = net.build(net.gemm(pooled, 10))
    check(model, (1, 8))
    assert init_shape(pruned(model), "gemm5.w") == (10, 4)


@pytest.mark.parametrize("op_type", ["ReduceMean", "ReduceMax"])
def test_reduction_across_channels_blocks(op_type: str) -> None:
    model = through(op_type, axes=[1], keepdims=1)
    dep = check(model, BLOCK, blocked={op_type})
    assert "across the channel axis" in dep.blocked_nodes[f"{op_type.lower()}4 ({op_type})"]


def test_spatial_pad_passes_channels() -> None:
    net = Net()
    pads = net.const([0, 0, 1, 2, 0, 0, 2, 1], dtype=np.int64)
    check(net.build(net.head(net.op("Pad", [net.stem(), pads], mode="reflect"))), PASS)


def test_pad_with_axes_input() -> None:
    net = Net(opset=18)
    pads = net.const([1, 1, 1, 1], dtype=np.int64)
    axes = net.const([2, 3], dtype=np.int64)
    check(net.build(net.head(net.op("Pad", [net.stem(), pads, net.const(0.5), axes]))), PASS)


def test_channel_pad_blocks() -> None:
    net = Net()
    pads = net.const([0, 1, 0, 0, 0, 2, 0, 0], dtype=np.int64)
    check(net.build(net.head(net.op("Pad", [net.stem(), pads]))), BLOCK, blocked={"Pad"})


def test_resize_by_scales() -> None:
    net = Net()
    scales = net.const([1, 1, 2, 2])
    check(net.build(net.head(net.op("Resize", [net.stem(), "", scales], mode="nearest"))), PASS)


def test_resize_by_full_sizes() -> None:
    """A static-batch `sizes` input names the channel count, which surgery must rewrite."""
    net = Net()
    sizes = net.const([1, 8, 16, 16], dtype=np.int64)
    model = net.build(net.head(net.op("Resize", [net.stem(), "", "", sizes], mode="nearest")))
    check(model, PASS, batch=1)


def test_resize_by_spatial_sizes_with_axes() -> None:
    net = Net(opset=18)
    sizes = net.const([16, 12], dtype=np.int64)
    resized = net.op("Resize", [net.stem(), "", "", sizes], mode="linear", axes=[2, 3])
    check(net.build(net.head(resized)), PASS)


def test_resize_by_spatial_scales_with_axes() -> None:
    net = Net(opset=18)
    scales = net.const([2.0, 3.0])
    resized = net.op("Resize", [net.stem(), "", scales], mode="nearest", axes=[2, 3])
    check(net.build(net.head(resized)), PASS)


# flatten, reshape and fully connected layers ----------------------------------------------------
@pytest.mark.parametrize(
    ("op_type", "shape"), [("Flatten", None), ("Reshape", [0, -1]), ("Reshape", [-1, 256])], ids=str
)
def test_flatten_into_gemm_gives_each_channel_a_block(op_type: str, shape: list[int] | None) -> None:
    net = Net()
    extra = [net.const(shape, dtype=np.int64)] if shape else []
    flat = net.op(op_type, [net.stem(4), *extra])
    model = net.build(net.gemm(flat, 10))
    check(model, (1, 4))
    assert init_shape(pruned(model), "gemm5.w") == (10, 128)


def test_reshape_into_matmul() -> None:
    net = Net()
    flat = net.op("Reshape", [net.stem(4), net.const([0, -1], dtype=np.int64)])
    model = net.build(net.matmul(flat, 10))
    check(model, (1, 4))
    assert init_shape(pruned(model), "matmul5.w") == (128, 10)


def test_channels_folded_into_the_batch_axis() -> None:
    """[N,C,H,W] -> [N*C, H*W] -> Softmax per row -> [N,C,H,W] is per-channel: prune exactly or block."""
    net = Net()
    rows = net.op("Softmax", [net.op("Reshape", [net.stem(), net.const([-1, 64], dtype=np.int64)])], axis=-1)
    model = net.build(net.head(net.op("Reshape", [rows, net.const([-1, 8, 8, 8], dtype=np.int64)])))
    for ratio in RATIOS:
        prune_checked(model, ratio)


def test_flatten_onto_the_batch_axis_with_nothing_to_prune() -> None:
    net = Net()
    model = net.build(net.gemm(net.op("Flatten", [net.stem()], axis=2), 5))
    assert structure(model) == (0, 0)
    result = prune(model, PlanOptions(ratio=0.5))
    assert result.verification is not None and result.verification.ok
    assert not result.removed.any()
    assert "channels are folded into the batch axis" in " ".join(result.dep.blocked_nodes.values())


@pytest.mark.parametrize("trans_b", [True, False])
def test_gemm_hidden_units(trans_b: bool) -> None:
    net = Net()
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [net.stem(4)])])
    hidden = net.op("Relu", [net.gemm(flat, 16, trans_b=trans_b)])
    model = net.build(net.gemm(hidden, 10, trans_b=trans_b))
    check(model, (2, 20))
    small = pruned(model)
    assert init_shape(small, "gemm6.w") == ((8, 2) if trans_b else (2, 8))
    assert init_shape(small, "gemm6.b") == (8,)


def test_matmul_hidden_units_with_bias_add() -> None:
    net = Net()
    flat = net.op("Flatten", [net.op("GlobalAveragePool", [net.stem(4)])])
    hidden = net.op("Relu", [net.op("Add", [net.matmul(flat, 16), net.random(16, name="bias")])])
    model = net.build(net.matmul(hidden, 10))
    check(model, (2, 20))
    small = pruned(model)
    assert init_shape(small, "bias") == (8,)
    assert init_shape(small, "matmul9.w") == (8, 10)


# channel shuffle, softmax -----------------------------------------------------------------------
@pytest.mark.parametrize(("groups", "batch_dim"), [(2, -1), (2, 0), (4, 0)])
def test_channel_shuffle_ties_channels_across_groups(groups: int, batch_dim: int) -> None:
    net = Net()
    shape = net.const([batch_dim, groups, 8 // groups, 8, 8], dtype=np.int64)
    swapped = net.op("Transpose", [net.op("Reshape", [net.stem(), shape])], perm=[0, 2, 1, 3, 4])
    back = net.const([-1, 8, 8, 8] if batch_dim == -1 else [0, -1, 8, 8], dtype=np.int64)
    model = net.build(net.head(net.op("Reshape", [swapped, back])))
    dep = check(model, (2, 12))
    assert sorted(g.size for g in dep.prunable_groups) == [4, 8]  # 8 channels, removed in pairs
    assert init_shape(pruned(model), "conv1.w")[0] == 4


def test_softmax_over_channels_blocks() -> None:
    dep = check(through("Softmax", axis=1), BLOCK, blocked={"Softmax"})
    assert "softmax4 (Softmax)" in dep.blocked_nodes


def test_softmax_over_a_spatial_axis_passes_channels() -> None:
    check(through("Softmax", axis=-1), PASS)


# ops without a rule ------------------------------------------------------------------------------
def test_layer_norm_over_channels_blocks() -> None:
    net = Net()
    nhwc = net.op("Transpose", [net.stem()], perm=[0, 2, 3, 1])
    normed = net.op("LayerNormalization", [nhwc, net.random(8), net.random(8)], axis=-1)
    model = net.build(net.head(net.op("Transpose", [normed], perm=[0, 3, 1, 2])))
    dep = check(model, BLOCK, blocked={"LayerNormalization"})
    assert "no channel rule" in dep.blocked_nodes["layernormalization5 (LayerNormalization)"]


@pytest.mark.parametrize(
    ("op_type", "params", "opset", "attrs"),
    [
        ("DepthToSpace", 0, 17, {"blocksize": 2}),
        ("SpaceToDepth", 0, 17, {"blocksize": 2}),
        ("LpNormalization", 0, 17, {"axis": 1}),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_op_without_rule_blocks(op_type: str, params: int, opset: int, attrs: dict) -> None:
    net = Net(opset=opset)
    extra = [net.random(8) for _ in range(params)]
    model = net.build(net.head(net.op(op_type, [net.stem(), *extra], **attrs)))
    dep = check(model, BLOCK, blocked={op_type})
    assert f"{op_type.lower()}4 ({op_type})" in dep.blocked_nodes


def test_custom_domain_op_blocks() -> None:
    net = Net(domains=("com.microsoft",))
    model = net.build(net.head(net.op("Gelu", [net.stem()], domain="com.microsoft")))
    dep = check(model, BLOCK, blocked={"Gelu"})
    assert "custom-domain" in dep.blocked_nodes["gelu4 (Gelu)"]
