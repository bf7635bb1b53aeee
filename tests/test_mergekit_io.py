"""mergekit interchange: import mergekit YAML (gradients, filters, slices), export round trips."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import EvomergeError
from evomerge.merge.engine import InMemoryMerger, merge_to_disk
from evomerge.merge.mergekit_io import MERGEKIT_PARAMS, from_mergekit, load_recipe, mergekit_issues, to_mergekit_yaml
from evomerge.merge.recipe import MergeRecipe
from evomerge.merge.registry import get_method, method_names

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_llama import load_model, make_base, make_variant  # noqa: E402

ATTN = "model.layers.{}.self_attn.q_proj.weight"
MLP = "model.layers.{}.mlp.up_proj.weight"
MERGEKIT_TOP = {"models", "slices", "merge_method", "base_model", "dtype", "out_dtype", "tokenizer_source",
                "parameters", "seed", "name"}  # mergekit 0.1.5 MergeConfiguration fields (+ two it ignores)


# tiny matrices: LAPACK / BLAS threads only wait on each other on a busy 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base = make_base(root / "base")  # 4 layers
    return {"root": root, "base": base, "a": make_variant(base, root / "a", seed=1),
            "b": make_variant(base, root / "b", seed=2)}


def state(path):
    r = CheckpointReader(path)
    return {n: r.get(n).float() for n in r.tensor_names()}


def mk(fam, text: str) -> dict:
    for k in ("base", "a", "b"):
        text = text.replace("{" + k + "}", str(fam[k]))
    return yaml.safe_load(text)


GRADIENT = """
models:
  - model: {a}
    parameters:
      weight: [1.0, 0.0]
  - model: {b}
    parameters:
      weight: [0.0, 1.0]
merge_method: linear
dtype: float32
"""


# ----------------------------------------------------------------------------- import


def test_import_layer_gradient(fam, tmp_path):
    out = merge_to_disk(from_mergekit(mk(fam, GRADIENT)), tmp_path / "o")
    s, sa, sb = state(out), state(fam["a"]), state(fam["b"])
    torch.testing.assert_close(s[ATTN.format(0)], sa[ATTN.format(0)])  # t = 0
    torch.testing.assert_close(s[ATTN.format(3)], sb[ATTN.format(3)])  # t = 1
    n = ATTN.format(1)  # t = 1/3: weights 2/3, 1/3
    torch.testing.assert_close(s[n], (2 * sa[n] + sb[n]) / 3)
    torch.testing.assert_close(s["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # first value


def test_import_runs_with_evomerge_merge_cli(fam, tmp_path):
    f = tmp_path / "mergekit.yaml"
    f.write_text(yaml.safe_dump(mk(fam, GRADIENT)))
    p = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(f), "--out", str(tmp_path / "o"), "-q"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    cli, ref = state(tmp_path / "o"), dict(InMemoryMerger([fam["a"], fam["b"]]).merged_tensors(load_recipe(f)))
    assert all(torch.equal(cli[n], ref[n]) for n in ref)


def test_merge_cli_ends_without_teardown_yet_prints_everything(fam, tmp_path):
    # `evomerge merge` run as a program ends with os._exit after success: the status, the message
    # (stdout is a pipe here, so block-buffered) and the output folder must all still be there
    f = tmp_path / "mergekit.yaml"
    f.write_text(yaml.safe_dump(mk(fam, GRADIENT)))
    p = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(f), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("merged (") and str(tmp_path / "o") in p.stdout
    assert (tmp_path / "o" / "model.safetensors").exists()


FILTERS = """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters:
      weight:
        - filter: self_attn
          value: 1.0
        - value: 0.0
  - model: {b}
    parameters:
      weight:
        - filter: mlp
          value: [0.0, 1.0]
        - filter: "*"
          value: 0.0
parameters:
  lambda: 1.0
"""


def test_import_filters_and_star(fam):
    r = from_mergekit(mk(fam, FILTERS))
    got = dict(InMemoryMerger([fam["base"], fam["a"], fam["b"]]).merged_tensors(r))
    s0, sa, sb = state(fam["base"]), state(fam["a"]), state(fam["b"])
    torch.testing.assert_close(got[ATTN.format(2)], sa[ATTN.format(2)])
    torch.testing.assert_close(got[MLP.format(3)], sb[MLP.format(3)])
    torch.testing.assert_close(got[MLP.format(0)], s0[MLP.format(0)])
    torch.testing.assert_close(got["model.norm.weight"], s0["model.norm.weight"])  # '*' -> 0 for b, a -> 0


def test_star_filter_through_plain_recipe(fam):
    r = MergeRecipe.from_dict(mk(fam, FILTERS))
    got = dict(InMemoryMerger([fam["base"], fam["a"], fam["b"]]).merged_tensors(r))
    ref = dict(InMemoryMerger([fam["base"], fam["a"], fam["b"]]).merged_tensors(from_mergekit(mk(fam, FILTERS))))
    assert all(torch.equal(got[n], ref[n]) for n in ref)


SLICES = """
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
merge_method: passthrough
dtype: float32
"""

SLICES_SLERP = """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
merge_method: slerp
base_model: {base}
parameters:
  t:
    - filter: self_attn
      value: [0.0, 0.5, 1.0]
    - value: 0.5
