"""MASS routing on the zoo (issue 15, item 4): TSV static vs MASS routed, routing accuracy, and
what the two passes cost at inference.

On the held-out split (300 items per task) of the zoo's tasks, with the three experts (lang,
cipher, upper) over their shared base:

- accuracy of the TSV merge of all three (one static model), of MASS with the default routing
  settings, of MASS restricted to one task per prompt (``max_tasks=1``), and of the oracle
  (each task's items answered by its own expert's TSV factors alone: the task known);
- routing accuracy: the fraction of each task's items whose smallest residual is their own
  task's (top-1), and whose selected subset contains their own task; on the default routing
  tensor and on the last layer's ``down_proj`` (the reference's Mistral choice);
- inference cost: seconds per 100 prompts (greedy, 8 new tokens, one CPU thread) of the static
  model vs MASS (first pass alone; both passes with the subset merges cached; both passes from
  an empty cache, i.e. including the subset merges).

    .venv/bin/python benchmarks/mass_zoo.py [--json OUT.json] [--repeats 3]

Needs the built zoo (``$EVOMERGE_ZOO`` or the default root). ~1 min on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.backends.hf import HFEvaluator  # noqa: E402
from evomerge.routing.factors import factors_from_checkpoints  # noqa: E402
from evomerge.routing.model import RoutedModel  # noqa: E402
from evomerge.routing.router import (  # noqa: E402
    RoutingSettings,
    default_routing_tensor,
    prompt_features,
    relative_residuals,
)
from evomerge.tasks import load_task_dir  # noqa: E402
from evomerge.zoo import build_zoo  # noqa: E402

EXPERTS = ("lang", "cipher", "upper")
EXTRA = ("upenc", "cipher_choice")


def accuracy(answer, tasks) -> dict[str, float]:
    return {name: float(answer(t).mean()) for name, t in tasks.items()}


def routing_accuracy(model: RoutedModel, tasks, tensor: str) -> dict[str, dict[str, float]]:
    ev = model.evaluator
    model.use(model.tasks)
    basis = model.factors.routing_basis(tensor)
    out = {}
    for i, name in enumerate(EXPERTS):
        prompts = tasks[name].prompts()
        resid = relative_residuals(prompt_features(ev.model, ev.tokenizer, prompts, tensor, ev.pad_token_id), basis)
        routes = model.route(prompts) if tensor == model.settings.tensor else None
        out[name] = {"top1": float((resid.argmin(dim=1) == i).float().mean())}
        if routes is not None:
            out[name]["own_selected"] = sum(model.tasks[i] in r for r in routes) / len(routes)
            out[name]["mean_selected"] = sum(len(r) for r in routes) / len(routes)
    return out


def per_100(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 100.0 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = build_zoo(verbose=False)
    tasks = {n: load_task_dir(zoo.task_dir(n), "heldout") for n in EXPERTS + EXTRA}
    t0 = time.perf_counter()
    factors = factors_from_checkpoints(zoo.base, {f"{t}_expert": zoo.model(t) for t in EXPERTS})
    factor_s = time.perf_counter() - t0
    default = default_routing_tensor(4)
    model = RoutedModel(factors, RoutingSettings(default), HFEvaluator(zoo.base, num_threads=1))
    ev = model.evaluator
    rows: dict[str, dict[str, float]] = {}

    def static(t):
        model.use(model.tasks)
        return ev.answer(t)

    rows["TSV static (all three)"] = accuracy(static, tasks)
    rows["MASS routed (default settings)"] = accuracy(model.answer, tasks)
    top1 = RoutedModel(factors, RoutingSettings(default, max_tasks=1), ev)
    rows["MASS routed, max_tasks=1"] = accuracy(top1.answer, tasks)

    def oracle(t):
        own = {"upenc": "upper", "cipher_choice": "cipher"}.get(t.name, t.name)
        model.use([f"{own}_expert"])
        return ev.answer(t)

    rows["oracle: own expert's TSV factors alone"] = accuracy(oracle, tasks)
    routing = {default: routing_accuracy(model, tasks, default),
               "model.layers.3.mlp.down_proj.weight": routing_accuracy(model, tasks,
                                                                       "model.layers.3.mlp.down_proj.weight")}

    prompts = [p for n in EXPERTS for p in tasks[n].prompts()[:100]]
    model.use(model.tasks)
    cost = {"static": per_100(lambda: ev.generate(prompts, 8), len(prompts), args.repeats),
            "first pass alone": per_100(lambda: model.route(prompts), len(prompts), args.repeats),
            "routed, merges cached": per_100(lambda: model.generate(prompts, 8), len(prompts), args.repeats)}

    def cold():
        model.clear_cache()
        model.generate(prompts, 8)

    cost["routed, from an empty cache"] = per_100(cold, len(prompts), args.repeats)
    model.use(model.tasks)
    cost["static"] = per_100(lambda: ev.generate(prompts, 8), len(prompts), args.repeats)  # again, after warm-up

    cols = EXPERTS + EXTRA
    print(f"factors of 3 experts: {factor_s:.2f}s; stored floats {factors.storage_numel()} "
          f"({factors.storage_numel() / sum(t.numel() for t in factors.base.values()):.2f}x the base)")
    print("| model | " + " | ".join(cols) + " | avg (3 experts' tasks) |")
    print("|---" * (len(cols) + 2) + "|")
    for name, acc in rows.items():
        avg = sum(acc[c] for c in EXPERTS) / len(EXPERTS)
        print(f"| {name} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + f" | {avg:.3f} |")
    for tensor, r in routing.items():
        print(f"routing on {tensor}: " + "; ".join(
            f"{n} " + ", ".join(f"{k} {v:.3f}" for k, v in d.items()) for n, d in r.items()))
    print("seconds per 100 prompts (8 new tokens, 1 thread): "
          + ", ".join(f"{k} {v:.3f}" for k, v in cost.items()))
    if args.json is not None:
        args.json.write_text(json.dumps({"accuracy": rows, "routing": routing, "seconds_per_100": cost,
                                         "factor_seconds": factor_s}, indent=2) + "\n")


if __name__ == "__main__":
    main()
