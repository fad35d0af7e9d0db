"""Training, fine-tuning and evaluation of classification CNNs: one loop every recipe plugs into.

`fit` runs SGD (momentum, optional Nesterov, weight decay) with a per-step cosine or one-cycle
schedule, pad-and-crop + flip augmentation, a tqdm bar showing loss and accuracy, and an atomic
checkpoint after every epoch that `resume` continues from bit for bit (model, optimizer, scheduler,
epoch, history, RNG states and callback states).

The loss is cross-entropy, or with ``teacher`` (graphprune.torch_bridge.distill) the distillation
loss against the teacher's logits on the same augmented batch, weighted by ``kd_weight`` and softened
by ``kd_temperature``. Recipes (Network Slimming, Gate Decorator) plug in at these points, in this
order per batch:

1. ``regularizer(module) -> Tensor | None``: an extra loss term added to the loss before
   backward (e.g. lambda * sum |gamma| over BN layers); it receives the unwrapped module.
2. ``Callback.after_backward(state)``: gradients are complete (and, under DDP, already averaged over
   processes) but not yet applied: edit ``p.grad`` (the sparsity sub-gradient) or read it (Taylor
   scores |dL/dphi * phi|).
3. ``Callback.on_batch_end(state)``: after the optimizer and scheduler step (clamp or re-mask weights).
4. ``Callback.on_epoch_end(state)``: after validation, before the checkpoint; ``state.stop = True``
   ends training after this epoch (the checkpoint is still written).

plus ``on_train_begin`` / ``on_train_end`` once per call. A callback that carries state across epochs
returns it from ``state_dict`` and takes it back in ``load_state_dict``, so checkpoints include it.
Only parameters with ``requires_grad`` at the time `fit` is called are optimised (freeze convs for
a Gate Decorator Tick that way); ``param_groups`` gives per-group settings such as no weight decay.

Distributed data parallel: when started by ``torchrun`` (RANK and WORLD_SIZE set), `fit` joins the
process group (gloo on CPU, nccl on CUDA), wraps the module in DistributedDataParallel and shards the
data with a seeded DistributedSampler. ``batch_size`` is per process, so the global batch is
``batch_size * world_size``; BN statistics are per process (standard DDP). Only rank 0 writes
checkpoints, logs and shows the bar; the returned History holds global (all-reduced) numbers. The
process group is joined once (`init_distributed`, or the first `fit`) and kept until the process
exits, so a recipe may call `fit` many times and use the group in between: `run_on_main` runs work
(export, evaluation, writing files, pruning decisions) on rank 0 alone and hands its result to every
rank, which waits for it.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import onnx
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, TensorDataset

from graphprune.data import ArrayDataset, torch_loader
from graphprune.data.loader import CROP_PADDING, PadCropFlip
from graphprune.errors import DataError, GraphPruneError
from graphprune.onnxutil import atomic_write
from graphprune.runtime.evaluate import EVAL_BATCH
from graphprune.runtime.progress import progress
from graphprune.torch_bridge.distill import Teacher, kd_loss

logger = logging.getLogger(__name__)

Schedule = Literal["cosine", "one-cycle", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "one-cycle", "constant")
CHECKPOINT_NAME = "last.pt"
# 2: the config records the starting model (model_sha256) and the distillation settings.
CHECKPOINT_VERSION = 2
# Settings a resumed run must share with the run that wrote the checkpoint (they fix the schedule and
# the loss); its starting model (TrainConfig.model_sha256) is checked first, with its own message.
RESUME_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "schedule",
    "seed",
    "kd_weight",
    "kd_temperature",
)
# Regularizer returns an extra loss term (or None for "nothing this batch").
Regularizer = Callable[[nn.Module], torch.Tensor | None]
ParamGroups = Callable[[nn.Module], Iterable[dict[str, Any]]]
# The training loss of (logits, inputs, targets).
Objective = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
T = TypeVar("T")


@dataclass
class TrainConfig:
    """Hyper-parameters of one `fit` call; `batch_size` is per process under DDP.

    `model_sha256` names the ONNX model a fine-tune started from (a resumed run must start from the same);
    `kd_weight` and `kd_temperature` shape the distillation loss when `fit` is given a teacher.
    `warmup` is the share of steps over which a cosine or constant schedule ramps linearly up to `lr`
    (a freshly pruned network can diverge at its first full-rate steps; one-cycle ramps by itself).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: Schedule = "cosine"
    augment: bool = True
    shuffle: bool = True
    seed: int = 0
    checkpoint_dir: Path | None = None
    resume: bool = False
    device: str = "auto"
    progress: bool = True
    model_sha256: str | None = None
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    warmup: float = 0.0

    def validate(self) -> None:
        """Raise GraphPruneError on settings that cannot train."""
        if self.epochs < 1 or self.batch_size < 1:
            raise GraphPruneError(
                f"Training needs at least 1 epoch and batch size 1, got epochs={self.epochs} "
                f"batch_size={self.batch_size}; raise them."
            )
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise GraphPruneError(
                f"Learning rate must be positive and momentum / weight decay non-negative, got lr={self.lr} "
                f"momentum={self.momentum} weight_decay={self.weight_decay}; fix the training settings."
            )
        if self.schedule not in SCHEDULES:
            raise GraphPruneError(f"Unknown schedule '{self.schedule}'; use one of {', '.join(SCHEDULES)}.")
        if self.nesterov and self.momentum == 0:
            raise GraphPruneError("Nesterov momentum needs momentum > 0; set momentum or turn nesterov off.")
        if not 0.0 <= self.kd_weight <= 1.0 or self.kd_temperature <= 0:
            raise GraphPruneError(
                f"Distillation needs 0 <= kd_weight <= 1 and kd_temperature > 0, got kd_weight={self.kd_weight} "
                f"kd_temperature={self.kd_temperature}; fix the distillation settings."
            )
        if not 0.0 <= self.warmup < 1.0 or (self.warmup and self.schedule == "one-cycle"):
            raise GraphPruneError(
                f"Warm-up must be a share of the steps in [0, 1) with a cosine or constant schedule, got "
                f"warmup={self.warmup} with {self.schedule} (one-cycle warms up by itself)."
            )
        if self.resume and self.checkpoint_dir is None:
            raise GraphPruneError("Resuming needs a checkpoint directory; pass checkpoint_dir.")


