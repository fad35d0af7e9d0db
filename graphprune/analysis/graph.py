"""Build the channel-dependency graph of an ONNX model and split it into prunable groups.

The networkx graph has one node per block of channels (a conv's outputs, a Gemm's hidden units) and an
edge wherever an op ties two blocks (a residual sum, a depthwise conv, a shared weight).  Its connected
components are the groups; within a group, the union-find classes are the channels that are removed
together.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx

from graphprune.errors import AnalysisRuleError, UnsupportedModelError
from graphprune.model_io import initializer_arrays
from graphprune.onnxutil import opset_of
from graphprune.ops import OPS
from graphprune.ops.atoms import AtomTable, Block
from graphprune.ops.context import GroupedConv, ParamMember, Rewrite, RuleContext

log = logging.getLogger(__name__)

STRICT_ENV = "GRAPHPRUNE_STRICT_RULES"


@dataclass
class Group:
    """Channels that must be pruned with the same indices, and why some of them cannot be pruned."""

    index: int
    blocks: list[Block]
    classes: np.ndarray
    blocked: dict[int, str]
    members: list[ParamMember] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.blocks[0].node

    @property
    def size(self) -> int:
        return int(self.classes.size)

    @property
    def prunable(self) -> np.ndarray:
        blocked = np.fromiter(self.blocked, dtype=np.int64, count=len(self.blocked))
        return self.classes[~np.isin(self.classes, blocked)].astype(np.int64, copy=False)


@dataclass
class DependencyGraph:
    """Everything analysis learned about a model; the input of criteria, planning and surgery."""

    model: onnx.ModelProto
    shapes: dict[str, tuple[int, ...]]
    constants: dict[str, np.ndarray]
    table: AtomTable
    views: dict[str, np.ndarray]
    members: dict[tuple[str, int], ParamMember]
    grouped_convs: list[GroupedConv]
    keep_one: list[np.ndarray]
    rewrites: list[Rewrite]
    blocked_nodes: dict[str, str]
    graph: nx.Graph
    groups: list[Group]
    roots: np.ndarray
    class_group: np.ndarray
    class_slot: np.ndarray
    droppable: frozenset[str] = frozenset()

    @property
    def segments(self) -> list[tuple[str, list[np.ndarray]]]:
        """(grouped conv, atoms per conv group) for each side of each grouped conv: the pieces that lose
        equal counts (unless the conv's groups are dropped whole)."""
        return [(conv.node, parts) for conv in self.grouped_convs for parts in conv.sides]

    def conv_group_problem(
        self, removed: Callable[[np.ndarray], np.ndarray], convs: list[GroupedConv]
    ) -> str | None:
        """Why a removal (`removed(atoms)` -> boolean per atom) breaks one of `convs`' groups, or None."""
        for conv in convs:
            problem = conv.problem(removed, conv.node in self.droppable)
            if problem:
                return problem
        return None

    def slots(self, atoms: np.ndarray, group: Group) -> tuple[np.ndarray, np.ndarray]:
        """For each atom: whether its channel belongs to `group`, and its index in `group.classes`."""
        classes = self.roots[atoms]
        inside = self.class_group[classes] == group.index
        return inside, self.class_slot[classes]

    @property
    def prunable_groups(self) -> list[Group]:
        return [g for g in self.groups if g.prunable.size > 1]


# Values (at batch 1) of the named tensors of a model: analysis runs nothing itself, so the caller
# (graphprune.api, with graphprune.runtime.shapes.run_intermediates) supplies how to compute them.
Evaluate = Callable[[onnx.ModelProto, list[str]], dict[str, np.ndarray]]


def analyze(
    model: onnx.ModelProto,
    shapes: dict[str, tuple[int, ...]],
    evaluate: Evaluate,
    *,
    strict: bool | None = None,
) -> DependencyGraph:
    """Run every op rule over a cleaned graph (model_io.clean) in topological order and build the groups.

    shapes: every tensor's shape at batch 1; evaluate: computes size/bound/index inputs that are not
    constants (chunk bounds derived from Shape, say).  strict: after each rule, check that it accounted
    for every channel reaching the node (see _check_rule_outputs); by default on when the environment
    sets GRAPHPRUNE_STRICT_RULES=1, as the tests do.  A quantized model is refused: its channels are
    pruned in the float model, before quantization."""
    refuse_quantized(model)
    if strict is None:
        strict = os.environ.get(STRICT_ENV) == "1"
    constants = initializer_arrays(model)
    ctx = RuleContext(shapes, constants, shape_arithmetic(model, constants, evaluate), opset_of(model))
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            ctx.opaque(node, f"custom-domain op {node.domain}.{node.op_type}")
            continue
        spec = OPS.get(node.op_type)
        if spec is None or spec.rule is None:
            ctx.opaque(node, f"no channel rule for {node.op_type}")
            continue
        spec.rule(ctx, node)
        if strict:
            _check_rule_outputs(ctx, node)
    for output in model.graph.output:
        ctx.block(ctx.view(output.name), f"output {output.name}", "model outputs are never narrowed")
    for conv in ctx.grouped_convs:
        for parts in conv.sides:
            _check_segments(ctx, conv.node, parts)
    roots = ctx.table.roots()
    graph, groups = _groups(ctx, roots)
    class_group = np.full(roots.size, -1, dtype=np.int64)
    class_slot = np.full(roots.size, -1, dtype=np.int64)
    for group in groups:
        class_group[group.classes] = group.index
        class_slot[group.classes] = np.arange(group.size)
    log.debug("analysis: %d blocks, %d groups", len(ctx.table.blocks), len(groups))
    return DependencyGraph(
        model,
        shapes,
        constants,
        ctx.table,
        ctx.views,
        ctx.members,
        ctx.grouped_convs,
        ctx.keep_one,
        ctx.rewrites,
        ctx.blocked_nodes,
        graph,
        groups,
        roots,
        class_group,
        class_slot,
        _droppable(ctx.grouped_convs, roots, class_group, groups),
    )


# Ops that only quantized models hold: QDQ pairs, and QOperator / integer kernels.
QUANTIZED_OPS = {
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "QLinearConv",
    "QLinearMatMul",
    "ConvInteger",
    "MatMulInteger",
    "QGemm",
    "QLinearAdd",
    "QLinearMul",
    "QLinearGlobalAveragePool",
    "QLinearConcat",
    "QLinearSigmoid",
    "QLinearLeakyRelu",
}


def refuse_quantized(model: onnx.ModelProto) -> None:
    """UnsupportedModelError naming the quantization when the model is QDQ or QOperator."""
    found: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in QUANTIZED_OPS:
            found[node.op_type] = found.get(node.op_type, 0) + 1
    if found:
        style = "QOperator" if found.keys() - {"QuantizeLinear", "DequantizeLinear"} else "QDQ"
        ops = ", ".join(f"{count} {op}" for op, count in sorted(found.items()))
        raise UnsupportedModelError(
            f"the model is quantized ({style}: {ops}); graphprune prunes float models: prune the float "
            "model before quantization, then quantize the pruned one."
        )


def shape_arithmetic(
    model: onnx.ModelProto, constants: dict[str, np.ndarray], evaluate: Evaluate
) -> dict[str, np.ndarray]:
    """Values (at batch 1) of size/bound/index inputs computed at run time, e.g. chunk bounds derived
    from Shape; one evaluation fetches them all."""
    wanted = sorted(
        {
            node.input[i]
            for node in model.graph.node
            for i in (OPS[node.op_type].size_inputs if node.op_type in OPS else ())
            if i < len(node.input) and node.input[i] and node.input[i] not in constants
        }
    )
    return evaluate(model, wanted) if wanted else {}


def _check_rule_outputs(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """A rule must account for the channels reaching its node: every output that is data (not shape
    arithmetic) carries a view, or the channels were blocked.  A rule that forgets would let surgery
    narrow a tensor it never told the consumers about."""
    viewed = [ctx.view(name) for name in node.input if name and ctx.view(name) is not None]
    if not viewed or node.op_type in ("Shape", "Size"):
        return
    if all(ctx.table.all_blocked(view) for view in viewed):
        return
    missing = [out for out in node.output if out and ctx.view(out) is None]
    if missing:
        raise AnalysisRuleError(
            f"the channel rule of {node.op_type} (node {node.name}) left output {missing[0]} without a "
            "channel view while its input carries prunable channels; the rule must pass them on or block them."
        )


def _check_segments(ctx: RuleContext, node_name: str, parts: list[np.ndarray]) -> None:
    """Equal-per-group removal is only planned when no channel class spans two groups of the conv."""
    owners: dict[int, int] = {}
    for index, part in enumerate(parts):
        for atom in part:
            root = ctx.table.find(int(atom))
            if owners.setdefault(root, index) != index:
                atoms = np.concatenate(parts)
                ctx.block(atoms, node_name, "grouped conv whose groups share channels")
                return


def _droppable(
    convs: list[GroupedConv], roots: np.ndarray, class_group: np.ndarray, groups: list[Group]
) -> frozenset[str]:
    """Grouped convs whose conv groups can be removed whole: the input channels make up one group and
    the outputs another, each channel in one conv group only, and no other grouped conv splits those
    groups (so dropping a conv group's inputs and outputs together leaves every other layer valid)."""
    # per conv, per side: the side's channel classes and the groups they belong to
    sides = [
        [
            (classes, np.unique(class_group[classes]))
            for classes in (roots[np.concatenate(p)] for p in conv.sides)
        ]
        for conv in convs
    ]
    splits = Counter(int(g) for conv_sides in sides for _, owners in conv_sides for g in owners)
    found = set()
    for conv, conv_sides in zip(convs, sides, strict=True):
        if conv.inputs is not None and all(
            owners.size == 1
            and splits[int(owners[0])] == 1
            and np.unique(classes).size == classes.size == groups[int(owners[0])].size
            for classes, owners in conv_sides
        ):
            found.add(conv.node)
    return frozenset(found)


def _groups(ctx: RuleContext, roots: np.ndarray) -> tuple[nx.Graph, list[Group]]:
    table = ctx.table
    graph = nx.Graph()
    for block in table.blocks:
        graph.add_node(block.index, name=block.name, node=block.node, op=block.op, size=block.size)
    for tie in table.ties:
        graph.add_edge(tie.block_a, tie.block_b, node=tie.node, op=tie.op)
    blocked = table.blocked_roots()
    block_of = np.asarray(table.block_of, dtype=np.int64)
    members_by_block: dict[int, list[ParamMember]] = {}
    for member in ctx.members.values():
        for block in np.unique(block_of[member.atoms]):
            members_by_block.setdefault(int(block), []).append(member)
    groups = []
    for component in sorted(nx.connected_components(graph), key=min):
        blocks = [table.blocks[i] for i in sorted(component)]
        atoms = np.concatenate([b.atoms() for b in blocks])
        classes = list(dict.fromkeys(roots[atoms].tolist()))
        members = list({id(m): m for b in blocks for m in members_by_block.get(b.index, [])}.values())
        group_blocked = {c: blocked[c] for c in classes if c in blocked}
        groups.append(Group(len(groups), blocks, np.asarray(classes, dtype=np.int64), group_blocked, members))
    return graph, groups
