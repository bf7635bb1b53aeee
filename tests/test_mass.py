"""MASS routing (issue 15, item 4) on the zoo's real fine-tunes: the router picks the task whose
subspace a feature lies in; routing to every task is tensor-equal to the ``tsv`` merge; a saved
routed model answers as the in-memory one; bad settings are refused naming the file and field."""

from __future__ import annotations

import json

import pytest
import torch

from _bad_input import run_cli
from evomerge.errors import EvomergeError
from evomerge.routing.router import (
    RoutingSettings,
    default_routing_tensor,
    relative_residuals,
    route_probabilities,
    select_tasks,
)

TASKS = ("lang", "cipher", "upper")
PROMPTS = ["say 572=", "say 53577=", "enc vwr=", "enc uexmr=", "up ctx=", "up see="]


@pytest.fixture(scope="module")
def factors(zoo):
    """The zoo experts' factors, computed on one thread: the SVD's last bits depend on the thread
    count, and the tensor-equality test compares with the engine run on one thread."""
    from evomerge.routing.factors import factors_from_checkpoints

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return factors_from_checkpoints(zoo.base, {f"{t}_expert": zoo.model(t) for t in TASKS})
    finally:
        torch.set_num_threads(before)


def _routed(zoo, factors, **settings):
    from evomerge.backends.hf import HFEvaluator
    from evomerge.routing.model import RoutedModel

    s = RoutingSettings(default_routing_tensor(4), **settings)
    return RoutedModel(factors, s, HFEvaluator(zoo.base, num_threads=1))


def test_router_picks_the_subspace_a_feature_lies_in(factors):
    basis = factors.routing_basis(default_routing_tensor(4))  # (T, k, n), rows orthonormal per task
    torch.manual_seed(0)
    for t in range(len(TASKS)):
        z = torch.randn(5, basis.shape[1]) @ basis[t]  # five features inside task t's subspace
        resid = relative_residuals(z, basis)
        assert torch.all(resid[:, t] < 1e-4)
        assert torch.all(resid.argmin(dim=1) == t)
        picks = select_tasks(route_probabilities(resid, 1.0, True), 0.2, None)
        assert picks == [(t,)] * 5
    # a mix of two subspaces selects both; max_tasks and the at-least-one rule
    z = basis[0, :1] + basis[2, :1]
    probs = route_probabilities(relative_residuals(z, basis), 1.0, True)
    assert select_tasks(probs, 0.2, None) == [(0, 2)]
    assert select_tasks(probs, 0.2, 1) == [(int(probs.argmax()),)]
    assert select_tasks(probs, 1.0, None) == [(int(probs.argmax()),)]


def test_routing_to_every_task_equals_the_tsv_merge(zoo, factors, one_thread):
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe

    recipe = MergeRecipe.from_dict({"merge_method": "tsv", "base_model": str(zoo.base),
                                    "models": [{"model": str(zoo.model(t))} for t in TASKS]})
    tsv = dict(InMemoryMerger(recipe).merged_tensors(recipe))
    model = _routed(zoo, factors, threshold=0.0, max_tasks=None)
    model.generate(PROMPTS, 8)
    names = tuple(f"{t}_expert" for t in TASKS)
    assert model.last_routes == [names] * len(PROMPTS)
    state = model.evaluator.model.state_dict()
    assert set(tsv) == set(state)
    for name, t in tsv.items():
        assert torch.equal(state[name], t), name
    # one task alone: the base plus that task vector's rank-k truncation
    single = model.merged(["cipher_expert"])
    name = "model.layers.1.self_attn.q_proj.weight"
    u, s, vh = factors.factors["cipher_expert"][name]
    assert torch.allclose(single[name], factors.base[name] + u @ torch.diag(s) @ vh, atol=1e-5)
    assert not torch.allclose(single[name], tsv[name], atol=1e-3)


def test_saved_routed_model_round_trips(zoo, factors, one_thread, tmp_path, capsys, monkeypatch):
    from evomerge.routing import load_routed

    code, out = run_cli(["route", *(f"zoo:{t}" for t in TASKS), "--base", "zoo:base", "--out",
                         str(tmp_path / "routed"), "-q"], capsys)
    assert code == 0, out
    loaded = load_routed(tmp_path / "routed", num_threads=1)
    direct = _routed(zoo, factors)
    assert loaded.tasks == direct.tasks == [f"{t}_expert" for t in TASKS]
    assert loaded.generate(PROMPTS, 8) == direct.generate(PROMPTS, 8)
    assert loaded.last_routes == direct.last_routes
    # each task subset is merged once: a second call computes no merge
    calls = []
    merge = direct.factors.merge
    monkeypatch.setattr(direct.factors, "merge", lambda subset: calls.append(tuple(subset)) or merge(subset))
    direct.clear_cache()
    direct.generate(PROMPTS, 8)
    assert sorted(calls) == sorted({tuple(direct.tasks), *direct.last_routes})
    direct.generate(PROMPTS, 8)
    assert len(calls) == len({tuple(direct.tasks), *direct.last_routes})
    # the router sends each zoo prompt to (at least) its own expert
    for prompt, route in zip(PROMPTS, loaded.last_routes):
        own = {"say": "lang_expert", "enc": "cipher_expert", "up": "upper_expert"}[prompt.split()[0]]
        assert own in route, (prompt, route)
    reqs = [("enc vwr=", " cvk"), ("enc vwr=", " abc")]
    assert loaded.loglikelihoods(reqs).tolist() == direct.loglikelihoods(reqs).tolist()
    # evomerge eval runs the folder and reports the routing
    code, out = run_cli(["eval", str(tmp_path / "routed"), "--task", "zoo:cipher", "--limit", "10",
                         "--json", str(tmp_path / "e.json")], capsys)
    assert code == 0, out
    doc = json.loads((tmp_path / "e.json").read_text())
    assert abs(sum(doc["routing"]["cipher"].values()) - 1.0) < 1e-9
    assert "cipher_expert" in next(iter(doc["routing"]["cipher"]))
    # per-task adapters (evomerge metamerge) do not apply to a routed model
    code, out = run_cli(["eval", str(tmp_path / "routed"), "--task", "zoo:cipher", "--adapters", str(tmp_path)], capsys)
    assert code == 2 and "is a routed model" in out and "--adapters" in out, out


