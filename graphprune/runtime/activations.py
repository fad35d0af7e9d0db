"""Per-channel activation statistics from calibration data, streamed through onnxruntime.

Which tensors are judged is decided above this layer (graphprune.criteria.tensors); here they are plain
`JudgedTensor` descriptions, so the runtime knows nothing of groups or atoms.

Capture happens in one session run per batch, in a worker thread, so onnxruntime computes the next
batch while the last one is folded.  The per-image, per-channel means the statistics need
(of a, |a|, a^2 and of a == 0) are added to a copy of the graph as GlobalAveragePool nodes reading the
map, Mul(a, a), and Abs(a) / Equal(a, 0) where needed, concatenated into one [N, columns] output, so
onnxruntime computes them with its own threads right after each map is produced and only that array
comes back; full maps come back only while HRank still needs images.  A non-negative map (after a
ReLU, say) pools a once for both mean a and mean |a|, and, in float32, gets its zeros from an exact
0-or-constant mark per value (`NONZERO_MARK`) that a 1x1 Conv computes, so onnxruntime keeps the map
in its fast blocked layout instead of converting it back for Equal.  The arrays are folded in batch by
batch, every tensor's channels side by side (sums, Chan's parallel mean/M2 merge, fixed-bin
histograms; rank sums per tensor), so memory is bounded by two batches (one folded, one computed)
whatever the number of samples.  Every image weighs the same (calibration images share one size).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime import InferenceSession, NodeArg

from graphprune.errors import CalibrationError
from graphprune.onnxutil import opset_of
from graphprune.runtime.progress import progress as progress_bar
from graphprune.runtime.session import make_session

if TYPE_CHECKING:
    from graphprune.data.dataset import ArrayDataset

log = logging.getLogger(__name__)

STATISTICS = ("mean_abs", "apoz", "variance", "entropy", "hrank")
# The per-image channel means (computed in the graph) each statistic is folded from.
REDUCTIONS = {"mean_abs": ("abs",), "apoz": ("zeros",), "variance": ("mean", "square"), "entropy": ("mean",)}
# Entropy histograms span the first batch's range widened by this many spans on each side; values
# beyond land in the end bins, so a histogram has (1 + 2 * HISTOGRAM_MARGIN) * bins bins at most.
HISTOGRAM_MARGIN = 2
# The output of summary_model: every per-image channel mean, [N, columns, 1, 1].
STATS_OUTPUT = "graphprune_stats"
# min(POSITIVE_SCALE * a, NONZERO_MARK) is NONZERO_MARK for every positive float32 a (the smallest,
# 2^-149, times 2^127 is 2^-22; an overflow to inf is clipped too) and 0 for a == 0, so the mean of these
# marks is exactly NONZERO_MARK times the float32 mean of a != 0 (scaling by a power of two rounds alike).
POSITIVE_SCALE, NONZERO_MARK = 2.0**127, 2.0**-22
# The order of the kinds in STATS_OUTPUT, and the constants summary_model adds.
KINDS = ("mean", "abs", "square", "zeros")
_ZERO, _UNIT_AXES, _MARK = "graphprune_stats_zero", "graphprune_stats_unit", "graphprune_stats_mark"
_ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class JudgedTensor:
    """A feature map whose channels are measured: its channel axis, rank and channel count, and whether
    the op producing it never outputs a negative value (graphprune.criteria.tensors chooses them)."""

    name: str
    axis: int
    rank: int
    channels: int
    nonnegative: bool


@dataclass
class ChannelStats:
    """Per-channel statistics of one tensor.

    mean_abs: mean |a| over every value of the channel.  apoz: fraction of values exactly zero (Average
    Percentage of Zeros).  variance: population variance (Chan's parallel merge of per-image means and
    variances).  entropy: the Shannon entropy (bits) of the channel's per-image mean, histogrammed in
    fixed bins of the width the first batch gives ((max - min) / bins over all its channels, anchored
    at its minimum).  hrank: the matrix rank of each image's feature map (H x rest), averaged over at
    most `rank_images` images (HRank).  Only the `statistics` asked for are computed.  The accumulators
    of the streaming statistics are this tensor's columns of the StreamingStats every judged tensor
    shares; HRank's are kept here.
    """

    tensor: str
    axis: int
    channels: int
    statistics: frozenset[str]
    rank_images: int | None = 128
    images: int = 0
    sum_abs: np.ndarray = field(init=False)
    zeros: np.ndarray = field(init=False)
    mean: np.ndarray = field(init=False)
    m2: np.ndarray = field(init=False)
    histogram: np.ndarray = field(init=False)
    rank_sum: np.ndarray = field(init=False)
    ranked: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.rank_sum = np.zeros(self.channels)

    def add_ranks(self, maps: np.ndarray) -> None:
        """Fold in the ranks of a batch of this tensor's maps (batch first), up to `rank_images` images."""
        x = np.moveaxis(maps, self.axis, 1)
        take = x.shape[0] if self.rank_images is None else min(x.shape[0], self.rank_images - self.ranked)
        rows = x.shape[2] if x.ndim >= 4 else 1
        maps = x[:take].reshape(take, self.channels, rows, -1).astype(np.float32)
        self.rank_sum += np.linalg.matrix_rank(maps).sum(axis=0)
        self.ranked += take

    # results -----------------------------------------------------------------------------------
    def value(self, statistic: str) -> np.ndarray:
        """One statistic per channel position (float64)."""
        if statistic not in self.statistics:
            raise CalibrationError(
                f"statistic {statistic!r} of tensor {self.tensor} was not collected; collect it with "
                f"statistics including {statistic!r}."
            )
        if statistic == "mean_abs":
            return self.sum_abs / max(self.images, 1)
        if statistic == "apoz":
            return self.zeros / max(self.images, 1)
        if statistic == "variance":
            return self.m2 / max(self.images, 1)
        if statistic == "entropy":
            p = self.histogram / max(self.images, 1)
            with np.errstate(divide="ignore", invalid="ignore"):
                return -np.where(p > 0, p * np.log2(p), 0.0).sum(axis=1)
        return self.rank_sum / max(self.ranked, 1)