dtype: float32
"""


def test_import_slices_frankenmerge_and_slerp(fam, tmp_path):
    out = merge_to_disk(from_mergekit(mk(fam, SLICES)), tmp_path / "o")
    s, sa, sb = state(out), state(fam["a"]), state(fam["b"])
    assert CheckpointReader(out).num_layers == 6
    torch.testing.assert_close(s[ATTN.format(2)], sa[ATTN.format(2)])
    torch.testing.assert_close(s[ATTN.format(3)], sb[ATTN.format(1)])
    model = load_model(out)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    got = dict(InMemoryMerger([fam["base"], fam["a"]]).merged_tensors(from_mergekit(mk(fam, SLICES_SLERP))))
    s0 = state(fam["base"])
    torch.testing.assert_close(got[ATTN.format(0)], s0[ATTN.format(0)])  # t = 0 at the first layer
    torch.testing.assert_close(got[ATTN.format(3)], sa[ATTN.format(3)])  # t = 1 at the last


def test_tokenizer_block_becomes_tokenizer_source(fam):
    d = mk(fam, GRADIENT)
    d["tokenizer"] = {"source": "base"}
    assert from_mergekit(d).tokenizer_source == "base"


@pytest.mark.parametrize("extra,key", [
    ({"chat_template": "chatml"}, "chat_template"),
    ({"tokenizer": {"source": "union", "tokens": {"<x>": {"source": "a"}}}}, "tokenizer.tokens"),
    ({"tokenizer": {"source": "union", "pad_to_multiple_of": 64}}, "tokenizer.pad_to_multiple_of"),
    ({"modules": {"text": {}}}, "modules"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_unsupported_keys_are_named(fam, extra, key):
    d = {**mk(fam, GRADIENT), **extra}
    with pytest.raises(EvomergeError, match=key.replace(".", r"\.")):
        from_mergekit(d)


def test_unsupported_nested_keys_and_methods_are_named(fam, tmp_path):
    d = mk(fam, SLICES)
    d["slices"][0]["residual_weight"] = 0.5
    with pytest.raises(EvomergeError, match=r"slices\[0\]\.residual_weight"):
        from_mergekit(d)
    d = mk(fam, GRADIENT)
    d["models"][0]["lora"] = "x"
    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(d))
    with pytest.raises(EvomergeError, match=r"models\[0\]\.lora"):  # the `evomerge merge` path names it too
        load_recipe(f)
    with pytest.raises(EvomergeError, match="unknown merge_method 'arcee_fusion'"):
        from_mergekit({**mk(fam, GRADIENT), "merge_method": "arcee_fusion"})


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_base_optional_methods_with_base_model_import_and_export(fam, method):
    """mergekit's nuslerp / multislerp with a base_model (task-vector mode, the base listed among the
    models as mergekit users often do) import, merge as task vectors, and export with the base."""
    base, a, b = str(fam["base"]), str(fam["a"]), str(fam["b"])
    d = {"merge_method": method, "base_model": base,
         "models": [{"model": a, "parameters": {"weight": 0.6}}, {"model": b, "parameters": {"weight": 0.2}},
                    {"model": base, "parameters": {"weight": 1.0}}],
         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True} if method == "nuslerp" else {}}
    r = from_mergekit(d)
    text = to_mergekit_yaml(r)
    assert "left out" not in text and "NOT RUNNABLE" not in text
    assert ("no model changed" in text) == (method == "multislerp")
    data = yaml.safe_load(text)
    assert data["base_model"] == base and data["models"] == d["models"]
    assert from_mergekit(data).to_dict() == r.to_dict()
    m = InMemoryMerger([fam["base"], fam["a"], fam["b"]])
    got = dict(m.merged_tensors(r))
    no_base = from_mergekit({**d, "base_model": None, "models": d["models"][:2]})
    free = dict(m.merged_tensors(no_base))
    assert any(not torch.equal(got[n], free[n]) for n in got)  # the base changes the merge


# ----------------------------------------------------------------------------- export


def _nino_checkpoint(fam) -> str:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _nino_net import write_safetensors

    path = Path(fam["base"]).parent / "nino.safetensors"
    return str(path) if path.exists() else write_safetensors(path)


def _stats_files(fam, kind: str) -> str:
    """Made-up statistics of the right shapes for fam's models a and b (ones; identity Grams)."""
    from safetensors.torch import load_file

    from evomerge.stats import write_stats

    paths = []
    for model in ("a", "b"):
        path = Path(fam["base"]).parent / f"{kind}_{model}.safetensors"
        if not path.exists():
            sd = load_file(str(Path(fam[model]) / "model.safetensors"))
            stats = {n: torch.ones(t.shape) for n, t in sd.items()} if kind == "fisher" else {
                n: torch.eye(t.shape[1]) for n, t in sd.items() if t.dim() == 2 and "embed" not in n}
            write_stats(path, sorted(stats.items()), kind, {"model": str(fam[model])})
        paths.append(str(path))
    return ",".join(paths)


