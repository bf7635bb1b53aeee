"""Alignment of models from different initialisations (issue 15, first part): the permutation
symmetries of a Llama-style decoder leave the logits unchanged; Git Re-Basin recovers a known
permutation bit-exactly; C²M³'s maps are cycle-consistent and recover the identity merge of
permuted copies; ``evomerge align`` end to end on tiny real checkpoints."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from _bad_input import run_cli
from _tiny_llama import make_base, tiny_config
from evomerge.align.c2m3 import c2m3
from evomerge.align.matching import squared_distance, weight_matching
from evomerge.align.symmetries import (
    check_permutations,
    compose,
    identity_permutations,
    invert,
    llama_layout,
    permute_model,
    random_permutations,
)
from evomerge.errors import EvomergeError

TOKENS = torch.tensor([[1, 5, 9, 33, 2, 70, 12, 4, 8, 40], [3, 3, 91, 17, 60, 5, 0, 22, 11, 6]])


def _model(seed: int = 0, tie: bool = False):
    """A tiny GQA Llama (4 query heads, 2 kv heads, 2 layers) with random, non-trivial norms."""
    from transformers import LlamaForCausalLM

    cfg = tiny_config(num_layers=2)
    cfg.tie_word_embeddings = tie
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    tensors = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return model, tensors, llama_layout(cfg.to_dict(), {n: t.shape for n, t in tensors.items()})


def _logits(model, tensors=None):
    if tensors is not None:
        model.load_state_dict(tensors)
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.fixture(scope="module")
def tiny():
    return _model()


@pytest.mark.parametrize("groups", [["residual"], ["mlp.0"], ["mlp.1"], ["attention.0"], ["attention.1"], None])
def test_each_symmetry_leaves_the_logits_unchanged(tiny, groups):
    model, tensors, layout = tiny
    before = _logits(model, tensors)
    perms = random_permutations(layout, torch.Generator().manual_seed(7), groups)
    check_permutations(perms, layout)
    permuted = permute_model(tensors, layout, perms)
    moved = [n for n in tensors if not torch.equal(permuted[n], tensors[n])]
    assert moved, "the permutation moved no weight"
    assert torch.allclose(_logits(model, permuted), before, atol=1e-5, rtol=1e-4)
    _logits(model, tensors)


def test_tied_embeddings_stay_tied_and_the_function_unchanged():
    model, tensors, layout = _model(seed=3, tie=True)
    before = _logits(model)
    permuted = permute_model(tensors, layout, random_permutations(layout, torch.Generator().manual_seed(1)))
    if "lm_head.weight" in permuted:
        assert torch.equal(permuted["lm_head.weight"], permuted["model.embed_tokens.weight"])
    model.load_state_dict(permuted, strict=False)
    assert torch.allclose(_logits(model), before, atol=1e-5, rtol=1e-4)


def test_qwen2_attention_biases_move_with_their_heads():
    """Qwen2: the Llama block with q/k/v biases (permuted with their rows)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(2)
    model = Qwen2ForCausalLM(cfg).eval()
    tensors = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for n in tensors:
        if n.endswith(".bias"):
            tensors[n] = torch.randn_like(tensors[n])
    layout = llama_layout(cfg.to_dict(), {n: t.shape for n, t in tensors.items()})
    assert "model.layers.0.self_attn.k_proj.bias" in layout.axes
    before = _logits(model, tensors)
    permuted = permute_model(tensors, layout, random_permutations(layout, torch.Generator().manual_seed(5)))
    q_bias = "model.layers.1.self_attn.q_proj.bias"
    assert not torch.equal(permuted[q_bias], tensors[q_bias])
    assert torch.allclose(_logits(model, permuted), before, atol=1e-5, rtol=1e-4)


def test_what_is_not_a_symmetry_changes_the_logits(tiny):
    """Dimensions inside a q/k head (RoPE) and a query head moved to another kv group are not
    symmetries: doing either changes the function (and the latter is rejected)."""
    model, tensors, layout = tiny
    before = _logits(model, tensors)
    d = layout.head_dim
    inside = torch.randperm(d, generator=torch.Generator().manual_seed(0))
    changed = dict(tensors)
    for proj, heads in (("q_proj", layout.num_heads), ("k_proj", layout.num_kv_heads)):
        name = f"model.layers.0.self_attn.{proj}.weight"
        rows = (torch.arange(heads)[:, None] * d + inside).reshape(-1)
        changed[name] = tensors[name][rows]
    assert (_logits(model, changed) - before).abs().max() > 1e-3
    split = {"attention.0": torch.tensor([0, 2, 1, 3])}  # heads 1 and 2 read different kv heads
    with pytest.raises(ValueError, match="splits a key/value group"):
        check_permutations(split, layout)
    assert (_logits(model, permute_model(tensors, layout, split)) - before).abs().max() > 1e-3
    _logits(model, tensors)


