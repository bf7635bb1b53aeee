"""mergekit interchange: import mergekit YAML, export evomerge recipes as mergekit YAML.

evomerge's recipe format *is* mergekit's (``models`` / ``slices``, per-model and top-level
``parameters`` with gradients and ``{filter, value}`` lists, ``base_model``, ``dtype``,
``tokenizer_source``), so most mergekit files load as they are with :func:`load_recipe` and run
with ``evomerge merge``. This module handles the rest:

- :func:`from_mergekit` rewrites the mergekit spellings evomerge expresses differently
  (``tokenizer: {source: …}`` → ``tokenizer_source``; a ``filter: "*"`` matches everything) and
  names what evomerge cannot run (``chat_template``, ``tokenizer.tokens``, ``modules``,
  ``residual_weight``) instead of merging something else; unknown keys are named by the recipe
  validator. ``nuslerp`` / ``multislerp`` with a ``base_model`` interpolate the task vectors, as in
  mergekit (their ``base_optional`` registration).
- :func:`mergekit_issues` lists why an evomerge recipe would not give the same merge in mergekit
  (methods mergekit lacks, parameters it does not know, randomized masks, documented numerical
  differences); :func:`to_mergekit_yaml` writes the YAML with those caveats as comments, and
  raises for recipes mergekit cannot express at all (``tsv``, ``iso_c``, ``iso_cts``, weighted
  ``karcher``). Layer-dataflow recipes with input scales are not recipes of this kind; the
  search writes a note instead of a YAML for them (``evomerge.search.finish``).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, yaml_error_message
from evomerge.merge.recipe import MergeRecipe

__all__ = ["MERGEKIT_METHODS", "MERGEKIT_PARAMS", "from_mergekit", "load_recipe", "mergekit_issues", "to_mergekit_yaml"]

MERGEKIT_METHODS = frozenset({
    "linear", "slerp", "nuslerp", "passthrough", "model_stock", "karcher", "task_arithmetic", "ties",
    "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce",
    "nearswap", "multislerp", "arcee_fusion", "ram", "ramplus_tl",
})
"""Merge methods of mergekit 0.1.5 (``mergekit.merge_methods``)."""

MERGEKIT_PARAMS: dict[str, frozenset] = {k: frozenset(v) for k, v in {
    "arcee_fusion": [], "karcher": ["max_iter", "tol"], "linear": ["normalize", "weight"],
    "model_stock": ["filter_wise"], "multislerp": ["eps", "normalize_weights", "weight"], "nearswap": ["t"],
    "nuslerp": ["nuslerp_flatten", "nuslerp_row_wise", "weight"], "passthrough": ["scale"], "ram": ["epsilon"],
    "ramplus_tl": ["alpha", "epsilon", "r"], "sce": ["int8_mask", "select_topk"], "slerp": ["t"],
    **{m: ["density", "int8_mask", "lambda", "normalize", "rescale", "weight"]
       for m in ("task_arithmetic", "ties", "dare_ties", "dare_linear")},
    **{m: ["density", "gamma", "int8_mask", "lambda", "normalize", "rescale", "weight"]
       for m in ("breadcrumbs", "breadcrumbs_ties")},
    **{m: ["density", "epsilon", "int8_mask", "lambda", "normalize", "rescale", "weight"]
       for m in ("della", "della_linear")},
}.items()}
"""Parameters each mergekit 0.1.5 method accepts (it raises on any other)."""

_MERGEKIT_NOOP = {("task_arithmetic", "density"): None, ("task_arithmetic", "rescale"): None,
                  ("ties", "rescale"): False}
"""mergekit parameters evomerge lacks that change nothing (None: any value; else that value):
task_arithmetic has no sparsification in mergekit, and ``rescale: false`` is ties' default."""

_RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}
_NOT_IN_MERGEKIT_PARAMS = {"karcher": {"weight"}}