class StreamingStats:
    """The accumulators of the streaming statistics of every judged tensor side by side, one column per
    channel, so a batch folds in with a few numpy calls whatever the number of tensors (sums, Chan's
    parallel mean/M2 merge, fixed-bin histograms); each of the `parts` gets views of its columns.

    columns: per kind, the columns of summary_model's output that hold it for the parts' channels in
    order; marked: which of the zeros columns hold marks (see NONZERO_MARK).
    """

    def __init__(
        self,
        parts: list[ChannelStats],
        columns: dict[str, np.ndarray],
        marked: np.ndarray,
        statistics: frozenset[str],
        bins: int,
    ) -> None:
        self.parts, self.statistics, self.bins, self.images = parts, statistics, bins, 0
        self.widths = np.array([part.channels for part in parts])
        self.starts = np.concatenate([[0], np.cumsum(self.widths)[:-1]])
        total = int(self.widths.sum())
        self.sum_abs, self.zeros, self.mean, self.m2 = (np.zeros(total) for _ in range(4))
        histogram_bins = bins * (1 + 2 * HISTOGRAM_MARGIN) if "entropy" in statistics else 0
        self.histogram = np.zeros((total, histogram_bins), dtype=np.int64)
        self.histogram_low = self.histogram_width = np.zeros(total)  # per column, set by the first batch
        for part, start in zip(parts, self.starts, strict=True):
            own = slice(start, start + part.channels)
            part.sum_abs, part.zeros, part.mean, part.m2, part.histogram = (
                self.sum_abs[own],
                self.zeros[own],
                self.mean[own],
                self.m2[own],
                self.histogram[own],
            )
        self.columns = {kind: _as_slice(index) for kind, index in columns.items()}
        # The fraction of zeros is 1 - marks / NONZERO_MARK in a marked column, the column itself elsewhere.
        self.zeros_offset = marked.astype(np.float64)
        self.zeros_scale = np.where(marked, -1.0 / NONZERO_MARK, 1.0)

    def update(self, means: np.ndarray) -> None:
        """Fold one batch of summary_model's per-image channel means ([N, columns]) in."""
        means = means.astype(np.float64)
        values = {kind: means[:, columns] for kind, columns in self.columns.items()}
        if "mean_abs" in self.statistics:
            self.sum_abs += values["abs"].sum(axis=0)
        if "apoz" in self.statistics:
            self.zeros += len(means) * self.zeros_offset + self.zeros_scale * values["zeros"].sum(axis=0)
        if "variance" in self.statistics:
            variances = np.square(values["mean"])
            np.subtract(values["square"], variances, out=variances)
            self._merge_moments(values["mean"], np.maximum(variances, 0.0, out=variances))
        if "entropy" in self.statistics:
            self._histogram(values["mean"])
        self.images += len(means)
        for part in self.parts:
            part.images = self.images

    def _merge_moments(self, means: np.ndarray, variances: np.ndarray) -> None:
        """Chan's merge with the per-image moments (every image weighs the same): M2 is kept per value."""
        n_batch = len(means)
        batch_mean = means.mean(axis=0)
        deviations = means - batch_mean
        batch_m2 = variances.sum(axis=0) + np.square(deviations, out=deviations).sum(axis=0)
        total = self.images + n_batch
        delta = batch_mean - self.mean
        self.mean += delta * (n_batch / total)
        self.m2 += batch_m2 + delta**2 * (self.images * n_batch / total)

    def _histogram(self, per_image: np.ndarray) -> None:
        """Bin the per-image means; the first batch sets each tensor's bin width and anchor."""
        channels, bins = self.histogram.shape
        if not self.images:
            low = np.minimum.reduceat(per_image.min(axis=0), self.starts)
            high = np.maximum.reduceat(per_image.max(axis=0), self.starts)
            width = np.where(high > low, (high - low) / self.bins, 1.0)
            self.histogram_width = np.repeat(width, self.widths)
            self.histogram_low = np.repeat(low - HISTOGRAM_MARGIN * self.bins * width, self.widths)
        index = per_image - self.histogram_low
        index /= self.histogram_width
        np.clip(np.floor(index, out=index), 0, bins - 1, out=index)
        flat = index.astype(np.int64)
        flat += np.arange(channels) * bins
        np.add.at(self.histogram.reshape(-1), flat.ravel(), 1)


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """A run of consecutive columns as a slice (taking it is a view, not a copy), other columns as is."""
    first = int(index[0])
    return slice(first, first + index.size) if np.array_equal(index, first + np.arange(index.size)) else index


