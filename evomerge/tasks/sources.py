"""Tasks read with the ``datasets`` library (an optional extra: ``pip install evomerge[datasets]``).

A config task with ``source:`` names a dataset (a hub id on users' machines, or a local
builder such as ``json`` with ``data_files``), the two splits to use, and the fields holding
the prompt and the gold answer. ``answer_regex`` pulls the answer out of a longer field
(GSM8K: ``'#### (.*)'``).

With ``choices_field`` (a list of strings; a dotted path such as ``choices.text`` reads a
nested field) the task is multiple choice, and the answer field gives the right choice as
the text of one of the choices, a letter label (``"A"`` = the first), or a 0-based index (an
integer, or a string of digits as in hellaswag's ``label``), tried in that order.
"""

from __future__ import annotations

import re
import string

from evomerge.errors import EvomergeError
from evomerge.tasks import Item, Task


def _get(row, field: str, split: str, i: int, where: str):
    """``row[field]``, following dots into nested mappings (``choices.text``)."""
    value = row
    for part in [field] if field in row else field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise EvomergeError(f"{where}: split {split!r} row {i} has no field {field!r}; "
                                f"fields: {', '.join(sorted(row))}")
        value = value[part]
    return value


def _choice_index(answer, choices: list[str], label: str) -> int:
    """The index of the right choice named by ``answer`` (see the module docstring)."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        k = answer
    elif isinstance(answer, str):
        a = answer.strip()
        if a in choices:
            return choices.index(a)
        if len(a) == 1 and a in string.ascii_uppercase:
            k = string.ascii_uppercase.index(a)
        elif a.isdigit():
            k = int(a)
        else:
            raise EvomergeError(f"{label}: answer {answer!r:.80} is neither one of the choices, "
                                "a letter label (A, B, ...) nor a 0-based index")
    else:
        raise EvomergeError(f"{label}: answer {answer!r:.80} must be an integer index, a letter "
                            "label or the text of a choice")
    if not 0 <= k < len(choices):
        raise EvomergeError(f"{label}: answer {answer!r} is out of range for {len(choices)} "
                            "choices (indices are 0-based; labels start at A)")
    return k


def _rows_to_items(rows, source, split: str, where: str) -> list[Item]:
    pattern = re.compile(source.answer_regex) if source.answer_regex else None
    items = []
    for i, row in enumerate(rows):
        if source.limit is not None and i >= source.limit:
            break
        prompt = _get(row, source.prompt_field, split, i, where)
        raw = _get(row, source.answer_field, split, i, where)
        answer = raw if source.choices_field and pattern is None else str(raw)
        if pattern is not None:
            m = pattern.search(answer)
            if m is None:
                raise EvomergeError(f"{where}: answer_regex {source.answer_regex!r} does not "
                                    f"match row {i} of split {split!r}: {answer[:80]!r}")
            answer = m.group(1) if m.groups() else m.group(0)
        if not source.choices_field:
            items.append(Item(id=f"{split}-{i}", prompt=str(prompt), answer=answer.strip()))
            continue
        choices = _get(row, source.choices_field, split, i, where)
        label = f"{where}: split {split!r} row {i}"
        if not isinstance(choices, (list, tuple)) or len(choices) < 2 or not all(
                isinstance(c, str) and c for c in choices):
            raise EvomergeError(f"{label}: field {source.choices_field!r} must be a list of at "
                                f"least 2 non-empty strings, got {choices!r:.80}")
        choices = list(choices)
        items.append(Item(id=f"{split}-{i}", prompt=str(prompt), choices=tuple(choices),
                          answer=_choice_index(answer, choices, label)))
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
