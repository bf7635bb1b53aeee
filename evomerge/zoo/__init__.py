"""The embedded demo: tiny real models and synthetic tasks, built offline and cached.

``build_zoo()`` builds (once, ~1.5-2 min on 2 CPU cores) a 0.68M-parameter ``LlamaForCausalLM`` base with a char-level
tokenizer, one fine-tuned expert per synthetic task, and the tasks as JSONL, under
``$EVOMERGE_ZOO`` or ``~/.cache/evomerge/zoo/<version>``. Layout::

    root/zoo.json                    manifest (written last: its presence = complete zoo)
    root/zoo_report.md               held-out accuracy of base, experts and a few merges
    root/models/base                 HF checkpoint (safetensors, config, tokenizer)
    root/models/<task>_expert        one per task that has an expert
    root/tasks/<task>/{task.json, search.jsonl, heldout.jsonl}

Tasks (see :mod:`evomerge.zoo.data`): ``lang``, ``cipher``, ``upper``, each with an expert
(``Zoo.experts``); ``upenc``, compositional (the cipher written in upper case) with no
expert; and ``cipher_choice``, multiple choice over the cipher's prompts (scored by
log-likelihood, chance 0.25), evaluation only. ``Zoo.task_names`` lists all tasks,
``Zoo.expert_tasks`` those with an expert.

Extra endpoint: ``models/cipher_strong`` = base + 2 * (cipher_expert - base), an
"over-trained" cipher expert (a fine-tune trained twice as hard, in the linear regime). It is
not a training task and changes no other checkpoint; ``zoo:cipher_strong`` resolves to it
(``Zoo.extra_models``, ``Zoo.model(name)``). The overshoot shows: alone it answers 0.39 of the held-out cipher
items (expert 0.997, base 0.06) and still ranks the right answer first on 0.94 of
``cipher_choice``. With it as an endpoint (``configs/demo_strengths.yaml``) the right recipe is
weights ~ (1, 0.5, 1), which no default merge gives (the best of them, TIES, reaches a
held-out average of 0.39 on lang/cipher/upper; the search ~0.98): the search has something to
find.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from evomerge.errors import EvomergeError

__all__ = ["Zoo", "build_zoo", "default_root", "ZOO_VERSION"]

def _version() -> str:
    from evomerge.zoo.build import ZOO_FORMAT

    return f"v{ZOO_FORMAT}"


def __getattr__(name: str):
    if name == "ZOO_VERSION":  # the folder name under ~/.cache/evomerge/zoo
        return _version()
    raise AttributeError(name)


def default_root() -> Path:
    """``$EVOMERGE_ZOO`` or ``~/.cache/evomerge/zoo/v<format>`` (a new format, a new folder)."""
    env = os.environ.get("EVOMERGE_ZOO")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "evomerge" / "zoo" / _version()


@dataclass
class Zoo:
    """A built zoo on disk."""

    root: Path
    base: Path
    experts: dict[str, Path]
    task_names: list[str]
    manifest: dict = field(default_factory=dict, repr=False)
    extra_models: dict[str, Path] = field(default_factory=dict)

    def model(self, name: str) -> Path:
        """The checkpoint folder of ``zoo:NAME``: ``base``, a task's expert or an extra model."""
        if name == "base":
            return self.base
        found = self.experts.get(name) or self.extra_models.get(name)
        if found is None:
            raise EvomergeError(f"'zoo:{name}' is not in the zoo; it has "
                                + ", ".join(f"zoo:{n}" for n in ["base", *self.experts, *self.extra_models]))
        return found

    def task_dir(self, name: str) -> Path:
        if name not in self.task_names:
            raise EvomergeError(f"zoo has no task {name!r}; tasks: {', '.join(self.task_names)}")
        return self.root / "tasks" / name

    @property
    def expert_tasks(self) -> list[str]:
        """Tasks that have an expert (the others are compositional)."""
        return [t for t in self.task_names if t in self.experts]

    def load_task(self, name: str, split: str = "search"):
        from evomerge.tasks import load_task_dir

        return load_task_dir(self.task_dir(name), split)

    @property
    def report(self) -> str:
        p = self.root / "zoo_report.md"
        return p.read_text() if p.is_file() else ""

    @classmethod
    def load(cls, root: str | Path) -> "Zoo":
        root = Path(root)
        mf = root / "zoo.json"
        if not mf.is_file():
            raise EvomergeError(f"{root}: not a built zoo (zoo.json missing); run "
                                "`evomerge zoo build`")
        m = json.loads(mf.read_text())
        extra = {n: root / p for n, p in m.get("extra_models", {}).items()}
        return cls(root=root, base=root / m["base"],
                   experts={t: root / p for t, p in m["experts"].items()},
                   task_names=list(m["task_names"]), manifest=m, extra_models=extra)


def _is_current(root: Path) -> bool:
    from evomerge.zoo.build import ZOO_FORMAT, recipe

    mf = root / "zoo.json"
    if not mf.is_file():
        return False
    try:
        m = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return m.get("version") == ZOO_FORMAT and m.get("recipe") == json.loads(
        json.dumps(recipe()))


def build_zoo(root: str | Path | None = None, force: bool = False, verbose: bool = True) -> Zoo:
    """Build the zoo under ``root`` (default: :func:`default_root`) unless already built."""
    root = Path(root).expanduser() if root is not None else default_root()
    if force or not _is_current(root):
        from evomerge.zoo.build import build

        if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (
                root / "zoo.json").is_file())):
            raise EvomergeError(f"{root}: exists and is not a zoo (no zoo.json); refusing to "
                                "replace it. Pick an empty or new folder for --root.")
        build(root, force=force or root.exists(), verbose=verbose)
    elif verbose:
        print(f"zoo: cached at {root}", flush=True)
    return Zoo.load(root)
