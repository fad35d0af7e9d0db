"""Train a reference Fashion-MNIST model (the ResNet-20 that ships in graphprune/zoo/weights/, or another zoo model).

Recipe (ANCHORS.md): SGD with Nesterov momentum 0.9, weight decay 5e-4, batch 128, one-cycle
schedule peaking at lr 0.1, pad-2 random crop + horizontal flip. Writes the model with BatchNorm kept
(resnet20_fmnist.onnx, ~1 MB) and a JSON beside it with the test accuracy (measured through
onnxruntime on the written file), epochs, seed, threads and wall time.

    .venv/bin/python tools/train_reference.py --epochs 4
    .venv/bin/python tools/train_reference.py --model vgg11_bn --epochs 30 --device cuda --out vgg11_bn_fmnist.onnx

Only the ResNet-20 is committed: the VGG-BN baselines (about 37 MB) are trained where they are used
(benchmarks/README.md says which runs need one).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import time
from pathlib import Path

import torch

from graphprune.data import load_dataset
from graphprune.model_io import image_norm_metadata
from graphprune.onnxutil import atomic_write
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.torch_bridge.train import TrainConfig, export_trained, fit
from graphprune.zoo import build

WEIGHTS = Path(__file__).resolve().parent.parent / "graphprune" / "zoo" / "weights"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20", help="zoo model name")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=0.1, help="one-cycle peak learning rate")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--limit", type=int, default=None, help="train on a subset (smoke runs)")
    parser.add_argument("--out", type=Path, help="default: graphprune/zoo/weights/MODEL_fmnist.onnx")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="checkpoint each epoch here")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)"
    )
    args = parser.parse_args()
    args.out = args.out or WEIGHTS / f"{args.model}_fmnist.onnx"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    train = load_dataset("fashion-mnist", "train", limit=args.limit, seed=args.seed)
    test = load_dataset("fashion-mnist", "test")
    torch.manual_seed(args.seed)
    module = build(args.model, in_channels=1, num_classes=10)
    config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        schedule="one-cycle",
        augment=True,
        seed=args.seed,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        device=args.device,
    )
    history = fit(module, train, None, config)
    export_trained(module, args.out, train.sample_shape, image_norm_metadata(train.image_norm))
    accuracy = evaluate_onnx(args.out, test)
    record = {
        "model": args.model,
        "dataset": "fashion-mnist",
        "test_accuracy": accuracy,
        "train_accuracy_last_epoch": history.last.train_accuracy if history.last else None,
        "epochs": args.epochs,
        "seed": args.seed,
        "recipe": f"SGD nesterov 0.9, wd 5e-4, batch {args.batch_size}, one-cycle peak lr {args.lr}, pad-2 crop + flip",
        "lr": args.lr,
        "batch_size": args.batch_size,
        "train_samples": len(train),
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available() and args.device != "cpu"
        else "cpu",
        "machine": f"{platform.machine()} {platform.processor() or platform.platform()}",
        "seconds": round(time.perf_counter() - start, 1),
        "file": args.out.name,
        "bytes": args.out.stat().st_size,
    }
    with atomic_write(args.out.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    logging.info("test accuracy %.4f after %d epochs; wrote %s", accuracy, args.epochs, args.out)


if __name__ == "__main__":
    main()
