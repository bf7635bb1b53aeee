"""How accurate will few-item estimates be on *this* data? Cross-fitting on the calibration set.

Before trusting a bank's 20-item estimates, run the whole procedure on subjects whose full
answers are known but that the bank did not see: split the (non-endpoint) calibration subjects
into ``folds`` groups; for each group, fit a bank on everyone else (endpoints always included),
choose the anchors the same way, let each held-out subject answer only its anchors (or take
the adaptive test) from its recorded answers, and compare the estimate with its accuracy on all
items. The mean absolute error over all held-out subjects is the expected error of the
procedure — slightly pessimistic, since each fold's bank sees a (folds − 1)/folds share of the
calibration subjects.

The real run then uses the bank fitted on all of them; the check is reported next to it.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from irt.adaptive import ADAPTIVE_ESTIMATORS, round_sizes, run_adaptive
from irt.anchors import METHODS, select_anchors
from irt.bank import ItemBank
from irt.errors import IRTError
from irt.estimators import ESTIMATORS, estimate_accuracy_batch
from irt.model import check_responses

__all__ = ["EstimateCheck", "heldout_estimates", "cross_validate_estimates"]

PLAIN_DRAWS = 20  # random item sets per fold for the plain-mean baseline


@dataclass
class EstimateCheck:
    """Result of :func:`cross_validate_estimates`: ``mae`` (mean |estimate − accuracy|), ``bias``
    (mean estimate − accuracy), ``accuracy_sd`` (spread of the held-out subjects' accuracies, for
    scale), ``plain_mean_mae`` (the same held-out subjects estimated by the plain mean of ``n``
    random items, the naive baseline; averaged over 20 random item sets per fold), the settings,
    and per-subject ``errors`` (signed)."""

    n: int
    estimator: str
    anchor_method: str
    rounds: int
    folds: int
    n_subjects: int
    mae: float
    bias: float
    accuracy_sd: float
    plain_mean_mae: float
    subjects: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready (e.g. for an item bank's metadata)."""
        return asdict(self)


def subject_folds(names, endpoints, folds: int, rng: np.random.Generator, what: str) -> list[np.ndarray]:
    """The subjects that are not ``endpoints``, split at random (``rng``) into at most ``folds``
    held-out groups (positions in ``names``); endpoints always stay in training. ``what`` names
    the caller in errors."""
    others = np.array([m for m in range(len(names)) if names[m] not in endpoints])
    if len(others) < 2:
        raise IRTError(f"{what} needs at least 2 subjects besides the endpoints, got {len(others)}")
    if int(folds) < 2:
        raise IRTError(f"{what}: folds must be >= 2, got {folds!r}")
    return np.array_split(rng.permutation(others), min(int(folds), len(others)))


def heldout_estimates(bank, Y, n: int = 20, *, estimator: str = "pirt", anchor_method: str = "info",
                      rounds: int = 1, endpoint_theta=None, seed: int = 0) -> np.ndarray:
    """Estimated full accuracy of each row of ``Y`` (subjects × the bank's items, full answers,
    NaN = missing) from ``n`` of its answers: the ``anchor_method`` anchors (``rounds`` = 1) or an
    adaptive test of ``n`` items in ``rounds`` rounds whose first round is that design."""

    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2 or Y.shape[1] != bank.n_items:
        raise IRTError(f"held-out answers: expected subjects × {bank.n_items} items, got shape {Y.shape}")
    n = min(int(n), bank.n_items)
    if rounds == 1:
        anc = select_anchors(bank, n, method=anchor_method, seed=seed)
        return estimate_accuracy_batch(estimator, bank, anc.idx, anc.weights, Y[:, anc.idx],
                                       endpoint_theta=endpoint_theta, gp_lambda=anc.gp_lambda,
                                       random_anchors=anc.random)
    first = select_anchors(bank, round_sizes(n, rounds)[0], method=anchor_method, seed=seed,
                           compute_gp_lambda=False).idx
    return np.array([run_adaptive(bank, lambda pos, y=y: y[pos], n, rounds, first=first, estimator=estimator,
                                  endpoint_theta=endpoint_theta).estimate for y in Y])


