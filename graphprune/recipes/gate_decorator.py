"""Gate Decorator (You et al., NeurIPS 2019): gated BN, Taylor scores, group pruning, Tick-Tock.

`GatedBN` is a BatchNorm2d whose output channel i is multiplied by a trainable gate phi_i (init 1)
and a 0/1 mask; phi_i = 0 (or mask 0) is the channel removed. It subclasses BatchNorm2d rather than
wrapping one so every parameter keeps its name (`layer1.0.bn1.weight`), which export, analysis and
fold-back match on. While gated, gamma is frozen: the gate is the channel's scale (as in the
reference code, which moves gamma into the gate), so the L1 penalty on phi cannot be undone by gamma
growing. `fold_gates` puts phi back into gamma and beta (gamma *= phi, beta *= phi): no new op is
left in the model.

Taylor score of channel i: |sum over batches of dL/dphi_i * phi_i| (`score="sum"`, the paper's
formula) or sum over batches of |dL/dphi_i * phi_i| (`score="abs"`, the reference code). Optional
FLOPs-aware term: score - eta * (area / smallest area) * (active input channels of the conv feeding
the BN), so costly channels go first (eta in score units; 0 disables it).

Group pruning reuses graphprune's analysis: the module (gates folded) is exported and analysed; each
group's channel classes map to (BN layer, channel) pairs through the group's `bn_scale` members, so
BNs tied by a residual sum share one pattern and a class scores the sum of its members' scores.
Groups with a producer no BN covers (masking the gates would not zero them) are left whole.

Tick-Tock: a Tick trains one epoch on a random subset with everything frozen but the gates and the
final Linear, scores, and masks the lowest-scoring channels (a share of all BN channels: 0.2% for
residual nets, 1% for plain ones, counted in gate positions, so a channel tied across k BNs counts k
as in the reference code; every group keeps `min_keep`, 10% by default). After `ticks` Ticks
(or as soon as the predicted MACs meet the target) the masked channels are removed physically: gates
folded, exported, pruned by a PruningPlan through the exact ONNX path (verified), folded back. A Tock
then fine-tunes on the full data with L1 on the gates. Once the target is met, the gates are folded
away for good and the model is fine-tuned without the penalty.

Under torchrun every rank trains (DDP, see `train.fit`); rank 0 alone analyses, scores, chooses the
masks, prunes, evaluates and writes files. It hands each Tick's masks (and its counts) to the other
ranks, which stop at the same Tick, and every rank folds rank 0's pruned graph back onto its module
(`slimming.prune_stage`), so all ranks train identical modules. Taylor scores are read from gradients
already averaged by DDP, so they agree across ranks anyway; taking rank 0's masks does not rely on it.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from graphprune.analysis.graph import DependencyGraph
from graphprune.api import PruneResult, analyze_model, model_cost, prune
from graphprune.data import ArrayDataset
from graphprune.errors import GraphPruneError, UnsupportedModelError
from graphprune.ops.context import MemberKind
from graphprune.planning import predicted_macs
from graphprune.planning.plan import PruningPlan
from graphprune.recipes.workspace import (
    RecipeResult,
    Stage,
    Start,
    export_stage,
    prune_stage,
    publish,
    workspace,
)
from graphprune.runtime.cost import CostReport
from graphprune.torch_bridge.distill import Teacher
from graphprune.torch_bridge.train import (
    Callback,
    Regularizer,
    TrainConfig,
    TrainState,
    dist_info,
    export_trained,
    fit,
    init_distributed,
    run_on_main,
)

log = logging.getLogger(__name__)

ScoreMode = Literal["sum", "abs"]
SCORE_MODES = ("sum", "abs")
SHARE_RESIDUAL = 0.002
SHARE_PLAIN = 0.01


# Gated BatchNorm ----------------------------------------------------------------------------------


class GatedBN(nn.BatchNorm2d):
    """BatchNorm2d times a per-channel gate `gate` (trainable, init 1) and a 0/1 `mask` buffer."""

    def __init__(self, num_features: int, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)
        if not self.affine:
            raise UnsupportedModelError(
                "Gate Decorator folds gates into BN gamma and beta, but this BatchNorm2d has affine=False; "
                "use affine BatchNorm layers."
            )
        self.gate = nn.Parameter(torch.ones(num_features, device=self.weight.device, dtype=self.weight.dtype))
        self.register_buffer("mask", torch.ones_like(self.gate.detach()))

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d) -> GatedBN:
        """A gated copy of `bn` (same values, mode and device) with all gates 1 and gamma frozen."""
        gated = cls(
            bn.num_features,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            device=None if bn.weight is None else bn.weight.device,
            dtype=None if bn.weight is None else bn.weight.dtype,
        )
        gated.load_state_dict(bn.state_dict(), strict=False)
        gated.weight.requires_grad_(False)
        gated.bias.requires_grad_(bn.bias.requires_grad)
        return gated.train(bn.training)

    def effective_gate(self) -> torch.Tensor:
        return self.gate * self.mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.effective_gate().view(1, -1, 1, 1)

    def folded(self) -> nn.BatchNorm2d:
        """The plain BatchNorm2d computing the same function: gamma and beta multiplied by the gate."""
        bn = nn.BatchNorm2d(
            self.num_features,
            eps=self.eps,
            momentum=self.momentum,
            affine=True,
            track_running_stats=self.track_running_stats,
            device=self.weight.device,
            dtype=self.weight.dtype,
        )
        state = {k: v for k, v in self.state_dict().items() if k not in ("gate", "mask")}
        bn.load_state_dict(state)
        with torch.no_grad():
            gate = self.effective_gate()
            bn.weight.mul_(gate)
            bn.bias.mul_(gate)
        bn.bias.requires_grad_(self.bias.requires_grad)
        return bn.train(self.training)


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    setattr(parent, child, new)


def add_gates(module: nn.Module) -> dict[str, GatedBN]:
    """Replace every BatchNorm2d of `module` (in place) by a GatedBN; return them by module name."""
    for name, layer in list(module.named_modules()):
        if type(layer) is nn.BatchNorm2d:
            _replace(module, name, GatedBN.from_bn(layer))
    gates = gated_layers(module)
    if not gates:
        raise UnsupportedModelError(
            f"{type(module).__name__} has no BatchNorm2d layer to gate; Gate Decorator needs BN after its convs."
        )
    return gates


def gated_layers(module: nn.Module) -> dict[str, GatedBN]:
    return {name: layer for name, layer in module.named_modules() if isinstance(layer, GatedBN)}


def fold_gates(module: nn.Module) -> nn.Module:
    """Replace every GatedBN (in place) by its folded BatchNorm2d; return the module."""
    for name, layer in list(gated_layers(module).items()):
        _replace(module, name, layer.folded())
    return module


def gate_l1(lam: float) -> Regularizer:
    """The Tock penalty lam * sum |phi| over all gates, as a `fit` regularizer."""

    def penalty(module: nn.Module) -> torch.Tensor:
        return lam * torch.stack([g.gate.abs().sum() for g in gated_layers(module).values()]).sum()

    return penalty


def _param_groups(module: nn.Module) -> list[dict[str, object]]:
    """Trainable parameters with the gates in a group of their own without weight decay."""
    gates = {id(g.gate) for g in gated_layers(module).values()}
    trainable = [p for p in module.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in gates]},
        {"params": [p for p in trainable if id(p) in gates], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


@contextmanager
def tick_trainable(module: nn.Module) -> Iterator[None]:
    """Inside: only the gates and the final nn.Linear train (the Tick); requires_grad restored after."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    keep = {id(g.gate) for g in gated_layers(module).values()}
    if linears:
        keep |= {id(p) for p in linears[-1].parameters()}
    saved = {id(p): p.requires_grad for p in module.parameters()}
    try:
        for p in module.parameters():
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p in module.parameters():
            p.requires_grad_(saved[id(p)])


