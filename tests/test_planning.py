"""Planner limits: grouped-conv partitions, round-to, min channels, exclusion, global caps, MACs target."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Net, init_shape

from graphprune.api import model_cost, prune
from graphprune.errors import PlanError
from graphprune.planning import PlanOptions


def chain(widths: list[int], groups: list[int] | None = None):
    """conv(width_i, group_i) -> BN -> Relu ..., then a 6-unit conv head (weights conv1.w, conv4.w, ...)."""
    net = Net()
    x = net.x
    for width, group in zip(widths, groups or [1] * len(widths), strict=True):
        x = net.op("Relu", [net.bn(net.conv(x, width, group=group))])
    return net.build(net.conv(x, 6, k=1))


def test_group_written_by_g2_and_read_by_g3_conv_loses_equal_counts_in_both() -> None:
    model = chain([12, 12, 12], [1, 2, 3])
    result = prune(model, PlanOptions(ratio=0.5))
    assert init_shape(result.model, "conv4.w") == (6, 3, 3, 3)
    assert init_shape(result.model, "conv7.w") == (6, 2, 3, 3)


def test_round_to_keeps_multiples_and_min_channels_is_respected() -> None:
    model = chain([24, 20])
    rounded = prune(model, PlanOptions(ratio=0.6, round_to=8))
    assert init_shape(rounded.model, "conv1.w")[0] == 16
    assert init_shape(rounded.model, "conv4.w")[0] % 8 == 0
    floor = prune(model, PlanOptions(ratio=0.95, min_channels=5, max_ratio=0.99))
    assert init_shape(floor.model, "conv1.w")[0] == 5 and init_shape(floor.model, "conv4.w")[0] == 5


def test_exclude_keeps_a_layer_whole_and_unknown_names_are_refused() -> None:
    model = chain([16, 16])
    result = prune(model, PlanOptions(ratio=0.5, exclude=["conv1"]))
    assert init_shape(result.model, "conv1.w")[0] == 16 and init_shape(result.model, "conv4.w")[0] == 8
    with pytest.raises(PlanError, match="no-such-node"):
        prune(model, PlanOptions(ratio=0.5, exclude=["no-such-node"]))


def test_global_ranking_removes_the_requested_share_with_a_cap_per_group() -> None:
    model = chain([16, 16, 16])
    result = prune(model, PlanOptions(ratio=0.5, global_ranking=True, max_ratio=0.6), criterion="random")
    kept = [init_shape(result.model, f"conv{3 * i - 2}.w")[0] for i in (1, 2, 3)]
    assert sum(kept) == 24
    assert min(kept) >= 16 - int(16 * 0.6)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_macs_target_is_met_and_reported(target: float) -> None:
    model = chain([16, 24, 32])
    result = prune(model, PlanOptions(target_macs=target))
    assert result.after.macs <= target * result.before.macs
    assert result.after.macs == model_cost(result.model).macs
    assert result.after.macs > 0.5 * target * result.before.macs


@pytest.mark.parametrize(
    "options",
    [
        PlanOptions(ratio=1.5),
        PlanOptions(ratio=-0.1),
        PlanOptions(),
        PlanOptions(ratio=0.5, target_macs=0.5),
        PlanOptions(target_macs=0.0),
        PlanOptions(ratio=0.5, round_to=0),
    ],
)
def test_invalid_options_are_refused(options: PlanOptions) -> None:
    with pytest.raises(PlanError):
        options.validate()


def test_a_layer_is_never_emptied() -> None:
    model = chain([2, 3])
    result = prune(model, PlanOptions(ratio=0.99 - 1e-9, max_ratio=0.99))
    assert all(dim >= 1 for init in result.model.graph.initializer for dim in init.dims)
    assert np.all([init_shape(result.model, f"conv{3 * i - 2}.w")[0] >= 1 for i in (1, 2)])


def test_round_to_with_a_macs_target_stays_close_to_the_target() -> None:
    """A shared ratio jumps between multiples of 8; handing back multiples keeps the plan near the target."""
    model = chain([16, 24, 32])
    result = prune(model, PlanOptions(target_macs=0.5, round_to=8))
    assert result.after.macs <= 0.5 * result.before.macs
    assert result.after.macs > 0.4 * result.before.macs
    assert all(init_shape(result.model, f"conv{3 * i - 2}.w")[0] % 8 == 0 for i in (1, 2, 3))


def test_a_group_no_larger_than_round_to_stays_whole() -> None:
    result = prune(chain([16, 32]), PlanOptions(ratio=0.5, round_to=16))
    assert init_shape(result.model, "conv1.w")[0] == 16 and init_shape(result.model, "conv4.w")[0] == 16


def test_widths_left_off_the_kernel_blocks_are_named_and_warned_of(caplog: pytest.LogCaptureFixture) -> None:
    """A 16-wide layer cut to 12 (ragged) is named with its widths; a 20-wide one (not aligned to begin
    with) is not; rounding to 8, or no cut at all, warns of nothing."""
    model = chain([16, 20])
    with caplog.at_level("WARNING", logger="graphprune.api"):
        ragged = prune(model, PlanOptions(ratio=0.3))
    assert ragged.plan.misaligned() == [f"{ragged.dep.prunable_groups[0].name}: 12/16"]
    assert "1 of 2 prunable groups keep a width that is not a multiple of 8" in caplog.text
    assert "--round-to 8" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="graphprune.api"):
        rounded = prune(model, PlanOptions(ratio=0.3, round_to=8))
        prune(model, PlanOptions(ratio=0.0))
    assert rounded.plan.misaligned() == []
    assert "multiple of 8" not in caplog.text
