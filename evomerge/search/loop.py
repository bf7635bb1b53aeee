"""The search as a one-way pipeline of stages, each a module with one job:

1. inputs        (:mod:`evomerge.search.inputs`)       models, tasks, devices, pre-run checks
2. context       (:mod:`evomerge.search.context`)      the resident evaluator and space
3. calibration   (:mod:`evomerge.search.calibration`)  every search item answered by the calibration models
4. banks         (:mod:`evomerge.search.banks`)        item banks and anchors
5. fitness       (:mod:`evomerge.search.fitness`)      answers -> estimates -> fitness (used by 3, 6, 7)
6. generations   (:mod:`evomerge.search.generations`)  ask / evaluate / race / tell, replayed on resume
7. finish        (:mod:`evomerge.search.finish`)       held-out, best recipe and checkpoint, data-flow stage
8. summary       (:mod:`evomerge.search.summary`)       the held-out table in the log

The report (:mod:`evomerge.report`) is written by the caller from the finished run directory
(``evomerge search`` does, and ``evomerge report RUN_DIR`` redraws it).

Jobs (a candidate to evaluate, a contender to sharpen, a calibration model, a held-out model)
run on an executor (:mod:`evomerge.search.executor`: in this process, or on a pool of Ray
workers); the driver — this process — is the only writer of the run's logs.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.config import RunConfig
from evomerge.search.banks import fit_banks
from evomerge.search.calibration import run_calibration
from evomerge.search.context import SearchContext, build_context, record_alignment
from evomerge.search.executor import LocalExecutor
from evomerge.search.finish import run_dataflow_stage, run_heldout, write_best
from evomerge.search.generations import run_generations
from evomerge.search.inputs import _check_given_banks
from evomerge.search.rundir import RunDir, new_run_dir, open_run_dir, target_run_dir
from evomerge.search.summary import log_summary

__all__ = ["run_search", "make_executor"]


def run_search(cfg: RunConfig | None = None, *, resume: str | Path | None = None,
               run_dir: str | None = None, log=print) -> RunDir:
    """Run (or resume) a search to the end; returns its run directory."""
    if resume is not None:
        rd, cfg = open_run_dir(resume, cfg)
        log(f"resuming {rd.root} (stage: {rd.state().get('stage')})")
        for note in rd.repair():  # a kill mid-append leaves a partial last line
            log(f"  {note}")
        ctx = build_context(cfg, rd, log=log)
    else:
        assert cfg is not None
        # everything that can fail on bad input fails before the run directory exists
        target = target_run_dir(cfg, run_dir)
        _check_given_banks(cfg)
        ctx = build_context(cfg, None, log=log)
    try:
        if resume is None:
            rd = ctx.rd = new_run_dir(cfg, str(target.root))
            record_alignment(rd, ctx.alignment)  # models.align: which aligned models this run merges
            log(f"run directory: {rd.root}")
        try:
            return _run_stages(ctx, cfg, rd, log)
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into one)
            log(f"\ninterrupted: every result logged so far is kept; continue with\n"
                f"  evomerge search --resume {rd.root}")
            raise
    finally:
        ctx.evaluator.close()


def make_executor(cfg: RunConfig, log=print):
    """The executor ``cfg.executor`` asks for: this process, or a pool of Ray workers."""
    if cfg.executor.kind == "ray":
        from evomerge.search.ray_pool import RayExecutor  # ray: an optional extra, imported when asked for

        return RayExecutor(cfg, log=log)
    return LocalExecutor()


def _run_stages(ctx: SearchContext, cfg: RunConfig, rd: RunDir, log) -> RunDir:
    ctx.executor = make_executor(cfg, log)  # where the jobs of every stage are answered
    try:
        return _pipeline(ctx, cfg, rd, log)
    finally:
        ctx.executor.close()


def _pipeline(ctx: SearchContext, cfg: RunConfig, rd: RunDir, log) -> RunDir:
    if cfg.fitness.estimator != "full":
        rd.set_state(stage="calibrating")
        if cfg.calibration.banks is None:  # given banks replace the calibration
            run_calibration(ctx)
        fit_banks(ctx)
    rd.set_state(stage="searching")
    records = run_generations(ctx)
    rd.set_state(stage="finishing")
    heldout = run_heldout(ctx, records)
    two_stage = cfg.search_space.kind == "ps+dfs"
    if two_stage and not cfg.final.write_model:
        ctx.cfg = cfg.model_copy(update={"final": cfg.final.model_copy(update={"write_model": True})})
    best = write_best(ctx, records, heldout)
    stages = [(ctx, records, heldout, best, rd)]
    if two_stage:
        stages.append(run_dataflow_stage(ctx, heldout, best))
    rd.set_state(stage="done")
    log_summary(ctx, stages, log)
    return rd
