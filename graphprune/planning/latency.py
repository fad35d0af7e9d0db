"""Latency as planning sees it: the model's weighted layers described for the profiler, the latency a
removal is predicted to leave (from a measured table), the widths worth keeping, and the allocation of
channels by importance per unit of latency (greedy, in the spirit of HALP, Shen et al. NeurIPS 2022).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.errors import PlanError
from graphprune.runtime.profile import PROFILED_OPS, LatencyTable, LayerCurve, LayerSpec, scale_at

if TYPE_CHECKING:
    from graphprune.planning.planner import Planner

log = logging.getLogger(__name__)

# A width is worth keeping unless some larger width was timed faster by more than this share.
NOISE = 0.05


def layer_specs(dep: DependencyGraph) -> list[LayerSpec]:
    """Every Conv / Gemm / MatMul with a constant weight, described plainly for the profiler; a width
    is swept only where prunable channels flow."""
    prunable = np.zeros(dep.roots.size, dtype=bool)
    for group in dep.prunable_groups:
        prunable[group.prunable] = True

    # grouped convs remove equal counts per conv group, so their groups' widths keep a multiple of the
    # group count; those that can lose whole conv groups are timed that way (onnxruntime's grouped conv
    # kernels want whole channel blocks per conv group), and their widths keep whole conv groups
    group_multiple: dict[int, int] = {}
    for conv in dep.grouped_convs:
        for parts in conv.sides:
            multiple = parts[0].size if conv.node in dep.droppable else len(parts)
            for group in np.unique(dep.class_group[dep.roots[np.concatenate(parts)]]).tolist():
                group_multiple[group] = math.lcm(group_multiple.get(group, 1), multiple)

    def swept(tensor: str) -> bool:
        view = dep.views.get(tensor)
        return view is not None and bool(prunable[dep.roots[view.ravel()]].any())

    def multiple(tensor: str) -> int:
        view = dep.views.get(tensor)
        if view is None:
            return 1
        groups = np.unique(dep.class_group[dep.roots[view.ravel()]]).tolist()
        return math.lcm(1, *(group_multiple.get(g, 1) for g in groups))

    specs = []
    for node in dep.model.graph.node:
        weight = dep.constants.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in PROFILED_OPS or weight is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x = dep.shapes[node.input[0]]
        bias = len(node.input) > 2 and bool(node.input[2])
        common = {
            "node": node.name,
            "sweep_in": swept(node.input[0]),
            "sweep_out": swept(node.output[0]),
            "in_multiple": multiple(node.input[0]),
            "out_multiple": multiple(node.output[0]),
        }
        if node.op_type == "Conv":
            group = int(attrs.pop("group", 1))
            attributes = tuple(sorted((k, _plain(v)) for k, v in attrs.items()))
            specs.append(
                LayerSpec(
                    op="Conv",
                    in_channels=x[1],
                    out_channels=weight.shape[0],
                    group=group,
                    attributes=attributes,
                    leading=tuple(x[2:]),
                    bias=bias,
                    drops_groups=node.name in dep.droppable,
                    **common,
                )
            )
        elif node.op_type == "Gemm" and not attrs.get("transA", 0) and weight.ndim == 2:
            out = weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
            specs.append(LayerSpec(op="Gemm", in_channels=x[1], out_channels=out, bias=bias, **common))
        elif node.op_type == "MatMul" and weight.ndim == 2 and len(x) >= 2:
            specs.append(
                LayerSpec(
                    op="MatMul",
                    in_channels=x[-1],
                    out_channels=weight.shape[1],
                    leading=tuple(x[1:-1]),
                    bias=False,
                    **common,
                )
            )
    return specs


def _plain(value: object) -> object:
    if isinstance(value, bytes):
        return value.decode()
    return tuple(value) if isinstance(value, list) else value


@dataclass
class _Layer:
    """A weighted layer: its measured curve over (input, output) widths, scaled to its time inside the
    whole model at the share of its weights kept (LatencyTable.in_model_curve)."""

    spec: LayerSpec
    curve: LayerCurve
    in_classes: np.ndarray | None
    out_classes: np.ndarray | None
    in_model: tuple[list[float], list[float]] = ([1.0], [1.0])

    @property
    def channels(self) -> tuple[int, int]:
        return self.spec.in_channels, self.spec.out_channels

    @property
    def tied(self) -> bool:
        """Whether the input width follows the output's (a depthwise conv, or whole conv groups)."""
        return self.spec.tied

    def latency(self, kept_in: int, kept_out: int) -> float:
        share = self.spec.weight_share(kept_in, kept_out)
        return self.curve.latency(kept_in, kept_out) * scale_at(self.in_model, share)


