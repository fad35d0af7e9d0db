"""Commands on ONNX files: analyze, profile, prune, verify, bench, export."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from graphprune.cli.arguments import (
    add_calibration_arguments,
    add_input_shape_argument,
    add_json_argument,
    calibration_kwargs,
    input_shapes,
    parse_shape,
)
from graphprune.cli.console import console, out, print_results, stage
from graphprune.errors import GraphPruneError

# The bench table fits a classic 80-column terminal or log: the numbers take 60 columns, and
# longer model names are cut (never wrapped).
BENCH_WIDTH = 80


def _floats(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def cmd_analyze(args: argparse.Namespace) -> int:
    from graphprune.analysis.summary import analysis_summary
    from graphprune.api import analyze_model
    from graphprune.report.summary import render_analysis
    from graphprune.runtime.cost import count_cost
    from graphprune.runtime.shapes import image_shape

    with stage("analysis"):
        dep = analyze_model(args.model, input_shapes(args))
    cost = count_cost(dep.model, dep.shapes)
    image = image_shape(dep.model)
    image_input = dataclasses.asdict(image) if image is not None else None
    summary = analysis_summary(dep, Path(args.model).name, cost.macs, cost.params, image_input)
    print_results(args.json, summary, lambda: out.print(render_analysis(summary), end="", soft_wrap=True))
    return 0


def _plan_options(args: argparse.Namespace):  # noqa: ANN202 - PlanOptions, imported lazily
    from graphprune.planning import PlanOptions

    return PlanOptions(
        ratio=args.ratio,
        target_macs=args.target_macs,
        target_latency=args.target_latency,
        global_ranking=args.global_ranking,
        objective=args.objective,
        max_ratio=args.max_ratio,
        min_channels=args.min_channels,
        round_to=args.round_to,
        exclude=args.exclude or [],
        normalize=args.normalize,
    )


def cmd_prune(args: argparse.Namespace) -> int:
    from graphprune.api import prune
    from graphprune.model_io import load_model
    from graphprune.planning.plan import PruningPlan
    from graphprune.report.summary import cost_rows
    from graphprune.report.tables import comparison_table, render

    output = Path(args.output)
    if output.resolve() == Path(args.model).resolve():
        raise GraphPruneError("the output path is the input model; graphprune never overwrites its input.")
    if args.plan and any(x is not None for x in (args.ratio, args.target_macs, args.target_latency)):
        raise GraphPruneError("--plan replays a saved plan; drop --ratio / --target-macs / --target-latency.")
    options = None if args.plan else _plan_options(args)
    if options is not None:
        options.validate()
    if args.recover not in (None, "none") and args.calib is None:
        raise GraphPruneError(f"--recover {args.recover} fits on calibration images: add --calib DATA.")
    plan = PruningPlan.load(args.plan) if args.plan else None
    loaded = load_model(args.model)
    if args.criterion == "blend" and args.blend_report is None:
        args.blend_report = str(output.with_suffix(".blend"))
    latency = None
    if args.latency_lut or (options is not None and options.needs_latency):
        from graphprune.api import LatencySource

        latency = LatencySource(
            args.latency_lut, args.provider, args.batch, args.threads, feedback=args.latency_feedback
        )
    with stage("prune"):
        result = prune(
            loaded,
            options,
            plan=plan,
            criterion=args.criterion,
            aggregate=args.aggregate,
            seed=args.seed,
            verify=not args.no_verify,
            tolerance=args.tolerance,
            threads=args.threads,
            latency=latency,
            force=args.force,
            input_shapes=input_shapes(args),
            **calibration_kwargs(args),
        )
    if result.verification is not None:
        report = result.verification
        console.print(
            f"verify     max rel err {report.max_rel_error:.2g} over {report.tensors} tensors x {report.seeds} "
            f"seeded inputs  ok{_precision_note(report)}",
            soft_wrap=True,
        )
    else:
        console.print(
            "verify     skipped (--no-verify): the model was NOT checked against the masked reference"
        )
    if result.recovery is not None:
        _print_recovery(result.recovery)
    predicted = result.plan.latency
    if predicted is not None and predicted["feedback"]:
        timed = ", ".join(
            f"{c['measured_ms']:.3f} ms (predicted {c['predicted_ms']:.3f})" for c in predicted["feedback"]
        )
        chosen = predicted["measured_ms"]
        console.print(
            f"latency    table alone {predicted['table_predicted_ms']:.3f} ms; timed whole: {timed}; "
            f"kept plan predicted {predicted['predicted_ms']:.3f} ms"
            + (f", measured {chosen:.3f} ms" if chosen is not None else ""),
            soft_wrap=True,
        )
    plan_path = Path(args.plan_out) if args.plan_out else output.with_suffix(".plan.json")
    result.save(output, plan_path)
    rows = cost_rows(result.before, result.after)
    if predicted is not None:
        rows["before"]["predicted_ms"] = predicted["original_ms"]
        rows["after"]["predicted_ms"] = predicted["predicted_ms"]
    if args.bench:
        where = predicted or {
            "provider": args.provider or "cpu",
            "batch": args.batch or 1,
            "threads": args.threads,
        }
        rows = _with_latency(rows, [args.model, str(output)], where, input_shapes(args))
    report = result.verification
    verification = (
        None if report is None else {"max_rel_error": report.max_rel_error, "tensors": report.tensors}
    )
    payload = {
        **rows,
        "verification": verification,
        "recovery": None if result.recovery is None else result.recovery.as_dict(),
        "latency": predicted,
        "output": str(output),
        "plan": str(plan_path),
    }
    print_results(
        args.json,
        payload,
        lambda: out.print(render(comparison_table(rows)) + f"wrote {output}, plan {plan_path}"),
    )
    if args.criterion == "blend" and plan is None:
        from graphprune.search.blend.criterion import REPORT_JSON, REPORT_PNG

        report_dir = Path(args.blend_report)
        console.print(f"wrote blend report {report_dir / REPORT_JSON}, {report_dir / REPORT_PNG}")
    from graphprune.onnxutil import conv_channels

    before, after = conv_channels(result.dep.model), conv_channels(result.model)
    if (
        plan is None
        and latency is None
        and args.round_to == 1
        and any(after[n] != before[n] and after[n] % 8 for n in after)
    ):
        console.print(
            "tip        some pruned widths are not multiples of 8; onnxruntime's blocked CPU kernels run "
            "those slower, so add --round-to 8 (AVX2) or 16 (AVX-512) when latency matters"
        )
    if args.plot:
        from graphprune.report.plots import plot_channels

        kept = result.after.macs / result.before.macs
        title = f"{output.stem}: channels per conv (MACs kept {kept:.0%})"
        out.print(f"wrote {plot_channels(before, after, args.plot, title)}")
    return 0


def _print_recovery(report) -> None:  # noqa: ANN001 - RecoveryReport, imported lazily
    done = [
        f"{len(report.reconstructed)} layers re-fitted" if report.method == "lsq" else "",
        f"{len(report.batchnorms)} BN recalibrated",
        f"{len(report.bias_corrected)} biases corrected" if report.bias_corrected else "",
    ]
    console.print(
        f"recover    {report.method}: {', '.join(filter(None, done))} on {report.fit_samples:,} images "
        f"in {report.seconds:.2f} s"
    )
    top1 = (
        f"top-1 agreement {report.agreement:.1%} (before {report.agreement_before:.1%}), "
        if report.agreement is not None
        else ""
    )
    console.print(
        f"           vs original on {report.heldout_samples:,} held-out images: {top1}"
        f"rel output err {report.rel_error:.3g} (before {report.rel_error_before:.3g})"
    )
    by_reason: dict[str, list[str]] = {}
    for node, reason in report.skipped.items():
        by_reason.setdefault(reason, []).append(node)
    for reason, nodes in by_reason.items():
        named = ", ".join(nodes[:SKIPPED_NAMED]) + (
            f" and {len(nodes) - SKIPPED_NAMED} more" if len(nodes) > SKIPPED_NAMED else ""
        )
        console.print(f"           left as is ({len(nodes)}): {reason}: {named}", markup=False)


# Layers named per reason the recovery left a layer as it is (the JSON lists them all).
SKIPPED_NAMED = 2


def _precision_note(report) -> str:  # noqa: ANN001 - VerificationReport, imported lazily
    """Says when a reduced-precision model was checked at a looser tolerance."""
    if report.precision == "fp32":
        return ""
    return f" ({report.precision} model: tolerance {report.tolerance:g})"


def _with_latency(rows: dict, paths: list[str], where: dict, shapes: dict) -> dict:
    """Measured latency of each model, with the latency table's provider, batch and threads when the
    plan was made with one (so predicted and measured compare)."""
    from graphprune.runtime.bench import bench_many

    results = bench_many(
        paths,
        [where["batch"]],
        threads=where["threads"],
        provider=where["provider"],
        warmup=20,
        runs=200,
        input_shapes=shapes,
    )
    for metrics, result in zip(rows.values(), results, strict=True):
        metrics["latency_ms"] = result.median_ms
    _note_busy(results)
    return rows


# A layer this much slower inside the model than alone is named by `graphprune profile`.
IN_MODEL_NOTABLE = 1.2


def cmd_profile(args: argparse.Namespace) -> int:
    from graphprune.api import profile_latency
    from graphprune.runtime.profile import Timing

    with stage("profile"):
        table = profile_latency(
            args.model,
            provider=args.provider,
            batch=args.batch,
            threads=args.threads,
            timing=Timing(runs=args.runs, rounds=args.rounds),
            input_shapes=input_shapes(args),
        )
    table.save(args.output)
    summary = {k: v for k, v in table.to_dict().items() if k not in ("layers", "curves")}
    print_results(args.json, {**summary, "output": args.output}, lambda: _print_profile(args, table))
    return 0


def _print_profile(args: argparse.Namespace, table) -> None:  # noqa: ANN001 - LatencyTable, imported lazily
    """The profile's summary lines: timing, the layers' sum against the whole, notable layers, the check."""
    from graphprune.report.tables import fmt_ms

    out.print(
        f"{Path(args.model).name}  {table.provider}  batch {table.batch}  {table.threads or 'default'} threads  "
        f"{len(table.layers)} layers, {len(table.curves)} signatures timed in {table.seconds:.1f} s"
        + (f" ({table.profiles} profiles: the first missed its check)" if table.profiles > 1 else "")
    )
    slope, intercept = table.fit
    out.print(
        f"whole model {fmt_ms(table.end_to_end_ms)}, layers sum to {fmt_ms(table.layers_sum_ms)} "
        f"({100 * table.sum_error:+.1f}%), other ops {fmt_ms(table.other_ms)} "
        f"({fmt_ms(table.other_fixed_ms)} of it per-kernel dispatch); "
        f"whole = {slope:.2f} x kernels {intercept:+.3f} ms"
    )
    scales = {node: table.in_model_scale(node) for node in table.in_model_ms}
    slower = [node for node, scale in scales.items() if scale > IN_MODEL_NOTABLE]
    if slower:
        slowest = max(slower, key=scales.__getitem__)
        shares, pruned = table.in_model_curve(slowest)
        out.print(
            f"{len(slower)} of {len(table.layers)} layers ran over {IN_MODEL_NOTABLE}x their time alone "
            f"inside the model (weights cold there; slowest {slowest} {scales[slowest]:.1f}x"
            + (f", {pruned[0]:.1f}x with {shares[0]:.0%} of its weights" if len(shares) > 1 else "")
            + "): planned at it"
        )
    if table.check_error is not None:
        out.print(
            f"check on a pruned copy: predicted {100 * table.check_error:+.1f}% off the measured latency"
        )
    out.print(f"wrote {args.output}")


def cmd_verify(args: argparse.Namespace) -> int:
    from graphprune.api import verify_plan
    from graphprune.planning.plan import PruningPlan

    with stage("verify"):
        report = verify_plan(
            args.original,
            args.pruned,
            PruningPlan.load(args.plan),
            tolerance=args.tolerance,
            force=args.force,
            input_shapes=input_shapes(args),
        )
    from dataclasses import asdict

    print_results(
        args.json,
        {**asdict(report), "ok": report.ok},
        lambda: out.print(
            f"equal to the masked reference: max rel err {report.max_rel_error:.2g} over {report.tensors} "
            f"tensors{_precision_note(report)}"
        ),
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from graphprune.runtime.bench import bench_many

    results = bench_many(
        args.models,
        _floats(args.batch),
        threads=args.threads,
        provider=args.provider,
        warmup=args.warmup,
        runs=args.runs,
        rounds=args.rounds,
        input_shapes=input_shapes(args),
    )
    print_results(args.json, [asdict(r) for r in results], lambda: _print_bench(args, results))
    _note_busy(results)
    return 0


def _print_bench(args: argparse.Namespace, results: list) -> None:  # noqa: ANN001 - LatencyResult
    """The bench table: per model and batch its median, p90, spread, throughput and speed-up over the
    first model at that batch."""
    from rich import box
    from rich.table import Table

    from graphprune.report.tables import fmt_ms, render, short_names

    table = Table(
        title=f"latency ({args.provider}, {args.threads or 'default'} threads)", box=box.SIMPLE_HEAD
    )
    table.add_column("model", no_wrap=True, overflow="ellipsis", max_width=BENCH_WIDTH - 64)
    for column in ("batch", "median", "p90", "spread", "items/s", "speed-up"):
        table.add_column(column, justify="right", no_wrap=True)
    names = dict(zip(args.models, short_names(args.models), strict=True))
    baseline: dict[int, float] = {}
    for result in results:
        first = baseline.setdefault(result.batch, result.median_ms)
        table.add_row(
            names[result.model],
            str(result.batch),
            fmt_ms(result.median_ms),
            fmt_ms(result.p90_ms),
            f"{result.spread:.0%}",
            f"{result.throughput_per_s:,.0f}",
            f"{first / result.median_ms:.2f}x",
        )
    out.print(render(table, width=BENCH_WIDTH), end="", soft_wrap=True)


def _note_busy(results: list) -> None:  # noqa: ANN001 - LatencyResult, imported lazily
    """Says so when some model's round medians lay far apart: the machine was busy, and each median is
    that model's fastest round."""
    from graphprune.runtime.bench import BUSY_SPREAD

    widest = max(results, key=lambda result: result.spread)
    if widest.spread > BUSY_SPREAD:
        console.print(
            f"note: round medians of {Path(widest.model).name} lay {widest.spread:.0%} apart: the machine "
            "was busy; each median is its model's fastest round (more --rounds make it likelier quiet)",
            markup=False,
        )


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from graphprune.torch_bridge.export import export
    from graphprune.zoo import build, default_input_shape

    module = build(args.spec, in_channels=args.in_channels, num_classes=args.num_classes)
    shape = args.input_shape or default_input_shape(args.spec, in_channels=args.in_channels)
    with stage("export"):
        export(
            module,
            torch.randn(*shape),
            args.output,
            exporter=args.exporter,
            fold_bn=args.fold_bn,
            external_data=args.external_data,
        )
    out.print(f"wrote {args.output}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("analyze", help="groups, prunable channels, blocked nodes and why, MACs/params")
    p.add_argument("model", help="the ONNX model")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_input_shape_argument(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="remove channels, verify against the masked reference, write the model")
    p.add_argument("model", help="the ONNX model (never modified)")
    p.add_argument("-o", "--output", required=True, help="where the pruned model goes (written atomically)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=float, help="fraction of channels removed from every prunable group")
    how.add_argument("--target-macs", type=float, help="keep at most this fraction of the MACs")
    how.add_argument(
        "--target-latency",
        type=float,
        help="keep at most this fraction of the measured latency (profiles the model unless --latency-lut)",
    )
    p.add_argument("--plan", help="replay a saved plan instead of planning")
    p.add_argument(
        "--force", action="store_true", help="replay --plan even if it was made for another model (warns)"
    )
    p.add_argument(
        "--criterion",
        default="l1",
        help="weight: l1, l2, fpgm, bn, random; with --calib: mean_act, apoz, act_var, entropy, hrank, taylor, blend",
    )
    p.add_argument(
        "--aggregate", default="sum", choices=("sum", "mean", "max"), help="group score from members"
    )
    p.add_argument("--global", dest="global_ranking", action="store_true", help="rank channels across groups")
    p.add_argument(
        "--normalize",
        default=None,
        help="score normalisation for --global: mean, max, sum, none, rank, lamp (default: mean; lamp with "
        "--objective latency)",
    )
    p.add_argument(
        "--objective",
        default="channels",
        choices=("channels", "latency"),
        help="--global ranks channels by score (channels) or by score per ms saved (latency, HALP-like; "
        "with --target-latency or --target-macs, profiling the model when no --latency-lut is given)",
    )
    p.add_argument("--latency-lut", help="latency table from graphprune profile (default: profile now)")
    p.add_argument(
        "--latency-feedback",
        type=int,
        default=2,
        metavar="N",
        help="--target-latency: time the plan whole and plan again on the measured latency, up to N times "
        "(0: trust the table alone)",
    )
    p.add_argument(
        "--provider",
        default=None,
        choices=("cpu", "cuda"),
        help="runtime of the latency profile and --bench (default: the --latency-lut's, else cpu)",
    )
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch of the latency profile and --bench (default: the --latency-lut's, else 1)",
    )
    p.add_argument("--max-ratio", type=float, default=0.9, help="most of one group --global may remove")
    p.add_argument("--min-channels", type=int, default=1, help="channels every group keeps")
    p.add_argument(
        "--round-to",
        type=int,
        default=1,
        help="kept channels a multiple of N (e.g. 8); at a multiple of a grouped conv's channels per conv "
        "group, whole conv groups go where analyze says they can",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="NODE",
        help="a node whose channels stay whole (repeat the flag for several)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of random choices (criterion random, calibration)"
    )
    p.add_argument("--plan-out", help="where to write the plan (default OUT.plan.json)")
    p.add_argument("--no-verify", action="store_true", help="skip verification (not recommended)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="relative tolerance of verification")
    p.add_argument(
        "--bench",
        action="store_true",
        help="also measure latency before/after (beside the prediction, if any)",
    )
    p.add_argument("--plot", metavar="PNG", help="also draw output channels per conv, before and after")
    p.add_argument("--json", action="store_true", help="machine-readable numbers (MACs, params, latency)")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime threads of calibration, verification, --bench"
    )
    add_input_shape_argument(p)
    p.set_defaults(func=cmd_prune)
    add_calibration_arguments(p)

    p = sub.add_parser(
        "profile", help="latency lookup table: each layer's latency per kept width, and the whole"
    )
    p.add_argument("model", help="the ONNX model to profile")
    p.add_argument("-o", "--output", required=True, help="the table (JSON)")
    p.add_argument(
        "--provider", default="cpu", choices=("cpu", "cuda"), help="onnxruntime execution provider"
    )
    p.add_argument("--batch", type=int, default=1, help="batch size to measure at")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)"
    )
    p.add_argument(
        "--runs",
        type=int,
        default=15,
        help="timed runs per point and round (fewer where a round would pass 0.25 s for a layer, 4 s for the whole model)",
    )
    p.add_argument("--rounds", type=int, default=3, help="rounds over each layer's points (fastest wins)")
    add_input_shape_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable summary")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("verify", help="check a pruned model against ORIGINAL masked by PLAN")
    p.add_argument("original", help="the model before pruning")
    p.add_argument("pruned", help="the pruned model")
    p.add_argument("--plan", required=True, help="the plan the pruned model was made with")
    p.add_argument(
        "--tolerance", type=float, default=1e-4, help="relative tolerance (fp16 models: at least 1e-2)"
    )
    p.add_argument(
        "--force", action="store_true", help="check even if PLAN was made for another model (warns)"
    )
    add_input_shape_argument(p)
    add_json_argument(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", help="onnxruntime latency of one or more models")
    p.add_argument("models", nargs="+", help="ONNX models; speed-ups are relative to the first")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,32")
    p.add_argument(
        "--threads", type=int, default=None, help="onnxruntime intra-op threads (default: its own)"
    )
    p.add_argument(
        "--provider", default="cpu", choices=("cpu", "cuda"), help="onnxruntime execution provider"
    )
    p.add_argument(
        "--warmup", type=int, default=10, help="untimed runs first, shared by the rounds (at least 2 each)"
    )
    p.add_argument("--runs", type=int, default=50, help="timed runs, shared by the rounds (at least 1 each)")
    p.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="interleaved rounds over the models, each in a fresh session; a model's median is its "
        "fastest round's (a busy machine only slows rounds down)",
    )
    add_input_shape_argument(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "export", help="export a zoo model, torchvision:NAME or module:callable to ONNX (BN kept)"
    )
    p.add_argument("spec", help="a zoo name, torchvision:NAME or pkg.module:callable")
    p.add_argument("-o", "--output", required=True, help="the ONNX file to write")
    p.add_argument(
        "--input-shape", type=parse_shape, help="sample input, e.g. 1x3x224x224 (default: the model's own)"
    )
    p.add_argument("--in-channels", type=int, default=None, help="input channels (default: the model's own)")
    p.add_argument("--num-classes", type=int, default=None, help="classes (default: the model's own)")
    p.add_argument("--exporter", default="legacy", choices=("legacy", "dynamo"), help="torch.onnx exporter")
    p.add_argument("--external-data", action="store_true", help="weights in OUT.onnx.data")
    p.add_argument("--fold-bn", action="store_true", help="fold BatchNorm into convs (as often shipped)")
    p.set_defaults(func=cmd_export)
