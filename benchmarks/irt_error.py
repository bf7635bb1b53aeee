"""How well do few anchor items estimate full accuracy? (issue 3)

Prints, for each estimator × number of anchors × anchor-selection method, the mean absolute
error (MAE) of the estimated full accuracy over held-out subjects, the plain mean of the anchor
answers being the baseline; then the fit time of a 300 × 1000, d = 3 bank.

(a) simulated: items from a d = 3 MIRT-2PL; K = 3 endpoint subjects; every other subject is a
    merge: θ = Σ_j λ_j θ_j + ε, λ ~ Dirichlet(1) × U(0.6, 1.6) (merges are not confined to the
    simplex), ε ~ N(0, 0.15² I) (merges are not exact mixtures). The bank is calibrated on the
    endpoints + 300 merges; MAE is measured on 200 other merges against their observed accuracy
    on all 1000 items. mp-IRT uses the endpoints' abilities fitted from their full answers.
The ``adaptive`` rows ask the same number of items adaptively (irt.adaptive): 4 rounds, round 1
the ``info`` design, later rounds chosen per subject from its answers so far; p-IRT / mp-IRT
on the items asked (the plain mean and gp-IRT do not apply to adaptively chosen items).

(b) real: ``real_table(path, endpoints)`` does the same on a response-matrix file (CSV / JSONL
    / npz, see irt.io) of real answers. ``--zoo`` generates that file for the embedded zoo
    (:func:`zoo_responses`): the base, the 3 experts and 150 seeded random merges
    (task_arithmetic / ties, weights U(0, 1.3) per model, ties densities U(0.2, 1)) answer all
    search items of each expert task (lang, cipher, upper); one npz per task, cached under
    ``.cache/irt_bench/`` (reruns skip the generation). Per task the bank is fitted on the base,
    the experts and the first 40 merges (as the search's calibration population), and MAE is
    measured on the other 110 merges, averaged over 3 random splits (``--splits``); mp-IRT's
    endpoints are the base and the experts.

Usage:  python benchmarks/irt_error.py [--quick]            (a) simulated
        python benchmarks/irt_error.py --zoo [--calib 40]    (b) zoo merges (--calib 80: a larger
                                                             calibration population)
        python benchmarks/irt_error.py --real RESPONSES --endpoints a,b,c
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from irt import ItemBank, select_anchors  # noqa: E402
from irt.adaptive import ADAPTIVE_ESTIMATORS  # noqa: E402
from irt.estimators import ESTIMATORS, estimate_accuracy_batch  # noqa: E402
from irt.validate import heldout_estimates  # noqa: E402

N_ANCHORS = (5, 10, 20, 50, 100)
ROUNDS = 4  # the adaptive rows: n items asked in 4 rounds (round 1 = the info design)
METHODS = ("random", "correctness", "irt", "info", "adaptive")
FIXED = METHODS[:-1]


def _valid(est: str, method: str) -> bool:
    return method != "adaptive" or est in ADAPTIVE_ESTIMATORS


def adaptive_estimates(bank, Y_test, n, est, E, rounds=ROUNDS):
    """Each held-out subject takes an adaptive test of n items in ``rounds`` rounds (answers
    looked up in its full answer row, round 1 = the info design); returns the estimates."""
    return heldout_estimates(bank, Y_test, n, estimator=est, anchor_method="info", rounds=rounds, endpoint_theta=E)


def _population(P, K, n_calib, n_m, n_items, rng) -> dict:
    """Answers drawn from the probabilities ``P`` (K endpoints, then n_m merges), split into
    calibration subjects and held-out merges; ``floor`` = |expected − observed| accuracy."""
    Y = (rng.random(P.shape) < P).astype(np.float64)
    names = [f"endpoint{j}" for j in range(K)] + [f"merge{m}" for m in range(n_m)]
    calib = np.arange(K + n_calib)
    test = np.arange(K + n_calib, K + n_m)
    floor = float(np.abs(P[test].mean(1) - Y[test].mean(1)).mean())
    return {"Y": Y, "names": names, "calib": calib, "test": test, "endpoints": names[:K],
            "item_ids": [f"q{i}" for i in range(n_items)], "floor": floor}


def _items_and_endpoints(rng, n_items, K, d):
    """Item parameters (a, b) and K endpoint abilities E, as described in :func:`simulate_ability`."""
    a = np.abs(rng.normal(0.9, 0.5, (n_items, d))) * rng.choice([1, 1, 1, -1], (n_items, d))
    a[:, 0] = np.abs(rng.normal(1.5, 0.5, n_items))
    b = rng.normal(0, 1.5, n_items)
    E = rng.normal(0, 1.0, (K, d))
    E[:, 0] = np.r_[2.0, np.linspace(0.5, -0.5, K - 1)] if K > 1 else 2.0
    return a, b, E


def simulate_ability(n_items=1000, n_calib=300, n_test=200, K=3, d=3, noise=0.15, seed=0):
    """Responses of K endpoints + (n_calib + n_test) merges; returns dict of arrays.

    Items: a_i1 ~ |N(1.5, 0.5²)| on a first ("general skill") axis, a_ik ~ |N(0.9, 0.5²)| on the
    others (a quarter of them negative), b ~ N(0, 1.5²). Endpoints: θ_j ~ N(0, I) with the first
    coordinate set to 2 for the task's expert and spread over [0.5, −0.5] for the others. Merges: θ = Σ_j λ_j θ_j + ε with
    λ ~ Dirichlet(0.7) × U(0.3, 1.5) (merges are neither convex nor exact mixtures),
    ε ~ N(0, noise² I). Accuracy then spreads over merges roughly as in real merge populations.
    """
    rng = np.random.default_rng(seed)
    a, b, E = _items_and_endpoints(rng, n_items, K, d)
    n_m = n_calib + n_test
    lam = rng.dirichlet(np.full(K, 0.7), n_m) * rng.uniform(0.3, 1.5, (n_m, 1))
    th = np.vstack([E, lam @ E + noise * rng.standard_normal((n_m, d))])
    P = 1 / (1 + np.exp(-(th @ a.T - b)))
    return _population(P, K, n_calib, n_m, n_items, rng)


def simulate(n_items=1000, n_calib=300, n_test=200, K=3, d=3, resid=1.5, noise=0.5, sharpness=1.0, seed=0):
    """Merges as mixtures of endpoint subjects (the main simulation).

    Each endpoint j has a latent logit per item z_ji = a_i·θ_j − b_i + u_ji: a d-dimensional IRT
    part (a, b, θ as in :func:`simulate_ability`) plus an endpoint-specific residual
    u_ji ~ N(0, resid²) (what that fine-tune knows beyond the smooth trait). A merge mixes the
    endpoints' logits, z_mi = Σ_j λ_j z_ji + ε_mi, λ ~ Dirichlet(0.7) × U(0.5, 1.5),
    ε_mi ~ N(0, noise²), and answers Y_mi ~ Bernoulli(σ(κ z_mi)), κ = ``sharpness`` (how
    deterministic a model's answer to an item is; greedy-decoded LLM answers are deterministic,
    so real data sit at larger κ than 1). So merges inherit their
    endpoints' item-level strengths, as merged models do, and are not convex mixtures.
    """
    rng = np.random.default_rng(seed)
    a, b, E = _items_and_endpoints(rng, n_items, K, d)
    Z = E @ a.T - b + resid * rng.standard_normal((K, n_items))
    n_m = n_calib + n_test
    lam = rng.dirichlet(np.full(K, 0.7), n_m) * rng.uniform(0.5, 1.5, (n_m, 1))
    Zm = np.vstack([Z, lam @ Z + noise * rng.standard_normal((n_m, n_items))])
    P = 1 / (1 + np.exp(-sharpness * Zm))
    return _population(P, K, n_calib, n_m, n_items, rng)


def error_table(Y_calib, calib_names, Y_test, item_ids, endpoints, dim=None, seeds=(0, 1, 2),
                n_anchors=N_ANCHORS, methods=METHODS, verbose=True):
    """MAE table {(estimator, n, method): mae} for held-out rows ``Y_test`` (full answers); the
    same keys prefixed by ``"rho"`` hold the Spearman rank correlation of estimates and truth
    (what a search, which only ranks candidates, needs)."""
    from scipy.stats import spearmanr

    t0 = time.perf_counter()
    bank = ItemBank.fit(Y_calib, item_ids, calib_names, dim=dim, seed=0)
    if verbose:
        print(f"bank: {Y_calib.shape[0]} subjects × {Y_calib.shape[1]} items, d = {bank.dim} "
              f"({time.perf_counter() - t0:.1f} s incl. dimension choice)")
    E = bank.fit_ability(np.asarray(Y_calib)[[calib_names.index(e) for e in endpoints]])
    truth = np.nanmean(Y_test, axis=1)
    res = {}
    for n in n_anchors:
        for method in methods:
            if method == "adaptive":
                for est in ADAPTIVE_ESTIMATORS:
                    z = adaptive_estimates(bank, Y_test, n, est, E)
                    res[(est, n, method)] = float(np.abs(z - truth).mean())
                    res[("rho", est, n, method)] = float(spearmanr(z, truth)[0])
                continue
            errs = {e: [] for e in ESTIMATORS}
            rhos = {e: [] for e in ESTIMATORS}
            for s in seeds if method in ("random", "correctness", "irt") else seeds[:1]:
                anc = select_anchors(bank, n=n, method=method, seed=s)
                ans = Y_test[:, anc.idx]
                for est in ESTIMATORS:
                    z = estimate_accuracy_batch(est, bank, anc.idx, anc.weights, ans, endpoint_theta=E,
                                                gp_lambda=anc.gp_lambda, random_anchors=anc.random)
                    errs[est].append(np.abs(z - truth))
                    rhos[est].append(spearmanr(z, truth)[0])
            for est in ESTIMATORS:
                res[(est, n, method)] = float(np.mean(errs[est]))
                res[("rho", est, n, method)] = float(np.mean(rhos[est]))
    return res, bank


def print_table(res, title, n_anchors=N_ANCHORS, methods=METHODS):
    print(f"\n{title}\nMAE of estimated accuracy (held-out subjects); columns = anchors per task")
    hdr = f"{'estimator':9s} {'method':12s}" + "".join(f"{n:>8d}" for n in n_anchors)
    print(hdr)
    print("-" * len(hdr))
    for method in methods:
        for est in ESTIMATORS:
            if not _valid(est, method):
                continue
            row = "".join(f"{res[(est, n, method)]:8.4f}" for n in n_anchors)
            print(f"{est:9s} {method:12s}{row}")
        print()
    if 20 in n_anchors:
        v = verdict_20(res, methods)
        print(f"at 20 anchors: best {v['best'][1]}/{v['best'][2]} MAE {v['best'][0]:.4f}; best fixed-anchor "
              f"{v['best_fixed'][1]}/{v['best_fixed'][2]} {v['best_fixed'][0]:.4f}; plain mean of random "
              f"anchors {v['random_mean']:.4f} (ratio {v['ratio_random']:.2f}), best plain mean "
              f"{v['best_mean']:.4f} (ratio {v['ratio_best_mean']:.2f}); target ≤ 0.02 and ≤ 0.5")
        print(f"Spearman ρ of estimate and truth at 20 anchors: best {v['rho']['best']:.3f}, best fixed "
              f"{v['rho']['best_fixed']:.3f}, plain mean of random anchors {v['rho']['random_mean']:.3f}")


def verdict_20(res, methods=METHODS) -> dict:
    """The 20-anchor summary: best cell overall and with fixed anchors, the plain-mean baselines
    (random anchors = tinyBenchmarks' naive baseline; best = the plain mean over the best fixed
    anchors and their cluster weights) and the ratios of the best cell to each."""
    cells = [(res[(e, 20, m)], e, m) for m in methods for e in ESTIMATORS if (e, 20, m) in res]
    best = min(cells)
    best_fixed = min(c for c in cells if c[2] != "adaptive")
    random_mean = res.get(("mean", 20, "random"), float("nan"))
    best_mean = min(res[("mean", 20, m)] for m in methods if ("mean", 20, m) in res)
    rho = {name: res.get(("rho", c[1], 20, c[2]), float("nan"))
           for name, c in (("best", best), ("best_fixed", best_fixed), ("random_mean", (0, "mean", "random")))}
    return {"best": best, "best_fixed": best_fixed, "random_mean": random_mean, "best_mean": best_mean, "rho": rho,
            "ratio_random": best[0] / random_mean, "ratio_best_mean": best[0] / best_mean,
            "met_random": best[0] <= 0.02 and best[0] <= 0.5 * random_mean,
            "met_best_mean": best[0] <= 0.02 and best[0] <= 0.5 * best_mean}


def fit_time(M=300, I=1000, d=3, seed=0):
    from irt import MIRT2PL

    rng = np.random.default_rng(seed)
    th = rng.standard_normal((M, d))
    a = np.abs(rng.normal(0.9, 0.5, (I, d)))
    b = rng.normal(0, 1.5, I)
    Y = (rng.random((M, I)) < 1 / (1 + np.exp(-(th @ a.T - b)))).astype(float)
    t = time.perf_counter()
    m = MIRT2PL(dim=d).fit(Y)
    dt = time.perf_counter() - t
    print(f"\nfit time {M} × {I}, d = {d}: {dt:.2f} s ({m.n_iter_} L-BFGS iterations; "
          f"corr(b̂, b) = {np.corrcoef(m.b_, b)[0, 1]:.3f})")


def real_table(path, endpoints, test_frac=0.3, seed=0, dim=None, n_calib=None, title=None, splits=1, **kw):
    """(b) Real answers: ``path`` is a response-matrix file (irt.io formats) whose subjects are the
    endpoints (names in ``endpoints``, always in the calibration part) and merges. Held out: a
    random ``test_frac`` of the merges, or, with ``n_calib``, all merges but a random ``n_calib``
    (the calibration population, as the search's). With ``splits`` > 1 the MAE is averaged over
    that many random splits (seeds ``seed``, ``seed + 1``, ...); the rest of the report is about
    the first. Returns (res, info) with info the spread of the held-out accuracies and the target
    verdict at 20 anchors."""
    from irt.io import read_responses

    Y, item_ids, names = read_responses(path)
    others = [i for i, n in enumerate(names) if n not in endpoints]
    missing = [e for e in endpoints if e not in names]
    if missing:
        raise SystemExit(f"endpoints {missing} not in {path}")
    if n_calib is not None and not 0 < n_calib < len(others):
        raise SystemExit(f"--calib {n_calib}: need 0 < n < {len(others)} merges in {path}")
    n_anchors = tuple(n for n in N_ANCHORS if n < len(item_ids))
    tables = []
    for split in range(splits):
        rng = np.random.default_rng(seed + split)
        if n_calib is None:
            t = np.sort(rng.choice(others, max(1, int(test_frac * len(others))), replace=False))
        else:
            t = np.sort(np.setdiff1d(others, rng.choice(others, n_calib, replace=False)))
        c = np.setdiff1d(np.arange(len(names)), t)
        r, b = error_table(Y[c], [names[i] for i in c], Y[t], item_ids, list(endpoints), dim=dim,
                           n_anchors=n_anchors, verbose=split == 0, **kw)
        if split == 0:
            test, calib, bank = t, c, b
        tables.append(r)
    res = {k: float(np.mean([r[k] for r in tables])) for k in tables[0]}
    print_table(res, (title or f"(b) real answers: {path}")
                + (f"\n(MAE averaged over {splits} random calibration / held-out splits)" if splits > 1 else ""),
                n_anchors=n_anchors)
    truth = np.nanmean(Y[test], axis=1)
    info = {"n_calib": len(calib), "n_test": len(test), "n_items": len(item_ids), "dim": bank.dim,
            "sd": float(truth.std()), "mean": float(truth.mean()),
            "pop_guess": float(np.abs(truth - np.nanmean(Y[calib])).mean())}
    print(f"held-out merges: {len(test)}; true accuracy mean {info['mean']:.3f}, sd {info['sd']:.3f} "
          f"(min {truth.min():.3f}, max {truth.max():.3f}); guessing the calibration population's mean "
          f"accuracy: MAE {info['pop_guess']:.4f}")
    if 20 in n_anchors:
        v = verdict_20(res)
        info.update(v)
        # what 20 answers can tell if the bank were exactly right: answers drawn from the bank's own
        # model at each held-out merge's ability fitted from its full answers, same design
        E = bank.fit_ability(Y[[names.index(e) for e in endpoints]])
        P = bank.predict_proba(bank.fit_ability(Y[test]))
        info["fit_floor"] = float(np.abs(P.mean(1) - truth).mean())
        print(f"IRT fit of the held-out merges from all {len(item_ids)} answers: MAE {info['fit_floor']:.4f}")
        info["model_floor"] = {}
        for cell in (v["best_fixed"], v["best"]) if v["best"][2] == "adaptive" else (v["best"],):
            floor = model_floor(bank, P, E, est=cell[1], method=cell[2])
            info["model_floor"][cell[2]] = floor
            print(f"{cell[1]}/{cell[2]} at 20 anchors: MAE {cell[0]:.4f} on the real answers, {floor:.4f} if the "
                  "answers came from the bank's own model (what 20 binary answers can tell here)")
        print("target at 20 anchors (MAE ≤ 0.02 and ≤ 0.5 × the plain mean): "
              f"best {v['best'][1]}/{v['best'][2]} {v['best'][0]:.4f}; vs the plain mean of random anchors "
              f"{v['random_mean']:.4f}: " + ("MET" if v["met_random"] else "not met")
              + f"; vs the best plain mean ({v['best_mean']:.4f}, clustered anchors): "
              + ("MET" if v["met_best_mean"] else "not met"))
    return res, info


def model_floor(bank, P, E, est, method, reps=5):
    """MAE of ``est``/``method`` at 20 anchors when answers are Bernoulli draws from ``P`` (the
    bank's own model at each subject's ability), measured against the expected accuracy P.mean(1)."""
    errs = []
    for r in range(reps):
        Ys = (np.random.default_rng(r).random(P.shape) < P).astype(float)
        if method == "adaptive":
            z = adaptive_estimates(bank, Ys, 20, est, E)
        else:
            anc = select_anchors(bank, n=20, method=method, seed=0)
            z = estimate_accuracy_batch(est, bank, anc.idx, anc.weights, Ys[:, anc.idx], endpoint_theta=E,
                                        gp_lambda=anc.gp_lambda, random_anchors=anc.random)
        errs.append(np.abs(z - P.mean(1)).mean())
    return float(np.mean(errs))


# ----------------------------------------------------------------------------- (b) the zoo

ZOO_TASKS = ("lang", "cipher", "upper")


def zoo_merge_recipes(zoo, n_merges=150, seed=0, w_max=1.3, density=(0.2, 1.0)):
    """``n_merges`` seeded random recipes over the zoo's experts: half task_arithmetic, half ties
    (alternating), weight ~ U(0, w_max) per expert, ties density ~ U(density) per expert."""
    rng = np.random.default_rng([seed, 31337])
    experts = [str(zoo.experts[t]) for t in sorted(zoo.experts)]
    out = []
    for k in range(n_merges):
        method = "task_arithmetic" if k % 2 == 0 else "ties"
        models = []
        for p in experts:
            par = {"weight": round(float(rng.uniform(0.0, w_max)), 4)}
            if method == "ties":
                par["density"] = round(float(rng.uniform(*density)), 4)
            models.append({"model": p, "parameters": par})
        out.append({"merge_method": method, "base_model": str(zoo.base), "models": models, "dtype": "float32"})
    return out


def zoo_responses(zoo_root, cache_dir, n_merges=150, seed=0, force=False, tasks=ZOO_TASKS, threads=1):
    """Answers of the zoo's base, experts and ``n_merges`` random merges on all search items of
    each task in ``tasks``; one ``<cache_dir>/zoo_<task>.npz`` per task (irt.io format) plus
    ``zoo_meta.json`` (recipes, settings, generation time). Reused when the settings and the zoo
    are the same. Returns ({task: npz path}, endpoint names, meta)."""
    import json

    import torch

    from evomerge.backends.hf import HFEvaluator
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe
    from evomerge.tasks import load_task_dir
    from evomerge.zoo import build_zoo
    from irt.io import write_responses

    torch.set_num_threads(threads)
    zoo = build_zoo(root=zoo_root, verbose=False)
    zoo_info = json.loads((Path(zoo.root) / "zoo.json").read_text())
    cache_dir = Path(cache_dir)
    meta_path = cache_dir / "zoo_meta.json"
    paths = {t: cache_dir / f"zoo_{t}.npz" for t in tasks}
    recipes = zoo_merge_recipes(zoo, n_merges, seed)
    key = {"zoo_root": str(Path(zoo.root).resolve()), "zoo_version": zoo_info.get("version"),
           "zoo_seed": zoo_info.get("seed"), "n_merges": n_merges, "seed": seed, "tasks": list(tasks),
           "recipes": recipes}
    endpoints = ["base", *[f"{t}_expert" for t in sorted(zoo.experts)]]
    if not force and meta_path.exists() and all(p.exists() for p in paths.values()):
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key:
            print(f"zoo responses: cached in {cache_dir} (generated in {meta['seconds']:.0f} s)")
            return paths, endpoints, meta
    t_start = time.perf_counter()
    ev = HFEvaluator(zoo.base, batch_size=256)
    task_objs = {t: load_task_dir(zoo.task_dir(t), "search") for t in tasks}
    expert_paths = [zoo.experts[t] for t in sorted(zoo.experts)]
    merger = InMemoryMerger([zoo.base, *expert_paths])
    subjects = [("base", {"merge_method": "linear", "models": [{"model": str(zoo.base), "parameters": {"weight": 1.0}}],
                          "dtype": "float32"})]
    subjects += [(f"{t}_expert", {"merge_method": "linear", "models": [{"model": str(zoo.experts[t]),
                                                                         "parameters": {"weight": 1.0}}],
                                  "dtype": "float32"}) for t in sorted(zoo.experts)]
    subjects += [(f"merge{k:03d}", r) for k, r in enumerate(recipes)]
    Y = {t: np.zeros((len(subjects), len(task_objs[t].items))) for t in tasks}
    print(f"zoo responses: {len(subjects)} models × {sum(len(t.items) for t in task_objs.values())} items "
          f"({', '.join(tasks)}) ...", flush=True)
    for s, (name, recipe) in enumerate(subjects):
        merger.apply(MergeRecipe.from_dict(recipe), ev.model)
        for t, task in task_objs.items():
            Y[t][s] = ev.answer(task)
        if s % 25 == 0 or s == len(subjects) - 1:
            acc = ", ".join(f"{t} {Y[t][s].mean():.2f}" for t in tasks)
            print(f"  {s + 1}/{len(subjects)} {name}: {acc} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    seconds = time.perf_counter() - t_start
    cache_dir.mkdir(parents=True, exist_ok=True)
    names = [n for n, _ in subjects]
    for t in tasks:
        write_responses(paths[t], Y[t], [it.id for it in task_objs[t].items], names)
    meta = {"key": key, "seconds": seconds, "subjects": names, "endpoints": endpoints,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    meta_path.write_text(json.dumps(meta, indent=1))
    print(f"zoo responses: generated in {seconds:.0f} s ({seconds / len(subjects):.2f} s per model), "
          f"saved to {cache_dir}")
    return paths, endpoints, meta


def zoo_tables(zoo_root, cache_dir, n_merges=150, n_calib=40, seed=0, force=False, quick=False, splits=3):
    """(b) on the zoo: generate (or reuse) the responses, then one table per task."""
    paths, endpoints, meta = zoo_responses(zoo_root, cache_dir, n_merges=n_merges, seed=seed, force=force)
    summary = {}
    splits = 1 if quick else splits
    splits_note = f"; MAE averaged over {splits} splits" if splits > 1 else ""
    for t, p in paths.items():
        res, info = real_table(p, endpoints, n_calib=n_calib, seed=seed, dim=3 if quick else None,
                               seeds=(0,) if quick else (0, 1, 2), splits=splits,
                               title=f"(b) zoo merges, task {t}: {len(meta['subjects'])} models "
                                     f"(base + 3 experts + {n_merges} merges), calibration = endpoints + "
                                     f"{n_calib} merges, held out = the other {n_merges - n_calib}")
        summary[t] = info
    print(f"\n(b) summary at 20 anchors (target: MAE ≤ 0.02 and ≤ half the plain mean's){splits_note}")
    for t, i in summary.items():
        if "best" in i:
            print(f"  {t:7s} d={i['dim']} sd(true acc) {i['sd']:.3f}; best {i['best'][1]}/{i['best'][2]} "
                  f"{i['best'][0]:.4f}; best fixed anchors {i['best_fixed'][1]}/{i['best_fixed'][2]} "
                  f"{i['best_fixed'][0]:.4f}; plain mean: random anchors {i['random_mean']:.4f} (ratio "
                  f"{i['ratio_random']:.2f}), best {i['best_mean']:.4f} (ratio {i['ratio_best_mean']:.2f}); "
                  f"Spearman ρ with the truth: best {i['rho']['best']:.3f}, best fixed {i['rho']['best_fixed']:.3f}, "
                  f"plain mean of random items {i['rho']['random_mean']:.3f}")
    print(f"generation of the response matrix: {meta['seconds']:.0f} s")
    return summary


def summary_20(sim, dim=3, methods=METHODS, label=""):
    """One line per estimator at 20 anchors (best selection method), for a quick robustness check."""
    Y, names = sim["Y"], sim["names"]
    res, _ = error_table(Y[sim["calib"]], [names[i] for i in sim["calib"]], Y[sim["test"]], sim["item_ids"],
                         sim["endpoints"], dim=dim, seeds=(0,), n_anchors=(20,), methods=methods, verbose=False)
    truth = Y[sim["test"]].mean(1)
    pop = float(np.abs(truth - np.nanmean(Y[sim["calib"]])).mean())
    cells = []
    for e in ESTIMATORS:
        v, m = min((res[(e, 20, m)], m) for m in methods if (e, 20, m) in res)
        cells.append(f"{e} {v:.4f} ({m})")
    print(f"{label}: floor {sim['floor']:.4f}, population-mean guess {pop:.4f}; " + "; ".join(cells))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one seed, fixed d = 3, no extra scenarios")
    ap.add_argument("--real", help="response-matrix file of real answers (part b)")
    ap.add_argument("--endpoints", default="", help="comma-separated endpoint subject names in --real")
    ap.add_argument("--zoo", action="store_true", help="part (b) on real zoo merges (generates / reuses the "
                                                         "response matrices)")
    ap.add_argument("--zoo-root", default=str(ROOT / ".cache" / "zoo"), help="the built zoo")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "irt_bench"), help="where the zoo responses go")
    ap.add_argument("--merges", type=int, default=150, help="random merges in the zoo response matrix")
    ap.add_argument("--calib", type=int, default=40, help="merges in the calibration population (besides "
                                                          "the base and the experts)")
    ap.add_argument("--regenerate", action="store_true", help="regenerate the zoo responses even if cached")
    ap.add_argument("--splits", type=int, default=3, help="random calibration / held-out splits the zoo MAE "
                                                          "is averaged over")
    args = ap.parse_args(argv)
    if args.real:
        real_table(args.real, [e for e in args.endpoints.split(",") if e])
        return
    if args.zoo:
        zoo_tables(args.zoo_root, args.cache, n_merges=args.merges, n_calib=args.calib, force=args.regenerate,
                   quick=args.quick, splits=args.splits)
        return
    sim = simulate()
    Y, names = sim["Y"], sim["names"]
    seeds = (0,) if args.quick else (0, 1, 2)
    res, bank = error_table(Y[sim["calib"]], [names[i] for i in sim["calib"]], Y[sim["test"]], sim["item_ids"],
                            sim["endpoints"], dim=3 if args.quick else None, seeds=seeds)
    truth = Y[sim["test"]].mean(1)
    print_table(res, "(a) simulated merges = mixtures of 3 endpoints' item logits (1000 items, 300 calibration "
                     "merges + endpoints, 200 held-out merges, answers Bernoulli with sharpness κ = 1)")
    print(f"irreducible error (|expected − observed accuracy| of the held-out merges): {sim['floor']:.4f}; "
          f"guessing the calibration population's mean accuracy: "
          f"{np.abs(truth - np.nanmean(Y[sim['calib']])).mean():.4f}; spread (sd) of accuracies {truth.std():.3f}")
    if not args.quick:
        print("\nrobustness at 20 anchors (d = 3, seed 0; best selection method per estimator):")
        for k in (2.0, 4.0):
            summary_20(simulate(sharpness=k, seed=1), label=f"mixtures, κ = {k:g}")
        summary_20(simulate_ability(seed=1), label="latent-ability merges (θ = Σλθ_j + ε)")
    print("\n(b) real zoo merges: not run here; use --zoo (or --real RESPONSES --endpoints a,b,c)")
    fit_time()


if __name__ == "__main__":
    main()
