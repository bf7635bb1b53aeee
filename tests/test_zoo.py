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

    endpoints = ["base"] + [f"{t}_expert" for t in zoo.experts] + list(zoo.extra_models)
    merges = [k for k in acc if k not in endpoints]
    best = max(merges, key=avg)
    assert avg(best) > max(avg(e) for e in endpoints) + 0.05, acc
    assert min(avg(m) for m in merges) < avg(best) - 0.2, acc  # a bad merge is clearly worse


def test_strong_expert_is_base_plus_twice_the_task_vector(zoo):
    """cipher_strong = base + 2 (cipher_expert - base): an extra endpoint, not a task."""
    import torch
    from safetensors.torch import load_file

    from evomerge.models import resolve_model

    assert set(zoo.extra_models) == {"cipher_strong"}
    strong_dir = zoo.extra_models["cipher_strong"]
    assert resolve_model("zoo:cipher_strong") == strong_dir
    assert "cipher_strong" not in zoo.task_names and "cipher_strong" not in zoo.expert_tasks
    assert "cipher_strong" not in list(zoo.experts)  # iterating experts: the task experts only
    for f in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (strong_dir / f).is_file()
    base = load_file(zoo.base / "model.safetensors")
    expert = load_file(zoo.experts["cipher"] / "model.safetensors")
    strong = load_file(strong_dir / "model.safetensors")
    assert set(strong) == set(base)
    moved = 0.0
    for k, b in base.items():
        want = b + 2.0 * (expert[k] - b)
        assert torch.allclose(strong[k], want, rtol=0, atol=1e-6), k
        moved = max(moved, float((strong[k] - expert[k]).abs().max()))
    assert moved > 1e-3  # not the expert itself
    # it knows its task (an overshoot: less exact than the expert on the generation task, still
    # far above the base, and it still ranks the right cipher answer first), and only its task
    acc, strong_acc = _acc(zoo), _acc(zoo)["cipher_strong"]
    assert strong_acc["cipher"] >= acc["base"]["cipher"] + 0.25, strong_acc
    assert strong_acc["cipher_choice"] >= 0.9 > acc["base"]["cipher_choice"], strong_acc
    assert max(strong_acc[t] for t in ("lang", "upper")) <= acc["base"]["cipher"] + 0.05, strong_acc
    assert "cipher_strong" in zoo.report


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


def test_one_model_resolver_for_merge_eval_and_search(zoo, tmp_path):
    """`zoo:NAME` and recipe-relative folders mean the same model in a recipe (merge, eval) as in
    a search config: one resolver, evomerge.models.resolve_model."""
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    from evomerge.errors import EvomergeError
    from evomerge.models import resolve_model

    shutil.copytree(zoo.experts["lang"], tmp_path / "recipes" / "lang_copy")
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("merge_method: task_arithmetic\nbase_model: zoo:base\nmodels:\n"
                      "  - model: lang_copy\n    parameters: {weight: 1.0}\n"
                      "  - model: zoo:upper\n    parameters: {weight: 0.0}\n")
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), "--out", str(tmp_path / "m")],
                         capture_output=True, text=True, cwd=tmp_path)  # cwd: not the recipe's folder
    assert out.returncode == 0, out.stderr
    merged, lang = load_file(tmp_path / "m" / "model.safetensors"), load_file(zoo.experts["lang"] / "model.safetensors")
    assert all((merged[k].float() - lang[k].float()).abs().max() < 1e-5 for k in lang)
    assert resolve_model("lang_copy", base_dir=recipe.parent) == (tmp_path / "recipes" / "lang_copy").absolute()
    with pytest.raises(EvomergeError, match=r"tokenizer_source 'nowhere': folder not found .*recipe's folder"):
        resolve_model("nowhere", base_dir=recipe.parent, what="tokenizer_source")
    with pytest.raises(EvomergeError, match=r"MODEL 'zoo:nope': 'zoo:nope' is not in the zoo"):
        resolve_model("zoo:nope", what="MODEL")
