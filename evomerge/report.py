"""The report of a run: markdown summary and PNG plots, drawn from the run directory alone.

``evomerge report RUN_DIR`` redraws it at any time (also mid-run, from what is logged).
Plots: best / mean estimated fitness per generation; estimated vs true (held-out) accuracy of
the re-evaluated candidates; the best recipe's genes (per-layer values as lines); the Pareto
front for multi-objective runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from evomerge.errors import EvomergeError
from evomerge.search.rundir import RunDir, atomic_write_text, read_jsonl


def _fitness(r: dict) -> float:
    f = r["fitness"]
    return float(np.mean(f)) if isinstance(f, list) else float(f)


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)


def write_report(run_dir: str | Path | RunDir) -> Path:
    """Write report.md and the PNG plots into the run directory; returns report.md's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rd = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    if not rd.exists():
        raise EvomergeError(f"{rd.root}: not a run directory (no config.yaml)")
    cfg = yaml.safe_load(rd.config.read_text())
    evals = read_jsonl(rd.evaluations)
    md = [f"# evomerge run `{rd.root.name}`", ""]
    md.append(f"- models: base `{cfg['models']['base']}`, endpoints "
              + ", ".join(f"`{e}`" for e in cfg["models"]["endpoints"]))
    ss = cfg["search_space"]
    md.append(f"- search space: {ss['kind']} / {ss['method'] if ss['kind'] != 'dataflow' else 'layer dataflow'}"
              f"; optimizer {cfg['optimizer']['name']}"
              f" ({cfg['optimizer']['sampler'] if cfg['optimizer']['name'] == 'optuna' else 'cmaes'})")
    fit = cfg["fitness"]
    md.append(f"- fitness: {fit['estimator']}"
              + ("" if fit["estimator"] == "full" else f" on {fit['anchors']} items per task"
                 if fit["estimator"] == "auto" else _anchors_text(fit)) + f", aggregate {fit['aggregate']}"
              + ("; the procedure per task chosen on the calibration models (see Item banks)"
                 if fit["estimator"] == "auto" else ""))
    md.append(f"- stage: {rd.state().get('stage')}; {len(evals)} candidates evaluated, "
              f"{sum(r.get('items', 0) for r in evals)} items answered")
    md.append("")
    md += _banks_section(rd)
    md += _stage(rd, rd, "", plt)
    dfs = RunDir(rd.root / "dfs")
    if (dfs.root / "evaluations.jsonl").exists():
        md += ["# Data-flow stage (model A = the parameter-space best)", ""]
        md += _stage(rd, dfs, "dfs_", plt)
    atomic_write_text(rd.report, "\n".join(md) + "\n")
    return rd.report


def _stage(rd: RunDir, st: RunDir, prefix: str, plt) -> list[str]:
    """Sections and plots of one search stage (files in ``st``, plots named ``prefix*.png``)."""
    import json

    from evomerge.search.racing import merged_records

    racing = read_jsonl(st.racing) if st.racing.exists() else []
    evals = merged_records(read_jsonl(st.evaluations), racing, phases=("race",))
    held = read_jsonl(st.heldout)
    best = json.loads((st.best / "recipe.json").read_text()) if (st.best / "recipe.json").exists() else None
    md: list[str] = []
    if evals:
        md += _search_section(rd, st, evals, racing, prefix, plt)
        if isinstance(evals[0]["fitness"], list):
            md += _pareto_section(rd, evals, prefix, plt)
    if held:
        md += _heldout_section(rd, held, prefix, plt)
    where = st.root.relative_to(rd.root).as_posix() + "/" if st.root != rd.root else ""
    if best and "steps" in best["recipe"]:
        md += _best_path_section(best, where)
    elif best:
        md += _best_recipe_section(rd, best, where, prefix, plt)
    return md


