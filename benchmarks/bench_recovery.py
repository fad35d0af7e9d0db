"""Recovery without training on the shipped Fashion-MNIST ResNet-20 (graphprune.surgery.recover).

For each criterion (l1, bn), `--round-to` value and MACs target (0.5 and 0.3 of the original), the model
is pruned and verified once (`recover="none"`), then recovered with `graphprune.recover` by "bn" (BN
recalibration + bias correction) and "lsq" (least-squares reconstruction + BN) on 1,024 seeded
training images; 256 further training images measure agreement with the original, and the 10,000 test
images measure top-1 accuracy. No training anywhere. Recovery time is recovery alone (onnxruntime and
numpy on `--threads` threads). Peak memory: recovery of one pruned model in a fresh process with 1,024
and with 10,240 calibration images (images loaded before the peak is reset), which should stay flat.

Torch-Pruning's best criteria at the same MACs (MagnitudeImportance p=1 and p=2, stepped until
graphprune's count of its export meets the target, as in bench_criteria.py) are measured beside: as
pruned (it has no recovery step), and with graphprune's BN recalibration (which needs no plan).

`--part finetune`: every starting point (the unpruned baseline as a control; graphprune l1 and blend
with lsq recovery; Torch-Pruning as pruned) gets the same short fine-tune, with and without the
original as a distillation teacher: 1 epoch on `--ft-samples` seeded training images (15,000: the
demo's fine-tune; 60,000: a full epoch), SGD at `--ft-lr` (0.01: the demo's) cosine, batch 128,
augmentation, torch on `--threads` threads, exported and evaluated on the 10,000 test images. Each
budget (images, learning rate) is its own table.

Goals (reported, not asserted): at half the MACs >= 85% test accuracy with no training and, after the
fine-tune, within 0.3 points of the baseline; at 0.3 >= 60% with no training and, after the fine-tune,
>= Torch-Pruning's best + 1 point; lsq on 1,024 images in <= 10 s on 2 cores; peak memory flat.

Writes results/recovery.json and recovery.md; re-running a part replaces only the rows it measures.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch
from bench_criteria import TP_CRITERIA
from common import RESULTS, Failure, machine, machine_line, markdown_table, write_json, write_text
from peer import Reference, prune_to_macs

from graphprune import PlanOptions, prune, recover
from graphprune.api import RECOVERY_HOLDOUT, model_cost
from graphprune.cli.demo import REFERENCE
from graphprune.data import ArrayDataset, load_dataset
from graphprune.errors import GraphPruneError
from graphprune.planning import PruningPlan
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.search.blend import BlendConfig
from graphprune.surgery.recover import recalibrate_batchnorm
from graphprune.torch_bridge.distill import OnnxTeacher
from graphprune.torch_bridge.foldback import onnx_to_module, verify_foldback
from graphprune.torch_bridge.train import TrainConfig, export_trained, fit

log = logging.getLogger("bench_recovery")
METHODS = ("none", "bn", "lsq")
GOALS = {0.5: 0.85, 0.3: 0.60}
GOAL_SECONDS = 10.0
FINETUNE_GOAL_BASELINE = 0.003  # at half the MACs: within 0.3 points of the fine-tuned baseline
FINETUNE_GOAL_PEER = 0.01  # at 0.3: Torch-Pruning's best + 1 point
CALIB = "fashion-mnist"
SAMPLE_SHAPE = (1, 28, 28)
BLEND_HOLDOUT = 1000
PEERS = ("Magnitude p=1", "Magnitude p=2")
# What identifies a row: a re-run replaces the saved rows with the same key and keeps the others.
ROW_KEYS = ("criterion", "round_to", "target_macs", "method", "teacher", "ft_samples", "ft_lr")
DEMO_FT_SAMPLES = 15000
DEMO_FT_LR = 0.01


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field.")


def child_memory(images: int, method: str, threads: int) -> dict[str, object]:
    """Recover the l1 half-MACs model on `images` images; peak RSS during recovery over RSS before."""
    from graphprune.surgery.recover import RecoveryConfig, recover_model

    result = prune(REFERENCE, PlanOptions(target_macs=0.5), criterion="l1", recover="none")
    data = load_dataset(CALIB, "train", limit=images, seed=0)
    rss_loaded = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    start = time.perf_counter()
    _, report = recover_model(
        result.dep, result.removed, result.model, data.images, RecoveryConfig(method, threads=threads)
    )
    return {
        "images": images,
        "method": method,
        "rss_loaded_kb": rss_loaded,
        "peak_kb": status_kb("VmHWM"),
        "peak_over_loaded_kb": status_kb("VmHWM") - rss_loaded,
        "seconds": round(time.perf_counter() - start, 2),
        "cpu_seconds": round(report.cpu_seconds, 2),
    }


def run_memory(images: int, method: str, threads: int) -> dict[str, object]:
    command = [
        sys.executable,
        __file__,
        "--child",
        str(images),
        "--method",
        method,
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory child failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@dataclass
class Start:
    """A pruned model to recover: graphprune's (with the plan recovery needs) or Torch-Pruning's."""

    criterion: str
    round_to: int | str
    target: float
    model: onnx.ModelProto
    plan: PruningPlan | None

    def key(self) -> dict[str, object]:
        return {"criterion": self.criterion, "round_to": self.round_to, "target_macs": self.target}


def graphprune_start(criterion: str, round_to: int, target: float, calib_samples: int) -> Start:
    """graphprune's verified prune, not yet recovered; the blend searches with 1,000 more images held out."""
    blend = criterion == "blend"
    pruned = prune(
        REFERENCE,
        PlanOptions(target_macs=target, round_to=round_to),
        criterion=criterion,
        calib=CALIB if blend else None,
        calib_samples=calib_samples + BLEND_HOLDOUT if blend else None,
        criterion_options={"config": blend_config(calib_samples)} if blend else None,
        recover="none",
    )
    return Start(criterion, round_to, target, pruned.model, pruned.plan)


