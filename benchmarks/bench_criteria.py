"""Every graphprune criterion, the blend (Blending Pruning Criteria, METHODS.md section 3) and
Torch-Pruning 1.6.1's criteria on a trained Fashion-MNIST model (default: the shipped ResNet-20;
`--model vgg11_bn --baseline FILE.onnx` for a VGG-BN), at matched MACs.

For each MACs target (0.5 and 0.3 of the baseline, `PlanOptions(target_macs=F)`) and seed (0, 1, 2):

- **graphprune**: `prune(baseline.onnx, PlanOptions(target_macs=F), criterion=NAME, seed=seed,
  calib=<Fashion-MNIST train>, calib_samples=1024)`, verified against the masked reference. The seed
  draws the calibration sample (activation criteria, Taylor), the random scores, and the blend's split
  and search; l1, l2, fpgm and bn do not read it, so their three seeds give one model (the results
  say how many distinct models each criterion produced). The blend gets 1,024 + 1,000 seeded training
  images: 1,000 held out to judge candidate blends (BN recalibrated on 256 of the other 1,024, no
  fine-tuning), a small search (population 8, 4 generations, 2 worker processes);
- **Torch-Pruning**: `tp.pruner.MetaPruner` on the zoo module carrying the same weights
  (`apply_to_module(build(MODEL), onnx)`), importances MagnitudeImportance p=1 and p=2,
  BNScaleImportance, TaylorImportance (one batch of 128 seeded training images, gradients recomputed
  before every step) and RandomImportance (torch seeded), classifier ignored, stepped until
  graphprune's cost of its export meets the target.

Every pruned model is evaluated on the full test set through onnxruntime (1 thread) as pruned, and
with BN statistics recalibrated on 256 training images (the blend's fitness protocol, same images for
every model). The seed-0 model of every criterion is then fine-tuned once (1 epoch on a seeded
5,000-image training subset, SGD lr 0.01 cosine, torch threads 1), exported and evaluated again.

`--recover lsq` adds a column: graphprune's models least-squares recovered (graphprune.recover, BN
included) on their seed's calibration draw, and their fine-tune starts from that model; Torch-Pruning's
models have no plan to recover by and stay as they are. Such a run writes criteria[_MODEL]_lsq.*.

Writes results/criteria[_MODEL].json (rewritten after every row), .md and .png; `--device cuda` runs the
fine-tunes on a GPU (onnxruntime stays on the CPU), `--threads N` sizes torch and onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib
import numpy as np
import onnx
import protocol
import torch
from common import machine, machine_line, markdown_table
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from peer import TP_MAX_RATIO, TP_STEPS, Reference, reference_text, tp
from torch import nn
from tqdm import tqdm

from graphprune.api import PruneResult, recover
from graphprune.data import ArrayDataset, load_dataset
from graphprune.onnxutil import atomic_write
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.search.blend import DEFAULT_POOL, BlendConfig
from graphprune.surgery.recover import recalibrate_batchnorm
from graphprune.torch_bridge.foldback import onnx_to_module
from graphprune.torch_bridge.train import TrainConfig

log = logging.getLogger("bench_criteria")
DEFAULT_SEARCH = (BlendConfig.population, BlendConfig.generations)  # the library's search size

# act_var is not in the brief's list but is in the blend's default pool, so the claim needs it.
GRAPHPRUNE_CRITERIA = (
    "l1",
    "l2",
    "fpgm",
    "bn",
    "random",
    "mean_act",
    "apoz",
    "act_var",
    "entropy",
    "hrank",
    "taylor",
    "blend",
)
TP_CRITERIA: dict[str, Callable[[], object]] = {
    "Magnitude p=1": lambda: tp().importance.MagnitudeImportance(p=1),
    "Magnitude p=2": lambda: tp().importance.MagnitudeImportance(p=2),
    "BNScale": lambda: tp().importance.BNScaleImportance(),
    "Taylor": lambda: tp().importance.TaylorImportance(),
    "Random": lambda: tp().importance.RandomImportance(),
}
# Budget fields that size the measurements: a resumed run must keep them.
SIZING = (
    "seeds",
    "targets",
    "calib_samples",
    "holdout",
    "recal_samples",
    "population",
    "generations",
    "finetune_samples",
    "finetune_seed",
    "epochs",
    "lr",
    "batch_size",
    "test_samples",
    "recovery",
)
METRICS = {
    "acc_raw": "no FT, as pruned",
    "acc_recal": "no FT, BN recalibrated",
    "acc_lsq": "no FT, lsq recovered",
    "acc_ft": "after FT (seed 0)",
}


@dataclass(frozen=True)
class Budget:
    """Everything that sizes the run; the defaults fit ~40 minutes on 2 shared cores."""

    seeds: tuple[int, ...] = (0, 1, 2)
    targets: tuple[float, ...] = (0.5, 0.3)
    calib_samples: int = 1024
    holdout: int = 1000
    recal_samples: int = 256
    population: int = 8
    generations: int = 4
    workers: int = 2
    finetune_samples: int = 5000
    finetune_seed: int = 0
    epochs: int = 1
    lr: float = 0.01
    batch_size: int = 128
    test_samples: int | None = None
    threads: int = 1
    device: str = "cpu"
    minutes: float = 40.0
    recovery: str = (
        "none"  # "lsq": graphprune's models are also least-squares recovered, and fine-tuned from that
    )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            schedule="cosine",
            seed=self.finetune_seed,
            device=self.device,
            progress=False,
        )

    def blend_config(self) -> BlendConfig:
        return BlendConfig(
            population=self.population,
            generations=self.generations,
            workers=self.workers,
            holdout=self.holdout / (self.calib_samples + self.holdout),
            eval_samples=self.holdout,
            recal_samples=self.recal_samples,
            progress=False,
        )


@dataclass
class Row(protocol.Row):
    """One seed's model: its bytes' hash and its accuracy as pruned, BN-recalibrated and fine-tuned."""

    seed: int = 0
    model_sha: str | None = None
    acc_raw: float | None = None
    acc_recal: float | None = None
    acc_lsq: float | None = None
    acc_ft: float | None = None


@dataclass
class Context:
    reference: Reference
    budget: Budget
    train: ArrayDataset
    finetune: ArrayDataset
    test: ArrayDataset
    recal_images: np.ndarray
    base_macs: int
    work: Path
    evaluated: dict[str, tuple[float, float]] = field(default_factory=dict)


def evaluate(row: Row, model: onnx.ModelProto, ctx: Context) -> None:
    """Cost and test accuracy (as pruned, and BN-recalibrated) of a pruned model; identical models
    (same bytes) are evaluated once."""
    row.count(model, ctx.base_macs)
    row.model_sha = hashlib.sha256(model.SerializeToString()).hexdigest()[:16]
    if row.model_sha not in ctx.evaluated:
        threads = ctx.budget.threads
        raw = evaluate_onnx(model, ctx.test, threads=threads)
        recal = recalibrate_batchnorm(model, ctx.recal_images, threads=threads)
        ctx.evaluated[row.model_sha] = (raw, evaluate_onnx(recal, ctx.test, threads=threads))
    row.acc_raw, row.acc_recal = ctx.evaluated[row.model_sha]


def finetune(row: Row, module: nn.Module, ctx: Context) -> None:
    """The common short fine-tune, export and test accuracy (seed-0 models only)."""
    tuned = protocol.finetune(
        row, module, ctx.finetune, ctx.budget.train_config(), ctx.work / "finetuned.onnx"
    )
    row.details["finetune_device"] = ctx.budget.device
    row.acc_ft = evaluate_onnx(tuned, ctx.test, threads=ctx.budget.threads)


def run_baseline(row: Row, ctx: Context) -> None:
    evaluate(row, onnx.load(str(ctx.reference.onnx)), ctx)
    finetune(row, ctx.reference.module(), ctx)


def blend_summary(report: dict[str, object]) -> dict[str, object]:
    """What the blend's search found (the per-layer clusters stay out: they are long)."""
    keys = ("candidates", "factors", "fitness", "single_fitness", "skipped")
    summary = {key: report[key] for key in keys}
    summary["curve"] = [{"best": g["best"], "mean": g["mean"]} for g in report["curve"]]  # type: ignore[union-attr]
    return summary


