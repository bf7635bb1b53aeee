"""Multiple-choice tasks scored by log-likelihood: metrics, the evaluator's log-likelihoods,
the zoo's cipher_choice task, and datasets sources with choices."""

import json

import numpy as np
import pytest

from evomerge.config import DatasetSource, TaskConfig
from evomerge.errors import EvomergeError
from evomerge.tasks import Item, Task
from evomerge.tasks.sources import load_dataset_task


class _FakeEvaluator:
    """Answers log-likelihood requests from a table; generation is an error."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def loglikelihoods(self, requests):
        self.calls.append(list(requests))
        return np.array([self.table[r] for r in requests], dtype=np.float64)

    def generate(self, prompts, max_new_tokens):
        raise AssertionError("a multiple-choice task must not generate")


def _items():
    return [Item("q1", "pick:", 1, choices=("a", "bbbb")),
            Item("q2", "pick2:", 0, choices=("a", "bbbb", "cc"))]


def test_acc_and_acc_norm_disagree():
    items = _items()
    # q1: "a" -2.0 vs "bbbb" -4.0: acc picks "a" (wrong); per character -2.0 vs -1.0:
    # acc_norm picks "bbbb" (right). q2: acc picks "a" (right), acc_norm "cc" (-1.5/2).
    ll = [-2.0, -4.0, -2.0, -9.0, -2.5]
    acc, norm = Task("t", items), Task("t", items, metric="acc_norm")
    assert [s.tolist() for s in acc.choice_scores(ll)] == [[-2.0, -4.0], [-2.0, -9.0, -2.5]]
    assert [s.tolist() for s in norm.choice_scores(ll)] == [[-2.0, -1.0], [-2.0, -2.25, -1.25]]
    r = acc.score_choices(ll)
    assert r.dtype == np.int8 and r.tolist() == [0, 1]
    assert norm.score_choices(ll).tolist() == [1, 0]
    # ties: the first choice wins (np.argmax)
    assert acc.score_choices([-1.0, -1.0, -3.0, -1.0, -1.0]).tolist() == [0, 0]
    with pytest.raises(EvomergeError, match="4 log-likelihoods for 5 choices of 2 items"):
        acc.score_choices(ll[:4])


def test_answer_makes_one_loglikelihood_call():
    items = _items()
    task = Task("t", items, template="Q {prompt}", choice_delimiter="_")
    reqs = task.choice_requests()
    assert reqs == [("Q pick:", "_a"), ("Q pick:", "_bbbb"), ("Q pick2:", "_a"),
                    ("Q pick2:", "_bbbb"), ("Q pick2:", "_cc")]
    ev = _FakeEvaluator(dict(zip(reqs, [-2.0, -4.0, -2.0, -9.0, -2.5])))
    got = task.answer(ev)
    assert got.dtype == np.int8 and got.tolist() == [0, 1] and len(ev.calls) == 1
    task.metric = "acc_norm"
    assert task.answer(ev, items[:1]).tolist() == [1] and ev.calls[-1] == reqs[:2]
    assert task.answer(ev, []).tolist() == []
    with pytest.raises(EvomergeError, match="use answer"):
        task.score(["a", "a"])
    with pytest.raises(EvomergeError, match="needs items with choices"):
        Task("g", [Item("g", "p", "x")]).choice_requests()


def test_config_metric_override():
    assert TaskConfig(zoo="cipher_choice", metric="acc_norm").metric == "acc_norm"
    assert TaskConfig(zoo="cipher_choice").metric is None
    with pytest.raises(Exception, match="acc_norm"):
        TaskConfig(zoo="cipher_choice", metric="f1")


# --------------------------------------------------------------------------- real models
@pytest.fixture(scope="module")
def base_ev(zoo):
    from evomerge.backends.hf import HFEvaluator

    return HFEvaluator(zoo.base, batch_size=4)


def _manual_loglik(ev, context, continuation):
    """log p(continuation | context) from one unpadded forward pass (char-level tokenizer:
    trailing spaces of the context belong to the continuation, as lm-eval splits)."""
    import torch

    tok = ev.tokenizer
    n_ctx = len(tok(context.rstrip(" "))["input_ids"])
    ids = tok(context + continuation)["input_ids"]
    with torch.no_grad():
        logits = ev.model(input_ids=torch.tensor([ids])).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(sum(logp[p - 1, ids[p]] for p in range(n_ctx, len(ids))))


def test_hf_loglikelihoods_match_a_plain_forward(base_ev, one_thread):
    reqs = [("enc abc=", "qwe"), ("say 409=", "te zo si"), ("up kaz= ", "KAZ"),
            ("enc a=", " q"), ("1 2 3", " 4 5 6 7 8"), ("enc abcdefgh=", "q"), ("x", "y")]
    got = base_ev.loglikelihoods(reqs)  # batch_size 4: padded batches of mixed lengths
    assert got.dtype == np.float64 and got.shape == (len(reqs),)
    want = [_manual_loglik(base_ev, c, x) for c, x in reqs]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert (got < 0).all()
    assert base_ev.loglikelihoods([]).shape == (0,)


def test_zoo_choice_task(zoo, base_ev, one_thread):
    from evomerge.backends.hf import HFEvaluator

    assert "cipher_choice" in zoo.task_names and "cipher_choice" not in zoo.experts
    task = zoo.load_task("cipher_choice", "heldout")
    search = zoo.load_task("cipher_choice", "search")
    assert task.kind == "choice" and task.metric == "acc" and task.choice_delimiter == ""
    cipher = {it.prompt: it.answer for it in zoo.load_task("cipher", "heldout").items}
    for it in task.items:
        assert len(set(it.choices)) == 4 == len(it.choices)
        assert it.choices[it.answer] == cipher[it.prompt]  # the cipher task's answer
        assert {len(c) for c in it.choices} == {len(cipher[it.prompt])}
    assert not {i.prompt for i in search.items} & {i.prompt for i in task.items}
    items = task.items[:60]
    expert = HFEvaluator(zoo.experts["cipher"], batch_size=256)
    acc_expert = float(expert.answer(task, items).mean())
    acc_base = float(base_ev.answer(task, items).mean())
    assert acc_expert >= 0.9 and acc_base <= 0.5, (acc_expert, acc_base)
    acc = zoo.manifest["heldout_accuracy"]
    assert acc["cipher_expert"]["cipher_choice"] >= 0.9
    for label in ("base", "lang_expert", "upper_expert"):
        assert acc[label]["cipher_choice"] < 0.5, (label, acc[label])
    assert "cipher_choice" in zoo.report


# --------------------------------------------------------------------------- datasets
def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_datasets_source_with_choices(tmp_path):
    rows = [{"q": "1+1?", "opts": ["2", "3", "4"], "gold": "A"},      # letter label
            {"q": "3+3?", "opts": ["5", "7", "6"], "gold": "6"},      # the text of a choice
            {"q": "0+1?", "opts": ["0", "2", "3"], "gold": "2"},      # text before index
            {"q": "9+9?", "opts": ["81", "18"], "gold": "1"}]         # digits: 0-based index
    train = _write(tmp_path / "train.jsonl", rows)
    test = _write(tmp_path / "test.jsonl", [{"q": "2+2?", "opts": ["3", "4", "5"], "gold": 1}])
    src = DatasetSource(path="json", data_files={"train": train, "test": test},
                        prompt_field="q", answer_field="gold", choices_field="opts")
    search, held = load_dataset_task("arith", src)
    assert search.kind == "choice" and [it.answer for it in search.items] == [0, 2, 1, 1]
    assert search.items[0].choices == ("2", "3", "4") and search.items[0].prompt == "1+1?"
    assert held.items[0].answer == 1 and held.items[0].choices == ("3", "4", "5")  # an int index


def test_datasets_source_nested_choices_and_errors(tmp_path):
    arc = [{"question": "Sky?", "choices": {"text": ["green", "blue"], "label": ["A", "B"]},
            "answerKey": "B"}]
    f = _write(tmp_path / "arc.jsonl", arc)
    src = DatasetSource(path="json", data_files={"train": f, "test": f}, answer_field="answerKey",
                        choices_field="choices.text")
    search, _ = load_dataset_task("arc", src)
    assert search.items[0].choices == ("green", "blue") and search.items[0].answer == 1

    def err(rows, **kw):
        f = _write(tmp_path / "bad.jsonl", rows)
        src = DatasetSource(path="json", data_files={"train": f, "test": f}, **kw)
        with pytest.raises(EvomergeError) as ei:
            load_dataset_task("bad", src)
        return str(ei.value)

    row = {"question": "q", "answer": "C", "opts": ["x", "y"]}
    assert "answer 'C' is out of range for 2 choices" in err([row], choices_field="opts")
    assert "no field 'choices'" in err([row], choices_field="choices")
    row = {"question": "q", "answer": "maybe", "opts": ["x", "y"]}
    assert "neither one of the choices" in err([row], choices_field="opts")
    row = {"question": "q", "answer": 0, "opts": ["x"]}
    assert "tasks.bad.source: split 'train' row 0: field 'opts' must be a list of at least 2" in err(
        [row], choices_field="opts")
