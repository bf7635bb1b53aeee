"""MetaMerging: the inner and outer (MAML / FOMAML) updates against hand and finite-difference
gradients on a linear "model", adapters as the identity and inside generation, the meta-learning
on the zoo, and `evomerge metamerge` + `evomerge eval --adapters` end to end."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.learned.adapters import (ADAPTER_KEYS, adapted, apply_adapter, init_adapter, load_adapter,
                                       save_adapter)
from evomerge.learned.metamerging import (ExpertTask, alignment_loss, inner_update, metamerge, self_continued,
                                          task_meta_loss)

HIDDEN, WIDTH, VOCAB = 5, 4, 7


def _linear_problem(seed: int = 0):
    """A linear "merged model": features(ids) = Σ_k λ_k E_k[ids] (two task tables, float64),
    a support and a query batch (second row padded) with random targets, and a non-fresh adapter."""
    g = torch.Generator().manual_seed(seed)
    tables = torch.randn((2, VOCAB, HIDDEN), generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    support = (torch.tensor([[1, 2, 3], [4, 5, 0]]), mask, torch.randn((2, 3, HIDDEN), generator=g, dtype=torch.float64))
    query = (torch.tensor([[6, 2, 1], [3, 0, 0]]), torch.tensor([[1, 1, 1], [1, 0, 0]]),
             torch.randn((2, 3, HIDDEN), generator=g, dtype=torch.float64))
    phi = {"w1": torch.randn((WIDTH, HIDDEN), generator=g, dtype=torch.float64) * 0.5,
           "b1": torch.randn(WIDTH, generator=g, dtype=torch.float64) * 0.1,
           "w2": torch.randn((HIDDEN, WIDTH), generator=g, dtype=torch.float64) * 0.5,
           "b2": torch.randn(HIDDEN, generator=g, dtype=torch.float64) * 0.1}

    def features_at(lam):
        return lambda ids, mask: lam[0] * tables[0][ids] + lam[1] * tables[1][ids]

    return features_at, support, query, phi


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf

    return 0.5 * x * (1 + np.vectorize(erf)(x / np.sqrt(2)))


def test_inner_step_of_a_fresh_adapter_matches_the_closed_form():
    features_at, (ids, mask, y), _, _ = _linear_problem()
    lam = torch.tensor([0.7, 1.3], dtype=torch.float64)
    phi = {k: v.double().requires_grad_(True) for k, v in init_adapter(HIDDEN, WIDTH, torch.Generator().manual_seed(1)).items()}
    h = features_at(lam)(ids, mask)
    new = inner_update(phi, h, y, mask, lr=0.3)
    # W2 = b2 = 0: L = Σ_valid ||h + 0 - y||² / (n d); dL/dW2 = 2/(n d) Σ r aᵀ, dL/db2 = 2/(n d) Σ r, W1, b1: 0
    keep = mask.numpy().astype(bool)
    hn, yn = h.numpy()[keep], y.numpy()[keep]
    a = _gelu(hn @ phi["w1"].detach().numpy().T + phi["b1"].detach().numpy())
    r = hn - yn
    scale = 2.0 / (len(hn) * HIDDEN)
    np.testing.assert_allclose(new["w2"].detach().numpy(), -0.3 * scale * r.T @ a, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(new["b2"].detach().numpy(), -0.3 * scale * r.sum(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(new["w1"].detach().numpy(), phi["w1"].detach().numpy())
    np.testing.assert_array_equal(new["b1"].detach().numpy(), phi["b1"].detach().numpy())


def _outer(features_at, support, query, phi0, lam, first_order, steps=2):
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi0.items()}
    lam = lam.detach().clone().requires_grad_(True)
    loss = task_meta_loss(features_at(lam), phi, support, query, inner_lr=0.4, inner_steps=steps,
                          first_order=first_order)
    loss.backward()
    return float(loss.detach()), lam.grad.clone(), {k: phi[k].grad.clone() for k in ADAPTER_KEYS}


def test_second_order_outer_gradient_matches_finite_differences():
    features_at, support, query, phi0 = _linear_problem()
    lam = torch.tensor([0.7, 1.3], dtype=torch.float64)
    _, g_lam, g_phi = _outer(features_at, support, query, phi0, lam, first_order=False)

    def loss(lam_, phi_):  # the whole outer objective, inner steps included
        return _outer(features_at, support, query, phi_, lam_, first_order=False)[0]

    eps = 1e-6
    for k in range(2):
        d = torch.zeros(2, dtype=torch.float64)
        d[k] = eps
        fd = (loss(lam + d, phi0) - loss(lam - d, phi0)) / (2 * eps)
        assert abs(float(g_lam[k]) - fd) < 1e-7 * max(1.0, abs(fd)), (k, float(g_lam[k]), fd)
    for name, idx in (("w1", (1, 2)), ("b1", (0,)), ("w2", (3, 1)), ("b2", (4,))):
        plus = {k: v.clone() for k, v in phi0.items()}
        minus = {k: v.clone() for k, v in phi0.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (loss(lam, plus) - loss(lam, minus)) / (2 * eps)
        assert abs(float(g_phi[name][idx]) - fd) < 1e-7 * max(1.0, abs(fd)), (name, float(g_phi[name][idx]), fd)


def test_first_order_gradient_is_the_query_gradient_at_the_updated_adapter():
    features_at, support, query, phi0 = _linear_problem()
    lam = torch.tensor([0.7, 1.3], dtype=torch.float64)
    _, g_lam, g_phi = _outer(features_at, support, query, phi0, lam, first_order=True)
    _, g_lam_full, _ = _outer(features_at, support, query, phi0, lam, first_order=False)
    # φ' after the inner steps, then held constant
    phi = {k: v.detach().clone().requires_grad_(True) for k, v in phi0.items()}
    sid, smask, sy = support
    h = features_at(lam)(sid, smask)
    for _ in range(2):
        phi = inner_update(phi, h, sy, smask, lr=0.4)
    phi_new = {k: v.detach() for k, v in phi.items()}
    qid, qmask, qy = query

    def query_loss(lam_, phi_):
        return float(alignment_loss(apply_adapter(phi_, features_at(lam_)(qid, qmask)), qy, qmask))

    eps = 1e-6
    for k in range(2):
        d = torch.zeros(2, dtype=torch.float64)
        d[k] = eps
        fd = (query_loss(lam + d, phi_new) - query_loss(lam - d, phi_new)) / (2 * eps)
        assert abs(float(g_lam[k]) - fd) < 1e-7 * max(1.0, abs(fd))
    for name, idx in (("w1", (1, 2)), ("w2", (3, 1)), ("b2", (4,))):
        plus = {k: v.clone() for k, v in phi_new.items()}
        minus = {k: v.clone() for k, v in phi_new.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (query_loss(lam, plus) - query_loss(lam, minus)) / (2 * eps)
        assert abs(float(g_phi[name][idx]) - fd) < 1e-7 * max(1.0, abs(fd))
    # the second-order terms are not negligible here: the two gradients differ
    assert float((g_lam - g_lam_full).abs().max()) > 1e-3 * float(g_lam_full.abs().max())


def test_fresh_adapter_is_the_identity_and_files_round_trip(zoo, tmp_path):
    from transformers import AutoModelForCausalLM

    phi = init_adapter(128, 16, torch.Generator().manual_seed(0))
    h = torch.randn(2, 3, 128)
    torch.testing.assert_close(apply_adapter(phi, h), h, rtol=0, atol=0)
    model = AutoModelForCausalLM.from_pretrained(str(zoo.base))
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        head = model.lm_head
        with adapted(model, phi):
            assert model.lm_head is not head
            fresh = model(input_ids=ids).logits
        assert model.lm_head is head
    torch.testing.assert_close(fresh, plain, rtol=0, atol=0)
    path = save_adapter(tmp_path / "a.safetensors", phi, "lang")
    task, back = load_adapter(path)
    assert task == "lang" and all(torch.equal(back[k], phi[k]) for k in ADAPTER_KEYS)
    with pytest.raises(EvomergeError, match="hidden size 128"):
        with adapted(model, init_adapter(64, 16)):
            pass


def _greedy_without_cache(model, phi, ids: list[int], n: int) -> list[int]:
    """Greedy decoding by full forward passes, the adapter applied by hand to the final hidden states."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[:, -1]
            nxt = int(model.lm_head(apply_adapter(phi, h)).argmax(-1))
            out.append(nxt)
            ids.append(nxt)
    return out


