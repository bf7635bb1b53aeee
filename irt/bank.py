"""Item banks: calibrated item parameters plus everything needed to use them later.

File format (one file, ``*.safetensors``; never pickle)
-------------------------------------------------------
A safetensors file whose tensors are

==============  ==================  ==========================================================
``a``           float64 items × d   discriminations
``b``           float64 items       difficulties
``theta``       float64 subjects×d  abilities of the calibration subjects
``responses``   int8 subjects×items calibration answers, −1 = missing (optional)
==============  ==================  ==========================================================

and whose header ``__metadata__`` (string → string) holds

* ``format`` = ``"irt-itembank"``, ``format_version`` = ``"1"``;
* ``item_ids``, ``subject_names``: JSON lists of strings (unique);
* ``subgroups``: JSON list of strings (one per item) or ``null``;
* ``meta``: JSON object: ``task``, ``dim``, ``fit`` (settings), ``quality`` (train log-loss,
  dimension-selection table, gp-IRT statistics), ``created`` (UTC ISO time), ``irt_version``.

:meth:`ItemBank.load` checks all of it (format tag, shapes, finiteness, uniqueness) and says
what is wrong. Asking a bank about items it does not know is an :class:`IRTError` that lists
(the first few of) the unknown ids.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from irt.errors import IRTError
from irt.model import MIRT2PL, _sigmoid, check_responses, fit_ability, select_dim

__all__ = ["ItemBank", "FORMAT", "FORMAT_VERSION"]

FORMAT = "irt-itembank"
FORMAT_VERSION = "1"
IRT_VERSION = "0.1.0"


def check_calibration_data(Y: np.ndarray, name: str = "responses") -> None:
    """Refuse a response matrix no bank can be calibrated on: fewer than 2 subjects (abilities and
    difficulties are then not separable), or no variance at all (every observed answer the same:
    nothing tells items or subjects apart). Items that every subject answers alike are allowed;
    their parameters rest on the prior (see :func:`constant_items`)."""
    M = Y.shape[0]
    if M < 2:
        raise IRTError(f"{name}: a bank needs at least 2 subjects (better 10 or more), got {M}; "
                       "calibrate on more models")
    obs = Y[~np.isnan(Y)]
    if obs.size and (obs == obs[0]).all():
        raise IRTError(f"{name}: every observed answer is {int(obs[0])}; with no variance a bank would "
                       "be degenerate (nothing tells items or subjects apart); calibrate on subjects that "
                       "answer some items right and some wrong")


def constant_items(Y) -> list[int]:
    """Positions of the items whose observed answers are all the same (0 for all or 1 for all)."""
    Y = np.asarray(Y, dtype=np.float64)
    out = []
    for i in range(Y.shape[1]):
        col = Y[:, i][~np.isnan(Y[:, i])]
        if col.size and (col == col[0]).all():
            out.append(i)
    return out


def _check_ids(ids, what: str, n: int) -> list[str]:
    ids = [str(x) for x in ids]
    if len(ids) != n:
        raise IRTError(f"{what}: {len(ids)} names for {n} rows/columns of the response matrix")
    if len(set(ids)) != len(ids):
        seen, dup = set(), []
        for x in ids:
            if x in seen:
                dup.append(x)
            seen.add(x)
        raise IRTError(f"{what}: duplicate names {dup[:5]}")
    return ids


@dataclass
class ItemBank:
    """Calibrated MIRT-2PL item parameters with their item ids (see the module docstring).

    Build with :meth:`fit` (or the constructor from known parameters), persist with
    :meth:`save` / :meth:`load`.
    """

    item_ids: list[str]
    a: np.ndarray
    b: np.ndarray
    theta: np.ndarray
    subject_names: list[str]
    responses: np.ndarray | None = None  # subjects × items float, NaN = missing
    subgroups: list[str] | None = None
    meta: dict = field(default_factory=dict)
    _index: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.a = np.asarray(self.a, dtype=np.float64)
        self.b = np.asarray(self.b, dtype=np.float64)
        self.theta = np.asarray(self.theta, dtype=np.float64)
        if self.a.ndim != 2:
            raise IRTError(f"item bank: a must be items × d, got shape {self.a.shape}")
        I, d = self.a.shape
        if self.b.shape != (I,):
            raise IRTError(f"item bank: b has shape {self.b.shape}, expected ({I},)")
        if self.theta.ndim != 2 or self.theta.shape[1] != d:
            raise IRTError(f"item bank: theta has shape {self.theta.shape}, expected (subjects, {d})")
        for nm, arr in (("a", self.a), ("b", self.b), ("theta", self.theta)):
            if not np.isfinite(arr).all():
                raise IRTError(f"item bank: {nm} holds non-finite values")
        self.item_ids = _check_ids(self.item_ids, "item ids", I)
        self.subject_names = _check_ids(self.subject_names, "subject names", self.theta.shape[0])
        if self.responses is not None:
            self.responses = check_responses(self.responses, name="item bank responses")
            if self.responses.shape != (self.theta.shape[0], I):
                raise IRTError(f"item bank: responses have shape {self.responses.shape}, "
                               f"expected ({self.theta.shape[0]}, {I})")
        if self.subgroups is not None:
            self.subgroups = [str(s) for s in self.subgroups]
            if len(self.subgroups) != I:
                raise IRTError(f"item bank: {len(self.subgroups)} subgroups for {I} items")
        self._index = {k: i for i, k in enumerate(self.item_ids)}

    # ---------------------------------------------------------------- basics
    @property
    def dim(self) -> int:
        return int(self.a.shape[1])

    @property
    def n_items(self) -> int:
        return int(self.a.shape[0])

    def __len__(self) -> int:
        return self.n_items

    def index(self, item_ids) -> np.ndarray:
        """Integer positions of ``item_ids``; :class:`IRTError` listing the ids the bank lacks."""
        ids = [str(x) for x in item_ids]
        missing = [x for x in ids if x not in self._index]
        if missing:
            task = self.meta.get("task")
            raise IRTError(
                f"{len(missing)} item id(s) not in the item bank{f' of task {task!r}' if task else ''}: "
                f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (the bank has {self.n_items} items, "
                f"e.g. {self.item_ids[:3]}); recalibrate the bank or use the items it was fitted on"
            )
        return np.fromiter((self._index[x] for x in ids), dtype=np.int64, count=len(ids))

    def subject_theta(self, names) -> np.ndarray:
        """Abilities of calibration subjects by name (K × d)."""
        pos = {n: i for i, n in enumerate(self.subject_names)}
        names = [str(n) for n in names]
        bad = [n for n in names if n not in pos]
        if bad:
            raise IRTError(f"subject(s) {bad[:5]} not among the bank's calibration subjects "
                           f"(e.g. {self.subject_names[:3]})")
        return self.theta[[pos[n] for n in names]]

    def predict_proba(self, theta) -> np.ndarray:
        """P(correct) on every item for abilities ``theta`` (d or S × d)."""
        return _sigmoid(np.asarray(theta, dtype=np.float64) @ self.a.T - self.b)

    def fit_ability(self, answers, item_ids=None, items=None) -> np.ndarray:
        """MAP ability (d or S × d) from answers to ``item_ids`` (or integer ``items``; default:
        all items in bank order). See :func:`irt.model.fit_ability`."""
        if item_ids is not None:
            items = self.index(item_ids)
        prior = float(self.meta.get("fit", {}).get("prior_theta", 1.0))
        return fit_ability(self.a, self.b, answers, items=items, prior_sd=prior)

    # ---------------------------------------------------------------- fitting
    @classmethod
    def fit(
        cls,
        Y,
        item_ids=None,
        subject_names=None,
        dim: int | None = None,
        seed: int = 0,
        dims=(1, 2, 3, 5),
        subgroups=None,
        task: str | None = None,
        keep_responses: bool = True,
        **model_kw,
    ) -> "ItemBank":
        """Calibrate a bank on a subjects × items 0/1 matrix ``Y`` (NaN = missing).

        ``dim=None`` chooses d among ``dims`` by :func:`irt.model.select_dim`; an int fixes it.
        ``model_kw`` go to :class:`irt.model.MIRT2PL` (priors, max_iter, tol).
        """
        Y = check_responses(Y, item_ids=item_ids, subject_names=subject_names)
        M, I = Y.shape
        item_ids = _check_ids(item_ids if item_ids is not None else [f"item{i}" for i in range(I)], "item ids", I)
        subject_names = _check_ids(subject_names if subject_names is not None else [f"subject{m}" for m in range(M)],
                                   "subject names", M)
        check_calibration_data(Y)
        dim_table = None
        chosen = dim is None
        if dim is None:
            dim, dim_table = select_dim(Y, dims=dims, seed=seed, **model_kw)
        mdl = MIRT2PL(dim=dim, seed=seed, **model_kw).fit(Y)
        meta = {
            "task": task,
            "dim": int(dim),
            "fit": {"method": "joint-map-lbfgs", "dim": int(dim), "dim_selection": chosen,
                    "dims_tried": [int(x) for x in dims] if dim_table else None, "seed": seed,
                    "prior_theta": mdl.prior_theta, "prior_a": mdl.prior_a, "prior_b": mdl.prior_b,
                    "max_iter": mdl.max_iter, "tol": mdl.tol},
            "quality": {"train_logloss": mdl.loss_, "n_iter": mdl.n_iter_, "fit_seconds": mdl.fit_seconds_,
                        "n_subjects": M, "n_items": I, "observed_frac": float((~np.isnan(Y)).mean()),
                        "dim_selection": dim_table},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "irt_version": IRT_VERSION,
        }
        return cls(item_ids=item_ids, a=mdl.a_, b=mdl.b_, theta=mdl.theta_, subject_names=subject_names,
                   responses=Y if keep_responses else None, subgroups=subgroups, meta=meta)

    # ---------------------------------------------------------------- persistence
    def save(self, path) -> Path:
        """Write the bank (see the module docstring); atomic (temp file + rename)."""
        from safetensors.numpy import save_file

        path = Path(path)
        tensors = {"a": np.ascontiguousarray(self.a), "b": np.ascontiguousarray(self.b),
                   "theta": np.ascontiguousarray(self.theta)}
        if self.responses is not None:
            r = np.where(np.isnan(self.responses), -1, self.responses).astype(np.int8)
            tensors["responses"] = r
        md = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "item_ids": json.dumps(self.item_ids),
            "subject_names": json.dumps(self.subject_names),
            "subgroups": json.dumps(self.subgroups),
            "meta": json.dumps(self.meta, default=float),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=md)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path) -> "ItemBank":
        """Read and validate a bank written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise IRTError(f"item bank {path}: no such file")
        try:
            with safe_open(str(path), framework="numpy") as f:
                md = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise IRTError(f"item bank {path}: not a readable safetensors file ({exc})") from None
        if md.get("format") != FORMAT:
            raise IRTError(f"item bank {path}: not an item bank (header format={md.get('format')!r}, "
                           f"expected {FORMAT!r})")
        if md.get("format_version") != FORMAT_VERSION:
            raise IRTError(f"item bank {path}: format version {md.get('format_version')!r} is not supported "
                           f"(this irt reads {FORMAT_VERSION!r})")
        for k in ("a", "b", "theta"):
            if k not in tensors:
                raise IRTError(f"item bank {path}: tensor {k!r} missing")
        try:
            item_ids = json.loads(md["item_ids"])
            subject_names = json.loads(md["subject_names"])
            subgroups = json.loads(md.get("subgroups", "null"))
            meta = json.loads(md.get("meta", "{}"))
        except (KeyError, json.JSONDecodeError) as exc:
            raise IRTError(f"item bank {path}: bad header metadata ({exc})") from None
        resp = tensors.get("responses")
        if resp is not None:
            if not np.isin(resp, (-1, 0, 1)).all():
                raise IRTError(f"item bank {path}: responses hold values other than -1/0/1")
            resp = np.where(resp < 0, np.nan, resp.astype(np.float64))
        try:
            return cls(item_ids=item_ids, a=tensors["a"], b=tensors["b"], theta=tensors["theta"],
                       subject_names=subject_names, responses=resp, subgroups=subgroups, meta=meta)
        except IRTError as exc:
            raise IRTError(f"item bank {path}: {exc}") from None