def blend_config(calib_samples: int) -> BlendConfig:
    """The library's default search, BLEND_HOLDOUT images held out to judge the candidates."""
    return BlendConfig(
        holdout=BLEND_HOLDOUT / (calib_samples + BLEND_HOLDOUT), eval_samples=BLEND_HOLDOUT, progress=False
    )


def torch_pruning_start(
    label: str,
    target: float,
    work: Path,
    reference: Reference | None = None,
    round_to: int | None = None,
) -> Start:
    """Torch-Pruning's export of `reference` (default: the shipped ResNet-20) at graphprune's count of
    the target (peer.prune_to_macs), its widths rounded to `round_to` by Torch-Pruning when given."""
    reference = reference or Reference()
    base = model_cost(onnx.load(str(reference.onnx))).macs
    peer = prune_to_macs(
        reference.module(),
        TP_CRITERIA[label](),
        target,
        base,
        SAMPLE_SHAPE,
        work / "tp_probe.onnx",
        round_to=round_to,
    )
    name = f"Torch-Pruning {label}" + (f" round_to={round_to}" if round_to else "")
    return Start(name, round_to or "-", target, peer.model, None)


def recover_start(
    start: Start, method: str, calib: ArrayDataset, threads: int, original: Path = REFERENCE
) -> tuple[onnx.ModelProto, dict]:
    """`start` (pruned from `original`) recovered by `method` on `calib`, and what to report of it.  A
    Torch-Pruning model has no plan: it gets BN recalibration of every BatchNormalization (lsq needs the
    plan's removed channels)."""
    if start.plan is None:
        begin, cpu = time.perf_counter(), time.process_time()
        model = recalibrate_batchnorm(start.model, calib.images, threads=threads)
        return model, {
            "seconds": round(time.perf_counter() - begin, 2),
            "cpu_seconds": round(time.process_time() - cpu, 2),
        }
    done = recover(
        original,
        start.model,
        calib,
        plan=start.plan,
        method=method,
        calib_samples=len(calib),
        threads=threads,
    )
    report = done.report
    return done.model, {
        "seconds": round(report.seconds, 2),
        "cpu_seconds": round(report.cpu_seconds, 2),
        "heldout_agreement": report.agreement,
        "heldout_rel_error": round(report.rel_error, 4),
        "agreement_before": report.agreement_before,
        "rel_error_before": round(report.rel_error_before, 4),
        "skipped": report.skipped,
    }


