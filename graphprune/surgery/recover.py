"""Recovery passes on a pruned graph: accuracy back without training, from calibration images.

* BatchNorm recalibration: every BatchNormalization downstream of a removal gets the running mean and
  variance of its input in the pruned model (BNs upstream of every removal see the same inputs as in
  the original and keep the statistics they were trained with).
* Bias correction: an affected Conv/Gemm whose output no BatchNormalization re-centres (a BN-folded
  model) has its bias shifted so that its mean output per channel equals the original model's mean at
  the same tensor (surgery keeps tensor names).
* Least-squares reconstruction (He et al. 2017, ThiNet): an affected Conv (grouped ones group by group),
  Gemm or MatMul re-fits its kept weights and bias so that its output matches the original's at the
  same tensor, by ridge least squares on its inputs in the pruned model (im2col patches for convs),
  shrunk towards the surgically sliced weights.  A conv fits on a fixed, seeded sample of at most
  `positions` output positions per image (ThiNet and He et al. sample a few locations per image too).

"Affected" means downstream of a removal: the consumers that lost input channels and every node that
reads their results.  Passes run level by level in topological order, each level in eval mode on the
model as the levels before left it, so each fit sees the inputs the final model will see and errors
do not pile up.  The original model's targets come from one pass before the levels, each reduced to
what its step needs (sampled positions, channel means) and kept on disk in a temporary file; a level's
run starts from the tensors the run before read or computed upstream of what that level rewrote (on
disk too), so each run computes a few nodes rather than the whole prefix.  Every
statistic is a running sum over batches (X^T X, X^T Y, channel moments): memory does not depend on the
number of images, and several batches give what one batch would.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from numpy.lib.stride_tricks import sliding_window_view
from onnx import helper, numpy_helper

from graphprune.analysis.graph import DependencyGraph
from graphprune.errors import CalibrationError, GraphPruneError
from graphprune.onnxutil import attribute
from graphprune.ops.context import Role
from graphprune.runtime.session import make_session
from graphprune.surgery.apply import axis_keep

log = logging.getLogger(__name__)

METHODS = ("none", "bn", "lsq")
FITTED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class RecoveryConfig:
    """method: "none", "bn" (BN recalibration + bias correction) or "lsq" (least-squares reconstruction
    + BN recalibration).  ridge: shrinkage towards the sliced weights, relative to the mean diagonal of
    X^T X.  positions: most output positions per image a conv's least squares fits on (a seeded
    sample; all of them when there are no more).  batch_size: images per onnxruntime run.  threads:
    onnxruntime intra-op threads."""

    method: str = "bn"
    ridge: float = 1e-3
    positions: int = 128
    seed: int = 0
    batch_size: int = 128
    threads: int | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise GraphPruneError(
                f"recovery method must be one of {', '.join(METHODS)}, got {self.method!r}."
            )
        if self.ridge < 0 or self.batch_size < 1 or self.positions < 1:
            raise GraphPruneError("recovery needs ridge >= 0, positions >= 1 and batch_size >= 1.")


@dataclass
class RecoveryReport:
    """What a recovery did, and how close its result is to the original on held-out images."""

    method: str
    fit_samples: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0  # of this process, all threads: what a busy shared machine does not inflate
    batchnorms: list[str] = field(default_factory=list)
    bias_corrected: list[str] = field(default_factory=list)
    reconstructed: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    heldout_samples: int = 0
    agreement_before: float | None = None
    agreement: float | None = None
    rel_error_before: float | None = None
    rel_error: float | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Agreement:
    """Top-1 agreement of two classifiers (None when the first output is not [N, classes]) and the
    relative error of the first output, ||y - y_ref|| / ||y_ref||."""

    top1: float | None
    rel_error: float


# running models ---------------------------------------------------------------------------------------
def _image_input(model: onnx.ModelProto) -> tuple[str, int | None]:
    """The model's one image input and its fixed batch size (None: dynamic)."""
    initialisers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise CalibrationError(
            f"recovery feeds one image tensor, but the model has {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)})."
        )
    dims = inputs[0].type.tensor_type.shape.dim
    return inputs[0].name, (dims[0].dim_value or None) if dims else None


