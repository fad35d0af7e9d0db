"""graphprune vs Torch-Pruning 1.6.1 on a trained Fashion-MNIST model at matched MACs, with one
fine-tune budget for everyone: the shipped ResNet-20 by default, or `--model vgg11_bn --baseline
FILE.onnx` (trained by tools/train_reference.py; `--device cuda` fine-tunes on a GPU).

Both tools start from the same weights (the baseline ONNX; Torch-Pruning gets them on the zoo module
via `apply_to_module`). For each MACs target (0.5 and 0.3 of the
baseline) and each criterion pair:

- **graphprune**: `prune(baseline.onnx, PlanOptions(target_macs=F), criterion=l1|bn|random)`, verified
  against the masked reference, folded back onto the zoo module by parameter name (`verify_foldback`
  checks the fold-back is exact);
- **Torch-Pruning**: `tp.pruner.MetaPruner` on the zoo module with `GroupMagnitudeImportance(p=1)`,
  `BNScaleImportance` or `RandomImportance`, classifier ignored, local pruning, stepped in small
  iterative steps until its own MACs count meets the target and then until graphprune's cost model on
  the export does too (so both tools meet the target under the same counter);
- then the same fine-tune for everyone (`graphprune.torch_bridge.train.fit`), exported, and every
  model is evaluated through onnxruntime on the full test set, counted by `graphprune.runtime.cost`,
  and timed with `graphprune.runtime.bench` (1 thread, batch 1 and 32, interleaved rounds, best round).

The optional `recipes` stage runs the training-time recipes (Gate Decorator, Network Slimming) from the
same baseline on a reduced budget and adds them to the same results file.

Writes results/fashion_mnist[_MODEL].json, .md and .png; the JSON is rewritten after every row, so a run
that is cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx
import torch
from common import (
    RESULTS,
    Failure,
    high_priority,
    machine,
    machine_line,
    markdown_table,
    write_json,
    write_text,
)
from peer import (
    TP_MAX_RATIO,
    TP_STEPS,
    Reference,
    add_reference_args,
    prune_to_macs,
    reference_from,
    reference_text,
    tp,
)
from torch import nn
from tqdm import tqdm

from graphprune.api import model_cost, prune
from graphprune.data import ArrayDataset, load_dataset
from graphprune.onnxutil import conv_channels
from graphprune.planning import PlanOptions
from graphprune.report.plots import plot_accuracy_vs_macs
from graphprune.runtime.bench import bench
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.torch_bridge.foldback import apply_to_module, verify_foldback
from graphprune.torch_bridge.train import TrainConfig, export_trained, fit
from graphprune.zoo import build

log = logging.getLogger("bench_fashion_mnist")

# graphprune criterion -> (Torch-Pruning importance label, factory)
CRITERIA: dict[str, tuple[str, Callable[[], object]]] = {
    "l1": ("GroupMagnitude p=1", lambda: tp().importance.GroupMagnitudeImportance(p=1)),
    "bn": ("BNScale", lambda: tp().importance.BNScaleImportance()),
    "random": ("Random", lambda: tp().importance.RandomImportance()),
}
STAGES = {"main", "recipes", "seeds", "render"}


@dataclass(frozen=True)
class Budget:
    """The fine-tune every pruned model (and the unpruned control) gets, and the evaluation set."""

    train_samples: int = 10_000
    test_samples: int | None = None
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    augment: bool = True
    seed: int = 0
    threads: int = 1
    device: str = "cpu"

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            schedule="cosine",
            augment=self.augment,
            seed=self.seed,
            device=self.device,
        )


@dataclass
class Row:
    """One pruned (or baseline) model: what went in, what came out, how long it took."""

    tool: str
    criterion: str
    target: float | None
    macs: int | None = None
    params: int | None = None
    macs_kept: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    prune_s: float | None = None
    finetune_s: float | None = None
    wall_s: float | None = None
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_rounds: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    details: dict[str, object] = field(default_factory=dict)
    channels: dict[str, int] = field(default_factory=dict)
    failure: dict[str, str] | None = None
    path: str | None = None


@dataclass
class Context:
    """Data, baseline and work folder shared by every row."""

    reference: Reference
    budget: Budget
    train: ArrayDataset
    test: ArrayDataset
    work: Path
    base_macs: int
    base_params: int


@contextmanager
def timed(row: Row, key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        setattr(row, key, round(time.perf_counter() - start, 2))


def measure(row: Row, path: Path, ctx: Context) -> None:
    """Cost, channel widths and (full test set, onnxruntime, 1 thread) accuracy of an exported model."""
    proto = onnx.load(str(path))
    cost = model_cost(proto)
    row.macs, row.params = cost.macs, cost.params
    row.macs_kept = round(cost.macs / ctx.base_macs, 4)
    row.channels = conv_channels(proto)
    row.path = str(path)


def finetune(row: Row, module: nn.Module, pruned: Path, ctx: Context, name: str) -> None:
    """Accuracy of the pruned export, then the common fine-tune, export and accuracy again."""
    row.accuracy_before = evaluate_onnx(pruned, ctx.test, threads=ctx.budget.threads)
    with timed(row, "finetune_s"):
        history = fit(module, ctx.train, None, ctx.budget.train_config())
    row.details["train_loss"] = round(history.epochs[-1].train_loss, 4)
    tuned = ctx.work / f"{name}_finetuned.onnx"
    export_trained(module, tuned, ctx.train.sample_shape)
    row.accuracy_after = evaluate_onnx(tuned, ctx.test, threads=ctx.budget.threads)
    measure(row, tuned, ctx)


def run_baseline(ctx: Context) -> Row:
    """The baseline as is ("before"), and after the same fine-tune as everyone (a control)."""
    row = Row("baseline", "-", None)
    start = time.perf_counter()
    finetune(row, ctx.reference.module(), ctx.reference.onnx, ctx, "baseline")
    row.wall_s = round(time.perf_counter() - start, 1)
    row.path = str(ctx.reference.onnx)
    return row


def row_name(tool: str, criterion: str, target: float, seed: int) -> str:
    return f"{tool}_{criterion}_{target}_seed{seed}"


def run_graphprune(criterion: str, target: float, ctx: Context, seed: int) -> Row:
    """`seed` is the pruning seed (the random criterion's draw); the fine-tune keeps the budget's."""
    row = Row("graphprune", criterion, target, details={"prune_seed": seed})
    start = time.perf_counter()
    with timed(row, "prune_s"):
        result = prune(
            ctx.reference.onnx, PlanOptions(target_macs=target), criterion=criterion, seed=seed, verify=True
        )
    name = row_name("graphprune", criterion, target, seed)
    pruned = ctx.work / f"{name}.onnx"
    result.save(pruned)
    row.details["verify_max_rel_error"] = result.verification.max_rel_error
    module = apply_to_module(build(ctx.reference.model), result.model)
    row.details["foldback_max_error"] = verify_foldback(module, result.model)
    finetune(row, module, pruned, ctx, name)
    row.wall_s = round(time.perf_counter() - start, 1)
    return row


def tp_prune(
    module: nn.Module, criterion: str, target: float, ctx: Context, probe: Path, seed: int
) -> dict[str, object]:
    """Torch-Pruning at matched MACs (see peer.prune_to_macs); returns the step details for the row."""
    torch.manual_seed(seed)  # RandomImportance draws from torch's generator
    result = prune_to_macs(
        module, CRITERIA[criterion][1](), target, ctx.base_macs, ctx.train.sample_shape, probe
    )
    return {"tp_steps": result.steps, "tp_ratio": result.ratio, "own_macs_kept": result.own_macs_kept}


def run_torch_pruning(criterion: str, target: float, ctx: Context, seed: int) -> Row:
    """`seed` seeds torch's generator before pruning (RandomImportance's draws)."""
    row = Row("torch-pruning", CRITERIA[criterion][0], target, details={"prune_seed": seed})
    start = time.perf_counter()
    module = ctx.reference.module()
    name = row_name("torch-pruning", criterion, target, seed)
    pruned = ctx.work / f"{name}.onnx"
    with timed(row, "prune_s"):
        row.details.update(tp_prune(module, criterion, target, ctx, pruned, seed))
    finetune(row, module, pruned, ctx, name)
    row.wall_s = round(time.perf_counter() - start, 1)
    return row


def guarded(job: Callable[[], Row], fallback: Row) -> Row:
    """Run one row; a failure is recorded in the row rather than raised."""
    try:
        return job()
    except Exception as exc:  # noqa: BLE001 - a tool failing is a result to report
        log.exception("%s %s %s failed", fallback.tool, fallback.criterion, fallback.target)
        fallback.failure = asdict(Failure.from_exception(f"{fallback.tool} {fallback.criterion}", exc))
        return fallback


def bench_rows(rows: list[Row], args: argparse.Namespace) -> None:
    """ORT latency at batch 1 and 32 on 1 thread, models interleaved per round, best round kept."""
    timed_rows = [row for row in rows if row.path and row.failure is None]
    batches = {"b1": (1, args.runs), "b32": (32, max(5, args.runs // 5))}
    with high_priority(args.priority):
        for _ in tqdm(range(args.rounds), desc="latency rounds", disable=None):
            for row in timed_rows:
                for key, (batch, runs) in batches.items():
                    result = bench(row.path, batch=batch, threads=1, provider="cpu", warmup=5, runs=runs)
                    row.latency_rounds.setdefault(key, []).append(
                        {"median_ms": round(result.median_ms, 3), "p90_ms": round(result.p90_ms, 3)}
                    )
    for row in timed_rows:
        row.latency_ms = {
            key: min(r["median_ms"] for r in rounds) for key, rounds in row.latency_rounds.items()
        }


# Training-time recipes, reduced budget ----------------------------------------------------------


def run_recipes(
    args: argparse.Namespace, reference: Reference, budget: Budget, work: Path
) -> list[dict[str, object]]:
    """Gate Decorator (MACs target 0.3) and Network Slimming (70% of BN channels) from the baseline
    on a reduced budget; each as the `graphprune` command line it is equivalent to."""
    from graphprune.recipes.gate_decorator import GateDecoratorConfig, run_gate_decorator
    from graphprune.recipes.slimming import SlimmingConfig, Start, run_slimming

    start = Start(
        onnx=str(reference.onnx),
        train_limit=budget.train_samples,
        val_limit=budget.test_samples,
        seed=budget.seed,
    )
    train = TrainConfig(
        batch_size=budget.batch_size, lr=args.recipe_lr, seed=budget.seed, device=budget.device
    )
    shared = f"--onnx {reference.onnx.name} --train-limit {budget.train_samples} --lr {args.recipe_lr}"
    if budget.test_samples is not None:
        shared += f" --val-limit {budget.test_samples}"
    recipes = {
        "gate-decorator": (
            f"graphprune gate-decorator {shared} --target-flops 0.3 --ticks 10 --tick-subset 0.1 "
            "--tick-share 0.02 --epochs-tock 1 --epochs-finetune 1",
            lambda: run_gate_decorator(
                GateDecoratorConfig(
                    start=start,
                    output=work / "gate_decorator.onnx",
                    target_flops=0.3,
                    ticks=10,
                    tick_subset=0.1,
                    tick_share=0.02,
                    epochs_tock=1,
                    epochs_finetune=1,
                    train=train,
                )
            ),
        ),
        "slim": (
            f"graphprune slim {shared} --lambda 1e-4 --ratio 0.7 --epochs-sparse 1 --epochs-finetune 1",
            lambda: run_slimming(
                SlimmingConfig(
                    start=start,
                    output=work / "slim.onnx",
                    lam=1e-4,
                    ratio=0.7,
                    epochs_sparse=1,
                    epochs_finetune=1,
                    train=train,
                )
            ),
        ),
    }
    records = []
    for name, (command, job) in recipes.items():
        record: dict[str, object] = {"recipe": name, "command": command}
        begin = time.perf_counter()
        try:
            result = job()
            base = result.stages[0].macs
            record["stages"] = [
                {
                    "label": stage.label,
                    "accuracy": stage.accuracy,
                    "macs": stage.macs,
                    "params": stage.params,
                    "macs_kept": round(stage.macs / base, 4),
                }
                for stage in result.stages
            ]
        except Exception as exc:  # noqa: BLE001 - a failing recipe is a result to report
            log.exception("%s failed", name)
            record["failure"] = asdict(Failure.from_exception(name, exc))
        record["wall_s"] = round(time.perf_counter() - begin, 1)
        records.append(record)
    return records


# Results ----------------------------------------------------------------------------------------


def speedup(base: float | None, value: float | None) -> str:
    return "-" if base is None or not value else f"{base / value:.2f}x"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def number(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render(payload: dict[str, object]) -> str:
    """The results markdown: protocol, the table, failures, the claims we could not test, recipes."""
    rows: list[dict[str, object]] = payload["rows"]  # type: ignore[assignment]
    budget: dict[str, object] = payload["budget"]  # type: ignore[assignment]
    base = next((r for r in rows if r["tool"] == "baseline"), None)
    base_acc = base["accuracy_before"] if base else None
    base_latency = base["latency_ms"] if base else {}
    test = budget["test_samples"] or "10,000 (full test set)"
    title, description = reference_text(payload)
    lines = [
        f"# Fashion-MNIST {title}: graphprune vs Torch-Pruning 1.6.1 at matched MACs\n",
        machine_line(payload["machine"]),  # type: ignore[arg-type]
        f"Wall time: main table {payload.get('wall_s', '-')} s (latency included), recipes "
        f"{sum(r['wall_s'] for r in payload.get('recipes', [])):.1f} s, extra seeds {payload.get('seeds_wall_s', '-')} s.\n",
        "## Protocol\n",
        f"- **Baseline, same for everyone**: {description}. "
        "Torch-Pruning gets the same weights on the zoo module (`apply_to_module(build(MODEL), onnx)`).",
        "- **Targets**: MACs kept <= 0.5 and <= 0.3 of the baseline, both counted by `graphprune.runtime.cost` "
        "on the exported ONNX (Conv/Gemm MACs plus BatchNorm and elementwise work).",
        "- **graphprune**: `prune(baseline.onnx, PlanOptions(target_macs=F), criterion=l1|bn|random, seed=0)` "
        "(local ratio per group, bisected on the ratio until the MACs target holds), verified against the masked "
        "reference, folded back onto the zoo module by parameter name (`verify_foldback`: exact).",
        "- **Torch-Pruning 1.6.1** (`torch_pruning.__version__` reports 1.6.0; the installed distribution is 1.6.1): "
        f"`MetaPruner(importance, pruning_ratio={TP_MAX_RATIO}, iterative_steps={TP_STEPS}, "
        "ignored_layers=[fc])`, local pruning, importances `GroupMagnitudeImportance(p=1)`, `BNScaleImportance()`, "
        "`RandomImportance()` (torch seed 0); `step()` until its own `count_ops_and_params` meets the target and "
        "graphprune's cost of the export does too (steps of 0.5% per-layer ratio).",
        f"- **Fine-tune, identical for all rows**: {budget['epochs']} epoch(s) on a seeded ({budget['seed']}) "
        f"{budget['train_samples']:,}-image subset of the training set, SGD Nesterov momentum 0.9, weight decay "
        f"5e-4, lr {budget['lr']} cosine to 0 (per step), batch {budget['batch_size']}, augmentation "
        f"{'on (pad-2 random crop + horizontal flip)' if budget['augment'] else 'off'}, "
        f"torch threads {budget['threads']}, {budget.get('device', 'cpu')}. The baseline row gets the same "
        "fine-tune as a control.",
        f"- **Accuracy**: top-1 on {test} images through onnxruntime (1 thread), on the pruned export "
        "(before fine-tune) and on the fine-tuned export (after).",
        f"- **Latency**: onnxruntime CPU, 1 thread, median of {payload['bench']['runs']} runs at batch 1 and "  # type: ignore[index]
        f"{max(5, payload['bench']['runs'] // 5)} at batch 32 after 5 warm-up runs; "  # type: ignore[index]
        f"{payload['bench']['rounds']} round(s) interleaved over the models, best round kept"  # type: ignore[index]
        f"{' (scheduler priority raised for the timed part)' if payload['bench']['priority'] else ''}.",  # type: ignore[index]
        "- **Wall time** per row: prune + evaluations + fine-tune + export (not latency).\n",
        "## Results\n",
    ]
    header = [
        "tool",
        "criterion",
        "target",
        "MACs kept",
        "conv widths",
        "MACs",
        "params",
        "acc. before FT",
        "acc. after FT",
        "vs baseline",
        "ORT b1 (ms)",
        "speed-up b1",
        "ORT b32 (ms)",
        "speed-up b32",
        "prune (s)",
        "fine-tune (s)",
        "wall (s)",
    ]
    table = []
    for r in rows:
        delta = (
            "-"
            if r["accuracy_after"] is None or base_acc is None
            else f"{100 * (r['accuracy_after'] - base_acc):+.2f}"
        )
        latency = r["latency_ms"]
        table.append(
            [
                r["tool"],
                r["criterion"],
                "-" if r["target"] is None else r["target"],
                number(r["macs_kept"], 3),
                "/".join(str(w) for w in sorted(set(r["channels"].values()))),
                "-" if r["macs"] is None else f"{r['macs'] / 1e6:.2f}M",
                "-" if r["params"] is None else f"{r['params'] / 1e3:.1f}k",
                pct(r["accuracy_before"]),
                pct(r["accuracy_after"]),
                delta,
                number(latency.get("b1"), 3),
                speedup(base_latency.get("b1"), latency.get("b1")),
                number(latency.get("b32"), 2),
                speedup(base_latency.get("b32"), latency.get("b32")),
                number(r["prune_s"]),
                number(r["finetune_s"], 1),
                number(r["wall_s"], 1),
            ]
        )
    lines.append(markdown_table(header, table))
    lines.append(
        '"conv widths" lists the distinct output widths of the convolutions (one per stage here). '
        "Speed-up is the baseline's latency over the row's (same rounds, same settings). "
        '"vs baseline" is accuracy after fine-tune minus the baseline\'s accuracy, in points. '
        'For the baseline row, "before" is the baseline as is and "after" is the same fine-tune applied '
        "unpruned. Per-layer widths, verification errors, Torch-Pruning's step counts and own MACs ratio and "
        f"every latency round are in `fashion_mnist{payload.get('suffix', '')}.json`.\n"
    )
    failures = [r for r in rows if r["failure"]]
    lines.append("## Failures\n")
    if failures:
        for r in failures:
            f = r["failure"]
            lines.append(
                f"- {r['tool']} {r['criterion']} target {r['target']}: `{f['error']}` ({f['where']})"
            )
        lines.append("")
    else:
        lines.append("None: every configuration of both tools pruned, fine-tuned and exported.\n")
    lines += [
        "## The papers' claims\n",
        "Network Slimming (70% of channels removed within 0.5 points of the baseline) and Gate Decorator (70% of "
        "FLOPs removed within 0.5 points) rest on long baselines, sparsity training and fine-tunes of tens of "
        "epochs; this table compares the two tools under one small equal budget and says nothing about the "
        "accuracy either reaches with a full recovery schedule. The claims are tested with longer protocols on a "
        "GPU by `bench_paper_claims.py`: see `paper_claims.md`.\n",
    ]
    lines += render_seeds(rows, payload.get("seed_rows"))
    lines += render_recipes(payload.get("recipes"))
    return "\n".join(lines)


def render_seeds(rows: list[dict[str, object]], seed_rows: object) -> list[str]:
    """The random criterion over several pruning seeds: every run, then mean and range per tool/target."""
    if not seed_rows:
        return []
    runs = [r for r in rows if r["criterion"] in ("random", "Random")] + list(seed_rows)  # type: ignore[arg-type]
    runs = [r for r in runs if r["accuracy_after"] is not None]
    runs.sort(key=lambda r: (-r["target"], r["tool"], r["details"].get("prune_seed", 0)))
    table = [
        [
            r["tool"],
            r["target"],
            r["details"].get("prune_seed", 0),
            number(r["macs_kept"], 3),
            pct(r["accuracy_before"]),
            pct(r["accuracy_after"]),
        ]
        for r in runs
    ]
    summary = []
    for key in dict.fromkeys((r["tool"], r["target"]) for r in runs):
        after = [100 * r["accuracy_after"] for r in runs if (r["tool"], r["target"]) == key]
        summary.append(
            [*key, len(after), f"{sum(after) / len(after):.2f}%", f"{min(after):.2f} - {max(after):.2f}"]
        )
    return [
        "## Random criterion across pruning seeds\n",
        "The random rows above use pruning seed 0. Here the same two configurations are pruned again with other "
        "seeds (graphprune: `prune(..., seed=s)`; Torch-Pruning: `torch.manual_seed(s)` before `MetaPruner`), "
        "with the identical fine-tune (its seed stays 0), to show how much of a gap between the tools one draw "
        "can make.\n",
        markdown_table(
            ["tool", "target", "pruning seed", "MACs kept", "acc. before FT", "acc. after FT"], table
        ),
        markdown_table(["tool", "target", "seeds", "mean acc. after FT", "range (points)"], summary),
    ]


def render_recipes(recipes: object) -> list[str]:
    if not recipes:
        return []
    lines = [
        "## Training-time recipes, reduced protocol (not the papers' protocols)\n",
        "Both start from the baseline ONNX and use the main table's seeded training subset, batch, "
        "torch threads and test set (accuracy through onnxruntime); the sparsity / Tick learning rate and the "
        "fine-tune learning rate are 0.01. One epoch per training phase instead of the papers' tens: these rows "
        "show what the commands do on this budget, not what the methods can reach. They are not equal-budget "
        "rows of the main table either: Gate Decorator trains more (Ticks on 1,000-image subsets with the convs "
        "frozen, one Tock epoch per round but the last, one final fine-tune epoch) and Network Slimming trains "
        "two epochs (one sparsity, one fine-tune). Slimming's 70% is 70% of all BN channels (residual-tied "
        "channels counted once), a larger cut than 70% of the MACs. Each recipe runs in-process through the "
        "library calls its command line (shown) makes, with torch threads 1.\n",
    ]
    for record in recipes:  # type: ignore[union-attr]
        lines.append(f"### `{record['recipe']}` ({record['wall_s']} s)\n")
        lines.append(f"`{record['command']}`\n")
        if "failure" in record:
            lines.append(f"Failed: `{record['failure']['error']}` ({record['failure']['where']})\n")
            continue
        stages = record["stages"]
        rows = [
            [
                s["label"],
                pct(s["accuracy"]),
                f"{s['macs'] / 1e6:.2f}M",
                f"{s['params'] / 1e3:.1f}k",
                s["macs_kept"],
            ]
            for s in stages
        ]
        lines.append(markdown_table(["stage", "accuracy", "MACs", "params", "MACs kept"], rows))
    return lines


def plot(payload: dict[str, object], path: Path) -> None:
    points = []
    for r in payload["rows"]:  # type: ignore[union-attr]
        if r["accuracy_after"] is None:
            continue
        series = "baseline (+FT)" if r["tool"] == "baseline" else f"{r['tool']} {r['criterion']}"
        label = "" if r["target"] is None else f"{r['macs_kept']:.2f}"
        points.append({"series": series, "label": label, "macs": r["macs"], "accuracy": r["accuracy_after"]})
    if points:
        title, _ = reference_text(payload)
        epochs = payload["budget"]["epochs"]  # type: ignore[index]
        plot_accuracy_vs_macs(
            points, path, title=f"Fashion-MNIST {title}: accuracy after {epochs}-epoch fine-tune"
        )


def results_stem(reference: Reference) -> str:
    return f"fashion_mnist{reference.suffix}"


def save(payload: dict[str, object], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stem = f"fashion_mnist{payload.get('suffix', '')}"
    write_json(out / f"{stem}.json", payload)
    write_text(out / f"{stem}.md", render(payload))
    plot(payload, out / f"{stem}.png")


def make_context(reference: Reference, budget: Budget, work: Path) -> Context:
    train = load_dataset("fashion-mnist", "train", limit=budget.train_samples, seed=budget.seed)
    test = load_dataset("fashion-mnist", "test", limit=budget.test_samples, seed=budget.seed)
    base = model_cost(onnx.load(str(reference.onnx)))
    return Context(reference, budget, train, test, work, base.macs, base.params)


Job = tuple[Row, Callable[[], Row]]


def pair_jobs(criterion: str, target: float, ctx: Context, seed: int) -> list[Job]:
    """One graphprune row and one Torch-Pruning row for a criterion, target and pruning seed."""
    return [
        (Row("graphprune", criterion, target), lambda: run_graphprune(criterion, target, ctx, seed)),
        (
            Row("torch-pruning", CRITERIA[criterion][0], target),
            lambda: run_torch_pruning(criterion, target, ctx, seed),
        ),
    ]


def run_jobs(jobs: list[Job], key: str, payload: dict[str, object], out: Path) -> list[Row]:
    """Run the rows in order, saving the results under payload[key] after each one."""
    rows: list[Row] = []
    for fallback, job in tqdm(jobs, desc=key, disable=None):
        rows.append(guarded(job, fallback))
        log.info("row done: %s", json.dumps({k: v for k, v in asdict(rows[-1]).items() if k != "channels"}))
        payload[key] = [asdict(r) for r in rows]
        save(payload, out)
    return rows


def run_main(args: argparse.Namespace, ctx: Context, payload: dict[str, object]) -> None:
    jobs: list[Job] = [(Row("baseline", "-", None), lambda: run_baseline(ctx))]
    for target in args.targets:
        for criterion in args.criteria:
            jobs += pair_jobs(criterion, target, ctx, ctx.budget.seed)
    rows = run_jobs(jobs, "rows", payload, args.out)
    bench_rows(rows, args)
    payload["rows"] = [asdict(r) for r in rows]


def run_seeds(args: argparse.Namespace, ctx: Context, payload: dict[str, object]) -> None:
    """The random criterion again with other pruning seeds (same fine-tune), to size the seed noise."""
    jobs = [
        job
        for seed in args.extra_seeds
        for target in args.targets
        for job in pair_jobs("random", target, ctx, seed)
    ]
    run_jobs(jobs, "seed_rows", payload, args.out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--stages",
        default="main",
        help="comma list of main, recipes, seeds, render; without main they merge into the existing JSON "
        "(render alone rewrites the markdown and plot from it)",
    )
    parser.add_argument("--extra-seeds", type=int, nargs="+", default=[1, 2], help="pruning seeds (seeds)")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.3], help="MACs kept targets")
    parser.add_argument("--criteria", nargs="+", default=list(CRITERIA), choices=list(CRITERIA))
    parser.add_argument("--train-samples", type=int, default=Budget.train_samples)
    parser.add_argument("--test-samples", type=int, help="limit the test set (default: all 10,000)")
    parser.add_argument("--epochs", type=int, default=Budget.epochs)
    parser.add_argument("--recipe-lr", type=float, default=0.01, help="lr of the recipes' sparsity training")
    parser.add_argument("--runs", type=int, default=50, help="timed runs at batch 1 (batch 32: a fifth)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved latency rounds")
    parser.add_argument("--priority", action="store_true", help="raise scheduler priority while timing")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    parser.add_argument("--keep", type=Path, help="keep the ONNX models in this folder")
    parser.add_argument("--lr", type=float, default=Budget.lr, help="fine-tune learning rate")
    parser.add_argument("--threads", type=int, default=Budget.threads, help="torch and onnxruntime threads")
    add_reference_args(parser)
    args = parser.parse_args()
    reference = reference_from(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    budget = Budget(
        train_samples=args.train_samples,
        test_samples=args.test_samples,
        epochs=args.epochs,
        lr=args.lr,
        threads=args.threads,
        device=args.device,
    )
    torch.set_num_threads(budget.threads)
    torch.set_num_interop_threads(budget.threads)
    stages = set(args.stages.split(","))
    if not stages <= STAGES:
        parser.error(
            f"unknown stage(s) {', '.join(sorted(stages - STAGES))}; use {', '.join(sorted(STAGES))}"
        )
    path = args.out / f"{results_stem(reference)}.json"
    payload: dict[str, object] = (
        json.loads(path.read_text()) if "main" not in stages and path.is_file() else {}
    )
    if "main" in stages or not payload:
        payload.update(
            machine=machine(),
            reference=reference.describe(),
            suffix=reference.suffix,
            budget=asdict(budget),
            bench={"runs": args.runs, "rounds": args.rounds, "priority": args.priority},
            rows=[],
        )
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if stages & {"main", "seeds"}:
            ctx = make_context(reference, budget, work)
        if "main" in stages:
            run_main(args, ctx, payload)
            payload["wall_s"] = round(time.perf_counter() - start, 1)
        if "recipes" in stages:
            payload["recipes"] = run_recipes(args, reference, budget, work)
        if "seeds" in stages:
            begin = time.perf_counter()
            run_seeds(args, ctx, payload)
            payload["seeds_wall_s"] = round(time.perf_counter() - begin, 1)
        save(payload, args.out)
    log.info("wrote %s", args.out / f"{results_stem(reference)}.md")


if __name__ == "__main__":
    main()
