"""Optimizers as ask/tell objects over the unit box [0, 1]^d.

Every optimizer here is deterministic given its seed and the sequence of (genome, fitness)
pairs it was told: that is what makes resume exact. The search loop asks one generation at a
time (``ask_generation``), evaluates every genome, then tells the whole generation
(``tell_generation``). On resume, the loop rebuilds the optimizer by replaying the log through
the same calls and checks that the replayed asks equal the logged genomes.

Fitness is always *maximised* (accuracy); the cmaes library minimises, so the sign flips here.
Multi-objective search (one objective per task) is Optuna's NSGA-II only.

``RandomSearch`` (``optimizer.name: random``) draws uniform genomes and learns nothing from
fitness: the baseline that says what the other optimizers' search is worth.
"""

from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np

from evomerge.errors import EvomergeError


def default_population(dim: int) -> int:
    """CMA-ES default population 4 + floor(3 ln d) (Hansen), as Sakana used."""
    return 4 + int(math.floor(3 * math.log(max(dim, 1))))


class CMAESOptimizer:
    """CMA-ES from the ``cmaes`` library, bounded to [0, 1]^d.

    ``separable=True`` (or ``"auto"`` with d > 40) uses sep-CMA-ES, whose diagonal covariance
    scales to hundreds of genes (per-layer recipes, dataflow genomes).
    """

    n_objectives = 1

    #: a step size below this (in gene units, genes in [0, 1]) proposes effectively one recipe
    MIN_STEP = 1e-3
    #: IPOP restarts double the population up to this many times the first one
    MAX_GROWTH = 4

    def __init__(self, dim: int, *, seed: int, population: int | None = None,
                 sigma0: float = 1 / 6, x0: Sequence[float] | None = None,
                 separable: bool | str = "auto"):
        self.dim = dim
        mean = np.full(dim, 0.5) if x0 is None else np.asarray(x0, dtype=float)
        if mean.shape != (dim,):
            raise EvomergeError(f"optimizer: x0 has {mean.size} values, the genome has {dim}")
        self._sep = (dim > 40) if separable == "auto" else bool(separable)
        self._seed, self._sigma0 = int(seed), float(sigma0)
        self.population = population or default_population(dim)
        self._first_population = self.population
        self.restarts = 0
        self._es = self._new_es(mean, seed)
        self.name = "sep-cmaes" if self._sep else "cmaes"

    def _new_es(self, mean: np.ndarray, seed: int):
        import cmaes

        cls = cmaes.SepCMA if self._sep else cmaes.CMA
        return cls(mean=mean, sigma=self._sigma0, bounds=np.array([[0.0, 1.0]] * self.dim), seed=seed,
                   population_size=self.population)

    def converged(self) -> str | None:
        """Why CMA-ES has converged (its own stop tests, or a step size below
        :attr:`MIN_STEP` on every gene), or None."""
        es = self._es
        spread = es._sigma * np.sqrt(np.diag(es._C) if np.ndim(es._C) == 2 else es._C)
        if np.all(spread < self.MIN_STEP):
            return f"step size collapsed (largest {float(spread.max()):.1e} < {self.MIN_STEP:g} per gene)"
        if es.should_stop():
            return "CMA-ES stop test (fitness range or step size collapsed)"
        return None

    def restart(self) -> str:
        """IPOP restart: a new CMA-ES from a seeded random point of the box, the initial step
        size and twice the population (at most :attr:`MAX_GROWTH` times the first one).
        Deterministic, so a replay restarts identically. Returns a description."""
        self.restarts += 1
        rng = np.random.default_rng([self._seed, 31337, self.restarts])
        self.population = min(self.population * 2, self._first_population * self.MAX_GROWTH)
        self._es = self._new_es(rng.uniform(0.0, 1.0, self.dim), self._seed + self.restarts)
        return f"restart {self.restarts}: CMA-ES from a new random point, population {self.population}"

    def ask_generation(self) -> list[np.ndarray]:
        return [np.asarray(self._es.ask(), dtype=float) for _ in range(self.population)]

    def tell_generation(self, genomes: list[np.ndarray], fitnesses: list) -> None:
        self._es.tell([(np.asarray(g, dtype=float), -float(f)) for g, f in zip(genomes, fitnesses)])


