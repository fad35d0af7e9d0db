"""The training commands of `graphprune`: train (a zoo baseline), finetune (a pruned ONNX model), eval.

`register(subparsers)` adds them to the main parser (graphprune/cli/main.py). torch is imported only when
one of these commands runs. `finetune` folds the model back into PyTorch (onto the user's module with
--module, else through onnx2torch), proves the fold-back equal to the input graph, fine-tunes and
re-exports it with BatchNorm kept; --teacher ORIGINAL.onnx distils from the original model's logits
(onnxruntime, per process under torchrun). Both training commands checkpoint every epoch into OUT.ckpt/
(--resume continues there) and run under torchrun as DDP, e.g.
`torchrun --nproc_per_node=4 -m graphprune.cli finetune pruned.onnx -o tuned.onnx --data fashion-mnist`;
then only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from graphprune.cli.arguments import (
    add_alias,
    add_image_norm_argument,
    add_json_argument,
    distillation_arguments,
    set_threads,
    teacher,
    training_start,
)
from graphprune.errors import GraphPruneError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from torch import nn

    from graphprune.data import ArrayDataset
    from graphprune.torch_bridge.train import Callback, TrainConfig, TrainState


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `train`, `finetune` and `eval` commands."""
    p = subparsers.add_parser("train", help="train a zoo model (a baseline) and export it with BN kept")
    p.add_argument("--model", default="resnet20", help="zoo name, torchvision:NAME or pkg.module:callable")
    p.add_argument("-o", "--output", required=True, help="the trained model, exported to ONNX with BN kept")
    _training_arguments(p, epochs=8, lr=0.1, schedule="one-cycle")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "finetune", help="fold a (pruned) ONNX model back into torch, fine-tune, export"
    )
    p.add_argument("model", help="the (pruned) ONNX model")
    p.add_argument("-o", "--output", required=True, help="the fine-tuned model, re-exported to ONNX")
    p.add_argument(
        "--module",
        help="fold back onto this module (zoo name or pkg.module:callable, parameters named as in the "
        "model); default: convert the ONNX graph with onnx2torch",
    )
    _training_arguments(p, epochs=3, lr=0.01, schedule="cosine")
    p.set_defaults(func=cmd_finetune)

    p = subparsers.add_parser("eval", help="top-1 accuracy of an ONNX classifier through onnxruntime")
    p.add_argument("model", help="the ONNX classifier")
    p.add_argument("--data", required=True, help="fashion-mnist, synthetic[:N], FILE.npz or an image folder")
    p.add_argument("--split", default="test", choices=("train", "test"), help="which split to evaluate")
    p.add_argument("--limit", type=int, default=None, help="evaluate a seeded subset of N samples")
    add_image_norm_argument(p)
    p.add_argument("--batch-size", type=int, default=256, help="images per onnxruntime run")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)"
    )
    p.add_argument(
        "--provider", default="cpu", choices=("cpu", "cuda"), help="onnxruntime execution provider"
    )
    add_json_argument(p)
    p.set_defaults(func=cmd_eval)


def _training_arguments(p: argparse.ArgumentParser, *, epochs: int, lr: float, schedule: str) -> None:
    """Options shared by train and finetune (defaults: ANCHORS.md's recipe)."""
    add_json_argument(p)
    p.add_argument("--data", required=True, help="fashion-mnist, synthetic[:N], FILE.npz or an image folder")
    add_image_norm_argument(p)
    p.add_argument("--epochs", type=int, default=epochs, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=128, help="per process under torchrun")
    p.add_argument("--lr", type=float, default=lr, help="peak (one-cycle) or initial (cosine) learning rate")
    p.add_argument(
        "--schedule",
        default=schedule,
        choices=("cosine", "one-cycle", "constant"),
        help="learning-rate schedule",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=0.0,
        help="share of the steps over which cosine / constant ramp up to --lr (e.g. 0.1; default none)",
    )
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--no-nesterov", action="store_true", help="plain momentum instead of Nesterov's")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument("--no-augment", action="store_true", help="no pad-2 random crop + horizontal flip")
    p.add_argument("--seed", type=int, default=0, help="seed of data order, augmentation and subsets")
    p.add_argument("--train-limit", type=int, default=None, help="train on a seeded subset of N samples")
    add_alias(p, "--limit", "--train-limit", type=int)
    p.add_argument(
        "--val-limit", type=int, default=None, help="evaluate on a seeded subset of N test samples"
    )
    add_alias(p, "--eval-limit", "--val-limit", type=int)
    p.add_argument("--checkpoint-dir", help="where to checkpoint each epoch (default OUT.ckpt/)")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    distillation_arguments(p)


def _config(args: argparse.Namespace, model_sha256: str | None = None) -> TrainConfig:
    from graphprune.torch_bridge.train import TrainConfig

    checkpoint_dir = (
        Path(args.checkpoint_dir) if args.checkpoint_dir else Path(args.output).with_suffix(".ckpt")
    )
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=args.momentum,
        nesterov=not args.no_nesterov,
        weight_decay=args.weight_decay,
        schedule=args.schedule,
        augment=not args.no_augment,
        seed=args.seed,
        checkpoint_dir=checkpoint_dir,
        resume=args.resume,
        device=args.device,
        model_sha256=model_sha256,
        kd_weight=args.kd_weight,
        kd_temperature=args.kd_temperature,
        warmup=args.warmup,
    )


