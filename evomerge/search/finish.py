"""Stage 6, the end of the run: held-out accuracy of the endpoints, the default merges and the
finalists; the best candidate's recipe, mergekit YAML and checkpoint; the PS+DFS data-flow stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.search.baselines import baseline_recipes
from evomerge.search.context import _resolve_recipe, SearchContext
from evomerge.search.executor import heldout_job
from evomerge.search.fitness import endpoint_refs
from evomerge.search.generations import run_generations
from evomerge.search.inputs import dataflow_space
from evomerge.search.rundir import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, RunDir
from evomerge.search.selection import choose_finalists


def run_heldout(ctx: SearchContext, records: list[dict], reference: list[dict] | None = None
                ) -> list[dict]:
    """True held-out accuracy of the endpoints and of the top candidates (resumable).

    ``reference``: rows already measured (the PS stage's, for the dataflow stage); the
    endpoints are then not evaluated again. Candidates measured by an earlier finish of this run
    (before it was extended with more generations) come back too, marked ``earlier``: they stay in
    the running for the best, so more generations never lose a model the run already had."""
    rd, cfg = ctx.rd, ctx.cfg
    done = {r["name"]: r for r in read_jsonl(rd.heldout)}
    jobs: list[tuple[str, str, object]] = []  # (name, kind, what)
    if reference is None:
        jobs += [(ref, "endpoint", ref) for ref in endpoint_refs(cfg)]
        if cfg.final.baselines and getattr(ctx.space, "kind", "parameter") != "dataflow":
            jobs += [(name, "baseline", recipe) for name, recipe in baseline_recipes(
                ctx.base_path, list(ctx.endpoint_paths.values()), cfg.evaluator.dtype, cfg.models.tokenizer_source)]

    jobs += [(f"candidate-{r['index']}", "candidate", r) for r in choose_finalists(ctx, records)]

    def arrived(job, res) -> None:  # the driver writes each line as it arrives
        name, kind, what = job.key, job.args["kind"], job.args["what"]
        acc = res["accuracy"]
        line = {"name": name, "index": what["index"] if kind == "candidate" else None,
                "accuracy": acc, "average": float(np.mean(list(acc.values()))),
                "estimated": what["estimates"] if kind == "candidate" else None}
        if kind == "candidate":
            line.update(fitness=what["fitness"], estimate_error=what["estimate_error"], items=what["items"])
        if kind == "baseline":
            line["recipe"] = what
        append_jsonl(rd.heldout, line)
        done[name] = line

    ctx.run_jobs([heldout_job(name, kind, what) for name, kind, what in jobs if name not in done], arrived)
    out = [dict(r, index=None, estimated=None) for r in (reference or [])]
    now = {name for name, _, _ in jobs}
    known = {r["index"] for r in records}  # a run re-finished at fewer generations: only its own candidates
    earlier = [dict(r, earlier=True) for name, r in done.items()
               if r.get("index") is not None and r["index"] in known and name not in now]
    return out + [done[name] for name, _, _ in jobs] + earlier


def write_best(ctx: SearchContext, records: list[dict], heldout: list[dict]) -> dict:
    """Pick the best re-evaluated candidate by held-out average; write recipe and model."""
    from evomerge.merge.engine import merge_to_disk
    from evomerge.merge.recipe import MergeRecipe

    rd = ctx.rd
    cands = [h for h in heldout if h["index"] is not None]
    best_h = max(cands, key=lambda h: (h["average"], -h["index"]))
    rec = next(r for r in records if r["index"] == best_h["index"])
    # "generation" counted from 1, as the log and the report show it (evaluations.jsonl: from 0)
    summary = {"index": rec["index"], "generation": rec["generation"] + 1, "genome": rec["genome"],
               "fitness": best_h.get("fitness", rec["fitness"]),
               "estimates": best_h.get("estimated") or rec["estimates"],
               "estimate_error": best_h.get("estimate_error"), "items": best_h.get("items", rec["items"]),
               "heldout": best_h["accuracy"], "heldout_average": best_h["average"],
               "recipe": rec["recipe"]}
    if getattr(ctx.space, "kind", "parameter") == "dataflow":
        return _write_best_dataflow(ctx, rec, summary)
    resolved = _resolve_recipe(rec["recipe"], ctx.base_path, ctx.endpoint_paths)
    summary["recipe_resolved"] = resolved
    summary["genes"] = {s.label(): v for s, v in ctx.space.values(rec["genome"]).items()}
    model_dir = _record_best(rd, summary)
    from evomerge.merge.mergekit_io import to_mergekit_yaml

    # strict=False: what mergekit cannot express is written as a comment, not an error
    atomic_write_text(rd.best / "recipe.mergekit.yaml",
                      to_mergekit_yaml(MergeRecipe.from_dict(resolved), strict=False))
    if ctx.cfg.final.write_model and not model_dir.exists():
        merge_to_disk(MergeRecipe.from_dict(resolved), model_dir)
    return summary


def _record_best(rd: RunDir, summary: dict) -> Path:
    """Write best/recipe.json; drop a best/model of another candidate (a longer, resumed run
    found a better one). Returns where the model goes."""
    rd.best.mkdir(parents=True, exist_ok=True)
    model_dir, old = rd.best / "model", rd.best / "recipe.json"
    if model_dir.exists() and (not old.exists()
                               or json.loads(old.read_text())["index"] != summary["index"]):
        shutil.rmtree(model_dir)
    atomic_write_json(old, summary)
    return model_dir


def _write_best_dataflow(ctx: SearchContext, rec: dict, summary: dict) -> dict:
    """Best dataflow path: its JSON, a mergekit passthrough YAML when every scale is 1, and
    the folded checkpoint."""
    from evomerge.dataflow import DataflowPath, write_dataflow_checkpoint

    rd, space = ctx.rd, ctx.space
    path = DataflowPath.from_dict(rec["recipe"])
    summary["model_a"], summary["model_b"] = str(space.model_a), str(space.model_b)
    model_dir = _record_best(rd, summary)
    mk = rd.best / "recipe.mergekit.yaml"
    if all(st.scale == 1.0 for st in path.steps):
        slices, run = [], None
        for st in path.steps:
            src = str(space.model_a if st.model == "A" else space.model_b)
            if run and run[0] == src and run[2] == st.layer:
                run[2] += 1
            else:
                run = [src, st.layer, st.layer + 1]
                slices.append(run)
        atomic_write_text(mk, yaml.safe_dump({
            "merge_method": "passthrough", "dtype": ctx.cfg.evaluator.dtype,
            "slices": [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in slices]},
            sort_keys=False))
    else:
        atomic_write_text(mk, "# This dataflow recipe scales layer inputs, which mergekit cannot\n"
                          "# express; use best/model (scales folded into o_proj/down_proj) or\n"
                          "# best/recipe.json.\n")
    if ctx.cfg.final.write_model and not model_dir.exists():
        write_dataflow_checkpoint(path, space.model_a, space.model_b, model_dir)
    return summary


def run_dataflow_stage(ctx: SearchContext, ps_heldout: list[dict], ps_best: dict):
    """PS+DFS: a data-flow search whose model A is the parameter-space stage's best model."""
    import dataclasses


    cfg, rd = ctx.cfg, ctx.rd
    df = cfg.search_space.dataflow
    stage_rd = RunDir(rd.root / "dfs")
    stage_rd.root.mkdir(exist_ok=True)
    used = stage_rd.state().get("model_a_index")
    if used is not None and used != ps_best["index"] and read_jsonl(stage_rd.evaluations):
        raise EvomergeError(
            f"{stage_rd.root}: the data-flow stage was searched with PS candidate {used} as "
            f"model A, but the PS best is now candidate {ps_best['index']} (the PS stage ran "
            f"longer); its log would mix two models A. Move {stage_rd.root} away to search the "
            "data-flow stage again on the new PS best, or resume without the change")
    stage_rd.set_state(model_a_index=ps_best["index"])
    refs = {"base": ctx.base_path, **ctx.endpoint_paths}
    ctx.log(f"\ndata-flow stage: A = PS best ({rd.best / 'model'}), B = {df.model_b}")
    space = dataflow_space(cfg, rd.best / "model", refs[df.model_b])
    # the pool's workers hold the PS space: the data-flow stage runs on the driver's evaluator
    sctx = dataclasses.replace(ctx, rd=stage_rd, space=space, executor=None)
    records = run_generations(sctx, generations=df.generations, population=df.population)
    reference = [h for h in ps_heldout if h["index"] is None]
    reference.append({"name": "ps-best", "accuracy": ps_best["heldout"],
                      "average": ps_best["heldout_average"]})
    heldout = run_heldout(sctx, records, reference=reference)
    best = write_best(sctx, records, heldout)
    rd.set_state(stage="finishing")
    return sctx, records, heldout, best, stage_rd
