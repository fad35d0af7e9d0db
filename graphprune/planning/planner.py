"""Turn channel scores into a removal: local ratio, global ranking, a MACs or latency target, and the
structural limits (minimum channels, round-to multiples or the widths a latency profile found fast,
excluded nodes, equal removal per conv group or whole conv groups)."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.criteria.normalize import NORMALIZATIONS, normalize
from graphprune.errors import PlanError
from graphprune.ops.context import GroupedConv
from graphprune.planning.latency import LatencyModel, allocation_path
from graphprune.runtime.cost import CostReport

log = logging.getLogger(__name__)

OBJECTIVES = ("channels", "latency")


# --global's score normalisation unless one is given.  The latency allocation weighs a move's importance
# lost against the ms it saves: with `mean` a channel costs about the same in a 16-wide trunk as in a
# 1152-wide expansion, so the narrow groups are cut to the bone; LAMP (a channel's score over the sum of
# those at least as large) prices a share of the group instead (-ln(1 - share) for equal scores): at the
# same MACs, batch 1, its plans of five torchvision mobile nets ran 1.05-1.35x faster than mean's, and
# its MobileNetV2 kept more accuracy at equal latency (README, Latency-aware planning).
DEFAULT_NORMALIZATION = {"channels": "mean", "latency": "lamp"}


@dataclass
class PlanOptions:
    """How much to remove and under which limits (see `graphprune prune --help`)."""

    ratio: float | None = None
    target_macs: float | None = None
    target_latency: float | None = None
    global_ranking: bool = False
    objective: str = "channels"
    max_ratio: float = 0.9
    min_channels: int = 1
    round_to: int = 1
    exclude: list[str] = field(default_factory=list)
    normalize: str | None = None  # None: the objective's own (DEFAULT_NORMALIZATION)

    def __post_init__(self) -> None:
        if self.normalize is None:
            self.normalize = DEFAULT_NORMALIZATION.get(self.objective, "mean")

    @property
    def needs_latency(self) -> bool:
        """Whether planning needs a latency table: a latency target, or latency as the objective."""
        return self.target_latency is not None or self.objective == "latency"

    def validate(self) -> None:
        if sum(x is not None for x in (self.ratio, self.target_macs, self.target_latency)) != 1:
            raise PlanError("give exactly one of --ratio, --target-macs or --target-latency.")
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PlanError(f"--ratio must be in [0, 1), got {self.ratio}.")
        if self.target_macs is not None and not 0.0 < self.target_macs <= 1.0:
            raise PlanError(f"--target-macs must be in (0, 1], got {self.target_macs}.")
        if self.target_latency is not None and not 0.0 < self.target_latency <= 1.0:
            raise PlanError(f"--target-latency must be in (0, 1], got {self.target_latency}.")
        if self.objective not in OBJECTIVES:
            raise PlanError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}.")
        if self.objective == "latency" and not (self.global_ranking and self.ratio is None):
            raise PlanError(
                "--objective latency allocates a budget across groups by latency saved: add --global and "
                "--target-latency or --target-macs."
            )
        if not 0.0 < self.max_ratio < 1.0:
            raise PlanError(f"--max-ratio must be in (0, 1), got {self.max_ratio}.")
        if self.min_channels < 1 or self.round_to < 1:
            raise PlanError("--min-channels and --round-to must be at least 1.")
        if self.normalize not in NORMALIZATIONS:
            raise PlanError(
                f"unknown normalisation {self.normalize!r}; choose one of {', '.join(NORMALIZATIONS)}."
            )


@dataclass(frozen=True)
class RemovalPlanner:
    """Scores -> removal mask under fixed plan options.  Picklable, so the blend search's worker
    processes can plan each candidate blend exactly as prune() will."""

    options: PlanOptions
    cost: CostReport | None = None
    latency: LatencyModel | None = None

    def __call__(self, dep: DependencyGraph, scores: dict[int, np.ndarray]) -> np.ndarray:
        return Planner(dep, scores, self.options, self.latency).plan(self.cost)


@dataclass(frozen=True)
class ConvGroupDrop:
    """A grouped conv planned by whole conv groups: its input and output groups (indices), a conv
    group's channels on either side, per side the classes of each conv group that may go (least
    important conv group first) and their summed normalised scores, and the conv's group count."""

    groups: tuple[int, int]
    part_sizes: tuple[int, int]
    order: tuple[list[np.ndarray], list[np.ndarray]]
    importance: tuple[np.ndarray, np.ndarray]
    conv_groups: int

    @property
    def most(self) -> int:
        """The most conv groups that may go: those whose channels are all prunable, one kept."""
        return min(len(self.order[0]), self.conv_groups - 1)

    def dropped(self, counts: dict[int, int]) -> int:
        """How many conv groups the per-group counts remove: whole conv groups on both sides."""
        whole = [counts.get(g, 0) // size for g, size in zip(self.groups, self.part_sizes, strict=True)]
        return min(*whole, self.most)

    def chosen(self, group: int, dropped: int) -> np.ndarray:
        """The classes `group` loses when `dropped` conv groups go."""
        parts = self.order[self.groups.index(group)][:dropped]
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def excluded_groups(dep: DependencyGraph, names: list[str]) -> set[int]:
    """Groups touched by the named nodes (or output tensors / weight names)."""
    found: set[int] = set()
    for name in names:
        hits = {g.index for g in dep.groups for b in g.blocks if name in (b.node, b.name, b.param)}
        if not hits:
            raise PlanError(f"--exclude {name}: no prunable channels are produced by a node of that name.")
        found |= hits
    return found


class Planner:
    """Chooses which channels to remove from per-group scores."""

    def __init__(
        self,
        dep: DependencyGraph,
        scores: dict[int, np.ndarray],
        options: PlanOptions,
        latency: LatencyModel | None = None,
    ) -> None:
        options.validate()
        self.dep = dep
        self.scores = scores
        self.options = options
        self.latency = latency
        skip = excluded_groups(dep, options.exclude)
        self.groups = [
            g for g in dep.groups if g.index in scores and g.index not in skip and g.prunable.size > 1
        ]
        self.segments = self._segments_by_group()
        self.keep_one, self.conv_constraints = self._constraints_by_group()
        self.drops = self._conv_group_drops()
        by_index = {g.index: g for g in self.groups}
        units = {}
        for group in self.groups:
            drop = self.drops.get(group.index)
            members = drop.groups if drop is not None else (group.index,)
            units.setdefault(members, tuple(by_index[i] for i in members))
        # what is selected and checked together: a group, or the two groups of a conv planned by conv groups
        self.units: list[tuple[Group, ...]] = list(units.values())

    def _segments_by_group(self) -> dict[int, list[np.ndarray]]:
        """Per group, the pieces that must lose equal counts: channels of grouped convs split by the
        part they fall in for every grouped conv that reads or writes them (the finest common partition,
        so a group written by a g=2 conv and read by a g=3 conv is cut into six pieces)."""
        signatures: dict[int, dict[int, list[int]]] = {}
        atoms = self.dep.roots.size
        for index, (_, parts) in enumerate(self.dep.segments):
            # distinct (part, root) pairs in part-then-root order, as one integer key each
            part_of = np.repeat(np.arange(len(parts)), [part.size for part in parts])
            keys = np.unique(part_of * atoms + self.dep.roots[np.concatenate(parts)])
            part_indices, roots = np.divmod(keys, atoms)
            groups = self.dep.class_group[roots]
            for part_index, root, group in zip(
                part_indices.tolist(), roots.tolist(), groups.tolist(), strict=True
            ):
                signatures.setdefault(group, {}).setdefault(root, []).append(index * 1000 + part_index)
        result: dict[int, list[np.ndarray]] = {}
        for group, by_class in signatures.items():
            pieces: dict[tuple[int, ...], list[int]] = {}
            for root, signature in by_class.items():
                pieces.setdefault(tuple(sorted(signature)), []).append(root)
            result[group] = [np.asarray(sorted(p), dtype=np.int64) for p in pieces.values()]
        return result

    def _conv_group_drops(self) -> dict[int, ConvGroupDrop]:
        """The droppable grouped convs planned by whole conv groups, by their input and output groups:
        those whose two groups are planned and may only keep whole conv groups (the widths allowed by
        --round-to or by the latency profile are multiples of a conv group's channels)."""
        by_index = {g.index: g for g in self.groups}
        drops: dict[int, ConvGroupDrop] = {}
        for conv in self.dep.grouped_convs:
            if conv.node not in self.dep.droppable:
                continue
            assert conv.inputs is not None  # analysis only drops convs with prunable inputs
            sides = (
                [self.dep.roots[part] for part in conv.inputs],
                [self.dep.roots[part] for part in conv.outputs],
            )
            indices = tuple(int(self.dep.class_group[parts[0][0]]) for parts in sides)
            if not all(
                i in by_index and not (self.allowed(by_index[i]) % parts[0].size).any()
                for i, parts in zip(indices, sides, strict=True)
            ):
                continue
            importance = np.zeros((2, len(conv.outputs)))  # per side, per conv group
            eligible = np.ones(len(conv.outputs), dtype=bool)
            for side, (i, parts) in enumerate(zip(indices, sides, strict=True)):
                normalised = normalize(self.scores[i], self.options.normalize)
                for k, part in enumerate(parts):
                    importance[side, k] = normalised[self.dep.class_slot[part]].sum()
                    eligible[k] &= bool(np.isin(part, by_index[i].prunable).all())
            order = [k for k in np.argsort(importance.sum(axis=0), kind="stable").tolist() if eligible[k]]
            drop = ConvGroupDrop(
                (indices[0], indices[1]),
                (sides[0][0].size, sides[1][0].size),
                ([sides[0][k] for k in order], [sides[1][k] for k in order]),
                (importance[0, order], importance[1, order]),
                len(conv.outputs),
            )
            drops.update(dict.fromkeys(indices, drop))
        return drops

    # counts ------------------------------------------------------------------------------------
    def max_removable(self, group: Group) -> int:
        limit = min(int(group.size * self.options.max_ratio), group.size - self.options.min_channels)
        return max(0, min(limit, group.prunable.size))

    def allowed(self, group: Group) -> np.ndarray:
        """Kept widths a plan may leave the group at, ascending: those the latency profile found fast
        when it timed the group's layers, else the multiples of --round-to (and the whole group)."""
        widths = self.latency.group_widths(group) if self.latency is not None else None
        if widths is None:
            step = self.options.round_to
            widths = np.unique(np.append(np.arange(step, group.size, step), group.size))
        return widths

    def rounded(self, group: Group, count: int) -> int:
        """Shrink a removal so the kept count is an allowed width (a multiple of --round-to, or a width
        the latency profile found fast); a group no larger than one step stays whole."""
        if self.options.round_to == 1 and self.latency is None:
            return count
        widths = self.allowed(group)
        kept = widths[min(int(np.searchsorted(widths, group.size - count)), widths.size - 1)]
        return group.size - int(kept)

    def ranked(self, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """The group's prunable classes, least important first, and their normalised scores (the
        importance --global and the latency allocation weigh)."""
        scores = self.scores[group.index]
        order = np.argsort(scores, kind="stable")
        prunable = np.isin(group.classes[order], group.prunable)
        normalised = normalize(scores, self.options.normalize)[order]
        return group.classes[order][prunable], normalised[prunable]

    def local_counts(self, ratio: float) -> dict[int, int]:
        return {
            g.index: min(self.rounded(g, int(g.size * ratio)), self.max_removable(g)) for g in self.groups
        }

    def global_counts(self, ratio: float) -> dict[int, int]:
        """One threshold over normalised scores of every group, capped per group by --max-ratio."""
        entries = []
        for group in self.groups:
            scores = normalize(self.scores[group.index], self.options.normalize)
            prunable = np.isin(group.classes, group.prunable)
            entries.extend((float(s), group.index) for s in scores[prunable])
        total = sum(g.size for g in self.groups)
        budget = int(total * ratio)
        counts = dict.fromkeys((g.index for g in self.groups), 0)
        caps = {g.index: self.max_removable(g) for g in self.groups}
        for _, index in sorted(entries):
            if budget <= 0:
                break
            if counts[index] < caps[index]:
                counts[index] += 1
                budget -= 1
        by_index = {g.index: g for g in self.groups}
        return {i: min(self.rounded(by_index[i], c), caps[i]) for i, c in counts.items()}

    # selection ---------------------------------------------------------------------------------
    def select(self, group: Group, count: int) -> np.ndarray:
        """The `count` least important prunable classes of the group.  Pieces of grouped convs lose
        channels in proportion to their size, which removes equal counts from every conv group."""
        if count <= 0:
            return np.empty(0, dtype=np.int64)
        ranked = self.ranked(group)[0].tolist()
        prunable = set(ranked)
        parts = self.segments.get(group.index)
        if not parts:
            return np.asarray(ranked[:count], dtype=np.int64)
        in_parts = set(np.concatenate(parts).tolist())
        sizes = [p.size for p in parts]
        unit = int(np.gcd.reduce(sizes))
        available = [sum(c in prunable for c in p.tolist()) for p in parts]
        steps = min(
            count * unit // sum(sizes),
            unit - 1,
            *(a * unit // n for a, n in zip(available, sizes, strict=True)),
        )
        chosen = []
        for part in parts:
            members = set(part.tolist())
            chosen.extend([c for c in ranked if c in members][: steps * part.size // unit])
        free = [c for c in ranked if c not in in_parts]
        share = int(len(free) * count / max(group.size, 1))
        chosen.extend(free[:share])
        return np.asarray(chosen, dtype=np.int64)

    def chosen(self, group: Group, counts: dict[int, int]) -> np.ndarray:
        """The classes `group` loses under the per-group counts: its least important ones, or those of
        the least important whole conv groups where a grouped conv is planned by conv groups."""
        drop = self.drops.get(group.index)
        if drop is None:
            return self.select(group, counts.get(group.index, 0))
        return drop.chosen(group.index, drop.dropped(counts))

    def removal(self, counts: dict[int, int]) -> np.ndarray:
        """Boolean atom mask for the given per-group counts; a group (or the pair of groups of a conv
        planned by conv groups) whose removal breaks a structural rule (for instance grouped-conv parts
        sharing channels) is left whole.  Only the constraints that touch a group are checked for it,
        so planning stays linear in the graph size."""
        roots = self.dep.roots
        removed_class = np.zeros(roots.size, dtype=bool)
        for unit in self.units:
            chosen = [self.chosen(group, counts) for group in unit]
            if not any(c.size for c in chosen):
                continue
            for classes in chosen:
                removed_class[classes] = True
            for group in unit:
                self._give_back_emptied(removed_class, group)
            problem = next((p for g in unit if (p := self._violation(removed_class, g))), None)
            if problem:
                log.warning("group %s left whole: %s", " and ".join(g.name for g in unit), problem)
                for group in unit:
                    removed_class[group.classes] = False
        return removed_class[roots]

    def _constraints_by_group(self) -> tuple[dict[int, list[np.ndarray]], dict[int, list[GroupedConv]]]:
        keep_one: dict[int, list[np.ndarray]] = {}
        for atoms in self.dep.keep_one:
            for group in np.unique(self.dep.class_group[self.dep.roots[atoms]]).tolist():
                keep_one.setdefault(group, []).append(atoms)
        convs: dict[int, list[GroupedConv]] = {}
        for conv in self.dep.grouped_convs:
            atoms = np.concatenate([np.concatenate(parts) for parts in conv.sides])
            for group in np.unique(self.dep.class_group[self.dep.roots[atoms]]).tolist():
                convs.setdefault(group, []).append(conv)
        return keep_one, convs

    def _give_back_emptied(self, removed_class: np.ndarray, group: Group) -> None:
        """Give back the best channel of any split/slice part or layer the removal would empty."""
        scores = self.scores[group.index]
        for atoms in self.keep_one.get(group.index, []):
            if removed_class[self.dep.roots[atoms]].all():
                inside, slots = self.dep.slots(atoms, group)
                best = slots[inside][np.argmax(scores[slots[inside]])]
                removed_class[group.classes[best]] = False

    def _violation(self, removed_class: np.ndarray, group: Group) -> str | None:
        """Why the current removal breaks a constraint touching `group`, or None."""
        for atoms in self.keep_one.get(group.index, []):
            if removed_class[self.dep.roots[atoms]].all():
                return "it would empty a layer or a split part"
        return self.dep.conv_group_problem(
            lambda atoms: removed_class[self.dep.roots[atoms]], self.conv_constraints.get(group.index, [])
        )

    def plan(self, cost: CostReport | None = None) -> np.ndarray:
        """The removal mask for the options: the ratio as given; for a MACs or latency target, the
        largest shared ratio that meets it (bisection), or with --objective latency the first point of
        the greedy allocation by importance per millisecond that meets it; then hand back what the
        rounding overshot."""
        counts_for = self.global_counts if self.options.global_ranking else self.local_counts
        if self.options.ratio is not None:
            return self.removal(counts_for(self.options.ratio))
        measure, target, what = self._budget(cost)
        if self.options.objective == "latency":
            assert self.latency is not None  # _budget refuses a latency target without a model
            best = self._allocated(measure, target)
        else:
            low, high = 0.0, 0.99
            best = counts_for(low)
            for _ in range(14):
                middle = (low + high) / 2
                counts = counts_for(middle)
                if measure(self.removal(counts)) <= target:
                    best, high = counts, middle
                else:
                    low = middle
        removed = self.removal(best)
        if measure(removed) > target:
            reached = measure(removed) / target * self._fraction()
            raise PlanError(
                f"cannot reach {self._fraction():.0%} of the {what} within the limits "
                f"(the closest plan keeps {reached:.1%}); raise --max-ratio or lower --min-channels."
            )
        if self.options.round_to > 1 or self.latency is not None:
            return self._give_back(best, measure, target)
        return removed

    def _fraction(self) -> float:
        value = (
            self.options.target_macs if self.options.target_macs is not None else self.options.target_latency
        )
        assert value is not None
        return value

    def _budget(self, cost: CostReport | None) -> tuple[Callable[[np.ndarray], float], float, str]:
        """What a target measures (a removal -> MACs or ms), its budget and its name."""
        if self.options.target_macs is not None:
            if cost is None:
                raise PlanError("a MACs target needs the model's cost report.")
            return (lambda r: predicted_macs(self.dep, cost, r)), self.options.target_macs * cost.macs, "MACs"
        if self.latency is None:
            raise PlanError("a latency target needs a latency table (--latency-lut, or profile on the fly).")
        model = self.latency
        return model.predict, self._fraction() * model.original_ms, "latency"

    def _allocated(self, measure: Callable[[np.ndarray], float], target: float) -> dict[int, int]:
        """The earliest point of the greedy allocation path whose checked plan (grouped-conv parts,
        emptied layers given back) meets the target, found by bisection: the path only removes, so the
        budget's measure falls along it.  When no point meets it, the path's end (which plan() refuses)."""
        assert self.latency is not None
        path = allocation_path(self, self.latency)
        first = bisect.bisect_left(
            range(len(path)), True, key=lambda i: measure(self.removal(path[i])) <= target
        )
        return path[min(first, len(path) - 1)]

    def _give_back(
        self, counts: dict[int, int], measure: Callable[[np.ndarray], float], target: float
    ) -> np.ndarray:
        """Rounding to allowed widths makes a shared ratio jump and overshoot the target; hand back one
        step (to the next larger allowed width) per group, largest removal first, while the target
        still holds."""
        counts = dict(counts)
        by_index = {g.index: g for g in self.groups}
        for index in sorted(counts, key=lambda i: -counts[i]):
            group = by_index[index]
            widths = self.allowed(group)
            kept = group.size - counts[index]
            larger = widths[widths > kept]
            if counts[index] and larger.size:
                trial = {**counts, index: group.size - int(larger[0])}
                if measure(self.removal(trial)) <= target:
                    counts = trial
        return self.removal(counts)


def kept_fraction(dep: DependencyGraph, tensor: str, keep: np.ndarray) -> float:
    view = dep.views.get(tensor)
    return float(keep[view].mean()) if view is not None else 1.0


def predicted_macs(dep: DependencyGraph, cost: CostReport, removed: np.ndarray) -> float:
    """MACs after removal without doing surgery: a node's mixing MACs scale with its kept input and
    output channels (a grouped conv's with the kept inputs per kept conv group), the rest with its kept
    output channels (graphprune.ops.spec.Macs)."""
    keep = ~removed
    droppable = {conv.node: conv for conv in dep.grouped_convs if conv.node in dep.droppable}
    total = 0.0
    for node in dep.model.graph.node:
        node_cost = cost.per_node.get(node.name)
        if node_cost is None or not node_cost.macs:
            continue
        out_scale = kept_fraction(dep, node.output[0], keep)
        mixing = node_cost.mixing_macs
        in_scale = kept_fraction(dep, node.input[0], keep) if mixing else 0.0
        if node.name in droppable:  # a conv group mixes its own inputs: scale by those of the kept groups
            parts = droppable[node.name].inputs or []
            alive = sum(bool(keep[part].any()) for part in parts)
            in_scale *= len(parts) / max(alive, 1)
        total += mixing * in_scale * out_scale + (node_cost.macs - mixing) * out_scale
    return total
