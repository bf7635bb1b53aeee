"""Fitness: a candidate's answers to a few items -> estimated full accuracy per task -> one number.

A candidate is first asked ``fitness.anchors`` items per task (the run's anchors, or an adaptive
test in ``fitness.rounds`` rounds). :func:`sharpen` asks a contender more items — the estimate
of a candidate close to the best sharpens while the rest stay cheap (see
:mod:`evomerge.search.racing`). Every function here takes the run's ``SearchContext`` (the
evaluator, the tasks, the banks and anchors) and returns plain log records.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from evomerge.errors import EvomergeError

if TYPE_CHECKING:  # pragma: no cover
    from evomerge.config import RunConfig
    from evomerge.search.context import SearchContext

#: estimators whose estimate stays unbiased when the items asked were chosen from the answers
ADAPTIVE_ESTIMATORS = ("pirt", "mpirt")
#: rounds in which a sharpening stage asks its extra items (each picked from the answers so far)
SHARPEN_ROUNDS = 2


def bits(a) -> str:
    """0/1 answers as the string the run's logs store."""
    return "".join("1" if v else "0" for v in np.asarray(a).ravel())


def unbits(s: str) -> np.ndarray:
    return np.frombuffer(s.encode(), dtype=np.uint8).astype(np.int8) - ord("0")


def first_round_size(cfg: RunConfig, n_items: int, rounds: int | None = None) -> int:
    """Items in the fixed anchor set: all anchors, or round 1 of an adaptive test of ``rounds``
    rounds (default ``fitness.rounds``)."""
    from irt.adaptive import round_sizes

    n = min(cfg.fitness.anchors, n_items)
    return round_sizes(n, cfg.fitness.rounds if rounds is None else rounds)[0]


def endpoint_refs(cfg: RunConfig) -> list[str]:
    return ["base", *cfg.models.endpoints]


def procedure_of(cfg: RunConfig, bank=None):
    """The few-item procedure (:class:`irt.Procedure`) of a task: the config's, or with
    ``fitness.estimator: auto`` the one chosen on the calibration models and recorded in the
    task's bank (``bank.meta["procedure"]``, see :mod:`evomerge.search.banks`) -- a resumed run
    reads it back, never chooses again."""
    from irt.choose import Procedure

    fit = cfg.fitness
    if fit.estimator != "auto":
        return Procedure(fit.estimator, fit.anchor_method, fit.rounds, cfg.calibration.dim)
    p = bank.meta["procedure"]
    return Procedure(p["estimator"], p["anchor_method"], int(p["rounds"]), p.get("dim"))


def task_procedure(ctx: SearchContext, task: str):
    """:func:`procedure_of` the run's bank for ``task``."""
    return procedure_of(ctx.cfg, ctx.banks.get(task))


def can_sharpen(cfg: RunConfig) -> bool:
    """Whether candidates may be asked adaptively chosen extra items (racing, sharpened
    finalists): the estimator is pirt / mpirt, or auto (each task then sharpens with
    :func:`sharpen_estimator`)."""
    return cfg.fitness.estimator in (*ADAPTIVE_ESTIMATORS, "auto")


def sharpen_estimator(ctx: SearchContext, task: str) -> str:
    """The estimator of a sharpened (adaptively extended) estimate on ``task``: the task's own
    where it stays unbiased on adaptively chosen items, else mp-IRT (p-IRT where the bank lacks
    the endpoints)."""
    est = task_procedure(ctx, task).estimator
    if est in ADAPTIVE_ESTIMATORS:
        return est
    names = set(ctx.banks[task].subject_names)
    return "mpirt" if set(endpoint_refs(ctx.cfg)) <= names else "pirt"


def _endpoint_theta(ctx: SearchContext, task: str, est: str | None = None):
    est = task_procedure(ctx, task).estimator if est is None else est
    return ctx.banks[task].subject_theta(endpoint_refs(ctx.cfg)) if est in ("mpirt", "gmpirt") else None


