"""``evomerge route MODELS... --base BASE --out DIR``: save a MASS routed model (the base, each
fine-tune's TSV factors, the routing settings) that ``evomerge eval DIR`` and
``evomerge.routing.load_routed(DIR)`` run, routing every prompt to the merge of its tasks.

Import-light: torch and the routing code are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def route_command(
    models: List[str] = typer.Argument(..., metavar="MODELS", help="two or more fine-tunes of BASE: folders, "
                                       "zoo:NAME or hub ids owner/name (one task each, named after its folder)"),
    base: str = typer.Option(..., "--base", help="the base model the fine-tunes share"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: base/, factors.safetensors, routing.json "
                             "(written atomically)"),
    routing_tensor: Optional[str] = typer.Option(None, "--routing-tensor", help="the linear layer weight whose "
                                                 "input is routed on (default: the second-to-last layer's "
                                                 "mlp.gate_proj.weight)"),
    temperature: float = typer.Option(1.0, "--temperature", help="softmax temperature over tasks"),
    threshold: float = typer.Option(0.2, "--threshold", help="select the tasks whose probability is at least "
                                    "this (always the most probable one)"),
    max_tasks: Optional[int] = typer.Option(None, "--max-tasks", help="select at most this many tasks (default: "
                                            "no limit)"),
    standardize: bool = typer.Option(True, "--standardize/--no-standardize", help="standardise the negative "
                                     "residuals across tasks before the softmax (as the reference code)"),
    rank_fraction: Optional[float] = typer.Option(None, "--rank-fraction", help="singular components kept per "
                                                  "task, as a fraction of min(m, n) (default 1/T, as tsv)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow reading pickle (.bin) checkpoints"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out even if it holds files (they are "
                                   "deleted)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
) -> None:
    """Save a MASS routed model: not one checkpoint, but the base plus per-task singular factors
    and a data-free router; each prompt costs two passes (route, then answer with the merge of
    the tasks it was routed to). Run it with `evomerge eval DIR --task ...`."""
    import contextlib
    import sys
    import time

    from evomerge.errors import EvomergeError
    from evomerge.models import resolve_model

    if len(models) < 2:
        raise EvomergeError(f"route needs at least two fine-tunes in MODELS (got {len(models)})")
    if rank_fraction is not None and not 0.0 < rank_fraction <= 1.0:
        raise EvomergeError(f"--rank-fraction {rank_fraction}: must be in (0, 1]")
    if not temperature > 0:
        raise EvomergeError(f"--temperature {temperature}: must be > 0")
    if not 0.0 <= threshold <= 1.0:
        raise EvomergeError(f"--threshold {threshold}: must be in [0, 1] (a probability)")
    if max_tasks is not None and max_tasks < 1:
        raise EvomergeError(f"--max-tasks {max_tasks}: must be >= 1")
    with contextlib.redirect_stdout(sys.stderr):  # a zoo build's progress lines
        base_path = resolve_model(base, what="--base")
        paths = [resolve_model(m, what="MODEL") for m in models]

    from evomerge.routing.recipe import RoutedParameters, write_routed_model

    params = RoutedParameters(routing_tensor=routing_tensor, temperature=temperature, threshold=threshold,
                              max_tasks=max_tasks, standardize=standardize, rank_fraction=rank_fraction)
    t0 = time.time()
    try:
        tf, routing_tensor = write_routed_model(out, base_path, paths, params, overwrite=overwrite, allow_pickle=allow_pickle)
    except EvomergeError as exc:
        msg = str(exc)
        raise EvomergeError("--routing-tensor" + msg[len("routing_tensor"):] if msg.startswith("routing_tensor:")
                            else msg) from None
    if not quiet:
        base_numel = sum(t.numel() for t in tf.base.values())
        typer.echo(f"routed model over {len(tf.tasks)} tasks ({', '.join(tf.tasks)}), routing on {routing_tensor}: "
                   f"{out} in {time.time() - t0:.1f}s (task factors: {tf.storage_numel() / base_numel:.2f}x the "
                   "base's parameters)")


def register(app: typer.Typer) -> None:
    app.command("route")(route_command)