@dataclass
class EpochRecord:
    """What one epoch achieved: train loss and accuracy averaged over the epoch and all processes,
    validation accuracy after it, the learning rate of its last step, its wall time."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_accuracy: float | None
    lr: float
    seconds: float


@dataclass
class History:
    """Per-epoch records of a `fit` call (including epochs restored from a checkpoint)."""

    epochs: list[EpochRecord] = field(default_factory=list)

    @property
    def last(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None


@dataclass
class TrainState:
    """What callbacks see. `module` is the user's (unwrapped) module; `model` is what runs forward
    (the DDP wrapper under torchrun, else the module itself). Batch fields hold the current batch."""

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    config: TrainConfig
    history: History
    device: torch.device
    rank: int = 0
    world_size: int = 1
    epoch: int = 0
    step: int = 0
    inputs: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None
    stop: bool = False


class Callback:
    """Hook points for recipes; every method is a no-op by default (see the module docstring)."""

    def on_train_begin(self, state: TrainState) -> None:
        """Once, after the optimizer exists and any checkpoint was restored."""

    def after_backward(self, state: TrainState) -> None:
        """Each batch: gradients are ready (averaged under DDP), the optimizer has not stepped."""

    def on_batch_end(self, state: TrainState) -> None:
        """Each batch: after the optimizer and scheduler step."""

    def on_epoch_end(self, state: TrainState) -> None:
        """Each epoch: after validation and before the checkpoint; may set `state.stop`."""

    def on_train_end(self, state: TrainState) -> None:
        """Once, after the last epoch."""

    def state_dict(self) -> dict[str, Any]:
        """State to keep in checkpoints (empty for stateless callbacks)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned when a checkpoint is resumed."""


# Distributed -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    return DistInfo(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0"))
    )


def _init_distributed(info: DistInfo, device: torch.device) -> None:
    """Join torchrun's process group once per process (kept for later `fit` calls, closed at exit)."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # nccl collectives (broadcast_object_list too) use the current GPU
    dist.init_process_group(backend=backend, init_method="env://")
    atexit.register(_destroy_process_group)
    logger.info("Joined process group: rank %d of %d (%s).", info.rank, info.world_size, backend)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device: str = "auto") -> DistInfo:
    """Join torchrun's process group now, as `fit` would (nothing to do outside torchrun or once joined)."""
    info = dist_info()
    _init_distributed(info, resolve_device(device, info))
    return info


