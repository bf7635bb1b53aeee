"""Racing: the item budget follows the contest.

Every candidate is first asked ``fitness.anchors`` items per task (stage 0, in
``evaluations.jsonl``). Once a whole generation is evaluated, its *contenders* — candidates whose
estimate is within a margin of the best so far (this generation's or any earlier one's) — are
asked more items: stage s doubles a contender's items per task (20 → 40 → 80 at the defaults),
chosen from its own answers (:func:`evomerge.search.fitness.sharpen`), and only the candidates
still within the (shrinking) margin go on to the next stage — successive halving against the
incumbent, with at most half the generation at stage 1, a quarter at stage 2, ... (best first),
so a converged population of near-ties costs at most twice the items. The rest stay cheap. The optimizer is then told the sharpened estimates, so ties
between near-copies are broken by more answers instead of by order.

The margin at stage 0 is ``fitness.racing.margin`` (``auto``: twice the expected error of a
stage-0 fitness, from the banks' cross-fitted estimate check; 0.02 without one) and shrinks
with the items asked, as the error does: ``margin / √(2^s)`` for a candidate at stage s.

Every stage is one line in ``racing.jsonl`` (``phase: race``): the candidate's index, the stage,
its cumulative asked items and answers per task, the estimates and the fitness. A candidate's
current view is its evaluation record with its latest line applied (:func:`apply_lines`).
Decisions depend only on logged values in generation order, so a resumed run replays them and
re-asks exactly the stages that are not logged. The end of the run adds ``phase: final`` lines
(:mod:`evomerge.search.selection`); they never enter the replay of the generations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from evomerge.search.executor import sharpen_job
from evomerge.search.fitness import can_sharpen, expected_error, scalar_fitness

RACE, FINAL = "race", "final"
DEFAULT_MARGIN = 0.02


@dataclass(frozen=True)
class RacingPlan:
    """Resolved racing settings of a run: ``stages`` (0 = off) and the stage-0 ``margin``."""

    stages: int
    margin: float

    def margin_at(self, stage: int) -> float:
        return self.margin / math.sqrt(2 ** stage)


def racing_stages(cfg) -> int:
    """Sharpening stages of a run: ``fitness.racing.stages``, or the default (2) where the
    estimator allows adaptively chosen items (pirt, mpirt, auto), else 0."""
    fit = cfg.fitness
    if not can_sharpen(cfg):
        return 0
    return 2 if fit.racing.stages is None else int(fit.racing.stages)


def plan_racing(ctx) -> RacingPlan:
    """The run's :class:`RacingPlan`; the auto margin comes from the banks' estimate checks."""
    stages = racing_stages(ctx.cfg)
    margin = ctx.cfg.fitness.racing.margin
    if margin == "auto":
        n0 = {t: min(ctx.cfg.fitness.anchors, len(p.search.items)) for t, p in ctx.tasks.items()}
        err = expected_error(ctx, n0) if stages else None
        margin = DEFAULT_MARGIN if err is None else 2.0 * err
    return RacingPlan(stages, float(margin))


def line_key(line: dict) -> tuple[int, int, str]:
    return int(line["index"]), int(line["stage"]), line.get("phase", RACE)


def start(rec: dict) -> dict:
    """An evaluation record as stage 0 of its race: ``stage`` 0 and the history ``stages``."""
    if "stages" in rec:
        return rec
    return dict(rec, stage=0, stages=[{"stage": 0, "items": rec["items"], "fitness": rec["fitness"]}])


def advance(rec: dict, line: dict) -> dict:
    """``rec`` after the sharpening ``line``: its cumulative answers, asked items, estimates and
    fitness, its ``stage``, and the stage appended to its history ``stages``."""
    rec = start(rec)
    out = dict(rec, **{k: line[k] for k in ("asked", "answers", "estimates", "fitness", "items")})
    out["stage"] = int(line["stage"])
    out["stages"] = rec["stages"] + [{"stage": int(line["stage"]), "items": line["items"],
                                      "fitness": line["fitness"], "phase": line.get("phase", RACE)}]
    return out


def apply_lines(rec: dict, lines: list[dict]) -> dict:
    """``rec`` (an evaluation record) as its sharpening ``lines`` left it, lowest stage first."""
    out = start(rec)
    for line in sorted(lines, key=lambda x: int(x["stage"])):
        out = advance(out, line)
    return out


def merged_records(evaluations: list[dict], racing: list[dict], phases=(RACE, FINAL)) -> list[dict]:
    """Every evaluation record with its racing lines (of ``phases``) applied."""
    by_index: dict[int, list[dict]] = {}
    for line in racing:
        if line.get("phase", RACE) in phases:
            by_index.setdefault(int(line["index"]), []).append(line)
    return [apply_lines(r, by_index.get(int(r["index"]), [])) for r in evaluations]


def race_generation(ctx, plan: RacingPlan, generation: list[dict], incumbent: float | None,
                    logged: dict, append: Callable[[dict], None]) -> list[dict]:
    """Sharpen the contenders of one evaluated ``generation`` (records with their racing lines
    applied) stage by stage; returns the records as they end. ``incumbent``: the best fitness
    of earlier generations. ``logged``: racing lines already in the log, by :func:`line_key`
    (replayed instead of asked); ``append`` makes a new line durable."""
    recs = [start(r) for r in generation]
    for stage in range(1, plan.stages + 1):
        best = max([scalar_fitness(r) for r in recs] + ([incumbent] if incumbent is not None else []))
        cut = best - plan.margin_at(stage - 1)
        within = [i for i, r in enumerate(recs) if r.get("stage", 0) == stage - 1 and scalar_fitness(r) >= cut]
        # successive halving: at most 1/2^stage of the generation goes on (best first, earliest on ties)
        within = sorted(within, key=lambda i: (-scalar_fitness(recs[i]), recs[i]["index"]))
        go_on = sorted(within[: max(1, math.ceil(len(recs) / 2 ** stage))])
        lines = {i: logged.get((int(recs[i]["index"]), stage, RACE)) for i in go_on}
        # the stage's missing lines are independent jobs: answered on the executor, each written as it arrives
        todo = [i for i in go_on if lines[i] is None]
        got = ctx.run_jobs([sharpen_job(recs[i], stage, RACE) for i in todo], lambda _job, line: append(line))
        lines.update(zip(todo, got))
        for i in go_on:
            recs[i] = advance(recs[i], lines[i])
    return recs
