"""DDP under torchrun: 2 gloo processes x batch 8 end with the weights of 1 process x batch 16, for
`fit` (distilling from an ONNX teacher, which each rank runs on its own shard) and for the Network
Slimming and Gate Decorator recipes built on it.

The same file is the worker script: torchrun runs it as __main__ with the worker's name; each rank
trains (`fit` joins the process group itself) and saves what the test compares.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from helpers import run
from torch import nn

from graphprune.data import load_dataset
from graphprune.recipes import gate_decorator, slimming
from graphprune.recipes.gate_decorator import GateDecoratorConfig, run_gate_decorator
from graphprune.recipes.slimming import SlimmingConfig, run_slimming
from graphprune.recipes.workspace import Start
from graphprune.torch_bridge.distill import OnnxTeacher
from graphprune.torch_bridge.export import export
from graphprune.torch_bridge.train import History, TrainConfig, checkpoint_path, fit

SAMPLES = 64
GLOBAL_BATCH = 16
WORLD = 2
TEARDOWN_ABORT = "terminate called without an active exception"


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


def teacher_model(path: Path) -> Path:
    """A differently initialised tiny net as the ONNX teacher."""
    teacher = tiny_net()
    with torch.no_grad():
        for parameter in teacher.parameters():
            parameter.mul_(-2.0)
    export(teacher, torch.zeros(1, 1, 28, 28), path)
    return path


def train(batch_size: int, teacher: Path, checkpoint_dir: Path | None = None) -> tuple[nn.Module, History]:
    module = tiny_net()
    data = load_dataset(f"synthetic:{SAMPLES}")
    history = fit(module, data, None, config(batch_size, checkpoint_dir), teacher=OnnxTeacher(teacher))
    return module, history


def torchrun(*args: str) -> None:
    """Run this file's worker `args[0]` under torchrun with WORLD gloo processes; fail with their stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}"]
    for _ in range(2):
        result = subprocess.run(
            [*command, __file__, *args], capture_output=True, text=True, timeout=180, env=env, check=False
        )
        # Known, rare, not yet understood: on a loaded 2-core machine a rank sometimes aborts in
        # process teardown ("terminate called without an active exception") after its work is done;
        # one rerun, so that the comparison below still judges a complete run.
        if result.returncode == 0 or TEARDOWN_ABORT not in result.stderr:
            break
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_gloo_processes_match_one(tmp_path: Path) -> None:
    weights, teacher = tmp_path / "ddp.pt", teacher_model(tmp_path / "teacher.onnx")
    torchrun("fit", str(weights), str(teacher), str(tmp_path / "ckpt"))
    distributed = torch.load(weights)
    module, history = train(GLOBAL_BATCH, teacher)
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


def fit_worker(weights: str, teacher: str, checkpoint_dir: str) -> None:
    """torchrun worker: train with the per-process batch; rank 0 saves the weights."""
    module, _ = train(GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]), Path(teacher), Path(checkpoint_dir))
    if os.environ["RANK"] == "0":
        torch.save(module.state_dict(), weights)


# Recipes -----------------------------------------------------------------------------------------

OUTPUTS = ("slim.onnx", "gate-decorator.onnx")


def paired_data(path: Path) -> Path:
    """An .npz whose training samples come in identical pairs. Unshuffled, each rank's batch of 8 then
    holds the same samples as the single process's batch of 16 (each twice), so BN batch statistics,
    gradients and Taylor scores are the same in both runs despite BatchNorm."""
    train, test = load_dataset(f"synthetic:{SAMPLES // 2}"), load_dataset(f"synthetic:{SAMPLES}", "test")
    pairs = np.repeat(np.arange(len(train)), 2)
    np.savez(
        path, x_train=train.images[pairs], y_train=train.labels[pairs], x_test=test.images, y_test=test.labels
    )
    return path


