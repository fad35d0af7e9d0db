"""Latency benchmark with onnxruntime: what a user of the pruned model actually gets.

Each measurement runs `warmup` untimed inferences (arena allocation, kernel selection), then `runs`
timed ones on the same seeded input; the median is the headline number because it ignores the
occasional scheduler hiccup, and p90 shows how noisy the machine was.  On CUDA the inputs and outputs
stay on the device (IO binding), so the time is the model's, not that of host-device copies.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from graphprune.errors import GraphPruneError
from graphprune.runtime.progress import progress
from graphprune.runtime.session import ModelLike, input_feed, make_session
from graphprune.runtime.shapes import InputShapes

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement; `model` names what was measured (path or graph name)."""

    median_ms: float
    p90_ms: float
    throughput_per_s: float
    batch: int
    threads: int | None
    provider: str
    model: str = ""


def bench(
    model_path: ModelLike,
    *,
    batch: int = 1,
    threads: int | None = None,
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 50,
    input_shapes: InputShapes | None = None,
    show_progress: bool = True,
) -> LatencyResult:
    """Median / p90 latency and throughput of one model at one batch size (symbolic input sizes other
    than the batch from `input_shapes`, else 1); `show_progress` False for short probes."""
    _check_counts(warmup, runs)
    session = make_session(model_path, provider=provider, threads=threads)
    return _measure(session, model_path, batch, threads, provider, warmup, runs, input_shapes, show_progress)


def bench_many(
    paths: Iterable[ModelLike],
    batches: Iterable[int],
    threads: int | None = None,
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 50,
    input_shapes: InputShapes | None = None,
) -> list[LatencyResult]:
    """Benchmark every model at every batch size (one session per model), in path-major order."""
    _check_counts(warmup, runs)
    batch_sizes = list(batches)
    results = []
    for path in paths:
        session = make_session(path, provider=provider, threads=threads)
        for batch in batch_sizes:
            results.append(_measure(session, path, batch, threads, provider, warmup, runs, input_shapes))
    return results


def _measure(
    session: ort.InferenceSession,
    model: ModelLike,
    batch: int,
    threads: int | None,
    provider: str,
    warmup: int,
    runs: int,
    input_shapes: InputShapes | None,
    show_progress: bool = True,
) -> LatencyResult:
    if batch < 1:
        raise GraphPruneError(f"Batch size {batch} is invalid; pass a positive number.")
    name = model.graph.name if isinstance(model, onnx.ModelProto) else os.fspath(model)
    feed = input_feed(model, batch, seed=0, shapes=input_shapes)
    leading = {array.shape[0] for array in feed.values() if array.ndim}
    if leading and batch not in leading:
        raise GraphPruneError(
            f"Model {name} has a fixed batch size of {min(leading)}, so it cannot be benchmarked at batch "
            f"{batch}; export it with a dynamic batch dimension or bench at batch {min(leading)}."
        )
    run = runner(session, feed, provider)
    for _ in range(warmup):
        run()
    times = np.empty(runs)
    for index in progress(range(runs), enabled=show_progress, desc=f"bench {Path(name).name} bs{batch}"):
        start = time.perf_counter()
        run()
        times[index] = time.perf_counter() - start
    median = float(np.median(times))
    result = LatencyResult(
        median_ms=median * 1e3,
        p90_ms=float(np.percentile(times, 90)) * 1e3,
        throughput_per_s=batch / median,
        batch=batch,
        threads=threads,
        provider=provider,
        model=name,
    )
    log.log(
        logging.INFO if show_progress else logging.DEBUG,
        "%s: %.3f ms median, %.3f ms p90 at batch %d.",
        name,
        result.median_ms,
        result.p90_ms,
        batch,
    )
    return result


def runner(session: ort.InferenceSession, feed: dict[str, np.ndarray], provider: str) -> Callable[[], object]:
    """A zero-argument call that runs one inference; on CUDA with inputs and outputs bound on the device
    (onnxruntime synchronises the stream before run_with_iobinding returns)."""
    if provider != "cuda":
        return lambda: session.run(None, feed)
    binding = session.io_binding()
    for name, array in feed.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")
    return lambda: session.run_with_iobinding(binding)


def _check_counts(warmup: int, runs: int) -> None:
    if warmup < 0 or runs < 1:
        raise GraphPruneError(
            f"Benchmark counts warmup={warmup}, runs={runs} are invalid; use warmup >= 0 and runs >= 1."
        )
