"""The main job on the built-in default: the shipped Fashion-MNIST ResNet-20 is pruned to half its MACs
and verified, recovered without training (least squares on calibration images), fine-tuned briefly with
the original as a distillation teacher, re-exported, evaluated and benchmarked: four rows (original,
pruned, pruned + recovered, pruned + recovered + fine-tuned) and plots."""

from __future__ import annotations

import argparse
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from graphprune.api import PruneResult, model_cost, prune
from graphprune.cli.arguments import add_alias, add_json_argument
from graphprune.cli.console import out, print_results, stage
from graphprune.onnxutil import conv_channels
from graphprune.planning import PlanOptions
from graphprune.report.plots import plot_accuracy_vs_macs, plot_channels
from graphprune.runtime.bench import bench_many

log = logging.getLogger(__name__)

REFERENCE = Path(__file__).resolve().parent.parent / "zoo" / "weights" / "resnet20_fmnist.onnx"
LATENCY_ROUNDS = 3


@dataclass
class DemoConfig:
    """Budget of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    out_dir: Path
    target_macs: float = 0.5
    # onnxruntime's blocked CPU conv kernels work on 16 channels at a time (AVX-512; 8 on AVX2): odd
    # widths fall back to slower kernels and can make a half-MACs ResNet-20 slower than the original.
    round_to: int = 16
    criterion: str = "l1"
    recover: str = "lsq"
    calib_samples: int = 1024
    teacher: bool = True
    finetune_epochs: int = 1
    finetune_samples: int = 15000
    data: str = "fashion-mnist"
    threads: int = 2


@dataclass
class DemoResult:
    rows: dict[str, dict[str, float]]
    prune: PruneResult
    files: list[Path] = field(default_factory=list)


def run_demo(config: DemoConfig) -> DemoResult:
    """Prune, verify, fine-tune, evaluate and bench the reference model; files land in config.out_dir."""
    import torch

    from graphprune.api import recover
    from graphprune.data import load_dataset, load_splits
    from graphprune.model_io import input_image_norm, load_model, save_model, trained_metadata
    from graphprune.runtime.evaluate import evaluate_onnx
    from graphprune.runtime.shapes import image_shape
    from graphprune.torch_bridge.distill import OnnxTeacher
    from graphprune.torch_bridge.foldback import onnx_to_module, verify_foldback
    from graphprune.torch_bridge.train import TrainConfig, export_trained, fit

    out = config.out_dir
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    original = out / "resnet20_fmnist.onnx"
    shutil.copyfile(REFERENCE, original)
    reference = load_model(original).proto  # a folder is read as it takes its input
    takes = {"shape": image_shape(reference), "image_norm": input_image_norm(reference)}
    train, test = load_splits(config.data, train_limit=config.finetune_samples, seed=0, **takes)

    pruned_path, plan_path = out / "resnet20_pruned.onnx", out / "resnet20_pruned.plan.json"
    options = PlanOptions(target_macs=config.target_macs, round_to=config.round_to)
    result = prune(original, options, criterion=config.criterion, threads=config.threads, recover="none")
    result.save(pruned_path, plan_path)
    models = {"original": original, "pruned": pruned_path}

    start = result.model
    if config.recover != "none":
        calib = load_dataset(config.data, "train", limit=config.calib_samples, seed=1, **takes)
        recovered = recover(
            original, result.model, calib, plan=result.plan, method=config.recover, threads=config.threads
        )
        start = recovered.model
        models["pruned + recovered"] = save_model(start, out / "resnet20_pruned_recovered.onnx")

    module = onnx_to_module(start)
    verify_foldback(module, start)
    teacher = OnnxTeacher(original, threads=config.threads) if config.teacher else None
    train_config = TrainConfig(epochs=config.finetune_epochs, lr=0.01, schedule="cosine", seed=0)
    fit(module, train, None, train_config, teacher=teacher)
    tuned_path = out / "resnet20_pruned_finetuned.onnx"
    export_trained(module, tuned_path, train.sample_shape, trained_metadata(start, train.image_norm))
    steps = " + recovered" if config.recover != "none" else ""
    models[f"pruned{steps} + fine-tuned"] = tuned_path

    rows: dict[str, dict[str, float]] = {}
    for label, path in models.items():
        cost = model_cost(onnx.load(str(path)))
        rows[label] = {
            "accuracy": evaluate_onnx(path, test, threads=config.threads),
            "macs": cost.macs,
            "params": cost.params,
        }
    latencies = bench_many(
        list(models.values()),
        [1],
        threads=config.threads,
        warmup=10 * LATENCY_ROUNDS,
        runs=100 * LATENCY_ROUNDS,
        rounds=LATENCY_ROUNDS,
    )
    for metrics, latency in zip(rows.values(), latencies, strict=True):
        metrics["latency_ms"] = latency.median_ms
    kept = result.after.macs / result.before.macs
    channels = plot_channels(
        conv_channels(result.dep.model),
        conv_channels(result.model),
        out / "channels_per_layer.png",
        title=f"ResNet-20 channels per conv (MACs kept {kept:.0%})",
    )
    points = [{"label": label, "macs": m["macs"], "accuracy": m["accuracy"]} for label, m in rows.items()]
    accuracy = plot_accuracy_vs_macs(points, out / "accuracy_vs_macs.png", title="Fashion-MNIST ResNet-20")
    files = [*models.values(), plan_path, channels, accuracy]
    return DemoResult(rows, result, files)


def cmd_demo(args: argparse.Namespace) -> int:
    from graphprune.report.tables import comparison_table, render

    config = DemoConfig(
        Path(args.out),
        target_macs=args.target_macs,
        round_to=args.round_to,
        finetune_epochs=args.epochs,
        finetune_samples=args.train_limit,
        recover=args.recover,
        teacher=args.teacher,
        data=args.data,
        threads=args.threads,
    )
    with stage("demo"):
        demo = run_demo(config)
    report = demo.prune.verification
    title = f"Fashion-MNIST ResNet-20, test accuracy; ORT CPU batch 1, {args.threads} threads"
    numbers = {"verification": {"max_rel_error": report.max_rel_error, "tensors": report.tensors}}
    print_results(
        args.json,
        {**numbers, **demo.rows, "files": [str(p) for p in demo.files]},
        lambda: out.print(
            f"pruned model verified: max rel err {report.max_rel_error:.2g} over {report.tensors} tensors\n"
            + render(comparison_table(demo.rows, title=title))
            + "wrote "
            + ", ".join(str(p) for p in demo.files)
        ),
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the main job: prune the shipped Fashion-MNIST ResNet-20 to half its MACs"
    )
    p.add_argument("--out", default="out/demo", help="folder for the models, table and plots")
    p.add_argument("--target-macs", type=float, default=0.5, help="keep at most this fraction of the MACs")
    p.add_argument(
        "--round-to",
        type=int,
        default=16,
        help="kept channels a multiple of N (onnxruntime CPU kernels: 8 or 16)",
    )
    p.add_argument(
        "--recover",
        default="lsq",
        choices=("none", "bn", "lsq"),
        help="recovery without training before the fine-tune (see prune --recover)",
    )
    p.add_argument(
        "--teacher",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distil the fine-tune from the original model",
    )
    p.add_argument("--epochs", type=int, default=1, help="fine-tune epochs")
    p.add_argument("--train-limit", type=int, default=15000, help="training images used for fine-tuning")
    add_alias(p, "--samples", "--train-limit", type=int)
    p.add_argument("--data", default="fashion-mnist", help="dataset spec (synthetic for a quick check)")
    p.add_argument("--threads", type=int, default=2, help="threads of onnxruntime and torch")
    add_json_argument(p)
    p.set_defaults(func=cmd_demo)
