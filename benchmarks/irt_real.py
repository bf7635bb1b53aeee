"""Few-item accuracy estimates on real public response matrices, procedure chosen honestly (issue 18).

Protocol per response matrix (subjects × items, 0/1): 4 folds over the subjects; for each fold
the item bank is fitted on the other subjects (the training part) and every held-out subject is
estimated from ``n`` of its answers (n = 10, 20, 40). The procedure (estimator × anchor design ×
rounds × bank dimension) is chosen on the training part only, by cross-fitting inside it
(:func:`irt.choose_procedure`, 4 inner folds) — nothing about the held-out subjects is seen.

Columns (mean absolute error of the estimated full accuracy over all held-out subjects):
  plain      the plain mean of n random items (averaged over 20 random item sets)
  default    today's default procedure: p-IRT on information anchors, 1 round (mp-IRT with endpoints;
             on the zoo rows the demo's: mp-IRT, adaptive in 4 rounds)
  before     chosen per fold among the procedures the package offered before issue 18
             (p-IRT / gp-IRT × random / info / irt anchors, adaptive p-IRT 4 rounds; d by validation)
  after      chosen per fold by ``irt.choose_procedure`` among its default candidates
  cmean/strata  one fixed procedure: the calibrated mean on difficulty-stratified anchors (no choice)
  1-SE rule  the same candidates, chosen by the one-standard-error rule (``se=1``): the first of two
             procedures -- the default then cmean/strata (what ``fitness.estimator: auto`` does), or
             cmean/strata then the default -- kept unless a candidate beats it by more than one
             standard error of the paired per-subject difference (:func:`irt.pick_procedure`)
  ratio      1-SE (cmean/strata first) / plain;  target: that ≤ 0.03 and ratio ≤ 0.5
The guess lever (a fixed lower asymptote c = 0.25 on the four-way multiple-choice sets) was
measured with this script in commit b5bdb6f and removed: it did not help (docs/irt_real.md).

Data (none of it is shipped; fetch it as below):
  * OpenCompass results of 12 LLMs on 11 benchmarks (ARC-C, BBH, Chinese SimpleQA, GPQA Diamond,
    GSM8K, HellaSwag, HumanEval, MATH, MBPP, MMLU, TheoremQA), the binary matrix ``data/combine.csv``
    of github.com/Joe-Hall-Lee/PSN-IRT (Zhou et al. 2025, "Lost in Benchmarks?"):
        git clone https://github.com/Joe-Hall-Lee/PSN-IRT && export IRT_REAL_PSN=PSN-IRT/data/combine.csv
    The column ranges of the benchmarks are those of the repository's analysis/irt_statistics.py.
  * any other matrix in an irt.io format (CSV / JSONL / npz), ``--matrix NAME=PATH`` (repeatable).
  * HELM (Liang et al. 2022) scenarios as github.com/felipemaiapolo/efficbench publishes them in
    data/irt_helm/ (py-irt jsonlines: {"subject_id", "responses": {item: 0/1}}), ``--helm-jsonl
    NAME=GLOB``. Each file holds the models outside one fold, renumbered, so one file is 24 models
    (the issue's acceptance sets: ``row-12:13:14:15_scenario-mmlu``, ``-boolq:``, ``-commonsense:
    dataset=hellaswag,...``); several files of a scenario are merged by identical answer rows (28
    models). The repository is 910 MB: ``git clone --filter=blob:none --sparse`` it and
    ``git sparse-checkout set data/irt_helm``. docs/irt_real.md has the numbers and how they were read.
  * ChemBench (Mirza et al. 2024) as published by github.com/lamalab-org/irt-on-bench (MIT):
    ``results/binary_matrix.csv``, 2,854 questions × 22 models (questions are rows there):
        ``--chembench irt-on-bench/results/binary_matrix.csv``
  * SWE-bench Verified, bash-only board (24 systems × 500 instances, per-instance resolved): the
    leaderboard file of github.com/SWE-bench/swe-bench.github.io, ``data/leaderboards.json`` (the
    version of 2026-12 holds ``per_instance_details`` for that board): ``--swebench PATH``
  * the zoo, from a search run's banks (``--zoo-run RUN_DIR``): every bank (one per task) holds the
    calibration answers of base + experts + ``calibration.samples`` sampled merges, e.g. a run of
    ``benchmarks/irt_real.py --make-zoo-run DIR`` (160 merges, 4 tasks, 200 search items each,
    ~6 min on 2 cores). Protocol: the merges in 4 groups of ``--zoo-calib`` (40); for each group the
    training part is the endpoints + that group (a search's calibration population) and the other
    merges are held out.
  * the zoo (``--zoo``): base, 3 experts and 150 random merges answering each task's search items,
    from ``benchmarks/irt_error.py --zoo``'s cache (.cache/irt_bench); the training part there is the
    endpoints + 40 merges and the other merges are held out.
Sets with more than ``--max-items`` (default 1000) items use a seeded random subset of that
many items (for time; the accuracy to estimate is then the one on that subset).
Sets whose data is absent are skipped with a note (never an error).

Usage:  python benchmarks/irt_real.py [--n 10,20,40] [--sets ARC-C,MMLU] [--psn PATH] [--chembench PATH]
                                     [--swebench PATH] [--zoo-run RUN_DIR] [--matrix NAME=PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irt import ItemBank  # noqa: E402
from irt.choose import DEFAULT_OPTIONS, ENDPOINT_OPTIONS, Procedure, crossfit_procedures, pick_procedure  # noqa: E402
from irt.validate import PLAIN_DRAWS, heldout_estimates  # noqa: E402

PSN_RANGES = {  # first column of each benchmark in PSN-IRT's data/combine.csv (analysis/irt_statistics.py)
    "ARC-C": 0, "BBH": 295, "Chinese SimpleQA": 6806, "GPQA Diamond": 9806, "GSM8K": 10004,
    "HellaSwag": 11323, "HumanEval": 21365, "MATH": 21529, "MBPP": 26529, "MMLU": 27029, "TheoremQA": 41071,
}
OLD_OPTIONS = tuple(Procedure(e, m, 1) for e in ("pirt", "gpirt") for m in ("random", "info", "irt")) + (
    Procedure("pirt", "info", 4),)
OLD_ENDPOINT = (Procedure("mpirt", "info", 1), Procedure("gmpirt", "random", 1), Procedure("mpirt", "info", 4))


def psn_sets(path):
    Y = np.loadtxt(path, delimiter=",", ndmin=2)
    starts = sorted(PSN_RANGES.items(), key=lambda kv: kv[1]) + [("", Y.shape[1])]
    out = {}
    for (name, s), (_, e) in zip(starts[:-1], starts[1:]):
        out[name] = (Y[:, s:e], [f"m{i}" for i in range(len(Y))], [])
    return out


def helm_jsonl(paths):
    """py-irt jsonlines files of one scenario (efficbench's data/irt_helm fold files) as one matrix.

    Each fold file holds the models outside that fold, numbered 0, 1, ... afresh, so a subject id
    does not name the same model in two files; a subject is the same model as one already read
    when all its answers are identical (distinct models differ on dozens of items), else a new one.
    """
    rows = []
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)["responses"]
                y = [r[k] for k in sorted(r, key=lambda s: (len(s), s))]
                if y not in rows:
                    rows.append(y)
    if len({len(y) for y in rows}) > 1:
        raise SystemExit(f"{paths}: the files' subjects answer different numbers of items")
    Y = np.array(rows, dtype=float)
    return Y, [f"m{i}" for i in range(len(Y))]


def chembench_set(path):
    """irt-on-bench's results/binary_matrix.csv: questions × models (first column: question index)."""
    import csv

    with open(path) as f:
        rows = list(csv.reader(f))
    names = rows[0][1:]
    Y = np.array([[float(v) if v != "" else np.nan for v in r[1:]] for r in rows[1:]]).T
    return Y, names


def swebench_set(path, board="bash-only"):
    """SWE-bench's leaderboard file (swe-bench.github.io data/leaderboards.json): the systems of
    ``board`` that publish per-instance results, as systems × instances (1 = resolved). A system whose
    per-instance mean differs from its reported score by more than one point is left out (the two
    disagree there, so its per-instance record is not the run it reports)."""
    data = json.loads(Path(path).read_text())
    boards = {b["name"]: b["results"] for b in data["leaderboards"]}
    rows, names = [], []
    for r in boards[board]:
        per = r.get("per_instance_details") or {}
        if not per:
            continue
        mean = 100 * np.mean([bool(v["resolved"]) for v in per.values()])
        if abs(mean - float(r["resolved"])) > 1.0:
            print(f"SWE-bench {board}: {r['name']} left out (per-instance {mean:.1f} vs reported {r['resolved']})")
            continue
        rows.append(per)
        names.append(r["name"])
    items = sorted(set().union(*rows))
    Y = np.array([[float(bool(per[i]["resolved"])) if i in per else np.nan for i in items] for per in rows])
    return Y, names


def zoo_run_sets(run_dir):
    """One set per task from a search run's banks: (responses, subject names, endpoints)."""
    from irt import ItemBank

    banks = Path(run_dir) / "banks"
    out = {}
    for p in sorted(banks.glob("*.bank.safetensors")):
        bank = ItemBank.load(p)
        if bank.responses is None:
            continue
        names = bank.subject_names
        out[f"zoo {p.name.removesuffix('.bank.safetensors')}"] = (
            bank.responses, names, [n for n in names if not n.startswith("sample-")])
    return out


def make_zoo_run(root, samples=160, tasks=("lang", "cipher", "upper", "cipher_choice"), items=200):
    """A small search run on the zoo (demo config; 1 generation) whose banks hold the calibration
    answers of base + experts + ``samples`` sampled merges on ``items`` search items per task."""
    import yaml

    from evomerge.config import parse_config
    from evomerge.search.loop import run_search

    cfg = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    cfg["run_dir"] = str(Path(root) / "run")
    cfg["tasks"] = [{"zoo": t, "search_limit": items} for t in tasks]
    cfg["calibration"] = {"samples": samples, "dim": 2}  # the banks only carry the answers here
    cfg["optimizer"].update(generations=1, population=4)
    cfg["final"].update(top_k=1, write_model=False, baselines=False)
    return run_search(parse_config(cfg), log=print).root


def group_splits(names, endpoints, size, seed, folds=4):
    """Training parts of endpoints + ``size`` merges (``folds`` disjoint groups); the other merges held out."""
    rng = np.random.default_rng(seed)
    ends = np.array([i for i, s in enumerate(names) if s in endpoints])
    merges = rng.permutation([i for i, s in enumerate(names) if s not in endpoints])
    k = min(folds, len(merges) // size)
    out = []
    for j in range(k):
        grp = merges[j * size:(j + 1) * size]
        train = np.sort(np.concatenate([ends, grp]))
        out.append((train, np.setdiff1d(np.arange(len(names)), train)))
    return out


def _drop_constant(Y):
    keep = np.nanstd(Y, axis=0) > 0
    return Y[:, keep] if keep.sum() >= 2 else Y


def _choose(maes, options, pool, default):
    ks = [options.index(p) for p in pool if p in options]
    best = min(ks, key=lambda k: maes[k])
    kd = options.index(default)
    return options[best] if maes[best] < maes[kd] else options[kd]


PLAIN = Procedure("mean", "random", 1)


CALIBRATED = Procedure("cmean", "strata", 1)


def _choose_se(err, options, pool, first, then, se=1.0):
    """The one-standard-error rule among ``pool``: ``first``, then ``then``, unless clearly beaten."""
    rows = [options.index(p) for p in dict.fromkeys([first, then, *pool]) if p in options]
    k = pick_procedure(err[rows], 0, se=se, prefer=[1] if options[rows[1]] == then else [])
    return options[rows[k]]


def evaluate(Y, names, endpoints, n_list, *, folds=4, seed=0, train_override=None, inner_folds=4, quiet=False,
             default=None):
    """One matrix: returns {n: {plain, default, before, after, after_se, and the choices per fold}}."""
    M, N = Y.shape
    endpoints = list(endpoints)
    new_opts = list(DEFAULT_OPTIONS) + (list(ENDPOINT_OPTIONS) if endpoints else [])
    old_opts = list(OLD_OPTIONS) + (list(OLD_ENDPOINT) if endpoints else [])
    if default is None:
        default = Procedure("mpirt", "info", 1) if endpoints else Procedure("pirt", "info", 1)
    allopts = list(dict.fromkeys([default, *old_opts, *new_opts, CALIBRATED]))
    rng = np.random.default_rng(seed)
    others = np.array([m for m in range(M) if names[m] not in endpoints])
    if train_override is not None:
        splits = train_override
    else:
        groups = np.array_split(rng.permutation(others), folds)
        splits = [(np.setdiff1d(np.arange(M), g), g) for g in groups]
    res = {n: {"plain": [], "default": [], "cal": [], "before": [], "after": [], "cb": [], "ca": [], "after_se": [],
               "cse": [], "after_se2": [], "cse2": []} for n in n_list}
    for train, g in splits:
        truth = np.nanmean(Y[g], axis=1)
        tn = [names[m] for m in train]
        banks = {}

        def bank_for(dim):
            if dim not in banks:
                banks[dim] = ItemBank.fit(Y[train], None, tn, dim=dim if dim is not None or len(train) >= 5 else 1,
                                          seed=seed)
            return banks[dim]

        for n in n_list:
            n_ = min(n, N)
            opts, err, _, _ = crossfit_procedures(Y[train], None, tn, options=allopts, n=n_, endpoints=endpoints,
                                                  folds=inner_folds, seed=seed)
            maes = np.abs(err).mean(1)
            pb = _choose(maes, opts, old_opts, default)
            pa = _choose(maes, opts, new_opts, default)
            pse = _choose_se(err, opts, new_opts, default, CALIBRATED)
            pse2 = _choose_se(err, opts, new_opts, CALIBRATED, default)
            res[n]["cse"].append(pse.name)
            res[n]["cse2"].append(pse2.name)
            todo = [("default", default), ("cal", CALIBRATED), ("before", pb), ("after", pa), ("after_se", pse),
                    ("after_se2", pse2)]
            for key, p in todo:
                bank = bank_for(p.dim)
                E = bank.subject_theta(endpoints) if p.estimator in ("mpirt", "gmpirt") else None
                est = heldout_estimates(bank, Y[g], n_, estimator=p.estimator, anchor_method=p.anchor_method,
                                        rounds=p.rounds, endpoint_theta=E, seed=seed)
                res[n][key].extend(np.abs(est - truth))
            res[n]["cb"].append(pb.name)
            res[n]["ca"].append(pa.name)
            picks = [rng.choice(N, n_, replace=False) for _ in range(PLAIN_DRAWS)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                res[n]["plain"].extend(np.nanmean([np.abs(np.nanmean(Y[np.ix_(g, p)], axis=1) - truth)
                                                   for p in picks], axis=0))
    return {n: {k: (float(np.mean(v)) if k not in ("cb", "ca", "cse", "cse2") else v) for k, v in r.items()}
            for n, r in res.items()}


def _fmt_choices(c):
    from collections import Counter
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in Counter(c).most_common())


def print_table(rows, n):
    print(f"\n### {n} items per subject\n")
    print("| set | subjects × items | plain mean | default | cmean/strata | before (chosen) | after (chosen) "
          "| 1-SE, default first | 1-SE, cmean/strata first | that / plain | target | chosen, smallest (per fold) "
          "| chosen, 1-SE default first | chosen, 1-SE cmean/strata first |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for name, shape, r in rows:
        x = r[n]
        ok = x["after_se2"] <= 0.03 and x["after_se2"] <= 0.5 * x["plain"]
        print(f"| {name} | {shape[0]} × {shape[1]} | {x['plain']:.3f} | {x['default']:.3f} | {x['cal']:.3f} | "
              f"{x['before']:.3f} | {x['after']:.3f} | {x['after_se']:.3f} | **{x['after_se2']:.3f}** | "
              f"{x['after_se2'] / x['plain']:.2f} | {'met' if ok else 'not met'} | {_fmt_choices(x['ca'])} "
              f"| {_fmt_choices(x['cse'])} | {_fmt_choices(x['cse2'])} |")
    sys.stdout.flush()


def zoo_sets(cache):
    from irt.io import read_responses

    out = {}
    for p in sorted(Path(cache).glob("zoo_*.npz")):
        Y, _, names = read_responses(p)
        out[f"zoo {p.stem[4:]}"] = (Y, names, [nm for nm in names if nm == "base" or nm.endswith("_expert")])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", default="10,20,40")
    ap.add_argument("--psn", default=os.environ.get("IRT_REAL_PSN"), help="PSN-IRT data/combine.csv")
    ap.add_argument("--sets", default=None, help="comma-separated subset of set names")
    ap.add_argument("--matrix", action="append", default=[], help="NAME=PATH (irt.io format), repeatable")
    ap.add_argument("--helm-jsonl", action="append", default=[], help="NAME=GLOB of py-irt jsonlines fold files")
    ap.add_argument("--zoo", action="store_true", help="add the zoo tasks (needs irt_error.py --zoo's cache)")
    ap.add_argument("--zoo-cache", default=str(ROOT / ".cache" / "irt_bench"))
    ap.add_argument("--zoo-calib", type=int, default=40)
    ap.add_argument("--make-zoo-run", default=None, help="first run the zoo search whose banks --zoo-run reads, here")
    ap.add_argument("--zoo-run", default=None, help="a search run directory whose banks hold the zoo's calibration answers")
    ap.add_argument("--chembench", default=os.environ.get("IRT_REAL_CHEMBENCH"),
                    help="irt-on-bench's results/binary_matrix.csv")
    ap.add_argument("--swebench", default=os.environ.get("IRT_REAL_SWEBENCH"),
                    help="swe-bench.github.io's data/leaderboards.json (bash-only board: per-instance results)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-items", type=int, default=1000,
                    help="larger sets: a seeded random subset of this many items (the target is then the "
                         "accuracy on that subset; 0 = all items)")
    args = ap.parse_args(argv)
    if args.make_zoo_run:
        args.zoo_run = str(make_zoo_run(args.make_zoo_run))
    n_list = [int(x) for x in args.n.split(",")]
    sets = {}
    if args.psn and Path(args.psn).is_file():
        sets.update(psn_sets(args.psn))
    else:
        print("PSN-IRT matrix absent (set IRT_REAL_PSN or --psn; see the module docstring): skipped")
    from irt.io import read_responses
    for spec in args.matrix:
        name, path = spec.split("=", 1)
        if Path(path).is_file():
            Y, _, names = read_responses(path)
            sets[name] = (Y, names, [])
        else:
            print(f"{name}: {path} absent, skipped")
    if args.chembench and Path(args.chembench).is_file():
        Y, names = chembench_set(args.chembench)
        sets["ChemBench"] = (Y, names, [])
    if args.swebench and Path(args.swebench).is_file():
        Y, names = swebench_set(args.swebench)
        sets["SWE-bench Verified (bash-only)"] = (Y, names, [])
    for spec in args.helm_jsonl:
        import glob
        name, pat = spec.split("=", 1)
        files = sorted(glob.glob(pat))
        if files:
            Y, names = helm_jsonl(files)
            sets[name] = (Y, names, [])
        else:
            print(f"{name}: no file matches {pat}, skipped")
    keep = [s.strip() for s in args.sets.split(",")] if args.sets else None
    if keep:
        sets = {k: v for k, v in sets.items() if k in keep}
    rows = []
    t0 = time.time()
    for name, (Y, names, endpoints) in sets.items():
        Y = _drop_constant(Y)
        if args.max_items and Y.shape[1] > args.max_items:
            cols = np.sort(np.random.default_rng(args.seed).choice(Y.shape[1], args.max_items, replace=False))
            Y = Y[:, cols]
        t = time.time()
        r = evaluate(Y, names, endpoints, n_list, seed=args.seed)
        rows.append((name, Y.shape, r))
        print(f"{name}: {Y.shape[0]} × {Y.shape[1]} in {time.time() - t:.0f} s; at {n_list[len(n_list) // 2]}: "
              + ", ".join(f"{k} {r[n_list[len(n_list) // 2]][k]:.3f}"
                          for k in ("plain", "default", "cal", "before", "after", "after_se", "after_se2")),
              flush=True)
    if args.zoo_run:
        zs = zoo_run_sets(args.zoo_run)
        if not zs:
            print(f"no bank with calibration answers in {args.zoo_run}/banks: skipped")
        for name, (Y, names, endpoints) in zs.items():
            if args.sets and name not in keep:
                continue
            t = time.time()
            splits = group_splits(names, endpoints, args.zoo_calib, args.seed)
            r = evaluate(Y, names, endpoints, n_list, seed=args.seed, train_override=splits,
                         default=Procedure("mpirt", "info", 4))  # the demo's: adaptive, 4 rounds
            rows.append((name, Y.shape, r))
            print(f"{name}: {Y.shape[0]} × {Y.shape[1]}, {len(splits)} training parts of {len(endpoints)} endpoints "
                  f"+ {args.zoo_calib} merges, in {time.time() - t:.0f} s", flush=True)
    if args.zoo:
        zs = zoo_sets(args.zoo_cache)
        if not zs:
            print(f"zoo responses absent in {args.zoo_cache} (run benchmarks/irt_error.py --zoo first): skipped")
        for name, (Y, names, endpoints) in zs.items():
            t = time.time()
            rng = np.random.default_rng(args.seed)
            ends = [i for i, s in enumerate(names) if s in endpoints]
            merges = [i for i, s in enumerate(names) if s not in endpoints]
            calib = rng.choice(merges, args.zoo_calib, replace=False)
            train = np.sort(np.concatenate([ends, calib]))
            test = np.setdiff1d(np.arange(len(names)), train)
            r = evaluate(Y, names, endpoints, n_list, seed=args.seed, train_override=[(train, test)])
            rows.append((name, Y.shape, r))
            print(f"{name}: in {time.time() - t:.0f} s", flush=True)
    for n in n_list:
        print_table(rows, n)
    print(f"\ntotal {time.time() - t0:.0f} s")
    return rows


if __name__ == "__main__":
    main()