class TaylorScores(Callback):
    """Accumulates dL/dphi * phi per gate and batch (`fit` callback): |sum| ("sum") or sum of |.| ("abs")."""

    def __init__(self, mode: ScoreMode = "sum") -> None:
        if mode not in SCORE_MODES:
            raise GraphPruneError(
                f"unknown Taylor score mode {mode!r}; choose one of {', '.join(SCORE_MODES)}."
            )
        self.mode = mode
        self.sums: dict[str, torch.Tensor] = {}

    def after_backward(self, state: TrainState) -> None:
        with torch.no_grad():
            for name, layer in gated_layers(state.module).items():
                if layer.gate.grad is None:
                    continue
                term = layer.gate.grad * layer.gate
                term = term.abs() if self.mode == "abs" else term
                total = self.sums.get(name)
                self.sums[name] = term.detach().clone() if total is None else total + term

    def scores(self) -> dict[str, np.ndarray]:
        return {name: total.abs().double().cpu().numpy() for name, total in self.sums.items()}


# Groups from the analysis -------------------------------------------------------------------------


@dataclass
class GateGroup:
    """One analysis group as gate positions: `pairs[k]` are the (GatedBN name, channel) of class k."""

    name: str
    classes: np.ndarray
    pairs: list[list[tuple[str, int]]]
    size: int
    floor: int


