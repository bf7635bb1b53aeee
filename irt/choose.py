"""Choose the few-item procedure for *this* data, by cross-fitting on the calibration subjects.

Which estimator, anchor design and number of rounds is best depends on the data: on a
calibration population of a few dozen merges the adaptive p-IRT test wins, on a dozen unrelated
real models a plain p-IRT on information anchors or gp-IRT may, and with too few calibration
subjects to trust the bank nothing beats ... well, measure it. :func:`choose_procedure` runs
every candidate procedure through the same cross-fitting as
:func:`irt.validate.cross_validate_estimates` (``folds`` groups of subjects; for each, a bank
fitted on the others, the held-out subjects answer only the procedure's ``n`` items), with one
bank per fold shared by all candidates (the fits dominate the cost), and returns the one with
the smallest mean absolute error together with every candidate's cross-fitted error.

Only the subjects passed in are used, so calling it on a search's calibration population (or on
the training part of a benchmark split) chooses honestly: nothing about the subjects to be
estimated later is seen.

A candidate is ``(estimator, anchor_method, rounds)`` plus optionally a fixed bank dimension
``dim`` (None = chosen by validation, :func:`irt.model.select_dim`) — e.g. ``dim=1`` is a
strong prior when the calibration set is small.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

from irt.adaptive import ADAPTIVE_ESTIMATORS
from irt.anchors import METHODS
from irt.bank import ItemBank
from irt.errors import IRTError
from irt.estimators import ESTIMATORS
from irt.model import check_responses
from irt.validate import PLAIN_DRAWS, heldout_estimates, subject_folds

__all__ = ["DEFAULT_OPTIONS", "Procedure", "ProcedureChoice", "choose_procedure", "crossfit_procedures",
           "pick_procedure"]


@dataclass(frozen=True)
class Procedure:
    """One few-item procedure: ``estimator`` (irt.estimators), ``anchor_method`` (irt.anchors;
    for ``rounds`` > 1 the design of the first round), ``rounds`` (1 = fixed anchors, R > 1 =
    adaptive test), ``dim`` (bank dimension; None = chosen by validation)."""

    estimator: str = "pirt"
    anchor_method: str = "info"
    rounds: int = 1
    dim: int | None = None

    @property
    def name(self) -> str:
        s = f"{self.estimator}/{'adaptive' + str(self.rounds) + '(' + self.anchor_method + ')' if self.rounds > 1 else self.anchor_method}"
        return s + (f"/d={self.dim}" if self.dim is not None else "")


# The candidates tried by default (estimators needing endpoints are added when endpoints are given).
DEFAULT_OPTIONS = (
    Procedure("pirt", "info", 1),
    Procedure("pirt", "random", 1),
    Procedure("pirt", "irt", 1),
    Procedure("gpirt", "info", 1),
    Procedure("gpirt", "random", 1),
    Procedure("gpirt", "irt", 1),
    Procedure("pirt", "info", 4),
    Procedure("pirt", "info", 1, dim=1),
    Procedure("gpirt", "random", 1, dim=1),
    Procedure("pirt", "info", 4, dim=1),
    Procedure("mean", "random", 1),
    Procedure("mean", "irt", 1),
    Procedure("mean", "strata", 1),
    Procedure("cmean", "strata", 1),
    # on HELM's BoolQ / HellaSwag (24 models) the strongest fixed procedures (docs/irt_real.md)
    Procedure("gpirt", "strata", 1),
    Procedure("cmean", "correctness", 1),
    Procedure("gpirt", "correctness", 1),
)
ENDPOINT_OPTIONS = (
    Procedure("mpirt", "info", 1),
    Procedure("gmpirt", "random", 1),
    Procedure("mpirt", "info", 4),
)


@dataclass
class ProcedureChoice:
    """Result of :func:`choose_procedure`: the chosen ``estimator`` / ``anchor_method`` /
    ``rounds`` / ``dim`` and its cross-fitted ``mae``; ``table``: every candidate (dicts with
    ``estimator, anchor_method, rounds, dim, name, mae, bias``), best first; ``plain_mean_mae``:
    the plain mean of ``n`` random items on the same held-out subjects; ``default_mae``: the
    cross-fitted error of ``default`` (the procedure used without the choice); ``subjects`` /
    ``errors``: the tested subjects and the chosen procedure's signed error on each;
    ``accuracy_sd``: the spread of their accuracies (for scale)."""

    estimator: str
    anchor_method: str
    rounds: int
    dim: int | None
    mae: float
    n: int
    folds: int
    n_subjects: int
    plain_mean_mae: float
    default: str
    default_mae: float
    table: list[dict] = field(default_factory=list)
    subjects: list[str] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    accuracy_sd: float = float("nan")

    @property
    def procedure(self) -> Procedure:
        return Procedure(self.estimator, self.anchor_method, self.rounds, self.dim)

    @property
    def name(self) -> str:
        return self.procedure.name

    def to_dict(self) -> dict:
        """JSON-ready (e.g. for an item bank's ``meta["procedure"]``)."""
        d = asdict(self)
        d["name"] = self.name
        return d

    def estimate_check(self):
        """The chosen procedure's cross-fitted error as an :class:`irt.validate.EstimateCheck`
        (the same numbers as the choice; the smallest of the candidates' errors, so slightly
        optimistic)."""
        from irt.validate import EstimateCheck

        return EstimateCheck(n=self.n, estimator=self.estimator, anchor_method=self.anchor_method,
                             rounds=int(self.rounds), folds=self.folds, n_subjects=self.n_subjects,
                             mae=self.mae, bias=float(np.mean(self.errors)) if self.errors else float("nan"),
                             accuracy_sd=self.accuracy_sd, plain_mean_mae=self.plain_mean_mae,
                             subjects=list(self.subjects), errors=list(self.errors))


def _as_procedure(o) -> Procedure:
    if isinstance(o, Procedure):
        return o
    if isinstance(o, dict):
        return Procedure(**o)
    if isinstance(o, (tuple, list)):
        return Procedure(*o)
    if isinstance(o, str):  # "pirt/info/1[/d]"
        parts = o.split("/")
        return Procedure(parts[0], parts[1] if len(parts) > 1 else "info", int(parts[2]) if len(parts) > 2 else 1,
                         int(parts[3]) if len(parts) > 3 and parts[3] not in ("", "auto") else None)
    raise IRTError(f"procedure: expected Procedure, dict, tuple or 'estimator/anchor_method/rounds', got {o!r}")


def _validate(p: Procedure, n: int, N: int, endpoints) -> None:
    if p.estimator not in ESTIMATORS:
        raise IRTError(f"unknown estimator {p.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    if p.anchor_method not in METHODS:
        raise IRTError(f"unknown anchor method {p.anchor_method!r}; choose one of {', '.join(METHODS)}")
    if int(p.rounds) < 1 or int(p.rounds) > min(n, N):
        raise IRTError(f"rounds: {p.rounds} rounds for {min(n, N)} items")
    if p.rounds > 1 and p.estimator not in ADAPTIVE_ESTIMATORS:
        raise IRTError(f"an adaptive test (rounds > 1) needs estimator {' or '.join(ADAPTIVE_ESTIMATORS)}")
    if p.estimator in ("mpirt", "gmpirt") and not endpoints:
        raise IRTError(f"estimator {p.estimator!r} needs endpoints")
    if p.dim is not None and (int(p.dim) != p.dim or p.dim < 1):
        raise IRTError(f"dim must be a positive integer or None, got {p.dim!r}")


def crossfit_procedures(Y, item_ids=None, subject_names=None, *, options=DEFAULT_OPTIONS, n: int = 20,
                        endpoints=(), folds: int = 4, seed: int = 0, dims=(1, 2, 3, 5)):
    """Signed cross-fitted errors of each procedure in ``options`` on the subjects of ``Y`` that
    are not ``endpoints``: returns (options, errors (len(options) × tested subjects), plain-mean
    absolute errors per tested subject, tested subject positions). One bank per (fold, dim)."""

    Y = check_responses(Y, item_ids=item_ids, subject_names=subject_names)
    M, N = Y.shape
    names = list(subject_names) if subject_names is not None else [f"subject{m}" for m in range(M)]
    endpoints = list(endpoints)
    missing = [e for e in endpoints if e not in names]
    if missing:
        raise IRTError(f"choose_procedure: endpoints {missing} are not among the subjects")
    options = [_as_procedure(o) for o in options]
    if not options:
        raise IRTError("choose_procedure: no candidate procedures")
    n = min(int(n), N)
    for p in options:
        _validate(p, n, N, endpoints)
    rng = np.random.default_rng(seed)
    groups = subject_folds(names, endpoints, folds, rng, "choose_procedure")
    others = np.sort(np.concatenate(groups))  # every subject that is not an endpoint
    err = np.full((len(options), M), np.nan)
    plain = np.full(M, np.nan)
    for g in groups:
        train = np.setdiff1d(np.arange(M), g)
        banks = {}
        truth = np.nanmean(Y[g], axis=1)
        for k, p in enumerate(options):
            if p.dim not in banks:
                # fewer than 5 training subjects: no validation split for the dimension; use 1
                d = p.dim if p.dim is not None or len(train) >= 5 else 1
                banks[p.dim] = ItemBank.fit(Y[train], item_ids, [names[m] for m in train], dim=d, seed=seed,
                                            dims=dims)
            bank = banks[p.dim]
            E = bank.subject_theta(endpoints) if p.estimator in ("mpirt", "gmpirt") else None
            est = heldout_estimates(bank, Y[g], n, estimator=p.estimator, anchor_method=p.anchor_method,
                                    rounds=p.rounds, endpoint_theta=E, seed=seed)
            err[k, g] = est - truth
        picks = [rng.choice(N, n, replace=False) for _ in range(PLAIN_DRAWS)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            plain[g] = np.nanmean([np.abs(np.nanmean(Y[np.ix_(g, p)], axis=1) - truth) for p in picks], axis=0)
    tested = others[~np.isnan(err[:, others]).any(0)]
    return options, err[:, tested], plain[tested], tested


def pick_procedure(err, default: int, *, margin: float = 0.0, se: float = 0.0, prefer=()) -> int:
    """The row of ``err`` (candidates × tested subjects, signed cross-fitted errors) to choose.

    ``se`` = 0: the smallest mean absolute error, unless it does not beat row ``default`` by more
    than ``margin``. ``se`` > 0 (the one-standard-error rule): the first of ``default``, then the
    rows in ``prefer``, whose absolute errors exceed the best candidate's by at most ``margin`` +
    ``se`` standard errors of the paired per-subject difference -- with a dozen subjects the
    smallest of many noisy errors is mostly luck, and a procedure known to be robust (the default,
    the plain mean) is kept unless clearly beaten; else the best."""
    ae = np.abs(np.asarray(err, dtype=np.float64))
    mae = ae.mean(1)
    best = int(np.argsort(mae, kind="stable")[0])
    if se <= 0:
        return best if mae[best] < mae[default] - margin else int(default)
    for k in (default, *prefer):
        d = ae[k] - ae[best]
        sem = d.std(ddof=1) / np.sqrt(d.size) if d.size > 1 else 0.0
        if d.mean() <= margin + se * sem:
            return int(k)
    return best


def choose_procedure(Y, item_ids=None, subject_names=None, *, n: int = 20, options=None, endpoints=(),
                     folds: int = 4, seed: int = 0, default=None, margin: float = 0.0,
                     dims=(1, 2, 3, 5), se: float = 0.0, prefer=()) -> ProcedureChoice:
    """The few-item procedure with the smallest cross-fitted error on these subjects.

    ``Y``: calibration subjects × items (0/1, NaN = missing), e.g. a search's calibration
    population (endpoints included, named in ``endpoints``: they are always in the training part
    and enable mp-IRT candidates). ``options``: candidate procedures (:class:`Procedure`, dicts,
    tuples ``(estimator, anchor_method, rounds[, dim])`` or strings ``"pirt/info/4"``); default
    :data:`DEFAULT_OPTIONS` (+ :data:`ENDPOINT_OPTIONS` with endpoints). ``default``: the procedure
    used without a choice (default ``mpirt/info/1`` with endpoints, else ``pirt/info/1``); it is
    always evaluated, and another candidate is chosen only if its error is lower by more than
    ``margin`` (with ``se`` > 0: by more than ``margin`` + ``se`` standard errors, and the
    procedures in ``prefer`` are tried next; see :func:`pick_procedure`). Returns a
    :class:`ProcedureChoice` (chosen procedure + every candidate's error).
    """
    if options is None:
        options = list(DEFAULT_OPTIONS) + (list(ENDPOINT_OPTIONS) if endpoints else [])
    options = [_as_procedure(o) for o in options]
    default = _as_procedure(default) if default is not None else (
        Procedure("mpirt", "info", 1) if endpoints else Procedure("pirt", "info", 1))
    prefer = [_as_procedure(o) for o in prefer]
    if default not in options:
        options = [default, *options]
    options = list(dict.fromkeys([*options, *prefer]))
    opts, err, plain, tested = crossfit_procedures(Y, item_ids, subject_names, options=options, n=n,
                                                   endpoints=endpoints, folds=folds, seed=seed, dims=dims)
    mae = np.abs(err).mean(1)
    bias = err.mean(1)
    order = np.argsort(mae, kind="stable")
    table = [{"estimator": opts[k].estimator, "anchor_method": opts[k].anchor_method, "rounds": opts[k].rounds,
              "dim": opts[k].dim, "name": opts[k].name, "mae": float(mae[k]), "bias": float(bias[k])}
             for k in order]
    kd = opts.index(default)
    best = pick_procedure(err, kd, margin=margin, se=se, prefer=[opts.index(q) for q in prefer])
    p = opts[best]
    Yc = np.asarray(Y, dtype=np.float64)
    names = list(subject_names) if subject_names is not None else [f"subject{m}" for m in range(Yc.shape[0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        acc_sd = float(np.nanmean(Yc[tested], axis=1).std()) if len(tested) else float("nan")
    return ProcedureChoice(estimator=p.estimator, anchor_method=p.anchor_method, rounds=p.rounds, dim=p.dim,
                           mae=float(mae[best]), n=min(int(n), Yc.shape[1]), folds=min(int(folds), len(tested)),
                           n_subjects=len(tested), plain_mean_mae=float(np.mean(plain)), default=default.name,
                           default_mae=float(mae[kd]), table=table, subjects=[names[m] for m in tested],
                           errors=[float(e) for e in err[best]], accuracy_sd=acc_sd)
