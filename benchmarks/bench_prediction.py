"""How well the latency table predicts the plans made with it, timed right after the profile.

Per torchvision model (random init, 3x224x224, exported with BatchNorm kept) and batch size:
`graphprune profile` (its calibration included), then three plans made with the table alone
(`--latency-feedback 0`, L1): `--target-macs M --global --objective latency`, `--target-latency F
--global --objective latency` and the uniform snapped `--target-latency F`. Each is verified, then
all are timed beside the original in interleaved rounds (graphprune.runtime.profile.WholeTimer with
the profile's canary: a latency is its fastest clean round's median) at once, so that the host's
speed moves as little as possible between the profile and the timing.

"Share error" compares the predicted share of the original's latency (the plan's prediction over the
table's whole) with the measured one (the plan's latency over the original's in the same rounds): the
prediction as planning uses it, free of a drift common to the original and the plan. "ms error"
compares the predicted latency with the measured one; it also carries that drift, given per model as
the original's timing against its profile. bench_latency.py times its plans minutes after their
profiles, beside Torch-Pruning's, with feedback.

CPU: .venv/bin/python benchmarks/bench_prediction.py --models mobilenet_v2 --batches 1
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

from bench_latency import MODELS, export_model
from common import RESULTS, Failure, header, high_priority, machine, markdown_table, save_and_print
from tqdm import tqdm

from graphprune import api
from graphprune.planning import PlanOptions
from graphprune.runtime.profile import Timing, WholeTimer

log = logging.getLogger("bench_prediction")
LABELS = {
    "same_macs": "--target-macs M --global --objective latency",
    "latency_global": "--target-latency F --global --objective latency",
    "latency_uniform": "--target-latency F, uniform, snapped",
}


def plans(args: argparse.Namespace) -> dict[str, PlanOptions]:
    return {
        "same_macs": PlanOptions(target_macs=args.macs, global_ranking=True, objective="latency"),
        "latency_global": PlanOptions(target_latency=args.latency, global_ranking=True, objective="latency"),
        "latency_uniform": PlanOptions(target_latency=args.latency),
    }


def measure(name: str, batch: int, work: Path, args: argparse.Namespace) -> dict:
    """Profile, plan with the table alone, verify, and time the plans beside the original at once."""
    original, _ = export_model(name, work)
    table = api.profile_latency(original, batch=batch, threads=args.threads)
    source = api.LatencySource(table, "cpu", batch, args.threads, feedback=0)
    record: dict = {"model": name, "batch": batch, "original_ms": table.end_to_end_ms, "rows": {}}
    record["profile"] = {"seconds": table.seconds, "check_error": table.check_error}
    models = [api.as_loaded(original).proto]
    for key, options in plans(args).items():
        result = api.prune(original, options, criterion="l1", latency=source)
        models.append(result.model)
        record["rows"][key] = {
            "macs_kept": result.after.macs / result.before.macs,
            "predicted_ms": result.plan.latency["predicted_ms"],
            "max_rel_error": result.verification.max_rel_error,
        }
    timer = WholeTimer(
        models,
        batch=batch,
        threads=args.threads,
        timing=Timing(warmup=2, runs=args.runs, rounds=args.rounds, whole_budget_s=None),
        canary_ms=table.canary_ms,
    )
    while not timer.done:
        timer.time_round()
    original_ms, *measured = timer.fastest()
    record.update(measured_original_ms=original_ms, clean_rounds=sum(timer.clean), rounds=len(timer.clean))
    for row, ms in zip(record["rows"].values(), measured, strict=True):
        share = row["predicted_ms"] / table.end_to_end_ms
        row.update(
            measured_ms=ms,
            share_error=share / (ms / original_ms) - 1,
            ms_error=row["predicted_ms"] / ms - 1,
        )
    return record


def render(payload: dict) -> str:
    lines = header(
        f"Latency predictions, timed right after the profile (cpu, {payload['settings']['threads']} threads)",
        payload["machine"],
        __doc__,
    )
    lines.append(
        f"Targets: M = {payload['settings']['macs']} of the MACs, F = {payload['settings']['latency']} of "
        "the measured latency.\n"
    )
    rows, worst = [], []
    for record in payload["records"]:
        if "rows" not in record:
            rows.append([record["model"], record["batch"], "failed: " + record["failure"], *[""] * 6])
            continue
        drift = record["measured_original_ms"] / record["original_ms"] - 1
        for key, row in record["rows"].items():
            rows.append(
                [
                    record["model"],
                    record["batch"],
                    LABELS[key],
                    f"{row['macs_kept']:.3f}",
                    f"{row['predicted_ms']:.2f}",
                    f"{row['measured_ms']:.2f}",
                    f"{100 * row['share_error']:+.1f}%",
                    f"{100 * row['ms_error']:+.1f}%",
                    f"{100 * drift:+.0f}%, {record['clean_rounds']} of {record['rounds']} clean",
                ]
            )
        worst.append(max(abs(row["share_error"]) for row in record["rows"].values()))
    lines.append(
        markdown_table(
            [
                "model",
                "batch",
                "plan",
                "MACs kept",
                "predicted ms",
                "measured ms",
                "share error",
                "ms error",
                "original vs its profile; rounds",
            ],
            rows,
        )
    )
    if worst:
        lines.append(f"Worst share error: {100 * max(worst):.1f}% over {len(worst)} model-batch pairs.\n")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision names")
    parser.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--macs", type=float, default=0.3, help="MACs target M of the first plan")
    parser.add_argument("--latency", type=float, default=0.45, help="latency target F of the others")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and round")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved timing rounds")
    parser.add_argument("--out", default="prediction", help="results name")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    parser.add_argument("--priority", action="store_true", help="profile and time at scheduler priority -20")
    args = parser.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    if min(args.batches) < 1 or args.threads < 1 or not 0 < args.macs < 1 or not 0 < args.latency < 1:
        parser.error("batches and threads must be positive, --macs and --latency in (0, 1)")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    records = []
    matrix = [(m, b) for b in args.batches for m in args.models]
    with tempfile.TemporaryDirectory(prefix="bench-prediction-") as work, high_priority(args.priority):
        for name, batch in tqdm(matrix, desc="models", disable=None):
            try:
                records.append(measure(name, batch, Path(work), args))
            except Exception as exc:  # noqa: BLE001 - a failing model is a result to record
                log.exception("%s batch %d failed", name, batch)
                records.append(
                    {"model": name, "batch": batch, "failure": Failure.from_exception("plan", exc).error}
                )
    settings = {k: getattr(args, k) for k in ("threads", "macs", "latency", "runs", "rounds", "priority")}
    save_and_print(
        args.results, args.out, {"machine": machine(), "settings": settings, "records": records}, render
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
