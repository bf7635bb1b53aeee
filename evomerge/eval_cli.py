"""``evomerge eval MODEL --task T ...``: the accuracy of any checkpoint on named tasks, measured
the way the search measures it (the same evaluator, prompts, scoring).

MODEL is a model folder, ``zoo:NAME``, a routed model folder (``evomerge route``: every
prompt answered by the merge of the tasks it is routed to, in two passes), or a merge recipe
file (mergekit-style YAML, or JSON: a run's ``best/recipe.json`` -- its ``recipe_resolved`` --
or a plain recipe dict). A recipe is merged in memory into the evaluator (its base model
resident, the recipe's models as the merge sources), as the search does for a candidate;
nothing is written to disk.

``--adapters DIR`` (the ``adapters/`` folder of ``evomerge metamerge``): each task is answered with
the adapter of that task in front of the model's ``lm_head`` (a task-routed model); tasks without
an adapter in DIR are answered by the model alone (the output says which).

Import-light: torch, transformers and the engine are imported inside the command.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Optional

import typer

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")
SPLIT_CHOICES = ("heldout", "search")


def _zoo_quiet():
    """The embedded zoo (built on first use); its progress lines go to stderr, not the table."""
    import contextlib
    import sys

    from evomerge.models import demo_zoo

    with contextlib.redirect_stdout(sys.stderr):
        return demo_zoo()


def resolve_checkpoint(ref: str) -> Path:
    """MODEL (``zoo:NAME`` or a folder or a hub id) -> a model folder; errors name MODEL."""
    import contextlib
    import sys

    from evomerge.errors import EvomergeError
    from evomerge.models import resolve_model

    with contextlib.redirect_stdout(sys.stderr):  # a zoo built on first use: progress on stderr
        path = resolve_model(ref, what="MODEL")
    if not (Path(path) / "config.json").is_file():
        raise EvomergeError(f"MODEL {ref!r}: not a Hugging Face model folder (config.json missing); "
                            "give a model folder, zoo:NAME or a recipe file (.yaml / .json)")
    return Path(path)


def _load_recipe_file(path: Path):
    """A recipe file -> a validated :class:`MergeRecipe` (relative model paths resolve against
    the file's folder). JSON: a run's best/recipe.json (its ``recipe_resolved``) or a recipe."""
    import json

    from evomerge.errors import EvomergeError
    from evomerge.merge.mergekit_io import from_mergekit, load_recipe
    from evomerge.merge.recipe import MergeRecipe

    if path.suffix.lower() != ".json":
        return load_recipe(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EvomergeError(f"MODEL {path}: invalid JSON ({exc.msg} at line {exc.lineno}, "
                            f"column {exc.colno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"MODEL {path}: cannot read ({exc})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"MODEL {path}: expected a JSON object (a recipe, or a run's "
                            "best/recipe.json)")
    if "recipe_resolved" in data:
        recipe = MergeRecipe.from_dict(data["recipe_resolved"], f"{path}: recipe_resolved")
    elif "merge_method" in data:
        recipe = from_mergekit(data, str(path), folder=path.parent)
    elif "model_a" in data or "recipe" in data:
        raise EvomergeError(f"MODEL {path}: this run's best is a data-flow path (no merge recipe "
                            "to apply); evaluate its best/model folder instead")
    else:
        raise EvomergeError(f"MODEL {path}: not a merge recipe (no 'merge_method' or "
                            "'recipe_resolved' key)")
    recipe._recipe_dir = str(path.parent.absolute())
    return recipe


def _absolute_recipe(recipe) -> dict:
    """``recipe`` as a dict whose model references are absolute folders (checked to exist)."""
    from evomerge.models import resolve_model

    def fix(ref):
        return str(resolve_model(ref, base_dir=recipe.source_dir)) if ref is not None else None

    d = recipe.to_dict()
    if d.get("base_model") is not None:
        d["base_model"] = fix(d["base_model"])
    for m in d.get("models") or []:
        m["model"] = fix(m["model"])
    for s in d.get("slices") or []:
        if s.get("base_model") is not None:
            s["base_model"] = fix(s["base_model"])
        for src in s.get("sources") or []:
            src["model"] = fix(src["model"])
    ts = d.get("tokenizer_source")
    if ts is not None and ts not in ("base", "union"):
        d["tokenizer_source"] = fix(ts)
    return d


def load_task_refs(refs: list[str], split: str, limit: int | None) -> list[tuple[str, Any]]:
    """``--task`` values -> ``[(name, Task)]`` (the first ``limit`` items of each)."""
    from evomerge.errors import EvomergeError
    from evomerge.tasks import load_task_dir

    out: list[tuple[str, Any]] = []
    for ref in refs:
        if ref.startswith("zoo:"):
            zoo = _zoo_quiet()
            name = ref[4:]
            if name not in zoo.task_names:
                raise EvomergeError(f"--task {ref!r}: the zoo has no task {name!r}; its tasks: "
                                    + ", ".join(f"zoo:{t}" for t in zoo.task_names))
            folder = zoo.task_dir(name)
        else:
            folder = Path(ref).expanduser()
            if not folder.is_dir():
                what = "is a file, not a task folder" if folder.exists() else "task folder not found"
                raise EvomergeError(f"--task {ref!r}: {what} (give zoo:NAME or a folder holding "
                                    "search.jsonl / heldout.jsonl and an optional task.json)")
        try:
            task = load_task_dir(folder, split)
        except EvomergeError as exc:
            raise EvomergeError(f"--task {ref!r}: {exc}") from None
        if limit is not None:
            task.items = task.items[:limit]
        if not task.items:
            raise EvomergeError(f"--task {ref!r}: no {split} items")
        if any(task.name == n for n, _ in out):
            raise EvomergeError(f"--task {ref!r}: a task named {task.name!r} is given twice")
        out.append((task.name, task))
    return out


def _inside(path: Path, folder: Path) -> bool:
    import os

    p, f = os.path.realpath(path), os.path.realpath(folder).rstrip(os.sep)
    return p == f or p.startswith(f + os.sep)


def routing_shares(routes) -> dict[str, float]:
    """Share of the routed prompts answered by each task subset (``a+b``), most frequent first."""
    from collections import Counter

    counts = Counter("+".join(r) for r in routes)
    return {k: c / max(1, len(routes)) for k, c in counts.most_common()}


def format_table(accuracy: dict[str, float], items: dict[str, int], average: float) -> str:
    """The result table: one row per task, then the (unweighted) average of the accuracies."""
    w = max([len("average"), len("task")] + [len(t) for t in accuracy])
    lines = [f"{'task':<{w}}  {'items':>6}  {'accuracy':>8}"]
    lines += [f"{t:<{w}}  {items[t]:>6d}  {a:>8.4f}" for t, a in accuracy.items()]
    lines.append(f"{'average':<{w}}  {sum(items.values()):>6d}  {average:>8.4f}")
    return "\n".join(lines)


def eval_command(
    model: str = typer.Argument(..., metavar="MODEL", help="a model folder, zoo:NAME, a routed model "
                                "folder (evomerge route), or a merge recipe file (mergekit-style .yaml, or .json "
                                "such as a run's best/recipe.json); a recipe is merged in memory"),
    task: List[str] = typer.Option(..., "--task", "-t", help="zoo:NAME or a task folder "
                                   "(repeat for several tasks)"),
    split: str = typer.Option("heldout", "--split", help="which items: heldout or search"),
    backend: str = typer.Option("hf", "--backend", help="evaluator backend: hf or vllm"),
    device: str = typer.Option("cpu", "--device", help="device of the evaluated model (cpu, cuda, ...)"),
    dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16"),
    batch_size: int = typer.Option(64, "--batch-size", help="prompts per batch (hf backend)"),
    limit: Optional[int] = typer.Option(None, "--limit", help="only the first N items of each task"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the results as JSON "
                                            "to this file (written atomically)"),
    adapters: Optional[Path] = typer.Option(None, "--adapters", help="a folder of per-task adapters "
                                            "(evomerge metamerge's adapters/): each task is answered "
                                            "with its own adapter (hf backend)"),
) -> None:
    """Accuracy of a model (or of a merge recipe, merged in memory) on tasks, as the search
    measures it: a table of task, items, accuracy and the average."""
    import json
    import time

    from evomerge.devices import DTYPE_CHOICES, DTYPE_NAMES, check_device
    from evomerge.errors import EvomergeError

    # ---- the arguments, before anything is loaded
    if split not in SPLIT_CHOICES:
        raise EvomergeError(f"--split {split!r}: use heldout or search")
    if backend not in ("hf", "vllm"):
        raise EvomergeError(f"--backend {backend!r}: use hf or vllm")
    if dtype not in DTYPE_NAMES:
        raise EvomergeError(f"--dtype {dtype!r}: use {DTYPE_CHOICES}")
    if batch_size < 1:
        raise EvomergeError(f"--batch-size {batch_size}: must be >= 1")
    if limit is not None and limit < 1:
        raise EvomergeError(f"--limit {limit}: must be >= 1")
    if json_out is not None:
        from evomerge.fsutil import check_output_target

        if json_out.is_dir():
            raise EvomergeError(f"--json {json_out} is a folder; give a file path (e.g. "
                                f"{json_out / 'eval.json'})")
        check_output_target(json_out, "--json")
    if device != "cpu":
        check_device(device, "--device")
    if adapters is not None and backend != "hf":
        raise EvomergeError(f"--adapters needs --backend hf (the {backend} backend cannot apply adapters)")

    # ---- MODEL: a recipe file, or a checkpoint
    mpath = Path(model).expanduser()
    recipe_dict = None
    routed = False
    if not model.startswith("zoo:") and mpath.is_file():
        if mpath.suffix.lower() not in RECIPE_SUFFIXES:
            raise EvomergeError(f"MODEL {model!r} is a file but not a recipe (.yaml, .yml or "
                                ".json); give a model folder, zoo:NAME or a recipe file")
        recipe = _load_recipe_file(mpath)
        from evomerge.align.recipe_step import resolve_alignment  # `align:` -> the aligned checkpoints (cached)
        recipe = resolve_alignment(recipe, log=lambda line: typer.echo(line, err=True))
        try:
            recipe_dict = _absolute_recipe(recipe)
        except EvomergeError as exc:
            raise EvomergeError(f"MODEL {model}: {exc}") from None
        from evomerge.merge.recipe import MergeRecipe

        paths = MergeRecipe.from_dict(recipe_dict).model_paths()  # base first
        resident = Path(paths[0])
        inputs = [Path(p) for p in paths]
    elif not model.startswith("zoo:") and mpath.is_dir() and (mpath / "routing.json").is_file():
        if backend != "hf":
            raise EvomergeError(f"MODEL {model} is a routed model (evomerge route): it runs on --backend hf only")
        routed = True
        resident = mpath
        inputs = [mpath]
    elif not model.startswith("zoo:") and not mpath.exists() and model.startswith((".", "/", "~")):
        raise EvomergeError(f"MODEL {model!r}: not found (give a model folder, zoo:NAME or a "
                            "recipe file)")
    else:
        resident = resolve_checkpoint(model)
        inputs = [resident]

    tasks = load_task_refs(task, split, limit)
    if routed and adapters is not None:
        raise EvomergeError(f"MODEL {model} is a routed model (evomerge route); --adapters applies to a "
                            "single model or recipe (evomerge metamerge's recipe.yaml)")
    task_adapters = _task_adapters(adapters, [n for n, _ in tasks]) if adapters is not None else {}

    if json_out is not None:
        from evomerge.fsutil import refuse_input

        if recipe_dict is not None:
            refuse_input(json_out, {"MODEL": mpath}, "--json")
        task_dirs = [Path(t) for t in task if not t.startswith("zoo:")]
        for folder in inputs + task_dirs:
            if _inside(json_out, folder):
                raise EvomergeError(f"--json {json_out} is inside the input folder {folder}; "
                                    "write the results somewhere else")

    # ---- evaluate
    from evomerge.backends.evaluator import MergeSources, make_evaluator
    from evomerge.config import EvaluatorConfig

    ev = EvaluatorConfig(backend=backend, device=device, dtype=dtype, batch_size=batch_size)
    if device != "cpu" and backend == "hf":
        import torch

        try:
            torch.empty(1, device=device)
        except Exception as exc:  # noqa: BLE001
            raise EvomergeError(f"--device {device!r} is not usable here ({exc})") from None
    sources = None
    if recipe_dict is not None:
        sources = MergeSources(tuple(str(p) for p in inputs), device=device)
    t0 = time.time()
    if routed:
        from evomerge.routing.disk import load_routed

        evaluator = load_routed(resident, device=device, dtype=dtype, batch_size=batch_size)
    else:
        evaluator = make_evaluator(ev, resident, sources)
    routing: dict[str, dict[str, float]] = {}
    try:
        if recipe_dict is not None:
            try:
                evaluator.check_recipe(recipe_dict)
            except EvomergeError as exc:
                raise EvomergeError(
                    f"MODEL {model}: the merge does not fit its base model in memory ({exc}); write "
                    f"it with `evomerge merge {model} --out DIR` and evaluate DIR") from None
            evaluator.apply_recipe(recipe_dict)
        accuracy: dict[str, float] = {}
        n_items: dict[str, int] = {}
        for name, t in tasks:
            where = f"--adapters {adapters}: the adapter of task {name}"
            with _adapter_for(evaluator, task_adapters.get(name), where):
                correct = evaluator.answer(t)
            accuracy[name] = float(sum(int(c) for c in correct)) / len(correct)
            n_items[name] = len(correct)
            if routed:
                routing[name] = routing_shares(evaluator.last_routes)
    finally:
        evaluator.close()
    average = sum(accuracy.values()) / len(accuracy)

    typer.echo(f"{model} ({'merged in memory, ' if recipe_dict is not None else ''}{split} items, "
               f"backend {backend}, {time.time() - t0:.1f}s)")
    if adapters is not None:
        none = [n for n, _ in tasks if n not in task_adapters]
        typer.echo(f"adapters from {adapters}: {', '.join(task_adapters) or 'none'}"
                   + (f"; no adapter for {', '.join(none)} (answered by the model alone)" if none else ""))
    typer.echo(format_table(accuracy, n_items, average))
    for name, shares in routing.items():
        typer.echo(f"routed {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in shares.items()))
    if json_out is not None:
        from evomerge.fsutil import write_text_atomic

        doc = {"model": model, "split": split, "backend": backend, "accuracy": accuracy,
               "average": average, "items": n_items, "dtype": dtype, "limit": limit,
               "adapters": None if adapters is None else {n: n in task_adapters for n, _ in tasks}}
        if routed:
            doc["routing"] = routing
        write_text_atomic(json_out, json.dumps(doc, indent=2) + "\n", "--json")
        typer.echo(f"wrote {json_out}")


def _task_adapters(folder: Path, names: list[str]) -> dict:
    """``{task: adapter}`` for the tasks in ``names`` that have an adapter in ``folder``."""
    from evomerge.learned.adapters import load_adapter_dir

    found = load_adapter_dir(folder)
    return {n: found[n] for n in names if n in found}


def _adapter_for(evaluator, params, where: str):
    """A context in which ``evaluator``'s model applies the adapter ``params`` (None: none)."""
    if params is None:
        import contextlib

        return contextlib.nullcontext()
    from evomerge.learned.adapters import adapted

    return adapted(evaluator.model, params, where)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
