"""What the search is worth: its best merge next to the default merges and to random search.

For each seed, on a demo config (default: configs/demo_strengths.yaml, where the right weights
are no default merge's), runs in one process:

- CMA-ES with the IRT fitness (mp-IRT, the config's anchors / rounds) — the product;
- random search (uniform genomes) with the same fitness, the same budget of candidates and the
  same item banks (reused from the CMA-ES run: the same calibration);
- CMA-ES with the exact fitness (every search item), no calibration;

and prints the held-out average of every default merge (measured in each run's held-out stage),
of each search's best, and the items each answered (search + calibration).

    .venv/bin/python benchmarks/search_vs_baselines.py [--config configs/demo_strengths.yaml] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run(cfg: dict, run_dir: Path, **changes) -> dict:
    from evomerge.config import parse_config
    from evomerge.search.loop import run_search
    from evomerge.search.rundir import read_jsonl

    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    for key, value in changes.items():
        section, _, field = key.partition("__")
        cfg[section][field] = value
    cfg["run_dir"] = str(run_dir)
    cfg["final"]["write_model"] = False
    t0 = time.perf_counter()
    rd = run_search(parse_config(cfg), log=lambda *_: None)
    wall = time.perf_counter() - t0
    held = read_jsonl(rd.heldout)
    evals = read_jsonl(rd.evaluations)
    calib = read_jsonl(rd.calibration) if rd.calibration.exists() else []
    calib_items = sum(len(a) for r in calib for a in r["answers"].values())
    cands = [h for h in held if h["index"] is not None]
    best = max(cands, key=lambda h: (h["average"], -h["index"]))
    return {"best": best["average"], "baselines": {h["name"]: h["average"] for h in held if h["name"].startswith("baseline:")},
            "items": sum(r["items"] for r in evals), "calib_items": calib_items, "wall": wall,
            "candidates": len(evals), "banks": rd.banks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo_strengths.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    args = ap.parse_args()
    base_cfg = yaml.safe_load(Path(args.config).read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="search_vs_baselines_") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            cfg = {**base_cfg, "seed": seed}
            cma = run(cfg, Path(tmp) / f"cma{seed}")
            rnd = run(cfg, Path(tmp) / f"rnd{seed}", optimizer__name="random",
                      calibration__banks=str(cma["banks"]))
            rnd["calib_items"] = cma["calib_items"]  # the same banks: the same calibration
            exact = run(cfg, Path(tmp) / f"exact{seed}", fitness__estimator="full", fitness__rounds=1)
            rows.append((seed, cma, rnd, exact))
            print(f"seed {seed} done ({cma['wall'] + rnd['wall'] + exact['wall']:.0f} s)", file=sys.stderr, flush=True)
    names = list(rows[0][1]["baselines"])
    print(f"\n{Path(args.config).name}: held-out average of the best merge (each search: "
          f"{rows[0][1]['candidates']} candidates)\n")
    head = f"{'merge':<28}" + "".join(f"{'seed ' + str(r[0]):>9}" for r in rows) + f"{'mean':>8}{'items (search + calibration)':>32}"
    print(head)
    print("-" * len(head))
    for n in names:
        vals = [r[1]["baselines"][n] for r in rows]
        print(f"{n:<28}" + "".join(f"{v:>9.3f}" for v in vals) + f"{statistics.mean(vals):>8.3f}{'—':>32}")
    for label, k in (("random search, IRT fitness", 2), ("CMA-ES, IRT fitness", 1), ("CMA-ES, exact fitness", 3)):
        vals = [r[k]["best"] for r in rows]
        items = f"{rows[0][k]['items']:,} + {rows[0][k]['calib_items']:,}"
        print(f"{label:<28}" + "".join(f"{v:>9.3f}" for v in vals) + f"{statistics.mean(vals):>8.3f}{items:>32}")
    gains = [r[1]["best"] - max(r[1]["baselines"].values()) for r in rows]
    print("\nCMA-ES (IRT) over the best default merge: " + ", ".join(f"{g:+.3f}" for g in gains)
          + "; over random search: " + ", ".join(f"{r[1]['best'] - r[2]['best']:+.3f}" for r in rows))


if __name__ == "__main__":
    main()
