"""``evomerge stats MODEL --task T --kind fisher|gram --out FILE``: a model's statistics on a task's
inputs, computed once for the ``fisher`` and ``regmean`` merge methods (see evomerge/stats/)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def stats_command(
    model: str = typer.Argument(..., metavar="MODEL", help="a model folder, zoo:NAME or a hub id (a fine-tune)"),
    task: str = typer.Option(..., "--task", "-t", help="its task: zoo:NAME or a task folder (its search items' "
                             "prompts are read, never the answers)"),
    kind: str = typer.Option(..., "--kind", help="fisher (for merge_method: fisher) or gram (for regmean)"),
    out: Path = typer.Option(..., "--out", "-o", help="the .safetensors file to write (atomically)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N search items"),
    device: str = typer.Option("cpu", "--device", help="device for the passes (cpu, cuda, ...)"),
    batch_size: int = typer.Option(64, "--batch-size", help="prompts per batch when the model labels them"),
) -> None:
    """Compute a model's diagonal Fisher or its linear layers' input Gram matrices on a task's prompts,
    labelled by the model itself (greedy continuation; the best-scoring choice for multiple choice)."""
    import time

    from evomerge.errors import EvomergeError
    from evomerge.eval_cli import load_task_refs, resolve_checkpoint
    from evomerge.fsutil import check_output_target

    if kind not in ("fisher", "gram"):
        raise EvomergeError(f"--kind {kind!r}: use fisher or gram")
    if out.suffix != ".safetensors":
        raise EvomergeError(f"--out {out}: give a path ending in .safetensors")
    if out.is_dir():
        raise EvomergeError(f"--out {out} is a folder; give a file path")
    if limit is not None and limit < 1:
        raise EvomergeError(f"--limit {limit}: must be >= 1")
    check_output_target(out)
    path = resolve_checkpoint(model)
    (name, t), = load_task_refs([task], "search", limit)

    from evomerge.backends.hf import HFEvaluator
    from evomerge.stats import write_stats
    from evomerge.stats.collect import fisher_diagonal, input_grams, label_items

    t0 = time.time()
    ev = HFEvaluator(path, device=device, dtype="float32", batch_size=batch_size, num_threads="auto")
    try:
        seqs = label_items(ev, t)
        stats = fisher_diagonal(ev.model, seqs) if kind == "fisher" else input_grams(ev.model, seqs)
    finally:
        ev.close()
    meta = {"model": str(path), "task": name, "items": str(len(seqs.pairs)), "tokens": str(seqs.tokens),
            "labels": seqs.labels}
    write_stats(out, sorted(stats.items()), kind, meta)
    typer.echo(f"wrote {out}: {kind} of {len(stats)} tensors of {model} on {len(seqs.pairs)} {name} prompts "
               f"({seqs.tokens} tokens; labels: {seqs.labels}) in {time.time() - t0:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("stats")(stats_command)
