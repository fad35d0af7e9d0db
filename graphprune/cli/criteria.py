"""`graphprune criteria`: do my criteria even disagree?  And the calibration / blend options of `prune`.

`criteria MODEL.onnx --calib DATA` scores every prunable layer with each criterion of the pool, prints
per layer the Spearman rank correlation between criteria (with the clusters a blend would form), then
the correlation averaged over layers; with --out DIR it also writes criteria_spearman.json, a heatmap of
the average (criteria_spearman.png) and one heatmap per layer under DIR/layers/.

cli.py calls `register(subparsers)`, and for `prune` adds `add_calibration_arguments(parser)` and passes
`**calibration_kwargs(args)` to graphprune.api.prune.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from graphprune.cli.arguments import POOL_HELP, add_alias, add_image_norm_argument, add_json_argument

if TYPE_CHECKING:
    from rich.table import Table

    from graphprune.search.blend.clustering import LayerClusters


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `criteria` command."""
    from graphprune.search.blend import DEFAULT_POOL

    p = subparsers.add_parser(
        "criteria", help="Spearman rank correlation between criteria, per layer (table and heatmap)"
    )
    p.add_argument("model", help="the ONNX model")
    p.add_argument(
        "--calib", required=True, help="calibration data: fashion-mnist, synthetic[:N], .npz, folder"
    )
    p.add_argument("--calib-samples", type=int, default=512, help="calibration images drawn (seeded)")
    add_alias(p, "--samples", "--calib-samples", type=int)
    add_image_norm_argument(p)
    p.add_argument("--criteria", default=",".join(DEFAULT_POOL), help=POOL_HELP)
    p.add_argument(
        "--aggregate", default="sum", choices=("sum", "mean", "max"), help="group score from members"
    )
    p.add_argument("--similarity", type=float, default=0.9, help="Spearman threshold for clusters")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    p.add_argument("--out", help="folder for criteria_spearman.json and heatmap PNGs")
    add_json_argument(p)
    p.set_defaults(func=cmd_criteria)


def cmd_criteria(args: argparse.Namespace) -> int:
    from graphprune.api import analyze_model, torch_gate_gradients
    from graphprune.cli.console import out, stage
    from graphprune.data import load_calibration
    from graphprune.model_io import input_image_norm
    from graphprune.report.tables import render
    from graphprune.runtime.shapes import image_shape
    from graphprune.search.blend.clustering import cluster_layers, mean_similarity
    from graphprune.search.blend.pool import pool_inputs, score_pool

    names = [name.strip() for name in args.criteria.split(",") if name.strip()]
    with stage("analysis"):
        dep = analyze_model(args.model)
    data = load_calibration(
        args.calib,
        args.calib_samples,
        args.seed,
        image_shape(dep.model),
        input_image_norm(dep.model, args.image_norm),
    )
    inputs = pool_inputs(dep, data, names, seed=args.seed, gate_gradients=torch_gate_gradients)
    with stage("criteria"):
        pool = score_pool(inputs, names, args.aggregate)
    layers = cluster_layers(pool, dep.prunable_groups, args.similarity)
    average = mean_similarity(layers, pool.names)
    written = write_outputs(Path(args.out), layers, pool.names, average, pool.skipped) if args.out else None
    if args.json:
        summary = spearman_summary(layers, pool.names, average, pool.skipped)
        out.print_json(json.dumps({**summary, "output": None if written is None else str(written)}))
        return 0
    sizes = {group.index: group.size for group in dep.groups}
    for layer in layers:
        title = f"{layer.name} ({sizes[layer.group]} channels)"
        out.print(
            render(similarity_table(layer.criteria, layer.similarity, title), width=200),
            end="",
            soft_wrap=True,
        )
        out.print(
            "  clusters: " + "  ".join("{" + ", ".join(c) + "}" for c in layer.clusters) + "\n",
            soft_wrap=True,
        )
    table = similarity_table(pool.names, average, f"mean over {len(layers)} layers")
    out.print(render(table, width=200), end="", soft_wrap=True)
    for name, reason in pool.skipped.items():
        out.print(f"skipped {name}: {reason}")
    if written is not None:
        out.print(f"wrote {written}")
    return 0


def similarity_table(names: list[str], matrix: np.ndarray, title: str) -> Table:
    """A rich table of a correlation matrix (lower triangle; "-" where undefined)."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, title_justify="left")
    table.add_column("")
    for name in names:
        table.add_column(name, justify="right")
    for i, name in enumerate(names):
        cells = ["-" if np.isnan(matrix[i, j]) else f"{matrix[i, j]:+.2f}" for j in range(i + 1)]
        table.add_row(name, *cells, *([""] * (len(names) - i - 1)))
    return table


def spearman_summary(
    layers: list[LayerClusters], names: list[str], average: np.ndarray, skipped: dict[str, str]
) -> dict[str, object]:
    """What criteria_spearman.json and --json hold: the criteria, their mean correlation, those skipped
    and each layer's correlations and clusters."""
    from graphprune.search.blend.clustering import json_matrix

    return {
        "criteria": names,
        "mean_spearman": json_matrix(average),
        "skipped": skipped,
        "layers": [layer.as_dict() for layer in layers],
    }


def write_outputs(
    folder: Path, layers: list[LayerClusters], names: list[str], average: np.ndarray, skipped: dict[str, str]
) -> Path:
    """criteria_spearman.json, the average heatmap and one heatmap per layer; returns the JSON path."""
    from graphprune.onnxutil import atomic_write
    from graphprune.report.plots import plot_heatmap

    json_path = folder / "criteria_spearman.json"
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(spearman_summary(layers, names, average, skipped), indent=2))
    title = "Spearman, mean over layers (blank: undefined)"
    plot_heatmap(average, names, folder / "criteria_spearman.png", title)
    for layer in layers:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", layer.name)
        plot_heatmap(
            layer.similarity,
            layer.criteria,
            folder / "layers" / f"{layer.group:03d}_{safe}.png",
            f"Spearman, {layer.name}",
        )
    return json_path
