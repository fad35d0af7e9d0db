"""The blend search's fitness: prune with a candidate blend, recalibrate BatchNorm statistics on a few
calibration batches, and measure held-out accuracy in onnxruntime, without any fine-tuning.

BN recalibration happens in ONNX: every BatchNormalization is replaced, in a probe copy of the pruned
model, by the same normalisation computed with the batch's own mean and variance (what a framework's
BN does in train mode), so each BN sees inputs normalised by the recalibrated layers before it.  The
probe returns every BN's batch statistics; their sample-weighted average (unbiased variances, as a
framework's running_var with cumulative averaging) replaces the BN mean/var initialisers of the pruned
model.  Evaluations are independent and run in worker processes (`Evaluator`).
"""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import tempfile
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.analysis.graph import DependencyGraph
from graphprune.criteria.base import RemovalFunction
from graphprune.errors import CalibrationError, GraphPruneError
from graphprune.onnxutil import attribute
from graphprune.runtime.session import make_session
from graphprune.surgery.apply import apply_removal

log = logging.getLogger(__name__)


@dataclass
class LayerBlend:
    """One group's blending inputs: its representatives' normalised scores (one row per cluster) and,
    for each gene of the search, the row its factor weights (-1: that criterion has no opinion here)."""

    group: int
    rows: np.ndarray
    gene_rows: np.ndarray

    def scores(self, alphas: np.ndarray) -> np.ndarray:
        """sum_k alpha_k * row(k); equal weights when no weighted criterion has an opinion here."""
        weights = np.zeros(len(self.rows))
        known = self.gene_rows >= 0
        np.add.at(weights, self.gene_rows[known], alphas[known])
        if not weights.any():
            weights[:] = 1.0
        return weights @ self.rows


def blend_scores(layers: list[LayerBlend], alphas: np.ndarray) -> dict[int, np.ndarray]:
    return {layer.group: layer.scores(alphas) for layer in layers}


# BatchNorm recalibration -----------------------------------------------------------------------------
@dataclass(frozen=True)
class _Probe:
    node: str
    mean: str
    var: str
    shape: str
    mean_init: str
    var_init: str


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)


def batchnorm_probe(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[_Probe]]:
    """A copy of `model` whose BatchNormalization nodes (with initialiser parameters) normalise with
    their batch statistics, and the names of the tensors holding those statistics."""
    inits = {init.name for init in model.graph.initializer}
    opset = _opset(model)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    nodes, probes, extra_inits = [], [], []

    def reduce_mean(x: str, axes: str, out: str) -> onnx.NodeProto:
        """Mean over batch and positions of a [N, C, L] tensor (axes moved to an input in opset 18)."""
        if opset >= 18:
            return helper.make_node("ReduceMean", [x, axes], [out], keepdims=1)
        return helper.make_node("ReduceMean", [x], [out], axes=[0, 2], keepdims=1)

    for node in probe.graph.node:
        params = list(node.input[1:5])
        if node.op_type != "BatchNormalization" or len(params) < 4 or not set(params) <= inits:
            nodes.append(node)
            continue
        x, (scale, bias, mean, var), y = node.input[0], params, node.output[0]
        p = f"graphprune_recal_{len(probes)}"
        axes = f"{p}_axes"
        extra_inits += [
            numpy_helper.from_array(np.array([0, 0, -1], dtype=np.int64), f"{p}_flat"),
            numpy_helper.from_array(np.array([0, 2], dtype=np.int64), axes),
            numpy_helper.from_array(np.array([1, -1, 1], dtype=np.int64), f"{p}_channel"),
            numpy_helper.from_array(np.array(attribute(node, "epsilon", 1e-5), dtype=np.float32), f"{p}_eps"),
        ]
        nodes += [
            helper.make_node("Reshape", [x, f"{p}_flat"], [f"{p}_x"]),
            helper.make_node("Shape", [f"{p}_x"], [f"{p}_shape"]),
            reduce_mean(f"{p}_x", axes, f"{p}_mean"),
            helper.make_node("Sub", [f"{p}_x", f"{p}_mean"], [f"{p}_d"]),
            helper.make_node("Mul", [f"{p}_d", f"{p}_d"], [f"{p}_d2"]),
            reduce_mean(f"{p}_d2", axes, f"{p}_var"),
            helper.make_node("Add", [f"{p}_var", f"{p}_eps"], [f"{p}_ve"]),
            helper.make_node("Sqrt", [f"{p}_ve"], [f"{p}_std"]),
            helper.make_node("Div", [f"{p}_d", f"{p}_std"], [f"{p}_n"]),
            helper.make_node("Reshape", [scale, f"{p}_channel"], [f"{p}_scale"]),
            helper.make_node("Reshape", [bias, f"{p}_channel"], [f"{p}_bias"]),
            helper.make_node("Mul", [f"{p}_n", f"{p}_scale"], [f"{p}_ns"]),
            helper.make_node("Add", [f"{p}_ns", f"{p}_bias"], [f"{p}_y"]),
            helper.make_node("Shape", [x], [f"{p}_xshape"]),
            helper.make_node("Reshape", [f"{p}_y", f"{p}_xshape"], [y]),
        ]
        probes.append(_Probe(node.name, f"{p}_mean", f"{p}_var", f"{p}_shape", mean, var))
    del probe.graph.node[:]
    probe.graph.node.extend(nodes)
    probe.graph.initializer.extend(extra_inits)
    return probe, probes


