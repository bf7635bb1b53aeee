"""The alignment step on disk: read N Llama-style checkpoints, map every model into the
coordinates of a reference model (Git Re-Basin weight matching or activation matching per model,
or C²M³ for all at once) and write
the aligned checkpoints — same functions, permuted weights — into one output folder,
atomically (a temporary sibling folder renamed into place; on any error nothing is left).

Layout of the output folder: one subfolder per model (named after its input folder; the
reference is written unchanged), each a complete checkpoint (safetensors, config.json,
tokenizer and generation files copied), and ``alignment.json`` (method, reference, and each
model's squared weight distance to the reference before and after alignment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from evomerge.align.c2m3 import c2m3
from evomerge.align.matching import squared_distance, weight_matching
from evomerge.align.spec import ALIGN_METHODS
from evomerge.align.symmetries import LlamaLayout, Permutations, identity_permutations, llama_layout, permute_model
from evomerge.checkpoint import CheckpointReader, check_compatible, write_checkpoint
from evomerge.errors import EvomergeError
from evomerge.fsutil import atomic_folder, check_model_folder_output, write_json_synced

METHODS = ALIGN_METHODS
_LAYOUT_FIELDS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim")


@dataclass
class AlignedModel:
    """One model of an alignment: where it came from, its output subfolder, distances."""

    source: Path
    output: str
    distance_before: float
    distance_after: float


def output_names(paths: Sequence[Path | str]) -> list[str]:
    """Subfolder names: each input folder's (or given) name, made unique with ``-2``, ``-3``, ..."""
    names: list[str] = []
    for p in paths:
        base = Path(p).name
        base = "model" if base in ("", ".", "..") else base
        name, k = base, 2
        while name in names or name == "alignment.json":
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_models(paths: Sequence[Path], allow_pickle: bool = False
                ) -> tuple[LlamaLayout, list[CheckpointReader], list[dict[str, torch.Tensor]]]:
    """Readers and all tensors of ``paths`` after checking they are Llama-style models of one
    architecture (same tensors, shapes and attention layout); errors name the model and tensor."""
    readers = [CheckpointReader(p, allow_pickle=allow_pickle) for p in paths]
    check_compatible([(f"model {p}", r) for p, r in zip(paths, readers)])
    ref_names = set(readers[0].tensor_names())
    layouts = []
    for p, r in zip(paths, readers):
        extra = sorted(set(r.tensor_names()) - ref_names)
        if extra:
            raise EvomergeError(f"tensor {extra[0]!r} is in model {p} but not in model {paths[0]}; alignment "
                                "needs models of one architecture")
        layouts.append(llama_layout(r.config, {n: r.shape(n) for n in r.tensor_names()}, where=f"model {p}"))
    for p, layout in zip(paths[1:], layouts[1:]):
        for f in _LAYOUT_FIELDS:
            if getattr(layout, f) != getattr(layouts[0], f):
                raise EvomergeError(f"model {p} has {f} {getattr(layout, f)} but model {paths[0]} has "
                                    f"{getattr(layouts[0], f)} (config.json); alignment needs one architecture")
    tensors = [{n: r.get(n) for n in r.tensor_names()} for r in readers]
    return layouts[0], readers, tensors


def alignment_permutations(tensors: Sequence[dict[str, torch.Tensor]], layout: LlamaLayout, method: str,
                           reference: int, seed: int = 0, config: dict | None = None,
                           sequences: Sequence[Sequence[int]] | None = None) -> tuple[list[Permutations], dict]:
    """Per model, the permutation into the reference's coordinates (identity for the reference),
    and a summary of the optimisation for ``alignment.json``. ``activations`` needs the models'
    ``config`` (config.json) and the token ``sequences`` to run them on."""
    if method == "activations":
        from evomerge.align.activations import activation_matching, decoder_from_tensors, token_batches

        if config is None or not sequences:
            raise EvomergeError("activation matching needs the models' config and token sequences (data)")
        models = [decoder_from_tensors(config, t) for t in tensors]
        pad = config.get("pad_token_id") or 0
        perms, reports = activation_matching(models, reference, layout, token_batches(sequences, pad=pad))
        return perms, {"sequences": len(sequences), "tokens": sum(len(s) for s in sequences),
                       "matched_correlation": reports}
    if method == "rebasin":
        perms, passes = [], []
        for i, t in enumerate(tensors):
            if i == reference:
                perms.append(identity_permutations(layout))
                passes.append(0)
            else:
                match = weight_matching(tensors[reference], t, layout, seed=seed)
                perms.append(match.perms)
                passes.append(match.passes)
        return perms, {"passes": passes}
    if method == "c2m3":
        order = [reference] + [i for i in range(len(tensors)) if i != reference]
        result = c2m3([tensors[i] for i in order], layout, seed=seed)
        perms = [result.pairwise_map(order.index(i), 0) for i in range(len(tensors))]
        return perms, {"iterations": result.iterations, "objective": result.objective, "gap": result.gap,
                       "start_value": result.start_value, "projected_value": result.projected_value,
                       "kept": result.kept}
    raise EvomergeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")


