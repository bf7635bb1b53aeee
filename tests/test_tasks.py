import json

import numpy as np
import pytest

from evomerge.errors import EvomergeError
from evomerge.tasks import Item, Task, extract_answer, load_items, load_task_dir, write_items


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_extractors():
    assert extract_answer("  522 \nmore", "exact") == "522"
    assert extract_answer("the answer is 1,234.", "last_number") == "1234"
    assert extract_answer("3 then 4.50", "last_number") == "4.5"
    assert extract_answer("-7", "last_number") == "-7"
    assert extract_answer("no digits", "last_number") is None
    assert extract_answer("Hello,   World!", "normalized") == "hello world"
    with pytest.raises(EvomergeError, match="unknown extract mode"):
        extract_answer("x", "fuzzy")


def test_score_int8():
    items = [Item("a", "1+1=", "2"), Item("b", "2+2=", "4"), Item("c", "x", "10")]
    t = Task("add", items, max_new_tokens=4)
    s = t.score(["2", "5", "10\njunk"], items)
    assert s.dtype == np.int8 and s.tolist() == [1, 0, 1]
    t2 = Task("add", items, extract="last_number")
    assert t2.score(["it is 2", "4.0", "x"]).tolist() == [1, 1, 0]
    with pytest.raises(EvomergeError, match="3 items"):
        t.score(["2"], items)


def test_template():
    t = Task("t", [Item("a", "1+1=", "2")], template="Q: {prompt}")
    assert t.prompts() == ["Q: 1+1="]
    with pytest.raises(EvomergeError, match="template"):
        Task("t", [], template="no placeholder")


def test_roundtrip_and_task_dir(tmp_path):
    items = [Item(f"i{k}", f"{k}+1=", str(k + 1), subgroup="level1") for k in range(5)]
    write_items(tmp_path / "search.jsonl", items)
    write_items(tmp_path / "heldout.jsonl", items[:2])
    (tmp_path / "task.json").write_text(json.dumps({"name": "inc", "max_new_tokens": 3}))
    t = load_task_dir(tmp_path, "search")
    assert t.name == "inc" and t.max_new_tokens == 3 and t.items == items
    assert len(load_task_dir(tmp_path, "heldout")) == 2


@pytest.mark.parametrize("line,msg", [
    ('{"id": "a", "prompt": "p"}', "line 2|:2: missing field 'answer'"),
    ('{"id": "a", "prompt": 3, "answer": "x"}', ":2: field 'prompt' must be a string"),
    ('{"id": "", "prompt": "p", "answer": "x"}', ":2: field 'id'"),
    ('{"id": "x", "prompt": "p", "answer": "x"', ":2: invalid JSON"),
    ('[1, 2]', ":2: expected a JSON object"),
    ('{"id": "ok", "prompt": "p", "answer": "x"}', ":2: duplicate id 'ok'"),
])
def test_jsonl_validation(tmp_path, line, msg):
    p = _write(tmp_path / "bad.jsonl", ['{"id": "ok", "prompt": "p", "answer": "a"}', line])
    with pytest.raises(EvomergeError) as ei:
        load_items(p)
    text = str(ei.value)
    assert "bad.jsonl" in text
    assert any(m in text for m in msg.split("|")), text


def test_task_dir_errors(tmp_path):
    with pytest.raises(EvomergeError, match="task folder not found"):
        load_task_dir(tmp_path / "nope")
    # task.json is optional: without it the items are what is missing
    with pytest.raises(EvomergeError, match="search.jsonl: item file not found"):
        load_task_dir(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"extract": "fuzzy"}))
    with pytest.raises(EvomergeError, match="'extract'"):
        load_task_dir(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"max_new_tokens": 0}))
    with pytest.raises(EvomergeError, match="max_new_tokens"):
        load_task_dir(tmp_path)
    (tmp_path / "task.json").write_text(json.dumps({"bogus": 1}))
    with pytest.raises(EvomergeError, match="unknown field"):
        load_task_dir(tmp_path)
    (tmp_path / "task.json").write_text("{}")
    with pytest.raises(EvomergeError, match="search.jsonl: item file not found"):
        load_task_dir(tmp_path)
    (tmp_path / "search.jsonl").write_text("\n")
    with pytest.raises(EvomergeError, match="no items"):
        load_task_dir(tmp_path)


# --------------------------------------------------------------------------- multiple choice
_MC = '{"id": "q1", "prompt": "2+2=", "choices": ["3", "4", "5"], "answer": 1}'