class RandomSearch:
    """Uniform random genomes in [0, 1]^d, ``population`` per generation; single objective.

    The stream of genomes depends only on the seed (numpy ``default_rng([seed, 4242])``), not
    on the fitness told, so a replay asks exactly the logged genomes.
    """

    n_objectives = 1

    def __init__(self, dim: int, *, seed: int, population: int | None = None):
        self.dim = dim
        self.population = population or default_population(dim)
        self._rng = np.random.default_rng([int(seed), 4242])
        self.name = "random"
        self.told = 0

    def ask_generation(self) -> list[np.ndarray]:
        return [self._rng.random(self.dim) for _ in range(self.population)]

    def tell_generation(self, genomes: list[np.ndarray], fitnesses: list) -> None:
        if len(genomes) != len(fitnesses):
            raise EvomergeError(f"optimizer: told {len(genomes)} genomes and {len(fitnesses)} "
                                "fitness values")
        self.told += len(genomes)


class OptunaOptimizer:
    """Optuna's ask/tell interface with a CmaEs, TPE or NSGA-II sampler over [0, 1]^d.

    One generation = ``population`` trials asked, evaluated, then told in order. NSGA-II with
    ``n_objectives > 1`` gives a Pareto front (one objective per task).
    """

    def __init__(self, dim: int, *, seed: int, sampler: str = "cmaes", population: int | None = None,
                 sigma0: float = 1 / 6, x0: Sequence[float] | None = None, n_objectives: int = 1):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.dim = dim
        self.n_objectives = n_objectives
        self.population = population or default_population(dim)
        x0 = [0.5] * dim if x0 is None else list(map(float, x0))
        if sampler == "cmaes":
            if n_objectives > 1:
                raise EvomergeError("optimizer.sampler: cmaes is single-objective; use nsga2 "
                                    "for fitness.aggregate: per_task")
            # Optuna's defaults are the box centre and range/6 (deprecated as arguments in
            # 4.9): pass them only when the config asks for something else.
            extra = {}
            if any(v != 0.5 for v in x0):
                extra["x0"] = {self._gene(i): x0[i] for i in range(dim)}
            if abs(sigma0 - 1 / 6) > 1e-12:
                extra["sigma0"] = sigma0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                s = optuna.samplers.CmaEsSampler(seed=seed, popsize=self.population,
                                                 n_startup_trials=0,
                                                 warn_independent_sampling=False, **extra)
        elif sampler == "tpe":
            if n_objectives > 1:
                s = optuna.samplers.TPESampler(seed=seed, multivariate=True)
            else:
                s = optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                               n_startup_trials=self.population)
        elif sampler == "nsga2":
            s = optuna.samplers.NSGAIISampler(seed=seed, population_size=self.population)
        else:
            raise EvomergeError(f"optimizer.sampler: unknown sampler {sampler!r}; "
                                "use cmaes, tpe or nsga2")
        self.name = f"optuna-{sampler}"
        directions = ["maximize"] * n_objectives
        self._study = optuna.create_study(sampler=s, directions=directions)
        self._dists = {self._gene(i): optuna.distributions.FloatDistribution(0.0, 1.0)
                       for i in range(dim)}
        self._pending: list = []

    @staticmethod
    def _gene(i: int) -> str:
        return f"g{i:04d}"

    def ask_generation(self) -> list[np.ndarray]:
        self._pending = [self._study.ask(self._dists) for _ in range(self.population)]
        return [np.array([t.params[self._gene(i)] for i in range(self.dim)], dtype=float)
                for t in self._pending]

    def tell_generation(self, genomes: list[np.ndarray], fitnesses: list) -> None:
        for trial, f in zip(self._pending, fitnesses):
            value = [float(v) for v in f] if self.n_objectives > 1 else float(f)
            self._study.tell(trial, value)
        self._pending = []


def make_optimizer(cfg, dim: int, *, seed: int, x0=None, n_objectives: int = 1):
    """Build the optimizer named by an ``OptimizerConfig``."""
    if cfg.name == "random":
        if n_objectives > 1:
            raise EvomergeError("optimizer.name: random is single-objective; use optimizer.name: "
                                "optuna with sampler: nsga2 for fitness.aggregate: per_task")
        return RandomSearch(dim, seed=seed, population=cfg.population)
    if cfg.name == "cmaes":
        if n_objectives > 1:
            raise EvomergeError("optimizer.name: cmaes is single-objective; use optimizer.name: "
                                "optuna with sampler: nsga2 for fitness.aggregate: per_task")
        return CMAESOptimizer(dim, seed=seed, population=cfg.population, sigma0=cfg.sigma0,
                              x0=x0, separable=cfg.separable)
    return OptunaOptimizer(dim, seed=seed, sampler=cfg.sampler, population=cfg.population,
                           sigma0=cfg.sigma0, x0=x0, n_objectives=n_objectives)
