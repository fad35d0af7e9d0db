"""Fully connected layers: Gemm and MatMul with a constant weight."""

from __future__ import annotations

import math

import onnx

from graphprune.onnxutil import attribute
from graphprune.ops.common import input_at
from graphprune.ops.context import MemberKind, Role, RuleContext
from graphprune.ops.spec import Macs, NodeShapes, bias_macs, op


def _gemm_macs(node: NodeShapes) -> Macs:
    """M * N * K, plus M * N when C is given."""
    a = node.in_shape(0)
    k = a[0] if node.attr("transA", 0) else a[1]
    return Macs(mixing=math.prod(node.out_shape()) * k, per_output=bias_macs(node))


def _matmul_macs(node: NodeShapes) -> Macs:
    """out_elems * K, batch dimensions broadcast."""
    return Macs(mixing=math.prod(node.out_shape()) * node.in_shape(0)[-1])


@op("Gemm", macs=_gemm_macs)
def gemm(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Fully connected layer: input features are consumed, hidden units are new prunable channels."""
    a, b_name, c_name = node.input[0], node.input[1], input_at(node, 2)
    weight = ctx.const(b_name)
    trans_b = attribute(node, "transB", 0)
    if weight is None or attribute(node, "transA", 0):
        ctx.opaque(node, "Gemm with transA or computed weights is not pruned")
        return
    in_atoms = ctx.axis_atoms(a, 1, node)
    if in_atoms is not None:
        ctx.member(node, b_name, 1 if trans_b else 0, in_atoms, Role.CONSUMER, MemberKind.LINEAR_IN)
    hidden = weight.shape[0] if trans_b else weight.shape[1]
    out_atoms = ctx.new_source(node, hidden, b_name)
    ctx.member(node, b_name, 0 if trans_b else 1, out_atoms, Role.PRODUCER, MemberKind.LINEAR_OUT)
    bias = ctx.const(c_name)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == hidden and hidden > 1:
        ctx.member(node, c_name, bias.ndim - 1, out_atoms, Role.PRODUCER, MemberKind.BIAS)
    elif c_name and bias is None:
        ctx.block(out_atoms, node, "the bias is computed at run time")
    ctx.set_view(node.output[0], ctx.channel_view(out_atoms, node.output[0], 1))


@op("MatMul", macs=_matmul_macs)
def matmul(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Activation times a constant 2-D matrix: the last axis is consumed, and its columns are new units."""
    a, b_name = node.input[0], node.input[1]
    weight = ctx.const(b_name)
    if weight is None or weight.ndim != 2 or ctx.const(a) is not None:
        ctx.opaque(node, "MatMul between two activations (or with a batched constant) is not pruned")
        return
    in_atoms = ctx.axis_atoms(a, -1, node)
    if in_atoms is not None:
        ctx.member(node, b_name, 0, in_atoms, Role.CONSUMER, MemberKind.LINEAR_IN)
    out_atoms = ctx.new_source(node, weight.shape[1], b_name)
    ctx.member(node, b_name, 1, out_atoms, Role.PRODUCER, MemberKind.LINEAR_OUT)
    ctx.set_view(node.output[0], ctx.channel_view(out_atoms, node.output[0], -1))