def summary_model(
    source: onnx.ModelProto, judged: list[JudgedTensor], kinds: frozenset[str]
) -> tuple[onnx.ModelProto, dict[str, np.ndarray], np.ndarray]:
    """A copy of the analysed model with one more output, STATS_OUTPUT [N, columns, 1, 1]: per judged
    tensor, the per-image channel means of `kinds` (mean: a, abs: |a|, square: a^2, zeros: a == 0)
    computed by GlobalAveragePool (the channel axis moved to 1 first, a rank-2 tensor given unit spatial
    axes) and concatenated kind by kind; returns the model, per kind the columns that hold it for the
    tensors' channels in order, and which of the zeros columns hold marks.

    A non-negative map's mean |a| is its mean a, pooled once, and a non-negative float32 map's zeros
    columns hold marks instead: the means of min(POSITIVE_SCALE * a, NONZERO_MARK), from a Conv whose
    Clip onnxruntime fuses in.  Read only by GlobalAveragePool, Mul and Conv, a map stays in
    onnxruntime's blocked (NCHWc) layout, where Equal and Cast would first copy it back to NCHW; the
    pooled means are concatenated as they come, [N, C, 1, 1], since a Flatten would convert each too.
    """
    opset = opset_of(source)
    # Judged maps have their producer's element type, so all-float32 weights mean float32 maps.
    float32 = all(init.data_type == TensorProto.FLOAT for init in source.graph.initializer if _floating(init))
    model = onnx.ModelProto()
    model.CopyFrom(source)
    model.graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0.0, dtype=np.float32), _ZERO),
            numpy_helper.from_array(np.array([0, 0, 1, 1], dtype=np.int64), _UNIT_AXES),
            numpy_helper.from_array(np.array(NONZERO_MARK, dtype=np.float32), _MARK),
        ]
    )
    tensors = [t.name for t in judged]
    widths = {t.name: t.channels for t in judged}
    nodes: list[onnx.NodeProto] = []
    pooled: dict[tuple[str, str], str] = {}  # (kind, tensor) -> its per-image channel means [N, C, 1, 1]
    marked = set()
    for index, spec in enumerate(judged):
        tensor, p = spec.name, f"graphprune_stats_{index}"
        x, rank = _channels_first(spec, p, nodes)
        signed = not spec.nonnegative
        sources = {}  # kind -> the tensor GlobalAveragePool reads for it
        if kinds & {"mean", "square"} or ("abs" in kinds and not signed):
            sources["mean"] = x
        if "abs" in kinds and signed:
            nodes.append(helper.make_node("Abs", [x], [f"{p}_abs"]))
            sources["abs"] = f"{p}_abs"
        if "square" in kinds:
            nodes.append(helper.make_node("Mul", [x, x], [f"{p}_square"]))
            sources["square"] = f"{p}_square"
        if "zeros" in kinds and float32 and not signed and rank <= 5:  # Conv has at most 3 spatial axes
            marks, scale = _zero_marks(x, widths[tensor], rank, p, opset)
            nodes += marks
            model.graph.initializer.append(scale)
            sources["zeros"] = f"{p}_marks"
            marked.add(tensor)
        elif "zeros" in kinds:
            typed_zero = _ZERO
            if opset >= 15:  # CastLike gives the zero the tensor's own element type
                nodes.append(helper.make_node("CastLike", [_ZERO, x], [f"{p}_zero"]))
                typed_zero = f"{p}_zero"
            nodes += [
                helper.make_node("Equal", [x, typed_zero], [f"{p}_eq"]),
                helper.make_node("Cast", [f"{p}_eq"], [f"{p}_zeros"], to=TensorProto.FLOAT),
            ]
            sources["zeros"] = f"{p}_zeros"
        for kind, source in sources.items():
            piece = f"{p}_{kind}_means"
            nodes.append(helper.make_node("GlobalAveragePool", [source], [piece]))
            if rank != 4:
                nodes.append(helper.make_node("Reshape", [piece, _UNIT_AXES], [f"{piece}_4d"]))
                piece = f"{piece}_4d"
            if not float32:  # the pieces of a float16 or float64 model join as float64
                nodes.append(helper.make_node("Cast", [piece], [f"{piece}_64"], to=TensorProto.DOUBLE))
                piece = f"{piece}_64"
            pooled[kind, tensor] = piece
    starts: dict[tuple[str, str], int] = {}
    width = 0
    for key in sorted(pooled, key=lambda key: KINDS.index(key[0])):  # stable: tensors stay in order
        starts[key] = width
        width += widths[key[1]]
    if starts:
        nodes.append(helper.make_node("Concat", [pooled[key] for key in starts], [STATS_OUTPUT], axis=1))
    model.graph.node.extend(nodes)
    for tensor in tensors:
        if "abs" in kinds and ("abs", tensor) not in starts:  # a non-negative map: mean |a| is mean a
            starts["abs", tensor] = starts["mean", tensor]
    columns = {
        kind: np.concatenate([starts[kind, t] + np.arange(widths[t]) for t in tensors]) for kind in kinds
    }
    return model, columns, np.repeat([t in marked for t in tensors], [widths[t] for t in tensors])


