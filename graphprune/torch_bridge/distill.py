"""Knowledge distillation for fine-tuning: the pruned student learns from the original model's logits.

The loss (Hinton et al., 2015) is ``(1 - w) * CE(student, labels) + w * T^2 * KL(p_T(teacher) || p_T(student))``
with ``p_T = softmax(logits / T)``; the T^2 keeps the soft term's gradient on the scale of the hard one.
A teacher is any callable from an input batch to logits; `fit` calls it under ``torch.no_grad`` on the
same (augmented) batch the student sees. `OnnxTeacher` runs an ONNX model in onnxruntime, so it is frozen
by construction; under torchrun every process opens its own session and scores its own shard.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import onnx
import torch
import torch.nn.functional as F

Teacher = Callable[[torch.Tensor], torch.Tensor]


def kd_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    weight: float,
    temperature: float,
) -> torch.Tensor:
    """Distillation loss of a batch: cross-entropy and temperature-softened KL, each a batch mean."""
    hard = F.cross_entropy(logits, targets)
    soft = F.kl_div(
        F.log_softmax(logits / temperature, dim=1),
        F.log_softmax(teacher_logits.detach() / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - weight) * hard + weight * temperature**2 * soft


class OnnxTeacher:
    """A frozen teacher: an onnxruntime session on an ONNX classifier; logits come back on the batch's device."""

    def __init__(
        self,
        model: onnx.ModelProto | str | os.PathLike[str],
        *,
        provider: str = "cpu",
        threads: int | None = None,
    ) -> None:
        from graphprune.runtime.session import make_session

        self.session = make_session(model, provider=provider, threads=threads)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor:
        batch = inputs.detach().to("cpu", torch.float32).numpy()
        logits = self.session.run(None, {self.input_name: batch})[0]
        return torch.from_numpy(logits).to(inputs.device)
