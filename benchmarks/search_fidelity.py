"""Does IRT-estimated fitness find as good a merge as exact fitness, for far fewer items?

Runs the demo search (configs/demo.yaml on the zoo) with
  (a) fitness = accuracy on all search items ("full"), and
  (b) fitness = mp-IRT estimate from 20 anchor items per task,
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


def one_run(seed: int, estimator: str, generations: int, workdir: Path) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["seed"] = seed
    cfg["fitness"]["estimator"] = estimator
    cfg["optimizer"]["generations"] = generations
    cfg["final"]["write_model"] = False
    cfg["run_dir"] = str(workdir / f"{estimator}-{seed}")
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
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for est in ("full", "mpirt"):
                r = one_run(seed, est, args.generations, Path(tmp))
                rows.append((seed, est, r))
                print(f"seed {seed} {est:6s} held-out {r['heldout']:.4f}  search items "
                      f"{r['search_items']:7d}  calibration items {r['calibration_items']:6d}  "
                      f"{r['wall_s']:6.1f} s", flush=True)
    print()
    print(f"{'fitness':<22}{'held-out acc (mean±sd)':>24}{'search items':>14}{'+calibration':>14}"
          f"{'wall s':>9}")
    summary = {}
    for est, label in (("full", "(a) all items"), ("mpirt", "(b) mp-IRT, 20 anchors")):
        rs = [r for _, e, r in rows if e == est]
        acc = np.array([r["heldout"] for r in rs])
        items = np.mean([r["search_items"] for r in rs])
        cal = np.mean([r["calibration_items"] for r in rs])
        wall = np.mean([r["wall_s"] for r in rs])
        summary[est] = (acc.mean(), items, items + cal)
        print(f"{label:<22}{acc.mean():>14.4f} ± {acc.std():.4f}{items:>14.0f}{items + cal:>14.0f}"
              f"{wall:>9.1f}")
    ratio = summary["mpirt"][0] / summary["full"][0]
    print(f"\n(b)/(a) held-out accuracy: {ratio:.3f} (target >= 0.98); items: "
          f"{summary['full'][1] / summary['mpirt'][1]:.1f}x fewer during the search, "
          f"{summary['full'][1] / summary['mpirt'][2]:.1f}x fewer counting calibration")


if __name__ == "__main__":
    main()