def recalibrate_batchnorm(
    model: onnx.ModelProto, images: np.ndarray, *, batch_size: int = 64, threads: int | None = None
) -> onnx.ModelProto:
    """A copy of `model` whose BN running mean/var are re-estimated on `images` (see module docstring);
    a model without BatchNormalization comes back unchanged."""
    probe, probes = batchnorm_probe(model)
    if not probes:
        return model
    names = [n for p in probes for n in (p.mean, p.var, p.shape)]
    session = make_session(probe, threads=threads, extra_outputs=names)
    input_name = session.get_inputs()[0].name
    sums = {p.node: [0.0, 0.0, 0] for p in probes}
    for start in range(0, len(images), batch_size):
        values = dict(
            zip(names, session.run(names, {input_name: images[start : start + batch_size]}), strict=True)
        )
        for p in probes:
            count = int(np.prod(values[p.shape][[0, 2]]))
            unbiased = count / max(count - 1, 1)
            sums[p.node][0] = sums[p.node][0] + values[p.mean].ravel().astype(np.float64) * count
            sums[p.node][1] = sums[p.node][1] + values[p.var].ravel().astype(np.float64) * unbiased * count
            sums[p.node][2] += count
    result = onnx.ModelProto()
    result.CopyFrom(model)
    by_name = {init.name: init for init in result.graph.initializer}
    for p in probes:
        mean_sum, var_sum, count = sums[p.node]
        for name, value in ((p.mean_init, mean_sum / count), (p.var_init, var_sum / count)):
            dtype = numpy_helper.to_array(by_name[name]).dtype
            by_name[name].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    return result


def accuracy(
    model: onnx.ModelProto,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int = 256,
    threads: int | None = None,
) -> float:
    """Top-1 accuracy of a classifier (first output [N, classes]) in onnxruntime."""
    session = make_session(model, threads=threads)
    input_name = session.get_inputs()[0].name
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = session.run(None, {input_name: images[start : start + batch_size]})[0]
        if logits.ndim != 2:
            raise CalibrationError(
                f"the blend's fitness is classification accuracy, but the model's first output has shape "
                f"{logits.shape}; use a classifier whose output is [N, classes]."
            )
        correct += int((logits.argmax(axis=1) == labels[start : start + batch_size]).sum())
    return correct / max(len(labels), 1)


# Evaluation ----------------------------------------------------------------------------------------
@dataclass
class FitnessTask:
    """Everything one evaluation needs; pickled once into each worker process."""

    dep: DependencyGraph
    planner: RemovalFunction
    layers: list[LayerBlend]
    recal_images: np.ndarray
    eval_images: np.ndarray
    eval_labels: np.ndarray
    batch_size: int = 64
    threads: int = 1  # one onnxruntime thread: the same numbers in-process and in any worker
    cache: dict[bytes, float] = field(default_factory=dict, repr=False)

    def removal(self, alphas: np.ndarray) -> np.ndarray:
        return self.planner(self.dep, blend_scores(self.layers, alphas))

    def evaluate(self, alphas: np.ndarray) -> float:
        """Held-out accuracy of the model pruned by this blend, BN recalibrated (cached per removal)."""
        removed = self.removal(alphas)
        key = np.packbits(removed).tobytes()
        if key not in self.cache:
            pruned = apply_removal(self.dep, removed)
            pruned = recalibrate_batchnorm(
                pruned, self.recal_images, batch_size=self.batch_size, threads=self.threads
            )
            self.cache[key] = accuracy(pruned, self.eval_images, self.eval_labels, threads=self.threads)
        return self.cache[key]


_TASK: FitnessTask | None = None


def _init_worker(path: str) -> None:
    """Load the task a parent process pickled to `path` (a file, not the spawn pipe: a child that dies
    while starting must not leave the parent blocked writing megabytes into its pipe)."""
    global _TASK
    with open(path, "rb") as handle:
        _TASK = pickle.load(handle)


def _evaluate(alphas: np.ndarray) -> float:
    return _TASK.evaluate(alphas)


class Evaluator:
    """Evaluates lists of blends, in `workers` spawned processes (in this process when workers <= 1).
    Results come back in input order, so the search stays deterministic.  Spawned workers import the
    caller's main module: scripts using workers > 1 need an ``if __name__ == "__main__":`` guard."""

    def __init__(self, task: FitnessTask, workers: int = 2) -> None:
        self.task = task
        self.workers = workers
        self.pool: ProcessPoolExecutor | None = None
        self.folder: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Evaluator:
        if self.workers > 1:
            self.folder = tempfile.TemporaryDirectory(prefix="graphprune-blend-")
            path = Path(self.folder.name) / "task.pkl"
            with open(path, "wb") as handle:
                pickle.dump(self.task, handle, protocol=pickle.HIGHEST_PROTOCOL)
            self.pool = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_worker,
                initargs=(str(path),),
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
        if self.folder is not None:
            self.folder.cleanup()

    def evaluate_many(self, genomes: list[np.ndarray]) -> list[float]:
        if self.pool is None:
            return [self.task.evaluate(g) for g in genomes]
        try:
            return list(self.pool.map(_evaluate, genomes))
        except BrokenProcessPool as exc:
            raise GraphPruneError(
                "a blend evaluation worker died; if you call prune() from a script, put the call under "
                "if __name__ == '__main__':, or set BlendConfig(workers=1)."
            ) from exc