@dataclass
class GateMap:
    """The analysed model (gates folded) and its groups in terms of gates."""

    dep: DependencyGraph
    cost: CostReport
    groups: list[GateGroup]
    penalties: dict[str, tuple[float, np.ndarray | None, int]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, dep: DependencyGraph, layers: dict[str, GatedBN], widths: dict[str, int], min_keep: float
    ) -> GateMap:
        """Map every prunable group whose producers all pass through gated BNs; others stay whole."""
        groups = []
        for group in dep.prunable_groups:
            members = [
                m
                for m in group.members
                if m.kind is MemberKind.BN_SCALE and m.name.removesuffix(".weight") in layers
            ]
            if not members:
                continue
            covered = np.concatenate([m.atoms for m in members])
            if not all(np.isin(block.atoms(), covered).all() for block in group.blocks):
                log.info("group %s has a producer without a gated BN: left whole", group.name)
                continue
            pairs: list[list[tuple[str, int]]] = [[] for _ in range(group.size)]
            for member in members:
                inside, slots = dep.slots(member.atoms, group)
                for channel in np.flatnonzero(inside):
                    pairs[slots[channel]].append((member.name.removesuffix(".weight"), int(channel)))
            prunable = np.isin(group.classes, group.prunable)
            chosen = [k for k in range(group.size) if prunable[k] and pairs[k]]
            names = {layer for k in chosen for layer, _ in pairs[k]}
            floor = max(1, *(math.ceil(min_keep * widths.get(n, group.size)) for n in names))
            groups.append(
                GateGroup(group.name, group.classes[chosen], [pairs[k] for k in chosen], group.size, floor)
            )
        return cls(dep, model_cost(dep.model), groups, _penalty_inputs(dep, layers))

    def masked(self, layers: dict[str, GatedBN]) -> list[np.ndarray]:
        """Per group, which of its classes are masked (every gate position of the class off)."""
        masks = {name: layer.mask.detach().cpu().numpy() == 0 for name, layer in layers.items()}
        return [
            np.array([all(masks[n][c] for n, c in pairs) for pairs in g.pairs], bool) for g in self.groups
        ]

    def removed(self, layers: dict[str, GatedBN]) -> np.ndarray:
        """Boolean atom mask of the masked classes (what a physical prune removes)."""
        gone = [g.classes[m] for g, m in zip(self.groups, self.masked(layers), strict=True)]
        classes = np.concatenate(gone) if gone else np.empty(0, np.int64)
        return np.isin(self.dep.roots, classes)

    def predicted_macs(self, layers: dict[str, GatedBN]) -> float:
        return predicted_macs(self.dep, self.cost, self.removed(layers))

    def class_scores(
        self, scores: dict[str, np.ndarray], layers: dict[str, GatedBN], eta: float
    ) -> list[np.ndarray]:
        """Per group, each class's summed member score minus the optional FLOPs term."""
        costs = self._flops_terms(layers) if eta else {}
        result = []
        for group in self.groups:
            values = np.zeros(len(group.pairs))
            for k, pairs in enumerate(group.pairs):
                values[k] = sum(scores[n][c] - eta * costs.get(n, 0.0) for n, c in pairs)
            result.append(values)
        return result

    def _flops_terms(self, layers: dict[str, GatedBN]) -> dict[str, float]:
        """(area / smallest area) * active input channels of the conv feeding each gated BN."""
        removed = self.removed(layers)
        areas = [area for area, _, _ in self.penalties.values()]
        smallest = min(areas) if areas else 1.0
        terms = {}
        for name, (area, atoms, channels) in self.penalties.items():
            active = channels if atoms is None else int((~removed[atoms]).sum())
            terms[name] = area / smallest * active
        return terms

    def mask_lowest(self, layers: dict[str, GatedBN], class_scores: list[np.ndarray], budget: int) -> int:
        """Mask the lowest-scoring classes across groups until `budget` gate positions (BN channels) are
        off, keeping each group's floor; return how many positions were masked."""
        masked = self.masked(layers)
        candidates = []
        room = []
        for index, (group, done) in enumerate(zip(self.groups, masked, strict=True)):
            room.append(group.size - int(done.sum()) - group.floor)
            candidates += [(float(class_scores[index][k]), index, k) for k in np.flatnonzero(~done)]
        spent = 0
        for _, index, k in sorted(candidates):
            if spent >= budget:
                break
            if room[index] <= 0:
                continue
            room[index] -= 1
            for name, channel in self.groups[index].pairs[k]:
                layers[name].mask[channel] = 0
            spent += len(self.groups[index].pairs[k])
        return spent


