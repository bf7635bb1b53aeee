"""Layer-dataflow (DFS): genome <-> path, folding of input scales, checkpoints that load in HF."""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import torch

from evomerge.dataflow import (
    DataflowBuilder,
    DataflowError,
    DataflowPath,
    DataflowSpace,
    DataflowStep,
    build_dataflow_model,
    cumulative_scales,
    write_dataflow_checkpoint,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

LA, LB = 3, 2


def _tiny(seed: int, layers: int, eps: float = 1e-6, **kw) -> LlamaForCausalLM:
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=eps, tie_word_embeddings=False, **kw,
    )
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    # a larger init than 0.02 keeps the residual stream at a realistic size relative to eps
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return m.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dfs")
    a, b = _tiny(1, LA), _tiny(2, LB)
    a.save_pretrained(root / "a")
    b.save_pretrained(root / "b")
    return {"a": a, "b": b, "a_dir": root / "a", "b_dir": root / "b", "root": root}


IDS = torch.tensor([[1, 5, 9, 3, 7, 2, 11, 4], [8, 8, 1, 0, 3, 60, 2, 5]])


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(input_ids=IDS).logits


@torch.no_grad()
def reference_logits(path: DataflowPath, a, b) -> torch.Tensor:
    """Explicit-scale DFS forward pass over the *source* layers: h <- layer(s * h)."""
    from transformers.masking_utils import create_causal_mask

    h = a.model.embed_tokens(IDS)
    pos = torch.arange(IDS.shape[1]).unsqueeze(0)
    # the cache argument is `cache` from transformers 5.20 on, `past_key_values` before
    cache_kw = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    mask = create_causal_mask(config=a.config, inputs_embeds=h, attention_mask=None, position_ids=pos,
                              **{cache_kw: None})
    pe = a.model.rotary_emb(h, position_ids=pos)
    for st in path:
        layer = (a if st.model == "A" else b).model.layers[st.layer]
        h = layer(h * st.scale, attention_mask=mask, position_embeddings=pe, position_ids=pos)
    return a.lm_head(a.model.norm(h))


# ---------------------------------------------------------------------------- genome / path


def test_space_dims_and_initial_genome_decodes_to_a():
    sp = DataflowSpace(LA, LB, repeats=2, scale_bounds=(0.5, 2.0))
    M = LA + LB
    assert sp.num_slots == 2 * M and sp.dim == 2 * M + M * M
    x0 = sp.initial_genome()
    assert x0.shape == (sp.dim,) and np.all((x0 >= 0) & (x0 <= 1))
    assert sp.decode(x0) == DataflowPath.identity(LA)
    labels = sp.labels()
    assert len(labels) == sp.dim and labels[0] == "I[r0:A0]" and labels[M + 3] == "I[r1:B0]"
    assert labels[2 * M + 1 * M + 4] == "W[A1->B1]"
    assert DataflowSpace(LA, LB, 3, scale_mode="layer").dim == 3 * M + M
    assert DataflowSpace(LA, LB, 3, scale_bounds=None).dim == 3 * M
    assert DataflowSpace(LA, LB, 3, scale_mode="layer").decode(DataflowSpace(LA, LB, 3, scale_mode="layer").initial_genome()) == DataflowPath.identity(LA)


def test_decode_uses_w_of_previous_layer_and_encode_round_trips():
    sp = DataflowSpace(LA, LB, repeats=2, scale_bounds=(0.25, 4.0))
    rng = np.random.default_rng(0)
    for _ in range(20):
        x = rng.uniform(-0.2, 1.2, sp.dim)
        path = sp.decode(x)
        W = sp.scale_matrix(x)
        kept = sp.kept_slots(x)
        assert len(path) == len(kept) >= 1
        assert path[0].scale == 1.0
        for k in range(1, len(path)):
            i, j = kept[k - 1] % sp.num_layers, kept[k] % sp.num_layers
            assert path[k].scale == pytest.approx(W[i, j])
            assert 0.25 <= path[k].scale <= 4.0
        back = sp.decode(sp.encode(path))
        assert [(s.model, s.layer) for s in back] == [(s.model, s.layer) for s in path]
        assert np.allclose([s.scale for s in back], [s.scale for s in path], rtol=1e-12)
    # a hand-written path: B1 after A2, A0 twice (second repeat)
    p = DataflowPath([("A", 0), ("A", 2, 1.5), ("B", 1, 0.5), ("A", 0, 2.0)])
    back = sp.decode(sp.encode(p))
    assert [(s.model, s.layer) for s in back] == [(s.model, s.layer) for s in p]
    assert np.allclose([s.scale for s in back], [s.scale for s in p], rtol=1e-12)
    for bounds in ((0.3, 3.7), (0.5, 1.0), (1.0, 5.0)):
        spb = DataflowSpace(LA, LB, 2, scale_bounds=bounds)
        assert spb.decode(spb.initial_genome()) == DataflowPath.identity(LA)
    with pytest.raises(DataflowError, match="passes"):
        sp.encode(DataflowPath([("A", 2), ("A", 1), ("A", 0)]))