def _zero_marks(
    x: str, channels: int, rank: int, prefix: str, opset: int
) -> tuple[list[onnx.NodeProto], onnx.TensorProto]:
    """Nodes computing `{prefix}_marks` = min(POSITIVE_SCALE * x, NONZERO_MARK) of a non-negative float32
    map (a 1x1 depthwise Conv and a Clip onnxruntime fuses into it), and the Conv's weight."""
    scale = numpy_helper.from_array(
        np.full((channels, *[1] * (rank - 1)), POSITIVE_SCALE, np.float32), f"{prefix}_scale"
    )
    conv = helper.make_node(
        "Conv", [x, scale.name], [f"{prefix}_scaled"], group=channels, kernel_shape=[1] * (rank - 2)
    )
    if opset >= 11:
        clip = helper.make_node("Clip", [f"{prefix}_scaled", _ZERO, _MARK], [f"{prefix}_marks"])
    else:  # Clip took its bounds as attributes
        clip = helper.make_node("Clip", [f"{prefix}_scaled"], [f"{prefix}_marks"], min=0.0, max=NONZERO_MARK)
    return [conv, clip], scale


def _floating(init: onnx.TensorProto) -> bool:
    return np.issubdtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type), np.floating)


def _channels_first(spec: JudgedTensor, prefix: str, nodes: list[onnx.NodeProto]) -> tuple[str, int]:
    """The tensor with its channel axis moved to 1 and a rank-2 tensor given unit spatial axes (the nodes
    doing so appended to `nodes`), and its rank then."""
    tensor, axis, rank = spec.name, spec.axis, spec.rank
    if axis != 1:
        perm = [0, axis, *(a for a in range(1, rank) if a != axis)]
        nodes.append(helper.make_node("Transpose", [tensor], [f"{prefix}_t"], perm=perm))
        tensor = f"{prefix}_t"
    if rank == 2:
        nodes.append(helper.make_node("Reshape", [tensor, _UNIT_AXES], [f"{prefix}_u"]))
        return f"{prefix}_u", 4
    return tensor, rank


