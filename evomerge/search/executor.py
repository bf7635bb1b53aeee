"""Executors: where a run's jobs are answered.

Every model the run asks questions is one :class:`Job`:

- ``evaluate``: merge a genome, answer its anchors (an adaptive test runs all its rounds where
  the job runs), estimate -> the candidate's ``evaluations.jsonl`` record;
- ``sharpen``: ask a candidate more items up to a racing / final stage -> its ``racing.jsonl`` line;
- ``calibrate``: a calibration model's answers to every search item;
- ``heldout``: an endpoint's, a default merge's or a finalist's held-out accuracy.

:func:`run_job` answers one job with a :class:`~evomerge.search.context.SearchContext`; an
executor runs a list of jobs and hands each result to the driver's ``on_result`` as it
arrives (completion order); the driver — and only the driver — writes it to the log. Results
are also returned in job order, so the driver tells the optimizer in member order.

- :class:`LocalExecutor` (``executor.kind: local``, the default): the jobs one after another
  in this process, on the driver's evaluator — the behaviour of a run before executors.
- :class:`evomerge.search.ray_pool.RayExecutor` (``executor.kind: ray``): a pool of Ray
  workers, each an actor with its own resident evaluator.

The run picks one with :func:`evomerge.search.loop.make_executor`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from evomerge.search.fitness import bits, evaluate_candidate, sharpen

EVALUATE, SHARPEN, CALIBRATE, HELDOUT = "evaluate", "sharpen", "calibrate", "heldout"


@dataclass(frozen=True)
class Job:
    """One model to question. ``key`` names its result in its log (an evaluation's index, a
    racing line's (index, stage, phase), a calibration or held-out model's name)."""

    kind: str
    key: Any
    args: dict = field(default_factory=dict)


def evaluate_job(genome, generation: int, member: int, index: int) -> Job:
    return Job(EVALUATE, index, {"genome": [float(v) for v in genome], "generation": generation,
                                 "member": member, "index": index})


def sharpen_job(rec: dict, stage: int, phase: str) -> Job:
    return Job(SHARPEN, (int(rec["index"]), int(stage), phase), {"rec": rec, "stage": stage, "phase": phase})


def calibrate_job(name: str, genome: list | None) -> Job:
    return Job(CALIBRATE, name, {"name": name, "genome": genome})


def heldout_job(name: str, kind: str, what) -> Job:
    """``kind``: endpoint (``what``: its ref), baseline (a resolved recipe) or candidate (a record)."""
    return Job(HELDOUT, name, {"kind": kind, "what": what})


def run_job(ctx, job: Job) -> dict:
    """Answer ``job`` with ``ctx``'s evaluator (here or in a worker)."""
    a = job.args
    if job.kind == EVALUATE:
        return evaluate_candidate(ctx, np.asarray(a["genome"]), a["generation"], a["member"], a["index"])
    if job.kind == SHARPEN:
        return sharpen(ctx, a["rec"], a["stage"], a["phase"])
    if job.kind == CALIBRATE:
        t0 = time.perf_counter()
        if a["genome"] is None:
            ctx.apply_endpoint(a["name"])
        else:
            ctx.apply_genome(np.asarray(a["genome"]))
        answers = {t: bits(ctx.answer(t, "search")) for t in ctx.tasks}
        return {"answers": answers, "seconds": round(time.perf_counter() - t0, 3)}
    if job.kind == HELDOUT:
        kind, what = a["kind"], a["what"]
        if kind == "endpoint":
            ctx.apply_endpoint(what)
        elif kind == "baseline":
            ctx.evaluator.apply_recipe(what)
        else:
            ctx.apply_genome(np.asarray(what["genome"]))
        return {"accuracy": {t: float(ctx.answer(t, "heldout").mean()) for t in ctx.tasks}}
    raise ValueError(f"unknown job kind {job.kind!r}")


OnResult = Callable[[Job, dict], None]


class Executor(Protocol):
    """Runs jobs; results reach ``on_result`` in completion order and are returned in job order."""

    workers: int

    def map(self, ctx, jobs: Sequence[Job], on_result: OnResult | None = None) -> list[dict]: ...

    def sync(self, ctx) -> None:
        """The banks and anchors ``ctx`` now holds are what every later job uses."""

    def stats(self) -> dict:
        """``{"workers": alive, "busy_s": job seconds so far, "jobs": jobs done}``."""

    def close(self) -> None: ...


class LocalExecutor:
    """The jobs one after another, in this process, on the context's own evaluator."""

    workers = 1

    def __init__(self) -> None:
        self.busy_s, self.jobs = 0.0, 0

    def map(self, ctx, jobs: Sequence[Job], on_result: OnResult | None = None) -> list[dict]:
        out = []
        for job in jobs:
            t0 = time.perf_counter()
            res = run_job(ctx, job)
            self.busy_s += time.perf_counter() - t0
            self.jobs += 1
            if on_result is not None:
                on_result(job, res)
            out.append(res)
        return out

    def sync(self, ctx) -> None:
        pass

    def stats(self) -> dict:
        return {"workers": 1, "busy_s": self.busy_s, "jobs": self.jobs}

    def close(self) -> None:
        pass


def utilisation(before: dict, after: dict, wall_s: float) -> str:
    """'2 workers, 93% busy' over an interval (stats before / after, its wall time)."""
    n = after["workers"]
    busy = (after["busy_s"] - before["busy_s"]) / max(wall_s * max(n, 1), 1e-9)
    return f"{n} worker{'s' if n != 1 else ''} {min(busy, 1.0):4.0%} busy / {max(0.0, 1 - busy):4.0%} idle"