def test_empty_path_fallback_and_error_and_max_layers():
    sp = DataflowSpace(LA, LB, repeats=1)
    x = sp.initial_genome()
    x[: sp.num_slots] = 0.1
    x[3] = 0.4  # the "least dropped" slot: B0
    assert sp.decode(x) == DataflowPath([("B", 0)])
    with pytest.raises(DataflowError, match="empty"):
        DataflowSpace(LA, LB, 1, empty="error").decode(x)
    with pytest.raises(DataflowError, match="empty"):
        DataflowPath([])
    sp2 = DataflowSpace(LA, LB, repeats=2, max_layers=2)
    x = np.full(sp2.dim, 0.9)
    x[4] = 0.95
    x[7] = 0.99
    assert sp2.kept_slots(x) == [4, 7]
    with pytest.raises(DataflowError, match="genes"):
        sp2.decode(np.zeros(3))


def test_path_json_round_trip_and_validation(tmp_path):
    p = DataflowPath([DataflowStep("A", 0), DataflowStep("B", 1, 0.7), DataflowStep("A", 0, 1.3)])
    assert DataflowPath.from_json(p.to_json()) == p
    p.save(tmp_path / "p.json")
    assert DataflowPath.load(tmp_path / "p.json") == p
    assert json.loads(p.to_json())["steps"][1] == {"model": "B", "layer": 1, "scale": 0.7}
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(DataflowError, match="scale"):
            DataflowStep("A", 0, bad)
        with pytest.raises(DataflowError, match="scale"):
            DataflowPath.from_json(json.dumps({"steps": [{"model": "A", "layer": 0, "scale": bad}]}))
    with pytest.raises(DataflowError, match="'A' or 'B'"):
        DataflowStep("C", 0)
    with pytest.raises(DataflowError, match="bounds"):
        DataflowSpace(LA, LB, 1, scale_bounds=(0.0, 2.0))
    with pytest.raises(DataflowError, match="cumulative"):
        cumulative_scales(DataflowPath([("A", 0)] + [("A", 0, 1e4)] * 6))


# ---------------------------------------------------------------------------- materialisation


def test_identity_path_is_bit_equal_to_model_a(models):
    builder = DataflowBuilder(models["a_dir"], models["b_dir"])
    m = builder.build(DataflowPath.identity(LA))
    assert m.config.num_hidden_layers == LA
    assert torch.equal(_logits(m), _logits(models["a"]))
    # in-memory A (PS+DFS): same
    m2 = DataflowBuilder(models["a"], models["b"]).build(DataflowPath.identity(LA))
    assert torch.equal(_logits(m2), _logits(models["a"]))


def test_folded_scales_match_explicit_reference(models):
    a, b = models["a"], models["b"]
    builder = DataflowBuilder(a, b)
    path = DataflowPath([("A", 0), ("B", 0, 1.7), ("A", 1, 0.6), ("A", 1, 0.8), ("B", 1, 1.9), ("A", 2, 1.25)])
    ref = reference_logits(path, a, b)
    got = _logits(builder.build(path))
    err = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    # eps = 1e-6: the only difference is eps vs eps / C^2 inside each RMSNorm (see module doc)
    assert err <= 1e-4 * scale, (err, scale)
    # without scales the same layers give clearly different logits: the check has teeth
    plain = DataflowPath([(s.model, s.layer) for s in path])
    assert (reference_logits(plain, a, b) - ref).abs().max().item() > 100 * err