def starts(args: argparse.Namespace, work: Path) -> Iterator[Start | dict[str, object]]:
    """Every starting point the arguments ask for; a plan that cannot be made comes as a failure row."""
    for target in args.targets:
        for criterion in args.criteria:
            for round_to in args.round_to if criterion != "blend" else [1]:
                try:
                    yield graphprune_start(criterion, round_to, target, args.calib_samples)
                except GraphPruneError as exc:
                    key = {"criterion": criterion, "round_to": round_to, "target_macs": target}
                    yield key | {"failure": asdict(Failure.from_exception("prune", exc))}
        for label in args.peer:
            yield torch_pruning_start(label, target, work)


def accuracy_rows(
    args: argparse.Namespace, save: Callable[[list[dict[str, object]]], None], work: Path
) -> None:
    """Every starting point x recovery method, merged into the saved rows after each."""
    test = load_dataset(CALIB, "test")
    calib = load_dataset(CALIB, "train", limit=args.calib_samples + RECOVERY_HOLDOUT, seed=0, labels=False)
    rows: list[dict[str, object]] = []

    def add(row: dict[str, object]) -> None:
        log.info("%s", row)
        rows.append(row)
        save(rows)

    add(
        {
            "criterion": "-",
            "round_to": "-",
            "target_macs": 1.0,
            "method": "original",
            "accuracy": evaluate_onnx(REFERENCE, test, threads=args.threads),
        }
    )
    for start in starts(args, work):
        if isinstance(start, dict):
            add(start)
            continue
        kept = round(model_cost(start.model).macs / model_cost(onnx.load(str(REFERENCE))).macs, 4)
        methods = METHODS if start.plan is not None else ("none", "bn")
        for method in methods:
            row = start.key() | {"macs_kept": kept, "method": method}
            model = start.model
            if method != "none":
                model, measured = recover_start(start, method, calib, args.threads)
                row |= measured
            row["accuracy"] = evaluate_onnx(model, test, threads=args.threads)
            add(row)


def finetune_rows(
    args: argparse.Namespace, save: Callable[[list[dict[str, object]]], None], work: Path
) -> None:
    """The same short fine-tune, with and without the original as teacher, from every starting point:
    the baseline (control), graphprune with lsq recovery, Torch-Pruning as pruned."""
    torch.set_num_threads(args.threads)
    test = load_dataset(CALIB, "test")
    train = load_dataset(CALIB, "train", limit=args.ft_samples, seed=0)
    calib = load_dataset(CALIB, "train", limit=args.calib_samples + RECOVERY_HOLDOUT, seed=0, labels=False)
    teacher = OnnxTeacher(REFERENCE, threads=args.threads)
    base_macs = model_cost(onnx.load(str(REFERENCE))).macs
    begin = [("baseline", "-", 1.0, "none", onnx.load(str(REFERENCE)))]
    rows: list[dict[str, object]] = []

    def points() -> Iterator[tuple[str, object, float, str, onnx.ModelProto]]:
        yield from begin
        for start in starts(args, work):
            if isinstance(start, dict):
                rows.append(start)
                continue
            if start.plan is None:
                yield start.criterion, start.round_to, start.target, "none", start.model
            else:
                model, _ = recover_start(start, "lsq", calib, args.threads)
                yield start.criterion, start.round_to, start.target, "lsq", model

    for criterion, round_to, target, method, model in points():
        before = evaluate_onnx(model, test, threads=args.threads)
        for distilled in (False, True):
            tuned, seconds = finetune(model, train, teacher if distilled else None, args.ft_lr, work)
            row = {
                "criterion": criterion,
                "round_to": round_to,
                "target_macs": target,
                "macs_kept": round(model_cost(tuned).macs / base_macs, 4),
                "method": method,
                "teacher": distilled,
                "ft_samples": args.ft_samples,
                "ft_lr": args.ft_lr,
                "accuracy_before": before,
                "accuracy": evaluate_onnx(tuned, test, threads=args.threads),
                "finetune_s": seconds,
            }
            log.info("%s", row)
            rows.append(row)
            save(rows)


def finetune(
    model: onnx.ModelProto,
    train: ArrayDataset,
    teacher: OnnxTeacher | None,
    lr: float,
    work: Path,
    warmup: float = 0.0,
) -> tuple[onnx.ModelProto, float]:
    """`model` folded back to torch (checked equal to its graph), fine-tuned on `train` for 1 epoch at
    `lr` (cosine, the demo's schedule, ramped up over the `warmup` share of the steps; on the CPU;
    distilled from `teacher` when given) and re-exported; and the fine-tune's seconds."""
    module = onnx_to_module(model)
    verify_foldback(module, model)
    clock = time.perf_counter()
    config = TrainConfig(
        epochs=1, lr=lr, schedule="cosine", seed=0, device="cpu", progress=False, warmup=warmup
    )
    fit(module, train, None, config, teacher=teacher)
    tuned = export_trained(module, work / "finetuned.onnx", train.sample_shape)
    return tuned, round(time.perf_counter() - clock, 1)


