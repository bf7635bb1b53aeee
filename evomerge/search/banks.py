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
from evomerge.search.fitness import endpoint_refs, first_round_size, unbits
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
                if given is not None:
                    bank = load_given_bank(cfg, task, item_ids)
                else:
                    Y = np.stack([unbits(r["answers"][task]) for r in records]).astype(float)
                    t0 = time.perf_counter()
                    groups = [it.subgroup for it in pair.search.items]  # kept in the bank (irt anchors --stratify)
                    bank = irt.ItemBank.fit(Y, item_ids=item_ids, subject_names=names,
                                            dim=cfg.calibration.dim, seed=cfg.seed, task=task,
                                            subgroups=None if all(g is None for g in groups) else
                                            [g or "" for g in groups])
                    ctx.log(f"  item bank {task}: d={bank.dim}, fitted in "
                            f"{time.perf_counter() - t0:.1f}s on {len(names)} models")
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
                n_fixed = first_round_size(cfg, len(item_ids))
                sel = irt.select_anchors(bank, n_fixed, method=cfg.fitness.anchor_method, seed=cfg.seed)
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
