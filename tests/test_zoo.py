import json
import time

import numpy as np
import pytest

from evomerge.zoo import build_zoo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layout(zoo):
    assert (zoo.root / "zoo.json").is_file() and (zoo.root / "zoo_report.md").is_file()
    assert set(zoo.experts) <= set(zoo.task_names) and len(zoo.experts) >= 3
    for name in zoo.task_names:
        d = zoo.task_dir(name)
        meta = json.loads((d / "task.json").read_text())
        assert meta["extract"] == "exact" and meta["max_new_tokens"] > 0
        search, held = zoo.load_task(name, "search"), zoo.load_task(name, "heldout")
        assert len(search) >= 500 and len(held) >= 200
        assert not {i.prompt for i in search.items} & {i.prompt for i in held.items}
    for p in [zoo.base, *zoo.experts.values()]:
        assert (p / "model.safetensors").is_file() and (p / "config.json").is_file()


def test_loads_with_auto_classes(zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(zoo.base)
    ids = tok("12+7=")["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == 6
    assert tok.decode(ids, skip_special_tokens=True) == "12+7="
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    model = AutoModelForCausalLM.from_pretrained(zoo.base)
    assert isinstance(model, LlamaForCausalLM)
    n = sum(p.numel() for p in model.parameters())
    assert 3e5 < n < 3e6


def test_cache_hit_is_fast(zoo):
    t = time.time()
    z2 = build_zoo(root=zoo.root, verbose=False)
    assert time.time() - t < 2.0
    assert z2.base == zoo.base and z2.experts == zoo.experts


def _acc(zoo):
    return zoo.manifest["heldout_accuracy"]


def test_experts_beat_base(zoo):
    acc = _acc(zoo)
    for t in zoo.experts:
        assert acc[f"{t}_expert"][t] >= acc["base"][t] + 0.15, (t, acc)


def test_merge_matters(zoo):
    acc = _acc(zoo)
    tasks = zoo.task_names

    def avg(label):
        return float(np.mean([acc[label][t] for t in tasks]))

    endpoints = ["base"] + [f"{t}_expert" for t in zoo.experts]
    merges = [k for k in acc if k not in endpoints]
    best = max(merges, key=avg)
    assert avg(best) > max(avg(e) for e in endpoints) + 0.05, acc
    assert min(avg(m) for m in merges) < avg(best) - 0.2, acc  # a bad merge is clearly worse


def test_report_accuracy_is_reproducible(zoo):
    """The accuracy recorded in the manifest matches a fresh evaluation of the checkpoint."""
    from evomerge.backends.hf import HFEvaluator

    name = next(iter(zoo.experts))
    task = zoo.load_task(name, "heldout")
    ev = HFEvaluator(zoo.experts[name], batch_size=128)
    acc = float(ev.answer(task).mean())
    assert abs(acc - _acc(zoo)[f"{name}_expert"][name]) < 1e-9


def test_refuses_to_replace_a_foreign_folder(tmp_path):
    from evomerge.errors import EvomergeError

    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(EvomergeError, match="not a zoo"):
        build_zoo(root=tmp_path, verbose=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_cli_zoo_build_cached(zoo, capsys):
    from evomerge.cli import main

    main(["zoo", "build", "--root", str(zoo.root)])
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and f"zoo ready at {zoo.root}" in out