def render(payload: dict[str, object]) -> str:
    rows = payload["rows"]
    lines = [
        "# Recovery: shipped ResNet-20 on Fashion-MNIST, without training and after a short fine-tune\n",
        machine_line(payload["machine"]),
        f"Calibration: {payload['calib_samples']:,} seeded training images to fit, {RECOVERY_HOLDOUT} more "
        "held out for the agreement columns; accuracy on the 10,000 test images. Recovery time is the "
        f"recovery alone on {payload['threads']} onnxruntime threads. Torch-Pruning has no recovery step: "
        "its rows are its export as pruned, and with graphprune's BN recalibration (every BN, on the same "
        "images; least squares needs graphprune's plan). The blend runs the library's default search "
        f"({BlendConfig.population} x {BlendConfig.generations}), {BLEND_HOLDOUT:,} more images held out as "
        "its fitness set.\n",
        "## No training\n",
        f"Load average while running (other jobs may share the 2 cores): {payload.get('rows_load_average')}.\n",
        markdown_table(
            [
                "criterion",
                "round-to",
                "target",
                "MACs kept",
                "recovery",
                "test top-1",
                "agreement",
                "rel err",
                "s",
                "CPU s",
            ],
            [
                [
                    r["criterion"],
                    r["round_to"],
                    r["target_macs"],
                    r.get("macs_kept", ""),
                    r["method"],
                    pct(r["accuracy"]),
                    "" if r.get("heldout_agreement") is None else f"{100 * r['heldout_agreement']:.1f} %",
                    r.get("heldout_rel_error", ""),
                    r.get("seconds", ""),
                    r.get("cpu_seconds", ""),
                ]
                for r in rows
                if "failure" not in r
            ],
        ),
    ]
    for r in rows:
        if "failure" in r:
            lines.append(
                f"\n- {r['criterion']}, round-to {r['round_to']}, target {r['target_macs']}: no plan "
                f"({r['failure']['error']})"
            )
    tuned = payload.get("finetune", [])
    if tuned:
        lines += render_finetune(payload, tuned)
    lines.append("\n## Goals\n")
    lines += goals(payload, rows, tuned)
    memory = payload.get("memory", [])
    if memory:
        lines.append("\n## Peak memory of recovery (l1, half the MACs, fresh process each)\n")
        lines.append(
            markdown_table(
                ["method", "images", "peak RSS over RSS before (MB)", "s", "CPU s"],
                [
                    [
                        m["method"],
                        f"{m['images']:,}",
                        f"{m['peak_over_loaded_kb'] / 1024:.1f}",
                        m["seconds"],
                        m["cpu_seconds"],
                    ]
                    for m in memory
                ],
            )
        )
        lines.append(
            "\nThe images themselves are loaded before the peak is reset: what is measured is what recovery "
            "allocates (sums of X^T X, one batch of im2col patches, onnxruntime sessions)."
        )
    return "\n".join(lines) + "\n"


def pct(value: float) -> str:
    return f"{100 * value:.2f} %"


def budgets(tuned: list[dict[str, object]]) -> list[tuple[int, float]]:
    """The fine-tune budgets (training images, learning rate) measured, smallest first."""
    return sorted({(int(r["ft_samples"]), float(r["ft_lr"])) for r in tuned if "ft_samples" in r})


def budget_key(samples: int, lr: float) -> str:
    """A budget's key in the results' per-budget records."""
    return f"{samples} lr {lr:g}"


def of_budget(tuned: list[dict[str, object]], samples: int, lr: float) -> list[dict[str, object]]:
    return [r for r in tuned if r.get("ft_samples") == samples and r.get("ft_lr") == lr]


