"""Anchor items: a few items (and weights) whose answers stand for the whole benchmark.

Methods (``select_anchors(method=...)``):

``random``
    Uniform sample without replacement, uniform weights 1/n (MERGE³'s default).
``correctness``
    k-means (n clusters) on the items' correctness vectors over the calibration subjects
    (missing answers imputed with the item mean); the anchor of a cluster is its member nearest
    the centroid, its weight the cluster's share of the items (tinyBenchmarks, Polo et al. 2024,
    "anchor points" on correctness).
``irt``
    The same k-means on the IRT item embeddings (a_i, b_i) (tinyBenchmarks' IRT clustering).
``info``
    Greedy Bayesian c-optimal design over the calibration population: add, one at a time, the
    item that most reduces Σ_m g_mᵀ F_m⁻¹ g_m — the linearised posterior variance of each
    calibration subject's *full accuracy* — where F_m = I/σ_θ² + Σ_{i∈S} p_mi(1 − p_mi) a_i a_iᵀ is
    the information about its ability and g_m the gradient of its accuracy (the D-optimal variant,
    max Σ_m log det F_m, is ``_info_anchors(target="theta")``). Weights: the share of items whose
    nearest anchor (in standardised (a, b) space) is that item.

``strata``
    Difficulty strata: the items sorted by their share of correct answers over the calibration
    subjects (the bank's responses; a bank saved without them: the model's mean P_i over the
    calibration abilities), cut into n strata of (nearly) equal size, one item drawn at random
    (seeded) from each; its weight is its stratum's share of the items. Classic stratified
    sampling: it removes the spread of item difficulties from the estimate's variance, which a
    plain random sample keeps. With the ``cmean`` estimator it is the procedure that stayed at or
    below the plain mean of random items on every public matrix measured (docs/irt_real.md).

``stratify=True`` splits n over the items' subgroups in proportion to their sizes (largest
remainder; every subgroup gets one anchor when n allows), selects within each subgroup and
scales the weights by the subgroup's share, so weights always sum to 1.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from irt.errors import IRTError
from irt.estimators import gp_lambda

__all__ = ["Anchors", "select_anchors", "METHODS"]

METHODS = ("random", "correctness", "irt", "info", "strata")


@dataclass
class Anchors:
    """Selected anchors: ``idx`` (positions in the bank), ``weights`` (sum to 1), ``item_ids``,
    the ``method`` and ``seed`` that chose them, and ``gp_lambda`` (gp-IRT mixing weight for
    these anchors, computed by :func:`irt.estimators.gp_lambda` when the bank has calibration
    responses, else None)."""

    idx: np.ndarray
    weights: np.ndarray
    item_ids: list[str]
    method: str
    seed: int = 0
    gp_lambda: float | None = None
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def random(self) -> bool:
        return self.method == "random"

    def to_dict(self) -> dict:
        return {"format": "irt-anchors", "method": self.method, "seed": self.seed,
                "item_ids": list(self.item_ids), "weights": [float(w) for w in self.weights],
                "gp_lambda": self.gp_lambda, **({"extra": self.extra} if self.extra else {})}

    def save(self, path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def from_dict(cls, d: dict, bank) -> "Anchors":
        """Rebuild against ``bank`` (item ids are checked against it)."""
        if not isinstance(d, dict) or d.get("format") != "irt-anchors":
            raise IRTError("anchors: not an anchors file (expected a JSON object with format 'irt-anchors')")
        ids = [str(x) for x in d.get("item_ids", [])]
        w = np.asarray(d.get("weights", []), dtype=np.float64)
        if not ids or len(ids) != len(w):
            raise IRTError(f"anchors: {len(ids)} item ids but {len(w)} weights")
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise IRTError("anchors: weights must be finite, non-negative and not all zero")
        return cls(idx=bank.index(ids), weights=w / w.sum(), item_ids=ids, method=str(d.get("method", "given")),
                   seed=int(d.get("seed", 0)), gp_lambda=d.get("gp_lambda"), extra=d.get("extra", {}))

    @classmethod
    def load(cls, path, bank) -> "Anchors":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise IRTError(f"anchors file {path}: cannot read ({exc})") from None
        try:
            return cls.from_dict(d, bank)
        except IRTError as exc:
            raise IRTError(f"anchors file {path}: {exc}") from None


def _kmeans_anchors(emb: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means with n clusters; per cluster the member nearest the centroid, weight = share."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    N = len(emb)
    n_distinct = len(np.unique(np.round(emb, 12), axis=0))
    k = min(n, n_distinct)
    with warnings.catch_warnings():
        # near-duplicate embeddings can leave fewer distinct clusters than k: handled below (empty
        # clusters skipped, the anchors topped up), so sklearn's warning is noise to the user
        warnings.simplefilter("ignore", ConvergenceWarning)
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(emb)
    idx, w = [], []
    for c in range(k):
        members = np.flatnonzero(km.labels_ == c)
        if members.size == 0:
            continue
        dist = ((emb[members] - km.cluster_centers_[c]) ** 2).sum(1)
        idx.append(int(members[np.argmin(dist)]))
        w.append(members.size / N)
    if len(idx) < n:  # fewer distinct embeddings than anchors wanted: top up at random
        rng = np.random.default_rng(seed)
        rest = np.setdiff1d(np.arange(N), idx)
        extra = rng.choice(rest, min(n - len(idx), rest.size), replace=False)
        idx = np.concatenate([idx, extra]).astype(np.int64)
        return idx, _voronoi_weights(emb, idx)
    return np.asarray(idx, dtype=np.int64), np.asarray(w)


def _voronoi_weights(emb: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Each anchor's share of the items nearest to it; an item as near to several anchors (e.g.
    items answered alike by every calibration subject) is shared equally between them, so that
    no anchor that is asked ends up with weight 0."""
    d2 = ((emb[:, None, :] - emb[idx][None, :, :]) ** 2).sum(-1)
    nearest = d2 <= d2.min(axis=1, keepdims=True) * (1 + 1e-9) + 1e-12
    return (nearest / nearest.sum(axis=1, keepdims=True)).sum(0) / len(emb)


