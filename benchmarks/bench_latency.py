"""Latency-aware planning against MACs targets and Torch-Pruning 1.6.1, timed in onnxruntime.

Per torchvision model (random init, 3x224x224, exported with BatchNorm kept) and batch size:

1. `graphprune profile` (the latency table, its time and how well the layers' sum predicts the whole);
2. Torch-Pruning at `--ratio` (MetaPruner, L1, classifier kept), exported: its MACs kept is the anchor;
3. graphprune `--target-macs` at Torch-Pruning's MACs (L1, local; usually the very same widths);
4. graphprune `--global --objective latency` (HALP-like: channels go where they save the most ms per
   unit of importance) twice: `--target-latency F` with F at (3)'s measured share of the original's
   latency ("equal latency": more MACs kept is better), and `--target-macs` at Torch-Pruning's MACs
   ("same MACs": more speed-up is better);
5. graphprune `--target-latency F` (uniform ratio, widths snapped to the table's fast steps) at (4)'s F.

Latency-targeted plans are timed whole and planned again on the measured latency
(`--latency-feedback 2`, the default); the same-MACs plan needs no timing, its budget being exact. "Table error" is the
table's own prediction (before any feedback) against the measured latency; "pred. error" is what the
plan records after feedback. (3) is planned without the table and records no prediction: its table
error reads its ragged widths at the next timed width, which plans made with the table never choose
(a ragged layer falls off onnxruntime's blocked kernels and adds layout reorders around it).

Every graphprune model is verified against its masked reference. All models are then timed in
rounds interleaved over models and batches (graphprune.runtime.profile.WholeTimer: a plan's latency is
its fastest round's median, since other jobs on a shared machine only slow a round down), each round of
one model's plans between two readings of its profile's canary; only rounds with both readings fast
count (a model short of them gets up to 3x the rounds), since in a slow spell pruned models slow down
more than their original. The load average is recorded per round.

CPU: .venv/bin/python benchmarks/bench_latency.py --models mobilenet_v2 resnet50 --batches 1
GPU (CUDA EP): tools/device/gpu_latency.sh (writes gpu_latency.json/.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from common import (
    RESULTS,
    Failure,
    header,
    high_priority,
    machine,
    markdown_table,
    write_json,
    write_text,
)
from tqdm import tqdm

from graphprune import api
from graphprune.errors import GraphPruneError
from graphprune.planning import PlanOptions
from graphprune.planning.latency import LatencyModel
from graphprune.runtime.profile import (
    LatencyTable,
    LayerSpec,
    Timing,
    WholeTimer,
    layer_graph,
    measure_wholes,
)
from graphprune.runtime.session import make_session

log = logging.getLogger("bench_latency")
MODELS = ("mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "regnet_x_400mf", "mnasnet1_0", "resnet50")
GPU_MODELS = ("resnet50", "mobilenet_v2", "efficientnet_b0")
# Rows timed per model and batch, in table order.
ROWS = ("original", "torch_pruning", "target_macs", "latency_equal", "latency_same_macs", "latency_uniform")
LABELS = {
    "original": "original",
    "torch_pruning": "Torch-Pruning ratio {ratio}",
    "target_macs": "graphprune --target-macs (TP's MACs)",
    "latency_equal": "--target-latency --objective latency (equal latency)",
    "latency_same_macs": "--target-macs --global --objective latency (TP's MACs)",
    "latency_uniform": "--target-latency, uniform, snapped",
}
# records of the planner before 2026-12-07 made the same-MACs plan by bisecting latency fractions
BISECTED_SAME_MACS = "--target-latency --objective latency (bisected to TP's MACs)"


def row_label(key: str, side: dict, ratio: float) -> str:
    """A row's label, as the record's settings say it was planned."""
    if key == "latency_same_macs" and "target_latency" in side.get("settings", {}):
        return BISECTED_SAME_MACS
    return LABELS[key].format(ratio=ratio)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=None, help=f"torchvision names (default {' '.join(MODELS)})"
    )
    parser.add_argument(
        "--batches", default=None, help="comma-separated batch sizes (default 1,32; 1,64 on cuda)"
    )
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--ratio", type=float, default=0.5, help="Torch-Pruning's pruning_ratio")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--profile-rounds", type=int, default=3, help="rounds of the latency profile")
    parser.add_argument("--profile-points", type=int, default=24, help="widths timed per layer dimension")
    parser.add_argument("--out", default=None, help="results name (default latency, gpu_latency on cuda)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    parser.add_argument("--work", type=Path, default=None, help="folder for exported models (default: temp)")
    parser.add_argument("--dry-run", action="store_true", help="print the matrix and exit")
    parser.add_argument(
        "--priority",
        action="store_true",
        help="profile and time at scheduler priority -20 (root; see common.py)",
    )
    args = parser.parse_args(argv)
    batches = args.batches or ("1,64" if args.provider == "cuda" else "1,32")
    args.batches = [int(b) for b in batches.split(",") if b]
    args.models = args.models or list(GPU_MODELS if args.provider == "cuda" else MODELS)
    args.out = args.out or ("gpu_latency" if args.provider == "cuda" else "latency")
    if min(args.batches) < 1 or args.threads < 1 or not 0 < args.ratio < 1:
        parser.error("batches and threads must be positive and --ratio in (0, 1)")
    return args


def check_provider(provider: str) -> None:
    """Fail before any export when the runtime cannot run the provider (one line, with the advice)."""
    if provider == "cuda":
        make_session(layer_graph(LayerSpec("probe", "Gemm", 4, 4), 4, 4), provider="cuda")


def export_model(name: str, work: Path) -> tuple[Path, object]:
    """The torchvision module (random init, seed 0) and its ONNX export (BatchNorm kept)."""
    import torch

    from graphprune.torch_bridge.export import export
    from graphprune.zoo import build

    torch.manual_seed(0)
    module = build(f"torchvision:{name}").eval()
    path = work / f"{name}.onnx"
    if not path.exists():
        export(module, torch.randn(1, 3, 224, 224), path)
    return path, module


def torch_pruning(name: str, module: object, work: Path, ratio: float) -> Path:
    """Torch-Pruning's pruned model, exported (bench_torchvision's protocol)."""
    from bench_torchvision import run_torch_pruning

    settings = argparse.Namespace(ratio=ratio, repeats=1)
    import torch

    return run_torch_pruning(name, module, torch.randn(1, 3, 224, 224), work, settings)["path"]


def ours(original: Path, options: PlanOptions, table: LatencyTable | None) -> api.PruneResult:
    """graphprune's plan (L1), verified against its masked reference."""
    latency = (
        api.LatencySource(table, table.provider, table.batch, table.threads) if table is not None else None
    )
    return api.prune(original, options, criterion="l1", latency=latency)


