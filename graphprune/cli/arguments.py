"""Arguments shared by several command families: calibration and blend options, torch threads."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphprune.torch_bridge.distill import Teacher

POOL_HELP = "comma-separated criteria (default: the blend's pool)"


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """--calib / --calib-samples for activation, Taylor and blend criteria, and the blend's options."""
    parser.add_argument(
        "--calib", help="calibration data for activation/taylor/blend criteria (dataset spec)"
    )
    parser.add_argument(
        "--calib-samples", type=int, default=1024, help="calibration images drawn (default 1024)"
    )
    parser.add_argument(
        "--recover",
        choices=("none", "bn", "lsq"),
        help="recovery without training, after verification, on the --calib images (default: bn with "
        "--calib, else none). none: the surgery's model as verified. bn: re-estimate the BatchNorm "
        "statistics behind every removal and shift biases no BN re-centres (BN-folded models); cheap, "
        "first choice at mild pruning. lsq: re-fit every affected conv/linear layer by least squares "
        "to the original's outputs, then BN; a few seconds more, much better at strong pruning",
    )
    blend = parser.add_argument_group("blend (--criterion blend)")
    blend.add_argument("--blend-pool", help=POOL_HELP)
    blend.add_argument("--blend-similarity", type=float, default=0.9, help="Spearman threshold for clusters")
    blend.add_argument("--blend-normalize", default="rank", choices=("rank", "scale"))
    blend.add_argument("--blend-population", type=int, default=12)
    blend.add_argument("--blend-generations", type=int, default=8)
    blend.add_argument("--blend-workers", type=int, default=2, help="evaluation processes (default 2)")
    blend.add_argument("--blend-report", help="folder for blend_report.json and blend_fitness.png")


def calibration_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of graphprune.api.prune for the options added by add_calibration_arguments."""
    kwargs: dict[str, Any] = {
        "calib": args.calib,
        "calib_samples": args.calib_samples,
        "recover": args.recover,
    }
    if args.criterion == "blend":
        from graphprune.search.blend import DEFAULT_POOL, BlendConfig

        pool = (
            tuple(n.strip() for n in args.blend_pool.split(",") if n.strip())
            if args.blend_pool
            else DEFAULT_POOL
        )
        kwargs["criterion_options"] = {
            "config": BlendConfig(
                pool=pool,
                similarity=args.blend_similarity,
                normalize=args.blend_normalize,
                population=args.blend_population,
                generations=args.blend_generations,
                workers=args.blend_workers,
                report_dir=args.blend_report,
            )
        }
    return kwargs


def distillation_arguments(p: argparse.ArgumentParser) -> None:
    """--teacher and the distillation loss's settings (train, finetune, slim, gate-decorator)."""
    p.add_argument("--teacher", help="distil from this ONNX model's logits (e.g. the unpruned original)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term (0..1)")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature of distillation")


def teacher(args: argparse.Namespace) -> Teacher | None:
    """The --teacher model as an onnxruntime teacher, or None."""
    from graphprune.torch_bridge.distill import OnnxTeacher

    return OnnxTeacher(args.teacher, threads=args.threads) if args.teacher else None