def _search_section(rd: RunDir, st: RunDir, evals: list[dict], racing: list[dict], prefix: str, plt) -> list[str]:
    """Best-so-far and mean estimated fitness per generation (plot and table), the mean time per
    candidate and the racing / convergence lines."""
    gens = sorted({r["generation"] for r in evals})
    best_so_far, mean_gen, running = [], [], -np.inf
    for g in gens:
        f = [_fitness(r) for r in evals if r["generation"] == g]
        running = max(running, max(f))
        best_so_far.append(running)
        mean_gen.append(float(np.mean(f)))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = [g + 1 for g in gens]
    ax.plot(x, best_so_far, marker="o", label="best so far")
    ax.plot(x, mean_gen, marker=".", label="generation mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("estimated fitness")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, rd.root / f"{prefix}fitness.png")
    plt.close(fig)
    md = ["## Search", "", f"![fitness per generation]({prefix}fitness.png)", "",
          "| generation | best so far | mean |", "|---:|---:|---:|"]
    state = st.state()
    done = state.get("generation")  # generations completed (told to the optimizer)
    rows = [str(g) for g in x]
    if state.get("stage") == "searching" and done is not None and gens[-1] >= done:
        k = sum(1 for r in evals if r["generation"] == gens[-1])
        rows[-1] += f" (in progress: {k} candidate{'s' if k != 1 else ''} so far)"
    md += [f"| {g} | {b:.4f} | {m:.4f} |" for g, b, m in zip(rows, best_so_far, mean_gen)]
    md.append("")
    t_merge = np.mean([r["timings"]["merge_s"] for r in evals])
    t_eval = np.mean([r["timings"]["eval_s"] for r in evals])
    md += [f"Mean time per candidate: merge {t_merge:.3f} s, evaluation {t_eval:.3f} s.", ""]
    md += _contest_lines(evals, racing, st.state())
    return md


def _pareto_section(rd: RunDir, evals: list[dict], prefix: str, plt) -> list[str]:
    """The Pareto front of a two-objective run: plot and table."""
    from evomerge.search.selection import pareto_front

    tasks = list(evals[0]["estimates"])
    front = pareto_front(evals)
    fig, ax = plt.subplots(figsize=(4.5, 4))
    allf = np.array([r["fitness"] for r in evals])
    ff = np.array([r["fitness"] for r in front])
    ax.scatter(allf[:, 0], allf[:, 1], s=8, alpha=0.4, label="candidates")
    ax.scatter(ff[:, 0], ff[:, 1], s=20, color="C3", label="Pareto front")
    ax.set_xlabel(f"estimated {tasks[0]}")
    ax.set_ylabel(f"estimated {tasks[1]}")
    ax.legend()
    _save(fig, rd.root / f"{prefix}pareto.png")
    plt.close(fig)
    md = ["## Pareto front", "", f"![Pareto front]({prefix}pareto.png)", "",
          "| candidate | " + " | ".join(tasks) + " |",
          "|---:|" + "---:|" * len(tasks)]
    md += [f"| {r['index']} | " + " | ".join(f"{v:.3f}" for v in r["fitness"]) + " |"
           for r in front]
    md.append("")
    return md


def _heldout_section(rd: RunDir, held: list[dict], prefix: str, plt) -> list[str]:
    """True (held-out) accuracy of the re-evaluated models, the gain over the baselines, and
    the estimated-vs-true plot."""
    tasks = list(held[0]["accuracy"])
    md = ["## Held-out accuracy (true)", "",
          "| model | " + " | ".join(tasks) + " | average | estimated average |",
          "|---|" + "---:|" * (len(tasks) + 2)]
    for h in held:
        est = h.get("estimated")
        est_s = f"{np.mean(list(est.values())):.3f}" if est else "—"
        if est and h.get("estimate_error") is not None:
            est_s += f" ± {h['estimate_error']:.3f} ({h['items']} items)"
        md.append(f"| {h['name']} | " + " | ".join(f"{h['accuracy'][t]:.3f}" for t in tasks)
                  + f" | {h['average']:.3f} | {est_s} |")
    md.append("")
    from evomerge.search.baselines import describe_gain, gain_over_baselines

    gain = gain_over_baselines(held)
    if gain is not None:
        md += [describe_gain(gain)[0].upper() + describe_gain(gain)[1:] + ". The default merges (`baseline:`) "
               "are task arithmetic at weights 1 and 1/K, TIES and DARE-TIES at density 0.5 and weight 1, "
               "and the linear average of the endpoints.", ""]
    cands = [h for h in held if h.get("estimated")]
    if cands:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        for i, t in enumerate(tasks):
            ax.scatter([h["estimated"][t] for h in cands], [h["accuracy"][t] for h in cands],
                       label=t, color=f"C{i}")
        lo = min(min(h["estimated"].values()) for h in cands)
        lo = min(lo, min(min(h["accuracy"].values()) for h in cands))
        ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("estimated accuracy (search items)")
        ax.set_ylabel("true accuracy (held-out items)")
        ax.legend(fontsize=8)
        _save(fig, rd.root / f"{prefix}estimated_vs_true.png")
        plt.close(fig)
        md += [f"![estimated vs true]({prefix}estimated_vs_true.png)", ""]
    return md


def _best_path_section(best: dict, where: str) -> list[str]:
    """The best data-flow path: one row per layer step (files under ``where``)."""
    steps = best["recipe"]["steps"]
    md = ["## Best data-flow path", "",
          f"Candidate {best['index']} (generation {best['generation']}), held-out "
          f"average {best['heldout_average']:.3f}; {len(steps)} layers. Files: "
          f"`{where}best/recipe.json`, `{where}best/model/` (scales folded into o_proj and "
          "down_proj; loads with AutoModelForCausalLM).", "",
          "| step | model | layer | input scale |", "|---:|---|---:|---:|"]
    md += [f"| {k} | {s_['model']} | {s_['layer']} | {s_['scale']:.3f} |"
           for k, s_ in enumerate(steps)]
    md.append("")
    return md


def _best_recipe_section(rd: RunDir, best: dict, where: str, prefix: str, plt) -> list[str]:
    """The best parameter-space recipe: its genes (table and per-layer plot)."""
    md = ["## Best recipe", "",
          f"Candidate {best['index']} (generation {best['generation']}), held-out "
          f"average {best['heldout_average']:.3f}. Files: `{where}best/recipe.json`, "
          f"`{where}best/recipe.mergekit.yaml`, `{where}best/model/`.", "",
          "| gene | values (first layer → last layer) |", "|---|---|"]
    md += [f"| {k} | " + ", ".join(f"{v:.3f}" for v in vals) + " |"
           for k, vals in best["genes"].items()]
    md.append("")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (k, vals) in enumerate(best["genes"].items()):
        if len(vals) == 1:
            ax.plot([0, 1], [vals[0]] * 2, label=k, color=f"C{i % 10}")
        else:
            ax.plot(np.linspace(0, 1, len(vals)), vals, marker="o", label=k, color=f"C{i % 10}")
    ax.set_xlabel("relative layer position (0 = first, 1 = last)")
    ax.set_ylabel("parameter value")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _save(fig, rd.root / f"{prefix}best_genes.png")
    plt.close(fig)
    md += [f"![genes of the best recipe]({prefix}best_genes.png)", ""]
    return md


def _contest_lines(evals: list[dict], racing: list[dict], state: dict) -> list[str]:
    """Racing (candidates asked more items, per stage), the finalists' sharpening and what
    happened when the search converged."""
    md = []
    per_stage: dict[int, int] = {}
    for r in evals:
        for s_ in r.get("stages", [])[1:]:
            per_stage[s_["stage"]] = per_stage.get(s_["stage"], 0) + 1
    if per_stage:
        md.append("Racing: contenders asked more items — "
                  + ", ".join(f"stage {k}: {v} candidates" for k, v in sorted(per_stage.items()))
                  + f" of {len(evals)}; {sum(r['items'] for r in evals):,} items answered in the generations.")
    final = [x for x in racing if x.get("phase") == "final"]
    if final:
        md.append(f"Finalists: {len(final)} candidates re-scored on {final[0]['items']:,} items before the "
                  "held-out stage; the top-k re-evaluated were picked by those estimates, distinct recipes where the "
                  "run had them (final.min_distance).")
    for ev in state.get("convergence", []):
        md.append(f"Converged after generation {ev['generation']} ({ev['reason']}): {ev['action']}.")
    return md + [""] if md else []


def _banks_section(rd: RunDir) -> list[str]:
    """The item banks and the expected error of the fitness estimates they give."""
    import json

    from safetensors import safe_open

    from evomerge.search.banks import describe_procedure

    paths = sorted(rd.banks.glob("*.bank.safetensors")) if rd.banks.exists() else []
    if not paths:
        return []
    md = ["## Item banks", "",
          "| task | d | calibration models | expected error of the estimate | bias | plain mean of random items "
          "| sd of true accuracies |", "|---|---:|---:|---:|---:|---:|---:|"]
    procs: list[str] = []  # fitness.estimator: auto
    for p in paths:
        with safe_open(str(p), framework="numpy") as f:
            meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        c = meta.get("estimate_check")
        n_sub = meta.get("quality", {}).get("n_subjects", "—")
        cells = ([f"{c['mae']:.3f} ({c['n']} items)", f"{c['bias']:+.3f}", f"{c['plain_mean_mae']:.3f}",
                  f"{c['accuracy_sd']:.3f}"] if c else ["—"] * 4)
        md.append(f"| {p.name.removesuffix('.bank.safetensors')} | {meta.get('dim', '—')} | {n_sub} | "
                  + " | ".join(cells) + " |")
        if describe_procedure(meta.get("procedure")):
            procs.append(f"- {p.name.removesuffix('.bank.safetensors')}: {describe_procedure(meta['procedure'])}")
    md += ["", "Expected error: mean |estimate − accuracy on all search items| of the fitness procedure, "
           "cross-fitted on the sampled calibration models (4 folds; each fold's bank sees 3/4 of them, so "
           "slightly pessimistic). Where it is large next to the differences between the candidates that "
           "matter, raise `calibration.samples`.", ""]
    if procs:
        md += ["Few-item procedure per task (`fitness.estimator: auto`: chosen by the same cross-fit among "
               "the candidates, the default kept unless beaten by more than one standard error; another "
               "procedure's error is the smallest of the candidates', so slightly optimistic):", "", *procs, ""]
    return md


def _anchors_text(fit: dict) -> str:
    r = int(fit.get("rounds", 1))
    if r > 1:
        return (f" on {fit['anchors']} items per task asked adaptively in {r} rounds (round 1: "
                f"{fit['anchor_method']} anchors; later rounds chosen per candidate)")
    return f" on {fit['anchors']} {fit['anchor_method']} anchors per task"