def test_folding_is_exact_up_to_rounding_when_eps_is_zero():
    a, b = _tiny(3, 2, eps=0.0), _tiny(4, 2, eps=0.0)
    path = DataflowPath([("A", 0), ("B", 1, 0.3), ("A", 1, 3.0), ("B", 0, 0.5), ("B", 0, 2.5)])
    ref = reference_logits(path, a, b)
    got = _logits(DataflowBuilder(a, b).build(path))
    assert (got - ref).abs().max().item() <= 2e-5 * ref.abs().max().item()


def test_checkpoint_with_repeated_and_b_layers_loads_from_disk(models, tmp_path):
    path = DataflowPath([("A", 0), ("A", 1, 1.5), ("B", 0, 0.7), ("A", 1, 1.2), ("B", 1, 0.9), ("A", 2)])
    out = write_dataflow_checkpoint(path, models["a_dir"], models["b_dir"], tmp_path / "dfs")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == len(path)
    assert DataflowPath.load(out) == path
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert len(loaded.model.layers) == len(path)
    in_mem = DataflowBuilder(models["a_dir"], models["b_dir"]).build(path)
    on_disk = _logits(loaded)
    assert torch.equal(on_disk, _logits(in_mem))  # same per-tensor function: bit-identical
    ref = reference_logits(path, models["a"], models["b"])
    assert (on_disk - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    # a layer used twice is an independent copy with its own KV-cache slot: generation works
    g1 = loaded.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    g2 = in_mem.generate(IDS[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(g1, g2)
    # an in-memory A (PS+DFS) writes the same checkpoint
    out2 = write_dataflow_checkpoint(path, models["a"], models["b_dir"], tmp_path / "dfs2")
    l2 = AutoModelForCausalLM.from_pretrained(out2, dtype=torch.float32).eval()
    assert torch.equal(_logits(l2), on_disk)


def test_written_checkpoint_does_not_depend_on_the_sources_header_order(models, tmp_path):
    """Sources whose safetensors headers list the tensors in another order write the same bytes:
    the output follows the sources' names (by shard file, then name), not their header order."""
    from evomerge.checkpoint import write_checkpoint

    src = {}
    for key in ("a", "b"):
        cfg = json.loads((models[f"{key}_dir"] / "config.json").read_text())
        items = sorted(models[key].state_dict().items(), key=lambda kv: kv[0], reverse=True)
        src[key] = write_checkpoint(tmp_path / key, items, cfg)
    path = DataflowPath([("A", 0), ("B", 1, 1.5), ("A", 2, 0.5), ("B", 0)])
    out = write_dataflow_checkpoint(path, src["a"], src["b"], tmp_path / "out")
    ref = write_dataflow_checkpoint(path, models["a_dir"], models["b_dir"], tmp_path / "ref")
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()


def test_candidates_share_unscaled_tensors_and_leave_sources_intact(models):
    a = models["a"]
    before = {k: v.clone() for k, v in a.state_dict().items()}
    builder = DataflowBuilder(a, models["b"])
    m = builder.build(DataflowPath([("A", 0), ("A", 0, 0.5), ("B", 1, 2.0)]))
    assert m.model.layers[0].self_attn.q_proj.weight.data_ptr() == a.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert m.model.layers[1].self_attn.o_proj.weight.data_ptr() != a.model.layers[0].self_attn.o_proj.weight.data_ptr()
    assert torch.allclose(m.model.layers[1].mlp.down_proj.weight, a.model.layers[0].mlp.down_proj.weight / 0.5)
    assert torch.allclose(m.model.layers[2].mlp.down_proj.weight, models["b"].model.layers[1].mlp.down_proj.weight)
    for k, v in a.state_dict().items():
        assert torch.equal(v, before[k])


def test_refusals(models, tmp_path):
    builder = DataflowBuilder(models["a"], models["b"])
    with pytest.raises(DataflowError, match="has 2 layers"):
        builder.build(DataflowPath([("B", 2)]))
    with pytest.raises(DataflowError, match="scale"):
        builder.build(DataflowPath([("A", 0), {"model": "A", "layer": 1, "scale": -0.5}]))
    other = _tiny(5, 2, eps=1e-5)
    with pytest.raises(DataflowError, match="rms_norm_eps"):
        DataflowBuilder(models["a"], other)
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(DataflowError, match="not supported"):
        DataflowBuilder(gpt2)


def test_one_shot_build_and_tied_embeddings(tmp_path):
    a = _tiny(6, 2)
    a.config.tie_word_embeddings = True
    a = LlamaForCausalLM(a.config).eval()
    a.save_pretrained(tmp_path / "t")
    m = build_dataflow_model(DataflowPath([("A", 1), ("A", 0, 1.5)]), tmp_path / "t")
    assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
    out = write_dataflow_checkpoint(DataflowPath([("A", 1), ("A", 0, 1.5)]), tmp_path / "t", None, tmp_path / "o")
    l = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(l), _logits(m))


@torch.no_grad()
def test_eps_is_the_only_difference():
    """Reference with each RMSNorm's eps set to eps * C_k^2 equals the folded model to rounding:
    the residual mismatch of the plain reference is entirely the eps effect."""
    a, b = _tiny(7, 2, eps=1e-5), _tiny(8, 2, eps=1e-5)
    with torch.no_grad():  # default-size init: a small stream (ms ~ 4e-4) makes eps matter
        for m in (a, b):
            for p in m.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, 0.02)
    path = DataflowPath([("A", 0), ("B", 1, 0.4), ("A", 1, 0.5), ("B", 0, 3.0)])
    got = _logits(DataflowBuilder(a, b).build(path))
    plain_err = (got - reference_logits(path, a, b)).abs().max().item()
    norms = []
    for st, c in zip(path, cumulative_scales(path)):
        layer = (a if st.model == "A" else b).model.layers[st.layer]
        norms += [(layer.input_layernorm, c), (layer.post_attention_layernorm, c)]
    norms.append((a.model.norm, cumulative_scales(path)[-1]))
    saved = [n.variance_epsilon for n, _ in norms]
    try:
        for n, c in norms:
            n.variance_epsilon = 1e-5 * c * c
        corrected_err = (got - reference_logits(path, a, b)).abs().max().item()
    finally:
        for (n, _), e in zip(norms, saved):
            n.variance_epsilon = e
    assert plain_err > 1e-4
    assert corrected_err < 1e-6 and corrected_err < plain_err / 100, (plain_err, corrected_err)


def test_qwen2_layer_types_follow_the_path(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def q(seed):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                          sliding_window=4, max_window_layers=1, tie_word_embeddings=False)
        return Qwen2ForCausalLM(cfg).eval()

    a, b = q(1), q(2)
    assert a.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    path = DataflowPath([("A", 0), ("B", 1, 1.3), ("A", 0, 0.8), ("B", 2)])
    out = write_dataflow_checkpoint(path, tmp_path / "a", tmp_path / "b", tmp_path / "o")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["layer_types"] == ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert loaded.config.layer_types == cfg["layer_types"]
    in_mem = DataflowBuilder(a, b).build(path)
    assert in_mem.config.layer_types == cfg["layer_types"]
    assert torch.equal(_logits(loaded), _logits(in_mem))


def test_half_precision_sources(models):
    a16 = _tiny(1, LA).to(torch.bfloat16)
    m = DataflowBuilder(a16, models["b"]).build(DataflowPath.identity(LA))
    assert m.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(m), _logits(a16))
    m2 = DataflowBuilder(a16, models["b"]).build(DataflowPath([("A", 0), ("B", 1, 0.5)]))
    assert m2.model.layers[1].mlp.down_proj.weight.dtype == torch.bfloat16  # B cast to A's dtype
    # B in bf16 under a float32 A: cast before folding, on disk and in memory alike
    b16_dir = models["root"] / "b16"
    if not b16_dir.exists():
        copy.deepcopy(models["b"]).to(torch.bfloat16).save_pretrained(b16_dir)
    p = DataflowPath([("A", 0), ("B", 1, 0.7), ("A", 2, 1.3)])
    out = write_dataflow_checkpoint(p, models["a_dir"], b16_dir, models["root"] / "mixed")
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert torch.equal(_logits(loaded), _logits(DataflowBuilder(models["a_dir"], b16_dir).build(p)))
    f16 = _tiny(1, LA).to(torch.float16)
    with pytest.raises(DataflowError, match="overflows"):
        DataflowBuilder(f16).build(DataflowPath([("A", 0), ("A", 1, 1e-6)]))