def align_to_disk(paths: Sequence[Path], out: str | os.PathLike, method: str = "rebasin", reference: int = 0,
                  seed: int = 0, overwrite: bool = False, log: Callable[[str], None] | None = None,
                  names: Sequence[str] | None = None, allow_pickle: bool = False,
                  data: Sequence[str] = (), data_items: int | None = None) -> list[AlignedModel]:
    """Align ``paths`` (two or more model folders) to ``paths[reference]`` and write the aligned
    checkpoints into ``out`` (see the module docstring); returns what was written. ``names``:
    what to call each model's subfolder (default: its folder's name; made unique either way).
    ``allow_pickle``: read ``pytorch_model*.bin`` inputs too (the outputs are safetensors).
    ``data``: tasks (``zoo:NAME`` or folders) whose items ``activations`` runs the models on
    (:mod:`~evomerge.align.data`; ``data_items`` per task)."""
    paths = [Path(p) for p in paths]
    out = Path(out).absolute()
    if len(paths) < 2:
        raise EvomergeError("align needs at least two models")
    if method not in METHODS:
        raise EvomergeError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    check_model_folder_output(out, paths, overwrite)
    if method == "activations":  # an unknown task is named before any model is read
        from evomerge.align.data import task_folder

        for ref in data:
            task_folder(ref, "--data")
    layout, readers, tensors = load_models(paths, allow_pickle)
    sequences = None
    if method == "activations":
        sequences = align_data(paths[reference], readers[reference].config, data, data_items, "--data")
    perms, summary = alignment_permutations(tensors, layout, method, reference, seed,
                                            config=readers[reference].config, sequences=sequences)
    aligned, results = [], []
    for path, name, t, p in zip(paths, output_names(paths if names is None else names), tensors, perms):
        a = permute_model(t, layout, p)
        results.append(AlignedModel(path, name, squared_distance(tensors[reference], t),
                                    squared_distance(tensors[reference], a)))
        aligned.append(a)
        if log is not None:
            log(f"{name}: squared distance to the reference {results[-1].distance_before:.6g} -> "
                f"{results[-1].distance_after:.6g}")
    record = {
        "method": method,
        "reference": str(paths[reference]),
        "seed": seed,
        **({"data": list(data)} if method == "activations" else {}),
        "models": [{"input": str(r.source), "output": r.output, "squared_distance_to_reference":
                    {"before": r.distance_before, "after": r.distance_after}} for r in results],
        method: summary,
    }
    _write_all(out, readers, results, aligned, record)
    return results


def align_data(reference: Path, config: dict, data: Sequence[str], items: int | None, where: str,
               base_dir: str | Path | None = None) -> list[list[int]]:
    """Token sequences for activation matching: the ``data`` tasks' items tokenised with the
    reference model's tokenizer, cut to its ``max_position_embeddings`` (``config``)."""
    from evomerge.align.data import DEFAULT_ITEMS, alignment_sequences

    return alignment_sequences(list(data), Path(reference), where, items or DEFAULT_ITEMS,
                               max_length=config.get("max_position_embeddings"), base_dir=base_dir)


def _write_all(out: Path, readers, results, aligned, record: dict) -> None:
    with atomic_folder(out) as tmp:
        for reader, r, tensors in zip(readers, results, aligned):
            ordered = [(n, tensors[n]) for n in reader.tensor_names()]
            write_checkpoint(tmp / r.output, ordered, reader.config, tokenizer_from=reader.path)
        write_json_synced(tmp / "alignment.json", record)
