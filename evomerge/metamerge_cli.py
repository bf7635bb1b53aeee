"""``evomerge metamerge BASE --model M --task T ... --out DIR``: MetaMerging (see
:mod:`evomerge.learned.metamerging`) of fine-tunes, each with the task whose inputs it is aligned on
(by default each prompt followed by the fine-tune's own answer; never the task's answers).

DIR gets ``recipe.yaml`` (the learned ``task_arithmetic`` recipe), ``adapters/TASK.safetensors``
(one adapter per task, for ``evomerge eval recipe.yaml --adapters DIR/adapters``) and
``metamerging.json`` (coefficients, losses, settings, the number of inputs, wall time). DIR is written
whole or not at all (built next to it, then renamed); it must not exist yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def metamerge_command(
    base: str = typer.Argument(..., metavar="BASE", help="the base model (folder, zoo:NAME or hub id)"),
    model: List[str] = typer.Option(..., "--model", "-m", help="a fine-tune of BASE (repeat; the i-th "
                                    "--model goes with the i-th --task)"),
    task: List[str] = typer.Option(..., "--task", "-t", help="its task: zoo:NAME or a task folder (the "
                                   "prompts of its search items are read, never the answers)"),
    out: Path = typer.Option(..., "--out", "-o", help="the output folder (must not exist)"),
    granularity: str = typer.Option("task", "--granularity", help="task (one λ per model) or layer "
                                    "(one per model and decoder layer, plus one outside the layers)"),
    meta_steps: int = typer.Option(30, "--meta-steps", help="meta-steps of λ (0: task arithmetic)"),
    lr: float = typer.Option(1e-2, "--lr", help="Adam learning rate of λ"),
    inner_lr: float = typer.Option(1.0, "--inner-lr", help="SGD learning rate of the inner adapter step"),
    inner_steps: int = typer.Option(1, "--inner-steps", help="inner adapter steps per meta-step"),
    first_order: bool = typer.Option(False, "--first-order", help="FOMAML: do not differentiate "
                                     "through the inner step (less memory and time)"),
    learn_init: bool = typer.Option(True, "--learn-init/--no-learn-init", help="also meta-learn the "
                                    "adapters' initialisation (MAML)"),
    init_lr: float = typer.Option(1e-3, "--init-lr", help="Adam learning rate of the adapters' initialisation"),
    adapter_steps: int = typer.Option(300, "--adapter-steps", help="Adam steps of each adapter on the "
                                      "final merged model"),
    adapter_lr: float = typer.Option(1e-3, "--adapter-lr", help="their learning rate"),
    width: int = typer.Option(128, "--width", help="the adapters' inner width"),
    batch_size: int = typer.Option(32, "--batch-size", help="prompts per batch"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N search items of each task"),
    continuations: bool = typer.Option(True, "--continuations/--prompts-only", help="align on each prompt "
                                       "followed by its fine-tune's own answer (greedy continuation, or its "
                                       "best-scoring choice), or on the prompts alone"),
    seed: int = typer.Option(0, "--seed", help="seed of the adapters' initialisation"),
) -> None:
    """MetaMerging: task arithmetic's λ meta-learned with per-task feature adapters, from the tasks'
    inputs alone; writes a recipe plus one adapter per task (a task-routed model)."""
    import time

    from evomerge.errors import EvomergeError
    from evomerge.eval_cli import load_task_refs, resolve_checkpoint
    from evomerge.learned.metamerging import ExpertTask, check_settings, metamerge

    if len(model) != len(task):
        raise EvomergeError(f"give one --task per --model ({len(model)} --model, {len(task)} --task)")
    if limit is not None and limit < 2:
        raise EvomergeError(f"--limit {limit}: must be >= 2 (an inner and a held-apart prompt per task)")
    check_settings(granularity, meta_steps, inner_steps, adapter_steps, width, batch_size)
    if out.exists():
        raise EvomergeError(f"--out {out} exists; give a new folder")
    base_path = resolve_checkpoint(base)
    paths = [resolve_checkpoint(m) for m in model]
    tasks = load_task_refs(list(task), "search", limit)
    t0 = time.time()
    experts = [ExpertTask(p, name, _inputs(p, t, continuations, batch_size)) for p, (name, t) in zip(paths, tasks)]
    result = metamerge(base_path, experts, granularity=granularity, meta_steps=meta_steps, lr=lr,
                       inner_lr=inner_lr, inner_steps=inner_steps, first_order=first_order,
                       learn_init=learn_init, init_lr=init_lr, adapter_steps=adapter_steps, adapter_lr=adapter_lr,
                       width=width, batch_size=batch_size, seed=seed)
    wall = time.time() - t0
    settings = {"granularity": granularity, "meta_steps": meta_steps, "lr": lr, "inner_lr": inner_lr,
                "inner_steps": inner_steps, "first_order": first_order, "learn_init": learn_init, "init_lr": init_lr,
                "adapter_steps": adapter_steps, "adapter_lr": adapter_lr, "width": width,
                "batch_size": batch_size, "seed": seed,
                "inputs": "prompt + the fine-tune's own answer" if continuations else "prompt"}
    write_result(out, result, str(base_path), [str(p) for p in paths],
                 {"settings": settings, "inputs": {e.task: len(e.texts) for e in experts}, "wall_s": wall})
    typer.echo(f"wrote {out}: λ {[round(float(v), 4) for v in result.coefficients.mean(1)]} (mean per model), "
               f"outer loss {result.outer_loss[0]:.4f} -> {result.outer_loss[-1]:.4f}, adapters for "
               f"{', '.join(result.adapters)} in {wall:.1f}s")
    typer.echo(f"evaluate: evomerge eval {out / 'recipe.yaml'} --adapters {out / 'adapters'} --task ...")


def _inputs(model: Path, task, continuations: bool, batch_size: int) -> list[str]:
    """The texts ``model`` is aligned on for ``task``: its prompts, or each followed by ``model``'s own answer."""
    if not continuations:
        return task.prompts()
    from evomerge.backends.hf import HFEvaluator
    from evomerge.learned.metamerging import self_continued

    evaluator = HFEvaluator(model, batch_size=batch_size, num_threads="auto")
    try:
        return self_continued(evaluator, task)
    finally:
        evaluator.close()