def stream_statistics(
    source: onnx.ModelProto,
    judged: list[JudgedTensor],
    data: ArrayDataset | Iterable[np.ndarray | tuple[np.ndarray, ...]],
    *,
    statistics: Iterable[str] = STATISTICS,
    samples: int | None = None,
    batch_size: int = 64,
    bins: int = 32,
    rank_images: int | None = 128,
    provider: str = "cpu",
    threads: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, ChannelStats], int]:
    """Stream calibration data through the model once; the statistics of every judged tensor, and the
    number of images seen.

    data: an ArrayDataset, or any iterable of image batches (arrays, or tuples whose first item is the
    images).  samples: stop after this many images.  rank_images: images HRank looks at (None: all).
    Raises CalibrationError when the data does not fit the model input (rank, channels, spatial size,
    dtype) or holds no image.
    """
    wanted = frozenset(statistics)
    unknown = wanted - set(STATISTICS)
    if unknown:
        raise CalibrationError(
            f"unknown activation statistic(s) {sorted(unknown)}; choose from {', '.join(STATISTICS)}."
        )
    names = [t.name for t in judged]
    stats = {t.name: ChannelStats(t.name, t.axis, t.channels, wanted, rank_images) for t in judged}
    if not names:
        log.warning("no prunable group has a judged feature map; activation statistics are empty")
        return stats, 0
    kinds = frozenset(kind for statistic in wanted for kind in REDUCTIONS.get(statistic, ()))
    model, columns, marked = summary_model(source, judged, kinds)
    streaming = StreamingStats([stats[name] for name in names], columns, marked, wanted, bins)
    reduced = [STATS_OUTPUT] if kinds else []
    lean = make_session(model, provider=provider, threads=threads, extra_outputs=reduced)
    full = (
        make_session(model, provider=provider, threads=threads, extra_outputs=reduced + names)
        if "hrank" in wanted
        else None
    )
    model_input = _single_input(lean)
    static_batch = model_input.shape[0] if isinstance(model_input.shape[0], int) else None
    total = samples if samples is not None else (len(data) if hasattr(data, "__len__") else None)
    seen = sent_for_ranks = 0

    def fold(x: np.ndarray, fetch: list[str], outputs: list[np.ndarray]) -> None:
        values = dict(zip(fetch, outputs, strict=True))
        streaming.update(values[STATS_OUTPUT].reshape(len(x), -1) if kinds else np.empty((len(x), 0)))
        for name in names if len(fetch) > len(reduced) else ():
            stats[name].add_ranks(values[name])

    # onnxruntime runs batch k+1 in a worker thread (it releases the GIL) while batch k is folded here.
    with (
        progress_bar(total=total, unit="img", desc="calibration", enabled=progress) as bar,
        ThreadPoolExecutor(max_workers=1) as runner,
    ):
        pending: tuple[np.ndarray, list[str], Future[list[np.ndarray]]] | None = None
        for batch in _image_batches(data, static_batch or batch_size):
            if samples is not None:
                batch = batch[: samples - seen]
            x = check_batch(batch, model_input)
            maps = full is not None and (rank_images is None or sent_for_ranks < rank_images)
            sent_for_ranks += len(x) if maps else 0
            fetch = reduced + names if maps else reduced
            if not fetch:  # only HRank was asked for and it has seen its images: nothing left to learn
                break
            running = (x, fetch, runner.submit((full if maps else lean).run, fetch, {model_input.name: x}))
            if pending is not None:
                fold(pending[0], pending[1], _outputs(pending[2], pending[0]))
            pending = running
            seen += len(x)
            bar.update(len(x))
            if samples is not None and seen >= samples:
                break
        if pending is not None:
            fold(pending[0], pending[1], _outputs(pending[2], pending[0]))
    if not seen:
        raise CalibrationError("the calibration data holds no image; pass a non-empty dataset.")
    log.info("calibration: %d images, %d tensors, statistics %s", seen, len(names), sorted(wanted))
    return stats, seen


