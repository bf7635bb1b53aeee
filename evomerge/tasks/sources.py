"""Tasks read with the ``datasets`` library (an optional extra: ``pip install evomerge[datasets]``).

A config task with ``source:`` names a dataset (a hub id on users' machines, or a local
builder such as ``json`` with ``data_files``), the two splits to use, and the fields holding
the prompt and the gold answer. ``answer_regex`` pulls the answer out of a longer field
(GSM8K: ``'#### (.*)'``).
"""

from __future__ import annotations

import re

from evomerge.errors import EvomergeError
from evomerge.tasks import Item, Task


def _rows_to_items(rows, source, split: str, where: str) -> list[Item]:
    pattern = re.compile(source.answer_regex) if source.answer_regex else None
    items = []
    for i, row in enumerate(rows):
        if source.limit is not None and i >= source.limit:
            break
        for f in (source.prompt_field, source.answer_field):
            if f not in row:
                raise EvomergeError(f"{where}: split {split!r} row {i} has no field {f!r}; "
                                    f"fields: {', '.join(sorted(row))}")
        answer = str(row[source.answer_field])
        if pattern is not None:
            m = pattern.search(answer)
            if m is None:
                raise EvomergeError(f"{where}: answer_regex {source.answer_regex!r} does not "
                                    f"match row {i} of split {split!r}: {answer[:80]!r}")
            answer = m.group(1) if m.groups() else m.group(0)
        items.append(Item(id=f"{split}-{i}", prompt=str(row[source.prompt_field]),
                          answer=answer.strip()))
    if not items:
        raise EvomergeError(f"{where}: split {split!r} is empty")
    return items


def load_dataset_task(name: str, source) -> tuple[Task, Task]:
    """(search task, held-out task) from a ``DatasetSource`` config."""
    where = f"tasks.{name}.source"
    try:
        import datasets
    except ImportError:
        raise EvomergeError(f"{where}: needs the datasets library: pip install "
                            "'evomerge[datasets]'") from None
    tasks = []
    for split in (source.search_split, source.heldout_split):
        try:
            ds = datasets.load_dataset(source.path, source.name, data_files=source.data_files,
                                       split=split)
        except Exception as exc:
            raise EvomergeError(f"{where}: could not load {source.path!r} split {split!r} "
                                f"({type(exc).__name__}: {exc})") from None
        tasks.append(Task(name=name, items=_rows_to_items(ds, source, split, where),
                          max_new_tokens=32, extract="last_number" if source.answer_regex else "exact"))
    return tasks[0], tasks[1]
