"""Shape arithmetic (Shape, Size) and Constant nodes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.ops.context import RuleContext
from graphprune.ops.spec import op, register


@op("Shape", "Size")
def shape_of(ctx: RuleContext, node: onnx.NodeProto) -> None:
    """Shape arithmetic reads sizes, not values; reshapes fed by it are checked by verification."""


def _fold_constant(inputs: list[np.ndarray | None], attrs: dict[str, object]) -> np.ndarray | None:
    """A Constant given as a tensor `value` (other spellings stay nodes)."""
    return numpy_helper.to_array(attrs["value"]) if set(attrs) == {"value"} else None  # type: ignore[arg-type]


register("Constant", fold=_fold_constant)
