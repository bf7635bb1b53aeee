"""Task definitions: items, prompt format, answer extraction, scoring.

An item is one line of JSONL: ``{"id": str, "prompt": str, "answer": str}`` with an optional
``"subgroup"`` (str). A task directory holds ``task.json`` (name, max_new_tokens, extract,
template) and one JSONL file per split (``search.jsonl``, ``heldout.jsonl``).

Extraction modes (applied to the model output before comparing with the reference answer,
which goes through the same normalisation):

- ``exact``: the output up to its first newline, stripped of surrounding whitespace.
- ``last_number``: the last number (optionally signed, with decimals, thousands separators
  removed) in the output; no number -> never correct.
- ``normalized``: lower case, punctuation removed, whitespace collapsed.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from evomerge.errors import EvomergeError

EXTRACT_MODES = ("exact", "last_number", "normalized")
SPLITS = ("search", "heldout")

__all__ = [
    "EXTRACT_MODES",
    "Item",
    "Task",
    "extract_answer",
    "load_items",
    "load_task_dir",
    "write_items",
]


@dataclass(frozen=True)
class Item:
    """One question: the prompt given to the model and the reference answer."""

    id: str
    prompt: str
    answer: str
    subgroup: str | None = None

    def to_dict(self) -> dict:
        d = {"id": self.id, "prompt": self.prompt, "answer": self.answer}
        if self.subgroup is not None:
            d["subgroup"] = self.subgroup
        return d


# --------------------------------------------------------------------------- extraction
_NUMBER_RE = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")
_PUNCT_TABLE = str.maketrans({c: " " for c in string.punctuation})


def _exact(text: str) -> str:
    return text.split("\n", 1)[0].strip()


def _last_number(text: str) -> str | None:
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    s = found[-1].replace(",", "").lstrip("+")
    try:
        v = float(s)
    except ValueError:
        return None
    if v == int(v) and abs(v) < 1e15:
        return str(int(v))
    return repr(v)


def _normalized(text: str) -> str:
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def extract_answer(text: str, mode: str = "exact") -> str | None:
    """The comparable form of ``text`` under an extraction mode (None = no answer found)."""
    if mode == "exact":
        return _exact(text)
    if mode == "last_number":
        return _last_number(text)
    if mode == "normalized":
        return _normalized(text)
    raise EvomergeError(f"unknown extract mode {mode!r}: use one of {', '.join(EXTRACT_MODES)}")


# --------------------------------------------------------------------------- loading
def _item_from_obj(obj: object, where: str, seen: set[str]) -> Item:
    if not isinstance(obj, dict):
        raise EvomergeError(f"{where}: expected a JSON object with id, prompt, answer; got "
                            f"{type(obj).__name__}")
    for key in ("id", "prompt", "answer"):
        if key not in obj:
            raise EvomergeError(f"{where}: missing field {key!r} (each item needs id, prompt, "
                                "answer)")
    iid = obj["id"]
    if isinstance(iid, int) and not isinstance(iid, bool):
        iid = str(iid)
    if not isinstance(iid, str) or not iid:
        raise EvomergeError(f"{where}: field 'id' must be a non-empty string, got {iid!r}")
    for key in ("prompt", "answer"):
        if not isinstance(obj[key], str):
            raise EvomergeError(f"{where}: field {key!r} must be a string, got "
                                f"{type(obj[key]).__name__}")
    sub = obj.get("subgroup")
    if sub is not None and not isinstance(sub, str):
        raise EvomergeError(f"{where}: field 'subgroup' must be a string, got "
                            f"{type(sub).__name__}")
    if iid in seen:
        raise EvomergeError(f"{where}: duplicate id {iid!r} (ids must be unique in a file)")
    seen.add(iid)
    return Item(id=iid, prompt=obj["prompt"], answer=obj["answer"], subgroup=sub)


def load_items(path: str | Path) -> list[Item]:
    """Read a JSONL file of items, validating every line (errors name file, line, field)."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"{path}: item file not found")
    items: list[Item] = []
    seen: set[str] = set()
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EvomergeError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})"
                                    ) from None
            items.append(_item_from_obj(obj, where, seen))
    if not items:
        raise EvomergeError(f"{path}: no items (the file is empty)")
    return items


