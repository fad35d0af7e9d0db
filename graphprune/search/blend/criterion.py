"""The "blend" criterion: Blending Pruning Criteria (He et al., ICANN 2021), METHODS.md section 3.

1. The pool's criteria score every prunable group.  2. Per group, criteria are clustered by Spearman
similarity and each cluster keeps a representative.  3. Representatives' scores are normalised (rank,
or divided by the layer mean: "scale") and blended as sum_k alpha_k * score_k, where a candidate k that
was merged into another's cluster in some layer lends its factor to that cluster's representative
there.  4. An evolutionary search picks the alphas by the held-out accuracy of the pruned model (the
plan options of this very prune, BN recalibrated, no fine-tuning).  The best blend's scores are the
criterion's scores; the search's report (clusters, factors, fitness curve) is kept and optionally
written as JSON + PNG.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from graphprune.analysis.graph import Group
from graphprune.criteria.base import Criterion, ScoringInputs
from graphprune.criteria.normalize import normalize
from graphprune.errors import CalibrationError, PlanError
from graphprune.onnxutil import atomic_write
from graphprune.search.blend.clustering import LayerClusters, cluster_layers
from graphprune.search.blend.fitness import Evaluator, FitnessTask, LayerBlend, blend_scores
from graphprune.search.blend.pool import DEFAULT_POOL, PoolScores, check_pool, pool_statistics, score_pool
from graphprune.search.blend.search import SearchConfig, SearchResult, evolve

log = logging.getLogger(__name__)

BLEND_NORMALIZATIONS = {"rank": "rank", "scale": "mean"}
REPORT_JSON = "blend_report.json"
REPORT_PNG = "blend_fitness.png"


@dataclass
class BlendConfig:
    """Options of the blend: pool, clustering threshold, normalisation, search and fitness settings.

    holdout: fraction of the calibration data held out to measure accuracy (the rest recalibrates BN;
    at most recal_samples and eval_samples images are used of each).  workers: evaluation processes
    (1 = in this process).  report_dir: where blend_report.json and blend_fitness.png go (None: not
    written; the report is still returned by prune() as criterion_report)."""

    pool: tuple[str, ...] = DEFAULT_POOL
    similarity: float = 0.9
    normalize: str = "rank"
    population: int = SearchConfig.population
    generations: int = SearchConfig.generations
    mutation_rate: float = SearchConfig.mutation_rate
    mutation_scale: float = SearchConfig.mutation_scale
    crossover_rate: float = SearchConfig.crossover_rate
    elite: int = SearchConfig.elite
    tournament: int = SearchConfig.tournament
    workers: int = 2
    holdout: float = 0.5
    recal_samples: int = 256
    eval_samples: int | None = 1000
    batch_size: int = 64
    report_dir: str | None = None
    progress: bool = True

    def validate(self) -> None:
        check_pool(self.pool)
        if self.normalize not in BLEND_NORMALIZATIONS:
            raise PlanError(
                f"blend normalisation must be one of {', '.join(BLEND_NORMALIZATIONS)}, got {self.normalize!r}."
            )
        if not -1.0 <= self.similarity <= 1.0:
            raise PlanError(f"blend similarity threshold must lie in [-1, 1], got {self.similarity}.")
        if not 0.0 < self.holdout < 1.0:
            raise PlanError(f"blend holdout fraction must lie strictly between 0 and 1, got {self.holdout}.")
        if self.workers < 1 or self.recal_samples < 1 or self.batch_size < 1:
            raise PlanError("blend workers, recal_samples and batch_size must be at least 1.")
        self.search().validate()

    def search(self, seed: int = 0) -> SearchConfig:
        names = {f.name for f in fields(SearchConfig)} - {"seed"}
        return SearchConfig(**{name: getattr(self, name) for name in names}, seed=seed)


class Blend(Criterion):
    """Blended criteria with factors found by an evolutionary search on held-out accuracy."""

    name = "blend"
    needs_data = True

    def __init__(self, aggregate: str = "sum", config: BlendConfig | None = None, **overrides: Any) -> None:
        super().__init__(aggregate)
        self.config = replace(config or BlendConfig(), **overrides)
        self.config.validate()
        self.scores: dict[int, np.ndarray] = {}
        self.report: dict[str, Any] | None = None

    def required_statistics(self) -> frozenset[str]:
        return pool_statistics(self.config.pool)

    def prepare(self, inputs: ScoringInputs) -> None:
        if inputs.calibration is None or inputs.planner is None:
            raise CalibrationError(
                "criterion 'blend' judges blends by held-out accuracy: give calibration data (--calib DATA) "
                "and use it through prune(), which supplies the plan options."
            )
        inputs.calibration.require_labels("criterion 'blend' (held-out accuracy)")
        config = self.config
        pool = score_pool(inputs, config.pool, self.aggregate)
        layers = cluster_layers(pool, inputs.dep.prunable_groups, config.similarity)
        genes = [name for name in pool.names if any(name in layer.representatives for layer in layers)]
        blends = [layer_blend(layer, pool, genes, config.normalize) for layer in layers]
        recal, held_out = inputs.calibration.split(1.0 - config.holdout, seed=inputs.seed)
        if not len(recal) or not len(held_out):
            raise CalibrationError(
                f"criterion 'blend' needs at least 2 calibration images to hold some out, got {len(inputs.calibration)}."
            )
        held_out = held_out.subset(np.arange(min(len(held_out), config.eval_samples or len(held_out))))
        task = FitnessTask(
            inputs.dep,
            inputs.planner,
            blends,
            recal.images[: config.recal_samples],
            held_out,
            batch_size=config.batch_size,
        )
        with Evaluator(task, config.workers) as evaluator:
            result = evolve(
                len(genes), evaluator.evaluate_many, config.search(inputs.seed), progress=config.progress
            )
        self.scores = blend_scores(blends, result.best)
        self.report = blend_report(config, pool, layers, genes, result, inputs.seed)
        if config.report_dir is not None:
            write_report(self.report, config.report_dir)

    def score_group(self, inputs: ScoringInputs, group: Group) -> np.ndarray | None:
        return self.scores.get(group.index)

    def summary(self) -> dict[str, Any] | None:
        return self.report


def layer_blend(layer: LayerClusters, pool: PoolScores, genes: list[str], how: str) -> LayerBlend:
    """Normalised representative scores of one layer and the cluster each gene weights there."""
    rows = np.vstack(
        [
            normalize(pool.scores[name][layer.group], BLEND_NORMALIZATIONS[how])
            for name in layer.representatives
        ]
    )
    gene_rows = np.array([-1 if (c := layer.cluster_of(g)) is None else c for g in genes], dtype=np.int64)
    return LayerBlend(layer.group, rows, gene_rows)


def blend_report(
    config: BlendConfig,
    pool: PoolScores,
    layers: list[LayerClusters],
    genes: list[str],
    result: SearchResult,
    seed: int,
) -> dict[str, Any]:
    """Clusters per layer, the candidates and their chosen factors, single-candidate fitness, the curve."""
    singles = {name: result.fitness_of(np.eye(len(genes))[k]) for k, name in enumerate(genes)}
    return {
        "pool": pool.names,
        "skipped": pool.skipped,
        "candidates": genes,
        "factors": dict(zip(genes, map(float, result.best), strict=True)),
        "fitness": result.fitness,
        "single_fitness": singles,
        "curve": [asdict(g) for g in result.history],
        "layers": [layer.as_dict() for layer in layers],
        "config": {**asdict(config), "pool": list(config.pool)},
        "seed": seed,
    }


def write_report(report: dict[str, Any], directory: str | Path) -> tuple[Path, Path]:
    """blend_report.json and the fitness-curve PNG (best and mean held-out accuracy per generation)."""
    from graphprune.report.plots import plot_curve

    folder = Path(directory)
    json_path = folder / REPORT_JSON
    with atomic_write(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    curve = report["curve"]
    png = plot_curve(
        [g["index"] for g in curve],
        [g["best"] for g in curve],
        folder / REPORT_PNG,
        title="Blend search: best held-out accuracy (BN recalibrated, no fine-tuning)",
        xlabel="generation",
        ylabel="accuracy",
    )
    log.info("blend report written to %s", json_path)
    return json_path, png
