"""Analysis time against graph size: is graphprune's analysis linear in the number of blocks?

Synthetic CIFAR-style ResNets (stem conv, N basic blocks of 16 channels at 32x32 with identity
shortcuts, global pool, 10-way Gemm) are written directly with onnx.helper, which is faster than a
torch export at 400 blocks and gives the same graph a legacy export would (Conv, BatchNormalization,
Relu, Add). Every residual Add ties the 16 trunk channels of all blocks into one group, the worst case
for the union-find; each block adds one more group of its own. For each size the script times
graphprune.api.analyze_model and analyse+prune without verification (ratio 0.5, L1, best of N) and
fits time = a + b * blocks.

Usage: .venv/bin/python benchmarks/bench_scaling.py [--blocks 50 100 200 400 800 1600] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import onnx
from common import (
    RESULTS,
    Series,
    best_of,
    high_priority,
    machine,
    machine_line,
    markdown_table,
    plot_series,
    write_json,
    write_text,
)
from onnx import TensorProto, helper, numpy_helper
from tqdm import tqdm

from graphprune import api
from graphprune.planning import PlanOptions
from graphprune.surgery.apply import apply_removal

WIDTH = 16
CLASSES = 10
OPSET = 17
TIMINGS = ("analyze_s", "analyze_prune_s", "plan_s", "surgery_s")


class ResNetWriter:
    """Appends conv-BN(-ReLU) layers with seeded random weights to a growing ONNX graph."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.weights: list[onnx.TensorProto] = []

    def param(self, name: str, array: np.ndarray) -> str:
        self.weights.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv_bn(self, name: str, x: str, cin: int, relu: bool) -> str:
        w = self.param(f"{name}.weight", self.rng.normal(0, (2 / (9 * cin)) ** 0.5, (WIDTH, cin, 3, 3)))
        bn = [
            self.param(f"{name}.bn.weight", self.rng.uniform(0.5, 1.5, WIDTH)),
            self.param(f"{name}.bn.bias", self.rng.normal(0, 0.1, WIDTH)),
            self.param(f"{name}.bn.running_mean", self.rng.normal(0, 0.1, WIDTH)),
            self.param(f"{name}.bn.running_var", self.rng.uniform(0.5, 1.5, WIDTH)),
        ]
        self.nodes.append(
            helper.make_node("Conv", [x, w], [f"{name}.conv"], name=f"{name}/Conv", pads=[1] * 4)
        )
        self.nodes.append(
            helper.make_node("BatchNormalization", [f"{name}.conv", *bn], [f"{name}.bn"], name=f"{name}/BN")
        )
        if not relu:
            return f"{name}.bn"
        self.nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}/Relu"))
        return f"{name}.relu"


def cifar_resnet(blocks: int, seed: int = 0) -> onnx.ModelProto:
    """A CIFAR-style ResNet of `blocks` basic blocks, all WIDTH channels wide, input [batch,3,32,32]."""
    writer = ResNetWriter(seed)
    x = writer.conv_bn("stem", "input", 3, relu=True)
    for index in range(blocks):
        name = f"block{index}"
        h = writer.conv_bn(f"{name}.0", x, WIDTH, relu=True)
        h = writer.conv_bn(f"{name}.1", h, WIDTH, relu=False)
        writer.nodes.append(helper.make_node("Add", [h, x], [f"{name}.add"], name=f"{name}/Add"))
        writer.nodes.append(helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}/Relu"))
        x = f"{name}.out"
    fc_w = writer.param("fc.weight", writer.rng.normal(0, WIDTH**-0.5, (CLASSES, WIDTH)))
    fc_b = writer.param("fc.bias", np.zeros(CLASSES))
    writer.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool/GlobalAveragePool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flatten/Flatten"),
        helper.make_node("Gemm", ["flat", fc_w, fc_b], ["output"], name="fc/Gemm", transB=1),
    ]
    graph = helper.make_graph(
        writer.nodes,
        f"cifar_resnet_{blocks}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, 32, 32])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", CLASSES])],
        writer.weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    return model


