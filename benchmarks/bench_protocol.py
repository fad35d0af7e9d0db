"""How repeatable `graphprune bench` is on a shared machine: one original and its pruned copy benched
again and again, in one pass per model (the protocol before interleaved rounds) against interleaved
rounds in fresh sessions (a median being the model's fastest round's).

Per torchvision model (random init, 3x224x224, exported with BatchNorm kept) and its graphprune
`--ratio` plan (L1, verified), `--repeats` invocations of graphprune.runtime.bench.bench_many on the
pair, alternating between the protocols so that both meet the same spells of the machine; every
invocation has the same warm-up and timed runs. Reported per protocol: the median and interquartile
range of each model's latency over the invocations, and the spread (standard deviation, min, max) of
the speed-up they give: what a user who benches once gets.

.venv/bin/python benchmarks/bench_protocol.py --models mobilenet_v3_small resnet18 --repeats 25
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np
from bench_latency import export_model, ours
from common import RESULTS, header, high_priority, machine, markdown_table, save_and_print
from tqdm import tqdm

from graphprune.planning import PlanOptions
from graphprune.runtime.bench import bench_many

MODELS = ("mobilenet_v3_small", "resnet18")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision names")
    p.add_argument("--ratio", type=float, default=0.5, help="graphprune --ratio of the pruned copy")
    p.add_argument("--repeats", type=int, default=25, help="invocations per protocol")
    p.add_argument("--rounds", nargs="+", type=int, default=[1, 5], help="protocols: rounds per invocation")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model and invocation")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model and invocation")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    p.add_argument("--out", default="bench_protocol", help="results name")
    p.add_argument("--results", type=Path, default=RESULTS, help="folder of the results files")
    p.add_argument("--priority", action="store_true", help="run at scheduler priority -20 (root)")
    args = p.parse_args(argv)
    if args.repeats < 2 or args.runs < 1 or args.threads < 1 or not 0 < args.ratio < 1:
        p.error("--repeats must be at least 2, --runs and --threads positive, --ratio in (0, 1)")
    return args


def repeatability(pair: list[Path], args: argparse.Namespace) -> dict[int, dict[str, list[float]]]:
    """Per protocol (rounds), each invocation's original and pruned latency (ms)."""
    taken: dict[int, dict[str, list[float]]] = {r: {"original": [], "pruned": []} for r in args.rounds}
    for _ in tqdm(range(args.repeats), desc=f"{pair[0].stem}: invocations", disable=None):
        for rounds in args.rounds:
            original, pruned = bench_many(
                pair, [1], threads=args.threads, warmup=args.warmup, runs=args.runs, rounds=rounds,
                show_progress=False,
            )  # fmt: skip
            taken[rounds]["original"].append(original.median_ms)
            taken[rounds]["pruned"].append(pruned.median_ms)
    return taken


def summary(latencies: dict[str, list[float]]) -> dict[str, float]:
    """Median and interquartile range of each model's latency, and the speed-up's spread."""
    original, pruned = np.array(latencies["original"]), np.array(latencies["pruned"])
    speedup = original / pruned
    quartiles = {
        name: np.percentile(values, [25, 50, 75])
        for name, values in (("original", original), ("pruned", pruned))
    }
    return {
        **{f"{name}_median_ms": float(q[1]) for name, q in quartiles.items()},
        **{f"{name}_iqr_ms": float(q[2] - q[0]) for name, q in quartiles.items()},
        "speedup_median": float(np.median(speedup)),
        "speedup_sd": float(speedup.std(ddof=1)),
        "speedup_min": float(speedup.min()),
        "speedup_max": float(speedup.max()),
    }


def render(payload: dict[str, object]) -> str:
    lines = [*header("Repeatability of `graphprune bench`", payload["machine"], __doc__)]
    settings = payload["settings"]
    lines.append(
        f"{settings['repeats']} invocations per protocol, each {settings['warmup']} warm-up and "
        f"{settings['runs']} timed runs per model, {settings['threads']} threads, batch 1.\n"
    )
    rows = []
    for record in payload["records"]:
        for rounds, s in record["protocols"].items():
            rows.append(
                [
                    record["model"],
                    "one pass per model" if int(rounds) == 1 else f"{rounds} interleaved rounds",
                    f"{s['original_median_ms']:.3f} ({s['original_iqr_ms']:.3f})",
                    f"{s['pruned_median_ms']:.3f} ({s['pruned_iqr_ms']:.3f})",
                    f"{s['speedup_median']:.2f}x",
                    f"{s['speedup_sd']:.3f}",
                    f"{s['speedup_min']:.2f}x - {s['speedup_max']:.2f}x",
                ]
            )
    header_row = ["model", "protocol", "original ms (IQR)", "pruned ms (IQR)", "speed-up", "sd", "range"]
    lines.append(markdown_table(header_row, rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-protocol-") as scratch, high_priority(args.priority):
        work = Path(scratch)
        for name in args.models:
            original, _ = export_model(name, work)
            pruned = ours(original, PlanOptions(ratio=args.ratio), None).save(work / f"{name}_pruned.onnx")
            taken = repeatability([original, pruned], args)
            protocols = {rounds: summary(latencies) for rounds, latencies in taken.items()}
            records.append({"model": name, "protocols": protocols, "latencies": taken})
    settings = {k: getattr(args, k) for k in ("ratio", "repeats", "rounds", "runs", "warmup", "threads")}
    payload = {"machine": machine(), "settings": settings, "records": records}
    save_and_print(args.results, args.out, payload, render)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