def run_graphprune(row: Row, ctx: Context) -> None:
    budget = ctx.budget
    blend = row.criterion == "blend"
    result = protocol.prune_graphprune(
        row,
        ctx.reference,
        row.seed,
        calib=ctx.train,
        calib_samples=budget.calib_samples + (budget.holdout if blend else 0),
        criterion_options={"config": budget.blend_config()} if blend else None,
        recover="none",  # calib is for the criteria: "as pruned" means surgery's output
    )
    if result.criterion_report is not None:
        row.details["blend"] = blend_summary(result.criterion_report)
    evaluate(row, result.model, ctx)
    start = recovered_lsq(row, result, ctx) if budget.recovery == "lsq" else None
    if row.seed == budget.finetune_seed:
        # least squares may give convs a bias the zoo module lacks: onnx2torch builds what the graph says
        module = ctx.reference.module(result.model) if start is None else onnx_to_module(start)
        finetune(row, module, ctx)


def recovered_lsq(row: Row, result: PruneResult, ctx: Context) -> onnx.ModelProto:
    """graphprune's pruned model recovered by least squares on the row's calibration draw, its test
    accuracy recorded as acc_lsq."""
    budget = ctx.budget
    recovered = recover(
        ctx.reference.onnx,
        result.model,
        ctx.train,
        plan=result.plan,
        method="lsq",
        calib_samples=budget.calib_samples,
        seed=row.seed,
        threads=budget.threads,
    )
    row.details["lsq_seconds"] = round(recovered.report.seconds, 2)
    row.acc_lsq = evaluate_onnx(recovered.model, ctx.test, threads=budget.threads)
    return recovered.model