def run_on_main(work: Callable[[], T]) -> T:
    """`work()` run by rank 0 alone, its result handed (pickled) to every rank, which waits for it.
    Outside torchrun it is just `work()`; under torchrun the group must be joined (`init_distributed`)."""
    info = dist_info()
    if not info.enabled:
        return work()
    payload = [work() if info.is_main else None]
    dist.broadcast_object_list(payload, src=0)
    return payload[0]


def resolve_device(name: str = "auto", info: DistInfo | None = None) -> torch.device:
    """`auto`: this process's GPU when CUDA is available, else the CPU."""
    local_rank = (info or dist_info()).local_rank
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


# Data --------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """A seed for one epoch's shuffle and augmentation that depends only on (seed, epoch, rank), so a
    resumed run draws exactly what an uninterrupted run would."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def _train_loader(ds: ArrayDataset, config: TrainConfig, epoch: int, info: DistInfo) -> DataLoader:
    """One epoch's batches: graphprune.data.torch_loader alone, or sharded by a DistributedSampler."""
    if not info.enabled:
        return torch_loader(
            ds, config.batch_size, config.shuffle, config.augment, seed=epoch_seed(config.seed, epoch)
        )
    tensors = TensorDataset(torch.from_numpy(ds.images), torch.from_numpy(ds.labels))
    sampler = DistributedSampler(
        tensors, num_replicas=info.world_size, rank=info.rank, shuffle=config.shuffle, seed=config.seed
    )
    sampler.set_epoch(epoch)
    generator = torch.Generator().manual_seed(epoch_seed(config.seed, epoch, info.rank))
    augment = PadCropFlip(CROP_PADDING, generator, ds.channels_last)
    return DataLoader(
        tensors,
        sampler=BatchSampler(sampler, config.batch_size, drop_last=False),
        batch_size=None,
        collate_fn=augment if config.augment else None,
    )


# Optimisation ------------------------------------------------------------------------------------


def make_optimizer(
    module: nn.Module, config: TrainConfig, param_groups: ParamGroups | None = None
) -> torch.optim.SGD:
    """SGD over the trainable parameters (or the given groups, which may override lr / weight decay)."""
    groups: list[Any] = (
        list(param_groups(module))
        if param_groups is not None
        else [{"params": [p for p in module.parameters() if p.requires_grad]}]
    )
    if not any(list(group["params"]) for group in groups):
        raise GraphPruneError(
            f"{type(module).__name__} has no trainable parameters; unfreeze some before training."
        )
    return torch.optim.SGD(
        groups,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def make_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """A per-step schedule: cosine from lr to 0, one-cycle peaking at lr, or constant; the first
    `config.warmup` share of the steps of cosine or constant ramps linearly up to lr (its first step at
    lr divided by the ramp's length in steps)."""
    if config.schedule == "one-cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            cycle_momentum=config.momentum > 0,
            base_momentum=min(0.85, config.momentum),
            max_momentum=config.momentum,
        )
    ramp = max(1, round(config.warmup * total_steps))

    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / ramp)
        if config.schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
        return warm

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# Checkpoints -------------------------------------------------------------------------------------


def checkpoint_path(directory: str | os.PathLike[str]) -> Path:
    """Where `fit` keeps the checkpoint of the last finished epoch."""
    return Path(directory) / CHECKPOINT_NAME


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(state: TrainState, callbacks: list[Callback]) -> None:
    """Atomically write everything needed to continue after `state.epoch` (rank 0 only)."""
    path = checkpoint_path(state.config.checkpoint_dir)  # type: ignore[arg-type]
    payload = {
        "version": CHECKPOINT_VERSION,
        "epoch": state.epoch,
        "step": state.step,
        "model": state.module.state_dict(),
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "history": [asdict(record) for record in state.history.epochs],
        "rng": _rng_state(),
        "callbacks": [callback.state_dict() for callback in callbacks],
        "config": {key: str(value) for key, value in asdict(state.config).items()},
    }
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def _check_same_run(path: Path, saved: dict[str, str], config: TrainConfig) -> None:
    """A checkpoint continues only the run it came from: same starting model, length, batch, schedule, loss."""
    if saved.get("model_sha256") != str(config.model_sha256):
        raise GraphPruneError(
            f"Checkpoint {path} belongs to another model (sha256 {saved.get('model_sha256')}, this one is "
            f"{config.model_sha256}); resume with the model it started from or use a new checkpoint directory."
        )
    for key in RESUME_KEYS:
        if saved.get(key) != str(getattr(config, key)):
            raise GraphPruneError(
                f"Checkpoint {path} was written with {key}={saved.get(key)}, this run has "
                f"{key}={getattr(config, key)}; resume with the same settings or use a new checkpoint directory."
            )