def _fix_filters(value: Any) -> Any:
    """mergekit's ``filter: "*"`` matches every tensor: drop the filter (same meaning here)."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        out = []
        for e in value:
            e = dict(e)
            if e.get("filter") == "*":
                e.pop("filter")
            if "value" in e:
                e["value"] = _fix_filters(e["value"])
            out.append(e)
        return out
    return value


def _fix_params(params: Any) -> Any:
    if isinstance(params, dict):
        return {k: _fix_filters(v) for k, v in params.items()}
    return params


def _in_folder(text: str, folder: Path) -> str:
    """``text`` (one path or several, comma-separated) with each relative path that is missing from
    the current directory but present in ``folder`` made absolute; else ``text`` unchanged."""
    parts = [t.strip() for t in text.split(",")]
    out = []
    for t in parts:
        p = Path(t).expanduser()
        moved = t and not p.is_absolute() and not p.exists() and (folder / p).exists()
        out.append(os.path.abspath(folder / p) if moved else t)
    return ", ".join(out) if out != parts else text


def resolve_path_params(d: dict, folder) -> None:
    """In a parsed recipe ``d`` (modified in place), the merge method's file parameters (``stats``
    of fisher / regmean, ``checkpoint`` of nino, ...) that name files in the recipe's ``folder``
    rather than the current directory, made absolute -- as model paths resolve."""
    from evomerge.merge.registry import get_method

    try:
        names = get_method(str(d.get("merge_method"))).path_params
    except EvomergeError:
        return  # an unknown method is reported by the recipe's own validation
    holders = [d] + [m for m in d.get("models") or [] if isinstance(m, dict)]
    for s in d.get("slices") or []:
        if isinstance(s, dict):
            holders += [s] + [src for src in s.get("sources") or [] if isinstance(src, dict)]
    for h in holders:
        params = h.get("parameters")
        if isinstance(params, dict):
            for name in names:
                if isinstance(params.get(name), str):
                    params[name] = _in_folder(params[name], Path(folder))


def from_mergekit(data: dict, source: str = "mergekit recipe", folder=None):
    """A :class:`~evomerge.merge.recipe.MergeRecipe` from a parsed mergekit YAML (see module doc).
    ``folder``: the recipe file's folder, where relative file parameters are also looked up."""
    if not isinstance(data, dict):
        raise EvomergeError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    d = copy.deepcopy(data)
    if folder is not None:
        resolve_path_params(d, folder)
    if "modules" in d:
        raise EvomergeError(f"{source}: key 'modules' (multi-module merges) is not supported; merge one module "
                            "with top-level 'models' or 'slices'")
    if "chat_template" in d:
        raise EvomergeError(f"{source}: key 'chat_template' is not supported; remove it and edit the merged "
                            "model's tokenizer_config.json instead")
    tok = d.pop("tokenizer", None)
    if tok is not None:
        if not isinstance(tok, dict):
            raise EvomergeError(f"{source}: key 'tokenizer' must be a mapping like {{source: union}}")
        extra = sorted(set(tok) - {"source"})
        if extra:
            raise EvomergeError(f"{source}: key 'tokenizer.{extra[0]}' is not supported (only 'tokenizer.source', "
                                "the same as 'tokenizer_source')")
        if d.get("tokenizer_source") not in (None, tok.get("source", "union")):
            raise EvomergeError(f"{source}: 'tokenizer.source' and 'tokenizer_source' disagree; keep one")
        d["tokenizer_source"] = tok.get("source", "union")  # mergekit's TokenizerConfig default
    for i, s in enumerate(d.get("slices") or []):
        if isinstance(s, dict) and "residual_weight" in s:
            raise EvomergeError(f"{source}: key 'slices[{i}].residual_weight' is not supported")
    method = d.get("merge_method")
    def fix(holder: dict, where: str) -> None:
        params = holder.get("parameters")
        if not isinstance(params, dict):
            return
        for (meth, p), noop in _MERGEKIT_NOOP.items():
            if meth == method and p in params:
                if noop is not None and params[p] != noop:
                    at = f"{where}.parameters" if where else "parameters"
                    raise EvomergeError(f"{source}: '{at}.{p}: {params[p]}' ({method} in mergekit) is not supported")
                params.pop(p)
        holder["parameters"] = _fix_params(params)

    fix(d, "")
    for i, m in enumerate(d.get("models") or []):
        if isinstance(m, dict):
            fix(m, f"models[{i}]")
    for i, s in enumerate(d.get("slices") or []):
        if isinstance(s, dict):
            fix(s, f"slices[{i}]")
            for j, src in enumerate(s.get("sources") or []):
                if isinstance(src, dict):
                    fix(src, f"slices[{i}].sources[{j}]")
    return MergeRecipe.from_dict(d, source)


