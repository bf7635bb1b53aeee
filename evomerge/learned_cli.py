"""``evomerge adamerge``: learn task arithmetic's coefficients from the tasks' prompts (AdaMerging)
and write them as a recipe (see evomerge/learned/adamerging.py)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import typer


def adamerge_command(
    base: str = typer.Option(..., "--base", help="the base model: a folder, zoo:NAME or a hub id"),
    model: List[str] = typer.Option(..., "--model", "-m", help="a fine-tune of the base (repeat: one per task)"),
    task: List[str] = typer.Option(..., "--task", "-t", help="zoo:NAME or a task folder (repeat); their "
                                   "search items' prompts are the inputs, never the answers"),
    out: Path = typer.Option(..., "--out", "-o", help="the recipe to write (.yaml, atomically)"),
    granularity: str = typer.Option("layer", "--granularity", help="layer (one coefficient per model and "
                                    "layer, plus one for the tensors outside the layers) or task (one per model)"),
    steps: int = typer.Option(100, "--steps", help="Adam steps on the entropy"),
    lr: float = typer.Option(0.01, "--lr", help="Adam learning rate"),
    init: float = typer.Option(1.0, "--init", help="starting coefficient (task arithmetic's weight)"),
    prompts: int = typer.Option(64, "--prompts", help="prompts per task (the first N search items)"),
) -> None:
    """AdaMerging: task arithmetic's coefficients learned by minimising the entropy of the merged model's
    next-token predictions on the tasks' prompts; written as a task_arithmetic recipe."""
    import time

    from evomerge.errors import EvomergeError
    from evomerge.eval_cli import load_task_refs, resolve_checkpoint
    from evomerge.fsutil import check_output_target, write_text_atomic

    if out.suffix not in (".yaml", ".yml"):
        raise EvomergeError(f"--out {out}: give a recipe path ending in .yaml")
    if granularity not in ("layer", "task"):
        raise EvomergeError(f"--granularity {granularity!r}: use layer or task")
    if steps < 0 or prompts < 1 or not lr > 0:
        raise EvomergeError("--steps must be >= 0, --prompts >= 1 and --lr > 0")
    check_output_target(out)
    base_path = resolve_checkpoint(base)
    model_paths = [resolve_checkpoint(m) for m in model]
    texts = []
    for _, t in load_task_refs(task, "search", prompts):
        texts += t.prompts()

    from evomerge.learned.adamerging import adamerge
    from evomerge.merge.recipe import MergeRecipe

    def log(step: int, entropy: float, lam) -> None:
        if step % max(1, steps // 10) == 0 or step == steps:
            mean = [round(float(x), 3) for x in lam.mean(1)]
            typer.echo(f"step {step:>4}  entropy {entropy:.4f}  mean coefficient per model {mean}")

    t0 = time.time()
    result = adamerge(base_path, model_paths, texts, granularity=granularity, init=init, steps=steps, lr=lr, log=log)
    recipe = MergeRecipe.from_dict(result.recipe(base_path, model_paths))
    write_text_atomic(out, recipe.to_yaml())
    typer.echo(f"wrote {out} ({granularity}-wise AdaMerging, {len(texts)} prompts, entropy "
               f"{result.entropy[0]:.4f} -> {result.entropy[-1]:.4f}, {time.time() - t0:.0f}s); "
               f"evaluate it with `evomerge eval {out} --task ...`")


def register(app: typer.Typer) -> None:
    app.command("adamerge")(adamerge_command)