def _check_output(args: argparse.Namespace, model: str | None = None) -> None:
    output = Path(args.output)
    if output.suffix != ".onnx":
        raise GraphPruneError(f"The output {output} must be an .onnx file; name it e.g. {output.stem}.onnx.")
    if model is not None and output.resolve() == Path(model).resolve():
        raise GraphPruneError("The output path is the input model; graphprune never overwrites its input.")


def _train_and_export(
    module: nn.Module,
    train: ArrayDataset,
    test: ArrayDataset,
    args: argparse.Namespace,
    metadata: Mapping[str, str],
    model_sha256: str | None = None,
) -> float | None:
    """Fit with per-epoch lines, then (rank 0) export to OUT with `metadata` in its metadata_props
    (Start.model_metadata) and return its test accuracy via ORT."""
    from graphprune.cli.console import stage
    from graphprune.runtime.evaluate import evaluate_onnx
    from graphprune.torch_bridge.train import dist_info, export_trained, fit

    fit(module, train, test, _config(args, model_sha256), callbacks=[_epoch_printer()], teacher=teacher(args))
    if not dist_info().is_main:
        return None
    with stage("export"):
        export_trained(module, args.output, train.sample_shape, metadata)
    with stage("evaluate"):
        return evaluate_onnx(args.output, test)


def _epoch_printer() -> Callback:
    """A callback printing one line per epoch on rank 0 (the bar itself disappears when done)."""
    from graphprune.cli.console import console
    from graphprune.torch_bridge.train import Callback

    class EpochPrinter(Callback):
        def on_epoch_end(self, state: TrainState) -> None:
            record = state.history.epochs[-1]
            if state.rank == 0:
                console.print(
                    f"epoch {record.epoch}/{state.config.epochs}  loss {record.train_loss:.4f}  "
                    f"train acc {record.train_accuracy:.4f}  test acc {record.val_accuracy:.4f}  "
                    f"{record.seconds:.1f} s"
                )

    return EpochPrinter()


def cmd_train(args: argparse.Namespace) -> int:
    from graphprune.cli.console import out, print_results

    _check_output(args)
    set_threads(args)
    start = training_start(args, model=args.model)
    train, test = start.datasets()
    module = start.module(train)
    accuracy = _train_and_export(module, train, test, args, start.model_metadata(train))
    if accuracy is not None:
        print_results(
            args.json,
            {"accuracy": accuracy, "samples": len(test), "data": test.name, "output": args.output},
            lambda: out.print(
                f"test accuracy {accuracy:.4f} ({test.name}, {len(test)} samples)\nwrote {args.output}"
            ),
        )
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from graphprune.cli.console import console, out, print_results, stage
    from graphprune.model_io import model_sha256
    from graphprune.runtime.evaluate import evaluate_onnx
    from graphprune.torch_bridge.foldback import apply_to_module, onnx_to_module, verify_foldback
    from graphprune.torch_bridge.train import dist_info
    from graphprune.zoo import build

    _check_output(args, args.model)
    set_threads(args)
    main = dist_info().is_main
    start = training_start(args, onnx=args.model)
    proto = start.onnx_proto
    train, test = start.datasets()
    with stage("fold-back") if main else contextlib.nullcontext():
        if args.module:
            module = apply_to_module(build(args.module), proto)
        else:
            module = onnx_to_module(proto)
        error = verify_foldback(module, proto)
    before = evaluate_onnx(proto, test) if main else None
    if main:
        console.print(f"fold-back  equal to {Path(args.model).name}: max rel err {error:.2g}")
    after = _train_and_export(
        module, train, test, args, start.model_metadata(train), model_sha256(args.model)
    )
    if before is not None and after is not None:
        numbers = {"foldback_max_rel_error": error, "accuracy_before": before, "accuracy_after": after}
        print_results(
            args.json,
            {**numbers, "samples": len(test), "data": test.name, "output": args.output},
            lambda: out.print(
                f"test accuracy {before:.4f} -> {after:.4f} ({test.name}, {len(test)} samples)\nwrote {args.output}"
            ),
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from graphprune.cli.console import out, print_results, stage
    from graphprune.data import dataset_parts
    from graphprune.model_io import input_image_norm, load_model
    from graphprune.runtime.evaluate import top_k_correct
    from graphprune.runtime.progress import progress
    from graphprune.runtime.shapes import image_shape

    model = load_model(args.model).proto
    image_norm = input_image_norm(model, args.image_norm)
    parts = dataset_parts(
        args.data, args.split, limit=args.limit, shape=image_shape(model), image_norm=image_norm
    )
    correct = top5 = samples = 0
    with stage("evaluate"), progress(desc="evaluate", unit="img") as bar:
        for part in parts:  # a folder too big for memory comes in parts
            counts = top_k_correct(
                model,
                part,
                args.batch_size,
                ks=(1, 5),
                provider=args.provider,
                threads=args.threads,
                on_batch=bar.update,
            )
            correct, top5, samples = correct + counts[0], top5 + counts[1], samples + len(part)
    accuracy, name = correct / samples, part.name
    numbers = {"accuracy": accuracy, "top5_accuracy": top5 / samples, "correct": correct, "samples": samples}
    print_results(
        args.json,
        {**numbers, "data": name, "split": args.split, "model": args.model, "image_norm": part.image_norm},
        lambda: out.print(
            f"accuracy {accuracy:.4f} ({correct}/{samples}), top-5 {top5 / samples:.4f}, on {name} {args.split}"
        ),
    )
    return 0
