"""Response-matrix files: read / write subjects × items 0/1 answers (missing allowed).

Three formats, chosen by the file extension:

CSV (``.csv``) — wide
    Header ``subject,<item id>,<item id>,...``; one row per subject: its name, then 0 / 1 per
    item; an empty cell (or ``NA`` / ``nan``) is a missing answer. ``true`` / ``false`` accepted.
JSONL (``.jsonl``) — one subject per line
    ``{"subject": "name", "answers": {"<item id>": 0|1|true|false|null, ...}}``. Items absent
    from a line are missing for that subject; the item order is the order of first appearance.
NPZ (``.npz``) — arrays, read with ``allow_pickle=False``
    ``responses``: float subjects × items (NaN = missing), ``item_ids``: unicode array,
    ``subject_names``: unicode array (optional; default ``subject0..``).

:func:`read_responses` returns ``(Y, item_ids, subject_names)`` and raises :class:`IRTError`
naming the file, line / row and field for anything malformed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from irt.errors import IRTError
from irt.model import check_responses

__all__ = ["read_responses", "write_responses", "FORMATS"]

FORMATS = (".csv", ".jsonl", ".npz")
_MISSING = {"", "na", "nan", "null", "none"}
_TRUE = {"1", "1.0", "true"}
_FALSE = {"0", "0.0", "false"}


def _fmt(path: Path) -> str:
    suf = path.suffix.lower()
    if suf not in FORMATS:
        raise IRTError(f"{path}: unknown response-file format {suf!r}; use one of {', '.join(FORMATS)}")
    return suf


def _cell(v, where: str) -> float:
    if v is None:
        return np.nan
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        if v in (0, 1):
            return float(v)
        if isinstance(v, float) and np.isnan(v):
            return np.nan
        raise IRTError(f"{where}: answer {v!r} is not 0, 1 or missing")
    s = str(v).strip().lower()
    if s in _MISSING:
        return np.nan
    if s in _TRUE:
        return 1.0
    if s in _FALSE:
        return 0.0
    raise IRTError(f"{where}: answer {v!r} is not 0, 1 or missing")


def read_responses(path) -> tuple[np.ndarray, list[str], list[str]]:
    """Read a response file (see the module docstring) → (Y float NaN=missing, item_ids, subject_names)."""
    path = Path(path)
    fmt = _fmt(path)
    if not path.is_file():
        raise IRTError(f"{path}: no such file")
    if fmt == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        rows = [r for r in rows if any(c.strip() for c in r)]
        if not rows:
            raise IRTError(f"{path}: empty file (expected a header 'subject,<item ids...>')")
        header = [c.strip() for c in rows[0]]
        if len(header) < 2:
            raise IRTError(f"{path}: header needs a subject column and at least one item column")
        item_ids = header[1:]
        names, Y = [], []
        for ln, r in enumerate(rows[1:], start=2):
            if len(r) != len(header):
                raise IRTError(f"{path}, line {ln}: {len(r)} cells, header has {len(header)}")
            names.append(r[0].strip())
            Y.append([_cell(c, f"{path}, line {ln}, item {item_ids[k]!r}") for k, c in enumerate(r[1:])])
        if not Y:
            raise IRTError(f"{path}: no subject rows after the header")
        Y = np.asarray(Y, dtype=np.float64)
    elif fmt == ".jsonl":
        names, recs, order, pos = [], [], [], {}
        with open(path) as f:
            for ln, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IRTError(f"{path}, line {ln}: not JSON ({exc})") from None
                if not isinstance(rec, dict) or "answers" not in rec or not isinstance(rec["answers"], dict):
                    raise IRTError(f"{path}, line {ln}: expected {{\"subject\": ..., \"answers\": {{item: 0|1}}}}")
                names.append(str(rec.get("subject", f"subject{len(names)}")))
                ans = {}
                for k, v in rec["answers"].items():
                    k = str(k)
                    if k not in pos:
                        pos[k] = len(order)
                        order.append(k)
                    ans[k] = _cell(v, f"{path}, line {ln}, item {k!r}")
                recs.append(ans)
        if not recs:
            raise IRTError(f"{path}: no subjects")
        item_ids = order
        Y = np.full((len(recs), len(order)), np.nan)
        for m, ans in enumerate(recs):
            for k, v in ans.items():
                Y[m, pos[k]] = v
    else:
        try:
            with np.load(path, allow_pickle=False) as z:
                if "responses" not in z or "item_ids" not in z:
                    raise IRTError(f"{path}: npz needs arrays 'responses' and 'item_ids' (has {sorted(z.files)})")
                Y = np.asarray(z["responses"], dtype=np.float64)
                item_ids = [str(x) for x in z["item_ids"].tolist()]
                names = [str(x) for x in z["subject_names"].tolist()] if "subject_names" in z else None
        except ValueError as exc:
            raise IRTError(f"{path}: cannot read npz without pickle ({exc})") from None
        if Y.ndim != 2:
            raise IRTError(f"{path}: 'responses' must be 2-D, got shape {Y.shape}")
        if names is None:
            names = [f"subject{m}" for m in range(Y.shape[0])]
        if len(item_ids) != Y.shape[1] or len(names) != Y.shape[0]:
            raise IRTError(f"{path}: responses {Y.shape} vs {len(names)} subject names, {len(item_ids)} item ids")
    Y = check_responses(Y, name=str(path), item_ids=item_ids, subject_names=names)
    for what, ids in (("item ids", item_ids), ("subject names", names)):
        if len(set(ids)) != len(ids):
            dup = sorted({x for x in ids if ids.count(x) > 1})[:5]
            raise IRTError(f"{path}: duplicate {what} {dup}")
    return Y, list(item_ids), list(names)


def write_responses(path, Y, item_ids, subject_names) -> Path:
    """Write a response matrix in the format given by the extension (round-trips with read)."""
    path = Path(path)
    fmt = _fmt(path)
    Y = check_responses(Y)
    if fmt == ".csv":
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["subject", *item_ids])
            for n, row in zip(subject_names, Y):
                w.writerow([n, *("" if np.isnan(v) else int(v) for v in row)])
    elif fmt == ".jsonl":
        with open(path, "w") as f:
            for n, row in zip(subject_names, Y):
                ans = {i: int(v) for i, v in zip(item_ids, row) if not np.isnan(v)}
                f.write(json.dumps({"subject": n, "answers": ans}) + "\n")
    else:
        np.savez(path, responses=Y, item_ids=np.asarray(item_ids, dtype=str),
                 subject_names=np.asarray(subject_names, dtype=str))
    return path
