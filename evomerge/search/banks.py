"""Stage 3, banks and anchors: one item bank per task (fitted on the calibration answers, or
given) and the anchors chosen from it, both saved in the run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from evomerge.config import RunConfig
from evomerge.errors import EvomergeError
from evomerge.search.calibration import calibration_records
from evomerge.search.context import SearchContext
from evomerge.search.fitness import endpoint_refs, first_round_size, procedure_of, unbits
from evomerge.search.inputs import load_given_bank


def fit_banks(ctx: SearchContext) -> None:
    """Fit (or reuse) one item bank per task and choose its anchors; both saved in the run.

    Whatever was computed, the loop then uses what is on disk, so an uninterrupted and a
    resumed run see bit-identical banks and anchors.
    """
    import irt

    cfg, rd = ctx.cfg, ctx.rd

    records = calibration_records(ctx)
    names = [r["name"] for r in records]
    rd.banks.mkdir(parents=True, exist_ok=True)
    for task, pair in ctx.tasks.items():
        path = rd.bank_path(task)
        anchors_path = rd.banks / f"{task}.anchors.json"
        item_ids = [it.id for it in pair.search.items]
        try:
            if not path.exists():
                given = (Path(cfg.calibration.banks) / f"{task}.bank.safetensors"
                         if cfg.calibration.banks else None)
                auto = cfg.fitness.estimator == "auto"
                if given is not None:
                    bank = load_given_bank(cfg, task, item_ids)
                    if auto and "procedure" not in bank.meta:
                        choose_given(ctx, task, bank)
                else:
                    Y = np.stack([unbits(r["answers"][task]) for r in records]).astype(float)
                    dim = cfg.calibration.dim
                    if auto:  # chosen first: the chosen procedure may fix the bank's dimension
                        proc = choose_task_procedure(cfg, Y, item_ids, names, ctx.log)
                        dim = proc["dim"] if proc["dim"] is not None else dim
                    t0 = time.perf_counter()
                    groups = [it.subgroup for it in pair.search.items]  # kept in the bank (irt anchors --stratify)
                    bank = irt.ItemBank.fit(Y, item_ids=item_ids, subject_names=names,
                                            dim=dim, seed=cfg.seed, task=task,
                                            subgroups=None if all(g is None for g in groups) else
                                            [g or "" for g in groups])
                    ctx.log(f"  item bank {task}: d={bank.dim}, fitted in "
                            f"{time.perf_counter() - t0:.1f}s on {len(names)} models")
                    if auto:
                        bank.meta["procedure"] = proc
                        ctx.log(f"    {describe_procedure(proc)}")
                        check = proc.pop("_check", None)
                    else:
                        try:
                            check = estimate_check(cfg, Y, item_ids, names, bank.dim)
                        except irt.IRTError as exc:  # a diagnostic: never the reason a run stops
                            check = None
                            ctx.log(f"    expected error of the estimate: not computed ({exc})")
                    if check is not None:
                        bank.meta["estimate_check"] = check.to_dict()
                        ctx.log(f"    {describe_check(check)}")
                bank.save(path)
            bank = irt.ItemBank.load(path)
            if not anchors_path.exists():
                # anchors are chosen among this task's items only (a given bank may hold more)
                # an adaptive test (rounds > 1) stores its first round here: the rest is per candidate
                proc = procedure_of(cfg, bank)
                n_fixed = first_round_size(cfg, len(item_ids), proc.rounds)
                sel = irt.select_anchors(bank, n_fixed, method=proc.anchor_method, seed=cfg.seed)
                tmp = anchors_path.with_name(anchors_path.name + ".tmp")
                sel.save(tmp)
                tmp.replace(anchors_path)
            ctx.banks[task] = bank
            ctx.anchors[task] = irt.Anchors.load(anchors_path, bank)
        except irt.IRTError as exc:
            raise EvomergeError(f"task {task!r}: {exc}") from None
        pos = {iid: i for i, iid in enumerate(item_ids)}
        ctx.anchor_positions[task] = np.asarray([pos[i] for i in ctx.anchors[task].item_ids], dtype=int)
    if ctx.executor is not None:
        ctx.executor.sync(ctx)  # the workers answer with these banks and anchors


#: the one-standard-error rule of ``fitness.estimator: auto``: another procedure replaces the
#: default only if it beats it by more than one standard error of the paired per-model difference
#: (measured on the zoo, benchmarks/irt_real.py: never worse than the default at 20 and 40 items,
#: where the plain smallest error was worse on some tasks)
AUTO_SE = 1.0


def auto_options(cfg: RunConfig, n_items: int, dim: int | None = None, endpoints: bool = True) -> tuple[list, object]:
    """The candidate procedures of ``fitness.estimator: auto`` and the default they must beat:
    irt.choose's candidates (with the endpoint ones where the endpoints are among the subjects,
    as in a run's calibration) that fit in this task's anchors, and mp-IRT (p-IRT without the
    endpoints) with this run's ``anchor_method`` and ``rounds``. A bank dimension fixed by
    ``dim`` (a given bank's) or ``calibration.dim`` replaces "chosen by validation"."""
    from irt.choose import DEFAULT_OPTIONS, ENDPOINT_OPTIONS, Procedure

    fix = dim if dim is not None else cfg.calibration.dim
    n = min(cfg.fitness.anchors, n_items)
    default = Procedure("mpirt" if endpoints else "pirt", cfg.fitness.anchor_method, min(cfg.fitness.rounds, n), fix)
    cands = (*DEFAULT_OPTIONS, *ENDPOINT_OPTIONS) if endpoints else DEFAULT_OPTIONS
    opts = [Procedure(p.estimator, p.anchor_method, p.rounds, p.dim if p.dim is not None and dim is None else fix)
            for p in cands if p.rounds <= n]
    return list(dict.fromkeys([default, *opts])), default


def choose_task_procedure(cfg: RunConfig, Y: np.ndarray, item_ids: list[str], names: list[str], log,
                          dim: int | None = None) -> dict:
    """``fitness.estimator: auto`` on one task: :func:`irt.choose_procedure` on the calibration
    answers ``Y`` (4-fold cross-fit over the sampled models, endpoints always in training; the
    default kept unless clearly beaten, :data:`AUTO_SE`; then the calibrated stratified mean,
    ``cmean/strata``, the robust fallback, unless it too is clearly beaten).
    Returns what the bank records as ``meta["procedure"]`` (``ProcedureChoice.to_dict()`` plus
    ``chosen: True``; with ``_check``, the chosen procedure's :class:`EstimateCheck`, to pop).
    Where no choice can be made (fewer than 2 sampled models) the default is recorded, with
    ``chosen: False`` and the reason."""
    import irt

    eps = endpoint_refs(cfg)
    has_eps = set(eps) <= set(names)
    opts, default = auto_options(cfg, len(item_ids), dim, endpoints=has_eps)
    t0 = time.perf_counter()
    try:
        ch = irt.choose_procedure(Y, item_ids, names, n=min(cfg.fitness.anchors, len(item_ids)), options=opts,
                                  endpoints=eps if has_eps else [], folds=4, seed=cfg.seed, default=default,
                                  se=AUTO_SE, prefer=[p for p in opts if p.estimator == "cmean"][:1])
    except irt.IRTError as exc:
        log(f"    procedure: not chosen ({exc}); the default {default.name} is used")
        return {"estimator": default.estimator, "anchor_method": default.anchor_method,
                "rounds": default.rounds, "dim": default.dim, "name": default.name, "chosen": False,
                "reason": str(exc)}
    d = ch.to_dict()
    d.update(chosen=True, se=AUTO_SE, seconds=round(time.perf_counter() - t0, 1), _check=ch.estimate_check())
    return d


def choose_given(ctx: SearchContext, task: str, bank) -> None:
    """``fitness.estimator: auto`` with a bank from ``calibration.banks`` that records no
    procedure: chosen on the calibration answers the bank holds (at the bank's dimension)."""
    if bank.responses is None:
        raise EvomergeError(f"calibration.banks: the bank of task {task!r} records neither a procedure nor its "
                            "calibration answers, so fitness.estimator auto cannot choose one; set an "
                            "estimator, or use banks from an earlier run")
    proc = choose_task_procedure(ctx.cfg, bank.responses, bank.item_ids, bank.subject_names, ctx.log,
                                 dim=bank.dim)
    check = proc.pop("_check", None)
    bank.meta["procedure"] = proc
    if check is not None:
        bank.meta["estimate_check"] = check.to_dict()
    ctx.log(f"    {describe_procedure(proc)}")


def describe_procedure(p: dict | None) -> str | None:
    """One line for a bank's ``meta["procedure"]`` (``fitness.estimator: auto``); None without."""
    if not p:
        return None
    if not p.get("chosen"):
        return f"procedure: {p['name']} (the default; not chosen: {p.get('reason', '')})"
    runner = next((r for r in p["table"] if r["name"] != p["name"]), None)
    tail = f"; {len(p['table'])} candidates; plain mean of {p['n']} random items: {p['plain_mean_mae']:.3f})"
    if p["name"] == p["default"]:
        rule = f" by more than {p['se']:g} standard error(s)" if p.get("se") else ""
        return (f"procedure: the default {p['name']} kept (cross-fitted error {p['mae']:.3f}"
                + (f"; best other {runner['name']}: {runner['mae']:.3f}, not better{rule}" if runner else "") + tail)
    return (f"procedure chosen: {p['name']} (cross-fitted error {p['mae']:.3f}; default {p['default']}: "
            f"{p['default_mae']:.3f}" + (f"; next best {runner['name']}: {runner['mae']:.3f}" if runner else "") + tail)


def estimate_check(cfg: RunConfig, Y: np.ndarray, item_ids: list[str], names: list[str], dim: int):
    """The expected error of this run's fitness estimates on one task: the fitness procedure
    cross-fitted on the calibration models (:func:`irt.validate.cross_validate_estimates`);
    None with fewer than 2 sampled calibration models."""
    from irt.validate import cross_validate_estimates

    if len(names) - len(endpoint_refs(cfg)) < 2:
        return None
    fit = cfg.fitness
    return cross_validate_estimates(Y, item_ids, names, n=fit.anchors, estimator=fit.estimator,
                                    anchor_method=fit.anchor_method, rounds=fit.rounds,
                                    endpoints=endpoint_refs(cfg), folds=4, dim=dim, seed=cfg.seed)


def describe_check(c) -> str:
    """One log line for an :class:`irt.validate.EstimateCheck`."""
    return (f"expected error of the {c.n}-item estimate: {c.mae:.3f} (bias {c.bias:+.3f}; "
            f"{c.folds}-fold cross-fit on {c.n_subjects} sampled calibration models, whose "
            f"accuracies spread with sd {c.accuracy_sd:.3f}; plain mean of {c.n} random items: "
            f"{c.plain_mean_mae:.3f})")