def _penalty_inputs(
    dep: DependencyGraph, layers: dict[str, GatedBN]
) -> dict[str, tuple[float, np.ndarray | None, int]]:
    """Per gated BN: its output area, and the atoms and count of the input channels of the conv feeding it."""
    nodes = {node.name: node for node in dep.model.graph.node}
    producers = {out: node for node in dep.model.graph.node for out in node.output}
    result = {}
    for member in dep.members.values():
        name = member.name.removesuffix(".weight")
        if member.kind is not MemberKind.BN_SCALE or name not in layers:
            continue
        bn = nodes[member.node]
        area = float(np.prod(dep.shapes[bn.output[0]][2:]))
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv":
            continue
        view = dep.views.get(conv.input[0])
        result[name] = (area, None if view is None else view.ravel(), dep.shapes[conv.input[0]][1])
    return result


# Tick-Tock ----------------------------------------------------------------------------------------


@dataclass
class GateDecoratorConfig:
    """One Gate Decorator run; `target_flops` is the fraction of the start model's MACs to keep."""

    start: Start = field(default_factory=Start)
    output: Path = Path("gate-decorator.onnx")
    target_flops: float = 0.5
    ticks: int = 10
    tick_subset: float = 0.1
    tick_share: float | None = None
    tick_lr: float = 0.01
    epochs_baseline: int = 10
    epochs_tock: int = 2
    epochs_finetune: int = 10
    gate_lambda: float = 1e-3
    score: ScoreMode = "sum"
    flops_eta: float = 0.0
    min_keep: float = 0.1
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune_lr: float = 0.01
    workdir: Path | None = None

    def validate(self, module_given: bool = False) -> None:
        self.start.validate(module_given)
        checks = [
            (0.0 < self.target_flops < 1.0, f"--target-flops must be in (0, 1), got {self.target_flops}"),
            (self.ticks >= 1, f"--ticks must be at least 1, got {self.ticks}"),
            (0.0 < self.tick_subset <= 1.0, f"--tick-subset must be in (0, 1], got {self.tick_subset}"),
            (self.tick_share is None or 0.0 < self.tick_share < 1.0, "--tick-share must be in (0, 1)"),
            (0.0 < self.min_keep <= 1.0, f"--min-keep must be in (0, 1], got {self.min_keep}"),
            (self.score in SCORE_MODES, f"--score must be one of {', '.join(SCORE_MODES)}"),
            (
                min(self.epochs_baseline, self.epochs_tock, self.epochs_finetune) >= 0,
                "epoch counts must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GraphPruneError(f"{message}; fix the Gate Decorator settings.")


@dataclass
class GateDecoratorResult(RecipeResult):
    """Stages: start, per round pruned (and tocked), final fine-tuned; `masked` channels per Tick."""

    masked: list[int] = field(default_factory=list)
    target_macs: float = 0.0


def _tick_set(train: ArrayDataset, fraction: float, seed: int) -> ArrayDataset:
    """A seeded random share of the training set for one Tick."""
    return train.sample(max(1, round(fraction * len(train))), seed)


def folded_copy(module: nn.Module) -> nn.Module:
    """A copy of the module with every gate folded into its BN (what gets exported)."""
    return fold_gates(copy.deepcopy(module))


@dataclass
class _Run:
    """The state of one Tick-Tock run (module, data, settings, where files go)."""

    config: GateDecoratorConfig
    module: nn.Module
    train: ArrayDataset
    val: ArrayDataset
    work: Path
    widths: dict[str, int]
    budget: int
    target: float
    start_macs: int
    masked: list[int] = field(default_factory=list)

    def train_config(self, **changes: object) -> TrainConfig:
        return replace(self.config.train, checkpoint_dir=None, resume=False, **changes)

    def gate_map(self, layers: dict[str, GatedBN]) -> GateMap:
        """Export the module (gates folded) and map its analysis groups onto the gates (rank 0)."""
        proto = export_trained(folded_copy(self.module), self.work / "round.onnx", self.val.sample_shape)
        return GateMap.build(analyze_model(proto), layers, self.widths, self.config.min_keep)

    def choose_masks(
        self, gate_map: GateMap, layers: dict[str, GatedBN], scorer: TaylorScores
    ) -> tuple[dict[str, np.ndarray], int, float]:
        """Mask the lowest-scoring channels (rank 0); return every gate's mask, how many positions were
        masked and the share of the start MACs left."""
        scores = gate_map.class_scores(scorer.scores(), layers, self.config.flops_eta)
        spent = gate_map.mask_lowest(layers, scores, self.budget)
        masks = {name: layer.mask.numpy() for name, layer in layers.items()}
        return masks, spent, gate_map.predicted_macs(layers) / self.start_macs

    def ticks(self, round_index: int) -> tuple[GateMap | None, dict[str, GatedBN], bool, bool]:
        """Gate the module and run up to `ticks` Ticks; return the map (rank 0's, None on the others),
        the gates, whether the target was reached and whether nothing was left to mask."""
        config = self.config
        self.module.cpu()
        layers = add_gates(self.module)
        gate_map = self.gate_map(layers) if dist_info().is_main else None
        tick_config = self.train_config(
            epochs=1, lr=config.tick_lr, schedule="constant", augment=False, weight_decay=0.0
        )
        reached = stalled = False
        for tick in range(1, config.ticks + 1):
            scorer = TaylorScores(config.score)
            subset = _tick_set(self.train, config.tick_subset, config.start.seed + 1000 * round_index + tick)
            with tick_trainable(self.module):
                fit(self.module, subset, None, tick_config, callbacks=[scorer], param_groups=_param_groups)
            self.module.cpu()
            masks, spent, kept = run_on_main(partial(self.choose_masks, gate_map, layers, scorer))
            if not dist_info().is_main:  # rank 0 set its gates itself; the others take its masks
                with torch.no_grad():
                    for name, mask in masks.items():
                        layers[name].mask.copy_(torch.from_numpy(mask))
            self.masked.append(spent)
            log.info(
                "round %d tick %d: %d channels masked, %.1f%% of the MACs left",
                round_index,
                tick,
                spent,
                100 * kept,
            )
            reached, stalled = kept * self.start_macs <= self.target, spent == 0
            if reached or stalled:
                break
        return gate_map, layers, reached, stalled

    def prune(self, gate_map: GateMap | None, layers: dict[str, GatedBN], round_index: int) -> Stage | None:
        """Fold the gates and remove the masked channels through the ONNX path (rank 0, which holds the
        map); every rank folds the result back."""
        removed = run_on_main(lambda: gate_map.removed(layers))
        fold_gates(self.module)
        if not removed.any():
            return None

        def pruning() -> PruneResult:
            plan = PruningPlan.from_removed(gate_map.dep, removed, criterion="gate-decorator")
            source = self.work / f"masked{round_index}.onnx"
            export_trained(self.module, source, self.val.sample_shape)
            return prune(source, plan=plan)

        pruned = self.work / f"pruned{round_index}.onnx"
        return prune_stage(self.module, pruning, f"round {round_index} pruned", pruned, self.val)

    def tock(self, teacher: Teacher | None) -> None:
        """Fine-tune on the full data with L1 on fresh gates (distilled from `teacher` if any), then fold them."""
        config = self.config
        add_gates(self.module)
        tock = self.train_config(epochs=config.epochs_tock, lr=config.finetune_lr)
        fit(
            self.module,
            self.train,
            self.val,
            tock,
            regularizer=gate_l1(config.gate_lambda),
            param_groups=_param_groups,
            teacher=teacher,
        )
        fold_gates(self.module.cpu())


def run_gate_decorator(
    config: GateDecoratorConfig, *, module: nn.Module | None = None, teacher: Teacher | None = None
) -> GateDecoratorResult:
    """Tick-Tock until the MACs target is met, then the final fine-tune; write `config.output`.
    `module` replaces the start model (a trained user module: no baseline training then); `teacher`
    (e.g. the original model) distils into the Tocks and the final fine-tune (see `fit`). Under
    torchrun, rank 0 alone scores, prunes, measures and writes (see the module docstring)."""
    config.validate(module is not None)
    init_distributed(config.train.device)
    train, val = config.start.datasets()
    metadata = config.start.model_metadata(train)
    if module is None:
        module = config.start.module(train)
        if config.start.model is not None and config.epochs_baseline:
            log.info("baseline training: %d epochs", config.epochs_baseline)
            baseline = replace(config.train, epochs=config.epochs_baseline, checkpoint_dir=None, resume=False)
            fit(module, train, val, baseline)
    share = config.tick_share or (
        SHARE_RESIDUAL if config.start.is_residual(module, train.sample_shape) else SHARE_PLAIN
    )
    widths = {n: m.num_features for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)}
    with workspace(config.workdir) as work:
        stages = [export_stage(module, "start", work / "start.onnx", val, metadata)]
        run = _Run(
            config,
            module,
            train,
            val,
            work,
            widths,
            budget=max(1, round(share * sum(widths.values()))),
            target=config.target_flops * stages[0].macs,
            start_macs=stages[0].macs,
        )
        round_index, done = 0, False
        while not done:
            round_index += 1
            gate_map, layers, reached, stalled = run.ticks(round_index)
            pruned = run.prune(gate_map, layers, round_index)
            stages += [pruned] if pruned is not None else []
            done = reached or stalled
            if not done and config.epochs_tock:
                run.tock(teacher)
        if stalled:
            log.warning(
                "every group is at its minimum (--min-keep %g): stopped at %.1f%% of the MACs, above the "
                "target %.1f%%.",
                config.min_keep,
                100 * stages[-1].macs / stages[0].macs,
                100 * config.target_flops,
            )
        if config.epochs_finetune:
            tune = run.train_config(epochs=config.epochs_finetune, lr=config.finetune_lr)
            fit(module, train, val, tune, teacher=teacher)
        stages.append(export_stage(module, "fine-tuned", work / "final.onnx", val, metadata))
        output = publish(stages[-1], config.output)
    stages[-1] = replace(stages[-1], path=output)
    return GateDecoratorResult(output, stages, masked=run.masked, target_macs=run.target)
