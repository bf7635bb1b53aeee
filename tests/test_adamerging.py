"""AdaMerging on the zoo: it starts from (and can reproduce) task arithmetic, its recipe encodes the
learned coefficients exactly, and the entropy it minimises goes down."""

from __future__ import annotations

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.learned.adamerging import AdaMergingResult, adamerge, coefficient_group


def _prompts(zoo, per_task=6):
    from evomerge.tasks import load_task_dir

    out = []
    for t in ("lang", "cipher"):
        task = load_task_dir(zoo.task_dir(t), "search")
        out += task.prompts(task.items[:per_task])
    return out


def _merged(zoo, recipe: dict) -> dict[str, torch.Tensor]:
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe

    m = InMemoryMerger([zoo.base, zoo.model("lang"), zoo.model("cipher")])
    return dict(m.merged_tensors(MergeRecipe.from_dict(recipe)))


def test_coefficient_groups():
    assert coefficient_group("model.layers.3.mlp.up_proj.weight", 4, "layer") == 3
    assert coefficient_group("model.embed_tokens.weight", 4, "layer") == 4
    assert coefficient_group("lm_head.weight", 4, "layer") == 4
    assert coefficient_group("model.layers.3.mlp.up_proj.weight", 4, "task") == 0


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_zero_steps_is_task_arithmetic(zoo, granularity):
    models = [zoo.model("lang"), zoo.model("cipher")]
    res = adamerge(zoo.base, models, _prompts(zoo, 2), granularity=granularity, init=[0.7, 1.1], steps=0)
    assert len(res.entropy) == 1
    got = _merged(zoo, res.recipe(zoo.base, models))
    want = _merged(zoo, {"merge_method": "task_arithmetic", "base_model": str(zoo.base),
                         "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(models, (0.7, 1.1))]})
    for n in want:
        assert torch.equal(got[n], want[n]), n


def test_the_recipe_encodes_every_layer_coefficient(zoo):
    from safetensors.torch import load_file

    models = [zoo.model("lang"), zoo.model("cipher")]
    n_layers = 4
    lam = torch.tensor([[0.1, 0.5, 0.9, 1.3, 0.7], [1.2, 0.8, 0.4, 0.0, 0.3]])
    got = _merged(zoo, AdaMergingResult(lam, [], "layer").recipe(zoo.base, models))
    base = load_file(str(zoo.base / "model.safetensors"))
    tuned = [load_file(str(m / "model.safetensors")) for m in models]
    for n, b in base.items():
        g = coefficient_group(n, n_layers, "layer")
        want = b + sum(float(lam[k, g]) * (t[n] - b) for k, t in enumerate(tuned))
        torch.testing.assert_close(got[n], want, rtol=1e-6, atol=1e-6)


def test_entropy_goes_down_and_the_command_writes_a_recipe(zoo, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    res = adamerge(zoo.base, [zoo.model("lang"), zoo.model("cipher")], _prompts(zoo), granularity="layer",
                   steps=4, lr=0.02)
    assert len(res.entropy) == 5 and res.entropy[-1] < res.entropy[0]
    assert not torch.equal(res.coefficients, torch.ones_like(res.coefficients))
    out = tmp_path / "ada.yaml"
    r = CliRunner().invoke(app, ["adamerge", "--base", "zoo:base", "-m", "zoo:lang", "-m", "zoo:cipher",
                                 "-t", "zoo:lang", "-t", "zoo:cipher", "--out", str(out), "--steps", "1",
                                 "--prompts", "2", "--granularity", "task"])
    assert r.exit_code == 0, r.output
    recipe = yaml.safe_load(out.read_text())
    assert recipe["merge_method"] == "task_arithmetic" and len(recipe["models"]) == 2
    r = CliRunner().invoke(app, ["adamerge", "--base", "zoo:base", "-m", "zoo:lang", "-t", "zoo:lang",
                                 "--out", str(tmp_path / "x.yaml"), "--granularity", "row"])
    assert r.exit_code != 0 and "--granularity 'row'" in str(r.exception)
    assert not (tmp_path / "x.yaml").exists()
    with pytest.raises(EvomergeError, match="needs task prompts"):
        adamerge(zoo.base, [zoo.model("lang")], [], steps=0)