def test_adapter_in_cached_generation(zoo):
    from evomerge.backends.hf import HFEvaluator
    from evomerge.backends.tokens import encode_prompt
    from evomerge.tasks import load_task_dir

    ev = HFEvaluator(zoo.model("lang"), num_threads="auto")
    prompts = load_task_dir(zoo.task_dir("lang"), "heldout").prompts()[:6]
    plain = ev.generate(prompts, max_new_tokens=8)
    with adapted(ev.model, init_adapter(128, 16, torch.Generator().manual_seed(0))):
        assert ev.generate(prompts, max_new_tokens=8) == plain
    # a non-zero adapter: the KV-cached loop equals full passes with the adapter applied by hand
    g = torch.Generator().manual_seed(3)
    phi = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in init_adapter(128, 16, g).items()}
    with adapted(ev.model, phi):
        raw = [ev._generate_batch([p], 6)[0] for p in prompts[:3]]
    for p, got in zip(prompts[:3], raw):
        assert got == _greedy_without_cache(ev.model, phi, encode_prompt(ev.tokenizer, p), 6)
    assert ev.generate(prompts, max_new_tokens=8) == plain  # the lm_head is back


def _experts(zoo, names, n):
    from evomerge.tasks import load_task_dir

    out = []
    for t in names:
        task = load_task_dir(zoo.task_dir(t), "search")
        out.append(ExpertTask(zoo.model(t), t, task.prompts(task.items[:n])))
    return out