def write_items(path: str | Path, items: Iterable[Item | dict]) -> None:
    """Write items as JSONL (one object per line)."""
    path = Path(path)
    with path.open("w", encoding="utf-8") as f:
        for it in items:
            d = it.to_dict() if isinstance(it, Item) else dict(it)
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- task
@dataclass
class Task:
    """A named set of items with a prompt template, a generation budget and a scorer."""

    name: str
    items: list[Item] = field(default_factory=list)
    max_new_tokens: int = 32
    extract: str = "exact"
    template: str = "{prompt}"

    def __post_init__(self) -> None:
        if self.extract not in EXTRACT_MODES:
            raise EvomergeError(f"task {self.name!r}: unknown extract mode {self.extract!r}; "
                                f"use one of {', '.join(EXTRACT_MODES)}")
        if "{prompt}" not in self.template:
            raise EvomergeError(f"task {self.name!r}: field 'template' must contain "
                                "'{prompt}'")
        if int(self.max_new_tokens) < 1:
            raise EvomergeError(f"task {self.name!r}: field 'max_new_tokens' must be >= 1")
        self.max_new_tokens = int(self.max_new_tokens)

    def __len__(self) -> int:
        return len(self.items)

    def format_prompt(self, item: Item) -> str:
        """The text given to the model for ``item``."""
        return self.template.replace("{prompt}", item.prompt)

    def prompts(self, items: Sequence[Item] | None = None) -> list[str]:
        return [self.format_prompt(it) for it in (self.items if items is None else items)]

    def extract_answer(self, text: str) -> str | None:
        return extract_answer(text, self.extract)

    def answer(self, evaluator, items: Sequence[Item] | None = None) -> np.ndarray:
        """0/1 correctness (int8) of ``evaluator``'s answers to ``items`` (default: all): greedy
        generation, extracted and compared with the reference."""
        items = self.items if items is None else list(items)
        return self.score(evaluator.generate(self.prompts(items), self.max_new_tokens), items)

    def score(self, outputs: Sequence[str], items: Sequence[Item] | None = None) -> np.ndarray:
        """0/1 per item (int8): does the extracted output equal the extracted answer?"""
        items = self.items if items is None else items
        if len(outputs) != len(items):
            raise EvomergeError(f"task {self.name!r}: {len(outputs)} outputs for "
                                f"{len(items)} items")
        out = np.zeros(len(items), dtype=np.int8)
        for i, (o, it) in enumerate(zip(outputs, items)):
            got = extract_answer(o, self.extract)
            ref = extract_answer(it.answer, self.extract)
            out[i] = int(got is not None and ref is not None and got == ref)
        return out


def load_task_dir(path: str | Path, split: str = "search") -> Task:
    """Load ``task.json`` and ``<split>.jsonl`` from a task directory."""
    path = Path(path)
    if split not in SPLITS:
        raise EvomergeError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    meta_path = path / "task.json"
    if not meta_path.is_file():
        raise EvomergeError(f"{meta_path}: task.json not found (a task directory holds "
                            "task.json and search.jsonl / heldout.jsonl)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvomergeError(f"{meta_path}: invalid JSON ({exc.msg} at line {exc.lineno})"
                            ) from None
    if not isinstance(meta, dict):
        raise EvomergeError(f"{meta_path}: expected a JSON object")
    known = {"name", "max_new_tokens", "extract", "template", "description"}
    unknown = sorted(set(meta) - known)
    if unknown:
        raise EvomergeError(f"{meta_path}: unknown field(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(known))}")
    mnt = meta.get("max_new_tokens", 32)
    if not isinstance(mnt, int) or isinstance(mnt, bool) or mnt < 1:
        raise EvomergeError(f"{meta_path}: field 'max_new_tokens' must be a positive integer")
    extract = meta.get("extract", "exact")
    if extract not in EXTRACT_MODES:
        raise EvomergeError(f"{meta_path}: field 'extract' is {extract!r}; use one of "
                            f"{', '.join(EXTRACT_MODES)}")
    template = meta.get("template", "{prompt}")
    if not isinstance(template, str) or "{prompt}" not in template:
        raise EvomergeError(f"{meta_path}: field 'template' must be a string containing "
                            "'{prompt}'")
    name = meta.get("name", path.name)
    items = load_items(path / f"{split}.jsonl")
    return Task(name=str(name), items=items, max_new_tokens=mnt, extract=extract,
                template=template)