def cross_validate_estimates(
    Y,
    item_ids=None,
    subject_names=None,
    *,
    n: int = 20,
    estimator: str = "pirt",
    anchor_method: str = "info",
    rounds: int = 1,
    endpoints=(),
    folds: int = 4,
    dim: int | None = None,
    seed: int = 0,
) -> EstimateCheck:
    """Expected error of ``n``-item estimates, by ``folds``-fold cross-fitting over the subjects
    of ``Y`` that are not ``endpoints`` (see the module docstring). ``endpoints``: names of the
    subjects mp-IRT combines (always in the training part; needed for ``mpirt`` / ``gmpirt``).
    ``dim``: the banks' dimension (None = chosen by validation in every fold)."""

    if estimator not in ESTIMATORS:
        raise IRTError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if anchor_method not in METHODS:
        raise IRTError(f"unknown anchor method {anchor_method!r}; choose one of {', '.join(METHODS)}")
    round_sizes(n, rounds)  # n and rounds: positive integers
    if rounds > 1 and estimator not in ADAPTIVE_ESTIMATORS:
        raise IRTError(f"an adaptive test (rounds > 1) needs estimator {' or '.join(ADAPTIVE_ESTIMATORS)}; "
                       f"the mean of adaptively chosen items is biased, so {estimator!r} is not offered")
    Y = check_responses(Y, item_ids=item_ids, subject_names=subject_names)
    M, N = Y.shape
    names = list(subject_names) if subject_names is not None else [f"subject{m}" for m in range(M)]
    endpoints = list(endpoints)
    missing = [e for e in endpoints if e not in names]
    if missing:
        raise IRTError(f"cross-validation: endpoints {missing} are not among the subjects")
    if estimator in ("mpirt", "gmpirt") and not endpoints:
        raise IRTError(f"cross-validation: estimator {estimator!r} needs endpoints")
    if int(rounds) > min(int(n), N):
        raise IRTError(f"rounds: {rounds} rounds for {min(int(n), N)} items (n = {n}, {N} items in the "
                       "responses); each round asks at least one item, so use at most that many rounds")
    rng = np.random.default_rng(seed)
    groups = subject_folds(names, endpoints, folds, rng, "cross-validation")
    others = np.sort(np.concatenate(groups))  # every subject that is not an endpoint
    folds = len(groups)
    err = np.full(M, np.nan)
    plain = np.full(M, np.nan)
    for g in groups:
        train = np.setdiff1d(np.arange(M), g)
        bank = ItemBank.fit(Y[train], item_ids, [names[m] for m in train], dim=dim, seed=seed)
        E = bank.subject_theta(endpoints) if estimator in ("mpirt", "gmpirt") else None
        truth = np.nanmean(Y[g], axis=1)
        est = heldout_estimates(bank, Y[g], n, estimator=estimator, anchor_method=anchor_method, rounds=rounds,
                                endpoint_theta=E, seed=seed)
        err[g] = est - truth
        picks = [rng.choice(N, min(n, N), replace=False) for _ in range(PLAIN_DRAWS)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a draw with no observed answer: skipped
            plain[g] = np.nanmean([np.abs(np.nanmean(Y[np.ix_(g, p)], axis=1) - truth) for p in picks], axis=0)
    tested = others[~np.isnan(err[others])]
    truth_all = np.nanmean(Y[tested], axis=1)
    return EstimateCheck(
        n=min(int(n), N), estimator=estimator, anchor_method=anchor_method, rounds=int(rounds), folds=folds,
        n_subjects=len(tested), mae=float(np.abs(err[tested]).mean()), bias=float(err[tested].mean()),
        accuracy_sd=float(truth_all.std()), plain_mean_mae=float(np.nanmean(np.abs(plain[tested]))),
        subjects=[names[m] for m in tested], errors=[float(e) for e in err[tested]])