def _load_checkpoint(state: TrainState, callbacks: list[Callback]) -> int:
    """Restore a checkpoint into `state` if one exists; return the first epoch still to run."""
    path = checkpoint_path(state.config.checkpoint_dir)  # type: ignore[arg-type]
    if not path.is_file():
        logger.info("No checkpoint at %s; starting from epoch 1.", path)
        return 1
    try:
        payload = torch.load(path, map_location=state.device, weights_only=False)
        if payload.get("version") != CHECKPOINT_VERSION:
            raise GraphPruneError(
                f"Checkpoint {path} has format {payload.get('version')}, this graphprune writes "
                f"{CHECKPOINT_VERSION}; delete it or use a new checkpoint directory."
            )
        _check_same_run(path, payload["config"], state.config)
        state.module.load_state_dict(payload["model"])
        state.optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise GraphPruneError(
            f"Checkpoint {path} does not fit this model or training run ({exc}); delete it or resume the "
            "run that wrote it."
        ) from exc
    if len(payload["callbacks"]) != len(callbacks):
        raise GraphPruneError(
            f"Checkpoint {path} was written with {len(payload['callbacks'])} callbacks, this run has "
            f"{len(callbacks)}; resume with the same recipe."
        )
    for callback, saved in zip(callbacks, payload["callbacks"], strict=True):
        callback.load_state_dict(saved)
    state.history.epochs = [EpochRecord(**record) for record in payload["history"]]
    state.step = payload["step"]
    state.epoch = payload["epoch"]
    _set_rng_state(payload["rng"])
    logger.info("Resumed from %s after epoch %d.", path, state.epoch)
    return state.epoch + 1


# The loop ----------------------------------------------------------------------------------------


def fit(
    module: nn.Module,
    train_ds: ArrayDataset,
    val_ds: ArrayDataset | None,
    config: TrainConfig,
    *,
    regularizer: Regularizer | None = None,
    callbacks: Iterable[Callback] | None = None,
    param_groups: ParamGroups | None = None,
    teacher: Teacher | None = None,
) -> History:
    """Train `module` in place on `train_ds` (cross-entropy, or distillation from `teacher`), validating
    on `val_ds` after each epoch. A teacher that is an nn.Module is moved to the device in eval mode.

    See the module docstring for the hook points, checkpointing and DDP. torch's global RNG is
    seeded with `config.seed` and each epoch's shuffle and augmentation with (seed, epoch), so equal
    calls give equal results. The module is left on the training device in train mode; the returned
    History also holds the epochs restored from a checkpoint.
    """
    config.validate()
    if len(train_ds) == 0:
        raise DataError(f"Training set '{train_ds.name}' is empty; pass a dataset with samples.")
    callbacks = list(callbacks or [])
    info = dist_info()
    device = resolve_device(config.device, info)
    _init_distributed(info, device)
    torch.manual_seed(config.seed)
    module.to(device)
    model: nn.Module = module
    if info.enabled:
        model = nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = make_optimizer(module, config, param_groups)
    steps_per_epoch = len(_train_loader(train_ds, config, 1, info))
    scheduler = make_scheduler(optimizer, config, config.epochs * steps_per_epoch)
    state = TrainState(
        module, model, optimizer, scheduler, config, History(), device, info.rank, info.world_size
    )
    first = _load_checkpoint(state, callbacks) if config.resume else 1
    if isinstance(teacher, nn.Module):
        teacher.to(device).eval()
    objective = _objective(config, teacher)
    for callback in callbacks:
        callback.on_train_begin(state)
    for epoch in range(first, config.epochs + 1):
        state.epoch = epoch
        record = _train_epoch(state, train_ds, info, objective, regularizer, callbacks)
        if val_ds is not None:
            record.val_accuracy = evaluate(module, val_ds, device=device)
            module.train()
        state.history.epochs.append(record)
        if info.is_main:
            val = "-" if record.val_accuracy is None else f"{record.val_accuracy:.4f}"
            logger.info(
                "epoch %d/%d  loss %.4f  train acc %.4f  val acc %s  lr %.4g  %.1f s",
                epoch,
                config.epochs,
                record.train_loss,
                record.train_accuracy,
                val,
                record.lr,
                record.seconds,
            )
        for callback in callbacks:
            callback.on_epoch_end(state)
        if config.checkpoint_dir is not None and info.is_main:
            _save_checkpoint(state, callbacks)
        if state.stop:
            break
    for callback in callbacks:
        callback.on_train_end(state)
    if info.enabled:
        dist.barrier()
    return state.history