@dataclass
class _OtherOp:
    """An op between the weighted layers (activation, elementwise, pooling): its share of the model's
    measured other-op time, a fixed part (kernel dispatch) and a part that shrinks with the channels its
    output keeps."""

    node: str
    fixed_ms: float
    variable_ms: float
    out_classes: np.ndarray | None
    size: int
    in_classes = None  # an op's one width is its output's
    tied = True

    @property
    def channels(self) -> tuple[int, int]:
        return self.size, self.size

    def latency(self, kept_in: int, kept_out: int) -> float:
        return self.fixed_ms + self.variable_ms * kept_out / self.size


# Ops without a kernel worth timing (shape arithmetic, views), and those onnxruntime folds into the
# conv before them (its CPU fusions of BatchNormalization and simple activations).
NO_KERNEL_OPS = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "Shape",
        "Gather",
        "Reshape",
        "Flatten",
        "Squeeze",
        "Unsqueeze",
        "Identity",
        "Dropout",
        "Cast",
        "Range",
    }
)
FOLDED_AFTER_CONV = frozenset(
    {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "HardSigmoid", "Sigmoid", "Tanh"}
)


def other_ops(dep: DependencyGraph, total_ms: float, fixed_ms: float = 0.0) -> list[_OtherOp]:
    """The model's ops outside its weighted layers, sharing `total_ms` (their measured kernel time):
    `fixed_ms` (what their kernels cost whatever the sizes) in equal parts, the rest in proportion to
    the elements each reads and writes (a per-op split the profiler cannot give, since onnxruntime
    fuses and renames them, and adds layout reorders of its own)."""
    producer = {out: node for node in dep.model.graph.node for out in node.output}
    readers = Counter(name for node in dep.model.graph.node for name in node.input)

    def folded(node: onnx.NodeProto) -> bool:
        """A BatchNormalization or activation that is the only reader of a conv (or folded BN) output."""
        if node.op_type not in FOLDED_AFTER_CONV or not node.input or readers[node.input[0]] != 1:
            return False
        source = producer.get(node.input[0])
        if source is not None and source.op_type == "BatchNormalization":
            return folded(source)
        return source is not None and source.op_type == "Conv"

    def elements(tensor: str) -> int:
        shape = dep.shapes.get(tensor)
        return int(np.prod(shape[1:])) if shape is not None and len(shape) >= 2 else 0

    picked = []
    for node in dep.model.graph.node:
        shape = dep.shapes.get(node.output[0]) if node.output else None
        if (
            node.op_type in PROFILED_OPS
            or node.op_type in NO_KERNEL_OPS
            or shape is None
            or len(shape) < 2
            or folded(node)
        ):
            continue
        view = dep.views.get(node.output[0])
        classes = None if view is None else dep.roots[view.ravel()]
        traffic = sum(elements(name) for name in node.input) + elements(node.output[0])
        picked.append((node.name, classes, traffic))
    volume = sum(traffic for *_, traffic in picked) or 1
    fixed_each = min(fixed_ms, total_ms) / max(len(picked), 1)
    variable_ms = total_ms - fixed_each * len(picked)
    return [
        _OtherOp(
            name, fixed_each, variable_ms * traffic / volume, classes, 1 if classes is None else classes.size
        )
        for name, classes, traffic in picked
    ]


