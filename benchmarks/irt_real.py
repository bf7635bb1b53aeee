"""Few-item accuracy estimates on real public response matrices, procedure chosen honestly (issue 18).

Protocol per response matrix (subjects × items, 0/1): 4 folds over the subjects; for each fold
the item bank is fitted on the other subjects (the training part) and every held-out subject is
estimated from ``n`` of its answers (n = 10, 20, 40). The procedure (estimator × anchor design ×
rounds × bank dimension) is chosen on the training part only, by cross-fitting inside it
(:func:`irt.choose_procedure`, 4 inner folds) — nothing about the held-out subjects is seen.

Columns (mean absolute error of the estimated full accuracy over all held-out subjects):
  plain      the plain mean of n random items (averaged over 20 random item sets)
  default    today's default procedure: p-IRT on information anchors, 1 round (mp-IRT with endpoints)
  before     chosen per fold among the procedures the package offered before issue 18
             (p-IRT / gp-IRT × random / info / irt anchors, adaptive p-IRT 4 rounds; d by validation)
  after      chosen per fold by ``irt.choose_procedure`` among its default candidates
  ratio      after / plain;  target: after ≤ 0.03 and ratio ≤ 0.5

Data (none of it is shipped: the sources carry no licence that allows redistribution):
  * OpenCompass results of 12 LLMs on 11 benchmarks (ARC-C, BBH, Chinese SimpleQA, GPQA Diamond,
    GSM8K, HellaSwag, HumanEval, MATH, MBPP, MMLU, TheoremQA), the binary matrix ``data/combine.csv``
    of github.com/Joe-Hall-Lee/PSN-IRT (Zhou et al. 2025, "Lost in Benchmarks?"):
        git clone https://github.com/Joe-Hall-Lee/PSN-IRT && export IRT_REAL_PSN=PSN-IRT/data/combine.csv
    The column ranges of the benchmarks are those of the repository's analysis/irt_statistics.py.
  * any other matrix in an irt.io format (CSV / JSONL / npz), ``--matrix NAME=PATH`` (repeatable),
    e.g. HELM scenarios of github.com/felipemaiapolo/efficbench converted with ``--helm-jsonl``
    (py-irt jsonlines: {"subject_id", "responses": {item: 0/1}}; fold files of one scenario are merged
    by subject id).
  * the zoo (``--zoo``): base, 3 experts and 150 random merges answering each task's search items,
    from ``benchmarks/irt_error.py --zoo``'s cache (.cache/irt_bench); the training part there is the
    endpoints + 40 merges (the search's calibration population) and the other merges are held out.
Sets with more than ``--max-items`` (default 1000) items use a seeded random subset of that
many items (for time; the accuracy to estimate is then the one on that subset).
Sets whose data is absent are skipped with a note (never an error).

Usage:  python benchmarks/irt_real.py [--n 10,20,40] [--sets ARC-C,MMLU] [--zoo] [--matrix NAME=PATH]
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
from irt.choose import DEFAULT_OPTIONS, ENDPOINT_OPTIONS, Procedure, crossfit_procedures  # noqa: E402
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
    """Merge py-irt jsonlines files (one scenario, several fold files) into one matrix by subject id."""
    rows = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                rows.setdefault(str(r["subject_id"]), {}).update(r["responses"])
    items = sorted({k for r in rows.values() for k in r}, key=lambda s: (len(s), s))
    names = sorted(rows, key=lambda s: (len(s), s))
    Y = np.array([[rows[s].get(i, np.nan) for i in items] for s in names], dtype=float)
    return Y, names


def _drop_constant(Y):
    keep = np.nanstd(Y, axis=0) > 0
    return Y[:, keep] if keep.sum() >= 2 else Y


def _choose(maes, options, pool, default):
    ks = [options.index(p) for p in pool if p in options]
    best = min(ks, key=lambda k: maes[k])
    kd = options.index(default)
    return options[best] if maes[best] < maes[kd] else options[kd]


def evaluate(Y, names, endpoints, n_list, *, folds=4, seed=0, train_override=None, inner_folds=4, quiet=False):
    """One matrix: returns {n: {plain, default, before, after, choices_before, choices_after}}."""
    M, N = Y.shape
    endpoints = list(endpoints)
    new_opts = list(DEFAULT_OPTIONS) + (list(ENDPOINT_OPTIONS) if endpoints else [])
    old_opts = list(OLD_OPTIONS) + (list(OLD_ENDPOINT) if endpoints else [])
    default = Procedure("mpirt", "info", 1) if endpoints else Procedure("pirt", "info", 1)
    allopts = list(dict.fromkeys([default, *old_opts, *new_opts]))
    rng = np.random.default_rng(seed)
    others = np.array([m for m in range(M) if names[m] not in endpoints])
    if train_override is not None:
        splits = train_override
    else:
        groups = np.array_split(rng.permutation(others), folds)
        splits = [(np.setdiff1d(np.arange(M), g), g) for g in groups]
    res = {n: {"plain": [], "default": [], "before": [], "after": [], "cb": [], "ca": []} for n in n_list}
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
            for key, p in (("default", default), ("before", pb), ("after", pa)):
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
    return {n: {k: (float(np.mean(v)) if k not in ("cb", "ca") else v) for k, v in r.items()} for n, r in res.items()}


def _fmt_choices(c):
    from collections import Counter
    return ", ".join(f"{k}×{v}" if v > 1 else k for k, v in Counter(c).most_common())


def print_table(rows, n):
    print(f"\n### {n} items per subject\n")
    print("| set | subjects × items | plain mean | default | before (chosen) | after (chosen) | after / plain "
          "| target | chosen after (per fold) |")
    print("|---|---|---:|---:|---:|---:|---:|---|---|")
    for name, shape, r in rows:
        x = r[n]
        ok = x["after"] <= 0.03 and x["after"] <= 0.5 * x["plain"]
        print(f"| {name} | {shape[0]} × {shape[1]} | {x['plain']:.3f} | {x['default']:.3f} | {x['before']:.3f} | "
              f"**{x['after']:.3f}** | {x['after'] / x['plain']:.2f} | {'met' if ok else 'not met'} "
              f"| {_fmt_choices(x['ca'])} |")
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-items", type=int, default=1000,
                    help="larger sets: a seeded random subset of this many items (the target is then the "
                         "accuracy on that subset; 0 = all items)")
    args = ap.parse_args(argv)
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
    for spec in args.helm_jsonl:
        import glob
        name, pat = spec.split("=", 1)
        files = sorted(glob.glob(pat))
        if files:
            Y, names = helm_jsonl(files)
            sets[name] = (Y, names, [])
        else:
            print(f"{name}: no file matches {pat}, skipped")
    if args.sets:
        keep = [s.strip() for s in args.sets.split(",")]
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
              + ", ".join(f"{k} {r[n_list[len(n_list) // 2]][k]:.3f}" for k in ("plain", "default", "before", "after")),
              flush=True)
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