def plan_models(name: str, batch: int, work: Path, args: argparse.Namespace) -> tuple[dict, dict[str, Path]]:
    """Profile, prune every row, verify; returns the record and the models to time."""
    record: dict[str, object] = {"model": name, "batch": batch, "failures": []}
    original, module = export_model(name, work)
    start = time.perf_counter()
    table = api.profile_latency(
        original,
        provider=args.provider,
        batch=batch,
        threads=args.threads,
        timing=Timing(rounds=args.profile_rounds, points=args.profile_points),
    )
    table.save(work / f"{name}_b{batch}.lut.json")
    record["profile"] = {
        "seconds": time.perf_counter() - start,
        "signatures": len(table.curves),
        "layers": len(table.layers),
        "end_to_end_ms": table.end_to_end_ms,
        "layers_sum_ms": table.layers_sum_ms,
        "sum_error": table.sum_error,
        "load_1min": table.machine.get("load_1min"),
        "canary_ms": table.canary_ms,
    }
    paths = {"original": original}
    base = api.model_cost(api.as_loaded(original).proto)
    record["macs"] = base.macs
    tp_path = work / f"{name}_torch_pruning.onnx"
    if not tp_path.exists():
        tp_path = torch_pruning(name, module, work, args.ratio)
    paths["torch_pruning"] = tp_path
    tp_kept = api.model_cost(api.as_loaded(tp_path).proto).macs / base.macs
    sides: dict[str, dict[str, object]] = {
        "torch_pruning": {"macs_kept": tp_kept},
        "original": {"macs_kept": 1.0},
    }
    target_macs = ours(original, PlanOptions(target_macs=tp_kept), None)
    model = LatencyModel(target_macs.dep, table)
    # the latency (4) and (5) aim at: the MACs plan's, measured as their feedback measures (capped at
    # the whole model: ragged widths can run slower than the original)
    macs_ms, original_ms = measure_wholes(
        [target_macs.model, original],
        provider=args.provider,
        batch=batch,
        threads=args.threads,
        canary_ms=table.canary_ms,
    )
    equal = min(1.0, macs_ms / original_ms)
    results = {"target_macs": target_macs}
    plans = {
        "latency_same_macs": PlanOptions(target_macs=tp_kept, global_ranking=True, objective="latency"),
        "latency_equal": PlanOptions(target_latency=equal, global_ranking=True, objective="latency"),
        "latency_uniform": PlanOptions(target_latency=equal),
    }
    for key, options in plans.items():
        try:
            results[key] = ours(original, options, table)
        except GraphPruneError as exc:  # a target the allowed widths cannot reach is a result too
            sides[key] = {"failure": str(exc)}
    for key, result in results.items():
        path = work / f"{name}_b{batch}_{key}.onnx"
        result.save(path)
        paths[key] = path
        # (3) was planned without the table: it records no prediction, and the table's reading of its
        # ragged widths (at the next timed width) is shown as the table error only
        planned = result.plan.latency or {}
        sides[key] = {
            "macs_kept": result.after.macs / result.before.macs,
            **({"predicted_ms": planned["predicted_ms"]} if planned else {}),
            "table_predicted_ms": model.predict(result.removed),
            "feedback": planned.get("feedback", []),
            "max_rel_error": result.verification.max_rel_error if result.verification else None,
            "settings": result.plan.settings,
        }
    sides["original"]["predicted_ms"] = sides["original"]["table_predicted_ms"] = table.end_to_end_ms
    record["rows"] = sides
    return record, paths


