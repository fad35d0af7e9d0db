"""Latency of a model pruned with and without `--round-to` (default: the shipped ResNet-20 at half its MACs).

onnxruntime's blocked CPU conv kernels handle 8 (AVX2) or 16 (AVX-512) channels at a time, so a pruned
model whose widths are not multiples of the block can run slower than the original. This script prunes
`graphprune/zoo/weights/resnet20_fmnist.onnx` with `PlanOptions(target_macs=0.5, round_to=N)` for each N
(or `--model torchvision:NAME` at `--ratio R`: random init, 3x224x224; l1 criterion, verified), then
times the original and every pruned model with onnxruntime on the CPU at batch 1 and 32, for each
thread count, in interleaved rounds (best round kept: other jobs can only slow a round down). Accuracy is
not measured here (the demo and `fashion_mnist.md` do that).

Writes results/round_to.json and round_to.md (round_to_NAME.* for a torchvision model):
.venv/bin/python benchmarks/bench_round_to.py --priority
.venv/bin/python benchmarks/bench_round_to.py --priority --model torchvision:mobilenet_v2 --ratio 0.3
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import onnx
from bench_latency import export_model
from common import RESULTS, high_priority, machine, machine_line, markdown_table, write_json, write_text
from tqdm import tqdm

from graphprune.api import prune
from graphprune.cli.demo import REFERENCE
from graphprune.onnxutil import conv_channels
from graphprune.planning import PlanOptions
from graphprune.runtime.bench import bench

log = logging.getLogger("bench_round_to")


def render(payload: dict[str, object]) -> str:
    rows = payload["rows"]
    settings = payload["settings"]
    lines = [
        "# Pruned widths and onnxruntime CPU latency: `--round-to`\n",
        machine_line(payload["machine"]),  # type: ignore[arg-type]
        "",
        f"{settings.get('title', 'The shipped Fashion-MNIST ResNet-20')} pruned with "
        f"`PlanOptions({settings.get('plan', 'target_macs=0.5')}, round_to=N)` (l1, verified). "
        f"Latency: onnxruntime CPU, median of {settings['runs']} runs after {settings['warmup']} warm-up runs, "  # type: ignore[index]
        f"{settings['rounds']} rounds interleaved over the models, best round kept. Speed-up is the original's "  # type: ignore[index]
        "latency over the row's at the same batch and threads.\n",
    ]
    keys = sorted({key for row in rows for key in row["latency_ms"]})  # type: ignore[union-attr]
    base = next(row for row in rows if row["round_to"] is None)  # type: ignore[union-attr]
    table = [
        [
            "original" if row["round_to"] is None else f"round_to={row['round_to']}",
            "/".join(map(str, row["widths"])),
            f"{row['macs_kept']:.3f}",
            *(
                f"{row['latency_ms'][key]:.3f} ms ({base['latency_ms'][key] / row['latency_ms'][key]:.2f}x)"
                for key in keys
            ),
        ]
        for row in rows  # type: ignore[union-attr]
    ]
    lines.append(markdown_table(["model", "conv widths", "MACs kept", *keys], table))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--priority", action="store_true", help="raise scheduler priority while timing")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--model", help="torchvision:NAME (default: the shipped ResNet-20)")
    parser.add_argument(
        "--ratio", type=float, help="prune this share of every group instead of half the MACs"
    )
    args = parser.parse_args()
    if args.model is not None and not args.model.startswith("torchvision:"):
        parser.error("--model takes torchvision:NAME")
    name = None if args.model is None else args.model.removeprefix("torchvision:")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        reference = REFERENCE if name is None else export_model(name, Path(tmp))[0]
        models: dict[int | None, Path] = {None: reference}
        original = sorted(set(conv_channels(onnx.load(str(reference))).values()))
        rows = [{"round_to": None, "widths": original, "macs_kept": 1.0}]
        for step in args.round_to:
            if args.ratio is None:
                options = PlanOptions(target_macs=0.5, round_to=step)
            else:
                options = PlanOptions(ratio=args.ratio, round_to=step)
            result = prune(reference, options, criterion="l1")
            models[step] = result.save(Path(tmp) / f"round_to_{step}.onnx")
            widths = sorted(set(conv_channels(result.model).values()))
            rows.append(
                {"round_to": step, "widths": widths, "macs_kept": result.after.macs / result.before.macs}
            )
        for row in rows:
            row["latency_ms"] = {}
        with high_priority(args.priority):
            for _ in tqdm(range(args.rounds), desc="latency rounds", disable=None):
                for row in rows:
                    for threads in args.threads:
                        for batch in args.batches:
                            key = f"b{batch} t{threads}"
                            median = bench(
                                models[row["round_to"]],
                                batch=batch,
                                threads=threads,
                                warmup=args.warmup,
                                runs=args.runs,
                            ).median_ms
                            row["latency_ms"][key] = min(row["latency_ms"].get(key, median), median)
    settings = vars(args) | {"out": str(args.out)}
    if args.model is not None:
        settings["title"] = f"{args.model} (random init, 3x224x224)"
    if args.ratio is not None:
        settings["plan"] = f"ratio={args.ratio}"
    payload = {"machine": machine(), "settings": settings, "rows": rows}
    stem = "round_to" if name is None else f"round_to_{name}"
    write_json(args.out / f"{stem}.json", payload)
    write_text(args.out / f"{stem}.md", render(payload))
    log.info("wrote %s", args.out / f"{stem}.md")


if __name__ == "__main__":
    main()
