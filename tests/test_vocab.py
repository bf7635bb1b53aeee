"""Vocabulary mismatches: fine-tunes with extra tokens, rows mapped by token (evomerge.merge.vocab)."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import pytest
import torch

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import EvomergeError
from evomerge.merge import vocab as V
from evomerge.merge.engine import InMemoryMerger, merge_to_disk
from evomerge.merge.recipe import MergeRecipe

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789 ")  # 4 + 37 = 41 tokens


# tiny matrices: LAPACK / BLAS threads only wait on each other on a busy 2-core box
pytestmark = pytest.mark.usefixtures("one_thread")


def _tokenizer(extra: list[tuple[str, bool]] = ()):
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    for t, special in extra:
        fast.add_tokens([AddedToken(t, special=special, normalized=False)], special_tokens=special)
    return fast


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("vocab")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=41, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    base = LlamaForCausalLM(cfg)
    out = {"base": _save(base, _tokenizer(), root / "base")}

    def variant(name, seed, extra, rows=None):
        torch.manual_seed(seed)
        m = LlamaForCausalLM(copy.deepcopy(cfg))  # resize_token_embeddings edits the config
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
        tok = _tokenizer(extra)
        m.resize_token_embeddings(rows or len(tok), mean_resizing=False)
        with torch.no_grad():  # distinct, recognisable rows for the added tokens
            for p in (m.model.embed_tokens.weight, m.lm_head.weight):
                p[41:] = torch.randn_like(p[41:])
        out[name] = _save(m, tok, root / name)

    variant("a", 1, [("<tool>", False), ("</tool>", False), ("<|im_end|>", True)])  # ids 41, 42, 43
    variant("b", 2, [("<x>", False), ("<tool>", False)])  # <tool> at id 42 here
    variant("c", 3, [], rows=48)  # same tokenizer as the base, embeddings padded to 48 rows
    return out


def state(path):
    r = CheckpointReader(path)
    return {n: r.get(n).float() for n in r.tensor_names()}


def ta(fam, tokenizer_source=None, models=("a", "b"), weights=(1.0, 1.0)):
    d = {"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
         "models": [{"model": str(fam[m]), "parameters": {"weight": w}} for m, w in zip(models, weights)]}
    if tokenizer_source not in (None, "union"):
        d["tokenizer_source"] = tokenizer_source
    r = MergeRecipe.from_dict(d)
    if tokenizer_source == "union":
        r.tokenizer_source = "union"  # recipe.py still rejects 'union' at validation (see issue 6 notes)
    return r


def vocab_of(path):
    return V.load_vocab(path)


# ----------------------------------------------------------------------------- pure functions


def test_row_keys_index_and_padding():
    keys = V.row_keys({"a": 0, "b": 2}, 4, "m")
    assert keys == ["a", ("#row", 1), "b", ("#row", 3)]
    with pytest.raises(EvomergeError, match="id 5 but its vocabulary tensors have 4 rows"):
        V.row_keys({"a": 5}, 4, "m")
    idx = V.row_index(["b", "z", ("#row", 1)], keys)
    assert idx.tolist() == [2, -1, 1]


def test_fill_and_remap_rows():
    t1 = torch.arange(6.0).reshape(3, 2)
    t2 = 10 + torch.arange(4.0).reshape(2, 2)
    i1 = torch.tensor([0, 1, -1, -1])  # output rows 2 and 3 missing in model 1
    i2 = torch.tensor([-1, 0, 1, -1])  # row 3 missing everywhere
    rows = torch.tensor([0, 2, 3])
    fill = V.fill_rows([t1, t2], [i1, i2], rows)
    torch.testing.assert_close(fill[0], t1[0])
    torch.testing.assert_close(fill[1], t2[1])
    assert torch.isnan(fill[2]).all()
    out = V.remap_rows(t1, i1, rows, fill)
    torch.testing.assert_close(out, torch.stack([t1[0], t1[1], t2[1], t1.mean(0)]))


# ----------------------------------------------------------------------------- through the engine


def test_size_mismatch_without_tokenizer_source_is_an_error(fam, tmp_path):
    with pytest.raises(EvomergeError, match="vocabularies differ in size.*tokenizer_source.*never truncates"):
        merge_to_disk(ta(fam), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_tokenizer_source_base_keeps_base_vocab(fam, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="evomerge"):
        out = merge_to_disk(ta(fam, "base"), tmp_path / "o")
    assert "3 token(s)" in caplog.text and "'<|im_end|>'" in caplog.text
    s, sb, sa, sbb = state(out), state(fam["base"]), state(fam["a"]), state(fam["b"])
    for n in (EMB, HEAD):
        assert s[n].shape[0] == 41
        torch.testing.assert_close(s[n], sb[n] + (sa[n][:41] - sb[n]) + (sbb[n][:41] - sb[n]))
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 41
    assert vocab_of(out) == vocab_of(fam["base"])


def test_tokenizer_source_union(fam, tmp_path):
    out = merge_to_disk(ta(fam, "union"), tmp_path / "o")
    uv = vocab_of(out)
    bv = vocab_of(fam["base"])
    assert all(uv[t] == i for t, i in bv.items())
    assert [uv[t] for t in ("<tool>", "</tool>", "<|im_end|>", "<x>")] == [41, 42, 43, 44]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 45
    s, sb, sa, sbb = state(out), state(fam["base"]), state(fam["a"]), state(fam["b"])
    for n in (EMB, HEAD):
        assert s[n].shape[0] == 45
        torch.testing.assert_close(s[n][:41], sb[n] + (sa[n][:41] - sb[n]) + (sbb[n][:41] - sb[n]))
        # a token both fine-tunes added (at different ids): base row = their mean -> TA gives the mean
        torch.testing.assert_close(s[n][41], (sa[n][41] + sbb[n][42]) / 2)
        # a token only one fine-tune has: that fine-tune's own row
        torch.testing.assert_close(s[n][42], sa[n][42])
        torch.testing.assert_close(s[n][43], sa[n][43])
        torch.testing.assert_close(s[n][44], sbb[n][41])
    # the written tokenizer loads, knows the new tokens, keeps <|im_end|> special
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["<x>", "<|im_end|>"]) == [44, 43]
    assert "<|im_end|>" in tok.all_special_tokens or "<|im_end|>" in [
        str(t) for t in tok.added_tokens_decoder.values() if t.special]
    model = LlamaForCausalLM.from_pretrained(out)
    ids = tok("ab<tool>c<x>", return_tensors="pt").input_ids
    assert 41 in ids.tolist()[0] and 44 in ids.tolist()[0]
    assert torch.isfinite(model(ids).logits).all()


def test_union_in_memory_matches_disk(fam, tmp_path):
    out = merge_to_disk(ta(fam, "union", weights=(0.7, 0.4)), tmp_path / "o")
    disk = state(out)
    mem = dict(InMemoryMerger([fam["base"], fam["a"], fam["b"]]).merged_tensors(ta(fam, "union", weights=(0.7, 0.4))))
    for n, t in disk.items():
        assert torch.equal(mem[n], t), n


def test_tokenizer_source_named_model(fam, tmp_path):
    out = merge_to_disk(ta(fam, str(fam["a"])), tmp_path / "o")
    assert vocab_of(out) == vocab_of(fam["a"])
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 44
    s, sb, sa, sbb = state(out), state(fam["base"]), state(fam["a"]), state(fam["b"])
    for n in (EMB, HEAD):
        torch.testing.assert_close(s[n][:41], sb[n] + (sa[n][:41] - sb[n]) + (sbb[n][:41] - sb[n]))
        torch.testing.assert_close(s[n][41], (sa[n][41] + sbb[n][42]) / 2)  # <tool> mapped from b's id 42
        torch.testing.assert_close(s[n][42], sa[n][42])


def test_padded_embedding_rows_matched_by_position(fam, tmp_path):
    # c: the base tokenizer with 48 embedding rows (7 padding rows) -> base: 41 rows
    out = merge_to_disk(ta(fam, "base", models=("c",), weights=(1.0,)), tmp_path / "o")
    s, sc = state(out), state(fam["c"])
    for n in (EMB, HEAD):
        torch.testing.assert_close(s[n], sc[n][:41])
    # tokenizer_source c: the 7 padding rows are c's own (base has none: filled -> task vector 0)
    out = merge_to_disk(ta(fam, str(fam["c"]), models=("c",), weights=(1.0,)), tmp_path / "o2")
    s = state(out)
    for n in (EMB, HEAD):
        torch.testing.assert_close(s[n], sc[n])


@pytest.mark.parametrize("source", ["base", "union"])
def test_same_vocab_is_untouched(fam, tmp_path, source):
    r = MergeRecipe.from_dict({"merge_method": "linear", "models": [{"model": str(fam["base"]), "parameters": {"weight": 1.0}}],
                               "tokenizer_source": "base"})
    r.tokenizer_source = source
    out = merge_to_disk(r, tmp_path / "o")
    s, sb = state(out), state(fam["base"])
    assert all(torch.equal(s[n], sb[n]) for n in sb)
    assert vocab_of(out) == vocab_of(fam["base"])


# ----------------------------------------------------------------------------- from the zoo


def test_zoo_fine_tune_with_extra_tokens(zoo, tmp_path):
    """A zoo expert that adds two tokens, merged with another expert: union keeps every old row as
    the plain merge has it, the new rows are the adding expert's own, and the model answers as the
    plain merge does."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    z = zoo
    e1, e2 = (z.experts[t] for t in z.expert_tasks[:2])
    tok = AutoTokenizer.from_pretrained(e1)
    n_old = len(tok)
    tok.add_tokens(["<tool>", "</tool>"])
    m = LlamaForCausalLM.from_pretrained(e1)
    m.resize_token_embeddings(len(tok))
    with torch.no_grad():
        m.model.embed_tokens.weight[n_old:] += 0.1
    m.save_pretrained(tmp_path / "e1x")
    tok.save_pretrained(tmp_path / "e1x")

    def rec(first, source):
        r = MergeRecipe.from_dict({"merge_method": "task_arithmetic", "base_model": str(z.base),
                                   "models": [{"model": str(first), "parameters": {"weight": 0.6}},
                                              {"model": str(e2), "parameters": {"weight": 0.6}}]})
        r.tokenizer_source = source
        return r

    with pytest.raises(EvomergeError, match="tokenizer_source"):
        merge_to_disk(rec(tmp_path / "e1x", None), tmp_path / "x")
    plain = state(merge_to_disk(rec(e1, None), tmp_path / "plain"))
    out = merge_to_disk(rec(tmp_path / "e1x", "union"), tmp_path / "union")
    union, ex = state(out), state(tmp_path / "e1x")
    for n, t in plain.items():
        if t.shape[0] == n_old and n in (EMB, HEAD):
            assert torch.equal(union[n][:n_old], t), n
            torch.testing.assert_close(union[n][n_old:], ex[n][n_old:])
        else:
            assert torch.equal(union[n], t), n
    utok = AutoTokenizer.from_pretrained(out)
    assert utok.convert_tokens_to_ids(["<tool>", "</tool>"]) == [n_old, n_old + 1]
    task = z.load_task(z.expert_tasks[0], "heldout")
    prompts = task.prompts(task.items[:8])
    if prompts:
        mu, mp = LlamaForCausalLM.from_pretrained(out), LlamaForCausalLM.from_pretrained(tmp_path / "plain")
        ptok = AutoTokenizer.from_pretrained(tmp_path / "plain")
        for p in prompts:
            ids = ptok(p, return_tensors="pt").input_ids
            gu = mu.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=ptok.pad_token_id)
            gp = mp.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=ptok.pad_token_id)
            assert torch.equal(gu, gp)


def test_named_tokenizer_source_outside_the_merge(fam, tmp_path):
    # a's tokenizer, merging only b: '</tool>' and '<|im_end|>' exist in no merged model -> each
    # model's own mean row (task vector = difference of the means); '<tool>' comes from b's id 42
    out = merge_to_disk(ta(fam, str(fam["a"]), models=("b",), weights=(1.0,)), tmp_path / "o")
    assert vocab_of(out) == vocab_of(fam["a"])
    s, sbb = state(out), state(fam["b"])
    for n in (EMB, HEAD):
        assert s[n].shape[0] == 44
        torch.testing.assert_close(s[n][:41], sbb[n][:41])
        torch.testing.assert_close(s[n][41], sbb[n][42])
        torch.testing.assert_close(s[n][42], sbb[n].mean(0), rtol=1e-5, atol=1e-5)