def tiny_bn_net() -> nn.Module:
    """Two conv-BN-ReLU layers with spread gammas. BN momentum 0 keeps the running statistics fixed:
    their unbiased batch variance differs between 8 and 16 samples."""
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8, momentum=0.0),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16, momentum=0.0),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )
    with torch.no_grad():
        for layer in module:
            if isinstance(layer, nn.BatchNorm2d):
                layer.weight.uniform_(0.2, 1.5)
    return module


def run_recipes(data: Path, output: Path, batch_size: int) -> list[nn.Module]:
    """A tiny Network Slimming and a tiny Gate Decorator (1-epoch phases) writing into `output`."""
    start = Start(data=str(data))
    train_config = config(batch_size)
    slim, gated = tiny_bn_net(), tiny_bn_net()
    run_slimming(
        SlimmingConfig(
            start,
            output / OUTPUTS[0],
            lam=1e-3,
            ratio=0.3,
            epochs_sparse=1,
            epochs_finetune=1,
            train=train_config,
        ),
        module=slim,
    )
    run_gate_decorator(
        GateDecoratorConfig(
            start,
            output / OUTPUTS[1],
            target_flops=0.6,
            ticks=2,
            tick_subset=1.0,
            tick_share=0.1,
            epochs_tock=1,
            epochs_finetune=1,
            train=train_config,
        ),
        module=gated,
    )
    return [slim, gated]


def forbid_onnx_work() -> None:
    """Make the recipes fail on any export, analysis, pruning, onnxruntime evaluation or file write."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("only rank 0 exports, analyses, prunes, evaluates and writes")

    for module, name in [
        (slimming, "export_trained"),
        (slimming, "prune"),
        (slimming, "evaluate_onnx"),
        (slimming, "atomic_write"),
        (gate_decorator, "export_trained"),
        (gate_decorator, "analyze_model"),
        (gate_decorator, "prune"),
    ]:
        setattr(module, name, refuse)


def test_recipes_under_two_gloo_processes_match_one(tmp_path: Path) -> None:
    data = paired_data(tmp_path / "pairs.npz")
    torchrun("recipes", str(data), str(tmp_path / "ddp"))
    single = run_recipes(data, tmp_path / "single", GLOBAL_BATCH)
    assert sorted(os.listdir(tmp_path / "ddp" / "out")) == sorted(OUTPUTS)  # one file each, no leftovers
    # Every rank ends with rank 0's module, pruned widths and weights alike.
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{rank}.pt") for rank in range(WORLD))
    for first, second, reference in zip(rank0, rank1, single, strict=True):
        assert first.keys() == second.keys() == reference.state_dict().keys()
        assert all(torch.equal(first[name], second[name]) for name in first)
    images = load_dataset(str(data), "test").images
    for name in OUTPUTS:
        distributed, alone = onnx.load(tmp_path / "ddp" / "out" / name), onnx.load(tmp_path / "single" / name)
        onnx.checker.check_model(distributed)
        widths = {init.name: list(init.dims) for init in alone.graph.initializer}
        assert {init.name: list(init.dims) for init in distributed.graph.initializer} == widths
        assert widths["1.weight"][0] + widths["4.weight"][0] < 24, name  # something was pruned
        feed = {alone.graph.input[0].name: images}
        np.testing.assert_allclose(run(distributed, feed)[0], run(alone, feed)[0], rtol=1e-4, atol=1e-6)


def recipes_worker(data: str, folder: str) -> None:
    """torchrun worker: both recipes on every rank, the ONNX work forbidden beyond rank 0; each rank
    saves its final modules' states."""
    rank = int(os.environ["RANK"])
    if rank:
        forbid_onnx_work()
    modules = run_recipes(Path(data), Path(folder) / "out", GLOBAL_BATCH // int(os.environ["WORLD_SIZE"]))
    torch.save([module.state_dict() for module in modules], Path(folder) / f"rank{rank}.pt")


WORKERS = {"fit": fit_worker, "recipes": recipes_worker}

if __name__ == "__main__":
    WORKERS[sys.argv[1]](*sys.argv[2:])
