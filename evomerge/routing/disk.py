"""A saved MASS routed model: a folder, written atomically, that :func:`load_routed` runs.

Layout::

    DIR/routing.json         {"format": "evomerge-routed/1", "tasks": [...], "sources": {...},
                              "rank_fraction": ..., "routing": {tensor, temperature, threshold,
                              max_tasks, standardize}}
    DIR/base/                the shared base: an ordinary HF checkpoint (config, tokenizer)
    DIR/factors.safetensors  float32, per task T and base tensor N: "T/N.u", "T/N.s", "T/N.vh"
                             (matrices: top singular triplets of θ_T − θ0) or "T/N.delta" (1-D)

It is not one checkpoint: every prompt is answered by the merge of the tasks it is routed to.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch

from evomerge.errors import EvomergeError
from evomerge.fsutil import atomic_folder, check_model_folder_output, write_json_synced
from evomerge.routing.factors import TaskFactors, factors_from_checkpoints
from evomerge.routing.router import RoutingSettings

FORMAT = "evomerge-routed/1"
SETTINGS_FILE = "routing.json"
FACTORS_FILE = "factors.safetensors"


def is_routed_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding a saved routed model (its ``routing.json``)."""
    return (Path(path) / SETTINGS_FILE).is_file()


def task_names(paths: Sequence[Path]) -> list[str]:
    """Task names from the fine-tunes' folder names, made unique with ``-2``, ``-3``, ..."""
    names: list[str] = []
    for p in paths:
        base = Path(p).name.replace("/", "_") or "task"
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def _factor_tensors(tf: TaskFactors) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for t in tf.tasks:
        for name, (u, s, vh) in tf.factors[t].items():
            out[f"{t}/{name}.u"], out[f"{t}/{name}.s"], out[f"{t}/{name}.vh"] = u, s, vh
        for name, d in tf.vectors[t].items():
            out[f"{t}/{name}.delta"] = d
    return {k: v.contiguous() for k, v in out.items()}


def save_routed(out: str | os.PathLike, base: Path, experts: Sequence[Path], settings: RoutingSettings,
                rank_fraction: float | None = None, names: Sequence[str] | None = None,
                overwrite: bool = False, allow_pickle: bool = False) -> TaskFactors:
    """Compute every fine-tune's TSV factors over ``base`` and write a routed model to ``out``
    (see the module docstring); returns the factors. Refuses an ``out`` that is, holds or lies
    inside an input, or that holds files (unless ``overwrite``)."""
    from safetensors.torch import save_file

    from evomerge.checkpoint import CheckpointReader, write_checkpoint

    out = Path(out).absolute()
    inputs = [Path(base)] + [Path(p) for p in experts]
    check_model_folder_output(out, inputs, overwrite)
    names = task_names(experts) if names is None else list(names)
    tf = factors_from_checkpoints(Path(base), dict(zip(names, map(Path, experts))), rank_fraction, allow_pickle)
    tf.routing_basis(settings.tensor)  # the routing tensor exists and is a matrix: checked before writing
    reader = CheckpointReader(base, allow_pickle=allow_pickle)
    record = {"format": FORMAT, "method": "mass", "tasks": names,
              "sources": {"base": str(Path(base).absolute()),
                          **{n: str(Path(p).absolute()) for n, p in zip(names, experts)}},
              "rank_fraction": rank_fraction, "routing": settings.to_dict()}
    with atomic_folder(out) as tmp:
        write_checkpoint(tmp / "base", [(n, reader.get(n)) for n in reader.tensor_names()], reader.config,
                         tokenizer_from=reader.path)
        save_file(_factor_tensors(tf), str(tmp / FACTORS_FILE), metadata={"format": FORMAT})
        os.chmod(tmp / FACTORS_FILE, (tmp / "base" / "config.json").stat().st_mode & 0o777)  # as the others
        write_json_synced(tmp / SETTINGS_FILE, record)
    return tf


def read_settings(folder: Path) -> dict:
    """``routing.json`` of a routed folder, checked (errors name the file and field)."""
    path = folder / SETTINGS_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvomergeError(f"{folder}: not a routed model ({SETTINGS_FILE} missing); write one with "
                            "`evomerge route BASE MODELS... --out DIR`") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"{path}: cannot read ({exc})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise EvomergeError(f"{path}: 'format' must be {FORMAT!r} (a routed model written by `evomerge route`)")
    tasks = record.get("tasks")
    if not isinstance(tasks, list) or len(tasks) < 2 or not all(isinstance(t, str) for t in tasks) \
            or len(set(tasks)) != len(tasks):
        raise EvomergeError(f"{path}: 'tasks' must list two or more distinct task names")
    record["routing"] = RoutingSettings.from_dict(record.get("routing"), str(path))
    return record


def load_factors(folder: Path, tasks: Sequence[str], base: dict[str, torch.Tensor]) -> TaskFactors:
    """The :class:`TaskFactors` saved in ``folder`` (every task x base tensor present, checked)."""
    from safetensors import safe_open

    path = folder / FACTORS_FILE
    if not path.is_file():
        raise EvomergeError(f"{path}: missing; the routed model is incomplete (write it again with `evomerge route`)")
    tf = TaskFactors(tasks=list(tasks), base=base, factors={t: {} for t in tasks}, vectors={t: {} for t in tasks})
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = set(fh.keys())
            for t in tasks:
                for name in base:
                    if f"{t}/{name}.delta" in keys:
                        tf.vectors[t][name] = fh.get_tensor(f"{t}/{name}.delta").float()
                    elif f"{t}/{name}.u" in keys:
                        tf.factors[t][name] = tuple(fh.get_tensor(f"{t}/{name}.{p}").float() for p in ("u", "s", "vh"))
                    else:
                        raise EvomergeError(f"{path}: no factors of task {t!r} for tensor {name!r}")
    except EvomergeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file: name it
        raise EvomergeError(f"{path}: cannot read ({exc})") from None
    return tf


def load_routed(folder: str | os.PathLike, device: str = "cpu", dtype="float32", batch_size: int = 64,
                num_threads="auto", cached_merges: int = 8, **overrides):
    """Run a saved routed model: a :class:`~evomerge.routing.model.RoutedModel` whose
    ``generate`` / ``loglikelihoods`` / ``answer(task)`` route each prompt (``overrides``:
    routing settings to change, e.g. ``threshold=0.5``)::

        from evomerge.routing import load_routed
        model = load_routed("routed/")
        model.generate(["say 572="], max_new_tokens=8)
        model.last_routes   # [("lang_expert",)]
    """
    from evomerge.backends.hf import HFEvaluator
    from evomerge.checkpoint import CheckpointReader
    from evomerge.routing.model import RoutedModel

    folder = Path(folder)
    record = read_settings(folder)
    settings = record["routing"]
    if overrides:
        settings = RoutingSettings.from_dict({**settings.to_dict(), **overrides}, "routing settings")
    reader = CheckpointReader(folder / "base")
    base = {n: reader.get(n).float() for n in reader.tensor_names()}
    tf = load_factors(folder, record["tasks"], base)
    ev = HFEvaluator(folder / "base", device=device, dtype=dtype, batch_size=batch_size,
                     num_threads=num_threads)
    return RoutedModel(tf, settings, ev, cached_merges=cached_merges)