def taylor_gradients(module: nn.Module, batch: ArrayDataset) -> None:
    """Fresh gradients of the cross-entropy on one batch (eval-mode BN), for TaylorImportance."""
    module.eval()
    module.zero_grad(set_to_none=True)
    logits = module(torch.from_numpy(batch.images))
    nn.functional.cross_entropy(logits, torch.from_numpy(batch.labels)).backward()


def run_torch_pruning(row: Row, ctx: Context) -> None:
    """Torch-Pruning at matched MACs; Taylor gets fresh gradients on one seeded batch before each step."""
    module = ctx.reference.module()
    batch = ctx.train.sample(ctx.budget.batch_size, row.seed)
    result = protocol.prune_torch_pruning(
        row,
        module,
        TP_CRITERIA[row.criterion](),
        row.seed,
        base_macs=ctx.base_macs,
        sample_shape=ctx.train.sample_shape,
        probe=ctx.work / "tp_probe.onnx",
        before_step=(lambda: taylor_gradients(module, batch)) if row.criterion == "Taylor" else None,
    )
    module.zero_grad(set_to_none=True)
    evaluate(row, result.model, ctx)
    if row.seed == ctx.budget.finetune_seed:
        finetune(row, module, ctx)


def jobs(budget: Budget) -> list[tuple[Row, Callable[[Row, Context], None]]]:
    """Seed 0 first (it carries the fine-tunes), then the other seeds; the baseline leads."""
    work: list[tuple[Row, Callable[[Row, Context], None]]] = [(Row("baseline", "-", None), run_baseline)]
    for seed in budget.seeds:
        for target in budget.targets:
            work += [(Row("graphprune", c, target, seed=seed), run_graphprune) for c in GRAPHPRUNE_CRITERIA]
            work += [(Row("torch-pruning", c, target, seed=seed), run_torch_pruning) for c in TP_CRITERIA]
    return work


# Results ----------------------------------------------------------------------------------------


@dataclass
class Cell:
    """One criterion at one target over its seeds."""

    tool: str
    criterion: str
    target: float
    macs_kept: float | None
    values: dict[str, list[float]]
    distinct_models: int
    seeds: int
    prune_s: float | None
    failures: list[str]

    def mean(self, metric: str) -> float | None:
        values = self.values[metric]
        return statistics.fmean(values) if values else None

    def spread(self, metric: str) -> float | None:
        values = self.values[metric]
        return statistics.stdev(values) if len(values) > 1 else None


