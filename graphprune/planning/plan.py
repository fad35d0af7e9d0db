"""PruningPlan: the single, reviewable record of which channels go (JSON round-trip)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.analysis.graph import DependencyGraph, Group
from graphprune.errors import PlanError
from graphprune.onnxutil import atomic_write
from graphprune.ops.atoms import Block

PLAN_FORMAT = "graphprune-plan/1"
# The channel multiple onnxruntime's CPU conv kernels compute in (NCHWc blocks of 8 or 16 channels).
KERNEL_MULTIPLE = 8

log = logging.getLogger(__name__)


@dataclass
class PruningPlan:
    """Channels to remove, keyed by the node that produces them (indices within that node's output).

    Removing a channel removes everything tied to it (residual partners, BN, consumers' input slices),
    so listing one member of a tie is enough; `summary` and `latency` (the latency a latency table
    predicted) are informational and ignored on replay.
    """

    remove: dict[str, list[int]]
    criterion: str = "manual"
    settings: dict[str, Any] = field(default_factory=dict)
    model_sha256: str | None = None
    summary: list[dict[str, Any]] = field(default_factory=list)
    latency: dict[str, Any] | None = None

    @classmethod
    def from_removed(cls, dep: DependencyGraph, removed: np.ndarray, **info: Any) -> PruningPlan:
        """Describe a boolean atom mask as per-block channel indices."""
        remove: dict[str, list[int]] = {}
        for block in dep.table.blocks:
            hits = np.flatnonzero(removed[block.start : block.start + block.size])
            if hits.size:
                remove[block.node] = hits.tolist()
        summary = []
        removed_classes = np.unique(dep.roots[removed])
        for group in dep.groups:
            gone = int(np.isin(group.classes, removed_classes).sum())
            if gone:
                summary.append({"group": group.name, "channels": group.size, "removed": gone})
        return cls(remove=remove, summary=summary, **info)

    def misaligned(self, multiple: int = KERNEL_MULTIPLE) -> list[str]:
        """Pruned groups of an aligned width (a multiple of `multiple`) left at a width that is not one:
        `name: kept/size` each.  Blocked kernels run such widths on slower paths and surround them with
        layout reorders, so a model pruned to them can run slower than the original."""
        return [
            f"{entry['group']}: {entry['channels'] - entry['removed']}/{entry['channels']}"
            for entry in self.summary
            if entry["channels"] % multiple == 0 and (entry["channels"] - entry["removed"]) % multiple
        ]

    def check_model(self, sha256: str | None, label: str, *, force: bool = False) -> None:
        """Refuse (or with `force`, warn) when the plan was made for a model other than the file whose
        SHA-256 is `sha256`; nothing to compare when either side has no hash."""
        if self.model_sha256 is None or sha256 is None or self.model_sha256 == sha256:
            return
        message = (
            f"the plan was made for another model (sha256 {self.model_sha256[:12]}..., "
            f"{label} is {sha256[:12]}...)"
        )
        if not force:
            raise PlanError(f"{message}; replay it on the model it was made for, or pass --force.")
        log.warning("%s; replaying it anyway (--force).", message)

    def removed_mask(self, dep: DependencyGraph) -> np.ndarray:
        """Boolean mask over the analysed model's atoms (closed over ties); refuses a plan whose entries
        for tied channels disagree (a hand edit applied to one producer of a residual group only)."""
        prunable = {b.node: b for b in dep.table.blocks if not b.fixed}
        chosen: list[int] = []
        for node, indices in self.remove.items():
            block = prunable.get(node)
            if block is None:
                raise PlanError(
                    f"the plan names node {node!r}, which produces no prunable channels in this model."
                )
            bad = [i for i in indices if not 0 <= i < block.size]
            if bad:
                raise PlanError(
                    f"the plan removes channel {bad[0]} of {node}, which has {block.size} channels."
                )
            chosen.extend(block.start + i for i in indices)
        removed = np.isin(dep.roots, dep.roots[np.asarray(chosen, dtype=np.int64)])
        for node, indices in self.remove.items():
            block = prunable[node]
            closed = np.flatnonzero(removed[block.start : block.start + block.size])
            extra = sorted(set(closed.tolist()) - set(indices))
            if extra:
                raise PlanError(
                    f"the plan's entries for group {_group_of(dep, block).name} disagree: {node} keeps "
                    f"channel {extra[0]}, which a tied entry removes; edit every listed member of the group "
                    "alike (or list the group under one node only)."
                )
        return removed

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "model_sha256": self.model_sha256,
            "criterion": self.criterion,
            "settings": self.settings,
            "summary": self.summary,
            "latency": self.latency,
            "remove": self.remove,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: not a readable plan file ({exc}).") from exc
        if (
            not isinstance(data, dict)
            or data.get("format") != PLAN_FORMAT
            or not isinstance(data.get("remove"), dict)
        ):
            raise PlanError(
                f"{path}: not a graphprune plan (expected format {PLAN_FORMAT!r} with a 'remove' map)."
            )
        remove = {str(k): [int(i) for i in v] for k, v in data["remove"].items()}
        return cls(
            remove,
            data.get("criterion", "manual"),
            data.get("settings", {}),
            data.get("model_sha256"),
            data.get("summary", []),
            data.get("latency"),
        )


def _group_of(dep: DependencyGraph, block: Block) -> Group:
    return next(g for g in dep.groups if block in g.blocks)
