"""Stage 7, the summary: the held-out table and the best candidate, as log lines (the report
files are :mod:`evomerge.report`)."""

from __future__ import annotations

import numpy as np

from evomerge.search.baselines import describe_gain, gain_over_baselines
from evomerge.search.context import SearchContext


def summary_table(ctx: SearchContext, heldout: list[dict]) -> str:
    """The held-out table (endpoints, default merges, best candidates) and the best candidate's
    gain over the best default merge."""
    tasks = list(ctx.tasks)
    def name(h: dict) -> str:
        return h["name"] + (" (earlier)" if h.get("earlier") else "")

    w = max([16] + [len(name(h)) + 1 for h in heldout])
    head = (f"{'model':<{w}}" + "".join(f"{t[:10]:>11}" for t in tasks) + f"{'average':>10}"
            + f"{'estimated (items)':>26}")
    lines = ["held-out accuracy (true, all held-out items); estimated: the search's fitness ± its "
             "expected error", head, "-" * len(head)]
    for h in heldout:
        lines.append(f"{name(h):<{w}}" + "".join(f"{h['accuracy'][t]:>11.3f}" for t in tasks)
                     + f"{h['average']:>10.3f}" + f"{_estimate_text(h):>26}")
    if any(h.get("earlier") for h in heldout):
        lines.append("(earlier): a finalist of an earlier finish of this run, before it was extended; still "
                     "in the running for the best")
    gain = gain_over_baselines(heldout)
    if gain is not None:
        lines += ["", describe_gain(gain)]
    return "\n".join(lines)


def _estimate_text(h: dict) -> str:
    """'0.912 ± 0.011 (240)' for a re-evaluated candidate; '' for the others."""
    if h.get("fitness") is None:
        return ""
    f = h["fitness"]
    f = float(np.mean(f)) if isinstance(f, list) else float(f)
    err = h.get("estimate_error")
    return f"{f:.3f}" + (f" ± {err:.3f}" if err is not None else "") + f" ({h.get('items', '?')})"


def log_summary(ctx: SearchContext, stages: list[tuple], log) -> None:
    """The held-out table and the best candidate of each stage (``(ctx, records, heldout, best,
    rd)`` tuples; two for a PS+DFS run)."""
    two_stage = len(stages) > 1
    for sctx, srecords, sheld, sbest, srd in stages:
        title = "data-flow stage (A = PS best)" if sctx is not ctx else (
            "parameter-space stage" if two_stage else "")
        log("")
        if title:
            log(f"== {title}")
        log(summary_table(sctx, sheld))
        items = sum(r["items"] for r in srecords)
        log(f"\nbest: candidate {sbest['index']} (generation {sbest['generation']}), held-out "
            f"average {sbest['heldout_average']:.3f}; {len(srecords)} candidates, {items} items "
            "answered")
        log(f"recipe: {srd.best / 'recipe.json'}  model: {srd.best / 'model'}")