class LatencyModel:
    """Predicted latency (ms) of a removal: each layer's curve at its kept widths and the other ops'
    shares, summed, and mapped to the whole by the table's fit, or, once plans were timed whole
    (`timed`), by the broken line through the measured model and them."""

    def __init__(self, dep: DependencyGraph, table: LatencyTable) -> None:
        self.dep = dep
        self.table = table
        self.layers: list[_Layer] = []
        nodes = {node.name: node for node in dep.model.graph.node}
        for spec in layer_specs(dep):
            signature = table.layers.get(spec.node)
            if signature is None or signature != spec.signature:
                raise PlanError(
                    f"the latency table has no entry for layer {spec.node} as it is in this model "
                    f"({spec.signature}); profile this model again (with the --input-shape you plan with)."
                )
            node = nodes[spec.node]
            self.layers.append(
                _Layer(
                    spec,
                    table.curves[signature],
                    self._classes(node.input[0]),
                    self._classes(node.output[0]),
                    table.in_model_curve(spec.node),
                )
            )
        self.others = other_ops(dep, table.other_ms, table.other_fixed_ms) if table.other_ms > 0 else []
        # (predicted kernel ms, measured whole ms) of plans timed whole, and the predictions they checked
        self.timed: list[tuple[float, float]] = []
        self.checks: list[dict[str, float]] = []
        self._measured: dict[bytes, float] = {}  # by removal mask
        self._widths: dict[int, np.ndarray | None] = {}

    def _classes(self, tensor: str) -> np.ndarray | None:
        view = self.dep.views.get(tensor)
        return None if view is None else self.dep.roots[view.ravel()]

    @property
    def original_ms(self) -> float:
        return self.table.end_to_end_ms

    @property
    def costs(self) -> list[_Layer | _OtherOp]:
        """Everything the prediction sums: the weighted layers and the other ops."""
        return [*self.layers, *self.others]

    @staticmethod
    def widths(cost: _Layer | _OtherOp, removed_class: np.ndarray) -> tuple[int, int]:
        """Kept (input, output) widths of a layer or op under a per-class removal mask."""
        channels_in, channels_out = cost.channels
        kept_out = _kept(cost.out_classes, removed_class, channels_out)
        if cost.tied:
            return kept_out, kept_out
        return _kept(cost.in_classes, removed_class, channels_in), kept_out

    def kernels_ms(self, removed: np.ndarray) -> float:
        """Predicted kernel time (ms) after removing the atoms of the boolean mask `removed`: the
        layers' latencies and the other ops' shares."""
        removed_class = self.class_mask(removed)
        return sum(cost.latency(*self.widths(cost, removed_class)) for cost in self.costs)

    def class_mask(self, removed: np.ndarray) -> np.ndarray:
        """Per channel class (the dependency graph's roots): whether the atom mask `removed` removes it."""
        removed_class = np.zeros(self.dep.roots.size, dtype=bool)
        removed_class[self.dep.roots[removed]] = True
        return removed_class

    def predict(self, removed: np.ndarray) -> float:
        """Latency (ms) of the whole model after removing the atoms of `removed`."""
        return self.whole_ms(self.kernels_ms(removed))

    def whole_ms(self, kernels_ms: float) -> float:
        """Latency (ms) of the whole model whose predicted kernel time is `kernels_ms`: once plans were
        timed, the broken line through the model and them, made non-decreasing (two timings of nearby
        plans on a shared machine can cross) and continued below them along the chord to the model."""
        if not self.timed:
            return self.table.whole_ms(kernels_ms)
        anchor = (self.table.kernels_ms, self.table.end_to_end_ms)
        points = sorted({x: y for x, y in [*self.timed, anchor]}.items())
        xs, ys = np.asarray(points).T
        ys = _non_decreasing(ys)
        chord = (ys[-1] - ys[0]) / (xs[-1] - xs[0]) if xs.size > 1 else 0.0
        if chord <= 0:  # timings that say pruning made nothing faster: keep to the table
            return self.table.whole_ms(kernels_ms)
        if kernels_ms < xs[0]:
            return float(ys[0] + chord * (kernels_ms - xs[0]))
        if kernels_ms > xs[-1]:
            return float(ys[-1] + chord * (kernels_ms - xs[-1]))
        return float(np.interp(kernels_ms, xs, ys))

    def add_timing(self, removed: np.ndarray, measured_ms: float) -> dict[str, float]:
        """Record a plan's measured whole latency (in the table's terms): later predictions follow it.
        Returns the check: what was predicted for the plan, and what it measured."""
        check = {"predicted_ms": self.predict(removed), "measured_ms": measured_ms}
        self.checks.append(check)
        self.timed.append((self.kernels_ms(removed), measured_ms))
        self._measured[np.packbits(removed).tobytes()] = measured_ms
        return check

    def measured_ms(self, removed: np.ndarray) -> float | None:
        """The whole latency (ms, in the table's terms) this removal was timed at, if it was."""
        return self._measured.get(np.packbits(removed).tobytes())

    def group_widths(self, group: Group) -> np.ndarray | None:
        """Kept widths of `group` worth choosing, ascending: the widths at which all of the group's own
        layers were timed and (the others whole) no larger such width ran clearly faster.  None when no
        layer of the group was timed at the group's width."""
        if group.index not in self._widths:
            self._widths[group.index] = self._efficient(group)
        return self._widths[group.index]

    def _efficient(self, group: Group) -> np.ndarray | None:
        in_group = np.zeros(self.dep.roots.size, dtype=bool)
        in_group[group.classes] = True
        touching: list[tuple[_Layer, bool]] = []
        candidates: set[int] | None = None
        for layer in self.layers:
            for classes, channels, timed, is_out in (
                (layer.out_classes, layer.spec.out_channels, layer.curve.out_widths, True),
                (layer.in_classes, layer.spec.in_channels, layer.curve.in_widths, False),
            ):
                if layer.tied and not is_out:
                    continue  # one width, timed as the output's
                if classes is not None and channels == group.size and in_group[classes].all():
                    touching.append((layer, is_out))
                    # a width counts only if every layer of the group was timed at it (a grouped conv
                    # is timed at multiples of its group count only)
                    candidates = set(timed) if candidates is None else candidates & set(timed)
        if candidates is None:
            return None
        widths = sorted(w for w in candidates if w <= group.size)
        costs = [sum(_with_width(layer, is_out, w) for layer, is_out in touching) for w in widths]
        efficient, best = [], np.inf
        for width, cost in zip(reversed(widths), reversed(costs), strict=True):
            if cost < best * (1 + NOISE):  # a larger width must be clearly faster to rule this one out
                efficient.append(width)
            best = min(best, cost)
        return np.asarray(sorted({*efficient, group.size}), dtype=np.int64)


