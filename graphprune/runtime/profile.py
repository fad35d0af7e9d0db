"""Latency lookup tables: how long each weighted layer takes as a function of its kept channels.

The caller describes the layers plainly (`LayerSpec`: op, widths, attributes, input size); this module
imports no analysis.  Each distinct signature is timed once on a small isolated graph (the layer alone,
random weights) at a grid of widths: output widths with the input whole, input widths with the output
whole (a depthwise conv has one width).  A point's latency is the fastest of several rounds' medians,
the rounds interleaving the points of a signature, because other jobs on a shared machine can only
slow a round down; on the CPU a run counts the layer's own kernels as onnxruntime's profiler records
them, since the run's fixed cost and the layout reorders around an isolated layer are not paid by the
layer inside a model.  The whole model is timed too (wall time), before and after the layers, and the
table records how well the sum of its layers predicts it.  On the CPU the ops between the layers
(activations, adds, pooling, reorders at layout boundaries) are timed inside the whole model by the
profiler (`other_ms`).  The whole is predicted from the layers and those ops by a line fitted through
calibration points: the model itself and, when the caller measures them (graphprune.api does, on
uniformly pruned copies), smaller versions of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from graphprune.errors import PlanError
from graphprune.onnxutil import atomic_write
from graphprune.runtime.bench import bench, runner
from graphprune.runtime.session import ModelLike, input_feed, make_session

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger(__name__)

LUT_FORMAT = "graphprune-latency/1"
# The weighted layers a table times (as ONNX ops).
PROFILED_OPS = ("Conv", "Gemm", "MatMul")


@dataclass(frozen=True)
class LayerSpec:
    """One weighted layer as the profiler sees it.

    op: Conv, Gemm or MatMul. leading: the input's dims other than batch and channels (a conv's spatial
    size, a MatMul's middle dims). attributes: the conv's attributes other than `group`, as sorted
    (name, value) pairs. sweep_in / sweep_out: whether that width can change (prunable channels).
    in_multiple / out_multiple: the multiple that width keeps when pruned (a width read or written by
    grouped convs loses equal counts per conv group, or whole conv groups).  drops_groups: a grouped
    conv pruned by whole conv groups: its input width follows the output's, its group count with them.
    """

    node: str
    op: str
    in_channels: int
    out_channels: int
    group: int = 1
    attributes: tuple[tuple[str, Any], ...] = ()
    leading: tuple[int, ...] = ()
    bias: bool = True
    sweep_in: bool = True
    sweep_out: bool = True
    in_multiple: int = 1
    out_multiple: int = 1
    drops_groups: bool = False

    @property
    def depthwise(self) -> bool:
        return self.group > 1 and self.group == self.in_channels == self.out_channels

    @property
    def tied(self) -> bool:
        """Whether the layer has one width, the output's (a depthwise conv, or whole conv groups)."""
        return self.depthwise or self.drops_groups

    def in_width(self, out_width: int) -> int:
        """A tied layer's input width at an output width."""
        return out_width * self.in_channels // self.out_channels

    def weight_share(self, kept_in: int, kept_out: int) -> float:
        """Share of the layer's weights kept at these widths (a tied layer's follow its output)."""
        if self.tied:
            return kept_out / self.out_channels
        return kept_in * kept_out / (self.in_channels * self.out_channels)

    def groups_at(self, in_width: int) -> int:
        """The conv's group count at an input width."""
        if self.depthwise:
            return in_width
        return in_width // (self.in_channels // self.group) if self.drops_groups else self.group

    @property
    def signature(self) -> str:
        """What the latency depends on (everything but the node's name)."""
        parts = [self.op, f"{self.in_channels}->{self.out_channels}", f"g{self.group}"]
        parts += [f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in self.attributes]
        parts += [f"in{list(self.leading)}", "bias" if self.bias else "nobias"]
        parts += [f"sweep{'i' if self.sweep_in else ''}{'o' if self.sweep_out else ''}"]
        if (self.in_multiple, self.out_multiple) != (1, 1):
            parts += [f"multiple{self.in_multiple}x{self.out_multiple}"]
        if self.drops_groups:
            parts += ["dropgroups"]
        return " ".join(parts)


@dataclass
class LayerCurve:
    """Measured latency (ms) of one signature: output widths with the input whole, input widths with
    the output whole (empty for tied layers, whose one width is the output's), and the whole layer."""

    full_ms: float
    out_widths: list[int] = field(default_factory=list)
    out_ms: list[float] = field(default_factory=list)
    in_widths: list[int] = field(default_factory=list)
    in_ms: list[float] = field(default_factory=list)

    def fastest_with(self, other: LayerCurve) -> LayerCurve:
        """This curve with every point at the faster of its and `other`'s timing (same widths)."""
        if (self.out_widths, self.in_widths) != (other.out_widths, other.in_widths):
            raise ValueError("curves timed at different widths cannot be merged point by point")
        return replace(
            self,
            full_ms=min(self.full_ms, other.full_ms),
            out_ms=np.minimum(self.out_ms, other.out_ms).tolist(),
            in_ms=np.minimum(self.in_ms, other.in_ms).tolist(),
        )

    def latency(self, kept_in: int, kept_out: int) -> float:
        """Separable model: full x f_out(kept_out) x f_in(kept_in), each factor read from its curve at
        the smallest timed width that holds the kept channels.  Exact at timed widths, which are the
        only ones plans made with the table choose; between them a ragged width can be slower than
        the next timed one (blocked kernels), which the staircase does not see."""
        out_ms = _step(self.out_widths, self.out_ms, kept_out, self.full_ms)
        return out_ms * _step(self.in_widths, self.in_ms, kept_in, self.full_ms) / self.full_ms


def _step(widths: list[int], times: list[float], width: int, whole: float) -> float:
    """Time at the smallest timed width >= `width` (`whole` when the dimension was not swept)."""
    if not widths:
        return whole
    return times[min(int(np.searchsorted(widths, width)), len(widths) - 1)]


