"""Do more generations buy a better merge? The final best after 10, 30 and 100 generations.

For each seed, two runs of the demo config (default configs/demo.yaml), each extended in place
the way a user extends a run (finish at 10 generations, resume to 30, resume to 100; every
finish re-selects the top-k and re-evaluates them on the held-out items):

- ``before``: the loop as it was before racing — every candidate answers the anchors only, the
  optimizer continues after convergence, the top-k by fitness (near-copies allowed), no
  sharpening (``fitness.racing.stages: 0``, ``optimizer.on_converge: continue``,
  ``final.sharpen: false``, ``final.min_distance: 0``);
- ``now``: the defaults (racing, IPOP restarts on convergence, sharpened and distinct finalists).

Both runs of a seed share one calibration (the ``now`` run reuses the ``before`` run's banks),
so the difference is the loop alone. Prints, per seed and mode, the held-out average of the
final best at each point, the items answered by candidates so far (calibration excluded), and
the restarts; then the mean over seeds and the two checks of the issue: more generations never
lower the result by more than 0.005, and the best at the last point is at least the first's.

    .venv/bin/python benchmarks/long_run.py [--config configs/demo.yaml] [--seeds 0,1,2]
        [--points 10,30,100] [--out populations/long_run] [--jobs 2]

Rerunning with the same ``--out`` resumes every run where it stopped (a killed benchmark loses
nothing; a finished point is replayed from the log and finishes again, cheaply).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BEFORE = {"fitness": {"racing": {"stages": 0}}, "optimizer": {"on_converge": "continue"},
          "final": {"sharpen": False, "min_distance": 0.0}}
MODES = {"before": BEFORE, "now": {}}


def answered(run: Path, generations: int) -> int:
    """Items answered by the candidates of the first ``generations`` generations (stage 0 + every
    racing and final increment), calibration excluded."""
    from evomerge.search.rundir import read_jsonl

    evals = [r for r in read_jsonl(run / "evaluations.jsonl") if r["generation"] < generations]
    prev = {r["index"]: r["items"] for r in evals}
    total = sum(prev.values())
    lines = read_jsonl(run / "racing.jsonl") if (run / "racing.jsonl").exists() else []
    for x in sorted(lines, key=lambda x: (x["index"], x["stage"])):
        if x["index"] in prev:
            total += x["items"] - prev[x["index"]]
            prev[x["index"]] = x["items"]
    return total


def chain(base_cfg: dict, seed: int, mode: str, points: list[int], out: Path, banks: Path | None) -> list[dict]:
    """One run extended point by point, each step in its own process (as a user would)."""
    cfg = json.loads(json.dumps(base_cfg))
    cfg["seed"] = seed
    cfg["name"] = f"long-{mode}-s{seed}"
    run = out / f"seed{seed}-{mode}"
    cfg["run_dir"] = str(run)
    cfg["final"].update(write_model=False, baselines=False)
    for section, values in MODES[mode].items():
        for k, v in values.items():
            if isinstance(v, dict):
                cfg[section].setdefault(k, {}).update(v)
            else:
                cfg[section][k] = v
    if banks is not None:
        cfg["calibration"]["banks"] = str(banks)
    rows = []
    for gens in points:
        cfg["optimizer"]["generations"] = gens
        path = out / f"seed{seed}-{mode}-{gens}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        # an existing run is resumed: to a later point it searches on; to an earlier one it replays
        # that many generations from its log and finishes there (held-out results are cached)
        args = ["search", str(path)] + (["--resume", str(run)] if (run / "config.yaml").exists() else [])
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"{' '.join(args)} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        best = json.loads((run / "best" / "recipe.json").read_text())
        log = p.stdout
        rows.append({"seed": seed, "mode": mode, "generations": gens, "heldout": best["heldout_average"],
                     "estimate": best["fitness"], "best_generation": best["generation"],
                     "items": answered(run, gens), "restarts": log.count("; restart "),
                     "stopped": "stopping the generations" in log, "wall_s": time.perf_counter() - t0})
        print(f"  seed {seed} {mode:>6} {gens:4d} gens: held-out {best['heldout_average']:.3f} "
              f"(estimate {float(best['fitness']):.3f}, from generation {best['generation']}), "
              f"{rows[-1]['items']:,} items, {rows[-1]['wall_s']:.0f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--points", default="10,30,100")
    ap.add_argument("--out", default=str(REPO / "populations" / "long_run"))
    ap.add_argument("--jobs", type=int, default=2, help="runs side by side (processes); a 'now' run waits "
                    "for its seed's 'before' calibration")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    points = [int(p) for p in a.points.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = yaml.safe_load(Path(a.config).read_text())

    tasks = [t["zoo"] if "zoo" in t else t["name"] for t in base_cfg["tasks"]]

    def one_chain(job: tuple[int, str]) -> list[dict]:
        seed, mode = job
        if mode == "before":
            return chain(base_cfg, seed, mode, points, out, None)
        banks = out / f"seed{seed}-before" / "banks"
        while not all((banks / f"{t}.bank.safetensors").exists() for t in tasks):
            time.sleep(5)  # the before run's calibration first: both modes share it
        return chain(base_cfg, seed, mode, points, out, banks)

    t0 = time.perf_counter()
    jobs = sorted(((s, m) for s in seeds for m in MODES), key=lambda j: (j[0] // max(1, a.jobs // 2), j[1] != "before"))
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = [r for rs in pool.map(one_chain, jobs) for r in rs]
    (out / "results.json").write_text(json.dumps(rows, indent=1))

    print(f"\nheld-out average of the final best ({a.config}, {len(seeds)} seeds, "
          f"{time.perf_counter() - t0:.0f} s)\n")
    head = f"{'seed':>4} {'mode':>7}" + "".join(f"{f'{p} gens':>12}" for p in points) + \
        "".join(f"{f'items@{p}':>12}" for p in points) + f"{'restarts':>10}"
    print(head)
    print("-" * len(head))
    for seed in seeds:
        for mode in MODES:
            rs = [r for r in rows if r["seed"] == seed and r["mode"] == mode]
            print(f"{seed:>4} {mode:>7}" + "".join(f"{r['heldout']:>12.3f}" for r in rs)
                  + "".join(f"{r['items']:>12,}" for r in rs) + f"{rs[-1]['restarts']:>10}")
    for mode in MODES:
        means = [statistics.mean(r["heldout"] for r in rows if r["mode"] == mode and r["generations"] == p)
                 for p in points]
        print(f"{'mean':>4} {mode:>7}" + "".join(f"{m:>12.3f}" for m in means))
    for mode in MODES:
        drops, below = [], []
        for seed in seeds:
            h = [r["heldout"] for r in rows if r["seed"] == seed and r["mode"] == mode]
            drops += [h[i] - max(h[:i]) for i in range(1, len(h)) if h[i] < max(h[:i]) - 0.005]
            below += [seed] if h[-1] < h[0] else []
        print(f"\n{mode}: more generations lowered the result by > 0.005: "
              f"{'never' if not drops else f'{len(drops)}x (worst {min(drops):+.3f})'}; "
              f"last point below the first: {'never' if not below else f'seeds {below}'}")


if __name__ == "__main__":
    main()