def test_outer_loss_decreases_on_the_zoo(zoo):
    experts = _experts(zoo, ["lang", "cipher"], 12)
    res = metamerge(zoo.base, experts, meta_steps=6, lr=0.02, adapter_steps=30, width=32, batch_size=16)
    assert len(res.outer_loss) == 7 and res.outer_loss[-1] < 0.8 * res.outer_loss[0], res.outer_loss
    assert not torch.equal(res.coefficients, torch.ones(2, 1))
    for task, (before, after) in res.adapter_loss.items():
        assert after < before, task
    fo = metamerge(zoo.base, experts, meta_steps=6, lr=0.02, first_order=True, learn_init=False,
                   adapter_steps=0, width=32, batch_size=16, granularity="layer")
    assert fo.coefficients.shape == (2, 5) and fo.outer_loss[-1] < fo.outer_loss[0], fo.outer_loss
    ta = metamerge(zoo.base, experts, meta_steps=0, adapter_steps=0, width=32, init=[1.0, 0.5])
    recipe = ta.recipe("B", ["L", "C"])
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [1.0, 0.5]


def test_bad_arguments_are_refused(zoo):
    experts = _experts(zoo, ["lang"], 4)
    with pytest.raises(EvomergeError, match="at least 2"):
        metamerge(zoo.base, [ExpertTask(zoo.model("lang"), "lang", ["say 1="])])
    with pytest.raises(EvomergeError, match="given twice"):
        metamerge(zoo.base, experts + experts)
    with pytest.raises(EvomergeError, match="granularity"):
        metamerge(zoo.base, experts, granularity="block")


def test_self_continued_appends_the_models_own_answers(zoo):
    from evomerge.backends.hf import HFEvaluator
    from evomerge.tasks import load_task_dir

    task = load_task_dir(zoo.task_dir("lang"), "search")
    task.items = task.items[:12]
    ev = HFEvaluator(zoo.model("lang"), num_threads="auto")
    texts = self_continued(ev, task)
    prompts = task.prompts()
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, prompts))
    assert task.score([t[len(p):] for t, p in zip(texts, prompts)]).mean() > 0.8  # the expert's answers
    choice = load_task_dir(zoo.task_dir("cipher_choice"), "search")
    choice.items = choice.items[:6]
    ev.load_model(zoo.model("cipher"))
    for text, item in zip(self_continued(ev, choice), choice.items):
        assert any(text == choice.format_prompt(item) + choice.choice_delimiter + c for c in item.choices)


