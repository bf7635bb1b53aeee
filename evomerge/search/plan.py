"""``evomerge search --check``: every check a new run makes before it starts, then the plan (what
the run will answer), written nowhere."""

from __future__ import annotations

from evomerge.config import RunConfig
from evomerge.search.context import build_context, SearchContext
from evomerge.search.inputs import _check_given_banks, check_tasks_fit_fitness
from evomerge.search.optimizers import default_population
from evomerge.search.racing import racing_stages
from evomerge.search.rundir import RunDir, target_run_dir
from evomerge.search.selection import final_stage


def check_run(cfg: RunConfig, *, run_dir: str | None = None, log=print) -> list[str]:
    """Everything a new run checks before it starts (config, models and their vocabularies,
    tasks, devices, the run directory), then the plan — what the run will answer — as lines
    (also logged). Writes nothing."""
    target = target_run_dir(cfg, run_dir)
    _check_given_banks(cfg)
    ctx = build_context(cfg, None, log=lambda *_: None)
    try:
        return _plan_lines(cfg, ctx, target, log)
    finally:
        ctx.evaluator.close()


def _plan_lines(cfg: RunConfig, ctx: SearchContext, target: RunDir, log) -> list[str]:
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
        + (f" (asked in {fit.rounds} rounds)" if fit.rounds > 1 and fit.estimator != "full" else ""),
    ]
    lines.append(_contest_plan(cfg))
    ex = cfg.executor
    lines.append("executor: local (one job at a time in this process)" if ex.kind == "local" else
                 f"executor: ray, {ex.workers} workers × ({ex.cpus_per_worker:g} CPU, {ex.gpus_per_worker:g} GPU), "
                 + (f"joining {ex.address}" if ex.address else "on a local Ray started for the run"))
    if ss.kind == "ps+dfs":
        lines.append(f"then a data-flow stage: {ss.dataflow.generations} generations on top of the PS best")
    lines += check_tasks_fit_fitness(cfg, ctx.tasks)
    n_base = 5 if cfg.final.baselines and ss.kind != "dataflow" else 0  # evomerge.search.baselines
    n_models = 1 + K + n_base + cfg.final.top_k
    lines.append(f"held-out: ({1 + K} endpoints + {n_base} default merges + top {cfg.final.top_k} candidates) × "
                 f"{sum(n_held.values())} items = {n_models * sum(n_held.values()):,} answers")
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