def _non_decreasing(values: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values.tolist():
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean_a, count_a), (mean_b, count_b) = blocks.pop(-2), blocks.pop()
            blocks.append([(mean_a * count_a + mean_b * count_b) / (count_a + count_b), count_a + count_b])
    return np.repeat([mean for mean, _ in blocks], [count for _, count in blocks])


def _with_width(layer: _Layer, is_out: bool, width: int) -> float:
    spec = layer.spec
    if spec.tied or is_out:
        return layer.latency(spec.in_width(width) if spec.tied else spec.in_channels, width)
    return layer.latency(width, spec.out_channels)


def _kept(classes: np.ndarray | None, removed_class: np.ndarray, channels: int) -> int:
    if classes is None:
        return channels
    return max(1, round(channels * (1.0 - removed_class[classes].mean())))


def allocation_path(planner: Planner, model: LatencyModel) -> list[dict[int, int]]:
    """Per-group removal counts after each step of a greedy that takes the move (one group down to its
    next allowed width, or one more whole conv group off a grouped conv planned by conv groups, its
    input and output groups together) losing the least importance per millisecond saved, from nothing
    removed until no move is left.  A channel's importance is its normalised score times the number of
    weighted layers it lives in: the milliseconds a move saves are summed over those layers, so its
    loss is too (HALP sums a group's importance over its layers likewise); otherwise a residual trunk,
    whose channel feeds and leaves several blocks' convs, looks several times cheaper per ms than it is
    and is cut to the bone first (a conv group's loss is likewise its channels' on each side, each
    weighted by its side's layers).  The path depends on neither the target nor the whole-model timings
    (they only rescale the sum of the layers' times), so a latency or a MACs budget picks a point on it;
    the counts are estimates on the importance order, and the caller checks the plan."""
    dep = planner.dep
    groups = {g.index: g for g in planner.groups}
    rank = np.full(dep.roots.size, np.iinfo(np.int64).max, dtype=np.int64)
    ranked_scores: dict[int, np.ndarray] = {}
    for group in groups.values():
        ranked, normalised = planner.ranked(group)
        rank[ranked] = np.arange(ranked.size)
        ranked_scores[group.index] = normalised
    dims = [_Dims(cost, dep, rank) for cost in model.costs]
    by_group: dict[int, list[int]] = {}
    for index, dim in enumerate(dims):
        for group in dim.groups():
            by_group.setdefault(group, []).append(index)
    # the weighted layers (convs, Gemms, MatMuls) that read or write each group's channels
    spanned = {g: sum(isinstance(dims[i].cost, _Layer) for i in by_group.get(g, [])) for g in groups}
    loss = {
        index: np.concatenate([[0.0], np.cumsum(scores)]) * max(1, spanned[index])
        for index, scores in ranked_scores.items()
    }
    drop_loss = {}
    for drop in planner.drops.values():
        weighted = [
            scores * max(1, spanned[g]) for g, scores in zip(drop.groups, drop.importance, strict=True)
        ]
        drop_loss[drop.groups] = np.concatenate([[0.0], np.cumsum(sum(weighted))])
    removed = dict.fromkeys(groups, 0)
    layer_ms = [dim.latency(removed) for dim in dims]
    options = {i: planner.allowed(g) for i, g in groups.items()}

    def lost(unit: tuple[int, ...], counts: dict[int, int]) -> float:
        """Importance (footprint-weighted) the unit's groups have lost at `counts`."""
        if unit in drop_loss:
            return float(drop_loss[unit][planner.drops[unit[0]].dropped(counts)])
        index = unit[0]
        return float(loss[index][min(counts[index], loss[index].size - 1)])

    def steps(unit: tuple[int, ...]) -> Iterator[dict[int, int]]:
        """The unit's next counts, fewer channels kept at each: the next allowed width of one group,
        or one more whole conv group of a conv planned by conv groups."""
        if unit in drop_loss:
            drop = planner.drops[unit[0]]
            sizes = drop.part_sizes
            for dropped in range(drop.dropped(removed) + 1, drop.most + 1):
                yield {g: dropped * size for g, size in zip(unit, sizes, strict=True)}
            return
        index = unit[0]
        kept = groups[index].size - removed[index]
        for width in options[index][::-1]:
            if width < kept:
                yield {index: groups[index].size - int(width)}

    def move(unit: tuple[int, ...]) -> tuple[float, dict[int, int], list[int], list[float]] | None:
        """(importance lost per ms saved, new counts, layers touched, their new times) of the unit's
        next useful step down."""
        affected = sorted({i for g in unit for i in by_group.get(g, [])})
        for counts in steps(unit):
            if any(count > planner.max_removable(groups[g]) for g, count in counts.items()):
                return None
            trial = {**removed, **counts}
            times = [dims[i].latency(trial) for i in affected]
            saved = sum(layer_ms[i] for i in affected) - sum(times)
            if saved > 1e-9:
                return (lost(unit, trial) - lost(unit, removed)) / saved, counts, affected, times
        return None

    unit_of = {
        group.index: tuple(member.index for member in unit) for unit in planner.units for group in unit
    }
    moves = {unit: move(unit) for unit in dict.fromkeys(unit_of.values())}
    path = [dict(removed)]
    while ready := {u: m for u, m in moves.items() if m is not None}:
        unit = min(ready, key=lambda u: ready[u][0])
        _, counts, affected, times = ready[unit]
        removed.update(counts)
        path.append(dict(removed))
        for i, t in zip(affected, times, strict=True):
            layer_ms[i] = t
        touched = {unit_of[g] for i in affected for g in dims[i].groups() if g in unit_of} | {unit}
        for other in touched:
            moves[other] = move(other)
    log.debug(
        "latency allocation: %d moves; the layers sum to %.3f ms at the end", len(path) - 1, sum(layer_ms)
    )
    return path