def measure(blocks: int, repeats: int) -> dict[str, object]:
    model = cifar_resnet(blocks)
    analyze_s, dep = best_of(repeats, lambda: api.analyze_model(model))
    options = PlanOptions(ratio=0.5)
    prune_s, result = best_of(repeats, lambda: api.prune(model, options, criterion="l1", verify=False))
    # The phases of prune after analysis, timed alone to show which one grows fastest.
    plan_s, removed = best_of(repeats, lambda: api.plan_pruning(dep, options, criterion="l1"))
    surgery_s, _ = best_of(repeats, lambda: apply_removal(dep, removed))
    return {
        "blocks": blocks,
        "nodes": len(model.graph.node),
        "groups": len(dep.groups),
        "analyze_s": analyze_s,
        "analyze_prune_s": prune_s,
        "plan_s": plan_s,
        "surgery_s": surgery_s,
        "macs_kept": result.after.macs / result.before.macs,
    }


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = a + b x with its R^2, and the log-log slope (1.0 for linear growth)."""
    x, y = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    r2 = 1 - float(residual @ residual) / float(((y - y.mean()) ** 2).sum())
    loglog = float(np.polyfit(np.log(x), np.log(y), 1)[0])
    # Fixed costs flatten the small sizes; the largest step shows the asymptotic growth best.
    last_step = float(np.log(y[-1] / y[-2]) / np.log(x[-1] / x[-2]))
    return {
        "per_block_ms": 1e3 * slope,
        "intercept_s": float(intercept),
        "r2": r2,
        "loglog_slope": loglog,
        "last_step_exponent": last_step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", nargs="+", type=int, default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument("--repeats", type=int, default=3, help="timings: best of this many")
    parser.add_argument(
        "--priority",
        action="store_true",
        help="raise this run's scheduler group to the top priority while timing (Linux autogroup; needs root)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    info = machine()
    with high_priority(args.priority):
        rows = [measure(n, args.repeats) for n in tqdm(args.blocks, desc="ResNet sizes", unit="size")]
    blocks = [float(r["blocks"]) for r in rows]
    fits = {key: fit(blocks, [float(r[key]) for r in rows]) for key in TIMINGS}
    write_json(
        RESULTS / "scaling.json",
        {
            "machine": info,
            "settings": {
                "width": WIDTH,
                "input": [1, 3, 32, 32],
                "repeats": args.repeats,
                "priority": args.priority,
            },
            "sizes": rows,
            "fits": fits,
        },
    )
    table = markdown_table(
        ["blocks", "nodes", "groups", "analyse s", "analyse+prune s", "plan s", "surgery s", "MACs kept"],
        [
            [
                r["blocks"],
                r["nodes"],
                r["groups"],
                f"{r['analyze_s']:.2f}",
                f"{r['analyze_prune_s']:.2f}",
                f"{r['plan_s']:.2f}",
                f"{r['surgery_s']:.2f}",
                f"{r['macs_kept']:.3f}",
            ]
            for r in rows
        ],
    )
    fit_table = markdown_table(
        ["timing", "ms per block", "intercept s", "R^2", "log-log slope", "exponent, largest step"],
        [
            [
                key,
                f"{f['per_block_ms']:.2f}",
                f"{f['intercept_s']:.3f}",
                f"{f['r2']:.4f}",
                f"{f['loglog_slope']:.2f}",
                f"{f['last_step_exponent']:.2f}",
            ]
            for key, f in fits.items()
        ],
    )
    write_text(
        RESULTS / "scaling.md",
        "# Analysis time vs graph size (synthetic CIFAR ResNets, 16 channels, 32x32)\n\n"
        f"{machine_line(info)}\n\n"
        f"Best of {args.repeats} wall times{' at the highest scheduler priority (--priority)' if args.priority else ''}; "
        "analyse = graphprune.api.analyze_model; analyse+prune = graphprune.api.prune(ratio 0.5, L1, "
        "verify=False); plan = graphprune.api.plan_pruning (scoring + planning) and surgery = "
        "graphprune.surgery.apply.apply_removal, each timed alone on the analysed graph. Each basic block "
        "is 7 ONNX nodes. A log-log slope of 1.0 means linear growth, 2.0 quadratic; the exponent over the "
        "largest step (the two biggest sizes) is the least affected by fixed costs.\n\n"
        + table
        + "\nLinear fit time = intercept + slope x blocks:\n\n"
        + fit_table,
    )
    plot_series(
        [
            Series("analyse", blocks, [r["analyze_s"] for r in rows]),
            Series("analyse + prune (no verify)", blocks, [r["analyze_prune_s"] for r in rows]),
            Series("plan (scoring + planning)", blocks, [r["plan_s"] for r in rows]),
            Series("surgery (apply_removal)", blocks, [r["surgery_s"] for r in rows]),
        ],
        RESULTS / "scaling.png",
        title="graphprune time vs basic blocks (CIFAR ResNet, 16 channels)",
        xlabel="basic blocks",
        ylabel="seconds (best of runs)",
    )
    print(f"wrote {RESULTS / 'scaling.md'}")


if __name__ == "__main__":
    main()
