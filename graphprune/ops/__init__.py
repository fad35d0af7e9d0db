"""Everything graphprune knows about ONNX op types, one module per op family: each registers an OpSpec
(channel rule, typed surgery rewrite, MAC formula, size inputs, flags) in `OPS`.  Adding an op is one
entry in one of these modules; an op type absent from `OPS` blocks every channel that reaches it."""

from graphprune.ops import conv, elementwise, layout, linear, norm, reduce, resize, shape  # noqa: F401
from graphprune.ops.spec import OPS, Macs, OpSpec

__all__ = ["OPS", "Macs", "OpSpec"]