def time_models(records: list[tuple[dict, dict[str, Path]]], args: argparse.Namespace) -> None:
    """Rounds interleaved over every model and batch, each round of one model's plans between two
    readings of its profile's canary (graphprune.runtime.profile.WholeTimer): a plan's latency is its
    fastest clean round's median, a model short of clean rounds getting more (up to 3x)."""
    timers = [
        WholeTimer(
            list(paths.values()),
            provider=args.provider,
            batch=record["batch"],
            threads=args.threads,
            timing=Timing(warmup=2, runs=args.runs, rounds=args.rounds, whole_budget_s=None),
            canary_ms=record["profile"]["canary_ms"],
        )
        for record, paths in records
    ]
    with tqdm(desc="timing", unit="round", disable=None) as bar:
        while pending := [timer for timer in timers if not timer.done]:
            for timer in pending:
                timer.time_round()
                bar.update()
    for (record, paths), timer in zip(records, timers, strict=True):
        record["loads"], record["clean_rounds"] = timer.loads, timer.clean
        for key, medians, fastest in zip(
            paths, zip(*timer.medians, strict=True), timer.fastest(), strict=True
        ):
            record["rows"][key].update(round_medians_ms=list(medians), latency_ms=fastest)
    derive([record for record, _ in records])


def derive(records: list[dict]) -> None:
    """Speed-ups and prediction errors of timed records (in place)."""
    for record in records:
        rows = record["rows"]
        for side in (s for s in rows.values() if "latency_ms" in s):
            side["speedup"] = rows["original"]["latency_ms"] / side["latency_ms"]
            if "table_predicted_ms" in side:
                side["table_prediction_error"] = side["table_predicted_ms"] / side["latency_ms"] - 1
            if "predicted_ms" in side:
                side["prediction_error"] = side["predicted_ms"] / side["latency_ms"] - 1
                # relative to the original's prediction: free of the load's drift between profile and timing
                predicted_speedup = rows["original"]["predicted_ms"] / side["predicted_ms"]
                side["speedup_error"] = predicted_speedup / side["speedup"] - 1