def test_weight_matching_recovers_a_known_permutation_exactly(tiny):
    _, tensors, layout = tiny
    secret = random_permutations(layout, torch.Generator().manual_seed(11))
    shuffled = permute_model(tensors, layout, secret)
    match = weight_matching(tensors, shuffled, layout, seed=3)
    recovered = permute_model(shuffled, layout, match.perms)
    assert all(torch.equal(recovered[n], tensors[n]) for n in tensors)
    assert all(torch.equal(compose(secret, match.perms)[g], p) for g, p in identity_permutations(layout).items())


def test_weight_matching_brings_a_different_init_closer_without_changing_it(tiny):
    _, ref, layout = tiny
    other_model, other, _ = _model(seed=5)
    before = _logits(other_model)
    match = weight_matching(ref, other, layout)
    aligned = permute_model(other, layout, match.perms)
    assert squared_distance(ref, aligned) < squared_distance(ref, other) - 1e-3
    assert match.objective == sorted(match.objective)
    assert torch.allclose(_logits(other_model, aligned), before, atol=1e-5, rtol=1e-4)


def _three_cycles_are_identity(result, n):
    for a, b, c in itertools.permutations(range(n), 3):
        around = compose(compose(result.pairwise_map(a, b), result.pairwise_map(b, c)), result.pairwise_map(c, a))
        for g, p in around.items():
            assert torch.equal(p, torch.arange(len(p))), (a, b, c, g)


def test_c2m3_maps_are_cycle_consistent_and_improve_the_joint_objective(tiny):
    _, first, layout = tiny
    models = [first, _model(seed=5)[1], _model(seed=6)[1]]
    result = c2m3(models, layout)
    _three_cycles_are_identity(result, 3)
    assert result.objective[-1] > result.objective[0]  # Frank-Wolfe moved beyond its Re-Basin start
    assert result.kept == "projected" and result.projected_value > result.start_value  # ... and it kept the gain
    for a in range(1, 3):  # every model lands closer to the first one than it was
        aligned = permute_model(models[a], layout, result.pairwise_map(a, 0))
        assert squared_distance(first, aligned) < squared_distance(first, models[a])


def test_c2m3_on_permuted_copies_recovers_the_identity_merge(tiny):
    model, tensors, layout = tiny
    gen = torch.Generator().manual_seed(21)
    copies = [tensors] + [permute_model(tensors, layout, random_permutations(layout, gen)) for _ in range(2)]
    result = c2m3(copies, layout)
    _three_cycles_are_identity(result, 3)
    aligned = [permute_model(c, layout, result.pairwise_map(i, 0)) for i, c in enumerate(copies)]
    for a in aligned:
        assert all(torch.equal(a[n], tensors[n]) for n in tensors)
    merged = {n: sum(a[n] for a in aligned) / 3 for n in tensors}
    naive = {n: sum(c[n] for c in copies) / 3 for n in tensors}
    before = _logits(model, tensors)
    assert torch.allclose(_logits(model, merged), before, atol=1e-5, rtol=1e-4)
    assert (_logits(model, naive) - before).abs().max() > 1e-3  # averaging unaligned copies breaks it
    _logits(model, tensors)


def test_layout_refuses_what_it_cannot_permute(tiny):
    _, tensors, layout = tiny
    cfg = tiny_config(num_layers=2).to_dict()
    shapes = {n: t.shape for n, t in tensors.items()}
    with pytest.raises(EvomergeError, match="q_norm"):
        llama_layout(cfg, {**shapes, "model.layers.0.self_attn.q_norm.weight": (8,)})
    with pytest.raises(EvomergeError, match="model_type 'gpt2'"):
        llama_layout({**cfg, "model_type": "gpt2"}, shapes)
    with pytest.raises(EvomergeError, match="k_proj"):
        llama_layout({**cfg, "num_key_value_heads": 4}, shapes)
    assert invert(invert(identity_permutations(layout)))["residual"].tolist() == list(range(32))


def _load(path: Path):
    from _tiny_llama import load_model

    return load_model(path).eval()