def _search_recipes(fam) -> list[dict]:
    """Recipes as a parameter-space search decodes them, for every method (genes = all numeric params)."""
    from evomerge.config import GeneSpec
    from evomerge.genome import ParameterSpace

    out = []
    rng = np.random.default_rng(0)
    for name in method_names():
        spec = get_method(name)
        endpoints = [str(fam["a"]), str(fam["b"])][:min(spec.max_models or 2, 2)]
        genes, fixed = [], {}
        if name == "nino":  # its meta-network's weights: a string parameter, never a gene
            fixed["checkpoint"] = _nino_checkpoint(fam)
        if name in ("fisher", "regmean"):  # statistics files, one per model
            fixed["stats"] = _stats_files(fam, "fisher" if name == "fisher" else "gram")
        for p, v in {**spec.model_params, **spec.global_params}.items():
            if spec.param_kind(p) != "number":
                continue
            if p in ("int8_mask", "normalize", "rescale", "filter_wise", "nuslerp_row_wise", "nuslerp_flatten",
                     "normalize_weights", "max_iter", "tol", "eps", "svd"):
                continue
            lo, hi = {"t": (0.01, 1.0), "rank_fraction": (0.1, 1.0), "epsilon": (0.001, 0.1),
                      "horizon": (1.0, 5.0)}.get(p, (0.1, 1.0))
            genes.append(GeneSpec(name=p, bounds=(lo, hi), layer_groups=2 if p == "weight" else 1,
                                  filter="self_attn" if p == "density" else None))
            if p == "density":
                genes.append(GeneSpec(name=p, bounds=(lo, hi)))
        if not genes:
            continue
        space = ParameterSpace(name, str(fam["base"]), endpoints, genes, fixed)
        out.append(space.decode(rng.uniform(size=space.dim)))
    return out


def test_export_round_trips_for_every_method(fam):
    recipes = [from_mergekit(mk(fam, t)) for t in (GRADIENT, FILTERS, SLICES, SLICES_SLERP)]
    recipes += [MergeRecipe.from_dict(d) for d in _search_recipes(fam)]
    assert {r.merge_method for r in recipes} >= set(method_names()) - {"model_stock"}  # no numeric gene there
    for r in recipes:
        again = MergeRecipe.from_yaml(r.to_yaml())
        assert again.to_dict() == r.to_dict(), r.merge_method
        blocking, _ = mergekit_issues(r)
        if blocking:
            with pytest.raises(EvomergeError, match="cannot export to mergekit"):
                to_mergekit_yaml(r)
            assert "NOT RUNNABLE BY MERGEKIT" in to_mergekit_yaml(r, strict=False)
            continue
        text = to_mergekit_yaml(r)
        data = yaml.safe_load(text)
        assert set(data) <= MERGEKIT_TOP, set(data) - MERGEKIT_TOP
        accepted = MERGEKIT_PARAMS[r.merge_method]  # what mergekit 0.1.5 takes (it raises on others)
        assert set(data.get("parameters") or {}) <= accepted
        for m in data.get("models") or []:
            assert set(m) <= {"model", "parameters"}
            assert set(m.get("parameters") or {}) <= accepted, (r.merge_method, m)
        back = from_mergekit(data)
        want = r.to_dict()
        if not get_method(r.merge_method).uses_base(True):
            want.pop("base_model", None)
        if r.merge_method == "karcher":  # equal weights are mergekit's (uniform) karcher: stripped
            for m in want["models"]:
                m.pop("parameters", None)
        assert back.to_dict() == want, r.merge_method