def read_recipe_yaml(path: str | os.PathLike):
    """The parsed YAML of a recipe file; unreadable files and YAML errors are one
    :class:`EvomergeError` naming the file (and line)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EvomergeError(f"recipe file {p} not found") from None
    except IsADirectoryError:
        raise EvomergeError(f"recipe file {p} is a folder; give the YAML recipe file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"recipe file {p}: cannot read ({exc})") from None
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise EvomergeError(yaml_error_message(p, exc)) from None


def load_recipe(path: str | os.PathLike) -> MergeRecipe:
    """Read a recipe file (mergekit YAML, translated by :func:`from_mergekit`); model references stay
    as written and resolve against the file's folder (``recipe.source_dir``) too, and so do the
    method's file parameters (``stats``, ``checkpoint``: :func:`resolve_path_params`)."""
    p = Path(path)
    data = read_recipe_yaml(p)
    # through the mergekit importer: `tokenizer: {source}`, '*' filters and parameters that
    # have no effect in mergekit are translated; what cannot be expressed is named
    recipe = from_mergekit(data, source=str(p), folder=p.parent)
    recipe._recipe_dir = str(p.parent.absolute())
    return recipe


def _uses_param(recipe, name: str) -> bool:
    levels = [recipe.parameters] + [m.parameters for m in recipe.models or []]
    for s in recipe.slices or []:
        levels += [s.parameters] + [src.parameters for src in s.sources]
    return any(name in (lvl or {}) for lvl in levels)


def _values(recipe, name: str) -> list:
    out = []

    def walk(v):
        if isinstance(v, list):
            for e in v:
                walk(e["value"] if isinstance(e, dict) else e)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(float(v))

    levels = [recipe.parameters] + [m.parameters for m in recipe.models or []]
    for s in recipe.slices or []:
        levels += [s.parameters] + [src.parameters for src in s.sources]
    for lvl in levels:
        if lvl and name in lvl:
            walk(lvl[name])
    return out


