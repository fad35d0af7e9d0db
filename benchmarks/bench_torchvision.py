"""graphprune vs Torch-Pruning 1.6.1 on torchvision classifiers: prune time, MACs kept, ORT CPU speed-up.

Per model (random init, 1x3x224x224): the module is exported once with graphprune's legacy exporter
(BatchNorm kept). graphprune prunes the ONNX graph (ratio 0.5, L1, outputs never narrowed, so the
classifier keeps its classes) and its verification is timed apart. Torch-Pruning prunes a copy of the
same module (MetaPruner, MagnitudeImportance(p=1), ratio 0.5, classifier layers ignored); the result is
exported with the same exporter. Both pruned graphs are costed with graphprune.runtime.cost against the
same original export and timed with onnxruntime on the CPU.

Usage: .venv/bin/python benchmarks/bench_torchvision.py [--models resnet18 ...] [--runs 50]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from common import (
    RESULTS,
    Failure,
    Series,
    best_of,
    high_priority,
    machine,
    machine_line,
    markdown_table,
    plot_series,
    write_json,
    write_text,
)
from torch import nn
from tqdm import tqdm

from graphprune import api
from graphprune.analysis.graph import DependencyGraph
from graphprune.planning import PlanOptions
from graphprune.runtime.bench import bench
from graphprune.surgery.verify import verify_pruning
from graphprune.torch_bridge.export import export
from graphprune.zoo import TORCHVISION_SUITE, build

MODELS = TORCHVISION_SUITE
NUM_CLASSES = 1000
INPUT_SHAPE = (1, 3, 224, 224)
# Speed-ups closer than this (relative) are within the run-to-run noise of a 2-core machine.
NOISE = 0.05
# graphprune's reason for the classifier's class channels: expected, not worth a note.
OUTPUT_REASON = "model outputs are never narrowed"


def classifier_layers(module: nn.Module) -> list[nn.Module]:
    """Every layer producing the class logits (googlenet's auxiliary heads, squeezenet's final conv)."""
    return [
        m
        for m in module.modules()
        if (isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES)
        or (isinstance(m, nn.Conv2d) and m.out_channels == NUM_CLASSES)
    ]


def bench_round(record: dict[str, object], paths: dict[str, Path], args: argparse.Namespace) -> None:
    """One latency round for one model: graphprune.runtime.bench (CPU, batch 1) of the original and each
    pruned model in turn, appended to the record; speed-ups are recomputed from the fastest rounds.

    Other jobs on a shared machine can only slow a round down, so a model's latency is its fastest
    round median. Rounds sweep all models before the next starts, so one model's rounds lie minutes
    apart and a passing disturbance cannot hit them all.
    """
    for key, path in paths.items():
        result = bench(
            path, batch=1, threads=args.threads, provider="cpu", warmup=args.warmup, runs=args.runs
        )
        side = record if key == "original" else record[key]
        stats = side.setdefault("latency", {"round_medians_ms": [], "round_p90s_ms": []})
        stats["round_medians_ms"].append(result.median_ms)
        stats["round_p90s_ms"].append(result.p90_ms)
        stats["median_ms"] = min(stats["round_medians_ms"])
    record.setdefault("loads", []).append(os.getloadavg()[0])
    for key in paths.keys() - {"original"}:
        side = record[key]
        side["speedup"] = record["latency"]["median_ms"] / side["latency"]["median_ms"]
        # 1.0 means latency fell as much as MACs did (the compute-bound limit).
        side["efficiency"] = side["speedup"] * side["macs_kept"]


def architecture(path: Path) -> list[tuple[str, tuple[tuple[int, ...], ...]]]:
    """Sorted (op type, weight shapes) of every node: equal lists mean the same network up to weights.

    Constant nodes and scalar initialisers (Clip bounds) are left out: exporters and graphprune's
    clean-up store the same scalars either way.
    """
    model = onnx.load(path)
    shapes = {init.name: tuple(init.dims) for init in model.graph.initializer if init.dims}
    return sorted(
        (n.op_type, tuple(shapes[i] for i in n.input if i in shapes))
        for n in model.graph.node
        if n.op_type != "Constant"
    )


def blocked_reasons(dep: DependencyGraph) -> dict[str, list[str]]:
    """Why channels stay: per group with blocked channels, its distinct reasons (model outputs aside)."""
    found = {}
    for group in dep.groups:
        reasons = sorted({r for r in group.blocked.values() if OUTPUT_REASON not in r})
        if reasons:
            found[group.name] = reasons
    return found


def run_ours(name: str, original: onnx.ModelProto, work: Path, args: argparse.Namespace) -> dict[str, object]:
    """graphprune: analyse+prune without verification (best of N), then verification alone, and cost."""
    options = PlanOptions(ratio=args.ratio)
    prune_s, result = best_of(
        args.repeats, lambda: api.prune(original, options, criterion="l1", verify=False)
    )
    row: dict[str, object] = {
        "prune_s": prune_s,
        "macs": result.after.macs,
        "params": result.after.params,
        "groups": len(result.dep.groups),
        "prunable_groups": len(result.dep.prunable_groups),
        "blocked": blocked_reasons(result.dep),
        "removed_channels": int(result.removed.sum()),
    }
    try:
        verify_s, report = best_of(1, lambda: verify_pruning(result.dep, result.removed, result.model))
        row.update(verify_s=verify_s, max_rel_error=report.max_rel_error)
    except Exception as exc:  # noqa: BLE001 - a failed verification is a result to record
        row["verify_failure"] = vars(Failure.from_exception("verify", exc))
    path = work / f"{name}_graphprune.onnx"
    result.save(path)
    row["path"] = path
    return row


def run_torch_pruning(
    name: str, module: nn.Module, example: torch.Tensor, work: Path, args: argparse.Namespace
) -> dict[str, object]:
    """Torch-Pruning: DepGraph build + one prune step on fresh copies (best of N), then export and cost."""
    import torch_pruning as tp

    def build_and_prune() -> nn.Module:
        copy_ = copies.pop()
        pruner = tp.pruner.MetaPruner(
            copy_,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=args.ratio,
            ignored_layers=classifier_layers(copy_),
        )
        pruner.step()
        return copy_

    copies = [copy.deepcopy(module).eval() for _ in range(args.repeats)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        seconds, pruned = best_of(args.repeats, build_and_prune)
        base_macs, _ = tp.utils.count_ops_and_params(module, example)
        own_macs, _ = tp.utils.count_ops_and_params(pruned, example)
    path = work / f"{name}_torch_pruning.onnx"
    proto = export(pruned, example, path)
    cost = api.model_cost(proto)
    return {
        "prune_s": seconds,
        "macs": cost.macs,
        "params": cost.params,
        "own_macs_kept": float(own_macs / base_macs),
        "path": path,
    }


def prune_model(name: str, work: Path, args: argparse.Namespace) -> tuple[dict[str, object], dict[str, Path]]:
    """Export, prune with both tools and cost one model; returns the record and the ONNX files to time.
    Each stage's failure is recorded, never raised."""
    record: dict[str, object] = {"model": name, "failures": []}
    failures: list[dict[str, str]] = record["failures"]  # type: ignore[assignment]
    torch.manual_seed(0)
    module = build(f"torchvision:{name}").eval()
    example = torch.randn(*INPUT_SHAPE)
    original_path = work / f"{name}.onnx"
    try:
        original = export(module, example, original_path)
        cost = api.model_cost(original)
        record.update(macs=cost.macs, params=cost.params)
    except Exception as exc:  # noqa: BLE001
        failures.append(vars(Failure.from_exception("export", exc)))
        return record, {}
    paths = {"original": original_path}
    for key, stage in (
        ("ours", lambda: run_ours(name, original, work, args)),
        ("tp", lambda: run_torch_pruning(name, module, example, work, args)),
    ):
        try:
            side = stage()
        except Exception as exc:  # noqa: BLE001 - both tools' failures are results
            failures.append(vars(Failure.from_exception(key, exc)))
            continue
        paths[key] = side.pop("path")
        side["macs_kept"] = side["macs"] / cost.macs
        side["params_kept"] = side["params"] / cost.params
        record[key] = side
    if "ours" in paths and "tp" in paths:
        record["same_architecture"] = architecture(paths["ours"]) == architecture(paths["tp"])
    return record, paths