def test_choice_items_roundtrip(tmp_path):
    items = [Item("q1", "2+2=", 1, choices=("3", "4", "5")),
             Item("q2", "1+1=", 0, subgroup="easy", choices=("2", "11"))]
    assert items[0].to_dict() == {"id": "q1", "prompt": "2+2=", "choices": ["3", "4", "5"],
                                  "answer": 1}
    write_items(tmp_path / "search.jsonl", items)
    write_items(tmp_path / "heldout.jsonl", items[:1])
    (tmp_path / "task.json").write_text(json.dumps(
        {"name": "mc", "metric": "acc_norm", "choice_delimiter": ""}))
    t = load_task_dir(tmp_path)
    assert t.items == items and t.kind == "choice" and items[0].kind == "choice"
    assert t.metric == "acc_norm" and t.choice_delimiter == ""
    assert [it.to_dict() for it in load_items(tmp_path / "search.jsonl")] == [
        it.to_dict() for it in items]


def test_generation_items_unchanged(tmp_path):
    it = Item("a", "1+1=", "2")
    assert it.choices is None and it.kind == "generate"
    assert it.to_dict() == {"id": "a", "prompt": "1+1=", "answer": "2"}
    assert list(it.to_dict()) == ["id", "prompt", "answer"]
    t = Task("t", [it])
    assert t.kind == "generate" and t.metric == "acc" and t.choice_delimiter == " "


@pytest.mark.parametrize("line,msg", [
    ('{"id": "b", "prompt": "p", "choices": ["x"], "answer": 0}',
     ":2: field 'choices' must be a list of at least 2"),
    ('{"id": "b", "prompt": "p", "choices": "xy", "answer": 0}', ":2: field 'choices' must be"),
    ('{"id": "b", "prompt": "p", "choices": ["x", 3], "answer": 0}',
     ":2: field 'choices' entry 1 must be a non-empty string"),
    ('{"id": "b", "prompt": "p", "choices": ["x", ""], "answer": 0}', ":2: field 'choices' entry 1"),
    ('{"id": "b", "prompt": "p", "choices": ["x", "y"], "answer": "x"}',
     ":2: field 'answer' of a multiple-choice item must be the 0-based index"),
    ('{"id": "b", "prompt": "p", "choices": ["x", "y"], "answer": true}', ":2: field 'answer'"),
    ('{"id": "b", "prompt": "p", "choices": ["x", "y"], "answer": 2}',
     ":2: field 'answer' is 2, out of range for 2 choices"),
    ('{"id": "b", "prompt": "p", "choices": ["x", "y"], "answer": -1}', "out of range"),
    ('{"id": "b", "prompt": "p", "answer": "x"}', ":2: a generate item in a file of choice items"),
])
def test_choice_validation(tmp_path, line, msg):
    p = _write(tmp_path / "mc.jsonl", [_MC, line])
    with pytest.raises(EvomergeError) as ei:
        load_items(p)
    assert "mc.jsonl" in str(ei.value) and msg in str(ei.value), str(ei.value)


def test_mixed_file_names_first_offending_line(tmp_path):
    gen = '{"id": "g%d", "prompt": "p", "answer": "x"}'
    p = _write(tmp_path / "mixed.jsonl", [gen % 1, "", gen % 2, _MC, gen % 3])
    with pytest.raises(EvomergeError, match=r"mixed.jsonl:4: a choice item in a file of "
                                            "generate items"):
        load_items(p)
    with pytest.raises(EvomergeError, match="field 'answer' must be a string"):
        load_items(_write(tmp_path / "g.jsonl", ['{"id": "g", "prompt": "p", "answer": 1}']))


def test_task_json_choice_fields(tmp_path):
    _write(tmp_path / "search.jsonl", [_MC])
    for meta, msg in [({"metric": "f1"}, "'metric' is 'f1'; use one of acc, acc_norm"),
                      ({"choice_delimiter": 1}, "'choice_delimiter' must be a string"),
                      ({"metrics": "acc"}, "unknown field(s) metrics")]:
        (tmp_path / "task.json").write_text(json.dumps(meta))
        with pytest.raises(EvomergeError) as ei:
            load_task_dir(tmp_path)
        assert "task.json" in str(ei.value) and msg in str(ei.value), str(ei.value)
    (tmp_path / "task.json").write_text("{}")
    t = load_task_dir(tmp_path)
    assert (t.kind, t.metric, t.choice_delimiter) == ("choice", "acc", " ")
    with pytest.raises(EvomergeError, match="unknown metric"):
        Task("t", [], metric="f1")
