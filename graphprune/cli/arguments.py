"""Arguments shared by several command families: calibration and blend options, input shapes, torch
threads; the help formatter and deprecated aliases."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphprune.recipes.workspace import Start
    from graphprune.torch_bridge.distill import Teacher

POOL_HELP = "comma-separated criteria"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show (None, False, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, []) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _DeprecatedAlias(argparse.Action):
    """An old spelling that still works (hidden from --help) and says which to use instead."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.replacement = replacement

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None
    ) -> None:
        from graphprune.cli.console import console

        console.print(f"graphprune: warning: {option} is deprecated; use {self.replacement}.", markup=False)
        setattr(namespace, self.dest, values)


def add_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Keep `old` working as a hidden, deprecated spelling of the option `new` (same dest and type)."""
    dest = new.lstrip("-").replace("-", "_")
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, replacement=new, **kwargs)


def parse_shape(text: str) -> tuple[int, ...]:
    """Sizes written 1x3x224x224 or 1,3,224,224."""
    parts = text.replace(",", "x").split("x")
    if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1x3x224x224")
    return tuple(int(p) for p in parts)


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """NAME:1x3x224x224 (the name may itself hold colons, as tf2onnx's input_1:0 does), or the sizes
    alone for a model with one input."""
    name, _, sizes = text.rpartition(":")
    return name, parse_shape(sizes)


def add_input_shape_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--input-shape",
        type=parse_input_shape,
        action="append",
        default=[],
        metavar="NAME:1x3x224x224",
        help="sizes of an input whose height/width are dynamic (symbolic sizes are otherwise taken as 1); "
        "repeat for several inputs; NAME may be left out when the model has one input",
    )


def parse_image_norm(text: str) -> str:
    """A --image-norm value, checked (graphprune.data.image_norm) so a typo fails as a usage error."""
    from graphprune.data.image_norm import parse_normalization
    from graphprune.errors import DataError

    try:
        parse_normalization(text)
    except DataError as exc:
        raise argparse.ArgumentTypeError(str(exc).partition(";")[0]) from exc
    return text


def add_image_norm_argument(parser: argparse.ArgumentParser) -> None:
    """--image-norm: how 8-bit images (image folders, uint8 .npz) become model inputs."""
    from graphprune.data.image_norm import NORMALIZE_CHOICES

    parser.add_argument(
        "--image-norm",
        type=parse_image_norm,
        metavar="|".join((*NORMALIZE_CHOICES, "MEAN/STD")),
        help="how 8-bit images become inputs, as the model was trained (default: as the model records, "
        "else data): data (each channel standardised with the data's own mean and std), imagenet "
        "(torchvision's pretrained models), unit (pixels/255), signed ([-1,1]), pixels (0..255), caffe "
        "(BGR, ImageNet mean subtracted: Keras ResNet50/VGG), or MEAN/STD on the 0..1 scale, one value "
        "or one per channel (0.5/0.25, 0.485,0.456,0.406/0.229,0.224,0.225)",
    )


def add_json_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="the results as one JSON object on stdout")


def input_shapes(args: argparse.Namespace) -> dict[str, tuple[int, ...]]:
    return dict(args.input_shape)


def set_threads(args: argparse.Namespace) -> None:
    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    """--calib / --calib-samples for activation, Taylor and blend criteria, and the blend's options."""
    parser.add_argument(
        "--calib", help="calibration data for activation/taylor/blend criteria (dataset spec)"
    )
    parser.add_argument("--calib-samples", type=int, default=1024, help="calibration images drawn (seeded)")
    add_image_norm_argument(parser)
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
    blend.add_argument("--blend-pool", help=POOL_HELP + " (default: the blend's pool)")
    blend.add_argument("--blend-similarity", type=float, default=0.9, help="Spearman threshold for clusters")
    blend.add_argument(
        "--blend-normalize",
        default="rank",
        choices=("rank", "scale"),
        help="how pooled scores are made comparable",
    )
    blend.add_argument("--blend-population", type=int, default=12, help="candidate blends per generation")
    blend.add_argument(
        "--blend-generations", type=int, default=8, help="generations of the evolutionary search"
    )
    blend.add_argument("--blend-workers", type=int, default=2, help="evaluation processes")
    blend.add_argument("--blend-report", help="folder for blend_report.json and blend_fitness.png")


def calibration_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments of graphprune.api.prune for the options added by add_calibration_arguments."""
    kwargs: dict[str, Any] = {
        "calib": args.calib,
        "calib_samples": args.calib_samples,
        "recover": args.recover,
        "image_norm": args.image_norm,
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


def training_start(args: argparse.Namespace, model: str | None = None, onnx: str | None = None) -> Start:
    """Where training starts (a zoo model or an ONNX file) with --data, its limits, --seed and
    --image-norm: Start.datasets() reads the splits as the model takes them (train, finetune, slim,
    gate-decorator)."""
    from graphprune.recipes.workspace import Start

    return Start(
        model=model,
        onnx=onnx,
        data=args.data,
        train_limit=args.train_limit,
        val_limit=args.val_limit,
        seed=args.seed,
        image_norm=args.image_norm,
    )


def distillation_arguments(p: argparse.ArgumentParser) -> None:
    """--teacher and the distillation loss's settings (train, finetune, slim, gate-decorator)."""
    p.add_argument("--teacher", help="distil from this ONNX model's logits (e.g. the unpruned original)")
    p.add_argument("--kd-weight", type=float, default=0.5, help="weight of the distillation term (0..1)")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature of distillation")


def teacher(args: argparse.Namespace) -> Teacher | None:
    """The --teacher model as an onnxruntime teacher, or None."""
    from graphprune.torch_bridge.distill import OnnxTeacher

    return OnnxTeacher(args.teacher, threads=args.threads) if args.teacher else None
