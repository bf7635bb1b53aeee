"""Search throughput, side by side in one run: the demo with 1 local worker and with N Ray workers.

For each executor the demo (configs/demo.yaml, fewer calibration samples and generations,
no checkpoint written) runs to the end, and the run's log gives, per phase:

- calibration: models per minute (the calibration models are independent jobs);
- search: candidates per minute over the generations (evaluation + racing, wall time of the
  generation phase from the first to the last evaluation's arrival);
- the median job time in a worker, and the driver's overhead per candidate: the generation
  phase's wall time not explained by the jobs' own time spread over the workers.

Then what a user with G GPUs should expect, on paper: with per-candidate time t (one worker)
and driver overhead o per candidate, G workers give ~min(G / t, 1 / o) candidates per second,
less the tail of a generation (its last jobs run while other workers idle: at population P
the loss is ~(G - 1) / (2P) of the time).

    .venv/bin/python benchmarks/search_throughput.py [--workers 2] [--generations 4] [--samples 12]

Needs Ray (pip install 'evomerge[ray]'). Prints a table; nothing is asserted. On this 2-core
machine 2 workers share the 2 cores with the driver: the ceiling is ~2x, less what the driver
and other processes take.
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


def run(kind: str, workers: int, generations: int, samples: int, root: Path) -> dict:
    from evomerge.config import parse_config
    from evomerge.search.loop import run_search
    from evomerge.search.rundir import read_jsonl

    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["calibration"]["samples"] = samples
    cfg["optimizer"]["generations"] = generations
    cfg["final"].update(write_model=False, baselines=False)
    cfg["executor"] = {"kind": kind, "workers": workers}
    cfg["run_dir"] = str(root / f"{kind}-{workers}")
    marks: dict[str, float] = {}

    def log(line: str) -> None:
        now = time.perf_counter()
        if line.startswith("calibration:") and "models x" in line:
            marks["calib_start"] = now
        elif line.startswith("  calibration:"):
            marks["calib_end"] = now
        elif line.startswith("search:"):
            marks["search_start"] = now
        elif line.startswith("gen "):
            marks["search_end"] = now

    t0 = time.perf_counter()
    rd = run_search(parse_config(cfg), log=log)
    wall = time.perf_counter() - t0
    calib = read_jsonl(rd.calibration)
    evals = read_jsonl(rd.evaluations)
    racing = [x for x in read_jsonl(rd.racing) if x.get("phase") == "race"]
    calib_s = marks["calib_end"] - marks["calib_start"]
    search_s = marks["search_end"] - marks["search_start"]
    job_s = [sum(e["timings"].values()) for e in evals] + [sum(x["timings"].values()) for x in racing]
    per_cand = sum(job_s) / len(evals)  # a candidate's own evaluation + its share of the racing
    overhead = max(0.0, search_s - sum(job_s) / workers) / len(evals)
    return {"rd": rd, "executor": f"{kind} x{workers}", "workers": workers, "calib_models": len(calib),
            "calib_per_min": len(calib) / calib_s * 60, "calib_job_s": statistics.median(c["seconds"] for c in calib),
            "candidates": len(evals), "search_per_min": len(evals) / search_s * 60, "cand_s": per_cand,
            "overhead_s": overhead, "wall_s": wall}


def same_logs(a, b) -> str:
    """'identical (best: candidate N)' or what differs."""
    import json

    from evomerge.search.rundir import read_jsonl

    keys = {"calibration": lambda x: x["name"], "evaluations": lambda x: x["index"],
            "racing": lambda x: (x["index"], x["stage"], x["phase"]), "heldout": lambda x: x["name"]}
    for name, key in keys.items():
        la, lb = ({key(x): {k: v for k, v in x.items() if k not in ("timings", "seconds")}
                   for x in read_jsonl(getattr(rd, name))} for rd in (a, b))
        if la != lb:
            return f"DIFFERENT ({name}: {sum(la.get(k) != lb.get(k) for k in set(la) | set(lb))} lines)"
    best_a, best_b = (json.loads((rd.best / "recipe.json").read_text()) for rd in (a, b))
    if best_a["index"] != best_b["index"]:
        return f"DIFFERENT best ({best_a['index']} vs {best_b['index']})"
    return f"identical (best: candidate {best_a['index']}, held-out average {best_a['heldout_average']:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--samples", type=int, default=12, help="calibration samples")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run("local", 1, args.generations, args.samples, Path(tmp)))
        rows.append(run("ray", args.workers, args.generations, args.samples, Path(tmp)))
        same = same_logs(rows[0]["rd"], rows[1]["rd"])
    print(f"\nthe demo, {args.samples} calibration samples, {args.generations} generations "
          f"({rows[0]['candidates']} candidates)")
    head = (f"{'executor':<10}{'calib models/min':>18}{'calib job s':>13}{'search cand/min':>17}"
            f"{'cand s (job)':>14}{'driver s/cand':>15}{'wall s':>9}")
    print(head + "\n" + "-" * len(head))
    for r in rows:
        print(f"{r['executor']:<10}{r['calib_per_min']:>18.1f}{r['calib_job_s']:>13.2f}{r['search_per_min']:>17.1f}"
              f"{r['cand_s']:>14.2f}{r['overhead_s']:>15.3f}{r['wall_s']:>9.0f}")
    print(f"\nthe two runs' logs (calibration, evaluations, racing, held-out; order and timings aside) and "
          f"best: {same}")
    base, pool = rows
    print(f"\nspeed-up with {args.workers} workers: calibration {pool['calib_per_min'] / base['calib_per_min']:.2f}x, "
          f"search {pool['search_per_min'] / base['search_per_min']:.2f}x")
    t, o = base["cand_s"], max(pool["overhead_s"], 1e-3)
    print(f"\non paper, G GPUs (one worker each; a candidate takes t = {t:.2f} s in a worker here, the "
          f"driver ~{o * 1000:.0f} ms per candidate):")
    pop = max(4, rows[0]["candidates"] // args.generations)
    for g in (1, 2, 4, 8):
        rate = min(g / t, 1 / o) * (1 - (g - 1) / (2 * pop) if g > 1 else 1)
        print(f"  G = {g}: ~{rate * 60:.0f} candidates/min (population {pop})")


if __name__ == "__main__":
    main()