def render_finetune(payload: dict[str, object], tuned: list[dict[str, object]]) -> list[str]:
    lines = []
    loads = payload.get("finetune_load_averages", {})
    for samples, lr in budgets(tuned):
        label = (
            "the demo's" if samples == DEMO_FT_SAMPLES else "a full epoch" if samples == 60000 else "a subset"
        )
        lines += [
            f"\n## After the same short fine-tune: 1 epoch on {samples:,} images ({label}), lr {lr:g}\n",
            f"Load average while running: {loads.get(budget_key(samples, lr))}. "
            f"Fine-tune: 1 epoch on {samples:,} seeded training images, SGD Nesterov lr {lr:g} cosine, "
            "batch 128, pad-crop + flip, seed 0, on the CPU; with the teacher: the original through "
            "onnxruntime, loss 0.5 CE + 0.5 T^2 KL at T = 4. Every start is folded back with onnx2torch "
            "(checked equal to its graph) and the fine-tuned module re-exported and evaluated through "
            "onnxruntime.\n",
            markdown_table(
                [
                    "start",
                    "round-to",
                    "target",
                    "MACs kept",
                    "recovery",
                    "before FT",
                    "FT",
                    "FT + teacher",
                    "FT s",
                ],
                [
                    [
                        plain["criterion"],
                        plain["round_to"],
                        plain["target_macs"],
                        plain["macs_kept"],
                        plain["method"],
                        pct(plain["accuracy_before"]),
                        pct(plain["accuracy"]),
                        pct(distilled["accuracy"]) if distilled else "",
                        plain["finetune_s"],
                    ]
                    for plain, distilled in pairs(of_budget(tuned, samples, lr))
                ],
            ),
        ]
    return lines


def pairs(tuned: list[dict[str, object]]) -> list[tuple[dict[str, object], dict[str, object] | None]]:
    """Each start's fine-tune without the teacher and (when run) with it."""
    distilled = {row_key(r | {"teacher": False}): r for r in tuned if r.get("teacher")}
    return [(r, distilled.get(row_key(r))) for r in tuned if "failure" not in r and not r.get("teacher")]


def goals(
    payload: dict[str, object], rows: list[dict[str, object]], tuned: list[dict[str, object]]
) -> list[str]:
    """Each goal of the issue with the best row that speaks to it."""
    lines = []
    ours = [r for r in rows if "accuracy" in r and not str(r["criterion"]).startswith("Torch-Pruning")]
    for target, goal in GOALS.items():
        best = max((r for r in ours if r["target_macs"] == target), key=lambda r: r["accuracy"], default=None)
        if best is not None:
            verdict = "met" if best["accuracy"] >= goal else "NOT met"
            lines.append(
                f"- {target:.0%} of the MACs, >= {goal:.0%} without training: {verdict} (best "
                f"{pct(best['accuracy'])}, {best['criterion']}, round-to {best['round_to']}, {best['method']})"
            )
    for samples, lr in budgets(tuned):
        lines += finetune_goals([r for r in of_budget(tuned, samples, lr) if "accuracy" in r], samples, lr)
    lsq = [(r["seconds"], r["cpu_seconds"]) for r in rows if r.get("method") == "lsq"]
    if lsq:
        wall, cpu = [w for w, _ in lsq], [c for _, c in lsq]
        verdict = "met" if max(wall) <= GOAL_SECONDS else "NOT met"
        lines.append(
            f"- lsq on {payload['calib_samples']:,} images in <= {GOAL_SECONDS:.0f} s: {verdict} "
            f"({min(wall):.1f}-{max(wall):.1f} s wall; {min(cpu):.1f}-{max(cpu):.1f} CPU seconds of the "
            "process, all threads)"
        )
    return lines


