"""Random small CNNs as ONNX graphs, for the property tests.

A hypothesis strategy (`net_specs`) draws a `NetSpec`: a sequence of blocks on an NCHW tensor (conv+BN+
activation, residual sums, concats, depthwise and grouped convs, squeeze-and-excitation, channel splits,
pooling) and a classifier head.  `build_model` turns it into a ModelProto with onnx.helper and seeded
numpy weights, without torch, so that hundreds of examples run in seconds.  Specs are plain frozen
dataclasses: a failing example prints as Python that can be pasted into an `@example`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
ACTIVATIONS = ("Relu", "LeakyRelu", "Sigmoid", "HardSwish", "Clip")
MIN_WIDTH, MAX_WIDTH = 2, 12  # widths a conv may produce
MAX_STREAM = 24  # widest tensor a concat or a depthwise multiplier may produce


@dataclass(frozen=True)
class Conv:
    """Conv (kernel 1 or 3, 'same' padding) with optional bias, BatchNormalization and activation."""

    out: int
    kernel: int = 1
    bias: bool = False
    bn: bool = True
    act: str | None = "Relu"


@dataclass(frozen=True)
class Residual:
    """Sum of the shortcut (identity, or a projection conv) and one or more conv stacks, then `act`.
    With several branches the sum has more than two terms (one Sum node, or a chain of Adds)."""

    branches: tuple[tuple[Conv, ...], ...]
    projection: Conv | None = None
    sum_op: bool = False
    act: str | None = "Relu"


@dataclass(frozen=True)
class Concat:
    """Concat on channels of the tensors named by `order`: 0 is the block input, i the i-th branch's
    output (repeats concatenate the same tensor twice)."""

    branches: tuple[tuple[Conv, ...], ...]
    order: tuple[int, ...]


@dataclass(frozen=True)
class Depthwise:
    """Depthwise conv (group = input channels) with channel multiplier 1 or 2, BN and activation."""

    multiplier: int = 1
    kernel: int = 3
    bn: bool = True
    act: str | None = "Relu"


@dataclass(frozen=True)
class Grouped:
    """Grouped conv (input and output widths divisible by `groups`), BN and activation."""

    groups: int
    out: int
    kernel: int = 3
    bn: bool = True
    act: str | None = "Relu"


@dataclass(frozen=True)
class SqueezeExcite:
    """GlobalAveragePool -> 1x1 conv -> Relu -> 1x1 conv -> Sigmoid -> Mul with the block input."""

    hidden: int


@dataclass(frozen=True)
class SplitMerge:
    """Split on channels with explicit sizes; each part goes through a conv (or stays as is), and the
    parts are concatenated again or summed (summing needs equal widths)."""

    sizes: tuple[int, ...]
    parts: tuple[Conv | None, ...]
    merge: str = "concat"


@dataclass(frozen=True)
class Pool:
    """2x2 MaxPool or AveragePool with stride 2."""

    op: str = "MaxPool"


@dataclass(frozen=True)
class Head:
    """Classifier: GlobalAveragePool (or pooling down to a small map when `spatial`) + Flatten, then
    Gemm or MatMul+Add, with an optional hidden layer followed by Relu."""

    op: str = "Gemm"
    classes: int = 3
    spatial: bool = False
    hidden: int | None = None
    trans_b: bool = True


Block = Conv | Residual | Concat | Depthwise | Grouped | SqueezeExcite | SplitMerge | Pool


@dataclass(frozen=True)
class NetSpec:
    """A whole network: input [N, channels, height, width], blocks, head, and the weight seed."""

    channels: int
    height: int
    width: int
    blocks: tuple[Block, ...]
    head: Head = field(default_factory=Head)
    seed: int = 0


# strategies --------------------------------------------------------------------------------------


def widths(low: int = MIN_WIDTH, high: int = MAX_WIDTH) -> st.SearchStrategy[int]:
    """Channel counts drawn uniformly (st.integers favours the bounds, and width 2 rarely prunes)."""
    return st.sampled_from(range(low, high + 1))


def convs(out: int | st.SearchStrategy[int] | None = None, act: bool = True) -> st.SearchStrategy[Conv]:
    """A Conv spec; `out` fixes (an int) or draws (a strategy) the width."""
    if out is None:
        out = widths()
    return st.builds(
        Conv,
        out=out if isinstance(out, st.SearchStrategy) else st.just(out),
        kernel=st.sampled_from((1, 3)),
        bias=st.booleans(),
        bn=st.booleans(),
        act=st.sampled_from(ACTIVATIONS) | st.none() if act else st.none(),
    )


def conv_stack(out: int) -> st.SearchStrategy[tuple[Conv, ...]]:
    """One or two convs ending at width `out` (the last often without activation, as in ResNets)."""
    last = st.one_of(convs(out, act=False), convs(out))
    return st.one_of(st.tuples(last), st.tuples(convs(), last))


@st.composite
def residuals(draw: st.DrawFn, width: int) -> Residual:
    projection = draw(st.none() | st.builds(Conv, out=widths(), act=st.none()))
    out = width if projection is None else projection.out
    branches = draw(st.lists(conv_stack(out), min_size=1, max_size=3).map(tuple))
    return Residual(branches, projection, draw(st.booleans()), draw(st.sampled_from(ACTIVATIONS) | st.none()))


@st.composite
def concats(draw: st.DrawFn, width: int) -> Concat:
    """Every branch once, plus up to two repeats of the input or a branch, within MAX_STREAM channels."""
    branches = draw(st.lists(widths(high=6).flatmap(conv_stack), min_size=1, max_size=2))
    outs = [width] + [stack[-1].out for stack in branches]
    room = MAX_STREAM - sum(outs[1:])
    order = list(range(1, len(outs)))
    for source in draw(st.lists(st.integers(0, len(branches)), min_size=2 - len(branches), max_size=2)):
        if outs[source] <= room:
            order.append(source)
            room -= outs[source]
    if len(order) < 2:
        order.append(1)
    return Concat(tuple(branches), tuple(draw(st.permutations(order))))


@st.composite
def split_merges(draw: st.DrawFn, width: int) -> SplitMerge:
    count = draw(st.integers(2, min(3, width)))
    cuts = sorted(
        draw(st.lists(st.integers(1, width - 1), min_size=count - 1, max_size=count - 1, unique=True))
    )
    sizes = tuple(int(b - a) for a, b in zip([0, *cuts], [*cuts, width], strict=True))
    merge = draw(st.sampled_from(("concat", "sum")))
    if merge == "sum":
        common = draw(widths())
        parts = tuple(
            draw(convs(common) | st.none()) if size == common else draw(convs(common)) for size in sizes
        )
    else:
        parts = tuple(draw(convs(widths(high=6)) | st.none()) for _ in sizes)
    return SplitMerge(sizes, parts, merge)


def _out_width(block: Block, width: int) -> int:
    """Channels after a block with `width` input channels."""
    match block:
        case Conv(out=out) | Grouped(out=out):
            return out
        case Residual(projection=projection):
            return width if projection is None else projection.out
        case Concat(branches=branches, order=order):
            outs = [width] + [stack[-1].out for stack in branches]
            return sum(outs[i] for i in order)
        case Depthwise(multiplier=multiplier):
            return width * multiplier
        case SplitMerge(sizes=sizes, parts=parts, merge=merge):
            outs = [size if part is None else part.out for size, part in zip(sizes, parts, strict=True)]
            return outs[0] if merge == "sum" else sum(outs)
    return width


@st.composite
def net_specs(draw: st.DrawFn, max_blocks: int = 5) -> NetSpec:
    """A random network; the block sequence keeps track of widths and spatial size as it is drawn."""
    channels = draw(st.integers(2, 4))
    height, width = draw(st.integers(6, 10)), draw(st.integers(6, 10))
    c, h, w = channels, height, width
    blocks: list[Block] = []
    for _ in range(draw(st.integers(1, max_blocks))):
        kind = draw(
            st.sampled_from(("conv", "residual", "concat", "depthwise", "grouped", "se", "split", "pool"))
        )
        block: Block
        if kind == "residual":
            block = draw(residuals(c))
        elif kind == "concat":
            block = draw(concats(c))
        elif kind == "depthwise":
            multiplier = draw(st.sampled_from((1, 2))) if 2 * c <= MAX_STREAM else 1
            block = Depthwise(
                multiplier,
                draw(st.sampled_from((1, 3))),
                draw(st.booleans()),
                draw(st.sampled_from(ACTIVATIONS)),
            )
        elif kind == "grouped":
            groups = draw(st.sampled_from((2, 3)))
            if c % groups:
                blocks.append(draw(convs(groups * draw(widths(1, MAX_WIDTH // groups)))))
                c = blocks[-1].out
            block = Grouped(
                groups,
                groups * draw(widths(1, MAX_WIDTH // groups)),
                3,
                draw(st.booleans()),
                draw(st.sampled_from(ACTIVATIONS)),
            )
        elif kind == "se":
            block = SqueezeExcite(draw(widths(high=8)))
        elif kind == "split" and c >= 2:
            block = draw(split_merges(c))
        elif kind == "pool" and min(h, w) >= 4:
            block = Pool(draw(st.sampled_from(("MaxPool", "AveragePool"))))
            h, w = h // 2, w // 2
        else:
            block = draw(convs())
        blocks.append(block)
        c = _out_width(block, c)
    head = Head(
        draw(st.sampled_from(("Gemm", "MatMul"))),
        draw(st.integers(2, 5)),
        draw(st.booleans()),
        draw(st.none() | widths(high=8)),
        draw(st.booleans()),
    )
    return NetSpec(channels, height, width, tuple(blocks), head, draw(st.integers(0, 2**16)))


# building ----------------------------------------------------------------------------------------


class _Builder:
    """Accumulates nodes and seeded initializers; every method returns the name of its output."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0
        self.clip_bounds: tuple[str, str] | None = None

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def init(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(values, dtype=np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs: object) -> str:
        name = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    def conv(self, x: str, cin: int, cout: int, kernel: int, bias: bool, groups: int = 1) -> str:
        name = self.name("conv")
        fan_in = cin // groups * kernel * kernel
        weight = self.rng.standard_normal((cout, cin // groups, kernel, kernel)) * np.sqrt(2.0 / fan_in)
        inputs = [x, self.init(f"{name}.weight", weight)]
        if bias:
            inputs.append(self.init(f"{name}.bias", self.rng.standard_normal(cout) * 0.1))
        pad = kernel // 2
        self.nodes.append(
            helper.make_node(
                "Conv",
                inputs,
                [f"{name}.out"],
                name=name,
                kernel_shape=[kernel, kernel],
                pads=[pad] * 4,
                group=groups,
            )
        )
        return f"{name}.out"

    def batch_norm(self, x: str, width: int) -> str:
        name = self.name("bn")
        params = [
            self.init(f"{name}.weight", self.rng.uniform(0.2, 1.5, width)),
            self.init(f"{name}.bias", self.rng.standard_normal(width) * 0.1),
            self.init(f"{name}.running_mean", self.rng.standard_normal(width) * 0.2),
            self.init(f"{name}.running_var", self.rng.uniform(0.5, 2.0, width)),
        ]
        self.nodes.append(
            helper.make_node("BatchNormalization", [x, *params], [f"{name}.out"], name=name, epsilon=1e-5)
        )
        return f"{name}.out"

    def activation(self, x: str, act: str | None) -> str:
        if act is None:
            return x
        if act == "LeakyRelu":
            return self.node(act, [x], alpha=0.1)
        if act == "Clip":
            if self.clip_bounds is None:
                self.clip_bounds = (
                    self.init("clip.min", np.array(0.0)),
                    self.init("clip.max", np.array(6.0)),
                )
            return self.node(act, [x, *self.clip_bounds])
        return self.node(act, [x])

    def conv_block(self, x: str, cin: int, spec: Conv) -> str:
        y = self.conv(x, cin, spec.out, spec.kernel, spec.bias)
        if spec.bn:
            y = self.batch_norm(y, spec.out)
        return self.activation(y, spec.act)

    def stack(self, x: str, cin: int, stack: tuple[Conv, ...]) -> str:
        for spec in stack:
            x, cin = self.conv_block(x, cin, spec), spec.out
        return x

    def gemm(self, x: str, features: int, units: int, op: str, trans_b: bool) -> str:
        scale = np.sqrt(2.0 / features)
        if op == "MatMul":
            name = self.name("matmul")
            weight = self.init(f"{name}.weight", self.rng.standard_normal((features, units)) * scale)
            self.nodes.append(helper.make_node("MatMul", [x, weight], [f"{name}.out"], name=name))
            bias = self.init(f"{name}.bias", self.rng.standard_normal(units) * 0.1)
            return self.node("Add", [f"{name}.out", bias])
        name = self.name("gemm")
        shape = (units, features) if trans_b else (features, units)
        inputs = [
            x,
            self.init(f"{name}.weight", self.rng.standard_normal(shape) * scale),
            self.init(f"{name}.bias", self.rng.standard_normal(units) * 0.1),
        ]
        self.nodes.append(helper.make_node("Gemm", inputs, [f"{name}.out"], name=name, transB=int(trans_b)))
        return f"{name}.out"

    def block(self, x: str, c: int, hw: tuple[int, int], block: Block) -> tuple[str, tuple[int, int]]:
        """Emit one block; returns its output and spatial size."""
        match block:
            case Conv():
                return self.conv_block(x, c, block), hw
            case Residual(branches=branches, projection=projection, sum_op=sum_op, act=act):
                terms = [x if projection is None else self.conv_block(x, c, projection)]
                terms += [self.stack(x, c, stack) for stack in branches]
                if sum_op:
                    y = self.node("Sum", terms)
                else:
                    y = terms[0]
                    for term in terms[1:]:
                        y = self.node("Add", [y, term])
                return self.activation(y, act), hw
            case Concat(branches=branches, order=order):
                sources = [x] + [self.stack(x, c, stack) for stack in branches]
                return self.node("Concat", [sources[i] for i in order], axis=1), hw
            case Depthwise(multiplier=multiplier, kernel=kernel, bn=bn, act=act):
                y = self.conv(x, c, c * multiplier, kernel, bias=not bn, groups=c)
                y = self.batch_norm(y, c * multiplier) if bn else y
                return self.activation(y, act), hw
            case Grouped(groups=groups, out=out, kernel=kernel, bn=bn, act=act):
                y = self.conv(x, c, out, kernel, bias=not bn, groups=groups)
                y = self.batch_norm(y, out) if bn else y
                return self.activation(y, act), hw
            case SqueezeExcite(hidden=hidden):
                s = self.node("GlobalAveragePool", [x])
                s = self.node("Relu", [self.conv(s, c, hidden, 1, bias=True)])
                s = self.node("Sigmoid", [self.conv(s, hidden, c, 1, bias=True)])
                return self.node("Mul", [x, s]), hw
            case SplitMerge(sizes=sizes, parts=parts, merge=merge):
                name = self.name("split")
                self.initializers.append(
                    numpy_helper.from_array(np.asarray(sizes, np.int64), f"{name}.sizes")
                )
                outs = [f"{name}.out{i}" for i in range(len(sizes))]
                self.nodes.append(helper.make_node("Split", [x, f"{name}.sizes"], outs, name=name, axis=1))
                merged = [
                    out if part is None else self.conv_block(out, size, part)
                    for out, size, part in zip(outs, sizes, parts, strict=True)
                ]
                if merge == "sum":
                    return self.node("Sum", merged), hw
                return self.node("Concat", merged, axis=1), hw
            case Pool(op=op):
                y = self.node(op, [x], kernel_shape=[2, 2], strides=[2, 2])
                return y, (hw[0] // 2, hw[1] // 2)
        raise TypeError(f"unknown block {block!r}")

    def head(self, x: str, c: int, hw: tuple[int, int], head: Head) -> str:
        if head.spatial:
            while max(hw) > 4:
                x, hw = (
                    self.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2]),
                    (hw[0] // 2, hw[1] // 2),
                )
            features = c * hw[0] * hw[1]
        else:
            x, features = self.node("GlobalAveragePool", [x]), c
        x = self.node("Flatten", [x], axis=1)
        if head.hidden is not None:
            x = self.node("Relu", [self.gemm(x, features, head.hidden, head.op, head.trans_b)])
            features = head.hidden
        return self.gemm(x, features, head.classes, head.op, head.trans_b)


def build_model(spec: NetSpec) -> onnx.ModelProto:
    """The ONNX model (opset 17, dynamic batch "N") of a spec, with weights seeded by `spec.seed`."""
    builder = _Builder(spec.seed)
    x, c, hw = "input", spec.channels, (spec.height, spec.width)
    for block in spec.blocks:
        x, hw = builder.block(x, c, hw, block)
        c = _out_width(block, c)
    builder.head(x, c, hw, spec.head)
    builder.nodes[-1].output[0] = "logits"
    graph = helper.make_graph(
        builder.nodes,
        "random_cnn",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["N", spec.channels, spec.height, spec.width]
            )
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", spec.head.classes])],
        builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    return model
