import numpy as np
import pytest
import torch

from evomerge.backends.hf import HFEvaluator
from evomerge.errors import EvomergeError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluator(zoo):
    return HFEvaluator(zoo.experts["lang"], batch_size=16)


def _plain_greedy(ev, prompt, max_new_tokens):
    """Unbatched greedy decode with no cache: argmax of the full forward at each step."""
    tok = ev.tokenizer
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(ev.model(input_ids=ids).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tok.decode(out, skip_special_tokens=True)


def test_batched_matches_plain_greedy(zoo, evaluator):
    prompts = []
    for t in zoo.task_names:
        task = zoo.load_task(t, "heldout")
        prompts += task.prompts(task.items[:6])
    got = evaluator.generate(prompts, max_new_tokens=12)
    want = [_plain_greedy(evaluator, p, 12) for p in prompts]
    assert got == want
    # and with HF generate on one prompt
    ids = evaluator.tokenizer(prompts[0], return_tensors="pt")
    g = evaluator.model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert evaluator.tokenizer.decode(g[0, ids["input_ids"].shape[1]:],
                                      skip_special_tokens=True) == got[0]


def test_answer_and_set_model(zoo, evaluator):
    task = zoo.load_task("lang", "heldout")
    items = task.items[:40]
    acc = evaluator.answer(task, items)
    assert acc.dtype == np.int8 and acc.shape == (40,)
    base = HFEvaluator(zoo.base)
    evaluator_model = evaluator.model
    evaluator.set_model(base.model)
    try:
        assert np.array_equal(evaluator.answer(task, items), base.answer(task, items))
    finally:
        evaluator.set_model(evaluator_model)
    assert evaluator.generate([]) == []


def test_errors(tmp_path):
    with pytest.raises(EvomergeError, match="config.json"):
        HFEvaluator(tmp_path)
