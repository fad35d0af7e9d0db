"""Where a pruned mobile net's time goes: onnxruntime CPU kernel time by op, original against
Torch-Pruning and graphprune's same-MACs plan, and what each kernel costs whatever its size.

Per torchvision model (random init, 3x224x224, exported with BatchNorm kept), at `--batch`:

1. the original; Torch-Pruning at `--ratio` (MetaPruner, L1, classifier kept), exported;
   graphprune `--target-macs` at Torch-Pruning's MACs `--global --objective latency` (L1, its own
   latency profile), verified: bench_latency.py's "same MACs" row;
2. each profiled by onnxruntime (graphprune.runtime.profile.kernel_profile: the fastest of three
   sessions, each kernel's median run): the kernel time by op type, and the dispatch cost of the ops
   outside the weighted layers (the intercept of their times against the bytes they move, times
   their count), which no pruning of channels removes.

Kernel times are the profiler's (a run's wall time also holds the session's own overhead), so
compare the columns, not the absolute figures with bench_latency's.

.venv/bin/python benchmarks/bench_op_time.py --models mobilenet_v3_large efficientnet_b0 --priority
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections import defaultdict
from pathlib import Path

from bench_latency import export_model, ours, torch_pruning
from common import RESULTS, header, high_priority, machine, markdown_table, save_and_print
from tqdm import tqdm

from graphprune import api
from graphprune.planning import PlanOptions
from graphprune.runtime.profile import Timing, kernel_profile, other_kernel_time, other_kernels

log = logging.getLogger("bench_op_time")
MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0")
VARIANTS = ("original", "torch_pruning", "graphprune_same_macs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision names")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--ratio", type=float, default=0.5, help="Torch-Pruning's pruning_ratio")
    p.add_argument("--out", default="op_time", help="results name")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    p.add_argument("--work", type=Path, default=None, help="folder for exported models (default: temp)")
    p.add_argument("--priority", action="store_true", help="run at scheduler priority -20 (root)")
    args = p.parse_args(argv)
    if args.batch < 1 or args.threads < 1 or not 0 < args.ratio < 1:
        p.error("--batch and --threads must be positive and --ratio in (0, 1)")
    return args


def variants(name: str, work: Path, args: argparse.Namespace) -> dict[str, Path]:
    """The original, Torch-Pruning's model and graphprune's same-MACs plan (verified), as files."""
    original, module = export_model(name, work)
    tp_path = torch_pruning(name, module, work, args.ratio)
    tp_kept = (
        api.model_cost(api.as_loaded(tp_path).proto).macs / api.model_cost(api.as_loaded(original).proto).macs
    )
    table = api.profile_latency(original, provider="cpu", batch=args.batch, threads=args.threads)
    same = ours(original, PlanOptions(target_macs=tp_kept, global_ranking=True, objective="latency"), table)
    same_path = same.save(work / f"{name}_b{args.batch}_same_macs.onnx")
    return dict(zip(VARIANTS, (original, tp_path, same_path), strict=True))


def split(path: Path, args: argparse.Namespace) -> dict[str, object]:
    """A model's kernel time by op type (ms), its MACs and its other ops' dispatch cost."""
    kernels = kernel_profile(path, batch=args.batch, threads=args.threads, timing=Timing())
    by_op: dict[str, float] = defaultdict(float)
    for kernel in kernels.values():
        by_op[kernel.op] += kernel.ms
    others = len(other_kernels(kernels))
    _, fixed = other_kernel_time(kernels)
    return {
        "macs": api.model_cost(api.as_loaded(path).proto).macs,
        "kernels_ms": sum(by_op.values()),
        "by_op_ms": dict(sorted(by_op.items(), key=lambda item: -item[1])),
        "other_kernels": others,
        "other_fixed_ms": fixed,
        "fixed_per_kernel_us": 1e3 * fixed / max(others, 1),
    }


def render(payload: dict[str, object]) -> str:
    lines = [*header("Kernel time by op (onnxruntime CPU profiler)", payload["machine"], __doc__)]
    for record in payload["records"]:
        rows = record["variants"]
        ops = sorted(
            {op for row in rows.values() for op in row["by_op_ms"]},
            key=lambda op: -rows["original"]["by_op_ms"].get(op, 0),
        )
        lines.append(f"**{record['model']}, batch {record['batch']}**\n")
        table = [
            ["MACs kept", *(f"{rows[v]['macs'] / rows['original']['macs']:.3f}" for v in VARIANTS)],
            ["kernel time, ms", *(f"{rows[v]['kernels_ms']:.3f}" for v in VARIANTS)],
            *([f"{op}, ms", *(f"{rows[v]['by_op_ms'].get(op, 0.0):.3f}" for v in VARIANTS)] for op in ops),
            [
                "other ops' dispatch, ms (kernels x us each)",
                *(
                    f"{rows[v]['other_fixed_ms']:.3f} ({rows[v]['other_kernels']} x {rows[v]['fixed_per_kernel_us']:.1f})"
                    for v in VARIANTS
                ),
            ],
        ]
        lines.append(
            markdown_table(
                ["", "original", f"Torch-Pruning {payload['settings']['ratio']}", "graphprune same MACs"],
                table,
            )
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-op-time-") as scratch, high_priority(args.priority):
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        for name in tqdm(args.models, desc="models", unit="model", disable=None):
            paths = variants(name, work, args)
            records.append(
                {
                    "model": name,
                    "batch": args.batch,
                    "variants": {key: split(path, args) for key, path in paths.items()},
                }
            )
    settings = {"batch": args.batch, "threads": args.threads, "ratio": args.ratio}
    payload = {"machine": machine(), "settings": settings, "records": records}
    save_and_print(args.results, args.out, payload, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
