"""Latency benchmark with onnxruntime: what a user of the pruned model actually gets.

Models are timed in interleaved rounds: each round opens a fresh session per model and times every
model and batch in turn (a few untimed inferences first: arena allocation, kernel selection, then timed
ones on the same seeded input).  On a shared machine another job can slow a stretch of seconds, or one
session whose worker thread got a busy core, to half speed (measured: one model's single 50-run median
read 1.05 and 2.0 ms in back-to-back invocations); interleaving spreads such a spell over every model,
and a result's median is its fastest round's, since such spells only ever slow a round down.  p90 spans
all its timed runs, and `spread` (slowest round's median over the fastest's, minus 1) says how busy the
machine was.  On CUDA the inputs and outputs stay on the device (IO binding), so the time is the
model's, not that of host-device copies.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from graphprune.errors import GraphPruneError
from graphprune.runtime.progress import progress
from graphprune.runtime.session import ModelLike, input_feed, make_session
from graphprune.runtime.shapes import InputShapes

log = logging.getLogger(__name__)

# Round medians this far apart (slowest over fastest, minus 1) mean the machine was busy.
BUSY_SPREAD = 0.25


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement; `model` names what was measured (path or graph name)."""

    median_ms: float  # the fastest round's median
    p90_ms: float  # over every timed run
    throughput_per_s: float
    batch: int
    threads: int | None
    provider: str
    model: str = ""
    rounds: int = 1
    spread: float = 0.0  # slowest round's median / fastest round's - 1


def bench(
    model_path: ModelLike,
    *,
    batch: int = 1,
    threads: int | None = None,
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 50,
    rounds: int = 1,
    input_shapes: InputShapes | None = None,
    show_progress: bool = True,
) -> LatencyResult:
    """Median / p90 latency and throughput of one model at one batch size (symbolic input sizes other
    than the batch from `input_shapes`, else 1); see bench_many for `rounds`; `show_progress` False
    for short probes."""
    return bench_many(
        [model_path],
        [batch],
        threads=threads,
        provider=provider,
        warmup=warmup,
        runs=runs,
        rounds=rounds,
        input_shapes=input_shapes,
        show_progress=show_progress,
    )[0]


def bench_many(
    paths: Iterable[ModelLike],
    batches: Iterable[int],
    threads: int | None = None,
    provider: str = "cpu",
    warmup: int = 10,
    runs: int = 50,
    rounds: int = 5,
    input_shapes: InputShapes | None = None,
    show_progress: bool = True,
) -> list[LatencyResult]:
    """Every model at every batch size (results in path-major order): `runs` timed inferences each,
    spread over `rounds` interleaved rounds (at least one per round), each round after
    max(2, warmup / rounds) untimed ones in its fresh session (none when `warmup` is 0)."""
    models, batch_sizes = list(paths), list(batches)
    _check_counts(warmup, runs, rounds)
    for batch in batch_sizes:
        if batch < 1:
            raise GraphPruneError(f"Batch size {batch} is invalid; pass a positive number.")
    # every model opened and fed before any timing, so that a bad one fails in one line, first; a
    # session is let go once its round is timed (one run holds its activation arena)
    sessions: list[ort.InferenceSession | None] = [
        make_session(model, provider=provider, threads=threads) for model in models
    ]
    feeds = {(i, b): _feed(model, b, input_shapes) for i, model in enumerate(models) for b in batch_sizes}
    per_round = math.ceil(runs / rounds)
    round_warmup = min(warmup, max(2, math.ceil(warmup / rounds)))
    times: dict[tuple[int, int], list[np.ndarray]] = {}
    steps = [(r, i) for r in range(rounds) for i in range(len(models))]
    for _round, index in progress(steps, enabled=show_progress, desc=f"bench ({rounds} rounds)"):
        session = sessions[index] or make_session(models[index], provider=provider, threads=threads)
        sessions[index] = None
        for batch in batch_sizes:
            times.setdefault((index, batch), []).append(
                _timed(runner(session, feeds[index, batch], provider), round_warmup, per_round)
            )
        del session
    results = [
        _result(times[index, batch], _name(model), batch, threads, provider)
        for index, model in enumerate(models)
        for batch in batch_sizes
    ]
    for result in results:
        log.log(
            logging.INFO if show_progress else logging.DEBUG,
            "%s: %.3f ms median (fastest of %d rounds, %.0f%% apart), %.3f ms p90 at batch %d.",
            result.model,
            result.median_ms,
            result.rounds,
            100 * result.spread,
            result.p90_ms,
            result.batch,
        )
    return results


def _name(model: ModelLike) -> str:
    return model.graph.name if isinstance(model, onnx.ModelProto) else os.fspath(model)


def _feed(model: ModelLike, batch: int, input_shapes: InputShapes | None) -> dict[str, np.ndarray]:
    """Seeded inputs of `model` at `batch`; a model whose batch is fixed elsewhere is refused."""
    feed = input_feed(model, batch, seed=0, shapes=input_shapes)
    leading = {array.shape[0] for array in feed.values() if array.ndim}
    if leading and batch not in leading:
        raise GraphPruneError(
            f"Model {_name(model)} has a fixed batch size of {min(leading)}, so it cannot be benchmarked at "
            f"batch {batch}; export it with a dynamic batch dimension or bench at batch {min(leading)}."
        )
    return feed


def _timed(run: Callable[[], object], warmup: int, runs: int) -> np.ndarray:
    """Seconds each of `runs` inferences took, after `warmup` untimed ones."""
    for _ in range(warmup):
        run()
    times = np.empty(runs)
    for index in range(runs):
        start = time.perf_counter()
        run()
        times[index] = time.perf_counter() - start
    return times


def _result(
    round_times: list[np.ndarray], name: str, batch: int, threads: int | None, provider: str
) -> LatencyResult:
    medians = [float(np.median(times)) for times in round_times]
    fastest = min(medians)
    return LatencyResult(
        median_ms=fastest * 1e3,
        p90_ms=float(np.percentile(np.concatenate(round_times), 90)) * 1e3,
        throughput_per_s=batch / fastest,
        batch=batch,
        threads=threads,
        provider=provider,
        model=name,
        rounds=len(medians),
        spread=max(medians) / fastest - 1 if fastest > 0 else 0.0,
    )


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


def _check_counts(warmup: int, runs: int, rounds: int) -> None:
    if warmup < 0 or runs < 1 or rounds < 1:
        raise GraphPruneError(
            f"Benchmark counts warmup={warmup}, runs={runs}, rounds={rounds} are invalid; use warmup >= 0, "
            "runs >= 1 and rounds >= 1."
        )