class _Runner:
    """Runs a model cut down to what `names` need from the image and the `given` tensors (fed per call),
    returning `names` (the image and given ones included)."""

    def __init__(
        self, model: onnx.ModelProto, names: list[str], threads: int | None, given: list[str] = ()
    ) -> None:
        self.model, self.threads = model, threads
        self.names, self.given = list(dict.fromkeys(names)), list(given)
        self.input = _image_input(model)[0]
        self.fetch = [n for n in self.names if n != self.input and n not in self.given]
        self.session = None

    def __call__(self, x: np.ndarray, given: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        feed = {self.input: x, **(given or {})}
        if self.fetch and self.session is None:  # built at the first batch: the given tensors' types
            cut = _truncated(self.model, self.fetch, {name: feed[name].dtype for name in self.given})
            self.session = make_session(cut, threads=self.threads)
        if self.session:
            inputs = {i.name for i in self.session.get_inputs()}
            feed.update(
                zip(self.fetch, self.session.run(self.fetch, {k: feed[k] for k in inputs}), strict=True)
            )
        return {name: feed[name] for name in self.names}


def _prefix(model: onnx.ModelProto, outputs: list[str], given: set[str]) -> list[onnx.NodeProto]:
    """The nodes `outputs` depend on when the `given` tensors are known, in graph order."""
    needed, nodes = set(outputs) - given, []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed.update(name for name in node.input if name not in given)
    return nodes[::-1]


def _truncated(
    model: onnx.ModelProto, outputs: list[str], given: dict[str, np.dtype] | None = None
) -> onnx.ModelProto:
    """The nodes `outputs` depend on, with `outputs` as the graph outputs (onnxruntime would otherwise
    run the whole graph whatever is fetched) and the `given` tensors (name: dtype) as graph inputs."""
    given = given or {}
    nodes = _prefix(model, outputs, set(given))
    needed = {name for node in nodes for name in node.input}
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(nodes)
    for node in cut.graph.node:  # a node kept for another output also makes a given one: the fed
        for index, name in enumerate(node.output):  # value stands in for it (one definition per name)
            if name in given:
                node.output[index] = f"{name}/recomputed"
    del cut.graph.output[:]
    cut.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    kept = [init for init in cut.graph.initializer if init.name in needed]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(kept)
    inputs = [i for i in cut.graph.input if i.name in needed]
    del cut.graph.input[:]
    cut.graph.input.extend(inputs)
    cut.graph.input.extend(
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(dtype), None)
        for name, dtype in given.items()
        if name in needed
    )
    return cut


