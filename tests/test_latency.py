"""Latency-aware planning on toys with known per-layer costs (a fake measurement stands in for
onnxruntime, so no test here depends on this machine's speed): the allocation prunes where latency is
saved, widths snap to the steps the profile found fast, tables of other models or providers are
refused in one line, and latency-targeted plans are verified like any other."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import weakref
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import Net, grouped_block, init_shape, node_attr, prune_checked

from graphprune import api
from graphprune.api import LatencySource, analyze_model
from graphprune.onnxutil import sha256_file
from graphprune.planning import Planner, PlanOptions
from graphprune.planning.latency import LatencyModel, layer_specs
from graphprune.planning.planner import predicted_macs
from graphprune.runtime import profile
from graphprune.runtime.cost import count_cost
from graphprune.runtime.profile import (
    WEIGHTED_KERNELS,
    LatencyTable,
    Timing,
    kernel_times,
    profile_model,
)
from graphprune.runtime.session import make_session

Cost = Callable[[int, int], float]


def chain() -> onnx.ModelProto:
    """conv1 8->16, conv4 16->24, head conv7 24->6 (3x3, BN + Relu between); groups conv1 and conv4."""
    net = Net(channels=8, size=8)
    x = net.op("Relu", [net.bn(net.conv(net.x, 16))])
    x = net.op("Relu", [net.bn(net.conv(x, 24))])
    return net.build(net.conv(x, 6))


def fake_table(
    model: onnx.ModelProto, costs: dict[tuple[int, int], Cost], sha: str | None = None, block: int = 1
) -> LatencyTable:
    """A latency table whose layer of full widths (in, out) costs costs[(in, out)](kept_in, kept_out) ms;
    the whole model costs the sum of its layers."""

    dep = analyze_model(model)
    return profile_model(
        dep.model, layer_specs(dep), model_sha256=sha, measure=fake_measure(costs), timing=Timing(block=block)
    )


def fake_measure(costs: dict[tuple[int, int], Cost]) -> Callable[[onnx.ModelProto, int], float]:
    """profile_model's `measure` for fake_table: a layer graph costs its entry of `costs`, any other
    graph (the whole model, the canary) the sum of the full layers."""

    def measure(graph: onnx.ModelProto, batch: int) -> float:
        if not graph.graph.name.startswith("layer "):
            return sum(cost(*full) for full, cost in costs.items())
        full = tuple(int(c) for c in graph.graph.name.split()[2].split("->"))
        weight = next(i for i in graph.graph.initializer if i.name == "w")
        return costs[full](int(weight.dims[1]), int(weight.dims[0]))

    return measure


def linear(scale: float) -> Cost:
    return lambda cin, cout: scale * cin * cout


def kept_widths(model: onnx.ModelProto) -> tuple[int, int]:
    return init_shape(model, "conv1.w")[0], init_shape(model, "conv4.w")[0]


@pytest.mark.parametrize("budget", ["latency", "macs"])
@pytest.mark.parametrize("expensive", ["first", "second"])
def test_latency_objective_prunes_where_latency_is_saved(expensive: str, budget: str) -> None:
    """Equal importance everywhere: HALP's greedy takes channels where they save the most ms, under a
    latency budget or a MACs budget alike (each conv of the chain does about as many MACs per channel)."""
    heavy, light = linear(1.0), linear(0.01)
    costs = {(8, 16): heavy, (16, 24): light, (24, 6): light}
    if expensive == "second":
        costs = {(8, 16): light, (16, 24): light, (24, 6): heavy}
    model = chain()
    table = fake_table(model, costs)
    dep = analyze_model(model)
    latency = LatencyModel(dep, table)
    cost = count_cost(dep.model, dep.shapes)
    scores = {g.index: np.ones(g.size) for g in dep.prunable_groups}
    target = {"target_latency": 0.6} if budget == "latency" else {"target_macs": 0.6}

    def within(removed: np.ndarray) -> bool:
        if budget == "latency":
            return latency.predict(removed) <= 0.6 * table.end_to_end_ms
        return predicted_macs(dep, cost, removed) <= 0.6 * cost.macs

    options = PlanOptions(**target, global_ranking=True, objective="latency")
    removed = Planner(dep, scores, options, latency).plan(cost)
    assert within(removed)
    first, second = (int(removed[b.start : b.start + b.size].sum()) for b in dep.table.blocks[:2])
    assert (first > second) if expensive == "first" else (second > first), (first, second)
    # the plain global ranking removes by score alone (and its widths still snap to the table's steps)
    by_count = Planner(dep, scores, PlanOptions(**target, global_ranking=True), latency).plan(cost)
    assert within(by_count)


def residual() -> onnx.ModelProto:
    """A trunk of 16 written by conv1 and conv3 (summed) and read by conv2 and conv4, around an
    expansion of 24 written by conv2 and read by conv3: the trunk spans four layers, the expansion two."""
    net = Net(channels=8, size=8)
    trunk = net.op("Relu", [net.bn(net.conv(net.x, 16))])
    expansion = net.op("Relu", [net.bn(net.conv(trunk, 24))])
    summed = net.op("Add", [trunk, net.bn(net.conv(expansion, 16))])
    return net.build(net.conv(summed, 6))


def test_latency_objective_weighs_a_channel_by_the_layers_it_lives_in() -> None:
    """Equal scores and equal cost per multiply: a trunk channel saves about twice the ms of an
    expansion channel (62 against 32 multiplies) as it lives in twice the layers.  Counted once, its
    importance makes the trunk the cheaper cut (what cut MobileNetV2's trunks to the bone); counted
    per layer, the expansion saves slightly more per unit of importance, and is cut first."""
    model = residual()
    costs = {full: linear(1.0) for full in ((8, 16), (16, 24), (24, 16), (16, 6))}
    table = fake_table(model, costs)
    dep = analyze_model(model)
    latency = LatencyModel(dep, table)
    scores = {g.index: np.ones(g.size) for g in dep.prunable_groups}
    options = PlanOptions(target_latency=0.6, global_ranking=True, objective="latency")
    planner = Planner(dep, scores, options, latency)
    removed = planner.plan()
    assert latency.predict(removed) <= 0.6 * table.end_to_end_ms
    gone = {g.size: int(np.isin(g.classes, dep.roots[removed]).sum()) for g in planner.groups}
    assert gone[24] > 0 and gone[24] / 24 > gone[16] / 16, gone


def test_latency_objective_prices_a_share_of_a_group_not_a_channel() -> None:
    """Near-equal scores (random-init L1): each channel of the 16-wide group saves 1.5x the ms of one of
    the 24-wide group.  Priced per channel (mean), the narrow group gives all the channels the target
    needs and the wide one none, as the narrow trunks of torchvision's mobile nets were cut to the bone;
    priced by LAMP (the latency objective's default), losing a share of a group costs about the same in
    either, so both give channels and the narrow group keeps a fair share."""
    model = chain()
    per_channel = {(8, 16): lambda cin, cout: 1.5 * cout, (16, 24): lambda cin, cout: 1.5 * cin + cout}
    table = fake_table(model, {**per_channel, (24, 6): lambda cin, cout: float(cin)})
    dep = analyze_model(model)
    latency = LatencyModel(dep, table)
    scores = {g.index: 1.0 + 0.01 * np.random.default_rng(0).random(g.size) for g in dep.prunable_groups}
    target = {"target_latency": 0.6, "global_ranking": True, "objective": "latency"}
    assert PlanOptions(**target).normalize == "lamp" and PlanOptions(ratio=0.5).normalize == "mean"
    gone = {}
    for how in ("mean", "lamp"):
        planner = Planner(dep, scores, PlanOptions(**target, normalize=how), latency)
        removed = planner.plan()
        assert latency.predict(removed) <= 0.6 * table.end_to_end_ms
        gone[how] = {g.size: int(np.isin(g.classes, dep.roots[removed]).sum()) for g in planner.groups}
    assert gone["mean"][16] >= 12 and gone["mean"][24] == 0, gone
    assert gone["lamp"][16] <= 8 and gone["lamp"][24] >= 8, gone


def aligned(scale: float) -> Cost:
    """Blocked kernels: 8 channels at a time, and a fixed penalty for a ragged width."""

    def cost(cin: int, cout: int) -> float:
        blocks = math.ceil(cin / 8) * math.ceil(cout / 8)
        return scale * (blocks + 50 * ((cin % 8 != 0) + (cout % 8 != 0)))

    return cost


def test_widths_snap_to_the_profiles_fast_steps() -> None:
    model = chain()
    table = fake_table(model, {(8, 16): aligned(1.0), (16, 24): aligned(1.0), (24, 6): linear(0.01)})
    dep = analyze_model(model)
    latency = LatencyModel(dep, table)
    for group in dep.prunable_groups:
        assert latency.group_widths(group).tolist() == list(range(8, group.size + 1, 8))
    for options in (
        PlanOptions(target_latency=0.7),
        PlanOptions(target_latency=0.5, global_ranking=True, objective="latency"),
    ):
        result = prune_checked(model, options, latency=LatencySource(table, feedback=0))
        widths = kept_widths(result.model)
        assert all(w % 8 == 0 for w in widths) and widths != (16, 24), widths
        assert result.plan.latency["predicted_ms"] <= options.target_latency * table.end_to_end_ms
    ragged = prune_checked(model, PlanOptions(target_macs=0.5))
    assert any(w % 8 for w in kept_widths(ragged.model))  # what the snapping prevents


def test_grouped_conv_widths_are_timed_at_whole_blocks_per_conv_group() -> None:
    """32 channels read and written by a conv of 4 groups (tied by a residual sum) lose equal counts per
    group: the group and its neighbours are timed at multiples of 4, and with a 4-channel kernel block
    at whole blocks per conv group (multiples of 16), where a ragged conv group would fall off the
    blocked kernels."""
    model = grouped_block(32, residual=True)
    dep = analyze_model(model)
    cost = linear(0.01)
    for block, allowed in ((1, list(range(4, 33, 4))), (4, [16, 32])):
        table = fake_table(model, {(8, 32): cost, (32, 32): cost, (32, 6): cost}, block=block)
        latency = LatencyModel(dep, table)
        by_size = {g.size: latency.group_widths(g).tolist() for g in dep.prunable_groups}
        assert by_size[32] == allowed, block
        result = prune_checked(
            model, PlanOptions(target_latency=0.5), latency=LatencySource(table, feedback=0)
        )
        assert init_shape(result.model, "conv1.w")[0] in allowed[:-1]
        assert node_attr(result.model, "conv4", "group") == 4


@pytest.mark.parametrize("widen", [1, 2])
@pytest.mark.parametrize("objective", ["channels", "latency"])
def test_grouped_conv_loses_whole_conv_groups_under_a_latency_target(objective: str, widen: int) -> None:
    """Where a grouped conv's conv groups can go whole (RegNet's bottleneck), the profile times it with
    fewer conv groups, both of its groups keep whole conv groups (multiples of a conv group's channels
    on either side, whatever the kernel block), and a latency-targeted plan removes conv groups: each
    kept one keeps its width.  4 conv groups of 32 // widen inputs and 32 outputs."""
    cin = 32 // widen
    model = grouped_block(cin, widen=widen)
    dep = analyze_model(model)
    spec = next(s for s in layer_specs(dep) if s.node == "conv4")
    assert spec.drops_groups and spec.tied
    timed = profile.layer_graph(spec, spec.in_width(16), 16)  # two of the four conv groups
    assert next(a.i for a in timed.graph.node[0].attribute if a.name == "group") == 2
    assert tuple(timed.graph.initializer[0].dims) == (16, cin // 4, 3, 3)
    cost = linear(0.01)
    for block in (1, 4):
        table = fake_table(model, {(8, cin): cost, (cin, 32): cost, (32, 6): cost}, block=block)
        latency = LatencyModel(dep, table)
        assert [latency.group_widths(g).tolist() for g in dep.prunable_groups] == [
            list(range(cin // 4, cin + 1, cin // 4)),
            [8, 16, 24, 32],
        ]
        options = PlanOptions(target_latency=0.5, global_ranking=objective == "latency", objective=objective)
        result = prune_checked(model, options, latency=LatencySource(table, feedback=0))
        groups = node_attr(result.model, "conv4", "group")
        assert groups < 4 and init_shape(result.model, "conv4.w") == (8 * groups, cin // 4, 3, 3)
        assert result.plan.latency["predicted_ms"] <= 0.5 * table.end_to_end_ms


def test_other_ops_cost_follows_the_channels_they_keep() -> None:
    """The time measured outside the weighted layers is shared among the other ops: its fixed part
    (kernel dispatch) in equal parts, which no pruning saves, the rest by the elements each op reads and
    writes, shrinking with the channels it keeps: cutting a wide activation saves more than the layers
    show."""
    net = Net(channels=8, size=8)
    x = net.conv(net.x, 16)
    x = net.op("Mul", [x, net.op("Sigmoid", [x])])  # a Swish onnxruntime does not fold into the conv
    x = net.op("Relu", [net.bn(net.conv(x, 24))])  # folded into the conv: no share
    model = net.build(net.conv(x, 6))
    table = fake_table(model, {(8, 16): linear(0.01), (16, 24): linear(0.01), (24, 6): linear(0.01)})
    dep = analyze_model(model)
    assert LatencyModel(dep, table).others == []  # nothing measured (a CUDA table): nothing shared
    swish = next(g for g in dep.prunable_groups if g.size == 16)
    half = np.zeros(dep.roots.size, bool)
    half[np.isin(dep.roots, swish.classes[:8])] = True
    removed_class = np.zeros(dep.roots.size, bool)
    removed_class[dep.roots[half]] = True
    for fixed_ms in (0.0, 0.5):
        table.other_ms, table.other_fixed_ms = 2.0, fixed_ms
        latency = LatencyModel(dep, table)
        ops = {op.node: op for op in latency.others}
        assert sorted(ops) == ["mul3", "sigmoid2"]
        assert sum(op.fixed_ms + op.variable_ms for op in ops.values()) == pytest.approx(2.0)
        assert ops["mul3"].fixed_ms == ops["sigmoid2"].fixed_ms == pytest.approx(fixed_ms / 2)
        # the Mul reads two tensors of the Swish's size and writes one; the Sigmoid reads one
        assert ops["mul3"].variable_ms / ops["sigmoid2"].variable_ms == pytest.approx(3 / 2)
        assert latency.kernels_ms(np.zeros(dep.roots.size, bool)) == pytest.approx(table.kernels_ms)
        saved = table.kernels_ms - latency.kernels_ms(half)
        layers = sum(layer.latency(*latency.widths(layer, removed_class)) for layer in latency.layers)
        layers_saved = table.layers_sum_ms - layers
        assert saved == pytest.approx(layers_saved + (2.0 - fixed_ms) / 2)


def test_the_other_ops_fixed_cost_is_the_intercept_of_their_kernels_time_against_their_bytes() -> None:
    """Each kernel costs 4 us plus 2 ns a byte read or written: the fixed part is 4 us a kernel (timed
    runs only), never below 0 nor above the fastest kernel's time."""

    def run(ts: int, durations: list[float]) -> list[dict]:
        sizes = [(500, 500), (1500, 1500), (2500, 2500)]  # (read, written) bytes
        kernels = [
            {
                "cat": "Node",
                "name": f"op{i}_kernel_time",
                "ts": ts + 10 * i + 1,
                "dur": dur,
                "args": {"op_name": "Mul", "activation_size": str(read), "output_size": str(written)},
            }
            for i, (dur, (read, written)) in enumerate(zip(durations, sizes, strict=True))
        ]
        return [{"cat": "Session", "name": "model_run", "ts": ts, "dur": 100}, *kernels]

    kernels = profile.node_kernels(run(0, [90, 90, 90]) + run(100, [6, 10, 14]) + run(200, [6, 10, 14]), 1)
    assert [(k.op, k.ms, k.bytes) for k in kernels.values()] == [
        ("Mul", 0.006, 1000),
        ("Mul", 0.010, 3000),
        ("Mul", 0.014, 5000),
    ]
    assert profile.fixed_kernel_cost(list(kernels.values())) == pytest.approx(0.004)
    falling = profile.node_kernels(run(0, [90, 90, 90]) + run(100, [30, 20, 10]), 1)
    assert profile.fixed_kernel_cost(list(falling.values())) == pytest.approx(0.010)  # the fastest's time
    steep = profile.node_kernels(run(0, [90, 90, 90]) + run(100, [1, 9, 17]), 1)
    assert profile.fixed_kernel_cost(list(steep.values())) == 0.0


def test_every_layer_is_found_in_the_whole_models_kernel_profile() -> None:
    """onnxruntime names a blocked conv after the tensor it writes (its own, or that of the BatchNorm,
    activation or residual Add it fused), a plain kernel after its node: every layer of a model with
    all of these (and a Gemm) is found in the whole model's profile, each kernel claimed once."""
    net = Net(channels=16, size=16)
    x = net.op("Relu", [net.bn(net.conv(net.x, 32))])
    x = net.op("Relu", [net.op("Add", [net.bn(net.conv(x, 32)), x])])  # a residual block
    x = net.op("Relu", [net.conv(x, 32, group=32)])  # depthwise
    x = net.op("Flatten", [net.op("GlobalAveragePool", [x])])
    model = net.build(net.gemm(x, 10))
    nodes = [spec.node for spec in layer_specs(analyze_model(model))]
    kernels = profile.kernel_profile(model, batch=1, threads=1, timing=Timing(rounds=1))
    found = profile.layer_kernel_ms(model, nodes, kernels)
    assert sorted(found) == sorted(nodes) and len(nodes) == 4
    assert all(ms > 0 for ms in found.values())
    assert len({id(k) for k in kernels.values() if k.op in WEIGHTED_KERNELS}) >= len(nodes)


def test_the_kernel_profiles_pace_is_the_time_weighted_median_of_the_layers_in_model_ratios() -> None:
    """A kernel profile taken in a neighbour's spell ran the convs 1.6x their isolated times and a
    batch-1 Gemm (cold weights) 6.4x: the pace is 1.6, which leaves the Gemm 4x slower in the model."""
    alone = {"conv1": 1.0, "conv2": 0.8, "conv3": 0.1, "gemm": 0.05}
    in_model = {"conv1": 1.6, "conv2": 1.3, "conv3": 0.25, "gemm": 0.32}
    pace = profile.kernel_pace(in_model, alone)
    assert pace == pytest.approx(1.6)
    assert in_model["gemm"] / pace / alone["gemm"] == pytest.approx(4.0)
    assert profile.kernel_pace({}, alone) == 1.0


def test_a_layer_slower_inside_the_model_is_planned_at_its_in_model_time(tmp_path: Path) -> None:
    """conv4 ran 4x its isolated time inside the model (its weights cold there): predictions scale its
    curve by 4, so halving its output saves 4x what the curve alone says; the table saves and merges
    the in-model times (the faster of two profiles)."""
    model = chain()
    table = fake_table(model, {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)})
    dep = analyze_model(model)
    group = next(g for g in dep.prunable_groups if g.size == 24)
    half = np.zeros(dep.roots.size, bool)
    half[np.isin(dep.roots, group.classes[:12])] = True
    full, layers_alone = table.curve("conv4").full_ms, table.layers_sum_ms
    table.in_model_ms = {"conv4": 4 * full}
    assert table.in_model_scale("conv4") == 4 and table.in_model_scale("conv1") == 1
    assert table.layers_sum_ms == pytest.approx(layers_alone + 3 * full)
    scaled = LatencyModel(dep, table)
    assert scaled.kernels_ms(np.zeros(dep.roots.size, bool)) == pytest.approx(table.kernels_ms)
    conv4 = next(layer for layer in scaled.layers if layer.spec.node == "conv4")
    assert conv4.latency(16, 12) == pytest.approx(4 * table.curve("conv4").latency(16, 12))
    saved_plain = full - table.curve("conv4").latency(16, 12)
    assert table.kernels_ms - scaled.kernels_ms(half) > 3 * saved_plain
    loaded = LatencyTable.load(table.save(tmp_path / "lut.json"))
    assert loaded.in_model_ms == table.in_model_ms
    faster = replace(loaded, in_model_ms={"conv4": 2 * full})
    assert table.fastest_with(faster).in_model_scale("conv4") == pytest.approx(2)


def test_a_layers_in_model_scale_follows_the_share_of_its_weights_kept(tmp_path: Path) -> None:
    """conv4 ran 4x its time alone inside the model, 1.5x inside a copy keeping a quarter of its
    weights (they fit the cache there; 1.8x in another copy at the same share): between the two the
    scale is linear in the weights kept, below the copy flat; the table saves the points, and a merged
    table drops them (calibrated again)."""
    model = chain()
    table = fake_table(model, {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)})
    full = table.curve("conv4").full_ms
    table.in_model_ms = {"conv4": 4 * full}
    table.in_model_points = {"conv4": [(0.25, 1.8), (0.25, 1.5)], "conv1": [(0.5, 3.0)]}
    assert [table.in_model_scale("conv4", share) for share in (1.0, 0.625, 0.25, 0.1)] == pytest.approx(
        [4.0, 2.75, 1.5, 1.5]  # of two copies at one share, the faster
    )
    assert table.in_model_scale("conv1", 0.5) == 1.0  # no full-width time: points alone say nothing
    conv4 = next(
        layer for layer in LatencyModel(analyze_model(model), table).layers if layer.spec.node == "conv4"
    )
    assert conv4.spec.weight_share(16, 12) == 0.5
    assert conv4.latency(16, 12) == pytest.approx(table.curve("conv4").latency(16, 12) * (1.5 + 2.5 / 3))
    loaded = LatencyTable.load(table.save(tmp_path / "lut.json"))
    assert loaded.in_model_points == table.in_model_points
    assert table.fastest_with(loaded).in_model_points == {}


def test_latency_targeted_plans_are_verified_and_record_the_prediction(tmp_path: Path) -> None:
    model = chain()
    table = fake_table(model, {(8, 16): linear(1.0), (16, 24): linear(0.5), (24, 6): linear(0.2)})
    for options in (
        PlanOptions(target_latency=0.5),
        PlanOptions(target_latency=0.5, global_ranking=True),
        PlanOptions(target_latency=0.5, global_ranking=True, objective="latency"),
    ):
        result = prune_checked(model, options, latency=LatencySource(table, feedback=0))
        recorded = result.plan.latency
        assert recorded["original_ms"] == table.end_to_end_ms
        assert recorded["predicted_ms"] <= 0.5 * table.end_to_end_ms
        result.plan.save(tmp_path / "p.json")
        assert json.loads((tmp_path / "p.json").read_text())["latency"] == recorded
    # a MACs budget spent by latency saved: verified too, and it records what it predicts
    options = PlanOptions(target_macs=0.5, global_ranking=True, objective="latency")
    result = prune_checked(model, options, latency=LatencySource(table, feedback=0))
    assert result.after.macs <= 0.5 * result.before.macs
    assert result.plan.latency["predicted_ms"] < table.end_to_end_ms


@pytest.mark.parametrize("truth", [1.0, 1.5])
def test_a_latency_plan_is_timed_whole_and_planned_again_when_it_measures_off(
    truth: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Feedback: the plan is timed whole; measured `truth` x slower than the table predicts, it is
    planned again on the line through the measurements until a plan measures as predicted, and the plan
    kept is one that was timed within the target."""
    model = chain()
    cost = linear(1.0)
    table = fake_table(model, {(8, 16): cost, (16, 24): cost, (24, 6): cost})

    def measure_wholes(models: list[onnx.ModelProto], **_: object) -> list[float]:
        """Made-up latencies on a machine twice as slow as when the table was made: the original as
        the table says, pruned models `truth` x slower than it predicts."""
        times = []
        for pruned in models:
            first, second = kept_widths(pruned)
            off = 1.0 if (first, second) == (16, 24) else truth
            times.append(2.0 * off * (cost(8, first) + cost(first, second) + cost(second, 6)))
        return times

    monkeypatch.setattr("graphprune.api.measure_wholes", measure_wholes)
    # mean normalisation: the path this toy's over / under / on-the-mark sequence was drawn on (LAMP's
    # first plan measures where the line through it puts 50% out of reach, the case of
    # test_feedback_keeps_the_timed_plan_when_its_timing_puts_the_target_out_of_reach)
    options = PlanOptions(target_latency=0.5, global_ranking=True, objective="latency", normalize="mean")
    trusted = prune_checked(model, options, latency=LatencySource(table, feedback=0))
    checked = prune_checked(model, options, latency=LatencySource(table, feedback=2))
    recorded = checked.plan.latency
    first = recorded["feedback"][0]
    # the original is timed beside the plan: its drift since the profile cancels
    assert first["measured_ms"] == pytest.approx(truth * first["predicted_ms"])
    assert first["predicted_ms"] == pytest.approx(trusted.plan.latency["predicted_ms"])
    target = 0.5 * table.end_to_end_ms
    assert recorded["measured_ms"] == pytest.approx(measure_wholes([checked.model])[0] / 2)
    if truth == 1.0:  # on the mark: one timing, the same plan
        assert len(recorded["feedback"]) == 1 and kept_widths(checked.model) == kept_widths(trusted.model)
    else:
        assert len(recorded["feedback"]) == 3  # over, under (the line below one point), on the mark
        assert sum(kept_widths(checked.model)) < sum(kept_widths(trusted.model))
        assert recorded["table_predicted_ms"] < recorded["predicted_ms"] <= target
        assert measure_wholes([trusted.model])[0] / 2 > 1.1 * target  # the table alone misses it
    assert recorded["measured_ms"] <= (1 + api.FEEDBACK_TOLERANCE) * target


def test_a_feedback_timing_far_off_is_timed_again_before_it_is_trusted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A neighbour's burst slows the plan 1.7x in every round of its first timing: the miss is timed
    again, the fastest of both counts, and the plan (on the mark) is kept as the table made it."""
    model = chain()
    cost = linear(1.0)
    table = fake_table(model, {(8, 16): cost, (16, 24): cost, (24, 6): cost})
    timings = []

    def measure_wholes(models: list[onnx.ModelProto], **_: object) -> list[float]:
        timings.append(len(timings))
        burst = 1.7 if len(timings) == 1 else 1.0
        times = []
        for index, pruned in enumerate(models):
            first, second = kept_widths(pruned)
            times.append((burst if index else 1.0) * (cost(8, first) + cost(first, second) + cost(second, 6)))
        return times

    monkeypatch.setattr("graphprune.api.measure_wholes", measure_wholes)
    options = PlanOptions(target_latency=0.5, global_ranking=True, objective="latency")
    trusted = prune_checked(model, options, latency=LatencySource(table, feedback=0))
    checked = prune_checked(model, options, latency=LatencySource(table, feedback=2))
    (check,) = checked.plan.latency["feedback"]
    assert len(timings) == 2
    assert check["measured_ms"] == pytest.approx(check["predicted_ms"])
    assert kept_widths(checked.model) == kept_widths(trusted.model)


def test_feedback_keeps_the_timed_plan_within_the_target_over_later_plans_that_miss_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first plan measures well under its prediction (and the target); the plans made on that
    timing keep more channels and measure over the target: the plan kept is the first, as timed."""
    model = chain()
    cost = linear(1.0)
    table = fake_table(model, {(8, 16): cost, (16, 24): cost, (24, 6): cost})
    options = PlanOptions(target_latency=0.5, global_ranking=True, objective="latency")
    trusted = prune_checked(model, options, latency=LatencySource(table, feedback=0))

    def measure_wholes(models: list[onnx.ModelProto], **_: object) -> list[float]:
        times = []
        for pruned in models:
            first, second = kept_widths(pruned)
            off = {(16, 24): 1.0, kept_widths(trusted.model): 0.6}.get((first, second), 1.4)
            times.append(off * (cost(8, first) + cost(first, second) + cost(second, 6)))
        return times

    monkeypatch.setattr("graphprune.api.measure_wholes", measure_wholes)
    checked = prune_checked(model, options, latency=LatencySource(table, feedback=2))
    recorded = checked.plan.latency
    assert len(recorded["feedback"]) >= 2  # planned again, and the new plan timed too
    assert kept_widths(checked.model) == kept_widths(trusted.model)
    assert recorded["measured_ms"] == pytest.approx(0.6 * recorded["feedback"][0]["predicted_ms"])


def test_feedback_warns_when_no_timed_plan_meets_the_target(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every plan measures 30% over what was predicted for it when it was made: once the replans are
    spent the fastest timed plan is kept, as timed, and the user is told the target was missed."""
    model = chain()
    cost = linear(1.0)
    table = fake_table(model, {(8, 16): cost, (16, 24): cost, (24, 6): cost})
    monkeypatch.setattr("graphprune.api._share_of_original", lambda _, m, removed: 1.3 * m.predict(removed))
    options = PlanOptions(target_latency=0.5, global_ranking=True, objective="latency")
    with caplog.at_level(logging.WARNING, logger="graphprune.api"):
        checked = prune_checked(model, options, latency=LatencySource(table, feedback=1))
    recorded = checked.plan.latency
    assert len(recorded["feedback"]) == 2
    assert recorded["measured_ms"] == min(c["measured_ms"] for c in recorded["feedback"])
    assert recorded["measured_ms"] > (1 + api.FEEDBACK_TOLERANCE) * 0.5 * table.end_to_end_ms
    assert "no plan timed whole met the latency target" in caplog.text


def test_feedback_keeps_the_timed_plan_when_its_timing_puts_the_target_out_of_reach(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A plan timed in a neighbour's spell measures 1.8x its prediction: on the line through that timing no
    plan reaches the target, and the prune keeps the plan it timed (with the warning) instead of
    failing."""
    model = chain()
    cost = linear(1.0)
    table = fake_table(model, {(8, 16): cost, (16, 24): cost, (24, 6): cost})
    monkeypatch.setattr("graphprune.api._share_of_original", lambda _, m, removed: 1.8 * m.predict(removed))
    options = PlanOptions(target_latency=0.5)
    trusted = prune_checked(model, options, latency=LatencySource(table, feedback=0))
    with caplog.at_level(logging.INFO, logger="graphprune.api"):
        checked = prune_checked(model, options, latency=LatencySource(table, feedback=2))
    (check,) = checked.plan.latency["feedback"]
    assert check["measured_ms"] == pytest.approx(1.8 * check["predicted_ms"])
    assert kept_widths(checked.model) == kept_widths(trusted.model)
    assert "no further plan (cannot reach 50% of the latency" in caplog.text
    assert "no plan timed whole met the latency target" in caplog.text


def test_whole_model_latency_is_fitted_through_the_calibration_points() -> None:
    """The whole is predicted on the line through the measured model whose slope fits the calibration
    points; the check point is scored against that line."""
    table = fake_table(chain(), {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)})
    full = table.layers_sum_ms
    assert table.whole_ms(full / 2) == pytest.approx(table.end_to_end_ms / 2)  # no points: through 0
    table.calibration = [
        (full / 2, table.end_to_end_ms / 2 - 10.0),
        (full / 4, table.end_to_end_ms / 4 - 14.0),
    ]
    table.check_point = (full / 8, table.end_to_end_ms / 8 - 17.0)
    slope, intercept = table.fit  # anchored at the model: least squares on the slope alone
    d_sum, d_whole = np.array([full / 2, 3 * full / 4]), np.array([full / 2 + 10.0, 3 * full / 4 + 14.0])
    assert slope == pytest.approx(d_sum @ d_whole / (d_sum @ d_sum))
    assert table.whole_ms(full) == pytest.approx(table.end_to_end_ms) and intercept < 0
    assert table.check_error == pytest.approx(table.whole_ms(full / 8) / (full / 8 - 17.0) - 1)


def test_timed_plans_that_cross_still_predict_less_latency_for_less_work() -> None:
    """Two nearby plans timed out of order (the smaller one measured slower, as a burst of load can
    make it) pool into one level; below them the prediction falls along the chord to the model, so a
    lower target stays reachable (a line through the crossing points rose there: resnet50's plan for
    27% of its latency was refused as 'closest keeps 60%')."""
    dep = analyze_model(chain())
    model = LatencyModel(
        dep, fake_table(dep.model, {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)})
    )
    full, whole = model.table.kernels_ms, model.table.end_to_end_ms
    model.timed = [(0.30 * full, 0.33 * whole), (0.28 * full, 0.36 * whole)]
    grid = np.linspace(0.05, 1.0, 60) * full
    predicted = [model.whole_ms(k) for k in grid]
    assert np.all(np.diff(predicted) >= -1e-12)
    assert (
        model.whole_ms(0.28 * full)
        == pytest.approx(model.whole_ms(0.30 * full))
        == pytest.approx(0.345 * whole)
    )
    chord = (whole - 0.345 * whole) / (full - 0.28 * full)
    assert model.whole_ms(0.2 * full) == pytest.approx(0.345 * whole - chord * 0.08 * full)
    assert model.whole_ms(full) == pytest.approx(whole)


def test_a_calibration_that_misses_its_check_copy_is_timed_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst slows the pruned copies (not the whole) in the first calibration timing: the fit misses
    its check copy, the copies are timed again, and each one's fastest timing fits the line."""
    model = chain()
    cost = linear(1.0)
    costs = {(8, 16): cost, (16, 24): cost, (24, 6): cost}
    timings = []

    def measure_wholes(models: list[onnx.ModelProto], **_: object) -> list[float]:
        timings.append(len(timings))
        times = []
        for index, copy in enumerate(models):
            first, second = kept_widths(copy)
            burst = 1.7 if index > 1 and len(timings) == 1 else 1.0
            times.append(burst * (cost(8, first) + cost(first, second) + cost(second, 6)))
        return times

    monkeypatch.setattr("graphprune.api.profile_model", lambda *a, **k: fake_table(model, costs))
    monkeypatch.setattr("graphprune.api.measure_wholes", measure_wholes)
    table = api._profile(analyze_model(model), None, LatencySource())
    assert len(timings) == 2
    assert abs(table.check_error) < 1e-9


@pytest.mark.parametrize("passes_slowed", [1, 2])
def test_a_profile_whose_fit_misses_its_check_copy_times_its_layers_again(
    passes_slowed: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A neighbour slowed the narrow layers (not the whole) during the first pass over the layers: the
    fit misses its check copy however often the copies are timed, so the layers are timed again and
    each point keeps its faster pass.  When the second pass is slowed too the table is kept, with a
    warning."""
    model = chain()
    cost = linear(1.0)

    def slowed(cin: int, cout: int) -> float:
        return cost(cin, cout) * (2.5 if cout < 16 else 1.0)

    true_costs = {(8, 16): cost, (16, 24): cost, (24, 6): cost}
    slow_costs = {(8, 16): slowed, (16, 24): slowed, (24, 6): cost}
    passes = []

    def profile_model(*_: object, **__: object) -> LatencyTable:
        passes.append(len(passes))
        return fake_table(model, slow_costs if len(passes) <= passes_slowed else true_costs)

    def measure_wholes(models: list[onnx.ModelProto], **_: object) -> list[float]:
        return [cost(8, a) + cost(a, b) + cost(b, 6) for a, b in map(kept_widths, models)]

    monkeypatch.setattr("graphprune.api.profile_model", profile_model)
    monkeypatch.setattr("graphprune.api.measure_wholes", measure_wholes)
    with caplog.at_level(logging.WARNING, logger="graphprune.api"):
        table = api._profile(analyze_model(model), None, LatencySource())
    assert len(passes) == table.profiles == 2
    if passes_slowed == 1:
        assert abs(table.check_error) < 1e-9 and not caplog.text
        assert table.curves == fake_table(model, true_costs).curves
    else:
        assert abs(table.check_error) > api.CALIBRATION_TOLERANCE
        assert "misses its check copy" in caplog.text


@pytest.mark.parametrize("burst", ["one pass of one layer", "every pass"])
def test_layers_timed_in_a_burst_of_load_keep_their_fast_timings(burst: str) -> None:
    """A neighbour's burst slows the layers 2x and the canary 1.5x.  Over one layer's first pass it
    costs nothing: each point keeps its fastest pass.  Over every pass (the canary read slow after each
    layer) every layer is timed again once the canary reads fast, and counted as timed slow."""
    model = chain()
    costs = {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)}
    true = fake_measure(costs)
    timing = Timing(block=1)
    passes_read = 1 + timing.rounds * len(costs)  # the canary: once before the layers, after each pass
    last_slow = 2 if burst == "one pass of one layer" else passes_read
    readings = []

    def measure(graph: onnx.ModelProto, batch: int) -> float:
        if graph.graph.name.startswith("alignment probe"):
            readings.append(graph.graph.name)
            return true(graph, batch) * (1.5 if 2 <= len(readings) <= last_slow else 1.0)
        burst = graph.graph.name.startswith("layer ") and 1 <= len(readings) < last_slow
        return true(graph, batch) * (2.0 if burst else 1.0)

    dep = analyze_model(model)
    table = profile_model(dep.model, layer_specs(dep), measure=measure, timing=timing)
    assert table.curves == fake_table(model, costs).curves
    assert table.machine["signatures_timed_slow"] == (0 if burst == "one pass of one layer" else 3)
    assert len(readings) == passes_read + (0 if burst == "one pass of one layer" else 1 + len(costs))


@pytest.mark.parametrize("quiet_canary", [None, 0.2])
def test_whole_timings_given_the_quiet_canary_count_only_rounds_between_fast_readings(
    quiet_canary: float | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A neighbour's spell slows the pruned model 1.7x (the original 1.1x) through the first two rounds
    and the canary 1.5x after them: without the profile's canary reading both rounds count and the
    pruned model reads slow; with it they (and the round after a slow reading) are set aside and rounds
    run on until two are clean."""
    original, pruned = chain(), chain()
    pruned.graph.name = "pruned"
    calls = {"canary": 0, "model": 0}

    def bench(model: onnx.ModelProto, **_: object) -> SimpleNamespace:
        if model.graph.name.startswith("alignment probe"):
            calls["canary"] += 1
            return SimpleNamespace(median_ms=0.2 * (1.5 if calls["canary"] in (2, 3) else 1.0))
        spell = calls["model"] < 4  # the first two rounds of two models
        calls["model"] += 1
        if model.graph.name == "pruned":
            return SimpleNamespace(median_ms=0.5 * (1.7 if spell else 1.0))
        return SimpleNamespace(median_ms=1.0 * (1.1 if spell else 1.0))

    monkeypatch.setattr(profile, "bench", bench)
    timer = profile.WholeTimer([original, pruned], timing=Timing(rounds=2), canary_ms=quiet_canary)
    while not timer.done:
        timer.time_round()
    times = timer.fastest()
    assert len(timer.medians) == len(timer.loads) == len(timer.clean)
    if quiet_canary is None:
        assert times == pytest.approx([1.1, 0.85]) and calls == {"canary": 0, "model": 4}
    else:
        assert times == pytest.approx([1.0, 0.5])
        assert calls == {"canary": 6, "model": 10}
        assert timer.clean == [False, False, False, True, True]  # rounds 1-3 set aside, 4-5 clean


def test_whole_model_rounds_fit_their_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A whole model's round runs 9 warm-up and 20 timed runs, but no more than fit in 4 s once its
    latency is known (at least 2 and 5): the caller's bound before the first round, then each model's
    own last median; without a budget the counts stand."""
    assert Timing().whole_runs() == (9, 20) and Timing().whole_runs(3.0) == (9, 20)
    assert Timing().whole_runs(130.0) == (7, 20)  # 30 runs fit: the warm-up is cut first
    assert Timing().whole_runs(400.0) == (2, 10)
    assert Timing().whole_runs(1200.0) == (2, 5)  # ResNet-50 at batch 32: 8 s a round, not 35 s
    assert Timing(whole_budget_s=None).whole_runs(1200.0) == (9, 20)
    slow, fast = chain(), chain()
    slow.graph.name = "slow"
    counts: list[tuple[str, int, int]] = []

    def bench(model: onnx.ModelProto, *, warmup: int, runs: int, **_: object) -> SimpleNamespace:
        counts.append((model.graph.name, warmup, runs))
        return SimpleNamespace(median_ms=1000.0 if model.graph.name == "slow" else 2.0)

    monkeypatch.setattr(profile, "bench", bench)
    timer = profile.WholeTimer([slow, fast], timing=Timing(rounds=2), expected_ms=400.0)
    while not timer.done:
        timer.time_round()
    assert counts == [("slow", 2, 10), ("test", 2, 10), ("slow", 2, 5), ("test", 9, 20)]


def test_the_profiles_second_whole_timing_is_held_to_the_first_ones_latency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The profile times the whole model before and after its layers: the second timing's first round
    is already held to the budget at the first timing's latency."""
    bounds: list[float | None] = []

    def measure_wholes(models: list[object], *, expected_ms: float | None = None, **_: object) -> list[float]:
        bounds.append(expected_ms)
        return [2.5] * len(models)

    monkeypatch.setattr(profile, "measure_wholes", measure_wholes)
    dep = analyze_model(chain())
    table = profile_model(dep.model, layer_specs(dep), timing=Timing(block=8, points=2, rounds=1, runs=2))
    assert bounds == [None, 2.5] and table.end_to_end_ms == 2.5


def run_cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "graphprune.cli", *map(str, args)], capture_output=True, text=True
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("graphprune: error: ")
    return lines[0]


def test_tables_of_other_models_providers_or_batches_are_refused_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "toy.onnx"
    onnx.save(chain(), path)
    costs = {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)}
    fake_table(chain(), costs, sha="0" * 64).save(tmp_path / "other.json")
    fake_table(chain(), costs, sha=sha256_file(path)).save(tmp_path / "own.json")
    args = ["prune", path, "-o", tmp_path / "out.onnx", "--target-latency", "0.5", "--latency-lut"]
    assert "another model" in one_line_error(run_cli(*args, tmp_path / "other.json"))
    assert "provider cpu, not cuda" in one_line_error(
        run_cli(*args, tmp_path / "own.json", "--provider", "cuda")
    )
    assert "measured at batch 1, not 4; profile with --batch 4" in one_line_error(
        run_cli(*args, tmp_path / "own.json", "--batch", "4")
    )
    assert not (tmp_path / "out.onnx").exists()
    assert "0 or more" in one_line_error(run_cli(*args, tmp_path / "own.json", "--latency-feedback", "-1"))
    # a made-up table: timing the plan whole would only measure how far it is from this machine
    own = [*args, tmp_path / "own.json", "--latency-feedback", "0"]
    done = run_cli(*own, "--bench", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert numbers["before"]["predicted_ms"] == pytest.approx(8 * 16 + 16 * 24 + 24 * 6)
    assert numbers["after"]["predicted_ms"] <= 0.5 * numbers["before"]["predicted_ms"]
    assert numbers["after"]["latency_ms"] > 0 and numbers["verification"]["max_rel_error"] < 1e-4
    by_macs = [
        "--target-macs",
        "0.5",
        "--global",
        "--objective",
        "latency",
        "--latency-lut",
        tmp_path / "own.json",
    ]
    done = run_cli("prune", path, "-o", tmp_path / "macs.onnx", *by_macs, "--json")
    assert done.returncode == 0, done.stderr
    numbers = json.loads(done.stdout)
    assert numbers["after"]["macs"] <= 0.5 * numbers["before"]["macs"]
    assert "objective latency" in one_line_error(
        run_cli("prune", path, "-o", tmp_path / "o.onnx", "--ratio", "0.5", "--objective", "latency")
    )


def test_profile_command_writes_a_table_prune_can_use(tmp_path: Path) -> None:
    """The real profiler on a tiny model, timed as briefly as possible: structure only, no speed claims."""
    path, lut = tmp_path / "toy.onnx", tmp_path / "lut.json"
    onnx.save(chain(), path)
    done = run_cli("profile", path, "-o", lut, "--threads", "1", "--runs", "2", "--rounds", "1", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    table = LatencyTable.load(lut)
    assert summary["model_sha256"] == table.model_sha256 == sha256_file(path)
    assert set(table.layers) == {"conv1", "conv4", "conv7"} and table.end_to_end_ms > 0
    assert set(table.in_model_ms) == set(table.layers)  # each layer found in the whole model's profile
    # and in each pruned copy's, at the share of its weights the copy keeps, where the copy prunes it
    # (a group no wider than the runtime's block stays whole: the 16-wide one here at block 16)
    assert set(table.in_model_points) <= set(table.layers)
    if table.block <= 16:  # the 24-wide group narrows
        assert {"conv4", "conv7"} <= set(table.in_model_points)
    for points in table.in_model_points.values():
        # one per copy (two copies may keep the same widths)
        assert 1 <= len(points) <= 3 and all(0 < share < 1 and scale > 0 for share, scale in points)
    assert summary["sum_error"] == pytest.approx(table.sum_error)
    assert len(table.calibration) == 2 and summary["check_error"] == pytest.approx(table.check_error)
    assert table.curve("conv1").out_widths[-1] == 16 and table.curve("conv7").out_widths == [
        6
    ]  # outputs never narrowed
    # a toy's latency is mostly a run's fixed cost, so no latency target is sure to be reachable
    done = run_cli("prune", path, "-o", tmp_path / "out.onnx", "--ratio", "0.5", "--latency-lut", lut)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out.plan.json").read_text())["latency"]["predicted_ms"] > 0


def test_profile_names_the_layers_that_run_slower_inside_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from graphprune.cli.main import main

    model, path = chain(), tmp_path / "toy.onnx"
    onnx.save(model, path)
    table = fake_table(model, {(8, 16): linear(1.0), (16, 24): linear(1.0), (24, 6): linear(1.0)})
    table.in_model_ms = {"conv1": table.curve("conv1").full_ms, "conv4": 3 * table.curve("conv4").full_ms}
    table.in_model_points = {"conv4": [(0.5, 1.4), (0.25, 1.1)]}
    monkeypatch.setattr("graphprune.api.profile_latency", lambda *_, **__: table)
    assert main(["profile", str(path), "-o", str(tmp_path / "lut.json")]) == 0
    assert (
        "1 of 3 layers ran over 1.2x their time alone inside the model (weights cold there; slowest conv4 "
        "3.0x, 1.1x with 25% of its weights): planned at it"
        in " ".join(capsys.readouterr().out.split())  # the console wraps long lines
    )


def test_a_profiled_run_counts_the_layers_kernels_not_layout_reorders() -> None:
    """On the CPU an isolated layer's run time is the sum of its node kernels bar onnxruntime's layout
    reorders, each kernel counted in the run it started in, never below the profiler's microsecond."""
    events = [
        {"cat": "Session", "name": "session_initialization", "ts": 0, "dur": 900},
        {"cat": "Session", "name": "model_run", "ts": 1000, "dur": 100},
        {"cat": "Node", "name": "r_kernel_time", "ts": 1005, "dur": 40, "args": {"op_name": "ReorderInput"}},
        {"cat": "Node", "name": "c_fence_before", "ts": 1049, "dur": 1, "args": {"op_name": "Conv"}},
        {"cat": "Node", "name": "c_kernel_time", "ts": 1050, "dur": 30, "args": {"op_name": "Conv"}},
        {"cat": "Session", "name": "model_run", "ts": 1200, "dur": 100},
        {"cat": "Node", "name": "m_kernel_time", "ts": 1210, "dur": 20, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "a_kernel_time", "ts": 1240, "dur": 4, "args": {"op_name": "Add"}},
        {"cat": "Session", "name": "model_run", "ts": 1400, "dur": 10},
        {"cat": "Node", "name": "g_kernel_time", "ts": 1401, "dur": 0, "args": {"op_name": "Gemm"}},
    ]
    assert kernel_times(events, 3).tolist() == pytest.approx([0.030, 0.024, 0.001])
    with pytest.raises(RuntimeError, match="3 runs, 4 were made"):
        kernel_times(events, 4)


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is installed")
def test_cuda_without_the_gpu_runtime_is_one_line_with_the_install_advice(tmp_path: Path) -> None:
    path = tmp_path / "toy.onnx"
    onnx.save(chain(), path)
    for args in (["profile", path, "-o", tmp_path / "lut.json"], ["bench", path]):
        line = one_line_error(run_cli(*args, "--provider", "cuda"))
        assert "pip uninstall -y onnxruntime && pip install 'onnxruntime-gpu[cuda]==1.31.1'" in line
    assert not (tmp_path / "lut.json").exists()


ROOT = Path(__file__).resolve().parent.parent


def test_latency_benchmark_matrix_defaults_to_the_gpu_protocol_on_cuda() -> None:
    script = ROOT / "benchmarks" / "bench_latency.py"
    done = subprocess.run(
        [sys.executable, script, "--provider", "cuda", "--dry-run"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"{m} batch {b} cuda threads 2"
        for m in ("resnet50", "mobilenet_v2", "efficientnet_b0")
        for b in (1, 64)
    ]
    bad = subprocess.run(
        [sys.executable, script, "--ratio", "1.5", "--dry-run"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--ratio" in bad.stderr


def test_latency_benchmark_keeps_the_records_of_batches_it_did_not_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch-32 run merges into the batch-1 results of the same protocol, never into another's."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bench_latency import earlier_records

    path = tmp_path / "latency.json"
    settings = {"provider": "cpu", "threads": 2, "ratio": 0.5}
    timing = {"runs": 30, "rounds": 5, "date": "then"}
    records = [{"model": "resnet50", "batch": b, "timing": timing} for b in (1, 32)]
    path.write_text(json.dumps({"machine": {"date": "then"}, "settings": settings, "records": records}))
    assert earlier_records(path, settings, {("resnet50", 32)}) == records[:1]
    assert earlier_records(path, settings | {"threads": 1}, {("resnet50", 32)}) == []
    assert earlier_records(tmp_path / "none.json", settings, set()) == []


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is installed")
def test_gpu_script_stops_at_once_without_the_cuda_provider(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", ROOT / "tools" / "device" / "gpu_latency.sh", tmp_path / "out", "mobilenet_v2"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    lines = done.stdout.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stdout + done.stderr
    assert lines[0].startswith("bench_latency: error:") and "onnxruntime-gpu[cuda]==1.31.1" in lines[0]
    assert not (tmp_path / "out" / "gpu_latency.json").exists()


def test_gpu_wheel_travels_in_checked_parts_and_joins_to_the_same_files(tmp_path: Path) -> None:
    """tools/device/ort_gpu_wheel.sh: a wheel packed here (files stored, xz, cut into parts) and stashed
    part by part there joins to a wheel with the very same files; a missing or corrupted part stops
    the install with one line."""
    import zipfile

    wheel = tmp_path / "demo-1.0-py3-none-any.whl"
    files = {"demo/__init__.py": b"x = 1\n" * 500, "demo/blob.bin": np.random.default_rng(0).bytes(300_000)}
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    parts, stash = tmp_path / "parts", tmp_path / "stash"
    env = {**os.environ, "ORTGPU_PARTS": str(parts), "ORTGPU_STASH": str(stash), "ORTGPU_PART_SIZE": "100k"}

    def script(*args: object) -> subprocess.CompletedProcess[str]:
        command = ["bash", ROOT / "tools" / "device" / "ort_gpu_wheel.sh", *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=env)

    assert script("pack", wheel).returncode == 0 and not wheel.exists()
    pieces = sorted(parts.glob("part-*"))
    assert len(pieces) == 3  # the random blob does not compress: 300 kB in 100 kB parts
    for piece in pieces[:-1]:
        assert script("stash", piece).returncode == 0
    missing = script("install", "--check-only")
    assert missing.returncode == 1 and "2 of 3 parts stashed" in missing.stderr
    assert script("stash", pieces[-1]).returncode == 0
    assert script("install", "--check-only").returncode == 0
    with zipfile.ZipFile(stash / wheel.name) as joined:
        assert {name: joined.read(name) for name in joined.namelist()} == files
    (stash / "part-01").write_bytes(b"corrupt")
    assert script("install", "--check-only").returncode == 1


def test_latency_accuracy_benchmark_refuses_a_target_outside_0_1_after_importing_its_peers() -> None:
    done = subprocess.run(
        [sys.executable, ROOT / "benchmarks" / "bench_latency_accuracy.py", "--targets", "1.5"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "--targets must lie in (0, 1)" in done.stderr, done.stderr


def test_cpu_profile_opens_one_layer_session_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Idle sessions' worker threads slow a 2-thread session to its 1-thread speed, so the CPU profile
    times each layer's width pair in a session of its own, closed before the next opens (every pair
    of every round still timed, in interleaved rounds)."""
    open_sessions, most_open, opened = [0], [0], [0]

    def counted(*args: object, **kwargs: object) -> ort.InferenceSession:
        session = make_session(*args, **kwargs)
        opened[0] += 1
        open_sessions[0] += 1
        most_open[0] = max(most_open[0], open_sessions[0])
        weakref.finalize(session, lambda: open_sessions.__setitem__(0, open_sessions[0] - 1))
        return session

    monkeypatch.setattr(profile, "make_session", counted)
    dep = analyze_model(chain())
    specs = layer_specs(dep)
    timing = Timing(points=4, block=4, warmup=1, runs=3, rounds=2, budget_s=0.0)
    pairs = sum(len(profile._points(spec, timing)) for spec in {s.signature: s for s in specs}.values())
    for spec in {s.signature: s for s in specs}.values():
        times = profile._time_points(spec, "cpu", 1, 1, timing, None, 0)
        assert len(times) == len(profile._points(spec, timing)) and min(times.values()) > 0
    assert most_open[0] == 1
    assert opened[0] == pairs * timing.rounds


def test_a_second_profile_times_the_widths_of_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fit that misses its check copy profiles the layers again and keeps each point's faster timing;
    an alignment probe taken in a slow spell found another block (8, not 1), whose other widths the
    merge could not pair (an internal error). The second profile keeps the first one's block."""
    dep = analyze_model(chain())
    costs = {(8, 16): linear(1e-3), (16, 24): linear(1e-3), (24, 6): linear(1e-3)}
    blocks = iter([1, 8])
    monkeypatch.setattr(profile, "alignment_block", lambda measure, batch: next(blocks))
    monkeypatch.setattr(
        api, "profile_model", lambda *a, **k: profile_model(*a, **k, measure=fake_measure(costs))
    )
    monkeypatch.setattr(api, "_calibrate", lambda *args: False)  # the fit misses: profile twice
    table = api._profile(dep, None, LatencySource(threads=1))
    assert table.profiles == 2 and table.block == 1
    assert table.curve("conv1").out_widths == list(range(1, 17))
