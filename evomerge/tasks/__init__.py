"""Task definitions: items, prompt format, answer extraction, scoring.

Two kinds of task, told apart by their items (:attr:`Task.kind`):

- ``generate``: one line of JSONL per item, ``{"id": str, "prompt": str, "answer": str}``;
  the model answers by greedy generation, scored by exact match after extraction.
- ``choice`` (multiple choice, scored by log-likelihood as lm-evaluation-harness does):
  ``{"id": str, "prompt": str, "choices": [str, ...], "answer": int}``, at least two
  non-empty choices, ``answer`` the 0-based index of the right one.

Both take an optional ``"subgroup"`` (str). A file holds one kind only. A task directory
holds one JSONL file per split (``search.jsonl``, ``heldout.jsonl``) and an optional ``task.json``.
``task.json`` fields (all optional; others are rejected):

- ``name`` (default: the folder name), ``description``;
- ``template``: the prompt template, containing ``{prompt}`` (default ``"{prompt}"``);
- ``max_new_tokens`` (default 32), ``extract`` (default ``exact``): generation only;
- ``metric`` (default ``acc``), ``choice_delimiter`` (default ``" "``): choice only.

Extraction modes (applied to the model output before comparing with the reference answer,
which goes through the same normalisation):

- ``exact``: the output up to its first newline, stripped of surrounding whitespace.
- ``last_number``: the last number (optionally signed, with decimals, thousands separators
  removed) in the output; no number -> never correct.
- ``normalized``: lower case, punctuation removed, whitespace collapsed.

Multiple choice: for each choice the evaluator scores the continuation
``choice_delimiter + choice`` after the context ``template(prompt)`` (the sum of the
log-probabilities of its tokens, :meth:`Evaluator.loglikelihoods`); all requests of a batch of
items go in one call. The pair is tokenised as lm-evaluation-harness does
(:func:`evomerge.backends.tokens.encode_pair`): context + continuation as one string, split
where the context's tokens end, trailing spaces of the context moved into the continuation.
The item is right when the best-scoring choice (the first of equals) is the answer. Metrics:

- ``acc``: the highest sum of log-probabilities wins;
- ``acc_norm``: the sum divided by the length of the choice text in characters (without the
  delimiter) wins, lm-evaluation-harness's ``acc_norm``, which stops long choices losing for
  their length alone.
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
METRICS = ("acc", "acc_norm")
KINDS = ("generate", "choice")
SPLITS = ("search", "heldout")

__all__ = [
    "EXTRACT_MODES",
    "Item",
    "METRICS",
    "Task",
    "extract_answer",
    "load_items",
    "load_task_dir",
    "write_items",
]


@dataclass(frozen=True)
class Item:
    """One question: the prompt given to the model and the reference answer (a string), or
    for a multiple-choice item the ``choices`` and the index of the right one."""

    id: str
    prompt: str
    answer: str | int
    subgroup: str | None = None
    choices: tuple[str, ...] | None = None

    @property
    def kind(self) -> str:
        return "generate" if self.choices is None else "choice"

    def to_dict(self) -> dict:
        d: dict = {"id": self.id, "prompt": self.prompt}
        if self.choices is not None:
            d["choices"] = list(self.choices)
        d["answer"] = self.answer
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
    if not isinstance(obj["prompt"], str):
        raise EvomergeError(f"{where}: field 'prompt' must be a string, got "
                            f"{type(obj['prompt']).__name__}")
    choices = None
    if "choices" in obj:
        choices = _check_choices(obj["choices"], obj["answer"], where)
    elif not isinstance(obj["answer"], str):
        raise EvomergeError(f"{where}: field 'answer' must be a string, got "
                            f"{type(obj['answer']).__name__} (a multiple-choice item gives "
                            "'choices' and the 0-based index of the right one as 'answer')")
    sub = obj.get("subgroup")
    if sub is not None and not isinstance(sub, str):
        raise EvomergeError(f"{where}: field 'subgroup' must be a string, got "
                            f"{type(sub).__name__}")
    if iid in seen:
        raise EvomergeError(f"{where}: duplicate id {iid!r} (ids must be unique in a file)")
    seen.add(iid)
    return Item(id=iid, prompt=obj["prompt"], answer=obj["answer"], subgroup=sub,
                choices=choices)


def _check_choices(choices: object, answer: object, where: str) -> tuple[str, ...]:
    if not isinstance(choices, list) or len(choices) < 2:
        raise EvomergeError(f"{where}: field 'choices' must be a list of at least 2 strings, "
                            f"got {choices!r:.80}")
    for k, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise EvomergeError(f"{where}: field 'choices' entry {k} must be a non-empty "
                                f"string, got {c!r:.80}")
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise EvomergeError(f"{where}: field 'answer' of a multiple-choice item must be the "
                            f"0-based index of the right choice (an integer), got {answer!r:.80}")
    if not 0 <= answer < len(choices):
        raise EvomergeError(f"{where}: field 'answer' is {answer}, out of range for "
                            f"{len(choices)} choices (0-based: 0..{len(choices) - 1})")
    return tuple(choices)


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
            item = _item_from_obj(obj, where, seen)
            if items and item.kind != items[0].kind:
                raise EvomergeError(
                    f"{where}: a {item.kind} item in a file of {items[0].kind} items (the "
                    "first line has " + ("no 'choices'" if items[0].choices is None else
                                         "'choices'") + "); a file holds one kind of item: "
                    "put multiple-choice and generation items in separate tasks")
            items.append(item)
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
    """A named set of items with a prompt template and a scorer.

    Generation tasks use ``max_new_tokens`` and ``extract``; multiple-choice tasks (items with
    ``choices``) use ``metric`` and ``choice_delimiter`` instead (see the module docstring).
    """

    name: str
    items: list[Item] = field(default_factory=list)
    max_new_tokens: int = 32
    extract: str = "exact"
    template: str = "{prompt}"
    metric: str = "acc"
    choice_delimiter: str = " "

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
        if self.metric not in METRICS:
            raise EvomergeError(f"task {self.name!r}: unknown metric {self.metric!r}; use one "
                                f"of {', '.join(METRICS)}")
        if not isinstance(self.choice_delimiter, str):
            raise EvomergeError(f"task {self.name!r}: field 'choice_delimiter' must be a string")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kind(self) -> str:
        """``"choice"`` when the items have choices (multiple choice), else ``"generate"``."""
        return self.items[0].kind if self.items else "generate"

    def format_prompt(self, item: Item) -> str:
        """The text given to the model for ``item``."""
        return self.template.replace("{prompt}", item.prompt)

    def prompts(self, items: Sequence[Item] | None = None) -> list[str]:
        return [self.format_prompt(it) for it in (self.items if items is None else items)]

    def extract_answer(self, text: str) -> str | None:
        return extract_answer(text, self.extract)

    def answer(self, evaluator, items: Sequence[Item] | None = None) -> np.ndarray:
        """0/1 correctness (int8) of ``evaluator``'s answers to ``items`` (default: all).

        Generation: greedy generation, extracted and compared with the reference. Multiple
        choice: every choice of every item scored in one ``evaluator.loglikelihoods`` call."""
        items = self.items if items is None else list(items)
        if not items:
            return np.zeros(0, dtype=np.int8)
        if items[0].kind == "choice":
            return self.score_choices(evaluator.loglikelihoods(self.choice_requests(items)),
                                      items)
        return self.score(evaluator.generate(self.prompts(items), self.max_new_tokens), items)

    def trace(self, evaluator, items: Sequence[Item]) -> list[dict]:
        """What :meth:`answer` sees, item by item: the ``prompt`` given to the model, its
        ``output`` (the generated text, or the best-scoring choice), the ``extracted`` answer, the
        ``reference`` (extracted the same way; a choice's text) and whether it is ``correct``."""
        items = list(items)
        if not items:
            return []
        if items[0].kind == "choice":
            scores = self.choice_scores(evaluator.loglikelihoods(self.choice_requests(items)), items)
            out = []
            for s, it in zip(scores, items):
                best = int(np.argmax(s))
                out.append({"prompt": self.format_prompt(it), "output": it.choices[best], "extracted": str(best),
                            "reference": f"{it.answer} ({it.choices[it.answer]})", "correct": best == it.answer})
            return out
        outputs = evaluator.generate(self.prompts(items), self.max_new_tokens)
        right = self.score(outputs, items)
        return [{"prompt": self.format_prompt(it), "output": o, "extracted": extract_answer(o, self.extract),
                 "reference": extract_answer(it.answer, self.extract), "correct": bool(r)}
                for o, it, r in zip(outputs, items, right)]

    def score(self, outputs: Sequence[str], items: Sequence[Item] | None = None) -> np.ndarray:
        """0/1 per item (int8): does the extracted output equal the extracted answer?"""
        items = self.items if items is None else items
        self._check_kind(items, "generate")
        if len(outputs) != len(items):
            raise EvomergeError(f"task {self.name!r}: {len(outputs)} outputs for "
                                f"{len(items)} items")
        out = np.zeros(len(items), dtype=np.int8)
        for i, (o, it) in enumerate(zip(outputs, items)):
            got = extract_answer(o, self.extract)
            ref = extract_answer(it.answer, self.extract)
            out[i] = int(got is not None and ref is not None and got == ref)
        return out

    # ---- multiple choice
    def choice_requests(self, items: Sequence[Item] | None = None) -> list[tuple[str, str]]:
        """``(context, continuation)`` pairs, item by item and choice by choice:
        ``(template(prompt), choice_delimiter + choice)``."""
        items = self.items if items is None else items
        self._check_kind(items, "choice")
        return [(self.format_prompt(it), self.choice_delimiter + c)
                for it in items for c in it.choices]  # type: ignore[union-attr]

    def choice_scores(self, logliks: Sequence[float],
                      items: Sequence[Item] | None = None) -> list[np.ndarray]:
        """Per item, the score of each choice under ``metric`` from the flat log-likelihoods
        of :meth:`choice_requests`: the sum itself (``acc``) or divided by the choice's length
        in characters (``acc_norm``)."""
        items = self.items if items is None else items
        self._check_kind(items, "choice")
        ll = np.asarray(logliks, dtype=np.float64)
        n = sum(len(it.choices) for it in items)  # type: ignore[arg-type]
        if ll.shape != (n,):
            raise EvomergeError(f"task {self.name!r}: {ll.size} log-likelihoods for {n} "
                                f"choices of {len(items)} items")
        out, k = [], 0
        for it in items:
            s = ll[k:k + len(it.choices)]  # type: ignore[arg-type]
            k += len(it.choices)  # type: ignore[arg-type]
            if self.metric == "acc_norm":
                s = s / np.array([len(c) for c in it.choices], dtype=np.float64)  # type: ignore[union-attr]
            out.append(s)
        return out

    def score_choices(self, logliks: Sequence[float],
                      items: Sequence[Item] | None = None) -> np.ndarray:
        """0/1 per item (int8): is the best-scoring choice (the first of equals) the answer?"""
        items = self.items if items is None else items
        scores = self.choice_scores(logliks, items)
        return np.array([int(np.argmax(s)) == it.answer for s, it in zip(scores, items)],
                        dtype=np.int8)

    def _check_kind(self, items: Sequence[Item], kind: str) -> None:
        for it in items:
            if it.kind != kind:
                raise EvomergeError(
                    f"task {self.name!r}: item {it.id!r} is a {it.kind} item, but "
                    + ("scoring generated text needs generation items (use answer() for "
                       "multiple-choice tasks)" if kind == "generate" else
                       "multiple-choice scoring needs items with choices"))


def load_task_dir(path: str | Path, split: str = "search") -> Task:
    """Load ``task.json`` and ``<split>.jsonl`` from a task directory."""
    path = Path(path)
    if split not in SPLITS:
        raise EvomergeError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    if not path.is_dir():
        raise EvomergeError(f"{path}: task folder not found" + (" (it is a file)" if path.exists() else "")
                            + "; a task folder holds search.jsonl / heldout.jsonl and an optional "
                            "task.json")
    meta_path = path / "task.json"
    meta: object = {}
    if meta_path.exists():  # optional: without it, name = the folder's name and the Task defaults
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise EvomergeError(f"{meta_path}: invalid JSON ({exc.msg} at line {exc.lineno}, "
                                f"column {exc.colno})") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise EvomergeError(f"{meta_path}: cannot read ({exc})") from None
    if not isinstance(meta, dict):
        raise EvomergeError(f"{meta_path}: expected a JSON object")
    known = {"name", "max_new_tokens", "extract", "template", "description", "metric",
             "choice_delimiter"}
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
    metric = meta.get("metric", "acc")
    if metric not in METRICS:
        raise EvomergeError(f"{meta_path}: field 'metric' is {metric!r}; use one of "
                            f"{', '.join(METRICS)} (multiple-choice tasks)")
    delim = meta.get("choice_delimiter", " ")
    if not isinstance(delim, str):
        raise EvomergeError(f"{meta_path}: field 'choice_delimiter' must be a string (put "
                            "between the prompt and each choice; \"\" for none)")
    name = meta.get("name", path.name)
    items = load_items(path / f"{split}.jsonl")
    return Task(name=str(name), items=items, max_new_tokens=mnt, extract=extract,
                template=template, metric=metric, choice_delimiter=delim)