def estimate_task(ctx: SearchContext, task: str, answers: np.ndarray) -> float:
    """Estimated full accuracy of ``task`` from the anchor answers (or exact, for 'full')."""
    if ctx.cfg.fitness.estimator == "full":
        return float(answers.mean())
    import irt

    est = task_procedure(ctx, task).estimator
    return float(irt.estimate_accuracy(est, ctx.banks[task], ctx.anchors[task], anchor_answers=answers,
                                       endpoint_theta=_endpoint_theta(ctx, task, est)))


def adaptive_task(ctx: SearchContext, task: str) -> tuple[list[int], np.ndarray, float]:
    """An adaptive test on ``task`` (``fitness.rounds`` > 1): round 1 = the run's anchors, later
    rounds chosen from the candidate's answers so far (:func:`irt.adaptive.run_adaptive`).
    Returns (asked positions in the task's search items, answers in that order, estimate)."""
    import irt
    from irt.adaptive import run_adaptive

    cfg = ctx.cfg
    bank = ctx.banks[task]
    proc = task_procedure(ctx, task)
    items = ctx.tasks[task].search.items
    to_task = ctx.bank_to_task(task)  # bank position -> position in the task's items
    try:
        res = run_adaptive(bank, lambda pos: ctx.answer(task, "search", to_task[pos]),
                           n=min(cfg.fitness.anchors, len(items)), rounds=proc.rounds,
                           first=ctx.anchors[task].idx, estimator=proc.estimator,
                           endpoint_theta=_endpoint_theta(ctx, task, proc.estimator),
                           candidates=np.flatnonzero(to_task >= 0))
    except irt.IRTError as exc:
        raise EvomergeError(f"task {task!r}: {exc}") from None
    return [int(p) for p in to_task[res.asked]], res.answers.astype(np.int8), float(res.estimate)


def combine(cfg: RunConfig, estimates: dict[str, float]):
    """The fitness of per-task estimates: their mean, or the list (``aggregate: per_task``)."""
    values = [estimates[t] for t in estimates]
    return values if cfg.fitness.aggregate == "per_task" else float(np.mean(values))


def evaluate_candidate(ctx: SearchContext, genome: np.ndarray, generation: int, member: int,
                       index: int) -> dict:
    """Merge in memory, answer the anchors, estimate, return the log record."""
    t0, c0 = time.perf_counter(), time.process_time()
    recipe = ctx.apply_genome(genome)
    t1 = time.perf_counter()
    answers, estimates, asked = {}, {}, {}
    for task in ctx.tasks:
        if ctx.cfg.fitness.estimator != "full" and task_procedure(ctx, task).rounds > 1:
            asked[task], a, estimates[task] = adaptive_task(ctx, task)
        else:
            idx = None if ctx.cfg.fitness.estimator == "full" else ctx.anchor_positions[task]
            a = ctx.answer(task, "search", idx)
            estimates[task] = estimate_task(ctx, task, a)
        answers[task] = bits(a)
    t2 = time.perf_counter()
    return {"index": index, "generation": generation, "member": member,
            "genome": [float(v) for v in genome], "recipe": recipe, "answers": answers,
            **({"asked": asked} if asked else {}), "estimates": estimates,
            "fitness": combine(ctx.cfg, estimates),
            "items": int(sum(len(a) for a in answers.values())),
            "timings": {"merge_s": round(t1 - t0, 4), "eval_s": round(t2 - t1, 4),
                        "cpu_s": round(time.process_time() - c0, 4)}}


def scalar_fitness(rec: dict) -> float:
    f = rec["fitness"]
    return float(np.mean(f)) if isinstance(f, list) else float(f)


def asked_positions(ctx: SearchContext, rec: dict, task: str) -> list[int]:
    """Positions (in the task's search items) of the items ``rec`` answered, in the asked order."""
    if "asked" in rec and task in rec["asked"]:
        return list(rec["asked"][task])
    return [int(p) for p in ctx.anchor_positions[task]]


