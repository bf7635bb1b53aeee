"""``evomerge eval``: the accuracy of a checkpoint, a zoo model or a recipe (merged in memory) on
tasks, equal to what the evaluator measures directly and to the merge written to disk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from evomerge.cli import main

LIMIT = 30


def _run(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def _eval_json(argv, tmp: Path, capsys, name="e.json") -> dict:
    out = tmp / name
    code, stdout, err = _run(["eval", *argv, "--json", out], capsys)
    assert code == 0, err
    assert "average" in stdout
    return json.loads(out.read_text())


def _reference(path, task, limit=LIMIT) -> float:
    from evomerge.backends.hf import HFEvaluator

    task.items = task.items[:limit]
    ev = HFEvaluator(path, num_threads=1)
    try:
        return float(np.mean(ev.answer(task)))
    finally:
        ev.close()


def _ta_recipe(zoo) -> str:
    root = Path(zoo.root) / "models"
    lines = ["merge_method: task_arithmetic", f"base_model: {root / 'base'}", "models:"]
    for m in ("lang_expert", "cipher_expert", "upper_expert"):
        lines += [f"  - model: {root / m}", "    parameters: {weight: 1.0}"]
    return "\n".join(lines + ["dtype: float32"]) + "\n"


def test_checkpoint_equals_evaluator(zoo, one_thread, tmp_path, capsys):
    """zoo:lang on lang (held-out) and on the multiple-choice cipher_choice = HFEvaluator's answers."""
    res = _eval_json(["zoo:lang", "--task", "zoo:lang", "--task", "zoo:cipher_choice",
                      "--limit", LIMIT], tmp_path, capsys)
    assert set(res) >= {"model", "split", "backend", "accuracy", "average", "items"}
    assert res["model"] == "zoo:lang" and res["split"] == "heldout" and res["backend"] == "hf"
    assert res["items"] == {"lang": LIMIT, "cipher_choice": LIMIT}
    assert res["accuracy"]["lang"] == _reference(zoo.experts["lang"], zoo.load_task("lang", "heldout"))
    assert res["accuracy"]["cipher_choice"] == _reference(zoo.experts["lang"],
                                                          zoo.load_task("cipher_choice", "heldout"))
    assert res["average"] == pytest.approx(np.mean(list(res["accuracy"].values())))
    assert res["accuracy"]["lang"] > 0.8  # the expert on its own task
    assert [p.name for p in tmp_path.iterdir()] == ["e.json"]  # no temporary leftovers


def test_task_folder_and_search_split(zoo, one_thread, tmp_path, capsys):
    """A task given as a folder; --split search reads search.jsonl; the table lists the task."""
    folder = zoo.task_dir("cipher_choice")
    code, out, err = _run(["eval", zoo.experts["cipher"], "--task", folder, "--split", "search",
                           "--limit", 12], capsys)
    assert code == 0, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:]}
    assert rows["cipher_choice"][0] == "12"
    acc = _reference(zoo.experts["cipher"], zoo.load_task("cipher_choice", "search"), 12)
    assert float(rows["cipher_choice"][1]) == pytest.approx(acc, abs=1e-4)
    assert float(rows["average"][1]) == pytest.approx(acc, abs=1e-4)


