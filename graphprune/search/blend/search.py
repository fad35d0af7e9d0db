"""Evolutionary search over the calibration factors alpha (one per blending candidate).

A genome is a point of the simplex (the blended ranking only depends on the factors' ratios).  The
initial population holds every single candidate (one-hot genomes) and the uniform blend, then seeded
Dirichlet draws.  Each generation keeps the `elite` best genomes and breeds the rest by tournament
selection, arithmetic crossover and Gaussian mutation.  Fitness values are cached per genome, all
randomness comes from one seeded generator in the calling process, and evaluations return in order,
so a seed fixes the result however many workers evaluate.  The best genome ever evaluated wins (the
earliest on ties), so the search never returns a blend worse, on its own fitness, than the best single
candidate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from graphprune.errors import PlanError
from graphprune.runtime.progress import progress as progress_bar

log = logging.getLogger(__name__)

GENOME_DECIMALS = 6


@dataclass(frozen=True)
class SearchConfig:
    """Population size, generations, variation rates, elitism and the seed of the search."""

    population: int = 12
    generations: int = 8
    mutation_rate: float = 0.3
    mutation_scale: float = 0.25
    crossover_rate: float = 0.7
    elite: int = 2
    tournament: int = 3
    seed: int = 0

    def validate(self) -> None:
        if self.population < 2 or self.generations < 0 or not 1 <= self.elite < self.population:
            raise PlanError(
                "the blend search needs population >= 2, generations >= 0 and 1 <= elite < population; "
                f"got population {self.population}, generations {self.generations}, elite {self.elite}."
            )
        if not (0 <= self.mutation_rate <= 1 and 0 <= self.crossover_rate <= 1 and self.mutation_scale >= 0):
            raise PlanError(
                "blend mutation and crossover rates must lie in [0, 1] and the mutation scale >= 0."
            )
        if self.tournament < 1:
            raise PlanError(f"the blend tournament size must be at least 1, got {self.tournament}.")


@dataclass
class Generation:
    """Fitness of one generation: best and mean over the population, and how many blends were new."""

    index: int
    best: float
    mean: float
    evaluated: int


@dataclass
class SearchResult:
    """The winning factors, their fitness, the per-generation curve and every evaluated genome."""

    best: np.ndarray
    fitness: float
    history: list[Generation]
    evaluated: list[tuple[np.ndarray, float]] = field(repr=False)

    def fitness_of(self, genome: np.ndarray) -> float | None:
        key = canonical(genome).tobytes()
        return next((f for g, f in self.evaluated if g.tobytes() == key), None)


def canonical(genome: np.ndarray) -> np.ndarray:
    """Non-negative, summing to one (uniform if all zero), rounded so equal blends compare equal."""
    values = np.clip(np.asarray(genome, dtype=np.float64), 0.0, None)
    total = values.sum()
    values = values / total if total > 0 else np.full(values.size, 1.0 / values.size)
    return np.round(values, GENOME_DECIMALS)


def initial_population(dims: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Every one-hot genome, the uniform one, then Dirichlet draws up to `size` (more if dims + 1 > size)."""
    population = [canonical(row) for row in np.eye(dims)]
    if dims > 1:
        population.append(canonical(np.ones(dims)))
    while len(population) < size:
        population.append(canonical(rng.dirichlet(np.ones(dims))))
    return population


def evolve(
    dims: int,
    evaluate_many: Callable[[list[np.ndarray]], list[float]],
    config: SearchConfig,
    *,
    progress: bool = True,
) -> SearchResult:
    """Maximise `evaluate_many` (a batch of genomes -> their fitness, in order) over the simplex."""
    config.validate()
    if dims < 1:
        raise PlanError("the blend search needs at least one candidate criterion.")
    rng = np.random.default_rng(config.seed)
    cache: dict[bytes, tuple[np.ndarray, float]] = {}

    def fitness(population: list[np.ndarray]) -> tuple[list[float], int]:
        fresh = list({g.tobytes(): g for g in population if g.tobytes() not in cache}.values())
        for genome, value in zip(fresh, evaluate_many(fresh), strict=True):
            cache[genome.tobytes()] = (genome, float(value))
        return [cache[g.tobytes()][1] for g in population], len(fresh)

    population = initial_population(dims, config.population, rng)
    history = []
    generations = config.generations if dims > 1 else 0
    with progress_bar(total=generations + 1, desc="blend search", unit="gen", enabled=progress) as bar:
        for index in range(generations + 1):
            scores, fresh = fitness(population)
            history.append(Generation(index, max(scores), float(np.mean(scores)), fresh))
            bar.set_postfix(best=f"{max(scores):.4f}")
            bar.update()
            if index < generations:
                population = _next_generation(population, scores, config, rng)
    best, best_fitness = max(cache.values(), key=lambda item: item[1])
    log.info("blend search: best fitness %.4f after %d evaluations", best_fitness, len(cache))
    return SearchResult(best, best_fitness, history, list(cache.values()))


def _next_generation(
    population: list[np.ndarray], scores: list[float], config: SearchConfig, rng: np.random.Generator
) -> list[np.ndarray]:
    order = sorted(range(len(population)), key=lambda i: (-scores[i], i))
    children = [population[i] for i in order[: config.elite]]
    size = len(population)

    def pick() -> np.ndarray:
        entrants = rng.integers(0, size, size=config.tournament)
        return population[min(entrants, key=lambda i: (-scores[i], i))]

    while len(children) < size:
        first, second = pick(), pick()
        if rng.random() < config.crossover_rate:
            share = rng.random()
            child = share * first + (1.0 - share) * second
        else:
            child = first.copy()
        mutate = rng.random(child.size) < config.mutation_rate
        child = child + mutate * rng.normal(0.0, config.mutation_scale, child.size)
        children.append(canonical(child))
    return children
