"""``evomerge merge RECIPE.yaml --out DIR``: run a mergekit-style recipe to an HF checkpoint.

Import-light: torch and the engine are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path

import typer


def merge_command(
    recipe: Path = typer.Argument(..., help="mergekit-style YAML recipe"),
    out: Path = typer.Option(..., "--out", "-o", help="output model folder (written atomically; an existing "
                             "one is replaced only if it holds nothing but a model, see --overwrite)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="allow reading pickle (.bin) checkpoints"),
    device: str = typer.Option("cpu", "--device", help="device for the tensor math (cpu, cuda, cuda:1, ...)"),
    shard_size: str = typer.Option("5GB", "--shard-size", help="maximum safetensors shard size (e.g. 5GB, 500MB)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out even if it holds files that are "
                                   "not a model evomerge wrote (they are deleted)"),
) -> None:
    """Merge models as a recipe says and write an HF checkpoint (safetensors, config, tokenizer)."""
    import time

    from evomerge.checkpoint import parse_size
    from evomerge.errors import EvomergeError

    try:
        max_shard = parse_size(shard_size)
    except ValueError as exc:
        raise EvomergeError(f"--shard-size: {exc}") from None
    if max_shard <= 0:
        raise EvomergeError("--shard-size must be positive")

    import os

    from evomerge.merge.disk import merge_to_disk
    from evomerge.merge.mergekit_io import load_recipe

    rp, op = os.path.realpath(recipe), os.path.realpath(out).rstrip(os.sep)
    if rp == op or rp.startswith(op + os.sep):
        raise EvomergeError(f"--out {out} is or holds the recipe {recipe}; write the merge to another folder")
    from evomerge.routing.recipe import is_routed_recipe

    if is_routed_recipe(recipe):  # merge_method: mass -- a routed folder, not one checkpoint
        from evomerge.routing.recipe import merge_routed_recipe

        t0 = time.time()
        tf, tensor = merge_routed_recipe(recipe, out, overwrite=overwrite, allow_pickle=allow_pickle)
        if not quiet:
            typer.echo(f"routed model (mass) over {len(tf.tasks)} tasks ({', '.join(tf.tasks)}), routing on "
                       f"{tensor}: {out} in {time.time() - t0:.1f}s; run it with `evomerge eval {out} --task ...`")
        return
    rec = load_recipe(recipe)
    from evomerge.align.recipe_step import resolve_alignment  # `align:` -> the aligned checkpoints (cached)
    rec = resolve_alignment(rec, log=None if quiet else (lambda line: typer.echo(line, err=True)))
    if device != "cpu":  # torch is imported only for another device
        from evomerge.devices import check_device

        check_device(device, "--device")

    t0 = time.time()
    last = [0.0]
    open_line = [False]  # a progress line without its newline is on the terminal

    def progress(i: int, n: int, name: str) -> None:
        now = time.time()
        if not quiet and (now - last[0] > 1.0 or i == n):
            last[0] = now
            typer.echo(f"\r[{i}/{n}] {name[:60]:<60}", nl=(i == n), err=True)
            open_line[0] = i != n

    try:
        path = merge_to_disk(rec, out, allow_pickle=allow_pickle, device=device, max_shard_bytes=max_shard,
                             progress=progress, overwrite=overwrite)
    except BaseException:
        if open_line[0]:
            typer.echo("", err=True)  # the error message starts on a fresh line
        raise
    if not quiet:
        typer.echo(f"merged ({rec.merge_method}) into {path} in {time.time() - t0:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge_command)
