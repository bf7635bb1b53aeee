"""``evomerge search --check``: every check a new run makes before it starts, a trial of the
prompts (the base and each endpoint answer a few search items of every task, shown side by side
with the references), then the plan — what the run will answer and about how long it will
take — written nowhere."""

from __future__ import annotations

import time

from evomerge.config import RunConfig
from evomerge.search.context import build_context, SearchContext
from evomerge.search.inputs import _check_given_banks, check_task_splits, check_tasks_fit_fitness
from evomerge.search.optimizers import default_population
from evomerge.search.racing import racing_stages
from evomerge.search.rundir import RunDir, target_run_dir
from evomerge.search.selection import final_stage


#: search items of each task that the base and every endpoint answer in the trial
TRIAL_ITEMS = 8
#: of which shown side by side (the base's answers)
TRIAL_SHOWN = 2


def check_run(cfg: RunConfig, *, run_dir: str | None = None, log=print, trial_items: int = TRIAL_ITEMS) -> list[str]:
    """Everything a new run checks before it starts (config, models and their vocabularies,
    tasks, devices, the run directory), a trial of the prompts on ``trial_items`` search items
    per task (0: none), then the plan — what the run will answer, and the time it should take —
    as lines (also logged). Writes nothing."""
    target = target_run_dir(cfg, run_dir)
    _check_given_banks(cfg)
    ctx = build_context(cfg, None, log=lambda *_: None)
    try:
        trial, seconds = try_prompts(ctx, trial_items) if trial_items > 0 else ([], None)
        for line in trial:
            log(line)
        return trial + _plan_lines(cfg, ctx, target, log, seconds)
    finally:
        ctx.evaluator.close()


def _short(text, width: int = 72) -> str:
    r = repr(text)
    return r if len(r) <= width else r[:width - 4] + "...'"


def try_prompts(ctx: SearchContext, n: int = TRIAL_ITEMS) -> tuple[list[str], dict]:
    """The base and every endpoint answer the first ``n`` search items of each task, as the run
    will ask them. Returns lines — per task the score of each model, the base's first answers
    side by side with the references, a warning where no model gets any item right — and the
    timings: seconds per item answered, per task, and per model loaded into the evaluator."""
    models = ["base", *ctx.cfg.models.endpoints]
    right: dict[str, dict[str, int]] = {t: {} for t in ctx.tasks}
    shown: dict[str, list[dict]] = {}
    call_s: dict[str, list[float]] = {t: [] for t in ctx.tasks}
    load_s = []
    for ref in models:
        t0 = time.perf_counter()
        ctx.apply_endpoint(ref)
        load_s.append(time.perf_counter() - t0)
        for t, pair in ctx.tasks.items():
            items = pair.search.items[:n]
            t0 = time.perf_counter()
            trace = pair.search.trace(ctx.evaluator, items)
            call_s[t].append(time.perf_counter() - t0)
            right[t][ref] = sum(x["correct"] for x in trace)
            if ref == "base":
                shown[t] = list(zip(items, trace))[:TRIAL_SHOWN]
    lines = [f"trial: the base and {len(models) - 1} endpoints answer the first {n} search items of each task "
             "(as the run asks them: greedy, no chat template)"]
    for t, pair in ctx.tasks.items():
        k = min(n, len(pair.search.items))
        lines.append(f"  task {t}: right of {k} — " + ", ".join(f"{_name(r)} {right[t][r]}" for r in models))
        for item, x in shown[t]:
            lines += [f"    base, item {item.id}:", f"      prompt     {_short(x['prompt'])}",
                      f"      output     {_short(x['output'])}",
                      f"      extracted  {_short(x['extracted'])}   reference {_short(x['reference'])}   "
                      + ("right" if x["correct"] else "wrong")]
        if not any(right[t].values()):
            lines.append(f"warning: task {t!r}: no model answered any of its first {k} search items right; check "
                         f"its template, extract mode ({pair.search.extract}) and max_new_tokens "
                         f"({pair.search.max_new_tokens}) against the outputs above")
    # one full batch per task (the last model is still loaded): the per-item speed of calibration
    # and held-out evaluation, which answer whole batches
    batch_s = {}
    for t, pair in ctx.tasks.items():
        items = pair.search.items[:max(ctx.cfg.evaluator.batch_size, n)]
        t0 = time.perf_counter()
        pair.search.answer(ctx.evaluator, items)
        batch_s[t] = (time.perf_counter() - t0) / max(len(items), 1)
    seconds = {"call": {t: sum(v) / len(v) for t, v in call_s.items()}, "item": batch_s,
               "load": sum(load_s) / len(load_s), "n": n}
    return lines, seconds