def cells(rows: list[dict[str, object]]) -> list[Cell]:
    keys = list(
        dict.fromkeys((r["tool"], r["criterion"], r["target"]) for r in rows if r["target"] is not None)
    )
    result = []
    for tool, criterion, target in keys:
        mine = [r for r in rows if (r["tool"], r["criterion"], r["target"]) == (tool, criterion, target)]
        done = [r for r in mine if r["failure"] is None and r["acc_raw"] is not None]
        values = {m: [r[m] for r in done if r.get(m) is not None] for m in METRICS}
        times = [r["prune_s"] for r in done if r["prune_s"] is not None]
        result.append(
            Cell(
                tool,
                criterion,
                target,
                statistics.fmean(r["macs_kept"] for r in done) if done else None,
                values,
                len({r["model_sha"] for r in done}),
                len(done),
                statistics.fmean(times) if times else None,
                [f"seed {r['seed']}: {r['failure']['error']}" for r in mine if r["failure"]],
            )
        )
    return result


def claim(table: list[Cell]) -> list[dict[str, object]]:
    """Per target and metric: the blend's mean against every pool criterion's mean."""
    verdicts = []
    for target in sorted({c.target for c in table}, reverse=True):
        here = {c.criterion: c for c in table if c.tool == "graphprune" and c.target == target}
        blend = here.get("blend")
        for metric in METRICS:
            pool = {
                n: here[n].mean(metric)
                for n in DEFAULT_POOL
                if n in here and here[n].mean(metric) is not None
            }
            if blend is None or blend.mean(metric) is None or not pool:
                continue
            best = max(pool, key=pool.__getitem__)
            beaten = [n for n, v in pool.items() if blend.mean(metric) > v]
            verdicts.append(
                {
                    "target": target,
                    "metric": metric,
                    "blend": blend.mean(metric),
                    "best_single": best,
                    "best_single_value": pool[best],
                    "beats": len(beaten),
                    "pool_scored": len(pool),
                    "missing": [n for n in DEFAULT_POOL if n not in pool],
                    "holds": verdict(len(beaten), len(pool)),
                }
            )
    return verdicts


def verdict(beaten: int, scored: int) -> str:
    """ "yes" only when the blend beats the whole pool; "no" as soon as one scored criterion ties or wins."""
    if beaten < scored:
        return "no"
    return "yes" if scored == len(DEFAULT_POOL) else "undecided"


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def mean_sd(cell: Cell, metric: str) -> str:
    mean, sd = cell.mean(metric), cell.spread(metric)
    if mean is None:
        return "-"
    if sd is None:
        return pct(mean)
    values = cell.values[metric]
    return f"{pct(mean)} ± {100 * sd:.2f} ({pct(min(values))}-{pct(max(values))})"


