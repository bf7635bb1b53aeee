"""Choosing the candidates the held-out stage re-evaluates: sharpened, distinct, with error bars.

The best of many noisy estimates overstates its candidate (the winner's curse), and a converged
search fills its top ranks with near-copies. So, before the held-out stage:

1. the ``3 × final.top_k`` best distinct candidates are re-scored one stage beyond any race
   (``final.sharpen``: twice the items of the last racing stage per task, asked adaptively;
   ``phase: final`` lines in ``racing.jsonl``, resumable, never replayed into the optimizer);
2. the ``top_k`` are picked greedily by those sharper estimates, each at least
   ``final.min_distance`` (RMS over genes in [0, 1]) from those already picked — filled up with
   the next best where the run has too few distinct regions;
3. each carries ``estimate_error``: the expected absolute error of its fitness at the items it
   answered (:func:`evomerge.search.fitness.expected_error`; None without a bank check).
"""

from __future__ import annotations

import numpy as np

from evomerge.search.executor import sharpen_job
from evomerge.search.fitness import can_sharpen, expected_error, record_items, scalar_fitness
from evomerge.search.racing import FINAL, advance, line_key, racing_stages
from evomerge.search.rundir import append_jsonl, read_jsonl


def top_candidates(records: list[dict], k: int) -> list[dict]:
    """The k best evaluated candidates by fitness, distinct genomes, earliest first on ties."""
    seen, out = set(), []
    for r in sorted(records, key=lambda r: (-scalar_fitness(r), r["index"])):
        key = tuple(r["genome"])
        if key in seen:
            continue
        seen.add(key)
        out.append(r)
        if len(out) == k:
            break
    return out


def genome_distance(a, b) -> float:
    """RMS difference of two genomes (genes in [0, 1])."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return float(np.sqrt(np.mean((a - b) ** 2))) if a.shape == b.shape else float("inf")


def diverse_top(records: list[dict], k: int, min_distance: float) -> list[dict]:
    """Greedy by fitness (earliest first on ties): a candidate is taken when it is at least
    ``min_distance`` from every one taken; then the list is filled up to ``k`` with the best of
    the rest."""
    ranked = sorted(records, key=lambda r: (-scalar_fitness(r), r["index"]))
    picked = []
    for r in ranked:
        if len(picked) == k:
            break
        if all(genome_distance(r["genome"], p["genome"]) >= min_distance for p in picked):
            picked.append(r)
    for r in ranked:
        if len(picked) == k:
            break
        if all(r["index"] != p["index"] for p in picked):
            picked.append(r)
    return sorted(picked, key=lambda r: (-scalar_fitness(r), r["index"]))


def final_stage(cfg) -> int | None:
    """The stage finalists are sharpened to (one beyond the last race), or None where the run
    cannot sharpen (``final.sharpen`` off, or an estimator that cannot use adaptive items)."""
    if not cfg.final.sharpen or not can_sharpen(cfg):
        return None
    return racing_stages(cfg) + 1


def choose_finalists(ctx, records: list[dict]) -> list[dict]:
    """The ``final.top_k`` candidates to re-evaluate on the held-out items (see the module
    docstring), best first, each with ``estimate_error``."""
    cfg, rd = ctx.cfg, ctx.rd
    k = cfg.final.top_k
    target = final_stage(cfg)
    pool = top_candidates(records, 3 * k if (target or cfg.final.min_distance > 0) else k)
    if target is not None:
        logged = {line_key(x): x for x in read_jsonl(rd.racing) if x.get("phase") == FINAL}
        lines = {i: logged.get((int(r["index"]), target, FINAL)) for i, r in enumerate(pool)
                 if r.get("stage", 0) < target}
        todo = [i for i, line in lines.items() if line is None]
        got = ctx.run_jobs([sharpen_job(pool[i], target, FINAL) for i in todo],
                           lambda _job, line: append_jsonl(rd.racing, line))
        lines.update(zip(todo, got))
        pool = [advance(r, lines[i]) if i in lines else r for i, r in enumerate(pool)]
    chosen = diverse_top(pool, k, cfg.final.min_distance)
    return [dict(r, estimate_error=expected_error(ctx, record_items(ctx, r))) for r in chosen]


def pareto_front(records: list[dict]) -> list[dict]:
    """Non-dominated candidates (multi-objective runs)."""
    pts = [(r, np.asarray(r["fitness"], dtype=float)) for r in records]
    front = []
    for r, f in pts:
        if not any(np.all(g >= f) and np.any(g > f) for _, g in pts):
            front.append(r)
    return front
