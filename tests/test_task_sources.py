"""Tasks from the `datasets` library, read from local JSON files (no hub access)."""

import json

import pytest

from evomerge.config import DatasetSource
from evomerge.errors import EvomergeError
from evomerge.tasks.sources import load_dataset_task


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_gsm8k_style_source(tmp_path):
    _write(tmp_path / "train.jsonl", [{"question": f"What is {i}+1?", "answer": f"so... #### {i + 1}"}
                                      for i in range(5)])
    _write(tmp_path / "test.jsonl", [{"question": "What is 9+1?", "answer": "#### 10"}])
    src = DatasetSource(path="json", data_files={"train": str(tmp_path / "train.jsonl"),
                                                 "test": str(tmp_path / "test.jsonl")},
                        answer_regex=r"#### (.*)", limit=3)
    search, heldout = load_dataset_task("math", src)
    assert [it.answer for it in search.items] == ["1", "2", "3"]
    assert heldout.items[0].prompt == "What is 9+1?"
    assert search.extract == "last_number"
    assert search.score(["The answer is 1.", "3", "2"]).tolist() == [1, 0, 0]


def test_source_errors_name_the_field(tmp_path):
    _write(tmp_path / "train.jsonl", [{"q": "x", "answer": "1"}])
    src = DatasetSource(path="json", data_files={"train": str(tmp_path / "train.jsonl"),
                                                 "test": str(tmp_path / "train.jsonl")})
    with pytest.raises(EvomergeError, match="no field 'question'"):
        load_dataset_task("t", src)
    src = DatasetSource(path="json", data_files={"train": str(tmp_path / "missing.jsonl")})
    with pytest.raises(EvomergeError, match="could not load"):
        load_dataset_task("t", src)