def render(payload: dict[str, object]) -> str:
    budget: dict[str, object] = payload["budget"]  # type: ignore[assignment]
    rows: list[dict[str, object]] = payload["rows"]  # type: ignore[assignment]
    table = cells(rows)
    base = next((r for r in rows if r["tool"] == "baseline" and r["failure"] is None), None)
    title, description = reference_text(payload)
    lsq = budget.get("recovery") == "lsq"
    lines = [
        f"# Criteria on the Fashion-MNIST {title}: graphprune's criteria, the blend, Torch-Pruning's\n",
        *render_runs(payload),
        "## Protocol\n",
        f"- **Model**: {description} "
        + (f"({pct(base['acc_raw'])}% on the test set)" if base else "")
        + "; Torch-Pruning gets the same weights on the zoo module (`apply_to_module(build(MODEL), onnx)`).",
        f"- **Targets**: MACs kept <= {', '.join(map(str, budget['targets']))} "  # type: ignore[arg-type]
        "(`PlanOptions(target_macs=F)`: local ratio per group, bisected on the ratio), counted by "
        "`graphprune.runtime.cost` on the ONNX for both tools.",
        f"- **graphprune**: `prune(..., criterion=NAME, seed=s, calib=<train set>, "
        f"calib_samples={budget['calib_samples']})`, verified. Seeds ({', '.join(map(str, budget['seeds']))}): the seed draws the "
        "calibration sample, the random scores and the blend's split and search. **l1, l2, fpgm and bn do "
        "not depend on the seed: their seeds all give the same model** (column *models*: distinct pruned "
        "models over the seeds), so their spread is 0 by construction. `act_var` (activation variance) "
        "is not in the brief's list but is in the blend's default pool, so it is included for the claim.",
        f"- **blend**: pool `{', '.join(DEFAULT_POOL)}` (the default), {budget['calib_samples']:,} + "
        f"{budget['holdout']:,} seeded training images: the pool's statistics are computed on all of them, "
        f"{budget['holdout']:,} are held out as the search's fitness set (accuracy after BN recalibration on "
        f"{budget['recal_samples']} of the others, no fine-tuning); evolutionary search population "
        f"{budget['population']}, {budget['generations']} generations, {budget['workers']} workers"
        + (
            " (the library's defaults)."
            if (budget["population"], budget["generations"]) == DEFAULT_SEARCH
            else f" (the library's defaults are {DEFAULT_SEARCH[0]} x {DEFAULT_SEARCH[1]}; shrunk to fit the session)."
        )
        + " Never sees the test set.",
        f"- **Torch-Pruning 1.6.1**: `MetaPruner(importance, pruning_ratio={TP_MAX_RATIO}, "
        f"iterative_steps={TP_STEPS}, ignored_layers=[fc])`, local, stepped (0.5% per step) until its own MACs "
        "count and graphprune's cost of the export meet the target. `MagnitudeImportance(p=1|2)`, "
        "`BNScaleImportance()`, `TaylorImportance()` (cross-entropy gradients of one seeded batch of "
        f"{budget['batch_size']} training images, eval-mode BN, recomputed before every step), "
        "`RandomImportance()` (torch seeded). Magnitude and BNScale do not depend on the seed.",
        f"- **No fine-tune**: top-1 on {'the full 10,000-image test set' if budget['test_samples'] is None else str(budget['test_samples']) + ' test images'} "
        "through onnxruntime, (a) as pruned, (b) with BatchNorm statistics recalibrated on "
        f"{budget['recal_samples']} training images (the same images for every model; the blend's fitness "
        "protocol)"
        + (
            f', (c) graphprune\'s models only: least-squares recovered (`recover(..., method="lsq", '
            f"calib_samples={budget['calib_samples']}, seed=s)`, BN included; Torch-Pruning's have no plan to "
            "recover by)"
            if lsq
            else ""
        )
        + ". Mean ± sample standard deviation (min-max) over the seeds.",
        f"- **Fine-tune, seed 0 only**: {budget['epochs']} epoch on a seeded {budget['finetune_samples']:,}-image "
        f"training subset"
        + (", graphprune's from the lsq-recovered model (folded back with onnx2torch)" if lsq else "")
        + f", SGD Nesterov momentum 0.9, weight decay 5e-4, lr {budget['lr']} cosine to 0, batch "
        f"{budget['batch_size']}, pad-crop + flip augmentation, torch threads and device of the run that measured the row (above); exported and "
        "evaluated through onnxruntime. One run per criterion: no spread.\n",
    ]
    if base:
        lines.append(
            f"Baseline: {pct(base['acc_raw'])}% as shipped, {pct(base['acc_recal'])}% with BN recalibrated on "
            f"{budget['recal_samples']} images, {pct(base['acc_ft'])}% after the same fine-tune (control).\n"
        )
    header = [
        "tool",
        "criterion",
        "MACs kept",
        "no FT, as pruned (%)",
        "no FT, BN recal. (%)",
        *(["no FT, lsq (%)"] if lsq else []),
        "FT seed 0 (%)",
        "models",
        "prune (s)",
    ]
    for target in budget["targets"]:  # type: ignore[union-attr]
        lines.append(f"## MACs target {target}\n")
        body = [
            [
                c.tool,
                c.criterion,
                "-" if c.macs_kept is None else f"{c.macs_kept:.3f}",
                mean_sd(c, "acc_raw"),
                mean_sd(c, "acc_recal"),
                *([mean_sd(c, "acc_lsq")] if lsq else []),
                pct(c.mean("acc_ft")),
                f"{c.distinct_models}/{c.seeds}",
                "-" if c.prune_s is None else f"{c.prune_s:.1f}",
            ]
            for c in table
            if c.target == target
        ]
        lines.append(markdown_table(header, body))
    lines += render_claim(payload, table)
    lines += render_blend(rows)
    failures = [f"- {c.tool} {c.criterion} target {c.target}, {f}" for c in table for f in c.failures]
    skipped = payload.get("skipped") or []
    lines.append("## Failures\n")
    lines += failures or ["None."]
    if skipped:
        lines.append(
            f"\nNot run (time budget of {budget['minutes']} min reached): {len(skipped)} rows: "
            + "; ".join(skipped)
        )  # type: ignore[arg-type]
    return "\n".join(lines) + "\n"


