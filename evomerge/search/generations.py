"""Stage 5, the generations: ask / evaluate / race / tell, with replay from the log on resume.

Resume is by replay. The optimizer's state is a function of its seed and of the (genome,
fitness) pairs it was told, so a resumed run rebuilds it by asking and telling again, taking
each fitness from the evaluation log instead of evaluating; it checks that every replayed ask
equals the logged genome (a mismatch means the code or config changed under the run, and it
stops with a clear message rather than mixing two runs). Evaluations are appended to the log
(fsync) before the optimizer is told, so a kill at any instant loses at most the candidates
being evaluated at that moment, which are then evaluated again.
"""

from __future__ import annotations

import time

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.search.context import SearchContext
from evomerge.search.convergence import ConvergenceMonitor
from evomerge.search.executor import evaluate_job, utilisation
from evomerge.search.fitness import scalar_fitness
from evomerge.search.optimizers import make_optimizer
from evomerge.search.racing import RACE, line_key, plan_racing, race_generation, start
from evomerge.search.rundir import append_jsonl, read_jsonl


def run_generations(ctx: SearchContext, generations: int | None = None,
                    population: int | None = None) -> list[dict]:
    """Ask/evaluate/race/tell for ``optimizer.generations`` (fewer where the search converged
    and ``on_converge: stop``), replaying logged evaluations and racing stages first. Returns
    every candidate's record with its racing stages applied."""
    cfg, rd = ctx.cfg, ctx.rd
    n_obj = len(ctx.tasks) if cfg.fitness.aggregate == "per_task" else 1
    opt_cfg = cfg.optimizer.model_copy(update={
        "generations": generations or cfg.optimizer.generations,
        "population": population or cfg.optimizer.population})
    opt = make_optimizer(opt_cfg, ctx.space.dim, seed=cfg.seed,
                         x0=ctx.space.initial_genome(), n_objectives=n_obj)
    logged = {r["index"]: r for r in read_jsonl(rd.evaluations)}
    raced = {line_key(x): x for x in read_jsonl(rd.racing) if x.get("phase", RACE) == RACE}
    plan = plan_racing(ctx) if cfg.fitness.estimator != "full" else None
    monitor = ConvergenceMonitor(cfg.optimizer.patience)
    events: list[dict] = []
    records: list[dict] = []
    index, evaluated_now, t_start = 0, 0, time.perf_counter()
    n_gen = opt_cfg.generations
    ctx.log(f"search: {opt.name}, {ctx.space.dim} genes, population {opt.population}, "
            f"{n_gen} generations ({len(logged)} evaluations in the log)"
            + (f"; contenders within {plan.margin:.3f} of the best asked up to "
               f"{2 ** plan.stages}x the items" if plan and plan.stages else ""))
    for gen in range(n_gen):
        genomes = opt.ask_generation()
        t_gen, stats0 = time.perf_counter(), _stats(ctx)
        gen_recs: list = [None] * len(genomes)
        jobs = []
        for member, g in enumerate(genomes):
            rec = logged.get(index + member)
            if rec is None:  # exactly the members not in the log are dispatched
                jobs.append(evaluate_job(g, gen, member, index + member))
            elif rec["genome"] != [float(v) for v in g]:
                raise EvomergeError(
                    f"{rd.evaluations}: evaluation {index + member} was logged with another genome "
                    "than the optimizer proposes on replay; the run was made by a different "
                    "version or config. Start a new run (the log is left untouched).")
            else:
                gen_recs[member] = rec
        # the driver alone writes the log: each record as it arrives (completion order)
        for job, rec in zip(jobs, ctx.run_jobs(jobs, lambda _job, rec: append_jsonl(rd.evaluations, rec))):
            gen_recs[job.args["member"]] = rec
        evaluated_now += len(jobs)
        index += len(genomes)
        gen_recs = [start(r) for r in gen_recs]  # member order: the optimizer is told in it
        if plan and plan.stages:
            incumbent = max((scalar_fitness(r) for r in records), default=None)
            gen_recs = race_generation(ctx, plan, gen_recs, incumbent, raced,
                                       lambda line: append_jsonl(rd.racing, line))
        opt.tell_generation(genomes, [r["fitness"] for r in gen_recs])
        records += gen_recs
        gen_fit = [scalar_fitness(r) for r in gen_recs]
        best = max(scalar_fitness(r) for r in records)
        elapsed = time.perf_counter() - t_start
        rate = evaluated_now / elapsed * 60 if evaluated_now else 0.0
        left = (n_gen - gen - 1) * opt.population / (rate / 60) if rate else 0.0
        raced_now = sum(1 for r in gen_recs if r["stage"] > 0)
        ctx.log(f"gen {gen + 1:3d}/{n_gen}  best {best:.4f}  mean {np.mean(gen_fit):.4f}"
                + (f"  raced {raced_now}" if plan and plan.stages else "")
                + (f"  {rate:6.1f} cand/min  left {_fmt_time(left)}" if jobs else "  (replayed from the log)")
                + (f"  [{utilisation(stats0, _stats(ctx), time.perf_counter() - t_gen)}]" if jobs else ""))
        rd.set_state(stage="searching", generation=gen + 1)
        reason = monitor.update(max(gen_fit), opt)
        if reason and gen + 1 < n_gen and _on_converge(ctx, opt, monitor, gen, reason, events):
            break
    return records


def _stats(ctx: SearchContext) -> dict:
    ex = ctx.executor
    return ex.stats() if ex is not None else {"workers": 1, "busy_s": 0.0, "jobs": 0}


def _on_converge(ctx: SearchContext, opt, monitor, gen: int, reason: str, events: list[dict]) -> bool:
    """Act on convergence after generation ``gen`` as ``optimizer.on_converge`` says (recorded in
    ``events`` and state.json); True: stop the generations here."""
    action = ctx.cfg.optimizer.on_converge
    if action == "restart" and not hasattr(opt, "restart"):
        action = "continue"  # random search and Optuna's samplers have no restart
    if action == "continue" and getattr(monitor, "announced", False):
        return False  # said once
    event = {"generation": gen + 1, "reason": reason, "action": action}
    if action == "restart":
        event["action"] = opt.restart()
        monitor.reset()
    elif action == "continue":
        monitor.announced = True
        event["action"] = f"continuing ({ctx.cfg.optimizer.on_converge} not possible for {opt.name})" \
            if ctx.cfg.optimizer.on_converge == "restart" else "continuing (on_converge: continue)"
    else:
        event["action"] = "stopping the generations here (on_converge: stop)"
    ctx.log(f"  converged after generation {gen + 1} ({reason}); {event['action']}")
    events.append(event)
    ctx.rd.set_state(convergence=events)
    return action == "stop"


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