def test_export_merges_identically(fam):
    r = MergeRecipe.from_dict(next(d for d in _search_recipes(fam) if d["merge_method"] == "dare_ties"))
    back = from_mergekit(yaml.safe_load(to_mergekit_yaml(r)))
    m = InMemoryMerger([fam["base"], fam["a"], fam["b"]])
    one, two = dict(m.merged_tensors(r)), dict(m.merged_tensors(back))
    assert all(torch.equal(one[n], two[n]) for n in one)


def test_export_says_where_it_cannot(fam):
    base, a, b = str(fam["base"]), str(fam["a"]), str(fam["b"])
    tsv = MergeRecipe.from_dict({"merge_method": "tsv", "base_model": base, "models": [{"model": a}, {"model": b}]})
    with pytest.raises(EvomergeError, match="'tsv' does not exist in mergekit"):
        to_mergekit_yaml(tsv)
    kar = MergeRecipe.from_dict({"merge_method": "karcher", "models": [{"model": a, "parameters": {"weight": 1.0}},
                                                                        {"model": b, "parameters": {"weight": 3.0}}]})
    with pytest.raises(EvomergeError, match="no 'weight' parameter"):
        to_mergekit_yaml(kar)
    dare = MergeRecipe.from_dict({"merge_method": "dare_ties", "base_model": base, "seed": 3,
                                  "models": [{"model": a, "parameters": {"weight": 1.0, "density": 0.5}}]})
    assert "random masks" in to_mergekit_yaml(dare)
    lin = MergeRecipe.from_dict({"merge_method": "linear", "base_model": base,
                                 "models": [{"model": a, "parameters": {"weight": 1.0}},
                                            {"model": b, "parameters": {"weight": 1.0}}]})
    text = to_mergekit_yaml(lin)  # linear ignores a base_model: written without it, and said so
    assert "base_model" not in yaml.safe_load(text) and "left out" in text
    nus = MergeRecipe.from_dict({**lin.to_dict(), "merge_method": "nuslerp"})
    text = to_mergekit_yaml(nus)  # nuslerp uses it (task vectors), in mergekit too: kept
    assert yaml.safe_load(text)["base_model"] == base and "left out" not in text


def test_import_mergekit_only_noop_parameters(fam):
    d = {"merge_method": "ties", "base_model": str(fam["base"]), "parameters": {"rescale": False},
         "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    assert "rescale" not in from_mergekit(d).parameters  # ties' default in mergekit: no effect
    d["parameters"]["rescale"] = True
    with pytest.raises(EvomergeError, match=r"'parameters\.rescale: True' \(ties in mergekit\)"):
        from_mergekit(d)
    ta = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
          "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.3}}]}
    assert "density" not in from_mergekit(ta).models[0].parameters  # mergekit ignores it there too


def test_export_karcher_equal_weights_strips_them(fam):
    r = MergeRecipe.from_dict({"merge_method": "karcher", "models": [
        {"model": str(fam["a"]), "parameters": {"weight": 0.5}}, {"model": str(fam["b"]), "parameters": {"weight": 0.5}}]})
    data = yaml.safe_load(to_mergekit_yaml(r))
    assert all("parameters" not in m for m in data["models"])


def test_exports_validate_in_mergekit_itself(fam):
    """With mergekit installed: every exportable recipe parses as a mergekit MergeConfiguration and
    names only parameters mergekit's method spec declares (skipped without mergekit)."""
    mk_config = pytest.importorskip("mergekit.config")
    try:
        from mergekit.merge_methods.registry import get as mk_get
    except ImportError:
        pytest.skip("mergekit without the method registry API of 0.1.5")
    recipes = [from_mergekit(mk(fam, t)) for t in (GRADIENT, FILTERS, SLICES, SLICES_SLERP)]
    recipes += [MergeRecipe.from_dict(d) for d in _search_recipes(fam)]
    for r in recipes:
        if mergekit_issues(r)[0]:
            continue
        data = yaml.safe_load(to_mergekit_yaml(r))
        cfg = mk_config.MergeConfiguration.model_validate(data)
        names = {p.name for p in mk_get(cfg.merge_method).spec.parameters}
        used = set(cfg.parameters or {})
        for m in cfg.models or []:
            used |= set(m.parameters or {})
        assert used <= names, (r.merge_method, used - names)


def test_every_method_works_as_a_search_space(fam):
    """Each method's numeric parameters as genes: the decoded recipes merge (finite) in memory."""
    m = InMemoryMerger([fam["base"], fam["a"], fam["b"]])
    for d in _search_recipes(fam):
        r = MergeRecipe.from_dict(d)
        for n, t in m.merged_tensors(r):
            assert torch.isfinite(t).all(), (r.merge_method, n)
