"""Does IRT-estimated fitness find as good a merge as exact fitness, for far fewer items?

Runs the demo search (configs/demo.yaml on the zoo) with
  (a) fitness = accuracy on all search items ("full"), and
  (b) fitness = mp-IRT estimate from 20 anchor items per task (the same for every candidate),
  (c) fitness = mp-IRT estimate from 20 items per task asked adaptively in 4 rounds
      (``fitness.rounds: 4``, irt.adaptive),
for several seeds, and prints: held-out true accuracy of each final best, items answered
during the search (and, for (b), during calibration), and wall time.

    .venv/bin/python benchmarks/search_fidelity.py [--seeds 0 1 2] [--generations 10]

Target (issue 4): (b) reaches >= 98% of (a)'s held-out accuracy with >= 10x fewer items.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from evomerge.config import parse_config
from evomerge.search.loop import run_search
from evomerge.search.rundir import read_jsonl

REPO = Path(__file__).resolve().parents[1]


VARIANTS = {"full": ("full", 1, "(a) all items"), "mpirt": ("mpirt", 1, "(b) mp-IRT, 20 anchors"),
            "mpirt-r4": ("mpirt", 4, "(c) mp-IRT, adaptive")}


def one_run(seed: int, variant: str, generations: int, workdir: Path) -> dict:
    estimator, rounds, _ = VARIANTS[variant]
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["seed"] = seed
    cfg["fitness"]["estimator"] = estimator
    cfg["fitness"]["rounds"] = rounds
    cfg["optimizer"]["generations"] = generations
    cfg["final"]["write_model"] = False
    cfg["run_dir"] = str(workdir / f"{variant}-{seed}")
    t0 = time.perf_counter()
    rd = run_search(parse_config(cfg), log=lambda m: None)
    wall = time.perf_counter() - t0
    best = json.loads((rd.best / "recipe.json").read_text())
    evals = read_jsonl(rd.evaluations)
    calib = read_jsonl(rd.calibration)
    calib_items = sum(len(a) for r in calib for a in r["answers"].values())
    return {"heldout": best["heldout_average"], "search_items": sum(e["items"] for e in evals),
            "calibration_items": calib_items, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    if "full" not in args.variants:
        ap.error("--variants must include 'full' (the reference)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for est in args.variants:
                r = one_run(seed, est, args.generations, Path(tmp))
                rows.append((seed, est, r))
                print(f"seed {seed} {est:8s} held-out {r['heldout']:.4f}  search items "
                      f"{r['search_items']:7d}  calibration items {r['calibration_items']:6d}  "
                      f"{r['wall_s']:6.1f} s", flush=True)
    print()
    print(f"{'fitness':<22}{'held-out acc (mean±sd)':>24}{'search items':>14}{'+calibration':>14}"
          f"{'wall s':>9}")
    summary = {}
    for est in args.variants:
        label = VARIANTS[est][2]
        rs = [r for _, e, r in rows if e == est]
        acc = np.array([r["heldout"] for r in rs])
        items = np.mean([r["search_items"] for r in rs])
        cal = np.mean([r["calibration_items"] for r in rs])
        wall = np.mean([r["wall_s"] for r in rs])
        summary[est] = (acc.mean(), items, items + cal)
        print(f"{label:<22}{acc.mean():>14.4f} ± {acc.std():.4f}{items:>14.0f}{items + cal:>14.0f}"
              f"{wall:>9.1f}")
    print()
    for est in args.variants[1:] if args.variants[0] == "full" else [v for v in args.variants if v != "full"]:
        ratio = summary[est][0] / summary["full"][0]
        print(f"{VARIANTS[est][2]} / (a) held-out accuracy: {ratio:.3f} (target >= 0.98); items: "
              f"{summary['full'][1] / summary[est][1]:.1f}x fewer during the search, "
              f"{summary['full'][1] / summary[est][2]:.1f}x fewer counting calibration")


if __name__ == "__main__":
    main()
