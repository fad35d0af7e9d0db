"""The training-time recipes as `graphprune` commands: `slim` (Network Slimming) and `gate-decorator`.

`register(subparsers)` adds both to the main parser; torch is imported only when one of them runs.
Each prints a before/after table (accuracy, MACs, params) of every stage and writes -o OUT.onnx.
Both run under torchrun too (DDP training; rank 0 alone exports, evaluates, writes and prints).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from graphprune.cli.arguments import (
    add_image_norm_argument,
    add_json_argument,
    distillation_arguments,
    teacher,
    training_start,
)
from graphprune.errors import GraphPruneError

if TYPE_CHECKING:
    from graphprune.recipes.workspace import RecipeResult, Start
    from graphprune.torch_bridge.train import TrainConfig


def _common(p: argparse.ArgumentParser) -> None:
    """Start model, data, output and training options both recipes take."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="zoo model trained from scratch (resnet20, vgg16_bn, ...)")
    source.add_argument("--onnx", help="start from this ONNX model (BN kept), made trainable")
    p.add_argument("--data", default="fashion-mnist", help="fashion-mnist, synthetic[:N], a .npz or a folder")
    add_image_norm_argument(p)
    p.add_argument("--train-limit", type=int, help="use a seeded subset of this many training samples")
    p.add_argument("--val-limit", type=int, help="use a seeded subset of this many test samples")
    p.add_argument("-o", "--output", required=True, help="where the pruned, fine-tuned ONNX model goes")
    p.add_argument("--batch-size", type=int, default=128, help="per process under torchrun")
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of (sparsity / baseline) training")
    p.add_argument("--finetune-lr", type=float, default=0.01, help="learning rate of fine-tuning")
    p.add_argument(
        "--schedule",
        default="cosine",
        choices=("cosine", "one-cycle", "constant"),
        help="schedule of every phase",
    )
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and subsets")
    p.add_argument("--workdir", help="keep intermediate models here (default: a temporary folder)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_json_argument(p)
    distillation_arguments(p)


def _start(args: argparse.Namespace) -> Start:
    if args.onnx and Path(args.onnx).resolve() == Path(args.output).resolve():
        raise GraphPruneError("the output path is the input model; graphprune never overwrites its input.")
    return training_start(args, args.model, args.onnx)


def _train(args: argparse.Namespace) -> TrainConfig:
    from graphprune.cli.arguments import set_threads
    from graphprune.torch_bridge.train import TrainConfig

    set_threads(args)
    return TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        seed=args.seed,
        device=args.device,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
    )


def _report(result: RecipeResult, title: str, as_json: bool) -> None:
    """Print the stages table (or its rows as JSON) and the output path (rank 0 only under torchrun)."""
    from graphprune.cli.console import out, print_results
    from graphprune.report.tables import comparison_table, render
    from graphprune.torch_bridge.train import dist_info

    if not dist_info().is_main:
        return
    print_results(
        as_json,
        {**result.rows(), "output": str(result.output)},
        lambda: out.print(render(comparison_table(result.rows(), title=title)) + f"wrote {result.output}"),
    )


def cmd_slim(args: argparse.Namespace) -> int:
    from graphprune.recipes.slimming import SlimmingConfig, run_slimming

    config = SlimmingConfig(
        start=_start(args),
        output=Path(args.output),
        lam=args.lam,
        ratio=args.ratio,
        passes=args.passes,
        epochs_sparse=args.epochs_sparse,
        epochs_finetune=args.epochs_finetune,
        min_channels=args.min_channels,
        train=_train(args),
        finetune_lr=args.finetune_lr,
        workdir=Path(args.workdir) if args.workdir else None,
    )
    result = run_slimming(config, teacher=teacher(args))
    _report(result, f"Network Slimming (lambda {result.lam:g}, {args.passes} x {args.ratio:.0%})", args.json)
    return 0


def cmd_gate_decorator(args: argparse.Namespace) -> int:
    from graphprune.recipes.gate_decorator import GateDecoratorConfig, run_gate_decorator

    config = GateDecoratorConfig(
        start=_start(args),
        output=Path(args.output),
        target_flops=args.target_flops,
        ticks=args.ticks,
        tick_subset=args.tick_subset,
        tick_share=args.tick_share,
        tick_lr=args.tick_lr,
        epochs_baseline=args.epochs_baseline,
        epochs_tock=args.epochs_tock,
        epochs_finetune=args.epochs_finetune,
        gate_lambda=args.gate_lambda,
        score=args.score,
        flops_eta=args.flops_eta,
        min_keep=args.min_keep,
        train=_train(args),
        finetune_lr=args.finetune_lr,
        workdir=Path(args.workdir) if args.workdir else None,
    )
    result = run_gate_decorator(config, teacher=teacher(args))
    _report(result, f"Gate Decorator, target {args.target_flops:.0%} of the MACs", args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `slim` and `gate-decorator` commands to graphprune's sub-command parser."""
    p = subparsers.add_parser(
        "slim", help="Network Slimming: L1 on BN gamma, one global threshold, fine-tune (multi-pass)"
    )
    _common(p)
    p.add_argument(
        "--lambda", dest="lam", type=float, help="sparsity weight (default 1e-4 plain nets, 1e-5 residual)"
    )
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of all BN channels removed per pass")
    p.add_argument("--passes", type=int, default=1, help="prune + fine-tune this many times")
    p.add_argument("--epochs-sparse", type=int, default=10, help="sparsity-training epochs (0: none)")
    p.add_argument("--epochs-finetune", type=int, default=5, help="fine-tune epochs after each pass")
    p.add_argument("--min-channels", type=int, default=1, help="channels every layer keeps")
    p.set_defaults(func=cmd_slim)

    p = subparsers.add_parser(
        "gate-decorator", help="Gate Decorator: gated BN, Taylor scores, Tick-Tock to a MACs target"
    )
    _common(p)
    p.add_argument(
        "--target-flops", type=float, default=0.5, help="keep at most this fraction of the MACs (0.3 = -70%%)"
    )
    p.add_argument("--ticks", type=int, default=10, help="Ticks between two physical prunes (T)")
    p.add_argument("--tick-subset", type=float, default=0.1, help="fraction of the training set per Tick")
    p.add_argument(
        "--tick-share",
        type=float,
        help="channels masked per Tick, as a fraction of all BN channels "
        "(default 0.002 residual nets, 0.01 plain)",
    )
    p.add_argument(
        "--tick-lr", type=float, default=0.01, help="learning rate of gates and classifier in a Tick"
    )
    p.add_argument("--epochs-baseline", type=int, default=10, help="baseline training of a --model (0: none)")
    p.add_argument("--epochs-tock", type=int, default=2, help="fine-tune epochs with L1 on gates per Tock")
    p.add_argument("--epochs-finetune", type=int, default=10, help="final fine-tune epochs")
    p.add_argument("--gate-lambda", type=float, default=1e-3, help="L1 weight on the gates in a Tock")
    p.add_argument(
        "--score", default="sum", choices=("sum", "abs"), help="Taylor |sum grad*phi| or sum |grad*phi|"
    )
    p.add_argument("--flops-eta", type=float, default=0.0, help="FLOPs-aware penalty weight (0: off)")
    p.add_argument("--min-keep", type=float, default=0.1, help="fraction of each layer always kept")
    p.set_defaults(func=cmd_gate_decorator)
