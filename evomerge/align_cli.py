"""``evomerge align MODELS... --out DIR``: permute the weights of Llama-style models from
different initialisations into one coordinate system (the reference model's), so that they can
be averaged or merged. Each aligned model computes exactly the function of its input.

Import-light: torch, scipy and the alignment code are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def align_command(
    models: List[str] = typer.Argument(..., metavar="MODELS", help="two or more Llama-style models of one "
                                       "architecture: folders, zoo:NAME or hub ids owner/name"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: one aligned checkpoint per model, in a "
                             "subfolder named after its input folder, plus alignment.json (written atomically)"),
    method: str = typer.Option("rebasin", "--method", help="rebasin: Git Re-Basin weight matching of each model "
                               "to the reference; c2m3: cycle-consistent matching of all models at once "
                               "(Frank-Wolfe, C²M³); activations: match the units' activations on --data "
                               "(correlation, one linear assignment per group)"),
    data: List[str] = typer.Option([], "--data", help="for --method activations: a task (zoo:NAME or a task "
                                   "folder; repeat for several) whose search items (prompt + answer) the models "
                                   "are run on"),
    data_items: int = typer.Option(256, "--data-items", help="search items per --data task"),
    reference: Optional[str] = typer.Option(None, "--reference", help="the model whose coordinates the others "
                                            "are mapped into, as given in MODELS (default: the first); it is "
                                            "written unchanged"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow reading pickle (.bin) checkpoints "
                                      "(the aligned outputs are safetensors)"),
    seed: int = typer.Option(0, "--seed", help="seed of the order in which weight matching visits the groups "
                             "(rebasin, c2m3)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out even if it holds files (they are "
                                   "deleted)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
) -> None:
    """Align models trained from different initialisations (permutation symmetries of a
    Llama-style decoder: residual stream, MLP units, attention heads) and write the aligned
    checkpoints; merge them with `evomerge merge` (or put `align:` in the recipe instead)."""
    import contextlib
    import sys
    import time

    from evomerge.errors import EvomergeError
    from evomerge.models import resolve_model

    if len(models) < 2:
        raise EvomergeError(f"align needs at least two MODELS (got {len(models)})")
    if method not in ("rebasin", "c2m3", "activations"):
        raise EvomergeError(f"--method {method!r}: choose rebasin, c2m3 or activations")
    if method == "activations" and not data:
        raise EvomergeError("--method activations needs --data TASK (zoo:NAME or a task folder): the inputs the "
                            "models' activations are compared on")
    if data and method != "activations":
        raise EvomergeError(f"--data is read by --method activations only (not {method})")
    if data_items < 1:
        raise EvomergeError(f"--data-items must be >= 1 (got {data_items})")
    ref_index = 0
    if reference is not None:
        if reference not in models:
            raise EvomergeError(f"--reference {reference!r} is not one of MODELS ({', '.join(models)}); give it "
                                "exactly as in the model list")
        ref_index = models.index(reference)
    with contextlib.redirect_stdout(sys.stderr):  # a zoo build's progress lines
        paths = [resolve_model(m, what="MODEL") for m in models]

    from evomerge.align.disk import align_to_disk

    t0 = time.time()
    log = None if quiet else (lambda line: typer.echo(line, err=True))
    # a hub id resolves to a snapshot folder named by its commit: name the output after the repository
    names = [path.name if m.startswith("zoo:") or Path(m).expanduser().is_dir() else m.rsplit("/", 1)[-1]
             for m, path in zip(models, paths)]
    results = align_to_disk(paths, out, method=method, reference=ref_index, seed=seed, overwrite=overwrite, log=log,
                            names=names, allow_pickle=allow_pickle, data=data, data_items=data_items)
    if not quiet:
        typer.echo(f"aligned {len(results)} models ({method}, reference {paths[ref_index].name}) into {out} "
                   f"in {time.time() - t0:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("align")(align_command)