def _run(argv, capsys) -> tuple[int, str, str]:
    from evomerge.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_metamerge_cli_and_eval_with_adapters(zoo, tmp_path, capsys):
    out = tmp_path / "mm"
    code, _, err = _run(["metamerge", "zoo:base", "-m", "zoo:lang", "-t", "zoo:lang", "-m", "zoo:cipher",
                         "-t", "zoo:cipher", "--limit", "8", "--meta-steps", "2", "--adapter-steps", "10",
                         "--width", "16", "--out", out], capsys)
    assert code == 0, err
    doc = json.loads((out / "metamerging.json").read_text())
    assert doc["tasks"] == ["lang", "cipher"] and len(doc["outer_loss"]) == 3 and doc["inputs"]["lang"] == 8
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["cipher.safetensors", "lang.safetensors"]
    recipe = out / "recipe.yaml"
    base_args = ["eval", recipe, "-t", "zoo:lang", "-t", "zoo:upenc", "--limit", "20"]

    def accuracy(extra, name):
        code, _, err = _run(base_args + extra + ["--json", tmp_path / name], capsys)
        assert code == 0, err
        return json.loads((tmp_path / name).read_text())

    plain = accuracy([], "plain.json")
    routed = accuracy(["--adapters", out / "adapters"], "routed.json")
    assert routed["adapters"] == {"lang": True, "upenc": False}
    assert routed["accuracy"]["upenc"] == plain["accuracy"]["upenc"]
    # routing by task: an adapter that wrecks the features, for lang only, takes lang's accuracy to 0
    wreck = tmp_path / "wreck"
    g = torch.Generator().manual_seed(0)
    broken = init_adapter(128, 8, g)
    broken["b2"] = 50 * torch.randn(128, generator=g)
    save_adapter(wreck / "lang.safetensors", broken, "lang")
    save_adapter(wreck / "other.safetensors", init_adapter(128, 8, g), "upenc")
    wrecked = accuracy(["--adapters", wreck], "wreck.json")
    assert plain["accuracy"]["lang"] > 0.5 and wrecked["accuracy"]["lang"] == 0.0
    assert wrecked["accuracy"]["upenc"] == plain["accuracy"]["upenc"]  # a fresh adapter: unchanged

    small = tmp_path / "small"
    save_adapter(small / "lang.safetensors", init_adapter(64, 8), "lang")
    for extra, message in ((["--adapters", small], "the adapter of task lang.*hidden size 128"),
                           (["--adapters", tmp_path / "none"], "folder not found"),
                           (["--adapters", wreck, "--backend", "vllm"], "needs --backend hf")):
        code, _, err = _run(base_args + extra, capsys)
        assert code != 0 and re.search(message, err.strip().splitlines()[-1]), err
    code, _, err = _run(["metamerge", "zoo:base", "-m", "zoo:lang", "-t", "zoo:lang", "--out", out], capsys)
    assert code != 0 and "exists" in err


def test_a_diverging_meta_learning_stops_with_a_clear_error():
    from evomerge.learned.metamerging import meta_learn

    features_at, support, query, phi0 = _linear_problem()
    lam = torch.tensor([[0.7], [1.3]], dtype=torch.float64, requires_grad=True)
    phis = {"t": {k: v.clone().requires_grad_(True) for k, v in phi0.items()}}
    with pytest.raises(EvomergeError, match="diverged at meta-step"):
        meta_learn(lam, phis, {"t": ([support], [query])}, lambda lam_: features_at(lam_[:, 0]), steps=50,
                   lr=0.01, inner_lr=1e200, first_order=True)


def test_metamerge_cli_bad_input(zoo, tmp_path, capsys):
    base = ["metamerge", "zoo:base", "--out", tmp_path / "o"]
    for extra, message in ((["-m", "zoo:lang", "-m", "zoo:cipher", "-t", "zoo:lang"], "one --task per --model"),
                           (["-m", "zoo:lang", "-t", "zoo:lang", "--limit", "1"], "--limit 1: must be >= 2"),
                           (["-m", "zoo:nope", "-t", "zoo:lang"], "zoo:nope"),
                           (["-m", "zoo:lang", "-t", "zoo:nope"], "the zoo has no task"),
                           (["-m", "zoo:lang", "-t", "zoo:lang", "--granularity", "block"], "granularity")):
        code, _, err = _run(base + extra + ["--limit", "4"] * ("--limit" not in extra), capsys)
        assert code != 0 and message in err.strip().splitlines()[-1], err
        assert not (tmp_path / "o").exists() and list(tmp_path.iterdir()) == []
