"""The ``nino`` merge method (MetaMerge with NiNo's MLP variant), on a NiNo checkpoint the tests build
themselves (NiNo's own pickle format, random weights) and on tiny real Llama checkpoints.

The forward pass is checked against an independent float64 numpy computation written from NiNo's
description (scale per tensor, edge_proj + layer_embed, 4-layer SiLU MLP, residual, unscale).
Agreement with the NiNo authors' code itself is checked by benchmarks/nino_reference.py (it needs
their repository); docs/methods.md gives its numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.merge.methods import nino as N
from evomerge.merge.registry import get_method

sys.path.insert(0, str(Path(__file__).parent))
from _nino_net import random_state_dict  # noqa: E402

HIDDEN = 16


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict:
    """A NiNo MLP checkpoint in the published format (a pickle) and its safetensors conversion."""
    root = tmp_path_factory.mktemp("nino")
    sd = random_state_dict(hidden=HIDDEN)
    pt = root / "nino_test.pt"
    torch.save({"model_args": {"gnn": False, "hid": HIDDEN}, "state_dict": sd}, pt)
    st = root / "nino_test.safetensors"
    N.convert_checkpoint(pt, st, allow_pickle=True)
    return {"pt": pt, "st": str(st), "sd": sd}


# ----------------------------------------------------------------------------- checkpoint


def test_conversion_keeps_every_weight_and_the_shapes(ckpt):
    net = N.load_network(ckpt["st"])
    assert (net.hidden, net.horizons, len(net.mlp_weights)) == (HIDDEN, 40, 4)
    assert net.proj_weight.shape == (HIDDEN, N.CONTEXT) and net.layer_embed.shape == (15, HIDDEN)
    back = net.state_dict()
    assert set(back) == set(ckpt["sd"])
    for k, v in ckpt["sd"].items():
        assert torch.equal(back[k], v), k


def test_a_pickle_needs_the_opt_in_and_the_method_reads_safetensors_only(ckpt, tmp_path):
    with pytest.raises(EvomergeError, match="needs --allow-pickle"):
        N.convert_checkpoint(ckpt["pt"], tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(EvomergeError, match=r"not a \.safetensors file; convert .*nino-convert"):
        N.load_network(ckpt["pt"])
    gnn = tmp_path / "gnn.pt"
    torch.save({"model_args": {"gnn": True}, "state_dict": {"gnn.layer.weight": torch.zeros(1)}}, gnn)
    with pytest.raises(EvomergeError, match="GNN variant"):
        N.convert_checkpoint(gnn, tmp_path / "g.safetensors", allow_pickle=True)
    with pytest.raises(EvomergeError, match="does not exist"):
        N.load_network(tmp_path / "missing.safetensors")


def test_cli_converts_with_one_clear_error_without_the_opt_in(ckpt, tmp_path):
    from typer.testing import CliRunner

    from evomerge.cli import app

    out = tmp_path / "c.safetensors"
    res = CliRunner().invoke(app, ["nino-convert", str(ckpt["pt"]), "--out", str(out)])
    assert res.exit_code != 0 and "needs --allow-pickle" in str(res.exception) and not out.exists()
    res = CliRunner().invoke(app, ["nino-convert", str(ckpt["pt"]), "--out", str(out), "--allow-pickle"])
    assert res.exit_code == 0, res.output
    assert "hidden 16" in res.output and out.stat().st_mode & 0o044  # readable by others, like any output
    assert torch.equal(N.load_network(out).mlp_weights[-1], ckpt["sd"]["edge_mlp.fc.6.weight"])


# ----------------------------------------------------------------------------- roles, scaling, horizons


def test_edge_types_follow_nino_llama_graph():
    from _tiny_llama import tiny_config
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(tiny_config(num_layers=1))
    got = {n: N.edge_type(n, p.dim()) for n, p in model.named_parameters()}
    want = {
        "model.embed_tokens.weight": 5, "model.layers.0.self_attn.q_proj.weight": 7,
        "model.layers.0.self_attn.k_proj.weight": 8, "model.layers.0.self_attn.v_proj.weight": 9,
        "model.layers.0.self_attn.o_proj.weight": 1, "model.layers.0.mlp.gate_proj.weight": 1,
        "model.layers.0.mlp.up_proj.weight": 1, "model.layers.0.mlp.down_proj.weight": 1,
        "model.layers.0.input_layernorm.weight": 4, "model.layers.0.post_attention_layernorm.weight": 4,
        "model.norm.weight": 4, "lm_head.weight": 1,
    }
    assert got == want
    assert N.edge_type("model.layers.3.self_attn.q_norm.weight", 1) == 4  # Qwen3
    assert N.edge_type("model.layers.3.self_attn.k_proj.bias", 1) == 2  # Qwen2
    with pytest.raises(EvomergeError, match=r"'transformer.h.0.attn.c_attn.weight'.*Llama-style"):
        N.edge_type("transformer.h.0.attn.c_attn.weight", 2)


def test_scaling_is_one_mean_and_unbiased_std_per_tensor_and_round_trips():
    g = torch.Generator().manual_seed(1)
    states = 0.05 * torch.randn(40, 5, generator=g) + 0.3
    x, mean, std = N.scale_states(states)
    a = states.double().numpy()
    assert float(mean) == pytest.approx(a.mean(), rel=1e-6)
    assert float(std) == pytest.approx(a.std(ddof=1), rel=1e-6)
    np.testing.assert_allclose(x.numpy(), (a - a.mean()) / (a.std(ddof=1) + 1e-6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x * (std + N.SCALE_EPS) + mean, states)


def test_horizon_weights():
    w = N.horizon_weights(5.0, True, 40)
    assert torch.equal(w[:5], torch.full((5,), 0.2)) and w[5:].abs().sum() == 0
    w = N.horizon_weights(2.5, True, 40)
    torch.testing.assert_close(w[:3], torch.tensor([1, 1, 0.5]) / 2.5)
    w = N.horizon_weights(3.0, False, 40)
    assert w[2] == 1 and w.sum() == 1
    w = N.horizon_weights(3.25, False, 40)
    torch.testing.assert_close(w[2:4], torch.tensor([0.75, 0.25]))
    with pytest.raises(EvomergeError, match="horizon 41"):
        N.horizon_weights(41, True, 40)


def test_trajectories():
    assert N.parse_trajectory("auto", 2) == [0, 1, 2, 2, 1]
    assert N.parse_trajectory("auto", 3) == [0, 1, 2, 2, 3]
    assert N.parse_trajectory("0, 2, 1, 1, 2", 2) == [0, 2, 1, 1, 2]
    with pytest.raises(EvomergeError, match="indices in 0..2"):
        N.parse_trajectory("0,1,2,3,1", 2)
    with pytest.raises(EvomergeError, match="5 comma-separated"):
        N.parse_trajectory("0;1;2", 2)


# ----------------------------------------------------------------------------- the forward pass, independently


def _silu(z):
    return z / (1.0 + np.exp(-z))


def _numpy_prediction(sd, models, order, kind, k, scale):
    """NiNo's MLP prediction for one tensor at horizon k, written from the method's description."""
    p = {key: v.double().numpy() for key, v in sd.items()}
    traj = np.stack([models[i].double().numpy().reshape(-1) for i in order], axis=1)  # (n, 5)
    mean, std = traj.mean(), traj.std(ddof=1)
    x = (traj - mean) / (std + 1e-6)
    h = x @ p["edge_proj.fc.0.weight"].T + p["edge_proj.fc.0.bias"] + p["layer_embed.weight"][kind]
    for i in (0, 2, 4):
        h = _silu(h @ p[f"edge_mlp.fc.{i}.weight"].T + p[f"edge_mlp.fc.{i}.bias"])
    update = h @ p["edge_mlp.fc.6.weight"][k - 1] + p["edge_mlp.fc.6.bias"][k - 1]
    return (x[:, -1] + scale * update) * std + mean


@pytest.mark.parametrize("name,shape", [("model.layers.0.self_attn.q_proj.weight", (6, 4)),
                                        ("model.layers.1.post_attention_layernorm.weight", (7,))])
def test_forward_equals_an_independent_numpy_computation(ckpt, name, shape):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=g)
    tuned = [base + 0.1 * torch.randn(shape, generator=g) for _ in range(2)]
    models = [base, *tuned]
    kind = N.edge_type(name, len(shape))
    method = get_method("nino")
    for k, scale in ((1, 0.3), (7, 2.5), (40, 1.0)):
        got = method(tuned, base, tensor_name=name, checkpoint=ckpt["st"], trajectory="0,1,2,2,1",
                     horizon=float(k), average_horizons=False, update_scale=scale)
        want = _numpy_prediction(ckpt["sd"], models, [0, 1, 2, 2, 1], kind, k, scale)
        np.testing.assert_allclose(got.reshape(-1).double().numpy(), want, rtol=1e-5, atol=1e-6)
    # the mean of the predictions for k = 1..5 from the same trajectory
    got = method(tuned, base, tensor_name=name, checkpoint=ckpt["st"], chain_horizons=False)
    want = np.mean([_numpy_prediction(ckpt["sd"], models, [0, 1, 2, 2, 1], kind, k, 0.3) for k in range(1, 6)], 0)
    np.testing.assert_allclose(got.reshape(-1).double().numpy(), want, rtol=1e-5, atol=1e-6)
    # the default, chained as in the public script: each k's prediction replaces the base before the next k
    chained, preds = list(models), []
    for k in range(1, 6):
        preds.append(_numpy_prediction(ckpt["sd"], chained, [0, 1, 2, 2, 1], kind, k, 0.3))
        chained[0] = torch.from_numpy(preds[-1]).float()
    got = method(tuned, base, tensor_name=name, checkpoint=ckpt["st"])
    np.testing.assert_allclose(got.reshape(-1).double().numpy(), np.mean(preds, 0), rtol=1e-5, atol=1e-6)


def test_a_tiny_update_scale_returns_the_last_state_and_embeddings_are_averaged(ckpt):
    g = torch.Generator().manual_seed(4)
    base = torch.randn(5, 3, generator=g)
    tuned = [base + 0.1 * torch.randn(5, 3, generator=g) for _ in range(3)]
    method = get_method("nino")
    out = method(tuned, base, tensor_name="model.layers.0.mlp.up_proj.weight", checkpoint=ckpt["st"],
                 update_scale=1e-9)  # trajectory auto for 3: 0,1,2,2,3 — the last state is the third
    torch.testing.assert_close(out, tuned[2], rtol=1e-5, atol=1e-5)
    emb = method(tuned, base, tensor_name="model.embed_tokens.weight", checkpoint=ckpt["st"])
    torch.testing.assert_close(emb, sum(tuned) / 3)


# ----------------------------------------------------------------------------- recipes, engine, search


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from _tiny_llama import make_base, make_variant

    root = tmp_path_factory.mktemp("nino_fam")
    base = make_base(root / "base", num_layers=2)
    return {"base": base, **{k: make_variant(base, root / k, seed=s) for k, s in (("a", 1), ("b", 2), ("c", 3))}}


def _recipe(fam, ckpt, names=("a", "b"), **params):
    from evomerge.merge.recipe import MergeRecipe

    return MergeRecipe.from_dict({
        "merge_method": "nino", "base_model": str(fam["base"]),
        "models": [{"model": str(fam[n])} for n in names],
        "parameters": {"checkpoint": ckpt["st"], **params},
    })


def test_disk_and_in_memory_merges_are_the_same_bits_and_follow_the_method(fam, ckpt, tmp_path):
    from safetensors.torch import load_file

    from _tiny_llama import load_model
    from evomerge.merge.engine import InMemoryMerger, merge_to_disk

    rec = _recipe(fam, ckpt, names=("a", "b", "c"), horizon=3.5, update_scale=0.7)
    out = merge_to_disk(rec, tmp_path / "m")
    disk = load_file(str(out / "model.safetensors"))
    model = load_model(fam["base"])
    InMemoryMerger([fam["base"], fam["a"], fam["b"], fam["c"]]).apply(rec, model)
    mem = model.state_dict()
    srcs = [load_file(str(fam[n] / "model.safetensors")) for n in ("base", "a", "b", "c")]
    method = get_method("nino")
    for name, t in disk.items():
        assert torch.equal(t, mem[name]), name
        want = method([s[name] for s in srcs[1:]], srcs[0][name], tensor_name=name, checkpoint=ckpt["st"],
                      horizon=3.5, update_scale=0.7)
        assert torch.equal(t, want), name


def test_recipe_errors_name_the_field(fam, ckpt):
    with pytest.raises(EvomergeError, match=r"parameters.checkpoint.*string"):
        _recipe(fam, ckpt, checkpoint=3)
    with pytest.raises(EvomergeError, match=r"parameters.checkpoint.*'nope.safetensors' does not exist"):
        _recipe(fam, ckpt, checkpoint="nope.safetensors")
    with pytest.raises(EvomergeError, match=r"parameters.checkpoint.*not a .safetensors file.*nino-convert"):
        _recipe(fam, ckpt, checkpoint=str(ckpt["pt"]))
    with pytest.raises(EvomergeError, match=r"parameters.trajectory.*5 comma-separated"):
        _recipe(fam, ckpt, trajectory="0-1-2")
    with pytest.raises(EvomergeError, match=r"parameters.horizon.*\[1, 40\]"):
        _recipe(fam, ckpt, horizon=0.5)
    with pytest.raises(EvomergeError, match="at most 4"):
        from evomerge.merge.recipe import MergeRecipe

        MergeRecipe.from_dict({"merge_method": "nino", "base_model": str(fam["base"]),
                               "models": [{"model": str(fam[n])} for n in ("a", "b", "c", "a", "b")],
                               "parameters": {"checkpoint": ckpt["st"]}})


def test_search_space_genes_and_fixed_text(fam, ckpt):
    from evomerge.config import GeneSpec
    from evomerge.genome import ParameterSpace

    genes = [GeneSpec(name="update_scale", bounds=(0.1, 2.0)), GeneSpec(name="horizon", bounds=(1.0, 10.0))]
    space = ParameterSpace("nino", str(fam["base"]), [str(fam["a"]), str(fam["b"])], genes,
                           {"checkpoint": ckpt["st"], "trajectory": "0,2,1,1,2"})
    recipe = space.decode(np.full(space.dim, 0.5))
    assert recipe["parameters"]["checkpoint"] == ckpt["st"]
    assert 0.1 < recipe["parameters"]["update_scale"] < 2.0
    with pytest.raises(EvomergeError, match="'checkpoint' of nino is a string and cannot be searched"):
        ParameterSpace("nino", str(fam["base"]), [str(fam["a"]), str(fam["b"])],
                       [GeneSpec(name="checkpoint", bounds=(0.0, 1.0))], {})