class _Dims:
    """A layer's (or op's) input and output positions as (group, sorted removal ranks) for fast width
    updates."""

    def __init__(self, cost: _Layer | _OtherOp, dep: DependencyGraph, rank: np.ndarray) -> None:
        self.cost = cost
        self.parts = [self._split(c, dep, rank) for c in (cost.in_classes, cost.out_classes)]

    @staticmethod
    def _split(classes: np.ndarray | None, dep: DependencyGraph, rank: np.ndarray) -> dict[int, np.ndarray]:
        if classes is None:
            return {}
        owners = dep.class_group[classes]
        ranks = rank[classes]
        planned = ranks < np.iinfo(np.int64).max
        return {int(g): np.sort(ranks[planned & (owners == g)]) for g in np.unique(owners[planned])}

    def groups(self) -> set[int]:
        return set(self.parts[0]) | set(self.parts[1])

    def latency(self, removed: dict[int, int]) -> float:
        kept = []
        for parts, classes, channels in zip(
            self.parts, (self.cost.in_classes, self.cost.out_classes), self.cost.channels, strict=True
        ):
            if classes is None:
                kept.append(channels)
                continue
            gone = sum(int(np.searchsorted(r, removed.get(g, 0))) for g, r in parts.items())
            kept.append(max(1, round(channels * (1.0 - gone / classes.size))))
        kin, kout = (kept[1], kept[1]) if self.cost.tied else kept
        return self.cost.latency(kin, kout)
