"""NiNo MetaMerge on the zoo: held-out accuracy next to averaging and task arithmetic.

For every pair of the zoo's experts and for all three, merges in memory (one resident evaluator) and
answers each merged task's held-out items:

- the base and each expert alone;
- linear averaging of the experts, task arithmetic with λ = 1 (the sum of the task vectors);
- ``nino`` with the MetaMerge script's settings (trajectory auto, k = 1..5 chained, update scale 0.3,
  embeddings averaged), then one change at a time: update scale 1.0 and 2.5, the trajectory with the
  experts' order reversed, no chaining, predicted embeddings, and the hidden-32 checkpoint.

    .venv/bin/python benchmarks/nino_zoo.py --checkpoint nino_mlp.safetensors [--h32 nino_mlp_h32.safetensors]

(convert the published pickles once with `evomerge nino-convert X.pt --out X.safetensors --allow-pickle`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXPERTS = ("lang", "cipher", "upper")


def _reversed_trajectory(n: int) -> str:
    from evomerge.merge.methods.nino import DEFAULT_TRAJECTORIES

    order = [int(i) for i in DEFAULT_TRAJECTORIES[n].split(",")]
    return ",".join(str(0 if i == 0 else n + 1 - i) for i in order)


def variants(names: tuple[str, ...], ckpt: str, h32: str | None) -> list[tuple[str, str, dict]]:
    """(label, method, parameters) for one set of experts."""
    n = len(names)
    nino = {"checkpoint": ckpt}
    out = [
        ("linear average", "linear", {}),
        ("task arithmetic λ=1", "task_arithmetic", {}),
        ("nino (script settings)", "nino", nino),
        ("nino update_scale 1.0", "nino", {**nino, "update_scale": 1.0}),
        ("nino update_scale 2.5", "nino", {**nino, "update_scale": 2.5}),
        (f"nino trajectory {_reversed_trajectory(n)}", "nino", {**nino, "trajectory": _reversed_trajectory(n)}),
        ("nino not chained", "nino", {**nino, "chain_horizons": False}),
        ("nino predicted embeddings", "nino", {**nino, "predict_embeddings": True}),
    ]
    if h32:
        out.append(("nino hidden 32", "nino", {"checkpoint": h32}))
    return out


def recipe(zoo, method: str, names: tuple[str, ...], params: dict) -> dict:
    models = [{"model": str(zoo.model(x)), "parameters": {"weight": 1.0}} for x in names]
    if method == "nino":
        models = [{"model": m["model"]} for m in models]
    return {"merge_method": method, "base_model": str(zoo.base), "models": models, "parameters": params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="NiNo MLP checkpoint (.safetensors)")
    ap.add_argument("--h32", default=None, help="the hidden-32 checkpoint (.safetensors), optional")
    args = ap.parse_args()

    from evomerge.backends.evaluator import MergeSources, make_evaluator
    from evomerge.config import EvaluatorConfig
    from evomerge.models import demo_zoo
    from evomerge.tasks import load_task_dir

    zoo = demo_zoo()
    tasks = {t: load_task_dir(zoo.task_dir(t), "heldout") for t in EXPERTS}
    paths = [str(zoo.base)] + [str(zoo.model(t)) for t in EXPERTS]
    ev = make_evaluator(EvaluatorConfig(backend="hf", device="cpu", dtype="float32", batch_size=128), zoo.base,
                        MergeSources(tuple(paths), device="cpu"))

    def score(rec: dict, names) -> tuple[dict[str, float], float]:
        t0 = time.perf_counter()
        ev.apply_recipe(rec)
        merge_s = time.perf_counter() - t0
        return {t: statistics.fmean(int(c) for c in ev.answer(tasks[t])) for t in names}, merge_s

    rows = []
    try:
        for n in (2, 3):
            for names in itertools.combinations(EXPERTS, n):
                single = [("base", recipe(zoo, "task_arithmetic", names, {"lambda": 0.0}))]
                single += [(f"expert {x}", recipe(zoo, "task_arithmetic", (x,), {})) for x in names]
                merged = [(label, recipe(zoo, m, names, p)) for label, m, p in variants(names, args.checkpoint,
                                                                                          args.h32)]
                for label, rec in single + merged:
                    acc, merge_s = score(rec, names)
                    rows.append((" + ".join(names), label, acc, statistics.fmean(acc.values()), merge_s))
                    print(f"{rows[-1][0]:<20} {label:<28} " + "  ".join(f"{t} {a:.3f}" for t, a in acc.items())
                          + f"  mean {rows[-1][3]:.3f}  ({merge_s:.2f}s merge)", flush=True)
    finally:
        ev.close()

    print("\n| experts | merge | " + " | ".join(EXPERTS) + " | mean of the merged tasks |")
    print("|---|---|" + "---:|" * (len(EXPERTS) + 1))
    for names, label, acc, mean, _ in rows:
        cells = [f"{acc[t]:.3f}" if t in acc else "" for t in EXPERTS]
        print(f"| {names} | {label} | " + " | ".join(cells) + f" | {mean:.3f} |")


if __name__ == "__main__":
    main()
