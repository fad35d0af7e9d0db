"""Prove a pruned model equal to the masked reference on seeded random inputs in onnxruntime.

Outputs alone are a weak witness (a randomly initialised network's output can hardly depend on its
features), so every channel-carrying tensor the two graphs share is compared too, on its kept channels,
each against its own scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx

from graphprune.analysis.graph import DependencyGraph
from graphprune.errors import VerificationError
from graphprune.runtime.session import input_feed, make_session
from graphprune.surgery.apply import axis_keep, masked_reference

log = logging.getLogger(__name__)

# Tolerance fit for a model computing in float16 (resolution about 1e-3: the reference and the pruned
# model sum in different orders); a wrong channel still errs by order 1.
FP16_TOLERANCE = 1e-2


@dataclass(frozen=True)
class VerificationReport:
    """Worst relative error over the compared tensors and seeds, and where it occurred."""

    max_rel_error: float
    worst_tensor: str
    tensors: int
    seeds: int
    batch: int
    tolerance: float
    precision: str = "fp32"

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |a - e| / max |e| (0 for empty tensors)."""
    if not expected.size:
        return 0.0
    scale = float(np.max(np.abs(expected)))
    return float(np.max(np.abs(expected.astype(np.float64) - actual))) / max(scale, 1e-12)


def verify_pruning(
    dep: DependencyGraph,
    removed: np.ndarray,
    pruned: onnx.ModelProto,
    *,
    seeds: int = 2,
    batch: int = 2,
    tolerance: float = 1e-4,
    threads: int | None = None,
) -> VerificationReport:
    """Compare `pruned` with the masked reference of `dep` under `removed`; raise VerificationError on a
    mismatch (a changed output shape or an error above `tolerance`).  threads: onnxruntime intra-op
    threads of both sessions (default: onnxruntime's own choice).  A float16 model is compared at
    FP16_TOLERANCE at least (the report's `precision` and `tolerance` say so)."""
    precision = "fp16" if _computes_in_fp16(dep.model) else "fp32"
    if precision == "fp16" and tolerance < FP16_TOLERANCE:
        log.info("float16 model: verifying at tolerance %g instead of %g", FP16_TOLERANCE, tolerance)
        tolerance = FP16_TOLERANCE
    keep = ~removed
    reference = masked_reference(dep, removed)
    produced = {out for node in pruned.graph.node for out in node.output}
    outputs = [o.name for o in reference.graph.output]
    inner = [name for name in dep.views if name in produced and name not in outputs]
    ref_session = make_session(reference, extra_outputs=inner, threads=threads)
    cand_session = make_session(pruned, extra_outputs=inner, threads=threads)
    names = outputs + inner
    worst, worst_name = 0.0, ""
    for seed in range(seeds):
        feed = input_feed(reference, batch=batch, seed=seed)
        for name, expected, actual in zip(
            names, ref_session.run(names, feed), cand_session.run(names, feed), strict=True
        ):
            view = dep.views.get(name)
            if view is not None and name not in outputs:
                for axis in range(view.ndim):
                    if view.shape[axis] > 1:
                        expected = np.compress(axis_keep(view, keep, axis, name), expected, axis=axis)
            if expected.shape != actual.shape:
                raise VerificationError(
                    f"tensor {name} has shape {actual.shape} in the pruned model, expected {expected.shape}."
                )
            error = relative_error(expected, actual)
            if error > worst:
                worst, worst_name = error, name
    report = VerificationReport(worst, worst_name, len(names), seeds, batch, tolerance, precision)
    log.info(
        "verification: max relative error %.3g at %s over %d tensors", worst, worst_name or "-", len(names)
    )
    if not report.ok:
        raise VerificationError(
            f"the pruned model differs from the masked reference at tensor {worst_name} (max relative error "
            f"{worst:.3g} > {precision} tolerance {tolerance:.1g}); nothing was written."
        )
    return report


def _computes_in_fp16(model: onnx.ModelProto) -> bool:
    """Whether any input or weight is float16 (fully converted or mixed-precision models)."""
    types = {v.type.tensor_type.elem_type for v in model.graph.input}
    types |= {init.data_type for init in model.graph.initializer}
    return onnx.TensorProto.FLOAT16 in types