def stage_items(ctx: SearchContext, task: str, stage: int) -> int:
    """Items a candidate has answered on ``task`` after sharpening stage ``stage`` (0: the
    first evaluation): the first evaluation's count doubled per stage, at most every item."""
    n_task = len(ctx.tasks[task].search.items)
    return min(n_task, min(ctx.cfg.fitness.anchors, n_task) * 2 ** stage)


def sharpen(ctx: SearchContext, rec: dict, stage: int, phase: str) -> dict:
    """Ask candidate ``rec`` (its latest answers) more items, up to :func:`stage_items` of
    ``stage`` per task, chosen from its answers so far (:func:`irt.next_items`), and re-estimate.
    Returns the line for ``racing.jsonl``: cumulative asked positions and answers per task, the
    estimates, the fitness. The evaluator must be free: the candidate's model is applied here."""
    import irt
    from irt.adaptive import round_sizes

    t0 = time.perf_counter()
    ctx.apply_genome(np.asarray(rec["genome"]))
    t1 = time.perf_counter()
    asked_out, answers_out, estimates = {}, {}, {}
    for task in ctx.tasks:
        bank = ctx.banks[task]
        to_task = ctx.bank_to_task(task)
        to_bank = np.full(len(ctx.tasks[task].search.items), -1, dtype=np.int64)
        to_bank[to_task[to_task >= 0]] = np.flatnonzero(to_task >= 0)
        asked = np.asarray(asked_positions(ctx, rec, task), dtype=np.int64)
        answers = unbits(rec["answers"][task]).astype(np.float64)
        asked_b = to_bank[asked]
        more = stage_items(ctx, task, stage) - asked.size
        try:
            if more > 0:
                for k in round_sizes(more, min(SHARPEN_ROUNDS, more)):
                    new = irt.next_items(bank, asked_b, answers, k, candidates=np.flatnonzero(to_task >= 0))
                    got = ctx.answer(task, "search", to_task[new])
                    asked_b = np.concatenate([asked_b, new])
                    answers = np.concatenate([answers, got.astype(np.float64)])
            est_name = sharpen_estimator(ctx, task)
            est = irt.estimate_accuracy(est_name, bank, asked_b, None, answers,
                                        endpoint_theta=_endpoint_theta(ctx, task, est_name))
        except irt.IRTError as exc:
            raise EvomergeError(f"task {task!r}: {exc}") from None
        asked_out[task] = [int(p) for p in to_task[asked_b]]
        answers_out[task] = bits(answers.astype(np.int8))
        estimates[task] = float(est)
    t2 = time.perf_counter()
    return {"index": rec["index"], "stage": stage, "phase": phase, "asked": asked_out,
            "answers": answers_out, "estimates": estimates, "fitness": combine(ctx.cfg, estimates),
            "items": int(sum(len(a) for a in answers_out.values())),
            "timings": {"merge_s": round(t1 - t0, 4), "eval_s": round(t2 - t1, 4)}}


def expected_error(ctx: SearchContext, items: dict[str, int]) -> float | None:
    """Expected absolute error of a fitness estimated from ``items`` answers per task, from the
    banks' estimate checks (cross-fitted on the calibration models at ``fitness.anchors`` items),
    scaled by √(n_check / n); None where a bank has no check. For ``aggregate: mean`` the tasks'
    errors combine as independent: √(Σ e²) / T."""
    errs = []
    for task, n in items.items():
        check = ctx.banks[task].meta.get("estimate_check") if task in ctx.banks else None
        if not check or n <= 0:
            return None
        errs.append(float(check["mae"]) * float(np.sqrt(check["n"] / n)))
    if not errs:
        return None
    return float(np.sqrt(np.sum(np.square(errs))) / len(errs))


def record_items(ctx: SearchContext, rec: dict) -> dict[str, int]:
    """Items ``rec`` answered per task."""
    return {t: len(rec["answers"][t]) for t in ctx.tasks}
