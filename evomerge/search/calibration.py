"""Stage 2, calibration: every search item answered by the base, the endpoints and
``calibration.samples`` sampled recipes (resumable, one line each in calibration.jsonl)."""

from __future__ import annotations

import time

import numpy as np

from evomerge.search.context import SearchContext
from evomerge.search.executor import calibrate_job
from evomerge.search.fitness import unbits
from evomerge.search.rundir import append_jsonl, read_jsonl


def calibration_population(ctx: SearchContext) -> list[tuple[str, list | None]]:
    """The base, the endpoints, then ``calibration.samples`` genomes drawn uniformly from the
    search space (seeded by the run seed): the subjects the item banks are fitted on."""
    cfg = ctx.cfg
    pop: list[tuple[str, list | None]] = [("base", None)]
    pop += [(ref, None) for ref in cfg.models.endpoints]
    rng = np.random.default_rng([cfg.seed, 7919])
    for k in range(cfg.calibration.samples):
        pop.append((f"sample-{k:03d}", rng.uniform(0.0, 1.0, ctx.space.dim).tolist()))
    return pop


def run_calibration(ctx: SearchContext) -> None:
    """Answer every search item with every calibration model (resumable, one log line each)."""
    rd = ctx.rd
    done = {r["name"] for r in read_jsonl(rd.calibration)}
    pop = calibration_population(ctx)
    todo = [(n, g) for n, g in pop if n not in done]
    if todo:
        ctx.log(f"calibration: {len(pop)} models x {sum(len(p.search.items) for p in ctx.tasks.values())}"
                f" items ({len(pop) - len(todo)} already done)")

    def done(job, res) -> None:  # the driver writes each line as it arrives
        name, genome = job.args["name"], job.args["genome"]
        append_jsonl(rd.calibration, {"name": name, "genome": genome, "answers": res["answers"],
                                      "seconds": res["seconds"]})
        acc = {t: round(float(unbits(a).mean()), 3) for t, a in res["answers"].items()}
        ctx.log(f"  calibrated {name}: {acc}")

    t0 = time.perf_counter()
    ctx.run_jobs([calibrate_job(n, g) for n, g in todo], done)
    if todo:
        ctx.log(f"  calibration: {len(todo)} models in {time.perf_counter() - t0:.1f}s "
                f"({len(todo) / max(time.perf_counter() - t0, 1e-9) * 60:.1f} models/min)")


def calibration_records(ctx: SearchContext) -> list[dict]:
    """The calibration log's lines in calibration-population order (a pool writes them in
    completion order; the banks are fitted on the same rows either way)."""
    order = {name: i for i, (name, _) in enumerate(calibration_population(ctx))}
    return sorted(read_jsonl(ctx.rd.calibration), key=lambda r: order.get(r["name"], len(order)))