def _name(ref: str) -> str:
    return ref if ref == "base" or ref.startswith("zoo:") else ref.rstrip("/").rsplit("/", 1)[-1]


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def _time_line(cfg: RunConfig, ctx: SearchContext, seconds: dict, n_calib: int, cands: int, n_models: int) -> str:
    """The run's duration estimated from the trial's timings: calibration and held-out answers at
    the speed of a full batch, a candidate's at the speed of the trial's small calls (one per
    round), plus one model load per model."""
    s_item, s_call, s_load, n = seconds["item"], seconds["call"], seconds["load"], seconds["n"]
    fit = cfg.fitness
    calib = 0.0
    if fit.estimator != "full" and cfg.calibration.banks is None:
        calib = n_calib * (s_load + sum(s_item[t] * len(p.search.items) for t, p in ctx.tasks.items()))
    if fit.estimator == "full":
        per_cand = sum(s_item[t] * len(p.search.items) for t, p in ctx.tasks.items())
    else:  # `rounds` calls of anchors/rounds items each
        per_round = {t: min(fit.anchors, len(p.search.items)) / fit.rounds for t, p in ctx.tasks.items()}
        per_cand = sum(fit.rounds * s_call[t] * max(1.0, per_round[t] / n) for t in ctx.tasks)
    search = cands * (s_load + per_cand)
    held = n_models * (s_load + sum(s_item[t] * len(p.heldout.items) for t, p in ctx.tasks.items()))
    return (f"time (estimated from the trial): calibration ~{_duration(calib)}, search ~{_duration(search)} "
            f"(before racing), held-out ~{_duration(held)}; about {_duration(calib + search + held)} in all")


def _plan_lines(cfg: RunConfig, ctx: SearchContext, target: RunDir, log, seconds: dict | None = None) -> list[str]:
    fit, ss, ev = cfg.fitness, cfg.search_space, cfg.evaluator
    n_search = {t: len(p.search.items) for t, p in ctx.tasks.items()}
    n_held = {t: len(p.heldout.items) for t, p in ctx.tasks.items()}
    K = len(cfg.models.endpoints)
    pop = cfg.optimizer.population or default_population(ctx.space.dim)
    cands = pop * cfg.optimizer.generations
    per_cand = sum(n_search.values()) if fit.estimator == "full" else sum(min(fit.anchors, n) for n in n_search.values())
    calibrate = fit.estimator != "full" and cfg.calibration.banks is None
    n_calib = 1 + K + cfg.calibration.samples
    params = ctx.evaluator.num_parameters
    lines = [
        f"config OK; the run would write to {target.root}",
        f"models: base {ctx.base_path} ({params / 1e6:.1f}M parameters) + {K} endpoints"
        + (", rows mapped onto the base's vocabulary" if cfg.models.tokenizer_source else ""),
        "tasks: " + ", ".join(f"{t} ({n_search[t]} search / {n_held[t]} held-out items)" for t in ctx.tasks),
        f"devices: evaluation {ev.device} ({ev.backend}), sources on {ev.merge_device or ev.device}, merging on "
        f"{ev.merge_compute or ev.merge_device or ev.device}",
        (f"calibration: {n_calib} models × {sum(n_search.values())} items = {n_calib * sum(n_search.values()):,} answers"
         if calibrate else "calibration: none" + (" (banks from calibration.banks)" if fit.estimator != "full" else "")),
        f"search: {ss.kind} / {ss.method if ss.kind != 'dataflow' else 'layer dataflow'}, {ctx.space.dim} genes, "
        f"{cfg.optimizer.name}, population {pop} × {cfg.optimizer.generations} generations = {cands} candidates × "
        f"{per_cand} items = {cands * per_cand:,} answers"
        + (" (the estimator, anchors and rounds of each task chosen after calibration: estimator auto)"
           if fit.estimator == "auto" else
           f" (asked in {fit.rounds} rounds)" if fit.rounds > 1 and fit.estimator != "full" else ""),
    ]
    lines.append(_contest_plan(cfg))
    ex = cfg.executor
    lines.append("executor: local (one job at a time in this process)" if ex.kind == "local" else
                 f"executor: ray, {ex.workers} workers × ({ex.cpus_per_worker:g} CPU, {ex.gpus_per_worker:g} GPU), "
                 + (f"joining {ex.address}" if ex.address else "on a local Ray started for the run"))
    if ss.kind == "ps+dfs":
        lines.append(f"then a data-flow stage: {ss.dataflow.generations} generations on top of the PS best")
    lines += check_tasks_fit_fitness(cfg, ctx.tasks) + check_task_splits(ctx.tasks)
    n_base = 5 if cfg.final.baselines and ss.kind != "dataflow" else 0  # evomerge.search.baselines
    n_models = 1 + K + n_base + cfg.final.top_k
    lines.append(f"held-out: ({1 + K} endpoints + {n_base} default merges + top {cfg.final.top_k} candidates) × "
                 f"{sum(n_held.values())} items = {n_models * sum(n_held.values()):,} answers")
    if seconds is not None:
        lines.append(_time_line(cfg, ctx, seconds, n_calib, cands, n_models))
    for line in lines:
        log(line)
    return lines


def _contest_plan(cfg: RunConfig) -> str:
    """One plan line: racing, the finalists' sharpening and the action on convergence."""
    stages = racing_stages(cfg)
    margin = cfg.fitness.racing.margin
    race = (f"racing: contenders (within {'an automatic margin' if margin == 'auto' else margin} of the best) asked "
            f"up to {2 ** stages}x the items in {stages} stages" if stages else "racing: off")
    fin = final_stage(cfg)
    race += f"; the {3 * cfg.final.top_k} best re-scored on {2 ** fin}x the items" if fin else ""
    return (race + f"; on convergence (patience {cfg.optimizer.patience}): {cfg.optimizer.on_converge}")
