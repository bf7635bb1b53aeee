"""Merges learned from unlabeled task inputs next to the evolutionary search, on the zoo.

All three experts over the zoo's base; held-out accuracy per task and the average, the wall time
of each method (statistics / learning / search, not the held-out evaluation), how many task inputs
(prompts, no answers) and how many labelled items (answers checked) it used:

- base, each expert, task arithmetic λ = 1 (no data);
- Fisher merging and RegMean (``evomerge stats`` on ``--prompts`` search prompts per expert's task);
- AdaMerging, task-wise and layer-wise (``--prompts`` per task, ``--steps`` Adam steps);
- MetaMerging (its defaults) without and with its per-task adapters (each task answered with its own);
- the evolutionary search of ``--config`` (default configs/demo.yaml: CMA-ES, IRT fitness), its best
  held-out (configs/demo_strengths.yaml: the cipher endpoint is base + 2 τ_cipher, so λ = 1 is wrong).

    .venv/bin/python benchmarks/learned_vs_search.py [--config configs/demo.yaml] [--prompts 64] [--steps 60]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TASKS = ("lang", "cipher", "upper")
ENDPOINTS = {t: t for t in TASKS}  # task -> the zoo model fine-tuned for it (from --config)


def _stats_recipes(zoo, prompts: int, tmp: Path) -> list[tuple[str, dict, float]]:
    from evomerge.backends.hf import HFEvaluator
    from evomerge.stats import write_stats
    from evomerge.stats.collect import fisher_diagonal, input_grams, label_items
    from evomerge.tasks import load_task_dir

    files = {"fisher": [], "gram": []}
    seconds = {"fisher": 0.0, "gram": 0.0}
    for t in TASKS:
        task = load_task_dir(zoo.task_dir(t), "search")
        task.items = task.items[:prompts]
        ev = HFEvaluator(zoo.model(ENDPOINTS[t]), num_threads="auto")
        t0 = time.perf_counter()
        seqs = label_items(ev, task)
        label_s = time.perf_counter() - t0
        for kind, fn in (("fisher", fisher_diagonal), ("gram", input_grams)):
            t0 = time.perf_counter()
            stats = fn(ev.model, seqs)
            path = tmp / f"{kind}_{t}.safetensors"
            write_stats(path, sorted(stats.items()), kind, {"model": str(zoo.model(ENDPOINTS[t])), "task": t})
            seconds[kind] += time.perf_counter() - t0 + label_s
            files[kind].append(str(path))
        ev.close()
    models = [{"model": str(zoo.model(ENDPOINTS[t]))} for t in TASKS]
    return [("Fisher merging", {"merge_method": "fisher", "models": models,
                                "parameters": {"stats": ",".join(files["fisher"])}}, seconds["fisher"]),
            ("RegMean", {"merge_method": "regmean", "models": models,
                         "parameters": {"stats": ",".join(files["gram"])}}, seconds["gram"])]


def _prompts(zoo, n: int) -> list[str]:
    from evomerge.tasks import load_task_dir

    out = []
    for t in TASKS:
        task = load_task_dir(zoo.task_dir(t), "search")
        out += task.prompts(task.items[:n])
    return out


def _adamerging(zoo, prompts: int, steps: int) -> list[tuple[str, dict, float]]:
    from evomerge.learned.adamerging import adamerge

    models = [zoo.model(ENDPOINTS[t]) for t in TASKS]
    out = []
    for granularity in ("task", "layer"):
        t0 = time.perf_counter()
        res = adamerge(zoo.base, models, _prompts(zoo, prompts), granularity=granularity, steps=steps, lr=0.01)
        out.append((f"AdaMerging, {granularity}-wise", res.recipe(zoo.base, models), time.perf_counter() - t0))
    return out


def _metamerging(zoo, prompts: int) -> tuple[dict, dict, float]:
    """(recipe, adapters per task, seconds): MetaMerging with its defaults on ``prompts`` per task."""
    from evomerge.backends.hf import HFEvaluator
    from evomerge.learned.metamerging import ExpertTask, metamerge, self_continued
    from evomerge.tasks import load_task_dir

    t0 = time.perf_counter()
    experts = []
    for t in TASKS:
        task = load_task_dir(zoo.task_dir(t), "search")
        task.items = task.items[:prompts]
        ev = HFEvaluator(zoo.model(ENDPOINTS[t]), num_threads="auto")
        experts.append(ExpertTask(zoo.model(ENDPOINTS[t]), t, self_continued(ev, task)))
        ev.close()
    res = metamerge(zoo.base, experts)
    models = [zoo.model(ENDPOINTS[t]) for t in TASKS]
    return res.recipe(zoo.base, models), res.adapters, time.perf_counter() - t0


def _search(config: Path, seed: int) -> dict:
    import yaml

    from evomerge.config import parse_config
    from evomerge.search.loop import run_search
    from evomerge.search.rundir import read_jsonl

    cfg = yaml.safe_load(config.read_text())
    cfg["seed"] = seed
    cfg["run_dir"] = tempfile.mkdtemp(prefix="learned_vs_search_")
    cfg["final"]["write_model"] = False
    t0 = time.perf_counter()
    rd = run_search(parse_config(cfg), log=lambda *_: None)
    wall = time.perf_counter() - t0
    held = [h for h in read_jsonl(rd.heldout) if h["index"] is not None]
    best = max(held, key=lambda h: (h["average"], -h["index"]))
    calib = read_jsonl(rd.calibration) if rd.calibration.exists() else []
    labelled = sum(r["items"] for r in read_jsonl(rd.evaluations)) + sum(
        len(a) for r in calib for a in r["answers"].values())
    return {"accuracy": best.get("accuracy", {}), "average": best["average"], "wall": wall, "labelled": labelled}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64, help="task prompts per task for the learned methods")
    ap.add_argument("--steps", type=int, default=60, help="AdaMerging's Adam steps")
    ap.add_argument("--no-search", action="store_true", help="leave the evolutionary search out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                    help="a zoo search config: its endpoints (zoo:NAME, one per task, in the tasks' order) and the search")
    args = ap.parse_args()
    import yaml

    cfg = yaml.safe_load(Path(args.config).read_text())
    ENDPOINTS.clear()
    ENDPOINTS.update({t["zoo"]: e.removeprefix("zoo:") for t, e in zip(cfg["tasks"], cfg["models"]["endpoints"])})
    if tuple(ENDPOINTS) != TASKS:
        raise SystemExit(f"{args.config}: expected the zoo tasks {TASKS} with one zoo endpoint each")

    from evomerge.backends.evaluator import MergeSources, make_evaluator
    from evomerge.config import EvaluatorConfig
    from evomerge.learned.adapters import adapted
    from evomerge.models import demo_zoo
    from evomerge.tasks import load_task_dir

    zoo = demo_zoo()
    tmp = Path(tempfile.mkdtemp(prefix="learned_vs_search_"))
    models = [{"model": str(zoo.model(ENDPOINTS[t])), "parameters": {"weight": 1.0}} for t in TASKS]
    rows: list[tuple[str, dict, float, int, int]] = []  # label, recipe, seconds, inputs, labelled
    rows.append(("base", {"merge_method": "task_arithmetic", "base_model": str(zoo.base), "models": models,
                          "parameters": {"lambda": 0.0}}, 0.0, 0, 0))
    for t in TASKS:
        rows.append((f"expert {ENDPOINTS[t]}", {"merge_method": "task_arithmetic", "base_model": str(zoo.base),
                                                "models": [{"model": str(zoo.model(ENDPOINTS[t])),
                                                            "parameters": {"weight": 1.0}}]}, 0.0, 0, 0))
    rows.append(("task arithmetic λ=1", {"merge_method": "task_arithmetic", "base_model": str(zoo.base),
                                         "models": models}, 0.0, 0, 0))
    n_inputs = args.prompts * len(TASKS)
    rows += [(label, rec, s, n_inputs, 0) for label, rec, s in _stats_recipes(zoo, args.prompts, tmp)]
    rows += [(label, rec, s, n_inputs, 0) for label, rec, s in _adamerging(zoo, args.prompts, args.steps)]
    mm_recipe, mm_adapters, mm_s = _metamerging(zoo, args.prompts)
    rows.append(("MetaMerging, λ only", mm_recipe, mm_s, n_inputs, 0))
    rows.append(("MetaMerging, + adapters", mm_recipe, mm_s, n_inputs, 0))

    tasks = {t: load_task_dir(zoo.task_dir(t), "heldout") for t in TASKS}
    paths = [str(zoo.base)] + [str(zoo.model(ENDPOINTS[t])) for t in TASKS]
    ev = make_evaluator(EvaluatorConfig(backend="hf", device="cpu", dtype="float32", batch_size=128), zoo.base,
                        MergeSources(tuple(paths), device="cpu"))
    results = []
    try:
        for label, rec, secs, inputs, labelled in rows:
            ev.apply_recipe(rec)
            acc = {}
            for t in TASKS:
                adapter = mm_adapters.get(t) if label.endswith("+ adapters") else None
                with adapted(ev.model, adapter) if adapter is not None else contextlib.nullcontext():
                    acc[t] = statistics.fmean(int(c) for c in ev.answer(tasks[t]))
            results.append((label, acc, statistics.fmean(acc.values()), secs, inputs, labelled))
            print(f"{label:<26} " + "  ".join(f"{t} {a:.3f}" for t, a in acc.items()) + f"  avg {results[-1][2]:.3f}",
                  flush=True)
    finally:
        ev.close()
    if not args.no_search:
        s = _search(Path(args.config), args.seed)
        results.append((f"evolutionary search ({Path(args.config).stem})", s["accuracy"], s["average"], s["wall"], 0, s["labelled"]))

    print("\n| merge | " + " | ".join(TASKS) + " | average | wall time | task inputs | labelled items |")
    print("|---|" + "---:|" * (len(TASKS) + 4))
    for label, acc, avg, secs, inputs, labelled in results:
        cells = [f"{acc[t]:.3f}" if t in acc else "—" for t in TASKS]
        print(f"| {label} | " + " | ".join(cells) + f" | {avg:.3f} | {secs:.0f} s | {inputs} | {labelled:,} |")


if __name__ == "__main__":
    main()