def finetune_goals(done: list[dict[str, object]], samples: int, lr: float) -> list[str]:
    """The two after-fine-tune goals, judged on the fine-tunes of one budget."""
    lines = []
    budget = f"after the fine-tune on {samples:,} images at lr {lr:g}"
    control = next((r for r in done if r["criterion"] == "baseline" and not r["teacher"]), None)
    baseline = max((r["accuracy"] for r in done if r["criterion"] == "baseline"), default=None)
    for target in GOALS:
        mine = [r for r in done if r["target_macs"] == target and not r["criterion"].startswith("Torch")]
        peer = [r for r in done if r["target_macs"] == target and r["criterion"].startswith("Torch")]
        best = max(mine, key=lambda r: r["accuracy"], default=None)
        if best is None:
            continue
        teacher = "with" if best["teacher"] else "without"
        if target == 0.5 and baseline is not None:
            # judged against both: the baseline given the same fine-tune, and the original as shipped
            readings = [("the baseline fine-tuned alike", baseline)]
            readings += [("of the original", control["accuracy_before"])] if control else []
            judged = "; ".join(
                f"{who} ({pct(accuracy)}): "
                f"{'met' if best['accuracy'] >= accuracy - FINETUNE_GOAL_BASELINE else 'NOT met'}"
                for who, accuracy in readings
            )
            lines.append(
                f"- 50% of the MACs {budget}, within 0.3 points of {judged} (best {pct(best['accuracy'])}, "
                f"{best['criterion']} + {best['method']}, {teacher} teacher)"
            )
        top_peer = max(peer, key=lambda r: r["accuracy"], default=None)
        if target == 0.3 and top_peer is not None:
            verdict = "met" if best["accuracy"] >= top_peer["accuracy"] + FINETUNE_GOAL_PEER else "NOT met"
            lines.append(
                f"- 30% of the MACs {budget}, >= Torch-Pruning's best + 1 point: {verdict} (ours "
                f"{pct(best['accuracy'])}, {best['criterion']} + {best['method']}, {teacher} teacher; "
                f"Torch-Pruning {pct(top_peer['accuracy'])}, {top_peer['criterion']}, "
                f"{'with' if top_peer['teacher'] else 'without'} teacher)"
            )
    return lines


def row_key(row: dict[str, object]) -> tuple[object, ...]:
    return tuple(row.get(k) for k in ROW_KEYS)


def merged(saved: list[dict[str, object]], fresh: list[dict[str, object]]) -> list[dict[str, object]]:
    """The saved rows with those `fresh` measures again replaced, in the saved order, new ones last."""
    by_key = {row_key(r): r for r in fresh}
    kept = [by_key.pop(row_key(r), r) for r in saved]
    return kept + list(by_key.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criteria", nargs="+", default=["l1", "bn", "blend"])
    parser.add_argument("--peer", nargs="*", default=list(PEERS), help="Torch-Pruning importances")
    parser.add_argument("--round-to", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3])
    parser.add_argument("--calib-samples", type=int, default=1024)
    parser.add_argument(
        "--ft-samples", type=int, default=DEMO_FT_SAMPLES, help="fine-tune images (default: the demo's)"
    )
    parser.add_argument(
        "--ft-lr", type=float, default=DEMO_FT_LR, help="fine-tune learning rate (default: the demo's)"
    )
    parser.add_argument("--memory-images", type=int, nargs="+", default=[1024, 10240])
    parser.add_argument("--memory-methods", nargs="+", default=["lsq"], choices=("bn", "lsq"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--part",
        choices=("all", "rows", "finetune", "memory"),
        default="all",
        help="run only the no-training rows, the fine-tunes or memory",
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--method", default="lsq", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child_memory(args.child, args.method, args.threads)))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    path = args.out / "recovery.json"
    loaded = json.loads(path.read_text()) if path.exists() else {}

    def save(part: str, value: list[dict[str, object]]) -> None:
        """Merge this part's rows into the results file (other parts may come from parallel runs)."""
        payload = json.loads(path.read_text()) if path.exists() else {}
        payload.pop("load_average", None)  # the results before loads were recorded per part
        payload |= {
            "machine": machine(),
            "calib_samples": args.calib_samples,
            part: merged(loaded.get(part, []), value) if part != "memory" else value,
            f"{part}_load_average": " / ".join(f"{v:.1f}" for v in os.getloadavg()),
        }
        if part == "rows":  # the recovery times in the header are the rows' own
            payload["threads"] = args.threads
        if part == "finetune":
            payload.setdefault("finetune_load_averages", {})[budget_key(args.ft_samples, args.ft_lr)] = (
                payload["finetune_load_average"]
            )
        payload.setdefault("rows", [])
        write_json(path, payload)
        write_text(args.out / "recovery.md", render(payload))

    with tempfile.TemporaryDirectory() as work:
        if args.part in ("all", "rows"):
            accuracy_rows(args, lambda rows: save("rows", rows), Path(work))
        if args.part in ("all", "finetune"):
            finetune_rows(args, lambda rows: save("finetune", rows), Path(work))
    if args.part in ("all", "memory"):
        save(
            "memory",
            [run_memory(n, m, args.threads) for m in args.memory_methods for n in args.memory_images],
        )
    print((args.out / "recovery.md").read_text())


if __name__ == "__main__":
    main()