def _info_anchors(a, b, theta, n, prior_prec, emb, target: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
    """Greedy Bayesian design over the calibration population (see the module docstring).

    For subject m with current information F_m = Λ + Σ_{i∈S} w_mi a_i a_iᵀ (w = p(1 − p)),
    ``target="accuracy"`` (c-optimal) adds the item that most reduces Σ_m g_mᵀ F_m⁻¹ g_m, the
    linearised posterior variance of subject m's full accuracy, g_m = (1/N) Σ_i w_mi a_i its
    gradient; by Sherman–Morrison the reduction from item i is
    w_mi (a_i·F_m⁻¹g_m)² / (1 + w_mi a_iᵀF_m⁻¹a_i). ``target="theta"`` (D-optimal) maximises
    Σ_m log det F_m instead.
    """
    d = a.shape[1]
    P = 1.0 / (1.0 + np.exp(-(theta @ a.T - b)))  # M × N
    W = P * (1 - P)
    G = W @ a / a.shape[0]  # M × d
    F = np.tile(np.eye(d) * prior_prec, (len(theta), 1, 1))
    chosen: list[int] = []
    avail = np.ones(len(a), dtype=bool)
    for _ in range(n):
        Finv = np.linalg.inv(F)
        q = np.einsum("id,mde,ie->mi", a, Finv, a)  # a_iᵀ F_m⁻¹ a_i
        if target == "accuracy":
            u = np.einsum("mde,me->md", Finv, G)  # F_m⁻¹ g_m
            gain = (W * (u @ a.T) ** 2 / (1 + W * q)).sum(0)
        else:
            gain = np.log1p(W * q).sum(0)
        gain[~avail] = -np.inf
        i = int(np.argmax(gain))
        chosen.append(i)
        avail[i] = False
        F = F + W[:, i, None, None] * np.outer(a[i], a[i])[None]
    idx = np.asarray(chosen, dtype=np.int64)
    return idx, _voronoi_weights(emb, idx)


def _allocate(sizes: np.ndarray, n: int) -> np.ndarray:
    """Split n over groups of the given sizes: proportional, largest remainder, ≥1 each if n allows,
    never more than a group's size."""
    G = len(sizes)
    alloc = np.zeros(G, dtype=np.int64)
    order = np.argsort(-sizes, kind="stable")
    if n < G:
        alloc[order[:n]] = 1
        return alloc
    alloc[:] = 1
    rest = n - G
    quota = sizes / sizes.sum() * n - 1
    base = np.clip(np.floor(quota), 0, None).astype(np.int64)
    base = np.minimum(base, sizes - 1)
    while base.sum() > rest:
        base[np.argmax(base)] -= 1
    alloc += base
    rem = rest - base.sum()
    frac = quota - base
    for g in np.argsort(-frac, kind="stable"):
        if rem == 0:
            break
        if alloc[g] < sizes[g]:
            alloc[g] += 1
            rem -= 1
    while rem > 0:  # any group with room
        g = int(np.argmax(sizes - alloc))
        alloc[g] += 1
        rem -= 1
    return alloc


def item_easiness(bank) -> np.ndarray:
    """Each item's share of correct answers over the calibration subjects (the bank's responses;
    without them, the model's mean probability over the calibration abilities)."""
    if bank.responses is not None:
        R = bank.responses
        seen = (~np.isnan(R)).sum(0)
        return np.where(seen > 0, np.nansum(R, 0) / np.maximum(seen, 1), 0.5)
    return bank.predict_proba(bank.theta).mean(0)


def _strata_anchors(easiness: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One random item from each of n equal-size difficulty strata; weights = stratum shares."""
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(easiness)), easiness))  # ties broken at random
    strata = np.array_split(order, n)
    loc = np.array([rng.choice(s) for s in strata])
    w = np.array([len(s) for s in strata], dtype=np.float64) / len(easiness)
    return loc, w


def _select(bank, items: np.ndarray, n: int, method: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Select n anchors among bank positions ``items``; weights sum to 1 within them."""
    N = len(items)
    if n >= N:
        return items.copy(), np.full(N, 1.0 / N)
    a, b = bank.a[items], bank.b[items]
    if method == "random":
        rng = np.random.default_rng(seed)
        pick = np.sort(rng.choice(N, n, replace=False))
        return items[pick], np.full(n, 1.0 / n)
    if method == "strata":
        return _select_strata(bank, items, n, seed)
    ab = np.column_stack([a, b])
    if method == "irt":
        loc, w = _kmeans_anchors(ab, n, seed)
    elif method == "correctness":
        if bank.responses is None:
            raise IRTError("anchors: method 'correctness' needs the calibration responses, and this bank was "
                           "saved without them; use method 'irt' or refit with keep_responses=True")
        R = bank.responses[:, items]
        mean = np.nanmean(np.where(np.isnan(R).all(0), 0.5, R), axis=0) if R.size else np.zeros(N)
        emb = np.where(np.isnan(R), mean, R).T
        loc, w = _kmeans_anchors(emb, n, seed)
    elif method == "info":
        sd = ab.std(0)
        emb = (ab - ab.mean(0)) / np.where(sd > 0, sd, 1.0)
        prior = 1.0 / float(bank.meta.get("fit", {}).get("prior_theta", 1.0)) ** 2
        loc, w = _info_anchors(a, b, bank.theta, n, prior, emb)
    else:
        raise IRTError(f"anchors: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return items[loc], w


def _select_strata(bank, items, n, seed):
    loc, w = _strata_anchors(item_easiness(bank)[items], n, seed)
    order = np.argsort(loc)
    return items[loc[order]], w[order]


def select_anchors(
    bank,
    n: int = 20,
    method: str = "irt",
    seed: int = 0,
    stratify: bool = False,
    subgroups=None,
    compute_gp_lambda: bool = True,
) -> Anchors:
    """Choose ``n`` anchor items of ``bank`` and their weights (see the module docstring).

    ``subgroups``: one label per bank item (default: the bank's own, used when ``stratify``).
    If n ≥ the number of items, every item is an anchor with weight 1/N (so every estimator is
    exact). Returns :class:`Anchors`; ``gp_lambda`` is filled in when the bank holds calibration
    responses and ``compute_gp_lambda``.
    """
    if method not in METHODS:
        raise IRTError(f"anchors: unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise IRTError(f"anchors: n must be a positive integer, got {n!r}")
    n = int(n)
    N = bank.n_items
    all_items = np.arange(N)
    if stratify:
        groups = subgroups if subgroups is not None else bank.subgroups
        if groups is None:
            raise IRTError("anchors: stratify=True but the bank has no item subgroups and none were given")
        groups = np.asarray([str(g) for g in groups])
        if len(groups) != N:
            raise IRTError(f"anchors: {len(groups)} subgroup labels for {N} items")
        labels, inv = np.unique(groups, return_inverse=True)
        sizes = np.bincount(inv)
        alloc = _allocate(sizes, min(n, N))
        idx_l, w_l = [], []
        for g, k in enumerate(alloc):
            if k == 0:
                continue
            items = np.flatnonzero(inv == g)
            ix, w = _select(bank, items, int(k), method, seed + g)
            idx_l.append(ix)
            w_l.append(w / w.sum() * sizes[g] / N if k < len(items) else np.full(len(ix), 1.0 / N))
        idx, w = np.concatenate(idx_l), np.concatenate(w_l)
        w = w / w.sum()
    else:
        idx, w = _select(bank, all_items, n, method, seed)
    anchors = Anchors(idx=np.asarray(idx, dtype=np.int64), weights=np.asarray(w, dtype=np.float64),
                      item_ids=[bank.item_ids[i] for i in idx], method=method, seed=seed)
    if compute_gp_lambda:
        anchors.gp_lambda = gp_lambda(bank, anchors.idx, anchors.weights, random=anchors.random)
    return anchors
