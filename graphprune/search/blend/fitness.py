"""The blend search's fitness: prune with a candidate blend, recalibrate BatchNorm statistics on a few
calibration batches, and measure held-out accuracy in onnxruntime, without any fine-tuning.

BN recalibration is the recovery pass of graphprune.surgery.recover (the BNs downstream of the removal,
level by level), the same one prune(recover="bn") applies to the model it writes.  Evaluations are
independent and run in worker processes (`Evaluator`).
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

from graphprune.analysis.graph import DependencyGraph
from graphprune.criteria.base import RemovalFunction
from graphprune.data.dataset import ArrayDataset
from graphprune.errors import GraphPruneError
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.surgery.apply import apply_removal
from graphprune.surgery.recover import affected_batchnorms, recalibrate_batchnorm

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


# Evaluation ----------------------------------------------------------------------------------------
@dataclass
class FitnessTask:
    """Everything one evaluation needs; pickled once into each worker process."""

    dep: DependencyGraph
    planner: RemovalFunction
    layers: list[LayerBlend]
    recal_images: np.ndarray
    held_out: ArrayDataset
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
                pruned,
                self.recal_images,
                nodes=affected_batchnorms(self.dep, removed),
                batch_size=self.batch_size,
                threads=self.threads,
            )
            self.cache[key] = evaluate_onnx(pruned, self.held_out, threads=self.threads)
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