def render_runs(payload: dict[str, object]) -> list[str]:
    """Where and how the rows were measured: one line per run (a resumed run adds one)."""
    budget: dict[str, object] = payload["budget"]  # type: ignore[assignment]
    runs = payload.get("runs") or [
        {"machine": payload["machine"], "device": budget.get("device", "cpu"), "threads": budget["threads"]}
    ]
    lines = []
    for index, run in enumerate(runs):  # type: ignore[union-attr]
        lines.append(
            f"{'Resumed' if index else 'Run'} on: " + machine_line(run["machine"]).removeprefix("Machine: ")
        )
        lines.append(
            f"  ({run.get('rows', 'all')} rows; {run['threads']} torch / onnxruntime thread(s), the blend's search "
            f"in {run.get('workers', budget['workers'])} worker processes of 1 thread, fine-tunes on {run['device']}; "
            "wall time "
            f"{run.get('wall_s', payload.get('wall_s', '-'))} s; other jobs may have shared the machine.)\n"
        )
    if len(runs) > 1:  # type: ignore[arg-type]
        lines.append(
            "Another machine's torch exporter can write different bytes for the same pruned model, so across "
            "runs the *models* column may count one model twice; the accuracies show when it does.\n"
        )
    return lines


def render_claim(payload: dict[str, object], table: list[Cell]) -> list[str]:
    verdicts = claim(table)
    lines = [
        "## The paper's claim\n",
        "He et al. (ICANN 2021): the blended criterion gives a better compact model than **every single "
        "criterion in its pool** at the same FLOPs. Below, the blend's mean against each pool criterion's "
        "mean (pool: " + ", ".join(DEFAULT_POOL) + "); *holds* is yes when the blend is strictly above all "
        "of them, no when one pool criterion ties or beats it, undecided when it beats every criterion that "
        "produced a result but some pool criterion failed. "
        "The paper's claim is about the fine-tuned network; here fine-tuning is 1 epoch and seed 0 only"
        + (
            ", so this tests the claim under this budget only.\n"
            if (payload["budget"]["population"], payload["budget"]["generations"]) == DEFAULT_SEARCH
            else ", and the search is tiny, so this tests the claim under this session's budget only.\n"
        ),
    ]
    if payload["budget"].get("recovery", "none") == "none":
        lines.append(
            "`--recover lsq` repeats this protocol with every graphprune model also least-squares "
            "recovered (BN included) before its fine-tune; such a run is written to "
            f"`{results_stem(payload.get('suffix', ''), 'lsq')}.md` when made.\n"
        )
    body = [
        [
            v["target"],
            METRICS[v["metric"]],
            pct(v["blend"]),
            f"{v['best_single']} {pct(v['best_single_value'])}",
            f"{v['beats']}/{v['pool_scored']}"
            + (f" (no result: {', '.join(v['missing'])})" if v["missing"] else ""),
            v["holds"],
        ]
        for v in verdicts
    ]
    lines.append(
        markdown_table(
            ["target", "metric", "blend (%)", "best pool criterion (%)", "pool beaten", "holds"], body
        )
    )
    return lines


