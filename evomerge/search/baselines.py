"""The default merges a user would try instead of searching, measured in every run.

At the held-out stage a parameter-space run evaluates, on the same held-out items as its best
candidates, these merges of the base and the K endpoints (every endpoint at the same setting):

- ``ta-1``: task arithmetic, every task vector at weight 1 (base + Σ τ_k);
- ``ta-1/K``: task arithmetic at weight 1/K (the mean of the task vectors);
- ``ties``: TIES at density 0.5, weight 1 (the values of mergekit's TIES example);
- ``dare_ties``: DARE-TIES at density 0.5, weight 1 (idem, seed 0);
- ``linear``: the plain average of the endpoints (weights 1/K, normalised).

The run's summary and report then state the best candidate's gain over the best of them.
"""

from __future__ import annotations

from pathlib import Path

BASELINE_PREFIX = "baseline:"


def baseline_recipes(base: Path, endpoints: list[Path], dtype: str, tokenizer_source: str | None = None
                     ) -> list[tuple[str, dict]]:
    """``(name, recipe)`` of every baseline merge; recipes are mergekit-style dicts over folders."""
    k = len(endpoints)

    def recipe(method: str, **params) -> dict:
        r = {"merge_method": method, "base_model": str(base), "dtype": dtype,
             "models": [{"model": str(p), "parameters": dict(params)} for p in endpoints]}
        if tokenizer_source:
            r["tokenizer_source"] = tokenizer_source
        return r

    out = [("ta-1", recipe("task_arithmetic", weight=1.0)),
           (f"ta-1/{k}", recipe("task_arithmetic", weight=1.0 / k)),
           ("ties", recipe("ties", weight=1.0, density=0.5)),
           ("dare_ties", {**recipe("dare_ties", weight=1.0, density=0.5), "seed": 0}),
           ("linear", recipe("linear", weight=1.0 / k))]
    return [(BASELINE_PREFIX + name, r) for name, r in out]


def is_baseline(row: dict) -> bool:
    """Is this held-out row a baseline merge?"""
    return str(row.get("name", "")).startswith(BASELINE_PREFIX)


def gain_over_baselines(heldout: list[dict]) -> dict | None:
    """The best candidate's held-out gain over the best baseline (by average), per task and on
    average; None without both."""
    cands = [h for h in heldout if h.get("index") is not None]
    bases = [h for h in heldout if is_baseline(h)]
    if not cands or not bases:
        return None
    best = max(cands, key=lambda h: (h["average"], -h["index"]))
    ref = max(bases, key=lambda h: h["average"])
    tasks = list(best["accuracy"])
    return {"candidate": best["name"], "baseline": ref["name"],
            "average": float(best["average"] - ref["average"]),
            "per_task": {t: float(best["accuracy"][t] - ref["accuracy"][t]) for t in tasks},
            "best_per_task": {t: float(best["accuracy"][t] - max(b["accuracy"][t] for b in bases)) for t in tasks}}


def describe_gain(g: dict) -> str:
    """One line for :func:`gain_over_baselines`."""
    per = ", ".join(f"{t} {v:+.3f}" for t, v in g["per_task"].items())
    return (f"gain of {g['candidate']} over the best default merge ({g['baseline']}): "
            f"{g['average']:+.3f} held-out average ({per})")
