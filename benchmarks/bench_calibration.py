"""Memory and speed of calibration (`graphprune.runtime.activations.collect_activations`) on the shipped
Fashion-MNIST ResNet-20.

**Memory**: every measurement runs in a fresh subprocess (so no earlier allocation hides a peak), at
1,000 and 10,000 training images, for two statistic sets (the streaming statistics mean_abs, apoz,
variance, entropy; then the same plus hrank) and two ways of feeding the images:

- `array`: the images are loaded into an ArrayDataset before calibration (what `prune(calib=...)`
  does), so the data itself (3 MB vs 31 MB) is part of the process;
- `stream`: batches are read from a raw float32 file one at a time, so only calibration's own memory
  is resident.

Per run the child reports `ru_maxrss` (resource.getrusage, the process's peak RSS), its RSS after
imports, model, analysis and data are loaded (the post-load baseline), and the peak RSS of the
calibration itself (VmHWM, reset to the current RSS through /proc/self/clear_refs right before
calibration). Goal: peak RSS grows by less than 10% going from 1,000 to 10,000 images.

**Throughput**: images per second of calibration against plain onnxruntime inference of the original
model on the same batches (batch 64, one intra-op thread, session creation included in both), each
statistic alone and the sets above, rounds interleaved and the best round kept (the machine is shared).
Goal: at least 80% of plain inference.

Writes results/calibration.json and results/calibration.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from common import RESULTS, Failure, machine, machine_line, markdown_table, write_json, write_text

log = logging.getLogger("bench_calibration")

STREAMING = ("mean_abs", "apoz", "variance", "entropy")
MEMORY_SETS = {"streaming": STREAMING, "streaming+hrank": (*STREAMING, "hrank")}
THROUGHPUT_SETS = {
    **{name: (name,) for name in STREAMING},
    "hrank": ("hrank",),
    **MEMORY_SETS,
}
SOURCES = ("array", "stream")
GOAL_MEMORY = 0.10
GOAL_THROUGHPUT = 0.80
SAMPLE_SHAPE = (1, 28, 28)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# Child processes: data, one memory measurement, the throughput rounds --------------------------------------------------------------


def status_kb(field: str) -> int:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} field.")


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def file_batches(path: Path, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """`count` images of a raw float32 file, read one batch at a time (never all resident)."""
    per_image = int(np.prod(SAMPLE_SHAPE))
    with open(path, "rb") as handle:
        for start in range(0, count, batch_size):
            size = min(batch_size, count - start)
            flat = np.fromfile(handle, dtype=np.float32, count=size * per_image)
            yield flat.reshape(size, *SAMPLE_SHAPE)


def child_memory(args: argparse.Namespace) -> dict[str, object]:
    from graphprune.api import analyze_model
    from graphprune.cli.demo import REFERENCE
    from graphprune.criteria.tensors import collect_activations
    from graphprune.data import ArrayDataset

    rss_imports = status_kb("VmRSS")
    dep = analyze_model(REFERENCE)
    statistics = MEMORY_SETS[args.stats]
    if args.source == "array":
        images = np.fromfile(args.data, dtype=np.float32, count=args.images * int(np.prod(SAMPLE_SHAPE)))
        data: object = ArrayDataset(
            images.reshape(args.images, *SAMPLE_SHAPE), np.zeros(args.images, np.int64), 10, "fashion-mnist"
        )
    else:
        data = file_batches(args.data, args.images, args.batch)
    rss_loaded = status_kb("VmRSS")
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_reset = reset_peak()
    start = time.perf_counter()
    stats = collect_activations(
        dep, data, statistics=statistics, batch_size=args.batch, threads=1, progress=False
    )
    seconds = time.perf_counter() - start
    return {
        "images": stats.samples,
        "stats": args.stats,
        "source": args.source,
        "rss_imports_kb": rss_imports,
        "rss_loaded_kb": rss_loaded,
        "maxrss_before_kb": maxrss_before,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "calib_peak_kb": status_kb("VmHWM") if peak_reset else None,
        "rss_after_kb": status_kb("VmRSS"),
        "peak_reset": peak_reset,
        "seconds": round(seconds, 2),
    }


def child_prepare(args: argparse.Namespace) -> dict[str, object]:
    """Write the first `images` seeded training images as raw float32 (normalised)."""
    from graphprune.data import load_dataset

    ds = load_dataset("fashion-mnist", "train", limit=args.images, seed=0)
    ds.images.tofile(args.data)
    return {"images": len(ds), "bytes": ds.images.nbytes}


@dataclass
class Throughput:
    name: str
    statistics: tuple[str, ...]
    seconds: list[float]
    images: int
    failure: dict[str, str] | None = None

    @property
    def best(self) -> float | None:
        return round(self.images / min(self.seconds), 1) if self.seconds else None


def child_throughput(args: argparse.Namespace) -> list[dict[str, object]]:
    """Plain inference and each statistic set on the same in-memory batches, rounds interleaved."""
    from tqdm import tqdm

    from graphprune.api import analyze_model
    from graphprune.cli.demo import REFERENCE
    from graphprune.criteria.tensors import collect_activations
    from graphprune.data import ArrayDataset
    from graphprune.runtime.session import make_session

    count, batch = args.images, args.batch
    images = np.fromfile(args.data, dtype=np.float32, count=count * int(np.prod(SAMPLE_SHAPE)))
    ds = ArrayDataset(images.reshape(count, *SAMPLE_SHAPE), np.zeros(count, np.int64), 10, "fashion-mnist")
    dep = analyze_model(REFERENCE)

    def plain() -> None:
        session = make_session(REFERENCE, threads=1)
        name = session.get_inputs()[0].name
        for x, _ in ds.batches(batch):
            session.run(None, {name: x})

    jobs = {"plain onnxruntime": ((), plain)}
    for name, statistics in THROUGHPUT_SETS.items():
        jobs[name] = (
            statistics,
            lambda s=statistics: collect_activations(
                dep, ds, statistics=s, batch_size=batch, threads=1, progress=False
            ),
        )
    results = {name: Throughput(name, statistics, [], count) for name, (statistics, _) in jobs.items()}
    for _ in tqdm(range(args.rounds), desc="throughput rounds", disable=None):
        for name, (_, job) in jobs.items():
            if results[name].failure is not None:
                continue
            start = time.perf_counter()
            try:
                job()
            except Exception as exc:  # noqa: BLE001 - a failing statistic set is a result to report
                results[name].failure = asdict(Failure.from_exception(name, exc))
                continue
            results[name].seconds.append(round(time.perf_counter() - start, 3))
    return [{**asdict(t), "images_per_s": t.best} for t in results.values()]


CHILDREN = {"prepare": child_prepare, "memory": child_memory, "throughput": child_throughput}


# Parent ------------------------------------------------------------------------------------------


def run_child(mode: str, data: Path, *extra: str) -> dict[str, object]:
    """Run this script as a fresh process in `mode` and parse the JSON it prints last."""
    command = [sys.executable, __file__, "--child", mode, "--data", str(data), *extra]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} {' '.join(extra)} failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_verdicts(runs: list[dict[str, object]], sizes: list[int]) -> list[dict[str, object]]:
    """Per (statistics, source): peak RSS and calibration growth at the smallest and largest size."""
    small, large = min(sizes), max(sizes)
    verdicts = []
    for stats in MEMORY_SETS:
        for source in SOURCES:
            pair = {r["images"]: r for r in runs if r["stats"] == stats and r["source"] == source}
            if small not in pair or large not in pair:
                continue
            a, b = pair[small], pair[large]
            growth = b["maxrss_kb"] / a["maxrss_kb"] - 1
            own = [r["calib_peak_kb"] - r["rss_loaded_kb"] if r["calib_peak_kb"] else None for r in (a, b)]
            own_growth = None if None in own else own[1] / own[0] - 1
            verdicts.append(
                {
                    "stats": stats,
                    "source": source,
                    "maxrss_small_kb": a["maxrss_kb"],
                    "maxrss_large_kb": b["maxrss_kb"],
                    "maxrss_growth": round(growth, 4),
                    "pass_maxrss": growth < GOAL_MEMORY,
                    "calib_own_small_kb": own[0],
                    "calib_own_large_kb": own[1],
                    "calib_own_growth": None if own_growth is None else round(own_growth, 4),
                    "pass_calib_own": None if own_growth is None else own_growth < GOAL_MEMORY,
                }
            )
    return verdicts


def verdict(passed: bool | None) -> str:
    return "-" if passed is None else ("pass" if passed else "FAIL")


def mb(kb: object) -> str:
    return "-" if kb is None else f"{int(kb) / 1024:.1f}"


def render(payload: dict[str, object]) -> str:
    runs: list[dict[str, object]] = payload["memory"]  # type: ignore[assignment]
    verdicts: list[dict[str, object]] = payload["memory_verdicts"]  # type: ignore[assignment]
    throughput: list[dict[str, object]] = payload["throughput"]  # type: ignore[assignment]
    settings: dict[str, object] = payload["settings"]  # type: ignore[assignment]
    sizes = settings["sizes"]
    lines = [
        "# Calibration: peak memory and throughput\n",
        machine_line(payload["machine"]),  # type: ignore[arg-type]
        f"Total wall time {payload.get('wall_s', '-')} s. Model: the shipped Fashion-MNIST ResNet-20 "
        "(`graphprune/zoo/weights/resnet20_fmnist.onnx`, 19 judged feature maps). Calibration runs "
        f"`collect_activations(dep, data, statistics=..., batch_size={settings['batch']}, threads=1)`; "
        "HRank looks at its default 128 images (`rank_images=128`). numpy/BLAS limited to 1 thread.\n",
        "## Memory (each row a fresh process)\n",
        "`array`: the images are held in an ArrayDataset (as `prune(calib=...)` holds them), so the data "
        "(4 bytes x 784 per image: 3.1 MB at 1,000, 31.4 MB at 10,000) counts in the RSS. `stream`: batches "
        "are read from disk one at a time, so only calibration's own memory is resident. *Baseline* is the "
        "RSS after imports, model, analysis and data are loaded; *calibration peak* is VmHWM reset to the "
        "baseline right before `collect_activations` (so it is calibration's own high-water mark); "
        "*ru_maxrss* is `resource.getrusage(RUSAGE_SELF).ru_maxrss` at the end (the whole process's peak).\n",
    ]
    header = [
        "statistics",
        "source",
        "images",
        "baseline (MB)",
        "calibration peak (MB)",
        "growth over baseline (MB)",
        "ru_maxrss (MB)",
        "time (s)",
    ]
    rows = []
    for r in runs:
        over = None if r["calib_peak_kb"] is None else r["calib_peak_kb"] - r["rss_loaded_kb"]
        rows.append(
            [
                r["stats"],
                r["source"],
                f"{r['images']:,}",
                mb(r["rss_loaded_kb"]),
                mb(r["calib_peak_kb"]),
                mb(over),
                mb(r["maxrss_kb"]),
                r["seconds"],
            ]
        )
    lines.append(markdown_table(header, rows))
    lines.append(
        f"**Goal: peak RSS grows by less than {GOAL_MEMORY:.0%} from {min(sizes):,} to {max(sizes):,} images.**\n"
    )
    rows = [
        [
            v["stats"],
            v["source"],
            f"{mb(v['maxrss_small_kb'])} -> {mb(v['maxrss_large_kb'])}",
            f"{100 * v['maxrss_growth']:+.1f}%",
            verdict(v["pass_maxrss"]),
            f"{mb(v['calib_own_small_kb'])} -> {mb(v['calib_own_large_kb'])}",
            "-" if v["calib_own_growth"] is None else f"{100 * v['calib_own_growth']:+.1f}%",
            verdict(v["pass_calib_own"]),
        ]
        for v in verdicts
    ]
    header = [
        "statistics",
        "source",
        "ru_maxrss (MB)",
        "ru_maxrss growth",
        "goal",
        "calibration's own peak over baseline (MB)",
        "its growth",
        "goal",
    ]
    lines.append(markdown_table(header, rows))
    lines.append(
        "*ru_maxrss* is the whole process, so in `array` mode it also grows by the 28 MB of extra images "
        "the caller holds; *calibration's own peak* (VmHWM during `collect_activations` minus the "
        "post-load baseline) is what streaming bounds.\n"
    )
    plain = next(t for t in throughput if t["name"] == "plain onnxruntime")
    lines += [
        "## Throughput\n",
        f"{settings['throughput_images']:,} training images in memory, batch {settings['batch']}, one "
        f"onnxruntime intra-op thread, session creation included; {settings['rounds']} rounds interleaved "
        "over the rows, best round kept (other jobs on a shared machine can only slow a round down). Plain = `InferenceSession.run` of the original "
        "model on the same batches.\n",
    ]
    rows = []
    failures = []
    for t in throughput:
        if t["images_per_s"] is None:
            failures.append(f"- {t['name']}: `{t['failure']['error']}` ({t['failure']['where']})")
            rows.append([t["name"], ", ".join(t["statistics"]), "-", "-", "FAIL (error)", "-"])
            continue
        ratio = t["images_per_s"] / plain["images_per_s"]
        goal = "-" if t is plain else ("pass" if ratio >= GOAL_THROUGHPUT else "FAIL")
        if tuple(t["statistics"]) == ("hrank",):
            goal = "n/a: reads only the 128 images it ranks, then stops"
        rows.append(
            [
                t["name"],
                ", ".join(t["statistics"]) or "-",
                f"{t['images_per_s']:.0f}",
                f"{100 * ratio:.1f}%",
                goal,
                " / ".join(f"{s:.2f}" for s in t["seconds"]),
            ]
        )
    lines.append(
        markdown_table(
            [
                "run",
                "statistics",
                "images/s (best)",
                "vs plain",
                f"goal >= {GOAL_THROUGHPUT:.0%}",
                "rounds (s)",
            ],
            rows,
        )
    )
    if failures:
        lines += ["## Failures\n", *failures, ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000], help="calibration images")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--throughput-images", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stats", choices=list(MEMORY_SETS), help=argparse.SUPPRESS)
    parser.add_argument("--source", choices=SOURCES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        logging.disable(logging.WARNING)
        print(json.dumps(CHILDREN[args.child](args)))
        return
    for variable in THREAD_VARIABLES:  # children inherit: numpy's BLAS (HRank's SVDs) on 1 thread
        os.environ[variable] = "1"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    start = time.perf_counter()
    largest = max(max(args.sizes), args.throughput_images)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "fashion_mnist_train.f32"
        run_child("prepare", data, "--images", str(largest))
        runs = []
        for stats in MEMORY_SETS:
            for source in SOURCES:
                for size in args.sizes:
                    extra = [
                        "--images",
                        str(size),
                        "--stats",
                        stats,
                        "--source",
                        source,
                        "--batch",
                        str(args.batch),
                    ]
                    runs.append(run_child("memory", data, *extra))
                    log.info("memory: %s", runs[-1])
        extra = ["--images", str(args.throughput_images), "--batch", str(args.batch)]
        throughput = run_child("throughput", data, *extra, "--rounds", str(args.rounds))
    payload = {
        "machine": machine(),
        "settings": {
            "sizes": args.sizes,
            "batch": args.batch,
            "throughput_images": args.throughput_images,
            "rounds": args.rounds,
            "threads": 1,
            "parent_maxrss_kb_at_spawn": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        },
        "memory": runs,
        "memory_verdicts": memory_verdicts(runs, args.sizes),
        "throughput": throughput,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "calibration.json", payload)
    write_text(args.out / "calibration.md", render(payload))
    log.info("wrote %s", args.out / "calibration.md")


if __name__ == "__main__":
    main()
