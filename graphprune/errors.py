"""One hierarchy for every error graphprune raises; the CLI turns each into one line and exit 2."""

from __future__ import annotations


class GraphPruneError(Exception):
    """Base class: the message is a complete, user-facing sentence."""


class InvalidModelError(GraphPruneError):
    """The file is missing, truncated, not ONNX, or fails onnx.checker."""


class UnsupportedModelError(GraphPruneError):
    """The model uses something graphprune cannot prune exactly (names the node and op)."""


class AnalysisRuleError(GraphPruneError):
    """An op's channel rule broke its contract (strict analysis, as in the tests): a bug to report."""


class PlanError(GraphPruneError):
    """A pruning plan or planning option is invalid (ratio out of range, unknown node, stale plan)."""


class VerificationError(GraphPruneError):
    """The pruned model differs from the masked reference beyond tolerance."""


class CalibrationError(GraphPruneError):
    """Calibration data does not fit the model (shape, dtype, empty)."""


class DataError(GraphPruneError):
    """A dataset could not be found or read."""
