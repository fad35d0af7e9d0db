"""The training loop: gamma trains, the synthetic set is learnt, resume is exact, ONNX eval agrees."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from graphprune.data import ArrayDataset, load_dataset
from graphprune.errors import GraphPruneError
from graphprune.runtime.evaluate import evaluate_onnx
from graphprune.torch_bridge.distill import OnnxTeacher, kd_loss
from graphprune.torch_bridge.export import export
from graphprune.torch_bridge.foldback import onnx_to_module
from graphprune.torch_bridge.train import (
    Callback,
    TrainConfig,
    TrainState,
    checkpoint_path,
    evaluate,
    fit,
    make_scheduler,
)


def tiny_cnn(seed: int = 0) -> nn.Module:
    """Two strided conv + BN + ReLU blocks, global pooling and a linear head: learns synthetic fast."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


@pytest.fixture(scope="module")
def train_set() -> ArrayDataset:
    return load_dataset("synthetic:1024")


@pytest.fixture(scope="module")
def test_set() -> ArrayDataset:
    return load_dataset("synthetic:500", "test")


def _config(**overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {
        "epochs": 3,
        "batch_size": 32,
        "lr": 0.05,
        "schedule": "one-cycle",
        "progress": False,
    }
    return TrainConfig(**{**settings, **overrides})


def test_one_step_changes_gamma_of_an_onnx_only_model(tmp_path: Path, train_set: ArrayDataset) -> None:
    """After fold-back way (b) the BN scales are trainable: one SGD step moves them."""
    model = export(tiny_cnn(), torch.zeros(1, 1, 28, 28), tmp_path / "tiny.onnx")
    module = onnx_to_module(model)
    gammas = [m.weight for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [g.detach().clone() for g in gammas]
    one_batch = train_set.subset(torch.arange(16).numpy())
    history = fit(module, one_batch, None, _config(epochs=1, batch_size=16, schedule="constant"))
    assert len(history.epochs) == 1
    for gamma, old in zip(gammas, before, strict=True):
        assert not torch.equal(gamma.detach(), old)


def test_fit_learns_the_synthetic_set(train_set: ArrayDataset, test_set: ArrayDataset) -> None:
    module = tiny_cnn()
    history = fit(module, train_set, test_set, _config())
    assert [record.epoch for record in history.epochs] == [1, 2, 3]
    assert history.last is not None and history.last.val_accuracy is not None
    assert history.last.val_accuracy > 0.4  # chance is 0.1
    assert history.last.train_loss < history.epochs[0].train_loss
    assert history.last.val_accuracy == evaluate(module, test_set)


class CountBatches(Callback):
    """A stateful callback (its count must survive a resume); optionally stops after `stop_after` epochs."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.batches = 0
        self.grad_seen = False
        self.stop_after = stop_after

    def after_backward(self, state: TrainState) -> None:
        self.grad_seen = all(p.grad is not None for p in state.module.parameters())

    def on_batch_end(self, state: TrainState) -> None:
        self.batches += 1

    def on_epoch_end(self, state: TrainState) -> None:
        state.stop = state.epoch == self.stop_after

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]


def test_resume_continues_exactly(tmp_path: Path, train_set: ArrayDataset) -> None:
    """Stopped after epoch 2 and resumed on a freshly initialised module, the run ends bit-identical
    to an uninterrupted one (shuffle and augmentation on)."""
    data = train_set.subset(torch.arange(256).numpy())
    straight = tiny_cnn()
    counter = CountBatches()
    fit(straight, data, None, _config(checkpoint_dir=tmp_path / "a"), callbacks=[counter])
    assert counter.grad_seen and counter.batches == 3 * 8

    interrupted = tiny_cnn()
    first = fit(interrupted, data, None, _config(checkpoint_dir=tmp_path / "b"), callbacks=[CountBatches(2)])
    assert len(first.epochs) == 2 and checkpoint_path(tmp_path / "b").is_file()

    resumed = tiny_cnn(seed=123)
    resumed_counter = CountBatches()
    history = fit(
        resumed,
        data,
        None,
        _config(checkpoint_dir=tmp_path / "b", resume=True),
        callbacks=[resumed_counter],
    )
    assert [record.epoch for record in history.epochs] == [1, 2, 3]
    assert resumed_counter.batches == 3 * 8
    for (name, want), got in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(want, got), name


def test_resume_refuses_a_different_model(tmp_path: Path, train_set: ArrayDataset) -> None:
    data = train_set.subset(torch.arange(64).numpy())
    fit(tiny_cnn(), data, None, _config(epochs=1, checkpoint_dir=tmp_path))
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))
    with pytest.raises(GraphPruneError, match="does not fit"):
        fit(other, data, None, _config(epochs=1, checkpoint_dir=tmp_path, resume=True))


def test_regularizer_drives_gamma_down(train_set: ArrayDataset) -> None:
    """An L1 term on BN gamma (Network Slimming's) shrinks the scales compared with plain training."""
    data = train_set.subset(torch.arange(256).numpy())

    def l1_gamma(module: nn.Module) -> torch.Tensor:
        return 0.5 * sum(m.weight.abs().sum() for m in module.modules() if isinstance(m, nn.BatchNorm2d))

    def gamma_mass(module: nn.Module) -> float:
        return sum(m.weight.abs().sum().item() for m in module.modules() if isinstance(m, nn.BatchNorm2d))

    plain, sparse = tiny_cnn(), tiny_cnn()
    fit(plain, data, None, _config(epochs=1))
    fit(sparse, data, None, _config(epochs=1), regularizer=l1_gamma)
    assert gamma_mass(sparse) < 0.8 * gamma_mass(plain)


def test_evaluate_onnx_equals_evaluate(
    tmp_path: Path, train_set: ArrayDataset, test_set: ArrayDataset
) -> None:
    module = tiny_cnn()
    fit(module, train_set.subset(torch.arange(256).numpy()), None, _config(epochs=1))
    path = tmp_path / "trained.onnx"
    export(module, torch.zeros(1, 1, 28, 28), path)
    accuracy = evaluate(module, test_set)
    assert 0.0 < accuracy < 1.0
    assert evaluate_onnx(path, test_set, batch_size=64) == accuracy


def test_config_is_validated(train_set: ArrayDataset) -> None:
    with pytest.raises(GraphPruneError, match="schedule"):
        fit(tiny_cnn(), train_set, None, _config(schedule="linear"))
    with pytest.raises(GraphPruneError, match="checkpoint directory"):
        fit(tiny_cnn(), train_set, None, _config(resume=True))


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_warmup_ramps_the_learning_rate_up_then_follows_the_schedule(schedule: str) -> None:
    """A freshly pruned network can diverge at its first full-rate steps: over the first 4 of 20 steps
    the rate is k/4 of the plain schedule's, then the plain schedule's."""

    def rates(warmup: float) -> list[float]:
        optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
        scheduler = make_scheduler(optimizer, _config(schedule=schedule, warmup=warmup), 20)
        seen = []
        for _ in range(20):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    plain, warm = rates(0.0), rates(0.2)
    assert warm[:4] == pytest.approx([k / 4 * plain[k - 1] for k in range(1, 5)])
    assert warm[4:] == pytest.approx(plain[4:])
    assert plain[0] == pytest.approx(0.1)


def test_warmup_is_validated(train_set: ArrayDataset) -> None:
    for bad in ({"warmup": 1.0}, {"warmup": -0.1}, {"warmup": 0.1, "schedule": "one-cycle"}):
        with pytest.raises(GraphPruneError, match="Warm-up"):
            fit(tiny_cnn(), train_set, None, _config(**bad))


def _cli(*argv: str) -> int:
    """Run a training command through a parser holding only what cli_train registers."""
    import argparse

    from graphprune.cli import train as cli_train

    parser = argparse.ArgumentParser(prog="graphprune")
    cli_train.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_cli_train_prune_finetune_resume_eval(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from graphprune.api import prune
    from graphprune.planning import PlanOptions

    base, pruned, tuned = tmp_path / "base.onnx", tmp_path / "pruned.onnx", tmp_path / "tuned.onnx"
    data = ("--data", "synthetic:128", "--val-limit", "64", "--batch-size", "64", "--epochs", "1")
    assert _cli("train", "--model", "resnet20", "-o", str(base), *data) == 0
    assert (tmp_path / "base.ckpt" / "last.pt").is_file()
    prune(base, PlanOptions(ratio=0.5)).save(pruned)
    with pytest.raises(GraphPruneError, match="Warm-up"):  # --warmup reaches the training settings
        _cli("finetune", str(pruned), "-o", str(tuned), *data, "--warmup", "1.5")
    assert not tuned.exists()
    assert _cli("finetune", str(pruned), "-o", str(tuned), *data, "--warmup", "0.1") == 0
    first = tuned.read_bytes()
    capsys.readouterr()
    assert _cli("finetune", str(pruned), "-o", str(tuned), *data, "--resume", "--json") == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.err  # resumed after the last epoch: nothing to train
    tuned_numbers = json.loads(captured.out)  # stdout holds the JSON alone
    assert tuned_numbers["output"] == str(tuned) and 0 <= tuned_numbers["accuracy_after"] <= 1
    assert tuned_numbers["foldback_max_rel_error"] < 1e-4
    assert tuned.read_bytes() == first
    with pytest.raises(GraphPruneError, match="epochs=1"):
        _cli("finetune", str(pruned), "-o", str(tuned), *data[:-1], "2", "--resume")
    capsys.readouterr()
    assert _cli("eval", str(tuned), "--data", "synthetic:128", "--limit", "64") == 0
    correct = evaluate_onnx(tuned, load_dataset("synthetic:128", "test", limit=64)) * 64
    assert f"({round(correct)}/64)" in capsys.readouterr().out
    assert _cli("eval", str(tuned), "--data", "synthetic:128", "--limit", "64", "--json") == 0
    numbers = json.loads(capsys.readouterr().out)
    assert (numbers["correct"], numbers["samples"], numbers["split"]) == (round(correct), 64, "test")
    with pytest.raises(GraphPruneError, match="never overwrites"):
        _cli("finetune", str(pruned), "-o", str(pruned), *data)
    # Another model of the same architecture (other weights) must not resume this checkpoint.
    other = tmp_path / "other.onnx"
    shutil.copy(tuned, other)
    with pytest.raises(GraphPruneError, match="belongs to another model"):
        _cli("finetune", str(other), "-o", str(tuned), *data, "--resume")
    # Distillation from the unpruned base model, through the command line.
    distilled = tmp_path / "distilled.onnx"
    teacher = ("--teacher", str(base), "--kd-weight", "0.9")
    assert _cli("finetune", str(pruned), "-o", str(distilled), *data, *teacher) == 0
    assert distilled.read_bytes() != first  # same seed and data as `tuned`: the teacher changed the training


def test_kd_loss_matches_a_hand_computation() -> None:
    """(1 - w) CE + w T^2 KL(softmax(t/T) || softmax(s/T)), value and gradient, written out by hand."""
    torch.manual_seed(0)
    student = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 4, dtype=torch.float64)
    targets = torch.tensor([0, 3, 1])
    weight, temperature = 0.3, 2.5
    loss = kd_loss(student, teacher, targets, weight=weight, temperature=temperature)
    (grad,) = torch.autograd.grad(loss, student)

    def by_hand(s: torch.Tensor) -> torch.Tensor:
        ce = -(s - s.exp().sum(1, keepdim=True).log()).gather(1, targets[:, None]).mean()
        p_t = (teacher / temperature).exp() / (teacher / temperature).exp().sum(1, keepdim=True)
        p_s = (s / temperature).exp() / (s / temperature).exp().sum(1, keepdim=True)
        kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
        return (1 - weight) * ce + weight * temperature**2 * kl

    expected = student.detach().clone().requires_grad_(True)
    want = by_hand(expected)
    want.backward()
    assert torch.allclose(loss, want) and torch.allclose(grad, expected.grad)
    # A student that already agrees with its teacher has nothing left to learn from it.
    assert kd_loss(teacher, teacher, targets, weight=1.0, temperature=temperature).abs() < 1e-12
    plain = kd_loss(student, teacher, targets, weight=0.0, temperature=temperature)
    assert torch.equal(plain, torch.nn.functional.cross_entropy(student, targets))


class Recorder(nn.Module):
    """A teacher that records the batches it is shown and answers with fixed logits of a linear map."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not self.training
        self.seen.append(inputs.clone())
        return self.head(inputs)


class Inputs(Callback):
    """Records the (augmented) batches the student trained on."""

    def __init__(self) -> None:
        self.seen: list[torch.Tensor] = []

    def on_batch_end(self, state: TrainState) -> None:
        self.seen.append(state.inputs.clone())


def test_fit_distils_on_the_same_augmented_batch(train_set: ArrayDataset) -> None:
    """The teacher sees each augmented batch the student sees, without gradients, and weight 0 is
    plain cross-entropy training, bit for bit."""
    data = train_set.subset(torch.arange(64).numpy())
    teacher, inputs = Recorder(), Inputs()
    distilled = tiny_cnn()
    fit(distilled, data, None, _config(epochs=1, kd_weight=0.7), callbacks=[inputs], teacher=teacher)
    assert len(teacher.seen) == len(inputs.seen) == 2
    assert all(torch.equal(a, b) for a, b in zip(teacher.seen, inputs.seen, strict=True))
    assert all(p.grad is None for p in teacher.parameters())

    plain, hard_only = tiny_cnn(), tiny_cnn()
    fit(plain, data, None, _config(epochs=1))
    fit(hard_only, data, None, _config(epochs=1, kd_weight=0.0), teacher=Recorder())
    for want, got in zip(plain.state_dict().values(), hard_only.state_dict().values(), strict=True):
        assert torch.equal(want, got)
    assert not torch.equal(plain[0].weight, distilled[0].weight)


def test_onnx_teacher_pulls_the_student_towards_it(tmp_path: Path, train_set: ArrayDataset) -> None:
    """Pure distillation (weight 1) from an ONNX teacher brings the student closer to it than it was, and
    than training on the labels does."""
    data = train_set.subset(torch.arange(128).numpy())
    confident = tiny_cnn(seed=1)
    with torch.no_grad():  # confident logits, far from the student's near-uniform ones
        confident[8].weight.mul_(30.0)
    path = export(confident, torch.zeros(1, 1, 28, 28), tmp_path / "teacher.onnx")
    teacher = OnnxTeacher(path)
    images = torch.from_numpy(data.images)

    def divergence(module: nn.Module) -> float:
        with torch.no_grad():
            return kd_loss(
                module.eval()(images),
                teacher(images),
                torch.from_numpy(data.labels),
                weight=1.0,
                temperature=4.0,
            ).item()

    student, plain = tiny_cnn(), tiny_cnn()
    before = divergence(student)
    fit(student, data, None, _config(epochs=4, kd_weight=1.0, augment=False), teacher=teacher)
    fit(plain, data, None, _config(epochs=4, augment=False))
    assert divergence(student) < 0.5 * min(before, divergence(plain))


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path: Path, train_set: ArrayDataset) -> None:
    """Same architecture, other weights: only the recorded sha256 of the starting model tells them apart."""
    data = train_set.subset(torch.arange(32).numpy())
    fit(tiny_cnn(), data, None, _config(epochs=1, checkpoint_dir=tmp_path, model_sha256="a" * 64))
    with pytest.raises(GraphPruneError, match="belongs to another model") as caught:
        fit(
            tiny_cnn(),
            data,
            None,
            _config(epochs=1, checkpoint_dir=tmp_path, resume=True, model_sha256="b" * 64),
        )
    assert "\n" not in str(caught.value)


def _brightness_classifier(path: Path, image_norm: str | None) -> None:
    """A 1x4x4 classifier whose logits are (mean, -mean) of its input: class 0 above zero, so what it
    predicts depends on how the images were normalised; records `image_norm` when given."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from graphprune.model_io import image_norm_metadata, save_model, set_metadata

    nodes = [
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["m", "signs"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "brightness",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [numpy_helper.from_array(np.array([[1.0], [-1.0]], np.float32).T, "signs")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    set_metadata(model, image_norm_metadata(image_norm))
    onnx.checker.check_model(model)
    save_model(model, path)


def test_eval_normalises_a_folder_as_the_model_records(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bright images are class a, dark ones class b: standardised with their own statistics the
    classifier gets them all right; with the recorded 0.9/0.1 (as trained) every image reads dark."""
    import numpy as np
    from PIL import Image

    from graphprune.data import folders

    for label, level in (("a", 200), ("b", 50)):
        (tmp_path / "set" / label).mkdir(parents=True)
        for index in range(3):
            Image.fromarray(np.full((4, 4), level, np.uint8)).save(tmp_path / "set" / label / f"{index}.png")
    plain, recorded = tmp_path / "plain.onnx", tmp_path / "recorded.onnx"
    _brightness_classifier(plain, None)
    _brightness_classifier(recorded, "0.9/0.1")

    def accuracy(model: Path, *flags: str) -> float:
        capsys.readouterr()
        assert _cli("eval", str(model), "--data", str(tmp_path / "set"), "--json", *flags) == 0
        return json.loads(capsys.readouterr().out)["accuracy"]

    assert accuracy(plain) == 1.0
    assert accuracy(recorded) == 0.5
    assert _cli("eval", str(recorded), "--data", str(tmp_path / "set"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["image_norm"] == "0.9/0.1"  # what the images got
    assert accuracy(recorded, "--image-norm", "data") == 1.0  # what is given wins over the record
    assert accuracy(plain, "--image-norm", "0.9/0.1") == 0.5
    monkeypatch.setattr(folders, "available_memory", lambda: 4 * 16 * folders.FOLDER_BYTES_PER_ELEMENT)
    caplog.set_level(logging.INFO, logger="graphprune.data.sources")
    assert accuracy(plain) == 1.0 and accuracy(recorded) == 0.5  # in parts of one image: the same
    assert "read in parts" in caplog.text


def test_train_and_finetune_record_the_normalisation_and_keep_the_models_metadata(tmp_path: Path) -> None:
    import numpy as np
    import onnx

    from graphprune.api import prune
    from graphprune.model_io import IMAGE_NORM_KEY, input_image_norm, set_metadata

    rng = np.random.default_rng(0)
    data = tmp_path / "pixels.npz"
    np.savez(data, x=rng.integers(0, 128, size=(32, 1, 28, 28), dtype=np.uint8), y=np.arange(32) % 4)
    base, tuned = tmp_path / "base.onnx", tmp_path / "tuned.onnx"
    flags = ("--data", str(data), "--batch-size", "32", "--epochs", "1")
    assert _cli("train", "--model", "resnet20", "-o", str(base), *flags) == 0
    trained_with = input_image_norm(onnx.load(base))
    assert trained_with is not None and float(trained_with.split("/")[0]) == pytest.approx(
        63.5 / 255, abs=0.01
    )
    pruned = prune(base).model
    set_metadata(pruned, {"names": "{0: 'cat'}"})  # what an exporter such as ultralytics writes
    onnx.save(pruned, tmp_path / "pruned.onnx")
    assert _cli("finetune", str(tmp_path / "pruned.onnx"), "-o", str(tuned), *flags) == 0
    metadata = {p.key: p.value for p in onnx.load(tuned).metadata_props}
    assert metadata == {"names": "{0: 'cat'}", IMAGE_NORM_KEY: trained_with}