def render(payload: dict[str, object]) -> str:
    settings = payload["settings"]
    lines = [
        *header(
            f"Latency-aware planning ({settings['provider']}, {settings['threads']} threads)",
            payload["machine"],
            __doc__,
        ),
        "Timing: interleaved rounds (their count and runs per round are given per model and batch), fastest "
        "round median. The 1-minute load average is given per model: the machine was shared, so compare rows "
        "of one model only. Pred. error compares predicted and measured latency; pred. speed-up error compares the "
        "predicted speed-up over the original with the measured one, which cancels a load that differed "
        "between the profile and the timing: on this shared host a whole model's speed switches between two "
        "levels about 1.7x apart for seconds to tens of minutes (a neighbour; both vCPUs stay busy), and each "
        "model's header gives its original's timing against its profile.\n",
    ]
    summary = []
    for record in payload["records"]:
        name, batch = record["model"], record["batch"]
        if "rows" not in record or "latency_ms" not in record["rows"]["original"]:
            lines.append(
                f"**{name}, batch {batch}**: failed ({'; '.join(f['error'] for f in record['failures'])})\n"
            )
            continue
        profile, rows = record["profile"], record["rows"]
        loads = ", ".join(f"{x:.1f}" for x in record.get("loads", []))
        timing, clean = record["timing"], record.get("clean_rounds")
        rounds = f"{len(record['loads'])} rounds" + (
            f" ({sum(clean)} between fast canary readings)" if clean is not None else ""
        )
        lines.append(
            f"**{name}, batch {batch}** ({record['macs'] / 1e9:.2f} GMACs; profile {profile['seconds']:.0f} s, "
            f"{profile['signatures']} signatures; layers sum {profile['layers_sum_ms']:.2f} ms vs whole "
            f"{profile['end_to_end_ms']:.2f} ms, {100 * profile['sum_error']:+.0f}%; timed in {rounds} "
            f"of {timing['runs']} runs, {timing['date']}; load {loads}; the original timed "
            f"{100 * (rows['original']['latency_ms'] / profile['end_to_end_ms'] - 1):+.0f}% against its profile)\n"
        )
        table, ratio = [], payload["settings"]["ratio"]
        for key in ROWS:
            side = rows[key]
            if "failure" in side:
                table.append(
                    [row_label(key, side, ratio), f"failed: {side['failure']}", "", "", "", "", "", ""]
                )
                continue
            predicted = side.get("predicted_ms")
            table.append(
                [
                    row_label(key, side, ratio),
                    f"{side['macs_kept']:.3f}",
                    f"{predicted:.2f}" if predicted is not None else "-",
                    f"{side['latency_ms']:.2f}",
                    f"{side['speedup']:.2f}x",
                    f"{100 * side['table_prediction_error']:+.0f}%"
                    if "table_prediction_error" in side
                    else "-",
                    f"{100 * side['prediction_error']:+.0f}%" if "prediction_error" in side else "-",
                    f"{100 * side['speedup_error']:+.0f}%" if "speedup_error" in side else "-",
                ]
            )
        lines.append(
            markdown_table(
                [
                    "plan",
                    "MACs kept",
                    "predicted ms",
                    "measured ms",
                    "speed-up",
                    "table error",
                    "pred. error",
                    "pred. speed-up error",
                ],
                table,
            )
        )
        tp, same, equal = rows["torch_pruning"], rows["latency_same_macs"], rows["latency_equal"]
        summary.append(
            [
                name,
                batch,
                f"{same['speedup'] / tp['speedup']:.2f}x ({same['macs_kept']:.3f} vs {tp['macs_kept']:.3f})"
                if "speedup" in same
                else "failed",
                f"{equal['macs_kept']:.3f} vs {tp['macs_kept']:.3f} ({equal['latency_ms']:.2f} vs {tp['latency_ms']:.2f} ms)"
                if "speedup" in equal
                else "failed",
                f"{max(abs(s['prediction_error']) for s in rows.values() if 'prediction_error' in s):.0%} / "
                f"{max(abs(s['speedup_error']) for s in rows.values() if 'speedup_error' in s):.0%}",
                f"{100 * rows['target_macs']['table_prediction_error']:+.0f}%"
                if "table_prediction_error" in rows["target_macs"]
                else "-",
            ]
        )
    lines.append("## Summary\n")
    done = {(r["model"], r["batch"]) for r in payload["records"]}
    full = GPU_MODELS if settings["provider"] == "cuda" else MODELS
    missing = [
        f"{m} batch {b}"
        for m in full
        for b in (1, 64 if settings["provider"] == "cuda" else 32)
        if (m, b) not in done
    ]
    if missing:
        lines.append(f"Not run in this file: {', '.join(missing)}.\n")
    lines.append(
        markdown_table(
            [
                "model",
                "batch",
                "same MACs: speed-up over TP's (MACs kept)",
                "equal latency: MACs kept, ours vs TP",
                "worst error of the plans' predictions: latency / speed-up",
                "table at ragged widths (3)",
            ],
            summary,
        )
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    matrix = [(m, b) for m in args.models for b in args.batches]
    if args.dry_run:
        for name, batch in matrix:
            print(f"{name} batch {batch} {args.provider} threads {args.threads}")
        return 0
    try:
        check_provider(args.provider)
    except GraphPruneError as exc:
        print(f"bench_latency: error: {' '.join(str(exc).split())}")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-latency-") as scratch, high_priority(args.priority):
        work = args.work or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        planned = []
        for name, batch in matrix:
            log.info("%s batch %d: profile and plan", name, batch)
            try:
                planned.append(plan_models(name, batch, work, args))
            except Exception as exc:  # noqa: BLE001 - a failing model is a result to record
                log.exception("%s batch %d failed", name, batch)
                planned.append(
                    (
                        {
                            "model": name,
                            "batch": batch,
                            "failures": [vars(Failure.from_exception("plan", exc))],
                        },
                        {},
                    )
                )
        time_models([p for p in planned if p[1]], args)
    settings = {k: v for k, v in vars(args).items() if k in ("threads", "provider", "ratio", "priority")}
    info = machine()
    for record, _ in planned:
        record["timing"] = {"runs": args.runs, "rounds": args.rounds, "date": info["date"]}
    path = args.results / f"{args.out}.json"
    records = earlier_records(path, settings, set(matrix)) + [r for r, _ in planned]
    order = {name: i for i, name in enumerate(GPU_MODELS if args.provider == "cuda" else MODELS)}
    records.sort(key=lambda r: (r["batch"], order.get(r["model"], len(order))))
    payload = {"machine": info, "settings": settings, "records": records}
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(path, _plain(payload))
    write_text(args.results / f"{args.out}.md", render(payload))
    print((args.results / f"{args.out}.md").read_text())
    return 0


def earlier_records(path: Path, settings: dict[str, object], matrix: set[tuple[str, int]]) -> list[dict]:
    """The records of an earlier run of the same protocol (provider, threads, ratio) for the models and
    batches this run leaves alone, so that batch sizes can be measured in separate runs."""
    if not path.exists():
        return []
    earlier = json.loads(path.read_text())
    if any(earlier["settings"].get(k) != settings[k] for k in ("provider", "threads", "ratio")):
        return []
    return [r for r in earlier["records"] if (r["model"], r["batch"]) not in matrix]


def _plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value


if __name__ == "__main__":
    raise SystemExit(main())
