"""The token sequences activation matching runs the models on: the items of one or more tasks
(``zoo:NAME`` or a task folder, as ``evomerge eval --task`` reads them), each item's prompt
followed by its reference answer (a multiple-choice item: the right choice), tokenised with the
reference model's tokenizer. The first ``items`` search-split items of each task are used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from evomerge.errors import EvomergeError

DEFAULT_ITEMS = 256
"""Search items per task used for activation matching (the zoo's tasks: ~10 tokens each)."""


def task_folder(ref: str, where: str, base_dir: str | Path | None = None) -> Path:
    """The folder of task ``ref`` (``zoo:NAME`` or a folder, tried against ``base_dir`` too)."""
    if ref.startswith("zoo:"):
        from evomerge.models import demo_zoo

        zoo = demo_zoo()
        if ref[4:] not in zoo.task_names:
            raise EvomergeError(f"{where}: the zoo has no task {ref[4:]!r}; its tasks: "
                                + ", ".join(f"zoo:{t}" for t in zoo.task_names))
        return Path(zoo.task_dir(ref[4:]))
    p = Path(ref).expanduser()
    for folder in [p] if p.is_absolute() or base_dir is None else [p, Path(base_dir) / p]:
        if folder.is_dir():
            return folder.absolute()
    raise EvomergeError(f"{where}: task folder {ref!r} not found (give zoo:NAME or a folder holding "
                        "search.jsonl and an optional task.json)")


def task_texts(folder: Path, where: str, items: int = DEFAULT_ITEMS) -> list[str]:
    """Prompt + reference answer of the first ``items`` search items of the task in ``folder``."""
    from evomerge.tasks import load_task_dir

    try:
        task = load_task_dir(folder, "search")
    except EvomergeError as exc:
        raise EvomergeError(f"{where}: {exc}") from None
    if not task.items:
        raise EvomergeError(f"{where}: task {folder} has no search items")
    texts = []
    for it in task.items[:items]:
        prompt = task.format_prompt(it)
        if it.choices is not None:
            texts.append(prompt + task.choice_delimiter + it.choices[int(it.answer)])
        else:
            texts.append(prompt + str(it.answer))
    return texts


def alignment_sequences(refs: Sequence[str], tokenizer_dir: Path, where: str, items: int = DEFAULT_ITEMS,
                        max_length: int | None = None, base_dir: str | Path | None = None) -> list[list[int]]:
    """Token ids of the tasks' texts (see the module docstring), each cut to ``max_length``."""
    from transformers import AutoTokenizer

    from evomerge.backends.tokens import encode_prompt

    if not refs:
        raise EvomergeError(f"{where}: activation matching needs data: give one or more tasks (zoo:NAME or a "
                            "task folder)")
    texts = [t for ref in refs for t in task_texts(task_folder(ref, where, base_dir), where, items)]
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    except (OSError, ValueError) as exc:
        raise EvomergeError(f"{where}: cannot load the tokenizer of the reference model {tokenizer_dir} "
                            f"({exc}); activation matching tokenises the data with it") from None
    seqs = [s for s in (encode_prompt(tokenizer, t)[:max_length] for t in texts) if s]
    if not seqs:
        raise EvomergeError(f"{where}: the tasks' items tokenise to no tokens; give tasks with text")
    return seqs
