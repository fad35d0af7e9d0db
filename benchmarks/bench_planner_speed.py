"""Where graphprune's analyse+plan+surgery time goes, against Torch-Pruning's DepGraph build+prune.

Per torchvision model (random init, 1x3x224x224, exported with BatchNorm kept): graphprune prunes the
ONNX graph at ratio 0.5 with L1 and no verification; Torch-Pruning builds its DepGraph and prunes a fresh
copy of the module (MetaPruner, L1, ratio 0.5, classifier kept). Each is timed best of `--repeats`,
the two interleaved; one extra graphprune run under cProfile gives the time per stage (analysis,
scoring, planning, surgery) and the heaviest functions.

Usage: .venv/bin/python benchmarks/bench_planner_speed.py [--models resnet50 mobilenet_v3_large] [--tag after]
Writes results/planner_speed_TAG.json (and planner_speed.md from every tag present).
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import json
import os
import pstats
import tempfile
import time
import warnings
from pathlib import Path

import onnx
import torch
from bench_torchvision import classifier_layers
from common import RESULTS, high_priority, machine, machine_line, markdown_table, write_json, write_text

from graphprune import api
from graphprune.planning import PlanOptions
from graphprune.torch_bridge.export import export
from graphprune.zoo import build

# stage -> (file, function) whose cumulative time it is
STAGES = {
    "analysis": ("graph.py", "analyze"),
    "scoring": ("api.py", "run"),
    "planning": ("planner.py", "__call__"),
    "surgery": ("apply.py", "apply_removal"),
}


def time_ours(model: onnx.ModelProto) -> float:
    start = time.perf_counter()
    api.prune(model, PlanOptions(ratio=0.5), criterion="l1", verify=False)
    return time.perf_counter() - start


def time_torch_pruning(module: torch.nn.Module, example: torch.Tensor) -> float:
    import torch_pruning as tp

    fresh = copy.deepcopy(module)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tp.pruner.MetaPruner(
            fresh,
            example,
            importance=tp.importance.MagnitudeImportance(p=1),
            pruning_ratio=0.5,
            ignored_layers=classifier_layers(fresh),
        ).step()
    return time.perf_counter() - start


def stages(model: onnx.ModelProto) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Cumulative seconds per stage and the ten functions with the most own time, from one profiled run."""
    profile = cProfile.Profile()
    profile.enable()
    api.prune(model, PlanOptions(ratio=0.5), criterion="l1", verify=False)
    profile.disable()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    cumulative = {(Path(f).name, name): ct for (f, _, name), (_, _, _, ct, _) in stats.items()}
    found = {stage: cumulative.get(where, 0.0) for stage, where in STAGES.items()}
    found["total (profiled)"] = cumulative[("api.py", "prune")]
    own = [(f"{Path(f).name}:{line}({name})", tt) for (f, line, name), (_, _, tt, _, _) in stats.items()]
    heaviest = sorted(own, key=lambda r: -r[1])[:10]
    return found, heaviest


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tag", default="after", help="results suffix (before / after a change)")
    parser.add_argument("--priority", action="store_true", help="time at scheduler priority -20 (root)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = []
    with tempfile.TemporaryDirectory() as work, high_priority(args.priority):
        for name in args.models:
            torch.manual_seed(0)
            module = build(f"torchvision:{name}").eval()
            example = torch.randn(1, 3, 224, 224)
            model = export(module, example, Path(work) / f"{name}.onnx")
            time_ours(model)  # imports and caches warm
            ours, theirs, loads = [], [], []
            for _ in range(args.repeats):
                loads.append(os.getloadavg()[0])
                ours.append(time_ours(model))
                theirs.append(time_torch_pruning(module, example))
            per_stage, heaviest = stages(model)
            records.append(
                {
                    "model": name,
                    "ours_s": min(ours),
                    "torch_pruning_s": min(theirs),
                    "loads": loads,
                    "stages_s": per_stage,
                    "heaviest_own_s": heaviest,
                }
            )
            print(json.dumps(records[-1])[:300])
    write_json(RESULTS / f"planner_speed_{args.tag}.json", {"machine": machine(), "models": records})
    write_text(RESULTS / "planner_speed.md", render())
    return 0


def render() -> str:
    lines = ["# analyse+plan+surgery vs Torch-Pruning's build+prune\n", __doc__.split("\n\n")[1] + "\n"]
    for path in sorted(RESULTS.glob("planner_speed_*.json")):
        payload = json.loads(path.read_text())
        tag = path.stem.removeprefix("planner_speed_")
        lines.append(f"## {tag}\n\n{machine_line(payload['machine'])}\n")
        rows = []
        for r in payload["models"]:
            s = r["stages_s"]
            rows.append(
                [
                    r["model"],
                    f"{r['ours_s']:.3f}",
                    f"{r['torch_pruning_s']:.3f}",
                    f"{r['ours_s'] / r['torch_pruning_s']:.2f}",
                    *(f"{s[k]:.3f}" for k in (*STAGES, "total (profiled)")),
                    f"{min(r['loads']):.1f}-{max(r['loads']):.1f}",
                ]
            )
        header = [
            "model",
            "ours s",
            "TP s",
            "ours/TP",
            *(f"{k} s" for k in STAGES),
            "profiled total s",
            "load",
        ]
        lines.append(markdown_table(header, rows))
        for r in payload["models"]:
            heavy = ", ".join(f"{k} {t:.3f}" for k, t in r["heaviest_own_s"][:6])
            lines.append(f"- {r['model']}, heaviest own time (s): {heavy}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