def render_blend(rows: list[dict[str, object]]) -> list[str]:
    """The searches themselves: held-out fitness of the blend against its best single candidate."""
    searches = [r for r in rows if r["criterion"] == "blend" and "blend" in r["details"]]
    if not searches:
        return []
    body = []
    for r in searches:
        b = r["details"]["blend"]
        singles = b["single_fitness"]
        best = max(singles, key=singles.get) if singles else "-"
        factors = ", ".join(f"{k} {v:.2f}" for k, v in b["factors"].items())
        body.append(
            [
                r["target"],
                r["seed"],
                pct(b["fitness"]),
                f"{best} {pct(singles.get(best))}" if singles else "-",
                factors,
                f"{r['prune_s']:.0f}",
            ]
        )
    return [
        "## Blend searches (held-out fitness, BN recalibrated, no fine-tune)\n",
        "Fitness is accuracy on the 1,000 held-out training images; *best single* is the best blending "
        "candidate used alone (a factor vector with one 1). Candidates are the pool criteria that represent "
        "a cluster in at least one layer.\n",
        markdown_table(
            ["target", "seed", "blend fitness (%)", "best single candidate (%)", "factors", "time (s)"], body
        ),
    ]


def plot(payload: dict[str, object], path: Path) -> None:
    """Accuracy against MACs kept: no fine-tune (as pruned, BN recalibrated) and after fine-tune."""
    table = cells(payload["rows"])  # type: ignore[arg-type]
    fig = Figure(figsize=(16, 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    # the lsq panel only for runs that recovered (--recover lsq)
    metrics = {m: t for m, t in METRICS.items() if m != "acc_lsq" or any(c.values[m] for c in table)}
    axes = fig.subplots(1, len(metrics), sharex=True)
    names = list(dict.fromkeys((c.tool, c.criterion) for c in table))
    colours = [matplotlib.colormaps["tab20"](i % 20) for i in range(len(names))]
    for ax, (metric, title) in zip(axes, metrics.items(), strict=True):
        for (tool, criterion), colour in zip(names, colours, strict=True):
            mine = sorted(
                (
                    c
                    for c in table
                    if (c.tool, c.criterion) == (tool, criterion) and c.mean(metric) is not None
                ),
                key=lambda c: c.target,
            )
            if not mine:
                continue
            ax.errorbar(
                [c.macs_kept for c in mine],
                [100 * c.mean(metric) for c in mine],
                yerr=[100 * (c.spread(metric) or 0.0) for c in mine],
                color=colour,
                marker="s" if tool == "torch-pruning" else "o",
                linestyle="--" if tool == "torch-pruning" else "-",
                linewidth=2.5 if criterion == "blend" else 1.0,
                capsize=3,
                label=f"{'TP ' if tool == 'torch-pruning' else ''}{criterion}",
            )
        ax.set_title(title)
        ax.set_xlabel("MACs kept")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2)
    title, _ = reference_text(payload)
    fig.suptitle(f"Fashion-MNIST {title}: criteria at matched MACs (mean ± sd over seeds; FT: seed 0)")
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png")


def results_stem(suffix: str, recovery: str) -> str:
    """criteria[_MODEL][_lsq]: a run with recovery is another protocol, kept beside the plain one."""
    return f"criteria{suffix}" + ("" if recovery == "none" else f"_{recovery}")


def save(payload: dict[str, object], out: Path) -> None:
    payload["claim"] = claim(cells(payload["rows"]))  # type: ignore[arg-type]
    stem = results_stem(payload.get("suffix", ""), payload["budget"].get("recovery", "none"))  # type: ignore[union-attr]
    protocol.save_results(payload, out, stem, render, plot)


def run_record(budget: Budget) -> dict[str, object]:
    """Where one run measures and with what; `rows` and `wall_s` grow as it goes."""
    return {
        "machine": machine(),
        "device": budget.device,
        "threads": budget.threads,
        "workers": budget.workers,
        "rows": 0,
    }


def new_payload(budget: Budget, reference: Reference) -> dict[str, object]:
    return {
        "machine": machine(),
        "reference": reference.describe(),
        "suffix": reference.suffix,
        "budget": asdict(budget),
        "runs": [run_record(budget)],
        "rows": [],
        "skipped": [],
    }


def resumed(path: Path, budget: Budget, reference: Reference) -> dict[str, object]:
    """An earlier run's results, to be completed: same baseline and sizing (the machine, device,
    threads, workers and time budget may differ; each run is recorded in "runs")."""
    if not path.is_file():
        raise SystemExit(f"--resume: no earlier results at {path}")
    payload = json.loads(path.read_text())
    old, new = payload["budget"], json.loads(json.dumps(asdict(budget)))
    changed = [key for key in SIZING if old.get(key) != new[key]]
    if changed or payload["reference"]["model"] != reference.model:
        raise SystemExit(f"--resume: the earlier run differs in {changed or ['model']}; use its settings.")
    payload.setdefault(
        "runs",
        [
            {
                "machine": payload["machine"],
                "device": old["device"],
                "threads": old["threads"],
                "workers": old["workers"],
                "wall_s": payload.get("wall_s"),
                "rows": len(payload["rows"]),
            }
        ],
    )
    for row in payload["rows"]:
        if row["acc_ft"] is not None:
            row["details"].setdefault("finetune_device", old["device"])
    payload["runs"].append(run_record(budget))
    payload["skipped"] = []
    return payload


def main() -> None:
    parser = protocol.parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Budget.seeds))
    parser.add_argument("--criteria", nargs="+", help="only these criteria (graphprune names or TP labels)")
    parser.add_argument("--finetune-samples", type=int, default=Budget.finetune_samples)
    parser.add_argument("--population", type=int, default=Budget.population)
    parser.add_argument("--generations", type=int, default=Budget.generations)
    parser.add_argument("--minutes", type=float, default=Budget.minutes, help="start no row after this")
    parser.add_argument("--workers", type=int, default=Budget.workers, help="blend search processes")
    parser.add_argument("--resume", action="store_true", help="complete the results file of a run cut short")
    parser.add_argument(
        "--recover",
        choices=("none", "lsq"),
        default="none",
        help="lsq: also least-squares recover graphprune's models and fine-tune from that (criteria_lsq.md)",
    )
    args = parser.parse_args()
    reference = protocol.start(args)
    budget = Budget(
        seeds=tuple(args.seeds),
        targets=tuple(args.targets),
        test_samples=args.test_samples,
        finetune_samples=args.finetune_samples,
        population=args.population,
        generations=args.generations,
        workers=args.workers,
        threads=args.threads,
        device=args.device,
        minutes=args.minutes,
        recovery=args.recover,
    )
    train = load_dataset("fashion-mnist", "train")
    test = load_dataset("fashion-mnist", "test", limit=budget.test_samples, seed=0)
    finetune_set = train.sample(budget.finetune_samples, budget.finetune_seed)
    recal = train.sample(budget.recal_samples, seed=12345).images
    path = args.out / f"{results_stem(reference.suffix, budget.recovery)}.json"
    payload = resumed(path, budget, reference) if args.resume else new_payload(budget, reference)
    run: dict[str, object] = payload["runs"][-1]  # type: ignore[index]
    done = {(r["tool"], r["criterion"], r["target"], r["seed"]) for r in payload["rows"] if not r["failure"]}  # type: ignore[union-attr]
    start = time.perf_counter()
    todo = [
        (row, job)
        for row, job in jobs(budget)
        if (not args.criteria or row.criterion in args.criteria + ["-"])
        and (row.tool, row.criterion, row.target, row.seed) not in done
    ]
    with tempfile.TemporaryDirectory() as tmp:
        base_macs = protocol.base_macs(reference)
        ctx = Context(reference, budget, train, finetune_set, test, recal, base_macs, Path(tmp))
        ctx.evaluated.update(
            (r["model_sha"], (r["acc_raw"], r["acc_recal"]))
            for r in payload["rows"]  # type: ignore[union-attr]
            if r["model_sha"] and r["acc_raw"] is not None
        )
        for row, job in tqdm(todo, desc="rows", disable=None):
            if time.perf_counter() - start > 60 * budget.minutes:
                payload["skipped"].append(f"{row.tool} {row.criterion} {row.target} seed {row.seed}")  # type: ignore[union-attr]
                continue
            protocol.attempt(row, job, ctx)
            payload["rows"] = [
                r
                for r in payload["rows"]  # type: ignore[union-attr]
                if (r["tool"], r["criterion"], r["target"], r["seed"])
                != (row.tool, row.criterion, row.target, row.seed)
            ] + [asdict(row)]
            run["rows"] = int(run["rows"]) + 1  # type: ignore[call-overload]
            run["wall_s"] = round(time.perf_counter() - start, 1)
            save(payload, args.out)
    log.info("wrote %s", path.with_suffix(".md"))


if __name__ == "__main__":
    main()