def test_recipe_in_memory_equals_merge_on_disk(zoo, one_thread, tmp_path, capsys):
    """A task-arithmetic recipe (base + 3 experts, weights 1) merged in memory scores exactly what
    its merge written by `evomerge merge` scores; a run's best/recipe.json form too."""
    recipe = tmp_path / "ta.yaml"
    recipe.write_text(_ta_recipe(zoo))
    before = set(os.listdir(Path(zoo.root) / "models"))
    tasks = ["--task", "zoo:lang", "--task", "zoo:cipher", "--limit", LIMIT]
    mem = _eval_json([recipe, *tasks], tmp_path, capsys, "mem.json")
    assert set(os.listdir(Path(zoo.root) / "models")) == before  # nothing written next to the models
    code, _, err = _run(["merge", recipe, "--out", tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    disk = _eval_json([tmp_path / "merged", *tasks], tmp_path, capsys, "disk.json")
    assert mem["accuracy"] == disk["accuracy"] and mem["average"] == disk["average"]
    assert mem["accuracy"]["lang"] > 0.8 and mem["accuracy"]["cipher"] > 0.8

    from evomerge.merge.mergekit_io import load_recipe

    best = tmp_path / "run" / "best"
    best.mkdir(parents=True)
    (best / "recipe.json").write_text(json.dumps({"index": 3, "recipe_resolved":
                                                  load_recipe(recipe).to_dict()}))
    again = _eval_json([best / "recipe.json", *tasks], tmp_path, capsys, "json.json")
    assert again["accuracy"] == mem["accuracy"]


def test_relative_recipe_paths(zoo, one_thread, tmp_path, capsys):
    """Relative model paths in a recipe resolve against the recipe's folder."""
    import shutil

    models = tmp_path / "models"
    for m in ("base", "lang_expert"):
        shutil.copytree(Path(zoo.root) / "models" / m, models / m)
    sub = tmp_path / "recipes"
    sub.mkdir()
    (sub / "r.yaml").write_text("merge_method: task_arithmetic\nbase_model: ../models/base\nmodels:\n"
                                "  - model: ../models/lang_expert\n    parameters: {weight: 1.0}\n")
    res = _eval_json([sub / "r.yaml", "--task", "zoo:lang", "--limit", 10], tmp_path, capsys)
    assert res["accuracy"]["lang"] == _reference(zoo.experts["lang"], zoo.load_task("lang", "heldout"), 10)


@pytest.mark.parametrize("argv, words", [
    (["{tmp}/missing_model", "--task", "zoo:lang"], ["MODEL", "missing_model", "not found"]),
    (["zoo:nosuch", "--task", "zoo:lang"], ["MODEL", "zoo:nosuch", "not in the zoo"]),
    (["zoo:lang", "--task", "zoo:nosuch"], ["--task", "zoo:nosuch", "no task"]),
    (["zoo:lang", "--task", "{tmp}/no_task"], ["--task", "no_task", "not found"]),
    (["zoo:lang", "--task", "zoo:lang", "--split", "test"], ["--split", "test", "heldout or search"]),
    (["zoo:lang", "--task", "zoo:lang", "--limit", "0"], ["--limit"]),
    (["zoo:lang", "--task", "zoo:lang", "--dtype", "int8"], ["--dtype", "int8"]),
    (["zoo:lang", "--task", "zoo:lang", "--device", "gpu"], ["--device", "gpu", "not a device name"]),
    (["zoo:lang", "--task", "zoo:lang", "--device", "cuda:99"], ["--device", "cuda:99", "but"]),
    (["zoo:lang", "--task", "zoo:lang", "--backend", "tpu"], ["--backend", "tpu"]),
    (["{tmp}/notes.txt", "--task", "zoo:lang"], ["MODEL", "not a recipe"]),
    (["{tmp}/r.yaml", "--task", "zoo:lang"], ["MODEL", "folder not found"]),
    (["{tmp}/dataflow.json", "--task", "zoo:lang"], ["MODEL", "data-flow", "best/model"]),
    (["zoo:lang", "--task", "zoo:lang", "--task", "zoo:lang"], ["given twice"]),
    (["zoo:lang", "--task", "zoo:lang", "--json", "{tmp}"], ["--json", "is a folder"]),
    (["zoo:lang", "--task", "zoo:lang", "--json", "{tmp}/notes.txt/out.json"], ["--json", "is a file"]),
    (["{tmp}/ok.yaml", "--task", "zoo:lang", "--json", "{tmp}/ok.yaml"], ["--json", "is the input MODEL"]),
    (["zoo:lang", "--task", "zoo:lang", "--json", "{zoo}/models/lang_expert/eval.json"],
     ["--json", "inside the input folder"]),
    (["zoo:lang"], ["--task"]),
])
def test_errors_exit_2(zoo, tmp_path, capsys, argv, words):
    (tmp_path / "notes.txt").write_text("my notes\n")
    (tmp_path / "r.yaml").write_text("merge_method: linear\nmodels:\n  - model: ./no_such_model\n"
                                     "    parameters: {weight: 1.0}\n")
    (tmp_path / "ok.yaml").write_text(_ta_recipe(zoo))
    (tmp_path / "dataflow.json").write_text(json.dumps({"index": 1, "recipe": {"steps": []},
                                                        "model_a": "a", "model_b": "b"}))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    zoo_models = sorted(os.listdir(Path(zoo.root) / "models" / "lang_expert"))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{zoo}", str(zoo.root)) for a in argv]
    code, out, err = _run(["eval", *argv], capsys)
    assert code == 2, (out, err)
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # inputs untouched
    assert sorted(os.listdir(Path(zoo.root) / "models" / "lang_expert")) == zoo_models


def test_subprocess_cli(zoo, tmp_path):
    """The entry point as a process: `eval` is listed; a bad MODEL is one line and exit 2 (the
    successful path is covered in process above: a subprocess pays torch's import again)."""
    import subprocess
    import sys

    helped = subprocess.run([sys.executable, "-m", "evomerge.cli", "--help"], capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "eval" in helped.stdout
    bad = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", str(tmp_path / "nope"),
                          "--task", "zoo:upper"], capture_output=True, text=True)
    assert bad.returncode == 2 and "MODEL" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
