"""Fisher merging and RegMean, and the statistics they read (``evomerge stats``), on tiny real models.

References: equal Fishers give the plain mean; RegMean on a linear layer equals the least-squares
solution numpy computes from the same inputs; the Gram matrices equal ``Xᵀ X`` of inputs captured
independently; the Fisher equals squared per-item gradients recomputed with torch.autograd.grad.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.registry import get_method
from evomerge.merge.methods.stat_weighted import regmean_linear
from evomerge.stats import open_stats, write_stats

sys.path.insert(0, str(Path(__file__).parent))


def _stats_file(path: Path, kind: str, tensors: dict) -> str:
    write_stats(path, sorted(tensors.items()), kind, {"model": "test", "task": "test"})
    return str(path)


# ----------------------------------------------------------------------------- the formulas


def test_fisher_with_equal_fishers_is_the_plain_mean_and_weights_weigh(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(4, 3, generator=g) for _ in range(3)]
    same = torch.rand(4, 3, generator=g) + 0.1
    files = ",".join(_stats_file(tmp_path / f"f{i}.safetensors", "fisher", {"w": same}) for i in range(3))
    fisher = get_method("fisher")
    out = fisher(ts, None, tensor_name="w", stats=files, weight=[1.0, 1.0, 1.0])
    torch.testing.assert_close(out, sum(ts) / 3)
    out = fisher(ts, None, tensor_name="w", stats=files, weight=[2.0, 1.0, 1.0])
    torch.testing.assert_close(out, (2 * ts[0] + ts[1] + ts[2]) / 4)
    # unequal Fishers: each entry leans to the model that is sure of it
    f0 = torch.full((4, 3), 100.0)
    files = ",".join([_stats_file(tmp_path / "big.safetensors", "fisher", {"w": f0}),
                      _stats_file(tmp_path / "small.safetensors", "fisher", {"w": torch.full((4, 3), 1.0)})])
    out = fisher(ts[:2], None, tensor_name="w", stats=files, weight=[1.0, 1.0], epsilon=1e-10)
    torch.testing.assert_close(out, (100 * ts[0] + ts[1]) / 101)


def test_regmean_equals_numpy_least_squares_on_the_same_inputs():
    rng = np.random.default_rng(1)
    d_in, d_out = 6, 4
    xs = [rng.normal(size=(n, d_in)) for n in (20, 35)]
    ws = [rng.normal(size=(d_out, d_in)) for _ in xs]
    # least squares: one W whose outputs match every model's outputs on its own inputs
    x_all = np.concatenate(xs)
    y_all = np.concatenate([x @ w.T for x, w in zip(xs, ws)])
    want = np.linalg.lstsq(x_all, y_all, rcond=None)[0].T
    grams = [torch.from_numpy(x.T @ x) for x in xs]
    got = regmean_linear([torch.from_numpy(w).float() for w in ws], grams, alpha=1.0)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)
    # α = 0 keeps only the diagonals: a per-input-feature weighted mean of the columns
    got0 = regmean_linear([torch.from_numpy(w).float() for w in ws], grams, alpha=0.0)
    dg = [np.diag(g.numpy()) for g in grams]
    np.testing.assert_allclose(got0.double().numpy(), (ws[0] * dg[0] + ws[1] * dg[1]) / (dg[0] + dg[1]),
                               rtol=1e-5, atol=1e-6)


def test_regmean_averages_tensors_without_a_gram(tmp_path):
    g = torch.Generator().manual_seed(2)
    ts = [torch.randn(5, generator=g) for _ in range(2)]
    files = ",".join(_stats_file(tmp_path / f"g{i}.safetensors", "gram", {"lin.weight": torch.eye(3)})
                     for i in range(2))
    out = get_method("regmean")(ts, None, tensor_name="model.norm.weight", stats=files, alpha=0.9)
    torch.testing.assert_close(out, (ts[0] + ts[1]) / 2)


# ----------------------------------------------------------------------------- the statistics, on a real model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from _tiny_llama import load_model, make_base

    root = tmp_path_factory.mktemp("stats")
    return load_model(make_base(root / "m", num_layers=2))


def _seqs():
    from evomerge.stats.collect import Sequences

    return Sequences([([1, 5, 9, 4], [7, 3]), ([1, 8, 2], [6, 6, 11]), ([1, 4], [2])], "test")


def test_grams_equal_x_transpose_x_of_independently_captured_inputs(tiny):
    from evomerge.stats.collect import input_grams

    grams = input_grams(tiny, _seqs(), batch_size=2)  # batches with padding
    assert "lm_head.weight" in grams and "model.layers.1.mlp.down_proj.weight" in grams
    want = torch.zeros(tiny.config.hidden_size, tiny.config.hidden_size, dtype=torch.float64)
    with torch.no_grad():
        for ctx, label in _seqs().pairs:
            out = tiny(input_ids=torch.tensor([ctx + label]), output_hidden_states=True)
            h = out.hidden_states[-1][0].double()  # lm_head's input: the final normed hidden states
            want += h.t() @ h
    torch.testing.assert_close(grams["lm_head.weight"].double(), want, rtol=1e-5, atol=1e-5)


def test_fisher_equals_squared_per_item_gradients(tiny):
    from evomerge.stats.collect import fisher_diagonal

    fisher = fisher_diagonal(tiny, _seqs())
    p = dict(tiny.named_parameters())["model.layers.0.mlp.up_proj.weight"]
    want = torch.zeros_like(p)
    for ctx, label in _seqs().pairs:
        logits = tiny(input_ids=torch.tensor([ctx + label])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        ll = sum(logp[len(ctx) - 1 + j, t] for j, t in enumerate(label))
        (grad,) = torch.autograd.grad(ll, p)
        want += grad ** 2
    torch.testing.assert_close(fisher["model.layers.0.mlp.up_proj.weight"], want / 3, rtol=1e-4, atol=1e-10)
    assert all(p.grad is None for p in tiny.parameters())


# ----------------------------------------------------------------------------- the command and the recipes


def _run(args):
    from typer.testing import CliRunner

    from evomerge.cli import app

    return CliRunner().invoke(app, args)


def test_stats_never_read_the_answers_and_merge_through_recipes(zoo, tmp_path):
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe

    task = tmp_path / "lang_wrong_answers"
    shutil.copytree(zoo.task_dir("lang"), task)
    rows = [json.loads(line) for line in (task / "search.jsonl").read_text().splitlines()]
    (task / "search.jsonl").write_text("".join(json.dumps({**r, "answer": "zz"}) + "\n" for r in rows))
    files = {}
    for name, where in (("lang", "zoo:lang"), ("lang_wrong", str(task)), ("cipher", "zoo:cipher")):
        for kind in ("fisher", "gram"):
            out = tmp_path / f"{kind}_{name}.safetensors"
            res = _run(["stats", "zoo:" + name.split("_")[0], "--task", where, "--kind", kind, "--out", str(out),
                        "--limit", "6"])
            assert res.exit_code == 0, res.output
            files[kind, name] = out
    for kind in ("fisher", "gram"):
        a, b = open_stats(files[kind, "lang"], kind), open_stats(files[kind, "lang_wrong"], kind)
        assert a.names() == b.names()
        for n in a.names():
            assert torch.equal(a.get(n), b.get(n)), n  # the answers changed, the statistics did not
    assert open_stats(files["fisher", "lang"]).meta["items"] == "6"

    merger = InMemoryMerger([zoo.model("lang"), zoo.model("cipher")])
    for method, kind in (("fisher", "fisher"), ("regmean", "gram")):
        rec = MergeRecipe.from_dict({"merge_method": method, "models": [{"model": "zoo:lang"}, {"model": "zoo:cipher"}],
                                     "parameters": {"stats": f"{files[kind, 'lang']},{files[kind, 'cipher']}"}})
        merged = dict(merger.merged_tensors(rec))
        assert all(torch.isfinite(t).all() for t in merged.values())
    # errors: the wrong kind, a missing file, one file for two models
    with pytest.raises(EvomergeError, match=r"parameters.stats.*holds 'gram' statistics, this needs 'fisher'"):
        MergeRecipe.from_dict({"merge_method": "fisher", "models": [{"model": "zoo:lang"}, {"model": "zoo:cipher"}],
                               "parameters": {"stats": f"{files['gram', 'lang']},{files['gram', 'cipher']}"}})
    with pytest.raises(EvomergeError, match=r"parameters.stats.*'nope.safetensors' does not exist"):
        MergeRecipe.from_dict({"merge_method": "regmean", "models": [{"model": "zoo:lang"}, {"model": "zoo:cipher"}],
                               "parameters": {"stats": "nope.safetensors"}})
    rec = MergeRecipe.from_dict({"merge_method": "regmean", "models": [{"model": "zoo:lang"}, {"model": "zoo:cipher"}],
                                 "parameters": {"stats": str(files["gram", "lang"])}})
    with pytest.raises(EvomergeError, match="1 file.*for 2 model"):
        dict(merger.merged_tensors(rec))


def test_stats_command_errors(tmp_path):
    res = _run(["stats", "zoo:lang", "--task", "zoo:lang", "--kind", "hessian", "--out", str(tmp_path / "x.safetensors")])
    assert res.exit_code != 0 and "--kind 'hessian'" in str(res.exception)
    res = _run(["stats", "zoo:lang", "--task", "zoo:lang", "--kind", "gram", "--out", str(tmp_path / "x.pt")])
    assert res.exit_code != 0 and ".safetensors" in str(res.exception)
    assert not list(tmp_path.iterdir())


def test_recipe_file_finds_its_stats_files_next_to_it(tmp_path, monkeypatch):
    # `evomerge merge recipes/fisher.yaml` from another folder: the stats files named relative to
    # the recipe are found there, as its model paths are; a file of that name in the current
    # folder is taken first (as for models), and an absent file is still one clear error
    import yaml

    from evomerge.merge.mergekit_io import load_recipe

    folder = tmp_path / "recipes"
    folder.mkdir()
    for i in range(2):
        _stats_file(folder / f"f{i}.safetensors", "fisher", {"w": torch.ones(2, 2)})
    (folder / "fisher.yaml").write_text(yaml.safe_dump({
        "merge_method": "fisher", "models": [{"model": "zoo:lang"}, {"model": "zoo:cipher"}],
        "parameters": {"stats": "f0.safetensors, f1.safetensors"}}))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rec = load_recipe(folder / "fisher.yaml")
    assert rec.parameters["stats"] == f"{folder / 'f0.safetensors'}, {folder / 'f1.safetensors'}"
    _stats_file(elsewhere / "f1.safetensors", "fisher", {"w": torch.ones(2, 2)})
    rec = load_recipe(Path("..") / "recipes" / "fisher.yaml")
    assert rec.parameters["stats"] == f"{folder / 'f0.safetensors'}, f1.safetensors"
    (folder / "f0.safetensors").unlink()
    with pytest.raises(EvomergeError, match=r"parameters.stats.*'f0.safetensors' does not exist"):
        load_recipe(folder / "fisher.yaml")