def test_align_cli_end_to_end(tmp_path, capsys):
    from safetensors.torch import load_file

    from evomerge.checkpoint import write_checkpoint

    a = make_base(tmp_path / "a", seed=1, num_layers=2)
    b = make_base(tmp_path / "b", seed=2, num_layers=2)
    _, _, layout = _model()
    config = json.loads((a / "config.json").read_text())
    shuffled = permute_model(load_file(str(a / "model.safetensors")), layout,
                             random_permutations(layout, torch.Generator().manual_seed(4)))
    write_checkpoint(tmp_path / "c" / "a", shuffled, config, tokenizer_from=a)  # same name, other folder
    out = tmp_path / "aligned"
    code, text = run_cli(["align", str(a), str(b), str(tmp_path / "c" / "a"), "--out", str(out),
                          "--method", "c2m3", "--reference", str(b)], capsys)
    assert code == 0, text
    assert sorted(p.name for p in out.iterdir()) == ["a", "a-2", "alignment.json", "b"]
    for src, name in ((a, "a"), (b, "b"), (tmp_path / "c" / "a", "a-2")):
        assert (out / name / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
        assert torch.allclose(_logits(_load(out / name)), _logits(_load(src)), atol=1e-5, rtol=1e-4)
    written = load_file(str(out / "b" / "model.safetensors"))
    assert all(torch.equal(t, load_file(str(b / "model.safetensors"))[n]) for n, t in written.items())
    a_aligned, c_aligned = (load_file(str(out / n / "model.safetensors")) for n in ("a", "a-2"))
    assert all(torch.equal(a_aligned[n], c_aligned[n]) for n in a_aligned)  # one model, one alignment
    record = json.loads((out / "alignment.json").read_text())
    assert record["method"] == "c2m3" and record["reference"] == str(b)
    for m in record["models"]:
        d = m["squared_distance_to_reference"]
        assert d["after"] <= d["before"] + 1e-9

    code, text = run_cli(["align", str(a), str(b), "--out", str(out)], capsys)
    assert code == 2 and "not empty" in text and "--overwrite" in text
    code, text = run_cli(["align", str(a), str(b), "--out", str(out), "--overwrite", "-q"], capsys)
    assert code == 0 and sorted(p.name for p in out.iterdir()) == ["a", "alignment.json", "b"], text
    assert json.loads((out / "alignment.json").read_text())["method"] == "rebasin"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_align_cli_refuses_bad_input(tmp_path, capsys):
    a = make_base(tmp_path / "a", seed=1, num_layers=2)
    wide = make_base(tmp_path / "wide", seed=2, num_layers=2, hidden=48)
    out = tmp_path / "out"
    code, text = run_cli(["align", str(a), str(wide), "--out", str(out)], capsys)
    assert code == 2 and "shape mismatch for tensor '" in text and str(wide) in text, text
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["a", "wide"]
    code, text = run_cli(["align", str(a), str(a), "--out", str(out), "--method", "zipit"], capsys)
    assert code == 2 and "--method" in text
    code, text = run_cli(["align", str(a), str(wide), "--out", str(a / "x")], capsys)
    assert code == 2 and "inside the input model" in text
    code, text = run_cli(["align", str(a), str(wide), "--out", str(out), "--reference", "nope"], capsys)
    assert code == 2 and "--reference" in text

    from safetensors.torch import load_file

    from evomerge.checkpoint import write_checkpoint

    extra = {**load_file(str(a / "model.safetensors")), "model.layers.0.self_attn.q_norm.weight": torch.ones(8)}
    write_checkpoint(tmp_path / "qk_norm", extra, json.loads((a / "config.json").read_text()))
    write_checkpoint(tmp_path / "qk_norm2", extra, json.loads((a / "config.json").read_text()))
    code, text = run_cli(["align", str(tmp_path / "qk_norm"), str(tmp_path / "qk_norm2"), "--out", str(out)], capsys)
    assert code == 2 and "'model.layers.0.self_attn.q_norm.weight' is not part of a Llama-style decoder" in text
    assert not out.exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((a / "config.json").read_text())
    torch.save(load_file(str(a / "model.safetensors")), pickled / "pytorch_model.bin")
    code, text = run_cli(["align", str(a), str(pickled), "--out", str(out)], capsys)
    assert code == 2 and "--allow-pickle" in text and not out.exists()
    code, text = run_cli(["align", str(a), str(pickled), "--out", str(out), "--allow-pickle", "-q"], capsys)
    assert code == 0, text
    assert all(torch.equal(t, load_file(str(a / "model.safetensors"))[n])
               for n, t in load_file(str(out / "pickled" / "model.safetensors")).items())