def scale_at(curve: tuple[list[float], list[float]], weight_share: float) -> float:
    """An in-model scale curve (LatencyTable.in_model_curve) read at a weight share."""
    shares, scales = curve
    return scales[0] if len(shares) == 1 else float(np.interp(weight_share, shares, scales))


# Least share of the layers' latency a calibration copy must shed to weigh in the fit.
MIN_SPREAD = 0.1


@dataclass
class LatencyTable:
    """A model's latency lookup table (the JSON file `graphprune profile` writes)."""

    model_sha256: str | None
    provider: str
    batch: int
    threads: int | None
    end_to_end_ms: float
    layers: dict[str, str]
    curves: dict[str, LayerCurve]
    machine: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    calibration: list[tuple[float, float]] = field(default_factory=list)
    check_point: tuple[float, float] | None = None
    block: int = 1
    other_ms: float = 0.0
    other_fixed_ms: float = 0.0  # the part of other_ms paid per kernel whatever its tensors' size
    # per layer node: its kernel's time (ms) at full width inside the whole model (CPU profiler), at
    # the pace the layers were timed alone (kernel_pace)
    in_model_ms: dict[str, float] = field(default_factory=dict)
    # per layer node: (share of its weights kept, in-model scale) in the calibration's pruned copies (CPU)
    in_model_points: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    profiles: int = 1  # of the layers, each point at its fastest (a second when the first missed its check)
    canary_ms: float | None = None  # the canary's fastest reading while profiling: the machine's quiet speed

    @property
    def layers_sum_ms(self) -> float:
        return sum(self.curves[sig].full_ms * self.in_model_scale(node) for node, sig in self.layers.items())

    def in_model_scale(self, node: str, weight_share: float = 1.0) -> float:
        """How much slower the layer ran inside the whole model than alone (1 when not measured): its
        weights come cold from memory there, while a layer timed alone keeps them in cache (a batch-1
        Gemm of 1280x1000 ran 3.9x its isolated time inside MobileNetV3, the squeeze-excite convs 2-2.5x,
        most convs within 2%).  At `weight_share` of its weights kept: linear between the full layer
        and the calibration's pruned copies (`in_model_points`), flat beyond the smallest, since
        weights shrunk to fit the cache stop paying (that Gemm at a quarter of its input: 1.3x)."""
        return scale_at(self.in_model_curve(node), weight_share)

    def in_model_curve(self, node: str) -> tuple[list[float], list[float]]:
        """The layer's in-model scale at the weight shares it was measured at, ascending (the last 1.0);
        of two copies keeping the same share, the lower scale (load only ever slows a profile)."""
        measured = self.in_model_ms.get(node)
        if measured is None:
            return [1.0], [1.0]
        scales = {1.0: measured / self.curves[self.layers[node]].full_ms}
        for share, scale in self.in_model_points.get(node, []):
            scales[share] = min(scale, scales.get(share, scale))
        shares = sorted(scales)
        return shares, [scales[share] for share in shares]

    @property
    def kernels_ms(self) -> float:
        """The model's predicted kernel time: its weighted layers' sum and its other ops' time."""
        return self.layers_sum_ms + self.other_ms

    @property
    def sum_error(self) -> float:
        """(sum of the layers' latencies - measured whole) / measured whole."""
        return self.layers_sum_ms / self.end_to_end_ms - 1.0

    @property
    def fit(self) -> tuple[float, float]:
        """(slope, intercept) of the whole's latency against its predicted kernel time: the line
        through the measured model whose slope fits the calibration points best (least squares), so
        the model itself is predicted exactly; through the origin when there are no points or the line
        would not rise."""
        slope = self.end_to_end_ms / self.kernels_ms
        if self.calibration:
            d_sum, d_whole = (np.asarray(self.calibration) - (self.kernels_ms, self.end_to_end_ms)).T
            # copies whose layers hardly shrank (most groups unprunable) say nothing about the slope
            spread = np.abs(d_sum) >= MIN_SPREAD * self.kernels_ms
            d_sum, d_whole = d_sum[spread], d_whole[spread]
            fitted = float(d_sum @ d_whole / (d_sum @ d_sum)) if d_sum.size else 0.0
            slope = fitted if fitted > 0 else slope
        return slope, self.end_to_end_ms - slope * self.kernels_ms

    def whole_ms(self, kernels_ms: float) -> float:
        """Predicted latency of the whole model whose predicted kernel time is `kernels_ms`."""
        slope, intercept = self.fit
        return slope * kernels_ms + intercept

    @property
    def check_error(self) -> float | None:
        """(predicted - measured) / measured at the check point (a pruned copy not used by the fit)."""
        if self.check_point is None:
            return None
        return self.whole_ms(self.check_point[0]) / self.check_point[1] - 1.0

    def fastest_with(self, other: LatencyTable) -> LatencyTable:
        """This table with every timed point (and the whole) at the faster of its and `other`'s timing
        of the same model and settings: a neighbour's load only ever slows a timing down, so the
        point-wise minimum of two passes keeps what either caught at the machine's own speed."""
        quicker_others = other if other.other_ms < self.other_ms else self
        return replace(
            self,
            curves={sig: curve.fastest_with(other.curves[sig]) for sig, curve in self.curves.items()},
            end_to_end_ms=min(self.end_to_end_ms, other.end_to_end_ms),
            other_ms=quicker_others.other_ms,
            other_fixed_ms=quicker_others.other_fixed_ms,
            in_model_ms={
                node: min(ms, other.in_model_ms.get(node, ms)) for node, ms in self.in_model_ms.items()
            },
            machine={**self.machine, "load_1min": [*self.machine["load_1min"], *other.machine["load_1min"]]},
            seconds=self.seconds + other.seconds,
            profiles=self.profiles + other.profiles,
            canary_ms=min((c for c in (self.canary_ms, other.canary_ms) if c is not None), default=None),
            calibration=[],
            check_point=None,
            in_model_points={},
        )

    def curve(self, node: str) -> LayerCurve | None:
        signature = self.layers.get(node)
        return self.curves[signature] if signature is not None else None

    def check(self, model_sha256: str | None, provider: str | None = None, batch: int | None = None) -> None:
        """Refuse a table measured for another model, or with another execution provider or batch than
        those given (None: any)."""
        if model_sha256 and self.model_sha256 and model_sha256 != self.model_sha256:
            raise PlanError(
                f"the latency table was measured on another model (sha256 {self.model_sha256[:12]}, this "
                f"one is {model_sha256[:12]}); run graphprune profile on this model."
            )
        if provider is not None and provider != self.provider:
            raise PlanError(
                f"the latency table was measured with provider {self.provider}, not {provider}; profile "
                f"with --provider {provider}."
            )
        if batch is not None and batch != self.batch:
            raise PlanError(
                f"the latency table was measured at batch {self.batch}, not {batch}; profile with --batch "
                f"{batch}, or leave --batch out to plan for the table's."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": LUT_FORMAT,
            "model_sha256": self.model_sha256,
            "provider": self.provider,
            "batch": self.batch,
            "threads": self.threads,
            "machine": self.machine,
            "seconds": round(self.seconds, 2),
            "profiles": self.profiles,
            "canary_ms": self.canary_ms,
            "block": self.block,
            "end_to_end_ms": self.end_to_end_ms,
            "layers_sum_ms": self.layers_sum_ms,
            "other_ms": self.other_ms,
            "other_fixed_ms": self.other_fixed_ms,
            "in_model_ms": self.in_model_ms,
            "in_model_points": self.in_model_points,
            "sum_error": self.sum_error,
            "calibration": self.calibration,
            "fit": self.fit,
            "check_point": self.check_point,
            "check_error": self.check_error,
            "layers": self.layers,
            "curves": {sig: asdict(curve) for sig, curve in self.curves.items()},
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LatencyTable:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: not a readable latency table ({exc}).") from exc
        if not isinstance(data, dict) or data.get("format") != LUT_FORMAT:
            raise PlanError(f"{path}: not a graphprune latency table (expected format {LUT_FORMAT!r}).")
        return cls(
            model_sha256=data["model_sha256"],
            provider=data["provider"],
            batch=int(data["batch"]),
            threads=data["threads"],
            end_to_end_ms=float(data["end_to_end_ms"]),
            layers=dict(data["layers"]),
            curves={sig: LayerCurve(**curve) for sig, curve in data["curves"].items()},
            machine=data.get("machine", {}),
            seconds=float(data.get("seconds", 0.0)),
            profiles=int(data.get("profiles", 1)),
            canary_ms=data.get("canary_ms"),
            block=int(data.get("block", 1)),
            other_ms=float(data.get("other_ms", 0.0)),
            other_fixed_ms=float(data.get("other_fixed_ms", 0.0)),
            in_model_ms={node: float(ms) for node, ms in data.get("in_model_ms", {}).items()},
            in_model_points={
                node: [(float(share), float(scale)) for share, scale in points]
                for node, points in data.get("in_model_points", {}).items()
            },
            calibration=[(float(a), float(b)) for a, b in data.get("calibration", [])],
            check_point=tuple(data["check_point"]) if data.get("check_point") else None,
        )


def sweep_widths(channels: int, multiple: int = 1, points: int = 24) -> list[int]:
    """Widths to time for a dimension of `channels`: multiples of `multiple` times a power of two,
    chosen so that about `points` widths are timed (at most), and the full width."""
    step = multiple << max(0, math.ceil(math.log2(max(channels / points / multiple, 1))))
    return sorted({*range(step, channels, step), channels})


@dataclass(frozen=True)
class Timing:
    """How a profile is timed: about `points` widths per swept dimension (a power-of-two step, and a
    multiple of `block`: the channel multiple the runtime's kernels need, probed when None), warm-up
    runs, timed runs per round (capped by `budget_s` for a layer, `whole_budget_s` for a whole model
    whose latency is known; None: never capped), rounds."""

    points: int = 24
    block: int | None = None
    warmup: int = 3
    runs: int = 15
    rounds: int = 3
    budget_s: float = 0.25
    whole_budget_s: float | None = 4.0

    def whole_runs(self, expected_ms: float | None = None) -> tuple[int, int]:
        """(warm-up, timed) runs of a whole model in a round: more than a layer's, its runs being few,
        but for a model expected to run `expected_ms` no more than fit in `whole_budget_s` (at least 2
        warm-up and MIN_WHOLE_RUNS timed): 29 runs of ResNet-50 at batch 32 took 35 s a round."""
        warmup, runs = self.warmup * 3, max(self.runs, 20)
        if expected_ms is None or self.whole_budget_s is None:
            return warmup, runs
        fit = int(self.whole_budget_s * 1e3 / max(expected_ms, 1e-3))
        return min(warmup, max(2, fit // 4)), min(runs, max(MIN_WHOLE_RUNS, fit))


# Timed runs of a whole model in a round, at the least: its median is what the timers compare.
MIN_WHOLE_RUNS = 5


def profile_model(
    model: ModelLike,
    layers: Sequence[LayerSpec],
    *,
    provider: str = "cpu",
    batch: int = 1,
    threads: int | None = None,
    timing: Timing | None = None,
    model_sha256: str | None = None,
    measure: Callable[[ModelLike, int], float] | None = None,
) -> LatencyTable:
    """Time every distinct layer signature at its grid of widths, and the whole model.

    `measure(model, batch)` -> ms replaces the timing of the whole model and of each isolated layer
    (tests inject known costs through it); by default both run in onnxruntime with `provider` and
    `threads`.
    """
    timing = timing or Timing()
    start = time.perf_counter()
    loads = [os.getloadavg()[0]]

    def whole_ms(m: ModelLike, b: int, expected_ms: float | None = None) -> float:
        if measure is not None:
            return measure(m, b)
        wholes = measure_wholes(
            [m], provider=provider, batch=b, threads=threads, timing=timing, expected_ms=expected_ms
        )
        return wholes[0]

    whole = [whole_ms(model, batch)]
    if timing.block is None:
        timing = replace(timing, block=alignment_block(whole_ms, batch))
    by_signature: dict[str, LayerSpec] = {}
    for spec in layers:
        by_signature.setdefault(spec.signature, spec)
    points = sum(len(_points(spec, timing)) for spec in by_signature.values())
    log.info("profiling %d layers, %d signatures, %d points", len(layers), len(by_signature), points)
    canary = _Canary(measure) if measure is not None else _Canary.timed(provider, threads)
    # on the CPU every signature is timed once per pass, so that a burst of load shorter than a pass
    # slows one of each layer's rounds at most; a CUDA layer keeps its session open for its rounds
    passes, per_pass = (timing.rounds, 1) if provider == "cpu" else (1, timing.rounds)
    best: dict[str, dict[tuple[int, int], float]] = {sig: {} for sig in by_signature}
    fast: set[str] = set()  # signatures timed in at least one pass between two fast canary readings
    noise = _Noise()

    def time_pass(signature: str, index: int) -> None:
        with canary.watch() as watched:
            times = _time_points(
                by_signature[signature],
                provider,
                batch,
                threads,
                replace(timing, rounds=per_pass),
                measure,
                index,
                noise,
            )
        for pair, ms in times.items():
            best[signature][pair] = min(ms, best[signature].get(pair, math.inf))
        if not watched.slow:
            fast.add(signature)
        bar.update(len(times))

    with tqdm(total=points * passes, desc="profile", unit="pt", disable=None, leave=False) as bar:
        for index in range(passes):
            for signature in by_signature:
                time_pass(signature, index)
        slow = [sig for sig in by_signature if sig not in fast]
        timed_slow = len(slow)
        for extra in range(CANARY_RETIMES):
            if not slow:
                break
            canary.wait()
            bar.total += sum(len(_points(by_signature[sig], timing)) for sig in slow)
            for signature in slow:
                time_pass(signature, passes + extra)
            slow = [sig for sig in slow if sig not in fast]
    if timed_slow:
        log.info(
            "%d of %d signatures had every pass beside a slow canary (last readings %s ms, fastest "
            "%.3f): timed again, each point at its fastest; %d still slow",
            timed_slow,
            len(by_signature),
            canary.readings[-3:],
            canary.fastest,
            len(slow),
        )
    curves = {sig: _curve(by_signature[sig], best[sig]) for sig in by_signature}
    whole.append(whole_ms(model, batch, expected_ms=min(whole)))
    # CUDA kernels run asynchronously to the host: there the other ops are left to the whole's fit
    kernels = (
        kernel_profile(model, batch=batch, threads=threads, timing=timing, expected_ms=min(whole))
        if provider == "cpu" and measure is None
        else {}
    )
    in_model, pace = paced_layer_ms(
        model, kernels, {spec.node: curves[spec.signature].full_ms for spec in layers}
    )
    other, other_fixed = (ms / pace for ms in other_kernel_time(kernels))
    loads.append(os.getloadavg()[0])
    table = LatencyTable(
        model_sha256=model_sha256,
        provider=provider,
        batch=batch,
        threads=threads,
        end_to_end_ms=min(whole),
        block=timing.block or 1,
        other_ms=other,
        other_fixed_ms=other_fixed,
        in_model_ms=in_model,
        layers={spec.node: spec.signature for spec in layers},
        curves=curves,
        canary_ms=canary.fastest,
        machine={
            "host": platform.node(),
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "load_1min": loads,
            "signatures_timed_slow": timed_slow,
            "kernel_profile_pace": pace,
        },
        seconds=time.perf_counter() - start,
    )
    log.info(
        "whole model %.3f ms, layers sum to %.3f ms (%+.1f%%)",
        table.end_to_end_ms,
        table.layers_sum_ms,
        100 * table.sum_error,
    )
    return table


# The canary: a small conv chain timed before and after each layer's pass.  A neighbour's load slows small
# kernels most (a 32-wide 3x3 chain at 28x28 ran 0.20 ms on a quiet machine, 0.24-0.39 ms beside one
# busy loop; a mobilenet_v2 profile taken beside a neighbour had its narrow layers up to 2x slow), so
# a signature beside a canary read this much slower than its fastest is timed again, up to
# CANARY_RETIMES times, after waiting up to CANARY_WAIT_S for the canary to read fast.
CANARY_WIDTH = 32
CANARY_SLOW = 1.1
CANARY_RETIMES = 2
CANARY_WAIT_S = 5.0


class _Canary:
    """Times the probe chain (ms, batch 1); `watch()` brackets a stretch of profiling and says whether
    the machine ran slow at either end of it."""

    def __init__(self, measure: Callable[[ModelLike, int], float], baseline: float | None = None) -> None:
        self.graph = probe_chain(CANARY_WIDTH)
        self.measure = measure
        self.baseline = baseline
        self.readings: list[float] = []

    @classmethod
    def timed(cls, provider: str, threads: int | None, baseline: float | None = None) -> _Canary:
        """The canary timed by onnxruntime; `baseline`: a fastest reading taken earlier (a profile's)."""
        return cls(
            lambda m, b: (
                bench(
                    m, batch=b, threads=threads, provider=provider, warmup=3, runs=15, show_progress=False
                ).median_ms
            ),
            baseline,
        )

    @property
    def fastest(self) -> float:
        return min(self.readings + ([] if self.baseline is None else [self.baseline]))

    def read(self) -> float:
        self.readings.append(round(self.measure(self.graph, 1), 4))  # ~5 ms at 0.2 ms a run
        return self.readings[-1]

    def is_slow(self, reading: float) -> bool:
        return reading > CANARY_SLOW * self.fastest

    @contextlib.contextmanager
    def watch(self) -> Iterator[_Watched]:
        """Slow when the reading before the stretch (the last one, if any) or the one after it is."""
        watched = _Watched(self.is_slow(self.readings[-1] if self.readings else self.read()))
        yield watched
        watched.slow = self.is_slow(self.read()) or watched.slow

    def wait(self) -> None:
        """Return once the canary reads fast, or after CANARY_WAIT_S."""
        deadline = time.perf_counter() + CANARY_WAIT_S
        while self.is_slow(self.read()) and time.perf_counter() < deadline:
            time.sleep(0.5)


@dataclass
class _Watched:
    slow: bool


def _points(spec: LayerSpec, timing: Timing) -> list[tuple[int, int]]:
    """(in_width, out_width) pairs to time; the full pair last."""
    full = (spec.in_channels, spec.out_channels)
    block, count = timing.block or 1, timing.points
    # whole kernel blocks per conv group: onnxruntime's NCHWc kernels take a grouped conv only then, and
    # otherwise surround it with layout reorders (RegNet's 16-channel conv groups cut to 8 cost more in
    # reorders than they saved); a tied layer's group count follows its width
    per_group = block * (1 if spec.tied else spec.group)

    def widths(channels: int, multiple: int) -> list[int]:
        return sweep_widths(channels, math.lcm(per_group, multiple), count)

    outs = widths(spec.out_channels, spec.out_multiple)
    if spec.tied:
        return [(spec.in_width(w), w) for w in outs] if spec.sweep_out else [full]
    ins = widths(spec.in_channels, spec.in_multiple)
    pairs = []
    if spec.sweep_out:
        pairs += [(spec.in_channels, w) for w in outs[:-1]]
    if spec.sweep_in:
        pairs += [(w, spec.out_channels) for w in ins[:-1]]
    return [*pairs, full]


# Chain widths of the alignment probe: 64 and widths whose largest power-of-two divisor is 1 ... 16.
PROBE_WIDTHS = (64, 63, 62, 60, 56, 48)
# A width is penalised when it runs this much slower than its share of the 64-wide chain's MACs.
PROBE_PENALTY = 1.15


def alignment_block(measure: Callable[[ModelLike, int], float], batch: int) -> int:
    """The channel multiple below which the runtime's conv kernels fall back to slower paths
    (onnxruntime's CPU NCHWc kernels work on 8 or 16 channels, and a ragged layer inside a model also
    breaks their layout with reorders, which a layer timed alone does not show).  Timed on chains of
    three 3x3 convs at widths aligned to 1, 2, 4, 8, 16: the smallest alignment from which no width is
    slower than its share of the 64-wide chain."""
    times = {w: measure(probe_chain(w), batch) for w in PROBE_WIDTHS}
    base = times[64]
    penalised = {w & -w for w in PROBE_WIDTHS[1:] if times[w] > PROBE_PENALTY * base * (w / 64) ** 2}
    block = max(penalised, default=0) * 2 or 1
    log.info(
        "alignment probe: %s ms -> widths in multiples of %d",
        {w: round(t, 3) for w, t in times.items()},
        block,
    )
    return block


def probe_chain(width: int, size: int = 28) -> onnx.ModelProto:
    """Three 3x3 convs (bias, Relu between) of `width` channels on a size x size input."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    for index in range(3):
        weight = rng.standard_normal((width, width, 3, 3)).astype(np.float32) * 0.05
        inits += [
            numpy_helper.from_array(weight, f"w{index}"),
            numpy_helper.from_array(np.zeros(width, np.float32), f"b{index}"),
        ]
        nodes.append(
            helper.make_node("Conv", [x, f"w{index}", f"b{index}"], [f"c{index}"], pads=[1, 1, 1, 1])
        )
        x = f"c{index}"
        if index < 2:
            nodes.append(helper.make_node("Relu", [x], [f"r{index}"]))
            x = f"r{index}"
    graph = helper.make_graph(
        nodes,
        f"alignment probe {width}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width, size, size])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _time_points(
    spec: LayerSpec,
    provider: str,
    batch: int,
    threads: int | None,
    timing: Timing,
    measure: Callable[[ModelLike, int], float] | None,
    first_round: int,
    noise: _Noise | None = None,
) -> dict[tuple[int, int], float]:
    """The layer at each of its (input, output) width pairs, timed in `timing.rounds` interleaved rounds
    (numbered from `first_round`): each pair's fastest round (ms)."""
    pairs = _points(spec, timing)
    noise = noise or _Noise()
    if measure is not None:
        return {pair: measure(layer_graph(spec, *pair, noise), batch) for pair in pairs}
    with tempfile.TemporaryDirectory(prefix="graphprune-profile-") as folder:
        timers = {
            pair: _LayerTimer(
                spec,
                pair,
                provider,
                batch,
                threads,
                Path(folder) / f"p{i}" if provider == "cpu" else None,
                noise,
            )
            for i, pair in enumerate(pairs)
        }
        for round_index in range(first_round, first_round + timing.rounds):
            for timer in timers.values():
                timer.run_round(timing, round_index)
        return {pair: timer.best() for pair, timer in timers.items()}


def _curve(spec: LayerSpec, best: dict[tuple[int, int], float]) -> LayerCurve:
    """The signature's curve from its timed width pairs (`best`: pair -> ms)."""
    curve = LayerCurve(full_ms=best[spec.in_channels, spec.out_channels])
    if spec.tied:  # one width: the output's (the input's follows it)
        by_out = sorted((p[1], ms) for p, ms in best.items())
        curve.out_widths, curve.out_ms = [w for w, _ in by_out], [ms for _, ms in by_out]
        return curve
    pairs = list(best)
    outs = sorted((p[1], best[p]) for p in pairs if p[0] == spec.in_channels)
    ins = sorted((p[0], best[p]) for p in pairs if p[1] == spec.out_channels)
    curve.out_widths, curve.out_ms = [w for w, _ in outs], [t for _, t in outs]
    curve.in_widths, curve.in_ms = [w for w, _ in ins], [t for _, t in ins]
    return curve


# onnxruntime's layout changes (plain NCHW <-> its blocked NCHWc) around an isolated layer; inside a
# model they stand at layout boundaries only, which the whole model's fit accounts for.
LAYOUT_OPS = ("ReorderInput", "ReorderOutput")


class _LayerTimer:
    """One isolated layer at one (input, output) width pair, timed in rounds; `best()` is the fastest
    round's median (ms).

    On the CPU a run's time is what onnxruntime's profiler records for the layer's own kernels
    (`profile_prefix` given). An isolated layer's wall time also holds the run's fixed cost, the layout
    reorders of its input and output and the wake-up of idle worker threads, which the layer does not pay
    inside a model: a 16-channel 3x3 depthwise conv at 112x112 took 0.14 ms wall, 0.03 ms of kernel
    time, and 0.03 ms inside MobileNetV3 (2 threads).  On CUDA, where kernels run asynchronously to
    the host, it is the run's wall time.

    On the CPU each round opens its own session and closes it after: while other sessions are open
    (each with its own idle worker threads), a 2-thread session's worker often joins its kernels too
    late, and the session runs at its 1-thread speed for good.  With 16 sessions of one 1x1 conv open,
    half timed 0.23 ms, the others 0.12 ms; opened one at a time, all timed 0.12 ms, as the conv runs
    inside its model.  A CUDA session (whose kernels the CPU threads only launch) is opened once."""

    def __init__(
        self,
        spec: LayerSpec,
        pair: tuple[int, int],
        provider: str,
        batch: int,
        threads: int | None,
        profile_prefix: Path | None,
        noise: _Noise,
    ) -> None:
        self.graph = layer_graph(spec, *pair, noise)
        self.provider, self.threads, self.profile_prefix = provider, threads, profile_prefix
        self.feed = {"x": noise(_input_shape(spec, batch, pair[0]))}
        self.kept_open = None if provider == "cpu" else self._open(None)
        self.medians: list[float] = []  # per round: its median run (ms)

    def _open(self, round_index: int | None) -> ort.InferenceSession:
        prefix = None if self.profile_prefix is None else f"{self.profile_prefix}r{round_index}"
        return make_session(self.graph, provider=self.provider, threads=self.threads, profile_prefix=prefix)

    def run_round(self, timing: Timing, index: int) -> None:
        session = self.kept_open or self._open(index)
        run = runner(session, self.feed, self.provider)
        warmup = timing.warmup if index == 0 or self.kept_open is None else 1
        for _ in range(warmup):
            run()
        walls = []
        deadline = time.perf_counter() + timing.budget_s
        while len(walls) < timing.runs and (len(walls) < 3 or time.perf_counter() < deadline):
            begin = time.perf_counter()
            run()
            walls.append((time.perf_counter() - begin) * 1e3)
        if self.profile_prefix is None:
            times = np.asarray(walls)
        else:
            path = Path(session.end_profiling())
            times = kernel_times(json.loads(path.read_text()), warmup + len(walls))[warmup:]
            path.unlink()
        self.medians.append(float(np.median(times)))

    def best(self) -> float:
        return min(self.medians)


def kernel_times(events: list[dict[str, Any]], runs: int) -> np.ndarray:
    """Per run, in order, the summed duration (ms) of its node kernels bar the layout reorders
    (LAYOUT_OPS), from the events of an onnxruntime profile (a run is one `model_run` event; its nodes
    start inside it)."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    if len(starts) != runs:
        raise RuntimeError(f"the onnxruntime profile holds {len(starts)} runs, {runs} were made")
    totals = np.zeros(runs)
    for event in events:
        if _is_kernel(event) and event.get("args", {}).get("op_name") not in LAYOUT_OPS:
            totals[int(np.searchsorted(starts, event["ts"], side="right")) - 1] += event["dur"]
    return np.maximum(totals, 1.0) / 1e3  # the profiler counts whole microseconds


def _is_kernel(event: dict[str, Any]) -> bool:
    """Whether an onnxruntime profile event is a node's kernel run (not its fences or a session event)."""
    return event.get("cat") == "Node" and event["name"].endswith("_kernel_time")


# onnxruntime's kernels of weighted layers (as its CPU profiler names them, fused or not).
WEIGHTED_KERNELS = ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


@dataclass(frozen=True)
class Kernel:
    """One node kernel of a whole model as onnxruntime's CPU profiler saw it over the timed runs."""

    op: str
    ms: float  # median over the runs
    bytes: int  # read and written


def node_kernels(events: list[dict[str, Any]], warmup: int) -> dict[str, Kernel]:
    """The node kernels of a profile's runs after the first `warmup`, by kernel name."""
    by_node: dict[str, list[dict[str, Any]]] = {}
    for event in filter(_is_kernel, events):
        by_node.setdefault(event["name"], []).append(event)
    kernels = {}
    for name, node_events in by_node.items():
        timed = node_events[warmup:] or node_events
        args = timed[0].get("args", {})
        kernels[name] = Kernel(
            op=args.get("op_name", ""),
            ms=float(np.median([event["dur"] for event in timed])) / 1e3,
            bytes=int(args.get("activation_size", 0)) + int(args.get("output_size", 0)),
        )
    return kernels


def kernel_profile(
    model: ModelLike, *, batch: int, threads: int | None, timing: Timing, expected_ms: float | None = None
) -> dict[str, Kernel]:
    """The whole model's node kernels (CPU) in the fastest (least kernel time) of `timing.rounds`
    profiled sessions, each of `timing.whole_runs(expected_ms)` runs.  Each round opens its own
    session: one session's runs at times all ran at half speed (its worker thread joining late, as
    `_LayerTimer` describes)."""
    warmup, runs = timing.whole_runs(expected_ms)
    rounds = []
    for index in range(timing.rounds):
        with tempfile.TemporaryDirectory(prefix="graphprune-profile-") as folder:
            session = make_session(
                model, provider="cpu", threads=threads, profile_prefix=Path(folder) / f"whole{index}"
            )
            run = runner(session, input_feed(model, batch, seed=0), "cpu")
            for _ in range(warmup + runs):
                run()
            rounds.append(node_kernels(json.loads(Path(session.end_profiling()).read_text()), warmup))
    return min(rounds, key=lambda kernels: sum(kernel.ms for kernel in kernels.values()))


def pruned_in_model_scales(
    model: ModelLike,
    alone_ms: dict[str, float],
    *,
    batch: int,
    threads: int | None,
    timing: Timing,
    expected_ms: float | None = None,
) -> dict[str, float]:
    """Each layer's in-model scale inside a pruned copy of a model (CPU): its kernel time in the copy's
    `kernel_profile`, at that profile's pace (kernel_pace), over its time alone at the copy's widths
    (`alone_ms`, by layer node)."""
    kernels = kernel_profile(model, batch=batch, threads=threads, timing=timing, expected_ms=expected_ms)
    in_model, _ = paced_layer_ms(model, kernels, alone_ms)
    return {node: ms / alone_ms[node] for node, ms in in_model.items() if alone_ms[node] > 0}


def paced_layer_ms(
    model: ModelLike, kernels: dict[str, Kernel], alone_ms: dict[str, float]
) -> tuple[dict[str, float], float]:
    """The layers' kernel times (ms) in a whole model's `kernel_profile`, divided by that profile's pace
    against their times alone (`alone_ms`, by layer node; kernel_pace), and the pace."""
    in_model = layer_kernel_ms(model, list(alone_ms), kernels)
    pace = kernel_pace(in_model, alone_ms)
    return {node: ms / pace for node, ms in in_model.items()}, pace


def fixed_kernel_cost(kernels: Sequence[Kernel]) -> float:
    """What each of these kernels costs (ms) whatever its tensors' size: the intercept of a
    least-squares line through their times against the bytes they read and write, kept between 0 and
    the fastest one's time."""
    if len(kernels) < 2 or len({kernel.bytes for kernel in kernels}) < 2:
        return 0.0
    _, intercept = np.polyfit([k.bytes for k in kernels], [k.ms for k in kernels], 1)
    return float(np.clip(intercept, 0.0, min(kernel.ms for kernel in kernels)))


def kernel_pace(in_model_ms: dict[str, float], alone_ms: dict[str, float]) -> float:
    """How much slower the whole model's kernel profile ran than the layers timed alone: the median
    (weighted by time) of the layers' in-model/alone ratios, 1 without any.  Most layers run inside the
    model as fast as alone, so this is the machine's pace during the kernel profile (which no canary
    watches: one taken in a neighbour's spell ran every kernel 1.6x slow), and dividing by it keeps
    only what the model itself does to a layer."""
    nodes = [node for node in in_model_ms if alone_ms.get(node, 0) > 0]
    if not nodes:
        return 1.0
    ratios = np.array([in_model_ms[node] / alone_ms[node] for node in nodes])
    weights = np.array([alone_ms[node] for node in nodes])
    order = np.argsort(ratios)
    middle = np.searchsorted(np.cumsum(weights[order]), weights.sum() / 2)
    return float(ratios[order][min(middle, len(nodes) - 1)])


def other_kernels(kernels: dict[str, Kernel]) -> list[Kernel]:
    """A whole model's kernels outside its weighted layers (WEIGHTED_KERNELS)."""
    return [kernel for kernel in kernels.values() if kernel.op not in WEIGHTED_KERNELS]


def other_kernel_time(kernels: dict[str, Kernel]) -> tuple[float, float]:
    """(total, fixed): a whole model's kernel time (ms) outside its weighted layers (activations,
    elementwise ops, pooling, layout reorders), from its `kernel_profile`, and the part of it paid per
    kernel whatever its tensors' size.

    These ops scale with the activations' size, not with the layers' time (an EfficientNet plan that
    keeps its wide expansions keeps most of their Swish and squeeze-excite cost), but each kernel also
    costs a few microseconds of dispatch that no pruning removes: EfficientNet-B0's 138 such kernels
    took 2.25 ms at batch 1 (2 threads), 4.3 us each plus 58 ns per element read and written."""
    others = other_kernels(kernels)
    total = sum(kernel.ms for kernel in others)
    return total, min(total, fixed_kernel_cost(others) * len(others))


# How many single-reader ops after a layer onnxruntime may fuse into its kernel (BatchNormalization,
# an activation, a residual Add), whose output then names an NCHWc kernel.
FUSED_CHAIN = 3


def layer_kernel_ms(model: ModelLike, nodes: Sequence[str], kernels: dict[str, Kernel]) -> dict[str, float]:
    """Each layer node's kernel time (ms) in a whole model's `kernel_profile`, where its kernel is found.

    onnxruntime names a kernel after its node (a conv with a fused activation too), and a blocked
    (NCHWc) conv after the tensor it writes with `_nchwc` appended: the layer's own output, or that of
    an op it fused (a BatchNormalization, an activation, a residual Add after it)."""
    if not kernels:
        return {}
    graph = (
        model if isinstance(model, onnx.ModelProto) else onnx.load(model, load_external_data=False)
    ).graph
    by_name = {node.name: node for node in graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    weighted = {name: kernel for name, kernel in kernels.items() if kernel.op in WEIGHTED_KERNELS}
    found = {}
    for name in nodes:
        node = by_name[name]
        candidates = [f"{name}_kernel_time"]
        for _ in range(FUSED_CHAIN + 1):
            candidates.append(f"{node.output[0]}_nchwc_kernel_time")
            following = readers.get(node.output[0], [])
            if len(following) != 1 or following[0].op_type in PROFILED_OPS:
                break
            node = following[0]
        kernel = next((weighted.pop(c) for c in candidates if c in weighted), None)
        if kernel is not None:
            found[name] = kernel.ms
    return found


def _input_shape(spec: LayerSpec, batch: int, in_width: int) -> tuple[int, ...]:
    if spec.op == "Conv":
        return (batch, in_width, *spec.leading)
    return (batch, *spec.leading, in_width)


class _Noise:
    """Standard normal float32 values of any shape, views of one seeded buffer grown on demand: a
    profile builds its layers' weights and inputs once per pass, and drawing them anew each time cost
    as much as a third of a batch-1 profile."""

    def __init__(self) -> None:
        self.buffer = np.empty(0, dtype=np.float32)

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        count = math.prod(shape)
        if count > self.buffer.size:
            self.buffer = np.random.default_rng(0).standard_normal(count, dtype=np.float32)
        return self.buffer[:count].reshape(shape)


def layer_graph(
    spec: LayerSpec, in_width: int, out_width: int, noise: _Noise | None = None
) -> onnx.ModelProto:
    """The layer alone at the given widths, random weights (from `noise`), input `x` with a symbolic
    batch."""
    noise = noise or _Noise()
    shape: list[int | str] = ["N", *_input_shape(spec, 1, in_width)[1:]]
    inputs = ["x", "w"] + (["b"] if spec.bias else [])
    attributes = dict(spec.attributes)
    if spec.op == "Conv":
        group = spec.groups_at(in_width)
        weight = (out_width, in_width // group, *attributes.get("kernel_shape", ()))
        nodes = [helper.make_node("Conv", inputs, ["y"], group=group, **attributes)]
    elif spec.op == "Gemm":
        weight = (out_width, in_width)
        nodes = [helper.make_node("Gemm", inputs, ["y"], transB=1)]
    else:  # MatMul, with its bias as a separate Add (as exporters write a Linear on 3-D inputs)
        weight = (in_width, out_width)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["m" if spec.bias else "y"])]
        if spec.bias:
            nodes.append(helper.make_node("Add", ["m", "b"], ["y"]))
    inits = [numpy_helper.from_array(noise(weight) * np.float32(0.1), "w")]
    if spec.bias:
        inits.append(numpy_helper.from_array(noise((out_width,)), "b"))
    graph = helper.make_graph(
        nodes,
        f"layer {spec.signature}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# A timing of whole models given the machine's quiet canary reading counts only its rounds between two
# fast readings, running up to this many times its rounds to get them: in a neighbour's slow spell a
# pruned mobilenet_v2 slowed more than its original (batch 32: its share read 0.46 in the feedback's 3
# rounds, 0.37 in 5 later rounds), which comparing the two in the same rounds does not cancel.
QUIET_ROUNDS_LIMIT = 3


class WholeTimer:
    """Whole models timed together in rounds (each round benches every model in turn), each round
    bracketed by canary readings when `canary_ms` (a profile's quiet reading) is given.  A model's
    latency is its fastest round's median, so a burst of load on a shared machine cannot favour one
    model over another; with the canary only clean rounds (a fast reading on both sides) count.
    `done` once `timing.rounds` rounds count, or, short of clean ones, after QUIET_ROUNDS_LIMIT times
    as many.  A round's runs of a model follow `timing.whole_runs` at its last round's median, or at
    `expected_ms` (an upper bound on every model's latency) before its first."""

    def __init__(
        self,
        models: Sequence[ModelLike],
        *,
        provider: str = "cpu",
        batch: int = 1,
        threads: int | None = None,
        timing: Timing | None = None,
        canary_ms: float | None = None,
        expected_ms: float | None = None,
    ) -> None:
        self.models, self.provider, self.batch, self.threads = list(models), provider, batch, threads
        self.timing = timing or Timing()
        self.expected_ms = expected_ms
        self.canary = _Canary.timed(provider, threads, canary_ms) if canary_ms else None
        self.medians: list[list[float]] = []  # per round, per model (ms)
        self.loads: list[float] = []  # per round: the 1-minute load average as it began
        self.clean: list[bool] = []  # per round: no slow canary reading on either side

    @property
    def done(self) -> bool:
        rounds = self.timing.rounds
        if len(self.medians) < rounds:
            return False
        return (
            self.canary is None
            or sum(self.clean) >= rounds
            or len(self.medians) >= QUIET_ROUNDS_LIMIT * rounds
        )

    def time_round(self) -> None:
        expected = self.medians[-1] if self.medians else [self.expected_ms] * len(self.models)
        self.loads.append(os.getloadavg()[0])
        watching = self.canary.watch() if self.canary is not None else contextlib.nullcontext(_Watched(False))
        with watching as watched:
            self.medians.append([self._median(m, ms) for m, ms in zip(self.models, expected, strict=True)])
        self.clean.append(not watched.slow)

    def _median(self, model: ModelLike, expected_ms: float | None) -> float:
        warmup, runs = self.timing.whole_runs(expected_ms)
        return bench(
            model,
            batch=self.batch,
            threads=self.threads,
            provider=self.provider,
            warmup=warmup,
            runs=runs,
            show_progress=False,
        ).median_ms

    def fastest(self) -> list[float]:
        """Each model's fastest counted round's median (ms): the clean rounds, or every round (with a
        warning) when none was clean."""
        if not any(self.clean):
            log.warning(
                "the machine ran slow (canary %.3f ms against %.3f when profiled) through all %d timing "
                "rounds: timings of pruned models may read slow",
                self.canary.readings[-1] if self.canary else math.nan,
                self.canary.baseline if self.canary else math.nan,
                len(self.medians),
            )
        kept = [times for times, ok in zip(self.medians, self.clean, strict=True) if ok] or self.medians
        return np.min(kept, axis=0).tolist()


def measure_wholes(models: Sequence[ModelLike], **settings: Any) -> list[float]:
    """Whole models' latencies (ms): a WholeTimer (same settings) run until done."""
    timer = WholeTimer(models, **settings)
    while not timer.done:
        timer.time_round()
    return timer.fastest()


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()
