"""DDP under torchrun: 2 gloo processes x batch 8 end with the weights of 1 process x batch 16.

The same file is the worker script: torchrun runs it as __main__, each rank calls `fit` (which joins
the process group itself), and rank 0 saves the final weights for the test to compare.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from graphprune.data import load_dataset
from graphprune.torch_bridge.train import History, TrainConfig, checkpoint_path, fit

SAMPLES = 64
GLOBAL_BATCH = 16
WORLD = 2


def tiny_net() -> nn.Module:
    """No BatchNorm: BN statistics are per process under plain DDP, which would make the runs differ."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def config(batch_size: int, checkpoint_dir: Path | None = None) -> TrainConfig:
    """Augmentation and shuffling off: rank r gets samples r, r+2, ..., so each step's two shards
    together are exactly the single process's batch, and DDP's gradient mean is the batch mean."""
    return TrainConfig(
        epochs=2,
        batch_size=batch_size,
        lr=0.05,
        schedule="cosine",
        augment=False,
        shuffle=False,
        progress=False,
        checkpoint_dir=checkpoint_dir,
    )


def train(batch_size: int, checkpoint_dir: Path | None = None) -> tuple[nn.Module, History]:
    module = tiny_net()
    history = fit(module, load_dataset(f"synthetic:{SAMPLES}"), None, config(batch_size, checkpoint_dir))
    return module, history


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    weights = tmp_path / "ddp.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={WORLD}",
            __file__,
            str(weights),
            str(tmp_path / "ckpt"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(weights)
    module, history = train(GLOBAL_BATCH)
    single = module.state_dict()
    assert distributed.keys() == single.keys()
    for name, value in single.items():
        assert torch.allclose(distributed[name], value, rtol=1e-4, atol=1e-6), name
    assert not torch.allclose(single["0.weight"], tiny_net().state_dict()["0.weight"])
    checkpoint = torch.load(checkpoint_path(tmp_path / "ckpt"), weights_only=False)
    assert checkpoint["epoch"] == 2
    # Only rank 0 wrote it; its history holds the loss and accuracy over both shards.
    for saved, record in zip(checkpoint["history"], history.epochs, strict=True):
        assert saved["epoch"] == record.epoch
        assert abs(saved["train_loss"] - record.train_loss) < 1e-4
        assert saved["train_accuracy"] == record.train_accuracy


def main(weights: str, checkpoint_dir: str) -> None:
    """torchrun worker: train with the per-process batch; rank 0 saves the weights."""
    module, _ = train(GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]), Path(checkpoint_dir))
    if os.environ["RANK"] == "0":
        torch.save(module.state_dict(), weights)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