def mergekit_issues(recipe) -> tuple[list[str], list[str]]:
    """``(blocking, caveats)``: why mergekit cannot run this recipe at all, and where its merge
    would differ from evomerge's (see docs/methods.md, "Where evomerge deliberately differs")."""
    from evomerge.merge.registry import get_method

    m = recipe.merge_method
    spec = get_method(m)
    blocking: list[str] = []
    caveats: list[str] = []
    if recipe.align is not None:
        blocking.append("'align' (permuting models from different initialisations into one model's coordinates) "
                        "is not a mergekit step; run `evomerge align MODELS... --out DIR` and export a recipe over "
                        "the aligned checkpoints instead")
    if m not in MERGEKIT_METHODS:
        blocking.append(f"merge_method '{m}' does not exist in mergekit")
    for p in sorted(_NOT_IN_MERGEKIT_PARAMS.get(m, ())):
        if _uses_param(recipe, p) and any(v != _values(recipe, p)[0] for v in _values(recipe, p)):
            blocking.append(f"'{m}' has no '{p}' parameter in mergekit (unequal weights cannot be expressed)")
    if m in MERGEKIT_PARAMS:
        for p in sorted(set(spec.model_params) | set(spec.global_params)):
            if p not in MERGEKIT_PARAMS[m] and p not in _NOT_IN_MERGEKIT_PARAMS.get(m, ()) and _uses_param(recipe, p):
                blocking.append(f"mergekit's '{m}' has no parameter '{p}'")
    if recipe.base_model and not spec.uses_base(True):
        caveats.append(f"'{m}' does not use base_model here; it is left out of the YAML")
    if m in _RANDOMIZED:
        caveats.append("randomized method: mergekit draws its own random masks (same distribution, different "
                       "entries); 'seed' is an evomerge key that mergekit ignores")
        caveats.append("with rescale, mergekit 0.1.5 scales the kept entries back to the task vector's L1 norm; "
                       "evomerge divides each kept entry by its keep probability (the papers' rule)")
    if m in ("breadcrumbs", "breadcrumbs_ties"):
        caveats.append("mergekit zeroes the whole task vector of tensors where floor(gamma * numel) = 0; "
                       "evomerge drops no outlier there")
    if m in ("della", "della_linear"):
        dens, eps = _values(recipe, "density") or [1.0], _values(recipe, "epsilon") or [0.15]
        if any(d < 1 and (d - e <= 0 or d + e >= 1) for d in dens for e in eps):
            caveats.append("mergekit raises unless density ± epsilon lies in (0, 1); evomerge shrinks epsilon")
    if m == "sce" and any(v < 1 for v in _values(recipe, "select_topk")):
        caveats.append("mergekit zeroes the update of tensors where floor(select_topk * #varying) = 0; "
                       "evomerge keeps one position")
    if m == "multislerp" and recipe.base_model:
        caveats.append("multislerp of task vectors: where no model changed a tensor evomerge keeps the base; "
                       "mergekit raises there when merging 3 or more models")
    if m == "model_stock":
        caveats.append("evomerge clamps a negative mean cosine to 0 (t = 0: the base); mergekit extrapolates")
    if recipe.tokenizer_source not in (None, "base"):
        caveats.append("vocabulary mapping: rows of tokens a model lacks are filled differently in mergekit")
    return blocking, caveats


def to_mergekit_yaml(recipe, *, strict: bool = True) -> str:
    """mergekit YAML for ``recipe``, its caveats as leading ``#`` comments.

    Raises :class:`EvomergeError` when mergekit cannot express the recipe (``strict``); with
    ``strict=False`` the reasons become comments too (the YAML then documents the recipe but
    mergekit will not run it as is). The base model is dropped for methods that do not use it
    (kept for ``nuslerp`` / ``multislerp``, where it selects task-vector interpolation in both).
    """
    import yaml

    blocking, caveats = mergekit_issues(recipe)
    if blocking and strict:
        raise EvomergeError("cannot export to mergekit: " + "; ".join(blocking))
    d = recipe.to_dict()
    from evomerge.merge.registry import get_method

    if d.get("base_model") and not get_method(recipe.merge_method).uses_base(True):
        d.pop("base_model")
    drop = _NOT_IN_MERGEKIT_PARAMS.get(recipe.merge_method, set())  # equal karcher weights = mergekit's
    if drop and not blocking:
        holders = [d] + list(d.get("models") or [])
        for sl in d.get("slices") or []:
            holders += [sl] + list(sl.get("sources") or [])
        for h in holders:
            for p in drop:
                (h.get("parameters") or {}).pop(p, None)
            if "parameters" in h and not h["parameters"]:
                h.pop("parameters")
    lines = [f"# NOT RUNNABLE BY MERGEKIT: {b}" for b in blocking] + [f"# note: {c}" for c in caveats]
    body = yaml.safe_dump(d, sort_keys=False, default_flow_style=None)
    return ("\n".join(lines) + "\n" if lines else "") + body