def _outputs(run: Future[list[np.ndarray]], x: np.ndarray) -> list[np.ndarray]:
    """The outputs of a session run started in the worker thread, its failure as a CalibrationError."""
    try:
        return run.result()
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises untyped errors
        raise CalibrationError(
            f"onnxruntime could not run the model on a calibration batch of shape {x.shape} ({exc})."
        ) from exc


def _single_input(session: InferenceSession) -> NodeArg:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CalibrationError(
            f"calibration feeds one image tensor, but the model has {len(inputs)} inputs "
            f"({', '.join(i.name for i in inputs)})."
        )
    return inputs[0]


def _image_batches(
    data: ArrayDataset | Iterable[np.ndarray | tuple[np.ndarray, ...]], batch_size: int
) -> Iterator[np.ndarray]:
    if hasattr(data, "batches"):
        for images, _ in data.batches(batch_size):
            yield images
        return
    for item in data:
        yield item[0] if isinstance(item, tuple | list) else item


def check_batch(batch: np.ndarray, model_input: NodeArg) -> np.ndarray:
    """The batch as the model input takes it, or a CalibrationError saying what does not fit."""
    x = np.asarray(batch)
    name, shape = model_input.name, model_input.shape
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise CalibrationError(
            f"calibration images have dtype {x.dtype}; model input {name!r} takes {model_input.type}, "
            "so pass numeric images."
        )
    if x.ndim != len(shape):
        raise CalibrationError(
            f"calibration batch has shape {x.shape} but model input {name!r} has rank {len(shape)} "
            f"({shape}); pass batches shaped like the model input."
        )
    if not len(x):
        raise CalibrationError("a calibration batch is empty; pass batches holding at least one image.")
    for axis, want in enumerate(shape[1:], start=1):
        if isinstance(want, int) and want != x.shape[axis]:
            if axis == 1:
                raise CalibrationError(
                    f"calibration images have {x.shape[1]} channels but model input {name!r} expects {want}; "
                    "pass images with the model's channel count."
                )
            raise CalibrationError(
                f"calibration batch has shape {x.shape} but model input {name!r} expects {shape}; "
                "resize the images to the model's input size."
            )
    dtype = _ORT_DTYPES.get(model_input.type)
    if dtype is None:
        raise CalibrationError(
            f"model input {name!r} has element type {model_input.type}; calibration needs a float input."
        )
    return np.ascontiguousarray(x, dtype=dtype)
