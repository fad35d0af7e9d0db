"""The matched-MACs protocol both Fashion-MNIST benchmarks follow (bench_fashion_mnist.py compares the
tools, bench_criteria.py the criteria): command line and threads, result rows, each tool pruned to a
MACs target from the same baseline, the common fine-tune, a row runner that records failures, and
the result files (JSON rewritten after every row, markdown, plot).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from common import RESULTS, Failure, write_json, write_text
from peer import PeerPruning, Reference, add_reference_args, prune_to_macs, reference_from
from torch import nn

from graphprune.api import PruneResult, model_cost, prune
from graphprune.data import ArrayDataset
from graphprune.planning import PlanOptions
from graphprune.torch_bridge.train import TrainConfig, export_trained, fit

log = logging.getLogger("protocol")


@dataclass
class Row:
    """One pruned model (or the baseline) at one MACs target; each benchmark adds its measurements."""

    tool: str
    criterion: str
    target: float | None
    macs: int | None = None
    params: int | None = None
    macs_kept: float | None = None
    prune_s: float | None = None
    finetune_s: float | None = None
    details: dict[str, object] = field(default_factory=dict)
    failure: dict[str, str] | None = None

    def count(self, model: onnx.ModelProto, base_macs: int) -> None:
        """MACs and parameters of `model`, and the fraction of the baseline's MACs it kept."""
        cost = model_cost(model)
        self.macs, self.params = cost.macs, cost.params
        self.macs_kept = round(cost.macs / base_macs, 4)


def parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take: targets, test set, threads, results folder and baseline."""
    result = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3], help="MACs kept targets")
    result.add_argument("--test-samples", type=int, help="limit the test set (default: all 10,000)")
    result.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    result.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    add_reference_args(result)
    return result


def start(args: argparse.Namespace) -> Reference:
    """The baseline the arguments name, with logging on and torch limited to --threads."""
    reference = reference_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    return reference


def base_macs(reference: Reference) -> int:
    return model_cost(onnx.load(str(reference.onnx))).macs


def prune_graphprune(row: Row, reference: Reference, seed: int, **options: object) -> PruneResult:
    """graphprune at the row's MACs target from the baseline ONNX, verified; `options` go to prune()."""
    begin = time.perf_counter()
    result = prune(
        reference.onnx, PlanOptions(target_macs=row.target), criterion=row.criterion, seed=seed, **options
    )
    row.prune_s = round(time.perf_counter() - begin, 2)
    row.details["verify_max_rel_error"] = result.verification.max_rel_error
    return result


def prune_torch_pruning(
    row: Row, module: nn.Module, importance: object, seed: int, **peer: object
) -> PeerPruning:
    """Torch-Pruning on `module` (in place) at the row's MACs target; `seed` seeds torch's generator first
    (RandomImportance's draws); `peer` goes to peer.prune_to_macs."""
    torch.manual_seed(seed)
    begin = time.perf_counter()
    result = prune_to_macs(module, importance, row.target, **peer)
    row.prune_s = round(time.perf_counter() - begin, 2)
    row.details.update(tp_steps=result.steps, tp_ratio=result.ratio)
    return result


def finetune(
    row: Row, module: nn.Module, train: ArrayDataset, config: TrainConfig, path: Path
) -> onnx.ModelProto:
    """The common fine-tune of `module` on `train`, exported to `path`."""
    begin = time.perf_counter()
    history = fit(module, train, None, config)
    row.finetune_s = round(time.perf_counter() - begin, 1)
    row.details["train_loss"] = round(history.epochs[-1].train_loss, 4)
    return export_trained(module, path, train.sample_shape)


def attempt(row: Row, job: Callable[..., None], *args: object) -> Row:
    """Run `job(row, *args)`; a failure is recorded in the row (a tool failing is a result), not raised."""
    try:
        job(row, *args)
    except Exception as exc:  # noqa: BLE001 - a tool or criterion failing is a result to report
        log.exception("%s %s %s failed", row.tool, row.criterion, row.target)
        row.failure = asdict(Failure.from_exception(f"{row.tool} {row.criterion}", exc))
    summary = {k: v for k, v in asdict(row).items() if k not in ("details", "channels")}
    log.info("row done: %s", json.dumps(summary))
    return row


def save_results(
    payload: dict[str, object],
    out: Path,
    stem: str,
    render: Callable[[dict[str, object]], str],
    plot: Callable[[dict[str, object], Path], None],
) -> None:
    """OUT/STEM.json, .md (rendered from the JSON payload) and .png, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / f"{stem}.json", payload)
    write_text(out / f"{stem}.md", render(payload))
    plot(payload, out / f"{stem}.png")