def _objective(config: TrainConfig, teacher: Teacher | None) -> Objective:
    """Cross-entropy, or the distillation loss against `teacher`'s logits (computed without gradients)."""
    if teacher is None:
        return lambda logits, inputs, targets: F.cross_entropy(logits, targets)

    def distillation(logits: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            teacher_logits = teacher(inputs)
        if teacher_logits.shape != logits.shape:
            raise GraphPruneError(
                f"The teacher outputs shape {tuple(teacher_logits.shape)}, the student "
                f"{tuple(logits.shape)}; distill from a teacher trained on the same classes."
            )
        return kd_loss(
            logits, teacher_logits, targets, weight=config.kd_weight, temperature=config.kd_temperature
        )

    return distillation


def _train_epoch(
    state: TrainState,
    train_ds: ArrayDataset,
    info: DistInfo,
    objective: Objective,
    regularizer: Regularizer | None,
    callbacks: list[Callback],
) -> EpochRecord:
    """One pass over the (sharded) training set; the record's loss and accuracy are global."""
    start = time.perf_counter()
    config = state.config
    state.model.train()
    loader = _train_loader(train_ds, config, state.epoch, info)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, samples
    lr = state.optimizer.param_groups[0]["lr"]
    bar = progress(
        loader,
        desc=f"epoch {state.epoch}/{config.epochs}",
        unit="batch",
        enabled=config.progress and info.is_main,
    )
    for inputs, targets in bar:
        state.inputs, state.targets = inputs.to(state.device), targets.to(state.device)
        state.optimizer.zero_grad(set_to_none=True)
        state.logits = state.model(state.inputs)
        loss = objective(state.logits, state.inputs, state.targets)
        extra = regularizer(state.module) if regularizer is not None else None
        state.loss = loss if extra is None else loss + extra
        state.loss.backward()
        for callback in callbacks:
            callback.after_backward(state)
        lr = state.optimizer.param_groups[0]["lr"]
        state.optimizer.step()
        state.scheduler.step()
        state.step += 1
        for callback in callbacks:
            callback.on_batch_end(state)
        with torch.no_grad():
            count = len(state.targets)
            correct = (state.logits.argmax(1) == state.targets).sum().item()
            totals += torch.tensor([loss.item() * count, correct, count], dtype=torch.float64)
        bar.set_postfix(loss=f"{totals[0] / totals[2]:.4f}", acc=f"{totals[1] / totals[2]:.4f}")
    bar.close()
    if info.enabled:
        dist.all_reduce(totals)
    state.inputs = state.targets = state.logits = state.loss = None
    return EpochRecord(
        epoch=state.epoch,
        train_loss=float(totals[0] / totals[2]),
        train_accuracy=float(totals[1] / totals[2]),
        val_accuracy=None,
        lr=lr,
        seconds=time.perf_counter() - start,
    )


# Evaluation --------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode and no grad inside, the module's previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        module.train(was_training)


def evaluate(
    module: nn.Module, ds: ArrayDataset, *, batch_size: int = EVAL_BATCH, device: torch.device | None = None
) -> float:
    """Top-1 accuracy of `module` (in eval mode) on `ds`; its training mode is restored after."""
    if len(ds) == 0:
        raise DataError(f"Dataset '{ds.name}' is empty; evaluate on a dataset with samples.")
    if device is None:
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
    correct = 0
    with _eval_mode(module):
        for images, labels in ds.batches(batch_size):
            logits = module(torch.from_numpy(images).to(device))
            correct += int((logits.argmax(1).cpu().numpy() == labels).sum())
    return correct / len(ds)


def export_trained(
    module: nn.Module,
    path: str | os.PathLike[str],
    sample_shape: tuple[int, ...],
    metadata: Mapping[str, str] | None = None,
) -> onnx.ModelProto:
    """Export a trained module to ONNX with BatchNorm kept (legacy exporter, dynamic batch), on the CPU,
    with `metadata` in its metadata_props."""
    from graphprune.torch_bridge.export import export

    module.cpu()
    return export(module, torch.zeros(1, *sample_shape), path, fold_bn=False, metadata=metadata)
