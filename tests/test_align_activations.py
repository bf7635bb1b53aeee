"""Activation matching (issue 15): it recovers a known permutation of a model bit-exactly, the
aligned model computes the input's logits, and ``evomerge align --method activations --data``
works end to end on a zoo model and refuses bad input with one clear message."""

from __future__ import annotations

import json

import pytest
import torch

from _bad_input import run_cli
from _tiny_llama import tiny_config
from evomerge.align.activations import activation_matching, decoder_from_tensors, token_batches
from evomerge.align.symmetries import compose, identity_permutations, llama_layout, permute_model, random_permutations


def _sharp_model(seed: int):
    """A tiny GQA Llama (4 query heads, 2 kv heads, 2 layers) whose attention is far from uniform
    (scaled q/k) and whose norms are not all ones, so that every unit has its own activations."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(num_layers=2)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    tensors = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return model, tensors, llama_layout(model.config.to_dict(), {n: t.shape for n, t in tensors.items()})


def _sequences(n: int = 24, length: int = 16, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 96, (int(torch.randint(4, length + 1, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


@pytest.mark.parametrize("seed", [11, 12])
def test_activation_matching_recovers_a_known_permutation_exactly(one_thread, seed):
    model, tensors, layout = _sharp_model(0)
    secret = random_permutations(layout, torch.Generator().manual_seed(seed))
    shuffled = permute_model(tensors, layout, secret)
    assert any(not torch.equal(secret[g], torch.arange(len(secret[g]))) for g in secret if g.startswith("attention."))
    config = model.config.to_dict()
    models = [decoder_from_tensors(config, tensors), decoder_from_tensors(config, shuffled)]
    perms, reports = activation_matching(models, 0, layout, token_batches(_sequences(), batch_size=8))
    assert reports[0] == {} and all(torch.equal(p, torch.arange(len(p))) for p in perms[0].values())
    recovered = permute_model(shuffled, layout, perms[1])
    assert all(torch.equal(recovered[n], tensors[n]) for n in tensors)
    assert all(torch.equal(compose(secret, perms[1])[g], p) for g, p in identity_permutations(layout).items())
    for group, r in reports[1].items():
        assert r["after"] > 0.999 and r["after"] >= r["before"], group


def test_activation_matching_keeps_a_different_init_model_s_function(one_thread):
    model, ref, layout = _sharp_model(0)
    other_model, other, _ = _sharp_model(5)
    config = model.config.to_dict()
    seqs = _sequences()
    models = [decoder_from_tensors(config, ref), decoder_from_tensors(config, other)]
    perms, reports = activation_matching(models, 0, layout, token_batches(seqs, batch_size=8))
    aligned = permute_model(other, layout, perms[1])
    ids = torch.tensor([seqs[0]])
    with torch.no_grad():
        before = other_model(ids).logits
        other_model.load_state_dict(aligned)
        after = other_model(ids).logits
    assert torch.allclose(after, before, atol=1e-5, rtol=1e-4)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms[1].values())
    for group, r in reports[1].items():  # each assignment is optimal, so at least as good as the identity
        assert r["after"] >= r["before"] - 1e-12, group
    assert reports[1]["residual"]["after"] > reports[1]["residual"]["before"] + 0.05


def _permuted_copy(src, dst, seed: int):
    from safetensors.torch import load_file

    from evomerge.checkpoint import write_checkpoint

    tensors = load_file(str(src / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    layout = llama_layout(config, {n: t.shape for n, t in tensors.items()})
    write_checkpoint(dst, permute_model(tensors, layout, random_permutations(layout, torch.Generator().manual_seed(seed))),
                     config, tokenizer_from=src)
    return dst


def test_align_cli_activations_on_a_zoo_model(zoo, tmp_path, capsys, one_thread):
    from safetensors.torch import load_file

    lang = zoo.experts["lang"]
    shuffled = _permuted_copy(lang, tmp_path / "shuffled", seed=3)
    out = tmp_path / "aligned"
    code, text = run_cli(["align", str(lang), str(shuffled), "--out", str(out), "--method", "activations",
                          "--data", "zoo:lang", "--data", "zoo:cipher", "--data-items", "48", "-q"], capsys)
    assert code == 0, text
    want = load_file(str(lang / "model.safetensors"))
    got = load_file(str(out / "shuffled" / "model.safetensors"))
    assert all(torch.equal(got[n], want[n]) for n in want)
    record = json.loads((out / "alignment.json").read_text())
    assert record["method"] == "activations" and record["data"] == ["zoo:lang", "zoo:cipher"]
    assert record["activations"]["sequences"] == 96
    assert record["models"][1]["squared_distance_to_reference"]["after"] == 0.0


def test_align_cli_activations_refuses_bad_input(zoo, tmp_path, capsys):
    lang, base = str(zoo.experts["lang"]), str(zoo.base)
    out = tmp_path / "out"
    cases = [
        (["--method", "activations"], "needs --data"),
        (["--method", "rebasin", "--data", "zoo:lang"], "--method activations only"),
        (["--method", "activations", "--data", "zoo:nope"], "no task 'nope'"),
        (["--method", "activations", "--data", str(tmp_path / "missing")], "task folder"),
        (["--method", "activations", "--data", "zoo:lang", "--data-items", "0"], "--data-items"),
    ]
    for extra, words in cases:
        code, text = run_cli(["align", lang, base, "--out", str(out), *extra], capsys)
        assert code == 2 and words in text, (extra, text)
        assert not out.exists()