def note(record: dict[str, object]) -> str:
    parts = [f"{f['stage']} failed: {f['error'][:120]}" for f in record["failures"]]  # type: ignore[index]
    ours, tp = record.get("ours"), record.get("tp")
    if isinstance(ours, dict):
        if "verify_failure" in ours:
            parts.append(f"verify failed: {ours['verify_failure']['error'][:120]}")
        if ours["blocked"]:
            parts.append(f"{len(ours['blocked'])}/{ours['groups']} groups partly blocked")
    if isinstance(tp, dict) and tp["macs_kept"] > 0.99:
        parts.append("TP pruned nothing")
    if record.get("same_architecture"):
        parts.append("same pruned shapes as TP")
    elif isinstance(ours, dict) and isinstance(tp, dict) and "efficiency" in ours and "efficiency" in tp:
        gap = ours["efficiency"] / tp["efficiency"] - 1
        if gap < -NOISE:
            parts.append(f"ours {-gap:.0%} less speed-up per MAC removed")
    return "; ".join(parts)


def fmt(side: object, key: str, spec: str, suffix: str = "") -> str:
    if not isinstance(side, dict) or key not in side:
        return "-"
    return f"{side[key]:{spec}}{suffix}"


def fmt_latency(side: object) -> str:
    if not isinstance(side, dict) or "latency" not in side:
        return "-"
    values = side["latency"]["round_medians_ms"]
    return f"{min(values):.1f} / {max(values):.1f}"


