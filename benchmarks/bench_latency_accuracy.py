"""Accuracy at equal measured latency on a Fashion-MNIST-trained model (the shipped ResNet-20, or a zoo model
trained by tools/train_reference.py: `--model mobilenetv2 --baseline FILE.onnx`): graphprune's latency
targets against its MACs target and Torch-Pruning 1.6.1.

The original is profiled once (`graphprune.api.profile_latency`: onnxruntime CPU, `--batch` images,
`--threads` threads). Then per MACs target (`--targets`, of the original's MACs):

1. Torch-Pruning, MagnitudeImportance p=1 and p=2, stepped until graphprune's count of its export meets
   the target (peer.prune_to_macs; with `--tp-round-to N` its own round_to, which keeps its widths
   multiples of N): its export as pruned (it has no recovery step), and with graphprune's BN
   recalibration (bench_recovery.recover_start);
2. the latency to match, F: the faster Torch-Pruning model's measured latency over the original's
   (fastest round medians of twice `--rounds` interleaved rounds before planning: a median of the
   rounds' ratios was tried and missed by more when the host's speed flipped within a round).
   Measured, not the table's prediction: the table's staircase reads Torch-Pruning's ragged widths at
   the next timed width (multiples of 16 here), and so predicted its 30% model as slow as its 50% one
   where it measured a quarter faster; the predictions (each layer of the original at the widths a model
   gives it) are in the tables;
3. graphprune, l1, each verified, then recovered by least squares (lsq) on `--calib-samples` seeded
   training images: `--target-macs` at that Torch-Pruning model's MACs kept (rounded as it was);
   `--target-latency F --global --objective latency`; `--target-latency F` (uniform ratio, widths
   snapped to the table's fast steps); both latency plans with `--max-ratio` (default prune's 0.9).

Every model is timed in interleaved rounds (bench_latency.time_models: a latency is the fastest round's
median). Accuracy is top-1 on the 10,000 test images without training, then after bench_recovery's
fine-tune (1 epoch on `--ft-samples` seeded training images, SGD lr `--ft-lr` cosine, the original as
distillation teacher), once per model: graphprune's from lsq, Torch-Pruning's from BN recalibration
(which changes only running statistics, so from its as-pruned start the fine-tune ends the same: it
did to four decimals on MobileNetV2).

Goal (reported, not asserted): at equal latency, our accuracy after the fine-tune >= Torch-Pruning's
best. "Equal latency": our measured latency <= that Torch-Pruning model's times (1 + noise), the noise
being the larger of the two models' gaps between their fastest and second-fastest round medians
(above 5% the verdict is left open: the machine was too busy to tell), unless our model ran no slower
than Torch-Pruning's in every interleaved round (the paired comparison, which holds when the shared
host's speed level flips between rounds).

Writes results/latency_accuracy[_MODEL][_bBATCH][_tp_roundN].json and .md (no suffix: ResNet-20 at
batch 1, Torch-Pruning unrounded); run alone on a quiet machine (ResNet-20: about 20 minutes on 2 cores):
.venv/bin/python benchmarks/bench_latency_accuracy.py --priority
.venv/bin/python benchmarks/bench_latency_accuracy.py --priority --model mobilenetv2 \
    --baseline mobilenetv2_fmnist.onnx --tp-round-to 16
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import torch
from bench_latency import ours, time_models
from bench_recovery import (
    CALIB,
    DEMO_FT_LR,
    PEERS,
    Start,
    finetune,
    recover_start,
    torch_pruning_start,
)
from common import RESULTS, header, high_priority, machine, markdown_table, write_json, write_text
from peer import Reference, add_reference_args, reference_from, reference_text

from graphprune import api
from graphprune.api import RECOVERY_HOLDOUT, model_cost
from graphprune.data import load_dataset
from graphprune.errors import GraphPruneError
from graphprune.planning import PlanOptions
from graphprune.planning.latency import LatencyModel, layer_specs
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.runtime.profile import LatencyTable, LayerSpec, Timing
from graphprune.torch_bridge.distill import OnnxTeacher

log = logging.getLogger("bench_latency_accuracy")
OUT = "latency_accuracy"
TARGET_MACS = "graphprune --target-macs (TP's MACs)"
GLOBAL = "graphprune --target-latency F --global --objective latency"
UNIFORM = "graphprune --target-latency F (uniform, snapped)"
STARTS = {"bn": "BN recalibrated", "lsq": "lsq recovered"}
# Above this timing noise "as fast" says nothing (a loaded machine): the verdict is left open.
NOISE_LIMIT = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3], help="MACs kept by TP")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime and torch threads")
    parser.add_argument("--calib-samples", type=int, default=1024, help="images lsq / BN recovery fit on")
    parser.add_argument("--ft-samples", type=int, default=15000, help="fine-tune images (1 epoch)")
    parser.add_argument("--ft-lr", type=float, default=DEMO_FT_LR, help="fine-tune learning rate")
    parser.add_argument(
        "--ft-warmup", type=float, default=0.0, help="share of the fine-tune's steps ramping up to --ft-lr"
    )
    parser.add_argument(
        "--max-ratio",
        type=float,
        default=PlanOptions().max_ratio,
        help="largest share of a group the latency plans may remove (prune's --max-ratio)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images per inference (profile and timing)")
    parser.add_argument(
        "--tp-round-to", type=int, default=None, help="Torch-Pruning's round_to (default: none, any width)"
    )
    parser.add_argument("--runs", type=int, default=200, help="timed runs per model and round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--profile-rounds", type=int, default=3, help="rounds of the latency profile")
    parser.add_argument("--profile-points", type=int, default=24, help="widths timed per layer dimension")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results files")
    parser.add_argument(
        "--priority", action="store_true", help="profile and time at scheduler priority -20 (root)"
    )
    parser.set_defaults(provider="cpu")  # time_models reads it
    add_reference_args(parser)
    args = parser.parse_args(argv)
    if not all(0 < t < 1 for t in args.targets) or min(args.threads, args.runs, args.rounds, args.batch) < 1:
        parser.error("--targets must lie in (0, 1); --threads, --runs, --rounds and --batch must be positive")
    return args


def table_ms(table: LatencyTable, original: Path, model: onnx.ModelProto) -> float:
    """The table's latency for any pruning of `original`, by either tool, predicted as graphprune
    predicts its own plans (layers at their in-model times, the other ops' shares, the fit): the
    original with as many channels removed from each channel class as `model` removed from the layer
    of the same name that writes it (both exports keep torch's node names)."""
    dep = api.analyze_model(original)
    latency = LatencyModel(dep, table)
    pruned = {s.node: s for s in layer_specs(api.analyze_model(model))}

    def layout(spec: LayerSpec, group: bool) -> tuple[object, ...]:
        return spec.op, spec.group if group else None, spec.attributes, spec.leading

    # the group count of a depthwise conv, or of one whose conv groups may go whole, follows its width
    if pruned.keys() != {layer.spec.node for layer in latency.layers} or any(
        layout(layer.spec, not layer.spec.tied) != layout(pruned[layer.spec.node], not layer.spec.tied)
        for layer in latency.layers
    ):
        raise RuntimeError("the pruned model's layers do not pair up with the original's")
    removed_class = np.zeros(dep.roots.size, dtype=bool)
    for layer in latency.layers:
        if layer.out_classes is not None:
            classes = np.unique(layer.out_classes)
            gone = layer.spec.out_channels - pruned[layer.spec.node].out_channels
            removed_class[classes[: round(gone * classes.size / layer.spec.out_channels)]] = True
    return latency.predict(removed_class[dep.roots])


def plan_target(
    target: float, table: LatencyTable, reference: Reference, work: Path, args: argparse.Namespace
) -> tuple[dict, dict[str, Path], list[Start]]:
    """Torch-Pruning's models at `target`, graphprune's at their MACs and latency; returns the record,
    the models to time, and every start to recover and fine-tune."""
    original = reference.onnx
    base = model_cost(onnx.load(str(original))).macs
    rows: dict[str, dict[str, object]] = {"original": {"macs_kept": 1.0, "predicted_ms": table.end_to_end_ms}}
    paths, starts = {"original": original}, []
    for label in PEERS:
        start = torch_pruning_start(label, target, work, reference, args.tp_round_to)
        paths[start.criterion] = work / f"{target}_{label.replace(' ', '_')}.onnx"
        onnx.save(start.model, paths[start.criterion])
        rows[start.criterion] = {
            "macs_kept": model_cost(start.model).macs / base,
            "predicted_ms": table_ms(table, original, start.model),
        }
        starts.append(start)
    # time_models holds each round between two readings of the profile's canary
    canary = {"canary_ms": table.canary_ms}
    probe: dict[str, object] = {"batch": args.batch, "rows": {key: {} for key in paths}, "profile": canary}
    # twice the rounds: a model's fastest round is likelier to fall in a quiet spell of the shared host
    with high_priority(args.priority):
        time_models([(probe, paths)], argparse.Namespace(**{**vars(args), "rounds": 2 * args.rounds}))
    measured = {key: side["latency_ms"] for key, side in probe["rows"].items()}
    anchor = min((s.criterion for s in starts), key=measured.get)
    fraction = min(1.0, measured[anchor] / measured["original"])
    record = {
        "target": target,
        "batch": args.batch,
        "anchor": anchor,
        "latency_fraction": fraction,
        "anchor_timing_ms": measured,
        "rows": rows,
        "profile": canary,
    }
    plans = {
        TARGET_MACS: (
            PlanOptions(target_macs=rows[anchor]["macs_kept"], round_to=args.tp_round_to or 1),
            None,
        ),
        GLOBAL: (
            PlanOptions(
                target_latency=fraction, global_ranking=True, objective="latency", max_ratio=args.max_ratio
            ),
            table,
        ),
        UNIFORM: (PlanOptions(target_latency=fraction, max_ratio=args.max_ratio), table),
    }
    for key, (options, lut) in plans.items():
        try:
            result = ours(original, options, lut)
        except GraphPruneError as exc:  # a latency the allowed widths cannot reach is a result too
            rows[key] = {"failure": " ".join(str(exc).split())}
            continue
        paths[key] = work / f"{target}_{len(paths)}.onnx"
        result.save(paths[key])
        rows[key] = {
            "macs_kept": result.after.macs / result.before.macs,
            "predicted_ms": table_ms(table, original, result.model),
            "max_rel_error": result.verification.max_rel_error,
            "settings": result.plan.settings,
        }
        starts.append(Start(key, 1, target, result.model, result.plan))
    return record, paths, starts


def measure_accuracy(
    args: argparse.Namespace,
    reference: Reference,
    planned: list[tuple[dict, list[Start]]],
    save: Callable[[], None],
    work: Path,
) -> None:
    """Test accuracy of every start as pruned, recovered, and recovered then fine-tuned (saved after each)."""
    torch.set_num_threads(args.threads)
    test = load_dataset(CALIB, "test")
    train = load_dataset(CALIB, "train", limit=args.ft_samples, seed=0)
    calib = load_dataset(CALIB, "train", limit=args.calib_samples + RECOVERY_HOLDOUT, seed=0, labels=False)
    teacher = OnnxTeacher(reference.onnx, threads=args.threads)
    original = evaluate_onnx(reference.onnx, test, threads=args.threads)
    for record, starts in planned:
        record["rows"]["original"]["accuracy"] = {"-": original}
        for start in starts:
            method = "lsq" if start.plan is not None else "bn"
            recovered, report = recover_start(start, method, calib, args.threads, reference.onnx)
            accuracy = {
                "as pruned": evaluate_onnx(start.model, test, threads=args.threads),
                method: evaluate_onnx(recovered, test, threads=args.threads),
            }
            # one fine-tune per model: BN recalibration changes only running statistics, which the
            # fine-tune (BatchNorm in training mode) replaces, so from either start it ends the same
            tuned, seconds = finetune(recovered, train, teacher, args.ft_lr, work, args.ft_warmup)
            accuracy[f"{method} + FT"] = evaluate_onnx(tuned, test, threads=args.threads)
            log.info("%s %s: %s (%.0f s)", record["target"], start.criterion, accuracy, seconds)
            record["rows"][start.criterion] |= {
                "accuracy": accuracy,
                "recovery": method,
                "recovery_s": report["seconds"],
            }
            save()


def noise(side: dict[str, object]) -> float:
    """Gap between a model's fastest and second-fastest round medians, relative (0 with one round)."""
    medians = sorted(side["round_medians_ms"])
    return medians[1] / medians[0] - 1 if len(medians) > 1 else 0.0


def faster_every_round(side: dict[str, object], peer: dict[str, object]) -> bool:
    """Whether a model ran no slower than the peer in every interleaved round: the paired comparison
    holds when the host's speed level flips between rounds, which the fastest-round gap calls noise."""
    pairs = list(zip(side["round_medians_ms"], peer["round_medians_ms"], strict=True))
    return len(pairs) > 1 and all(mine <= theirs for mine, theirs in pairs)


def render(payload: dict[str, object]) -> str:
    settings, profile, loads = payload["settings"], payload["profile"], payload["loads"]
    warmup = f", warm-up over {settings['ft_warmup']:g} of the steps" if settings.get("ft_warmup") else ""
    title, description = reference_text(payload)
    lines = [
        *header(
            f"Accuracy at equal latency: {title} on Fashion-MNIST (onnxruntime CPU, "
            f"{settings['threads']} threads, batch {settings.get('batch', 1)})",
            payload["machine"],
            __doc__,
        ),
        f"Baseline: {description}.\n",
        f"Profile: {profile['seconds']:.0f} s, {profile['signatures']} signatures; the original "
        f"{profile['end_to_end_ms']:.3f} ms whole, its layers sum to {profile['layers_sum_ms']:.3f} ms. "
        f"Timing: {settings['rounds']} interleaved rounds of {settings['runs']} runs, "
        f"{'at priority -20' if settings['priority'] else 'at normal priority'}; the original is timed "
        "with each target. BN recalibration changes only BatchNorm's numbers, so a Torch-Pruning model's "
        f"latency is its as-pruned model's. Calibration: {settings['calib_samples']:,} images; fine-tune: "
        f"{settings['ft_samples']:,} images at lr {settings.get('ft_lr', DEMO_FT_LR)}"
        f"{warmup}.\n",
        f"Load average (1, 5, 15 min) after the profile: {loads.get('profile')}; after timing: "
        f"{loads.get('timing')}; after the accuracies and fine-tunes: {loads.get('accuracy', 'not run')}.\n",
    ]
    for record in payload["records"]:
        rows = record["rows"]
        lines.append(
            f"## {record['target']:.0%} of the MACs by Torch-Pruning\n\n"
            f"F = {record['latency_fraction']:.3f}: {record['anchor']}'s "
            f"{record['anchor_timing_ms'][record['anchor']]:.3f} ms over the original's "
            f"{record['anchor_timing_ms']['original']:.3f} ms, measured before planning.\n"
        )
        table = []
        for key, side in rows.items():
            if "failure" in side:
                table.append([key, "", f"failed: {side['failure']}", "", "", "", "", ""])
                continue
            for start, accuracy in side.get("accuracy", {"-": None}).items():
                if start.endswith("+ FT"):
                    continue
                tuned = side.get("accuracy", {}).get(f"{start} + FT")
                table.append(
                    [
                        key,
                        STARTS.get(start, start),
                        f"{side['macs_kept']:.3f}",
                        f"{side['predicted_ms']:.3f}",
                        f"{side['latency_ms']:.3f}" if "latency_ms" in side else "-",
                        f"{side['speedup']:.2f}x" if "speedup" in side else "-",
                        pct(accuracy),
                        pct(tuned),
                    ]
                )
        lines.append(
            markdown_table(
                [
                    "plan",
                    "start",
                    "MACs kept",
                    "predicted ms",
                    "measured ms",
                    "speed-up",
                    "no FT",
                    "after FT",
                ],
                table,
            )
        )
    lines.append("## Goals\n")
    lines += [line for record in payload["records"] for line in goal(record)]
    return "\n".join(lines) + "\n"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f} %"


def best_tuned(side: dict[str, object]) -> float | None:
    return max((v for k, v in side.get("accuracy", {}).items() if k.endswith("+ FT")), default=None)


def goal(record: dict[str, object]) -> list[str]:
    """At this target: our best fine-tuned accuracy among models as fast as Torch-Pruning's best one."""
    rows = record["rows"]
    head = f"- {record['target']:.0%} of the MACs: at equal latency, ours after FT >= Torch-Pruning's best"
    peers = [k for k, s in rows.items() if k.startswith("Torch-Pruning") and best_tuned(s) is not None]
    mine = [k for k, s in rows.items() if k.startswith("graphprune") and best_tuned(s) is not None]
    if not peers or not mine or any("latency_ms" not in rows[k] for k in peers + mine):
        return [f"{head}: not measured"]
    peer = max(peers, key=lambda k: best_tuned(rows[k]))
    limit = rows[peer]["latency_ms"]
    margin = {k: max(noise(rows[k]), noise(rows[peer])) for k in mine}
    paired = {k: faster_every_round(rows[k], rows[peer]) for k in mine}
    fast = [k for k in mine if rows[k]["latency_ms"] <= limit * (1 + margin[k]) or paired[k]]
    best = max(fast, key=lambda k: best_tuned(rows[k]), default=None)
    verdict = "NOT met" if best is None or best_tuned(rows[best]) < best_tuned(rows[peer]) else "met"
    if best is not None and margin[best] > NOISE_LIMIT and not paired[best]:
        verdict = f"not settled, timing noise {margin[best]:.0%} > {NOISE_LIMIT:.0%}"
    ours_text = "none of ours as fast" if best is None else f"ours {pct(best_tuned(rows[best]))}, {best}"
    lines = [
        f"{head}: **{verdict}** ({ours_text}; {peer} {pct(best_tuned(rows[peer]))} at {limit:.3f} ms). "
        "Each of ours, measured against that latency within the noise:"
    ]
    lines += [
        f"  - {k}: {rows[k]['latency_ms']:.3f} ms ({'as fast' if k in fast else 'slower'}, noise "
        f"{margin[k]:.1%}{'; no slower in every round' if paired[k] else ''}), "
        f"{pct(best_tuned(rows[k]))} after FT"
        for k in mine
    ]
    return lines


def loads() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv)
    reference = reference_from(args)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "provider", "baseline")}
    payload: dict[str, object] = {
        "machine": machine(),
        "reference": reference.describe(),
        "settings": settings,
        "loads": {},
        "records": [],
    }
    stem = OUT + reference.suffix + (f"_b{args.batch}" if args.batch != 1 else "")
    stem += f"_tp_round{args.tp_round_to}" if args.tp_round_to else ""

    def save() -> None:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / f"{stem}.json", payload)
        write_text(args.out / f"{stem}.md", render(payload))

    with tempfile.TemporaryDirectory(prefix="bench-latacc-") as scratch:
        work = Path(scratch)
        with high_priority(args.priority):
            start = time.perf_counter()
            table = api.profile_latency(
                reference.onnx,
                batch=args.batch,
                threads=args.threads,
                timing=Timing(rounds=args.profile_rounds, points=args.profile_points),
            )
            payload["loads"]["profile"] = loads()
        payload["profile"] = {
            "seconds": time.perf_counter() - start,
            "signatures": len(table.curves),
            "end_to_end_ms": table.end_to_end_ms,
            "layers_sum_ms": table.layers_sum_ms,
        }
        planned = [plan_target(target, table, reference, work, args) for target in args.targets]
        payload["records"] = [record for record, _, _ in planned]
        with high_priority(args.priority):
            time_models([(record, paths) for record, paths, _ in planned], args)
            payload["loads"]["timing"] = loads()
        save()
        measure_accuracy(args, reference, [(record, starts) for record, _, starts in planned], save, work)
        payload["loads"]["accuracy"] = loads()
        save()
    print((args.out / f"{stem}.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