def test_bad_routing_settings_are_refused(zoo, one_thread, tmp_path, capsys):
    from evomerge.routing import load_routed
    from evomerge.routing.disk import save_routed

    out = tmp_path / "routed"
    save_routed(out, zoo.base, [zoo.model(t) for t in TASKS], RoutingSettings(default_routing_tensor(4)))
    record = json.loads((out / "routing.json").read_text())
    record["routing"]["threshold"] = 2
    (out / "routing.json").write_text(json.dumps(record))
    with pytest.raises(EvomergeError, match=r"routing\.json.*threshold 2: must be a number in \[0, 1\]"):
        load_routed(out)
    # a norm weight has no singular vectors to route on: refused before anything is written
    code, msg = run_cli(["route", "zoo:lang", "zoo:cipher", "--base", "zoo:base", "--out", str(tmp_path / "r2"),
                         "--routing-tensor", "model.norm.weight"], capsys)
    assert code == 2 and "model.norm.weight" in msg and "not a matrix" in msg
    assert not (tmp_path / "r2").exists()
    code, msg = run_cli(["route", "zoo:lang", "zoo:cipher", "--base", "zoo:base", "--out", str(tmp_path / "r2"),
                         "--threshold", "2"], capsys)
    assert code == 2 and "--threshold 2" in msg and not (tmp_path / "r2").exists()
    code, msg = run_cli(["eval", str(out), "--task", "zoo:lang", "--backend", "vllm"], capsys)
    assert code == 2 and "routed model" in msg and "--backend hf" in msg


def test_evomerge_merge_of_a_mass_recipe_writes_the_routed_folder(zoo, one_thread, tmp_path, capsys):
    # `merge_method: mass` through `evomerge merge` writes the folder `evomerge route` writes (same
    # settings, same factors), with relative model paths read from the recipe's folder
    import os

    from safetensors.torch import load_file

    models = tmp_path / "models"
    models.mkdir()
    for name, path in [("base", zoo.base), *((f"{t}_expert", zoo.model(t)) for t in TASKS[:2])]:
        os.symlink(path, models / name)
    recipe = tmp_path / "mass.yaml"
    recipe.write_text("merge_method: mass\nbase_model: models/base\nmodels:\n  - model: models/lang_expert\n"
                      "  - model: models/cipher_expert\nparameters:\n  threshold: 0.3\n  max_tasks: 1\n")
    code, out = run_cli(["merge", str(recipe), "--out", str(tmp_path / "via_merge")], capsys)
    assert code == 0 and "routed model (mass) over 2 tasks" in out, out
    code, out = run_cli(["route", str(models / "lang_expert"), str(models / "cipher_expert"), "--base",
                         str(models / "base"), "--out", str(tmp_path / "via_route"), "--threshold", "0.3",
                         "--max-tasks", "1", "-q"], capsys)
    assert code == 0, out
    a = json.loads((tmp_path / "via_merge" / "routing.json").read_text())
    b = json.loads((tmp_path / "via_route" / "routing.json").read_text())
    assert a["routing"] == b["routing"] and a["tasks"] == b["tasks"] == ["lang_expert", "cipher_expert"]
    assert a["routing"]["threshold"] == 0.3 and a["routing"]["max_tasks"] == 1
    fa, fb = (load_file(str(tmp_path / d / "factors.safetensors")) for d in ("via_merge", "via_route"))
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    # bad fields are named, nothing is written
    for body, want in [("parameters:\n  threshold: 2\n", "parameters.threshold"),
                       ("parameters:\n  temprature: 2\n", "unknown key 'temprature'"),
                       ("parameters:\n  routing_tensor: model.norm.weight\n", "parameters.routing_tensor")]:
        recipe.write_text("merge_method: mass\nbase_model: models/base\nmodels:\n  - model: models/lang_expert\n"
                          "  - model: models/cipher_expert\n" + body)
        code, msg = run_cli(["merge", str(recipe), "--out", str(tmp_path / "bad")], capsys)
        assert code == 2 and want in msg and "mass.yaml" in msg, (body, msg)
        assert not (tmp_path / "bad").exists()
    recipe.write_text("merge_method: mass\nbase_model: models/base\nmodels:\n  - model: models/lang_expert\n")
    code, msg = run_cli(["merge", str(recipe), "--out", str(tmp_path / "bad")], capsys)
    assert code == 2 and "models" in msg and "at least 2" in msg, msg
