"""MergeRecipe: mergekit-style YAML in and out, parameter settings, field-named errors."""

import pytest

from evomerge.errors import EvomergeError
from evomerge.merge.mergekit_io import load_recipe
from evomerge.merge.recipe import MergeRecipe, evaluate_setting

TIES = """
models:
  - model: /m/a
    parameters: {weight: 0.6, density: 0.5}
  - model: /m/b
    parameters:
      weight: [0.2, 0.8]
      density:
        - filter: self_attn
          value: 0.3
        - value: 0.7
  - model: /m/base
merge_method: ties
base_model: /m/base
parameters: {lambda: 1.0, normalize: true}
dtype: bf16
"""


def test_round_trip_yaml():
    r = MergeRecipe.from_yaml(TIES)
    assert r.dtype == "bfloat16" and r.merge_method == "ties"
    assert r.model_paths() == ["/m/base", "/m/a", "/m/b"]
    again = MergeRecipe.from_yaml(r.to_yaml())
    assert again == r
    assert "seed" not in r.to_yaml()
    assert "seed: 4" in r.model_copy(update={"seed": 4}).to_yaml()


def test_slices_round_trip(tmp_path):
    y = """
slices:
  - sources:
      - {model: /m/a, layer_range: [0, 2]}
  - sources:
      - {model: /m/b, layer_range: [1, 3]}
merge_method: passthrough
"""
    p = tmp_path / "r.yaml"
    p.write_text(y)
    r = load_recipe(p)
    assert r.slices[1].sources[0].layer_range == (1, 3)
    assert MergeRecipe.from_yaml(r.to_yaml()).to_dict() == r.to_dict()


def test_evaluate_setting():
    assert evaluate_setting(0.5, "x", 0.3) == 0.5
    assert evaluate_setting([0.0, 1.0, 2.0], "x", 0.75) == pytest.approx(1.5)
    assert evaluate_setting([0.0, 1.0], "x", None) == 0.0  # non-layer tensors: first value
    assert evaluate_setting([4.0], "x", 0.9) == 4.0
    cond = [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 5}]
    assert evaluate_setting(cond, "model.layers.3.mlp.up_proj.weight", 0.5) == 0.5
    assert evaluate_setting(cond, "model.layers.3.self_attn.q_proj.weight", 0.5) == 5
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "attn", 0.5) is None


@pytest.mark.parametrize("edit,msg", [
    (("lambda: 1.0", "lamda: 1.0"), "field 'parameters.lamda': unknown parameter 'lamda'; ties accepts"),
    (("merge_method: ties", "merge_method: tiez"), "unknown merge_method 'tiez'; known methods"),
    (("dtype: bf16", "dtyp: bf16"), "unknown key 'dtyp'"),
    (("dtype: bf16", "dtype: int3"), "field 'dtype': unknown dtype 'int3'"),
    (("{weight: 0.6, density: 0.5}", "{weight: 0.6, densty: 0.5}"), "field 'models[0].parameters.densty': unknown parameter"),
    (("{weight: 0.6, density: 0.5}", "{density: 0.5}"), "field 'models[0].parameters.weight': model '/m/a' needs parameter 'weight'"),
    (("{weight: 0.6, density: 0.5}", "{weight: 0.6, normalize: true}"), "'normalize' is a method-level parameter"),
    (("weight: [0.2, 0.8]", "weight: [0.2, x]"), "field 'models[1].parameters'"),
    (("base_model: /m/base", ""), "field 'base_model': merge_method 'ties' needs a base_model"),
    (("    parameters: {weight: 0.6, density: 0.5}", "    layer_range: [0, 2]"), "use 'slices' for layer ranges"),
])
def test_errors_name_the_field(edit, msg):
    bad = TIES.replace(*edit)
    assert bad != TIES
    with pytest.raises(EvomergeError) as e:
        MergeRecipe.from_yaml(bad, source="r.yaml")
    assert msg in str(e.value)
    assert str(e.value).startswith("r.yaml: ")


def test_model_count_and_required_global():
    with pytest.raises(EvomergeError, match="takes exactly 1 model.* besides the base_model, got 2"):
        MergeRecipe.from_yaml("merge_method: slerp\nbase_model: a\nmodels: [a, b, c]\nparameters: {t: 0.5}")
    with pytest.raises(EvomergeError, match="field 'parameters.t': slerp needs parameter 't'"):
        MergeRecipe.from_yaml("merge_method: slerp\nbase_model: a\nmodels: [a, b]")
    with pytest.raises(EvomergeError, match="exactly one of 'models' or 'slices'"):
        MergeRecipe.from_yaml("merge_method: linear")
    with pytest.raises(EvomergeError, match="same number of layers"):
        MergeRecipe.from_yaml("merge_method: linear\nparameters: {weight: 1}\nslices:\n- sources:\n  - {model: a, layer_range: [0, 2]}\n  - {model: b, layer_range: [0, 3]}")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(EvomergeError, match="recipe file .* not found"):
        load_recipe(tmp_path / "none.yaml")
    (tmp_path / "x.yaml").write_text("merge_method: [unclosed")
    with pytest.raises(EvomergeError, match="not valid YAML"):
        load_recipe(tmp_path / "x.yaml")
    (tmp_path / "y.yaml").write_text("- a\n- b\n")
    with pytest.raises(EvomergeError, match="expected a mapping"):
        load_recipe(tmp_path / "y.yaml")
