"""How many calibration subjects does a 20-item estimate need? Error against calibration size (issue 18).

Issue 18's target is a mean absolute error ≤ 0.03 (and ≤ 0.5 × the plain mean of n random items)
on every real response matrix, with the bank fitted on the 18 training models of a 24-model set.
This script measures how the error of the few-item procedures falls as the calibration
population grows, two ways:

``real``  On a real matrix (e.g. HELM's 28-model sets): for each size k, ``--splits`` random
          splits into k calibration subjects and the rest held out; the bank is fitted on the k,
          every held-out subject is estimated from n of its answers. Sizes are limited by the
          matrix (k ≤ subjects − 2).
``sim``   A universe shaped like the same matrix: a 2PL bank (d chosen by validation) fitted on
          all its subjects defines the items; new subjects' abilities are drawn from a normal
          with the fitted abilities' mean and covariance, answers from the model. For each size k
          a fresh calibration population of k simulated subjects, a bank fitted on it, and
          ``--heldout`` simulated subjects estimated; the truth is each one's accuracy on the items.
          The model is right by construction, so this is the best case for IRT: what is left is
          the calibration noise and the sampling of n items.
``zoo``   evomerge's own regime: a search run's banks (``irt_real.py --make-zoo-run``: base + 3
          experts + 160 sampled merges answering 200 items of each zoo task). Calibration = the
          endpoints + k sampled merges, the other merges held out; mp-IRT (the demo's estimator)
          among the columns. This is the table to size ``calibration.samples`` by.

Columns: fixed procedures (no choice; irt.estimators / irt.anchors names), ``chosen`` = the
procedure picked on the calibration subjects alone by ``irt.choose_procedure`` with the
one-standard-error rule, cmean/strata first (as ``irt check --auto --se 1 -e cmean -m strata``);
``plain`` = the plain mean of n random items. Mean absolute error of the estimated accuracy.

Usage:  python benchmarks/irt_calibration_size.py [--matrix "HELM BoolQ=PATH" ...] [--zoo-run RUN]
            [--sizes 9,14,18,21,24] [--sim-sizes 18,40,100,200] [--zoo-sizes 10,20,40,80,120]
            [--n 20] [--splits 6] [--no-choose]
Any irt.io matrix (CSV / JSONL / npz, subjects × items) works; docs/irt_real.md says where the
HELM matrices come from (they are not shipped).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from irt import ItemBank, choose_procedure  # noqa: E402
from irt.choose import DEFAULT_OPTIONS, Procedure  # noqa: E402
from irt.io import read_responses  # noqa: E402
from irt.validate import PLAIN_DRAWS, heldout_estimates  # noqa: E402

CALIBRATED = Procedure("cmean", "strata", 1)
FIXED = (CALIBRATED, Procedure("gpirt", "strata", 1), Procedure("pirt", "info", 4), Procedure("gpirt", "correctness", 1))
ZOO_DEFAULT = Procedure("mpirt", "info", 4)  # the demo's estimator: mp-IRT, adaptive in 4 rounds
ZOO_FIXED = (ZOO_DEFAULT, Procedure("pirt", "info", 4), CALIBRATED)


def estimate_errors(Y_train, Y_held, n, procedures, *, choose, seed, names=None, endpoints=()):
    """|estimate − accuracy| of every held-out row for each procedure (+ plain, + chosen).
    ``names``: the training subjects' names, ``endpoints`` among them (for mp-IRT)."""
    keep = np.nanstd(Y_train, axis=0) > 0  # the bank cannot fit items the calibration answers alike
    Yt, Yh = Y_train[:, keep], Y_held[:, keep]
    truth = np.nanmean(Y_held, axis=1)  # accuracy on every item, the constant ones included
    const_share = 1.0 - keep.mean()
    const_correct = np.nanmean(Y_train[0, ~keep]) if const_share > 0 else 0.0

    def full(est):  # the estimate on the kept items, mapped to all items
        return (1.0 - const_share) * est + const_share * const_correct

    out = {}
    rng = np.random.default_rng(seed)
    picks = [rng.choice(Y_held.shape[1], n, replace=False) for _ in range(PLAIN_DRAWS)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out["plain"] = np.mean([np.abs(np.nanmean(Y_held[:, p], axis=1) - truth) for p in picks], axis=0)
    banks = {}

    def bank_for(dim):
        if dim not in banks:
            banks[dim] = ItemBank.fit(Yt, None, names, dim=dim, seed=seed)
        return banks[dim]

    todo = [(p.name, p) for p in procedures]
    if choose:
        if endpoints:  # a search's calibration population: what `fitness.estimator: auto` does
            c = choose_procedure(Yt, None, names, n=n, endpoints=endpoints, default=ZOO_DEFAULT, se=1.0, seed=seed)
        else:  # a dozen unrelated models: `irt check --auto --se 1 -e cmean -m strata`
            c = choose_procedure(Yt, n=n, options=list(DEFAULT_OPTIONS), default=CALIBRATED, se=1.0,
                                 prefer=[Procedure("pirt", "info", 1)], seed=seed)
        todo.append(("chosen", Procedure(c.estimator, c.anchor_method, c.rounds, c.dim)))
        out["chosen_name"] = c.name
    for key, p in todo:
        bank = bank_for(p.dim)
        E = bank.subject_theta(list(endpoints)) if p.estimator in ("mpirt", "gmpirt") else None
        est = heldout_estimates(bank, Yh, n, estimator=p.estimator, anchor_method=p.anchor_method,
                                rounds=p.rounds, endpoint_theta=E, seed=seed)
        out[key] = np.abs(full(est) - truth)
    return out


def real_curve(Y, sizes, n, splits, choose, seed):
    """{k: {column: mean error}} over ``splits`` random calibration sets of k subjects."""
    M = Y.shape[0]
    res = {}
    for k in sizes:
        if k > M - 2:
            continue
        acc = {}
        for s in range(splits):
            rng = np.random.default_rng(seed * 1000 + 97 * k + s)
            perm = rng.permutation(M)
            err = estimate_errors(Y[perm[:k]], Y[perm[k:]], n, FIXED, choose=choose, seed=seed + s)
            for key, v in err.items():
                acc.setdefault(key, []).append(v)
        res[k] = summarise(acc)
    return res


def zoo_curve(run_dir, sizes, n, splits, choose, seed):
    """{task: {k: {column: mean error}}}: calibration = base + experts + k sampled merges of a search
    run's banks (e.g. ``irt_real.py --make-zoo-run``), the other merges held out."""
    from irt_real import zoo_run_sets

    out = {}
    for task, (Y, names, endpoints) in zoo_run_sets(run_dir).items():
        ends = np.array([i for i, s in enumerate(names) if s in endpoints])
        merges = np.array([i for i, s in enumerate(names) if s not in endpoints])
        res = {}
        for k in sizes:
            if k > len(merges) - 10:
                continue
            acc = {}
            for s in range(splits):
                perm = np.random.default_rng(seed * 1000 + 97 * k + s).permutation(merges)
                train = np.concatenate([ends, perm[:k]])
                err = estimate_errors(Y[train], Y[perm[k:]], n, ZOO_FIXED, choose=choose, seed=seed + s,
                                      names=[names[i] for i in train], endpoints=list(endpoints))
                for key, v in err.items():
                    acc.setdefault(key, []).append(v)
            res[k] = summarise(acc)
        out[task] = res
    return out


def summarise(acc):
    row = {}
    for key, v in acc.items():
        if key == "chosen_name":
            from collections import Counter
            row[key] = ", ".join(f"{name}×{c}" if c > 1 else name for name, c in Counter(v).most_common(3))
        else:
            row[key] = float(np.mean(np.concatenate(v)))
    return row


def simulated_universe(Y, seed):
    """(a, b, theta mean, theta covariance, d) of a 2PL fitted on all of ``Y``."""
    bank = ItemBank.fit(Y[:, np.nanstd(Y, axis=0) > 0], seed=seed)  # items all answer alike: no information
    th = bank.theta
    cov = np.atleast_2d(np.cov(th, rowvar=False))
    return bank.a, bank.b, th.mean(0), cov, bank.dim


def simulate(a, b, mu, cov, m, rng):
    theta = rng.multivariate_normal(mu, cov, size=m)
    P = 1.0 / (1.0 + np.exp(-(theta @ a.T - b)))
    return (rng.random(P.shape) < P).astype(np.float64)


def sim_curve(Y, sizes, n, heldout, splits, choose, seed):
    a, b, mu, cov, d = simulated_universe(Y, seed)
    res = {}
    for k in sizes:
        acc = {}
        for s in range(splits):
            rng = np.random.default_rng(seed * 1000 + 31 * k + s)
            Yc = simulate(a, b, mu, cov, k, rng)
            Yh = simulate(a, b, mu, cov, heldout, rng)
            err = estimate_errors(Yc, Yh, n, FIXED, choose=choose, seed=seed + s)
            for key, v in err.items():
                acc.setdefault(key, []).append(v)
        res[k] = summarise(acc)
    return res, d


def print_curve(title, res, choose, fixed=FIXED, size="calibration subjects"):
    cols = ["plain"] + [p.name for p in fixed] + (["chosen"] if choose else [])
    print(f"\n### {title}\n")
    print(f"| {size} | " + " | ".join(cols) + " | best / plain | target met |"
          + (" chosen (most often) |" if choose else ""))
    print("|---:|" + "---:|" * (len(cols) + 1) + "---|" + ("---|" if choose else ""))
    for k, row in res.items():
        best = min(row[c] for c in cols[1:])
        pick = row["chosen"] if choose else best
        ok = pick <= 0.03 and pick <= 0.5 * row["plain"]
        line = f"| {k} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + f" | {best / row['plain']:.2f} | "
        line += ("yes" if ok else "no") + " |"
        if choose:
            line += f" {row.get('chosen_name', '')} |"
        print(line)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", action="append", default=[], help="NAME=PATH (irt.io format)")
    ap.add_argument("--zoo-run", default=None, help="a search run whose banks hold the zoo's calibration answers "
                    "(benchmarks/irt_real.py --make-zoo-run DIR makes one: DIR/run)")
    ap.add_argument("--zoo-sizes", default="10,20,40,80,120", help="sampled merges calibrating, on the zoo")
    ap.add_argument("--sizes", default="9,14,18,21,24", help="calibration sizes on the real matrix")
    ap.add_argument("--sim-sizes", default="18,40,100,200", help="calibration sizes in the simulated universe "
                    "('' = skip the simulation)")
    ap.add_argument("--n", type=int, default=20, help="items each estimated subject answers")
    ap.add_argument("--splits", type=int, default=6, help="random calibration sets per size")
    ap.add_argument("--heldout", type=int, default=100, help="simulated subjects estimated per calibration set")
    ap.add_argument("--no-choose", action="store_true", help="skip the chosen column (the slow part)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not args.matrix and not args.zoo_run:
        ap.error("nothing to measure: give --matrix NAME=PATH and/or --zoo-run RUN_DIR")
    sizes = [int(x) for x in args.sizes.split(",") if x]
    sim_sizes = [int(x) for x in args.sim_sizes.split(",") if x]
    choose = not args.no_choose
    t0 = time.time()
    for spec in args.matrix:
        name, sep, path = spec.partition("=")
        if not sep:
            ap.error(f"--matrix {spec!r}: expected NAME=PATH")
        Y, _, _ = read_responses(path)
        print(f"\n## {name}: {Y.shape[0]} subjects × {Y.shape[1]} items, n = {args.n}")
        print_curve(f"{name}, real subjects ({args.splits} random calibration sets per size)",
                    real_curve(Y, sizes, args.n, args.splits, choose, args.seed), choose)
        if sim_sizes:
            res, d = sim_curve(Y, sim_sizes, args.n, args.heldout, args.splits, choose, args.seed)
            print_curve(f"{name}, simulated from its 2PL (d = {d}; {args.heldout} held-out subjects per set)",
                        res, choose)
    if args.zoo_run:
        zoo_sizes = [int(x) for x in args.zoo_sizes.split(",") if x]
        for task, res in zoo_curve(args.zoo_run, zoo_sizes, args.n, args.splits, choose, args.seed).items():
            print_curve(f"{task}: base + experts + k sampled merges calibrating, the other merges held out "
                        f"({args.splits} random sets per size)", res, choose, fixed=ZOO_FIXED,
                        size="sampled merges (+ 4 endpoints)")
    print(f"\n({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
