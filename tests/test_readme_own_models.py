"""README's "Use it on your own models", followed literally: its task.json, its config and its
commands, run in a fresh folder with models in plain folders (copies of zoo models under new
names) and a task in a plain folder (items in the README's format)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    """The fenced code block right after ``<!-- own-models:MARKER -->`` in README.md."""
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- own-models:{re.escape(marker)} -->\s*```\w*\n(.*?)```", text, re.S)
    assert m, f"README.md has no block marked own-models:{marker}"
    return m.group(1)


def test_the_readme_blocks_parse():
    cfg = yaml.safe_load(readme_block("config"))
    assert cfg["tasks"][0]["path"] == "tasks/upper-words" and cfg["run_dir"] == "runs/my-merge"
    assert json.loads(readme_block("task.json"))["name"] == "upper-words"
    assert len(_commands()) == 6 and all(args[0] == "evomerge" for args in _commands())


def _commands() -> list[list[str]]:
    out = []
    for line in readme_block("commands").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(shlex.split(line))
    return out


def test_own_models_section_end_to_end(zoo, tmp_path):
    work = tmp_path
    for name, src in (("base", zoo.base), ("ft-upper", zoo.experts["upper"]), ("ft-lang", zoo.experts["lang"])):
        shutil.copytree(src, work / "models" / name)
    task = work / "tasks" / "upper-words"
    task.mkdir(parents=True)
    for split, n in (("search", 60), ("heldout", 30)):  # the zoo's upper-casing items, written as the README says
        items = [json.loads(line) for line in (zoo.task_dir("upper") / f"{split}.jsonl").read_text().splitlines()[:n]]
        (task / f"{split}.jsonl").write_text("".join(
            json.dumps({"id": it["id"], "prompt": it["prompt"], "answer": it["answer"]}) + "\n" for it in items))
    (task / "task.json").write_text(readme_block("task.json"))
    (work / "my-merge.yaml").write_text(readme_block("config"))
    outputs = []
    for args in _commands():
        assert args[0] == "evomerge"
        p = subprocess.run([sys.executable, "-m", "evomerge.cli", *args[1:]], cwd=work, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, f"{shlex.join(args)}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        outputs.append(p.stdout)
    check, first, more, merge, evaluation, irt_check = outputs
    assert "trial: the base and 2 endpoints" in check and "reference 'QDQX'" in check
    assert "task upper-words: right of 8" in check and "warning" not in check
    assert not (work / "runs" / "my-merge" / "evaluations.jsonl").read_text() == ""
    assert "resuming" in more and (work / "runs" / "my-merge" / "report.md").is_file()
    assert (work / "merged" / "model.safetensors").is_file()
    best = json.loads((work / "runs" / "my-merge" / "best" / "recipe.json").read_text())
    row = [line for line in evaluation.splitlines() if line.startswith("upper-words")]
    assert row and abs(float(row[0].split()[-1]) - best["heldout"]["upper-words"]) < 1e-9  # the same model
    assert "mpirt" not in irt_check and "mean absolute error" in irt_check
