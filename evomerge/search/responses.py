"""A run's calibration answers as a subjects × items response matrix, for the irt commands
(``evomerge irt fit|check|export RUN_DIR --task T``) and for anyone who wants the run's data.

The run logs one line per calibration model in ``calibration.jsonl``: its name and, per task, a
string of 0/1 answers whose character i is the answer to search item i of that task (the run's
frozen config says which items those are: the task's ``search.jsonl`` after ``search_limit``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.search.fitness import unbits
from evomerge.search.inputs import load_tasks
from evomerge.search.rundir import RunDir, read_jsonl


@dataclass
class RunResponses:
    """One task's calibration answers: ``Y`` (subjects × items, float 0/1), the items' ``item_ids``
    and ``subgroups`` (None where the items have none), the ``subject_names`` (base, endpoints,
    samples) and which of them are the run's ``endpoints``."""

    task: str
    Y: np.ndarray
    item_ids: list[str]
    subgroups: list[str] | None
    subject_names: list[str]
    endpoints: list[str]


def is_run_dir(path: str | Path) -> bool:
    return Path(path).is_dir() and RunDir(path).exists()


def run_responses(run_dir: str | Path, task: str | None = None) -> RunResponses:
    """The calibration answers of ``task`` (may be omitted when the run has one task) in the run
    directory ``run_dir``; errors name the run, the task and what to do."""
    rd = RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = parse_config(yaml.safe_load(rd.config.read_text()), str(rd.config))
    names = [tc.task_name for tc in cfg.tasks]
    if task is None:
        if len(names) > 1:
            raise EvomergeError(f"{run_dir}: the run has {len(names)} tasks ({', '.join(names)}); name one with --task")
        task = names[0]
    if task not in names:
        raise EvomergeError(f"--task {task!r}: the run {run_dir} has no such task; its tasks: {', '.join(names)}")
    records = read_jsonl(rd.calibration) if rd.calibration.exists() else []
    if not records:
        why = " (fitness.estimator: full runs have no calibration)" if cfg.fitness.estimator == "full" else \
            " yet (resume the run to calibrate)"
        raise EvomergeError(f"{rd.calibration}: no calibration answers{why}")
    items = load_tasks(cfg)[task].search.items
    rows = []
    for r in records:
        bits = r["answers"].get(task, "")
        if len(bits) != len(items):
            raise EvomergeError(f"{rd.calibration}: model {r['name']!r} has {len(bits)} answers for task {task!r}, "
                                f"but the task has {len(items)} search items now; its items changed since the run")
        rows.append(unbits(bits))
    groups = [it.subgroup for it in items]
    return RunResponses(task=task, Y=np.asarray(rows, dtype=np.float64), item_ids=[it.id for it in items],
                        subgroups=None if all(g is None for g in groups) else [g or "" for g in groups],
                        subject_names=[r["name"] for r in records],
                        endpoints=[r["name"] for r in records if r["name"] in cfg.models.endpoints])