def write_result(out: Path, result, base: str, models: list[str], info: dict) -> None:
    """``out/recipe.yaml``, ``out/adapters/TASK.safetensors`` and ``out/metamerging.json``, built in a
    folder next to ``out`` and renamed to it (nothing is left behind on errors)."""
    from evomerge.errors import EvomergeError
    from evomerge.fsutil import atomic_folder, write_json_synced
    from evomerge.learned.adapters import save_adapter
    from evomerge.merge.recipe import MergeRecipe

    with atomic_folder(out) as tmp:
        (tmp / "recipe.yaml").write_text(MergeRecipe.from_dict(result.recipe(base, models)).to_yaml(),
                                         encoding="utf-8")
        for task, params in result.adapters.items():
            path = tmp / "adapters" / f"{_file_name(task)}.safetensors"
            if path.exists():
                raise EvomergeError(f"tasks {task!r} and another give the same adapter file name {path.name}; "
                                    "rename one task")
            save_adapter(path, params, task)
        doc = {"coefficients": result.coefficients.tolist(), "granularity": result.granularity,
               "base": base, "models": models, "tasks": list(result.adapters),
               "outer_loss": result.outer_loss, "adapter_loss": result.adapter_loss, **info}
        write_json_synced(tmp / "metamerging.json", doc)


def _file_name(task: str) -> str:
    """A task name as a file name (characters other than letters, digits, ``-``, ``_``, ``.`` -> ``_``)."""
    import re

    return re.sub(r"[^\w.-]", "_", task).lstrip(".") or "task"


def register(app: typer.Typer) -> None:
    app.command("metamerge")(metamerge_command)
