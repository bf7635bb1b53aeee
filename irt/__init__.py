"""Item Response Theory for shrinking benchmarks (independent of evomerge).

Fit a multidimensional 2PL item bank on a subjects × items 0/1 matrix, pick a few anchor items,
and estimate a new subject's full accuracy from its answers to those anchors::

    from irt import ItemBank, select_anchors, estimate_accuracy
    bank = ItemBank.fit(Y, item_ids, subject_names, dim=None, seed=0)   # Y: NaN = missing
    anchors = select_anchors(bank, n=20, method="irt", seed=0)          # .idx, .weights, .item_ids
    E = bank.subject_theta(["expert_a", "expert_b"])                    # endpoint abilities
    acc = estimate_accuracy("mpirt", bank, anchors.idx, anchors.weights, answers, endpoint_theta=E)

or ask each subject adaptively, in a few rounds (fewer items for the same error)::

    from irt import run_adaptive
    res = run_adaptive(bank, lambda pos: answer_items(pos), n=20, rounds=4)   # res.estimate

and know beforehand how accurate such estimates will be on your data (the whole procedure
cross-fitted on the calibration subjects)::

    from irt import cross_validate_estimates
    check = cross_validate_estimates(Y, item_ids, subject_names, n=20, estimator="pirt", rounds=4)

or let the same cross-fitting choose the procedure (estimator × anchors × rounds × dimension)::

    from irt import choose_procedure
    ch = choose_procedure(Y, item_ids, subject_names, n=20)   # ch.estimator, ch.anchor_method, ch.rounds, ch.dim

Modules: :mod:`irt.model` (MIRT2PL, fit_ability, select_dim), :mod:`irt.bank` (ItemBank and
its file format), :mod:`irt.anchors`, :mod:`irt.adaptive` (adaptive tests), :mod:`irt.estimators`, :mod:`irt.validate`
(expected error by cross-fitting), :mod:`irt.choose` (the procedure chosen by cross-fitting), :mod:`irt.io` (response files),
:mod:`irt.bayes` (optional pymc fitter, ``pip install evomerge[pymc]``).
"""

from irt.adaptive import AdaptiveResult, next_items, run_adaptive
from irt.anchors import Anchors, select_anchors
from irt.bank import ItemBank
from irt.choose import Procedure, ProcedureChoice, choose_procedure, crossfit_procedures
from irt.errors import IRTError
from irt.estimators import ESTIMATORS, estimate_accuracy, estimate_accuracy_batch, gp_lambda
from irt.model import MIRT2PL, fit_ability, procrustes_align, select_dim
from irt.validate import EstimateCheck, cross_validate_estimates, heldout_estimates

__all__ = [
    "AdaptiveResult",
    "Anchors",
    "ESTIMATORS",
    "EstimateCheck",
    "IRTError",
    "ItemBank",
    "MIRT2PL",
    "Procedure",
    "ProcedureChoice",
    "choose_procedure",
    "cross_validate_estimates",
    "crossfit_procedures",
    "estimate_accuracy",
    "estimate_accuracy_batch",
    "fit_ability",
    "gp_lambda",
    "heldout_estimates",
    "next_items",
    "procrustes_align",
    "run_adaptive",
    "select_anchors",
    "select_dim",
]
