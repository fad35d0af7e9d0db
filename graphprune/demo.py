"""The main job on the built-in default: a Fashion-MNIST-shaped ResNet-20 from the zoo, exported with
BatchNorm kept, pruned to half its MACs, verified, benchmarked, with a table and plots."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnx

from graphprune.api import PruneResult, prune
from graphprune.planning import PlanOptions
from graphprune.report.plots import plot_channels
from graphprune.runtime.bench import LatencyResult, bench

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    original: Path
    pruned: Path
    plan: Path
    plot: Path
    result: PruneResult
    latency: tuple[LatencyResult, LatencyResult]


def conv_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Output channels of every Conv, by node name (names survive pruning)."""
    dims = {init.name: list(init.dims) for init in model.graph.initializer}
    return {
        n.name: dims[n.input[1]][0] for n in model.graph.node if n.op_type == "Conv" and n.input[1] in dims
    }


def run_demo(
    out_dir: Path, *, model_name: str = "resnet20", target_macs: float = 0.5, threads: int = 2
) -> DemoResult:
    """Export, prune, verify, bench; everything lands in `out_dir`."""
    import torch

    from graphprune.torch_bridge.export import export
    from graphprune.zoo import build, default_input_shape

    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    original = out_dir / f"{model_name}.onnx"
    export(build(model_name), torch.randn(*default_input_shape(model_name)), original)
    pruned, plan = out_dir / f"{model_name}-pruned.onnx", out_dir / f"{model_name}-pruned.plan.json"
    result = prune(original, PlanOptions(target_macs=target_macs), criterion="l1")
    result.save(pruned, plan)
    latency = tuple(
        bench(p, batch=1, threads=threads, provider="cpu", warmup=10, runs=100) for p in (original, pruned)
    )
    plot = plot_channels(
        conv_channels(result.dep.model),
        conv_channels(result.model),
        out_dir / "channels_per_layer.png",
        title=f"{model_name} channels per conv (MACs kept {result.after.macs / result.before.macs:.0%})",
    )
    return DemoResult(original, pruned, plan, plot, result, latency)