def write_results(
    records: list[dict[str, object]], info: dict[str, object], args: argparse.Namespace
) -> None:
    settings = {
        "ratio": args.ratio,
        "criterion": "l1",
        "input": list(INPUT_SHAPE),
        "threads": args.threads,
        "warmup": args.warmup,
        "runs": args.runs,
        "rounds": args.rounds,
        "repeats": args.repeats,
        "priority": args.priority,
    }
    write_json(RESULTS / "torchvision.json", {"machine": info, "settings": settings, "models": records})
    header = [
        "model",
        "ours prune s",
        "ours verify s",
        "ours MACs kept",
        "ours speed-up",
        "TP build+prune s",
        "TP MACs kept",
        "TP speed-up",
        "note",
    ]
    rows = []
    for r in records:
        ours, tp = r.get("ours"), r.get("tp")
        rows.append(
            [
                r["model"],
                fmt(ours, "prune_s", ".2f"),
                fmt(ours, "verify_s", ".2f"),
                fmt(ours, "macs_kept", ".3f"),
                fmt(ours, "speedup", ".2f", "x"),
                fmt(tp, "prune_s", ".2f"),
                fmt(tp, "macs_kept", ".3f"),
                fmt(tp, "speedup", ".2f", "x"),
                note(r),
            ]
        )
    latency_header = [
        "model",
        "GMACs",
        "load",
        "orig ms (best / worst round)",
        "ours ms",
        "TP ms",
        "ours eff.",
        "TP eff.",
        "max rel err",
    ]
    latency_rows = [
        [
            r["model"],
            f"{r['macs'] / 1e9:.2f}" if "macs" in r else "-",
            f"{max(r['loads']):.1f}" if "loads" in r else "-",
            fmt_latency(r),
            fmt_latency(r.get("ours")),
            fmt_latency(r.get("tp")),
            fmt(r.get("ours"), "efficiency", ".2f"),
            fmt(r.get("tp"), "efficiency", ".2f"),
            fmt(r.get("ours"), "max_rel_error", ".1e"),
        ]
        for r in records
    ]
    priority = (
        "Timed with this benchmark's scheduler group at the highest priority (--priority), so other jobs "
        "on the shared machine did not stretch the timings"
        if args.priority
        else "Timed at normal priority on a machine shared with other jobs, so absolute times include their load"
    )
    text = (
        "# graphprune vs Torch-Pruning 1.6.1 on torchvision (random init, 1x3x224x224)\n\n"
        f"{machine_line(info)}\n\n"
        f"Uniform ratio {args.ratio}, L1 magnitude, classifier kept. Prune times: best of {args.repeats} "
        "(graphprune: analyse + plan + surgery on the ONNX graph, no verification; Torch-Pruning: DepGraph "
        "build + step on the torch module). MACs kept: graphprune.runtime.cost on both pruned exports over "
        "the same original export. Speed-up: original / pruned latency, where a latency is the median "
        f"of graphprune.runtime.bench (onnxruntime CPU, {args.threads} threads, batch 1, {args.warmup} "
        f"warm-up runs, {args.runs} timed runs), run in {args.rounds} rounds (each round benches every "
        "model's original, graphprune and Torch-Pruning versions in turn, so one model's rounds are minutes "
        "apart), keeping each model's fastest round. "
        f"{priority}; the highest 1-minute load average (2 cores) seen over a model's rounds is in the second table. "
        '"same pruned shapes as TP": both pruned graphs have the same op types and weight shapes, so '
        "their latencies differ by noise only.\n\n"
        + markdown_table(header, rows)
        + "\nLatencies (median ms of the best / worst round); efficiency = speed-up x MACs kept (1.0: latency fell as much as "
        "MACs did); max rel err is graphprune's verification against the masked reference.\n\n"
        + markdown_table(latency_header, latency_rows)
    )
    write_text(RESULTS / "torchvision.md", text)
    series = []
    for key, label, marker in (("ours", "graphprune", "o"), ("tp", "Torch-Pruning 1.6.1", "x")):
        done = [r for r in records if isinstance(r.get(key), dict) and "speedup" in r[key]]
        # Torch-Pruning's points are named only where they stand apart from graphprune's.
        named = [
            str(r["model"])
            if key == "ours" or abs(r[key]["macs_kept"] - r.get("ours", {}).get("macs_kept", -1)) > 0.01
            else ""
            for r in done
        ]
        series.append(
            Series(
                label,
                [r[key]["macs_kept"] for r in done],
                [r[key]["speedup"] for r in done],
                named,
                line=False,
                marker=marker,
            )
        )
    kept = [x for s in series for x in s.xs]
    if kept:
        grid = [min(kept) + (max(kept) - min(kept)) * i / 50 for i in range(51)]
        series.append(Series("MACs limit (1 / MACs kept)", grid, [1 / x for x in grid], marker=""))
    plot_series(
        series,
        RESULTS / "torchvision_speedup.png",
        title=f"ORT CPU speed-up vs MACs kept (ratio {args.ratio}, {args.threads} threads, batch 1)",
        xlabel="MACs kept (pruned / original)",
        ylabel="speed-up (original / pruned latency)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50, help="timed runs per bench call")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved latency rounds; the fastest counts"
    )
    parser.add_argument("--repeats", type=int, default=3, help="prune timings: best of this many")
    parser.add_argument(
        "--priority",
        action="store_true",
        help="raise this run's scheduler group to the top priority while timing (Linux autogroup; needs root)",
    )
    parser.add_argument("--keep", type=Path, help="keep the ONNX files in this folder")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    info = machine()
    records: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        to_time = []
        for name in tqdm(args.models, desc="prune (graphprune, Torch-Pruning)", unit="model"):
            with high_priority(args.priority):
                record, paths = prune_model(name, work, args)
            records.append(record)
            to_time.append((record, paths))
            write_results(records, info, args)
            tqdm.write(f"{name}: {note(record) or 'ok'}")
        for index in range(args.rounds):
            for record, paths in tqdm(to_time, desc=f"latency round {index + 1}/{args.rounds}", unit="model"):
                if paths:
                    with high_priority(args.priority):
                        bench_round(record, paths, args)
            write_results(records, info, args)
    failed = [r["model"] for r in records if r["failures"] or "verify_failure" in r.get("ours", {})]
    print(f"wrote {RESULTS / 'torchvision.md'}; models with a failure: {', '.join(failed) or 'none'}")


if __name__ == "__main__":
    main()