def _batches(model: onnx.ModelProto, images: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """Batches of `size` images; a model with a fixed batch size gets batches of exactly that size (a
    tail too short to fill one is left out)."""
    fixed = _image_input(model)[1]
    if fixed is not None:
        if len(images) < fixed:
            raise CalibrationError(f"the model takes batches of {fixed} images; give at least {fixed}.")
        size, images = fixed, images[: len(images) - len(images) % fixed]
    for start in range(0, len(images), size):
        yield np.ascontiguousarray(images[start : start + size], dtype=np.float32)


def agreement(
    reference: onnx.ModelProto,
    model: onnx.ModelProto,
    images: np.ndarray,
    *,
    batch_size: int = 256,
    threads: int | None = None,
) -> Agreement:
    """How closely `model` follows `reference` on `images` (first outputs compared)."""
    first, second = make_session(reference, threads=threads), make_session(model, threads=threads)
    name = first.get_inputs()[0].name
    same, count, error, norm, classifier = 0, 0, 0.0, 0.0, True
    for x in _batches(reference, images, batch_size):
        count += len(x)
        a = first.run(None, {name: x})[0].astype(np.float64)
        b = second.run(None, {name: x})[0].astype(np.float64)
        classifier &= a.ndim == 2
        if classifier:
            same += int((a.argmax(1) == b.argmax(1)).sum())
        error += float(((a - b) ** 2).sum())
        norm += float((a**2).sum())
    top1 = same / count if classifier and count else None
    return Agreement(top1, float(np.sqrt(error / norm)) if norm > 0 else float(np.sqrt(error)))


# what is affected ----------------------------------------------------------------------------------------
def affected_nodes(dep: DependencyGraph, removed: np.ndarray) -> set[str]:
    """Names of the nodes downstream of a removal: consumers that lost input channels, and every node
    that reads (directly or not) what they compute."""
    lost = {m.node for m in dep.members.values() if m.role is Role.CONSUMER and removed[m.atoms].any()}
    changed: set[str] = set()
    nodes: set[str] = set()
    for node in dep.model.graph.node:
        if node.name in lost or changed.intersection(node.input):
            nodes.add(node.name)
            changed.update(node.output)
    return nodes


def affected_batchnorms(dep: DependencyGraph, removed: np.ndarray) -> set[str]:
    affected = affected_nodes(dep, removed)
    return {n.name for n in dep.model.graph.node if n.op_type == "BatchNormalization" and n.name in affected}


# the passes ----------------------------------------------------------------------------------------------
class _Params:
    """Initialisers of the model being recovered, read and written by name."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.by_name = {init.name: init for init in model.graph.initializer}
        self.users: dict[str, int] = {}
        for node in model.graph.node:
            for name in node.input:
                self.users[name] = self.users.get(name, 0) + 1

    def get(self, name: str) -> np.ndarray | None:
        init = self.by_name.get(name)
        return None if init is None else numpy_helper.to_array(init)

    def set(self, name: str, values: np.ndarray) -> None:
        dtype = numpy_helper.to_array(self.by_name[name]).dtype
        self.by_name[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values, dtype=dtype), name))

    def bias(self, node: onnx.NodeProto, slot: int, channels: int) -> str:
        """The bias initialiser of `node` at input `slot`, added (zeros) when the node has none."""
        if len(node.input) > slot and node.input[slot]:
            return node.input[slot]
        name = f"{node.name}_recovered_bias"
        init = numpy_helper.from_array(np.zeros(channels, np.float32), name)
        self.model.graph.initializer.append(init)
        self.by_name[name] = self.model.graph.initializer[-1]
        while len(node.input) < slot:
            node.input.append("")
        node.input.append(name)
        return name


class _Step:
    """One node's recovery: which tensors it reads per batch, what it accumulates, what it writes.
    `target` reduces a batch of the original model's tensors to what `add` needs, one row per image."""

    def __init__(self, node: onnx.NodeProto) -> None:
        self.node = node

    def pruned_tensors(self) -> list[str]:
        return []

    def original_tensors(self) -> list[str]:
        return []

    def written(self) -> list[str]:
        """The nodes whose parameters `finish` writes."""
        return [self.node.name]

    def target(self, original: dict[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def add(self, pruned: dict[str, np.ndarray], target: np.ndarray | None) -> None:
        raise NotImplementedError

    def finish(self, params: _Params) -> None:
        raise NotImplementedError


class _Moments:
    """Per-channel running mean and variance of [N, C, ...] tensors (shifted sums, float64)."""

    def __init__(self, shift: np.ndarray) -> None:
        self.shift = shift.astype(np.float64)
        self.s1 = np.zeros_like(self.shift)
        self.s2 = np.zeros_like(self.shift)
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        axes = (0, *range(2, x.ndim))
        shape = (1, -1) + (1,) * (x.ndim - 2)
        d = x.astype(np.float64) - self.shift.reshape(shape)
        self.s1 += d.sum(axis=axes)
        self.s2 += (d * d).sum(axis=axes)
        self.count += x.size // x.shape[1]

    def mean(self) -> np.ndarray:
        return self.shift + self.s1 / self.count

    def var(self) -> np.ndarray:
        return np.maximum(self.s2 / self.count - (self.s1 / self.count) ** 2, 0.0)


class _BatchNorm(_Step):
    """Running mean/var of the BN's input in the pruned model (population statistics)."""

    def __init__(self, node: onnx.NodeProto, params: _Params) -> None:
        super().__init__(node)
        self.moments = _Moments(params.get(node.input[3]))

    def pruned_tensors(self) -> list[str]:
        return [self.node.input[0]]

    def add(self, pruned: dict[str, np.ndarray], target: np.ndarray | None) -> None:
        self.moments.add(pruned[self.node.input[0]])

    def finish(self, params: _Params) -> None:
        params.set(self.node.input[3], self.moments.mean())
        params.set(self.node.input[4], self.moments.var())


class _Bias(_Step):
    """Shift the bias so the mean output per kept channel equals the original's mean there."""

    def __init__(self, node: onnx.NodeProto, keep: np.ndarray) -> None:
        super().__init__(node)
        self.keep = keep
        self.pruned = _Moments(np.zeros(int(keep.sum())))
        self.original_sum, self.images = np.zeros(int(keep.sum())), 0

    def pruned_tensors(self) -> list[str]:
        return [self.node.output[0]]

    def original_tensors(self) -> list[str]:
        return [self.node.output[0]]

    def target(self, original: dict[str, np.ndarray]) -> np.ndarray:
        """Per image, the mean of each kept channel (every image has as many positions)."""
        y = original[self.node.output[0]][:, self.keep]
        return y.reshape(*y.shape[:2], -1).mean(axis=2, dtype=np.float64)

    def add(self, pruned: dict[str, np.ndarray], target: np.ndarray | None) -> None:
        self.pruned.add(pruned[self.node.output[0]])
        self.original_sum += target.sum(axis=0)
        self.images += len(target)

    def finish(self, params: _Params) -> None:
        name = params.bias(self.node, 2, int(self.keep.sum()))
        original = self.original_sum / self.images
        params.set(name, params.get(name) + original - self.pruned.mean())


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel size, strides, dilations and pads (top, left, bottom, right) of a 2-D conv."""

    kernel: tuple[int, int]
    strides: tuple[int, int]
    dilations: tuple[int, int]
    pads: tuple[int, int, int, int]


def conv_geometry(node: onnx.NodeProto, weight: np.ndarray, spatial: tuple[int, int]) -> ConvGeometry:
    """The geometry of a Conv node on inputs of `spatial` size (auto_pad resolved to explicit pads)."""
    kernel = tuple(weight.shape[2:])
    strides = tuple(attribute(node, "strides", [1, 1]))
    dilations = tuple(attribute(node, "dilations", [1, 1]))
    pads = tuple(attribute(node, "pads", [0, 0, 0, 0]))
    auto = attribute(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto.startswith("SAME"):
        total = [
            max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            for size, s, k, d in zip(spatial, strides, kernel, dilations, strict=True)
        ]
        low = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        pads = (low[0], low[1], total[0] - low[0], total[1] - low[1])
    elif auto == "VALID":
        pads = (0, 0, 0, 0)
    return ConvGeometry(kernel, strides, dilations, pads)


def patches(x: np.ndarray, shape: ConvGeometry, positions: np.ndarray | None = None) -> np.ndarray:
    """im2col: one row per output position (per image, only the flat indices `positions` when given),
    columns ordered (channel, kernel row, kernel column) like a conv weight's [C, kh, kw] slice."""
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.strides, shape.dilations
    top, left, bottom, right = shape.pads
    x = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    windows = sliding_window_view(x, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    windows = windows[:, :, ::sh, ::sw, ::dh, ::dw]
    if positions is None:
        return windows.transpose(0, 2, 3, 1, 4, 5).reshape(-1, x.shape[1] * kh * kw)
    rows, columns = np.divmod(positions, windows.shape[3])
    return windows[:, :, rows, columns].transpose(0, 2, 1, 3, 4).reshape(-1, x.shape[1] * kh * kw)


class _LeastSquares(_Step):
    """Ridge least squares of a Conv/Gemm/MatMul's kept weights (and bias) against the original output.

    Per group g the unknowns theta_g [d (+1 for the bias), outputs] solve
    (X^T X + lam D) theta = X^T Y + lam D theta0, with D the identity on weights (0 on the bias) and
    theta0 the sliced weights, from sums accumulated over batches.  A conv's rows are the output
    positions `rng` picks (at most `cap`), the same for every image."""

    def __init__(  # noqa: PLR0913
        self,
        node: onnx.NodeProto,
        params: _Params,
        keep: np.ndarray,
        ridge: float,
        cap: int,
        rng: np.random.Generator,
    ) -> None:
        super().__init__(node)
        self.keep, self.ridge = keep, ridge
        self.weight = params.get(node.input[1])
        self.has_bias = node.op_type != "MatMul"
        bias = params.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        self.bias = bias if bias is not None else np.zeros(keep.sum(), np.float32)
        self.trans_b = node.op_type == "Gemm" and attribute(node, "transB", 0)
        self.conv: ConvGeometry | None = None
        self.groups = int(attribute(node, "group", 1)) if node.op_type == "Conv" else 1
        self.xtx: np.ndarray | None = None
        self.cap, self.rng = cap, rng
        self.positions: np.ndarray | None = None  # sampled flat output positions; None: all
        self.batchnorm: onnx.NodeProto | None = None  # a BN reading only this output, recalibrated here

    def pruned_tensors(self) -> list[str]:
        return [self.node.input[0]]

    def original_tensors(self) -> list[str]:
        return [self.node.output[0]]

    def target(self, original: dict[str, np.ndarray]) -> np.ndarray:
        """The kept outputs per image as [positions, channels] (a conv's sampled positions only)."""
        y = original[self.node.output[0]]
        if self.node.op_type != "Conv":
            y = y[:, self.keep] if self.node.op_type != "MatMul" else y[..., self.keep]
            return y.reshape(len(y), -1, y.shape[-1])
        y = y[:, self.keep].reshape(len(y), int(self.keep.sum()), -1)
        if self.positions is None and y.shape[2] > self.cap:
            self.positions = np.sort(self.rng.choice(y.shape[2], self.cap, replace=False))
        if self.positions is not None:
            y = y[:, :, self.positions]
        return np.ascontiguousarray(y.transpose(0, 2, 1))

    def written(self) -> list[str]:
        return [self.node.name] + ([self.batchnorm.name] if self.batchnorm is not None else [])

    def _rows(self, x: np.ndarray, y: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per group: the inputs as rows of features and the targets as rows."""
        y = y.reshape(-1, y.shape[-1])
        if self.node.op_type == "Conv":
            if self.conv is None:
                self.conv = conv_geometry(self.node, self.weight, x.shape[2:])
            cin, cout = x.shape[1] // self.groups, y.shape[1] // self.groups
            xs = [
                patches(x[:, g * cin : (g + 1) * cin], self.conv, self.positions) for g in range(self.groups)
            ]
            return xs, [y[:, g * cout : (g + 1) * cout] for g in range(self.groups)]
        return [x.reshape(-1, x.shape[-1])], [y]

    def add(self, pruned: dict[str, np.ndarray], target: np.ndarray | None) -> None:
        xs, ys = self._rows(pruned[self.node.input[0]], target)
        if self.xtx is None:
            d, k = xs[0].shape[1], ys[0].shape[1]
            self.xtx = np.zeros((self.groups, d, d))
            self.xty = np.zeros((self.groups, d, k))
            self.xsum = np.zeros((self.groups, d))
            self.ysum = np.zeros((self.groups, k))
            self.count = 0
        for g, (x, y) in enumerate(zip(xs, ys, strict=True)):
            x32, y32 = x.astype(np.float32, copy=False), y.astype(np.float32, copy=False)
            self.xtx[g] += x32.T @ x32
            self.xty[g] += x32.T @ y32
            self.xsum[g] += x.sum(axis=0)
            self.ysum[g] += y.sum(axis=0)
        self.count += len(xs[0])

    def _theta0(self) -> list[np.ndarray]:
        """The current weights as [d, outputs] per group."""
        w = self.weight
        if self.node.op_type == "Conv":
            per = w.reshape(self.groups, w.shape[0] // self.groups, -1)
            return [block.T for block in per]
        return [w.T if self.trans_b else w]

    def finish(self, params: _Params) -> None:
        d = self.xtx.shape[1]
        systems = [self._system(g) for g in range(self.groups)]
        thetas = [
            self._solve(g, a, b, theta0)
            for g, ((a, b), theta0) in enumerate(zip(systems, self._theta0(), strict=True))
        ]
        if self.node.op_type == "Conv":
            new = np.concatenate([t[:d].T for t in thetas]).reshape(self.weight.shape)
        else:
            new = thetas[0][:d].T if self.trans_b else thetas[0][:d]
        params.set(self.node.input[1], new)
        if self.has_bias:
            name = params.bias(self.node, 2, self.bias.size)
            params.set(name, np.concatenate([t[-1] for t in thetas]))
        if self.batchnorm is not None:
            # the BN reads exactly X theta: its input moments follow from the sums already held
            mean = np.concatenate([a[-1] @ t for (a, _), t in zip(systems, thetas, strict=True)]) / self.count
            square = np.concatenate(
                [((a @ t) * t).sum(axis=0) for (a, _), t in zip(systems, thetas, strict=True)]
            )
            params.set(self.batchnorm.input[3], mean)
            params.set(self.batchnorm.input[4], np.maximum(square / self.count - mean**2, 0.0))

    def _system(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """X^T X and X^T Y of group g, X with a column of ones when there is a bias."""
        if not self.has_bias:
            return self.xtx[g], self.xty[g]
        d = self.xtx.shape[1]
        a = np.zeros((d + 1, d + 1))
        a[:d, :d], a[:d, d], a[d, :d], a[d, d] = self.xtx[g], self.xsum[g], self.xsum[g], self.count
        return a, np.vstack([self.xty[g], self.ysum[g]])

    def _solve(self, g: int, a: np.ndarray, b: np.ndarray, theta0: np.ndarray) -> np.ndarray:
        d = self.xtx.shape[1]
        prior = np.vstack([theta0, np.split(self.bias, self.groups)[g]]) if self.has_bias else theta0
        penalty = np.zeros(len(a))
        penalty[:d] = self.ridge * max(float(np.mean(np.diag(self.xtx[g]))), 1e-12)
        return np.linalg.lstsq(a + np.diag(penalty), b + penalty[:, None] * prior, rcond=None)[0]


# planning the passes ---------------------------------------------------------------------------------
def _kept_outputs(dep: DependencyGraph, removed: np.ndarray, tensor: str, axis: int) -> np.ndarray | None:
    """Boolean mask of the original tensor's channels (along `axis`) that survive; None: all do."""
    view = dep.views.get(tensor)
    if view is None or view.shape[axis] != dep.shapes[tensor][axis]:
        return None
    return axis_keep(view, ~removed, axis, tensor)


def _fit_reason(node: onnx.NodeProto, params: _Params) -> str | None:
    """Why least squares cannot re-fit `node` (None: it can)."""
    weight = params.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None:
        return "its weights are not an initialiser"
    if params.users.get(node.input[1], 0) > 1:
        return "its weights are shared with another node"
    if node.op_type == "Conv":
        if weight.ndim != 4:
            return "only 2-D convolutions are reconstructed"
        groups = int(attribute(node, "group", 1))
        if groups > 1 and weight.shape[1] == 1:
            return "depthwise convolution (one input channel per filter: nothing to re-fit)"
    if node.op_type == "Gemm" and (
        attribute(node, "transA", 0)
        or attribute(node, "alpha", 1.0) != 1.0
        or attribute(node, "beta", 1.0) != 1.0
    ):
        return "Gemm with transA, alpha or beta other than the defaults"
    if node.op_type == "MatMul" and weight.ndim != 2:
        return "MatMul weights are not a 2-D matrix"
    return None


def _steps(
    dep: DependencyGraph,
    removed: np.ndarray,
    model: onnx.ModelProto,
    params: _Params,
    config: RecoveryConfig,
    report: RecoveryReport,
) -> list[_Step]:
    affected = affected_nodes(dep, removed)
    readers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node.op_type)
    steps: list[_Step] = []
    fitted_by_output: dict[str, _LeastSquares] = {}
    for node in model.graph.node:
        if node.name not in affected:
            continue
        if node.op_type == "BatchNormalization":
            if not all(params.get(name) is not None for name in node.input[1:5]):
                report.skipped[node.name] = "BatchNormalization parameters are not initialisers"
                continue
            fitted = fitted_by_output.get(node.input[0])
            if fitted is not None and readers[node.input[0]] == ["BatchNormalization"]:
                fitted.batchnorm = node
            else:
                steps.append(_BatchNorm(node, params))
            report.batchnorms.append(node.name)
            continue
        if node.op_type not in FITTED_OPS:
            continue
        axis = len(dep.shapes[node.output[0]]) - 1 if node.op_type == "MatMul" else 1
        keep = _kept_outputs(dep, removed, node.output[0], axis)
        keep = np.ones(dep.shapes[node.output[0]][axis], dtype=bool) if keep is None else keep
        reason = _fit_reason(node, params)
        if config.method == "lsq" and reason is None:
            rng = np.random.default_rng([config.seed, len(steps)])
            steps.append(fit := _LeastSquares(node, params, keep, config.ridge, config.positions, rng))
            if fit.has_bias:
                fitted_by_output[node.output[0]] = fit
            report.reconstructed.append(node.name)
            continue
        if config.method == "lsq":
            report.skipped[node.name] = f"not reconstructed: {reason}"
        centred = readers.get(node.output[0]) == ["BatchNormalization"]
        if node.op_type != "MatMul" and not centred:
            steps.append(_Bias(node, keep))
            report.bias_corrected.append(node.name)
    return steps


def _levels(model: onnx.ModelProto, steps: list[_Step]) -> list[list[_Step]]:
    """Steps grouped by depth: a step's level counts the steps on its longest path from the input, so a
    level's inputs only depend on the levels before it."""
    by_name = {step.node.name: step for step in steps}
    depth: dict[str, int] = {}
    levels: dict[int, list[_Step]] = {}
    for node in model.graph.node:
        level = max((depth.get(name, 0) for name in node.input), default=0)
        if node.name in by_name:
            levels.setdefault(level, []).append(by_name[node.name])
            level += 1
        for name in node.output:
            depth[name] = level
    return [levels[k] for k in sorted(levels)]


class _Spool:
    """Arrays appended batch by batch under a key, one temporary file per key, read back by rows: what
    every image gives held on disk, a batch at a time in memory."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder, self.name = folder, name
        self.files: dict[object, tuple[Path, np.dtype, tuple[int, ...]]] = {}

    def __contains__(self, key: object) -> bool:
        return key in self.files

    def append(self, key: object, values: np.ndarray) -> None:
        path = self.files[key][0] if key in self.files else self.folder / f"{self.name}-{len(self.files)}"
        self.files[key] = path, values.dtype, values.shape[1:]
        with path.open("ab") as file:
            np.ascontiguousarray(values).tofile(file)

    def read(self, key: object, start: int, count: int) -> np.ndarray:
        path, dtype, shape = self.files[key]
        size = int(np.prod(shape))
        return np.fromfile(path, dtype, count * size, offset=start * size * dtype.itemsize).reshape(
            count, *shape
        )

    def delete(self) -> None:
        for path, _, _ in self.files.values():
            path.unlink()


def _carried(model: onnx.ModelProto, levels: list[list[_Step]]) -> list[list[str]]:
    """Per level, the tensors its run takes from the run before: those the run before read or computed
    upstream of what its level rewrote, so the next run can start from them instead of from the image."""
    image = _image_input(model)[0]
    available: set[str] = set()
    carried = []
    for level in levels:
        fetch = [name for step in level for name in step.pruned_tensors()]
        nodes = _prefix(model, fetch, available)
        carried.append(sorted(available & {*fetch, *(name for node in nodes for name in node.input)}))
        written = {name for step in level for name in step.written()}
        stale: set[str] = set()
        for node in nodes:
            if node.name in written or stale.intersection(node.input):
                stale.update(node.output)
        available = {*carried[-1], *(name for node in nodes for name in node.output)} - stale - {image}
    return carried


def _sweep(
    model: onnx.ModelProto,
    params: _Params,
    reference: onnx.ModelProto,
    steps: list[_Step],
    images: np.ndarray,
    batch_size: int,
    threads: int | None,
) -> None:
    """Run the steps level by level: each level streams the images through `model` as the levels
    before left it (with the targets `reference` gave in one pass), then writes into `params`.  A
    level's run starts from the tensors the run before computed that its fits left unchanged."""
    levels = _levels(model, steps)
    carried = [*_carried(model, levels), []]
    with tempfile.TemporaryDirectory(prefix="graphprune-recover-") as folder:
        targets, cache = _Spool(Path(folder), "target"), _Spool(Path(folder), "level0")
        wanted = [name for step in steps for name in step.original_tensors()]
        theirs = _Runner(reference, wanted, threads)
        for x in _batches(model, images, batch_size) if wanted else ():
            original = theirs(x)
            for step in steps:
                if step.original_tensors():
                    targets.append(step, step.target(original))
        for k, level in enumerate(levels):
            fetch = [name for step in level for name in step.pruned_tensors()]
            mine = _Runner(model, fetch + carried[k + 1], threads, carried[k])
            following, start = _Spool(Path(folder), f"level{k + 1}"), 0
            for x in _batches(model, images, batch_size):
                got = mine(x, {name: cache.read(name, start, len(x)) for name in carried[k]})
                for step in level:
                    step.add(got, targets.read(step, start, len(x)) if step in targets else None)
                for name in carried[k + 1]:
                    following.append(name, got[name])
                start += len(x)
            for step in level:
                step.finish(params)
            cache.delete()
            cache = following


def recover_model(
    dep: DependencyGraph,
    removed: np.ndarray,
    pruned: onnx.ModelProto,
    images: np.ndarray,
    config: RecoveryConfig,
) -> tuple[onnx.ModelProto, RecoveryReport]:
    """A copy of `pruned` (made from `dep.model` by removing `removed`) recovered by `config.method`
    on `images`; the report lists what was recalibrated, corrected, reconstructed or skipped."""
    config.validate()
    report = RecoveryReport(config.method, fit_samples=len(images))
    if config.method == "none":
        return pruned, report
    if not len(images):
        raise CalibrationError("recovery needs at least one calibration image.")
    start, cpu = time.perf_counter(), time.process_time()
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    params = _Params(model)
    steps = _steps(dep, removed, model, params, config, report)
    _sweep(model, params, dep.model, steps, images, config.batch_size, config.threads)
    report.seconds, report.cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    for node, reason in report.skipped.items():
        log.info("recovery skipped %s: %s", node, reason)
    log.info(
        "recovery %s: %d BN recalibrated, %d biases corrected, %d layers reconstructed in %.2f s",
        config.method,
        len(report.batchnorms),
        len(report.bias_corrected),
        len(report.reconstructed),
        report.seconds,
    )
    return model, report


def recalibrate_batchnorm(
    model: onnx.ModelProto,
    images: np.ndarray,
    *,
    nodes: set[str] | None = None,
    batch_size: int = 128,
    threads: int | None = None,
) -> onnx.ModelProto:
    """A copy of `model` whose BatchNormalization running mean/var (of `nodes`, default all) are the
    statistics of their inputs on `images`, level by level; a model without BN comes back unchanged."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    params = _Params(result)
    steps: list[_Step] = [
        _BatchNorm(node, params)
        for node in result.graph.node
        if node.op_type == "BatchNormalization"
        and (nodes is None or node.name in nodes)
        and all(params.get(name) is not None for name in node.input[1:5])
    ]
    if not steps:
        return model
    _sweep(result, params, model, steps, images, batch_size, threads)
    return result
