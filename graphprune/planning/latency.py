"""Latency as planning sees it: the model's weighted layers described for the profiler, the latency a
removal is predicted to leave (from a measured table), the widths worth keeping, and the allocation of
channels by importance per unit of latency (greedy, in the spirit of HALP, Shen et al. NeurIPS 2022).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.errors import PlanError
from graphprune.runtime.profile import LatencyTable, LayerCurve, LayerSpec

if TYPE_CHECKING:
    from graphprune.planning.planner import Planner

log = logging.getLogger(__name__)

PROFILED_OPS = ("Conv", "Gemm", "MatMul")
# A width is worth keeping unless some larger width was timed faster by more than this share.
NOISE = 0.05


def layer_specs(dep: DependencyGraph) -> list[LayerSpec]:
    """Every Conv / Gemm / MatMul with a constant weight, described plainly for the profiler; a width
    is swept only where prunable channels flow."""
    prunable = np.zeros(dep.roots.size, dtype=bool)
    for group in dep.prunable_groups:
        prunable[group.prunable] = True

    def swept(tensor: str) -> bool:
        view = dep.views.get(tensor)
        return view is not None and bool(prunable[dep.roots[view.ravel()]].any())

    specs = []
    for node in dep.model.graph.node:
        weight = dep.constants.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type not in PROFILED_OPS or weight is None:
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        x = dep.shapes[node.input[0]]
        bias = len(node.input) > 2 and bool(node.input[2])
        common = {"node": node.name, "sweep_in": swept(node.input[0]), "sweep_out": swept(node.output[0])}
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
    spec: LayerSpec
    curve: LayerCurve
    in_classes: np.ndarray | None
    out_classes: np.ndarray | None


class LatencyModel:
    """Predicted latency (ms) of a removal: each layer's curve at its kept widths, summed, and mapped
    to the whole by the table's fit."""

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
                    f"({spec.signature}); profile this model again."
                )
            node = nodes[spec.node]
            self.layers.append(
                _Layer(
                    spec, table.curves[signature], self._classes(node.input[0]), self._classes(node.output[0])
                )
            )
        self._widths: dict[int, np.ndarray | None] = {}

    def _classes(self, tensor: str) -> np.ndarray | None:
        view = self.dep.views.get(tensor)
        return None if view is None else self.dep.roots[view.ravel()]

    @property
    def original_ms(self) -> float:
        return self.table.end_to_end_ms

    def widths(self, layer: _Layer, removed_class: np.ndarray) -> tuple[int, int]:
        """Kept (input, output) widths of a layer under a per-class removal mask."""
        spec = layer.spec
        kept_out = _kept(layer.out_classes, removed_class, spec.out_channels)
        if spec.depthwise:
            return kept_out, kept_out
        return _kept(layer.in_classes, removed_class, spec.in_channels), kept_out

    def layers_ms(self, removed: np.ndarray) -> float:
        """Sum of the layers' latencies (ms) after removing the atoms of the boolean mask `removed`."""
        removed_class = np.zeros(self.dep.roots.size, dtype=bool)
        removed_class[self.dep.roots[removed]] = True
        return sum(layer.curve.latency(*self.widths(layer, removed_class)) for layer in self.layers)

    def predict(self, removed: np.ndarray) -> float:
        """Latency (ms) of the whole model after removing the atoms of `removed`."""
        return self.table.whole_ms(self.layers_ms(removed))

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
                if layer.spec.depthwise and not is_out:
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


def _with_width(layer: _Layer, is_out: bool, width: int) -> float:
    spec = layer.spec
    if spec.depthwise or is_out:
        return layer.curve.latency(width if spec.depthwise else spec.in_channels, width)
    return layer.curve.latency(width, spec.out_channels)


def _kept(classes: np.ndarray | None, removed_class: np.ndarray, channels: int) -> int:
    if classes is None:
        return channels
    return max(1, round(channels * (1.0 - removed_class[classes].mean())))


def allocate(planner: Planner, model: LatencyModel, target_ms: float) -> dict[int, int]:
    """Per-group removal counts that bring the predicted latency to `target_ms`, taking at each step the
    move (one group down to its next allowed width) that loses the least normalised importance per
    millisecond saved.  The counts are estimates on the importance order; the caller checks the plan."""
    dep = planner.dep
    groups = {g.index: g for g in planner.groups}
    rank = np.full(dep.roots.size, np.iinfo(np.int64).max, dtype=np.int64)
    loss: dict[int, np.ndarray] = {}
    for group in groups.values():
        ranked, normalised = planner.ranked(group)
        rank[ranked] = np.arange(ranked.size)
        loss[group.index] = np.concatenate([[0.0], np.cumsum(normalised)])
    dims = [_Dims(layer, dep, rank) for layer in model.layers]
    by_group: dict[int, list[int]] = {}
    for index, dim in enumerate(dims):
        for group in dim.groups():
            by_group.setdefault(group, []).append(index)
    removed = dict.fromkeys(groups, 0)
    layer_ms = [dim.latency(removed) for dim in dims]
    total = model.table.whole_ms(sum(layer_ms))
    options = {i: planner.allowed(g) for i, g in groups.items()}

    def move(index: int) -> tuple[float, int, list[float]] | None:
        """(importance lost per ms saved, new count, new layer times) of the next useful step down."""
        group = groups[index]
        kept = group.size - removed[index]
        for width in options[index][::-1]:
            if width >= kept:
                continue
            count = group.size - int(width)
            if count > planner.max_removable(group):
                return None
            trial = {**removed, index: count}
            times = [dims[i].latency(trial) for i in by_group.get(index, [])]
            saved = sum(layer_ms[i] for i in by_group.get(index, [])) - sum(times)
            if saved > 1e-9:
                lost = loss[index][min(count, loss[index].size - 1)] - loss[index][removed[index]]
                return lost / saved, count, times
        return None

    moves = {i: move(i) for i in groups}
    while total > target_ms:
        ready = {i: m for i, m in moves.items() if m is not None}
        if not ready:
            break
        index = min(ready, key=lambda i: ready[i][0])
        _, count, times = ready[index]
        removed[index] = count
        for i, t in zip(by_group.get(index, []), times, strict=True):
            layer_ms[i] = t
        total = model.table.whole_ms(sum(layer_ms))
        touched = {g for i in by_group.get(index, []) for g in dims[i].groups()} | {index}
        for group in touched & moves.keys():
            moves[group] = move(group)
    log.debug("latency allocation: predicted %.3f ms for a target of %.3f ms", total, target_ms)
    return removed


class _Dims:
    """A layer's input and output positions as (group, sorted removal ranks) for fast width updates."""

    def __init__(self, layer: _Layer, dep: DependencyGraph, rank: np.ndarray) -> None:
        self.layer = layer
        self.parts = [self._split(c, dep, rank) for c in (layer.in_classes, layer.out_classes)]

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
        spec = self.layer.spec
        kept = []
        for parts, classes, channels in (
            (self.parts[0], self.layer.in_classes, spec.in_channels),
            (self.parts[1], self.layer.out_classes, spec.out_channels),
        ):
            if classes is None:
                kept.append(channels)
                continue
            gone = sum(int(np.searchsorted(r, removed.get(g, 0))) for g, r in parts.items())
            kept.append(max(1, round(channels * (1.0 - gone / classes.size))))
        kin, kout = (kept[1], kept[1]) if spec.depthwise else kept
        return self.layer.curve.latency(kin, kout)
