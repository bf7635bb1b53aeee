"""`evomerge irt fit / anchors / estimate` end to end on files (issue 3)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.cli import main
from irt.io import write_responses


def _sim(M, I, seed):
    rng = np.random.default_rng(seed)
    th = rng.standard_normal((M, 2))
    b = np.random.default_rng(0).normal(0, 1.2, I)  # same items for every call
    a = np.abs(np.random.default_rng(1).normal(1.0, 0.5, (I, 2)))
    return (rng.random((M, I)) < 1 / (1 + np.exp(-(th @ a.T - b)))).astype(float)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("irtcli")
    items = [f"q{i}" for i in range(120)]
    Y = _sim(60, 120, 0)
    Y[5, 3] = np.nan
    write_responses(d / "calib.csv", Y, items, [f"m{k}" for k in range(60)])
    T = _sim(4, 120, 1)
    write_responses(d / "test.jsonl", T, items, [f"t{k}" for k in range(4)])
    write_responses(d / "endpoints.npz", Y[:2], items, ["e0", "e1"])
    (d / "items.jsonl").write_text("".join(json.dumps({"id": i, "prompt": "", "answer": "", "subgroup": "g" + str(k % 2)})
                                           + "\n" for k, i in enumerate(items)))
    return d, T


def run(capsys, *args):
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_fit_anchors_estimate(files, capsys):
    d, T = files
    code, out, err = run(capsys, "irt", "fit", d / "calib.csv", "--out", d / "bank.safetensors", "--dim", 2,
                         "--task", "toy", "--items", d / "items.jsonl")
    assert code == 0 and "d = 2" in out, err
    code, out, err = run(capsys, "irt", "anchors", d / "bank.safetensors", "-n", 10, "--method", "irt",
                         "--stratify", "-o", d / "anchors.json")
    assert code == 0, err
    anc = json.loads((d / "anchors.json").read_text())
    assert len(anc["item_ids"]) == 10 and abs(sum(anc["weights"]) - 1) < 1e-9
    code, out, err = run(capsys, "irt", "anchors", d / "bank.safetensors", "-n", 5, "--method", "random")
    assert code == 0 and json.loads(out)["method"] == "random"
    for extra in (["--endpoints", "m0,m1"], ["--endpoint-answers", d / "endpoints.npz"]):
        code, out, err = run(capsys, "irt", "estimate", d / "bank.safetensors", d / "test.jsonl",
                             "--anchors", d / "anchors.json", "--estimator", "mpirt", *extra, "--json")
        assert code == 0, err
        rows = [json.loads(x) for x in out.splitlines()]
        assert [r["subject"] for r in rows] == ["t0", "t1", "t2", "t3"]
        assert all(0 <= r["accuracy"] <= 1 for r in rows)
    # every item answered, no anchors file: exact
    code, out, err = run(capsys, "irt", "estimate", d / "bank.safetensors", d / "test.jsonl", "-e", "pirt")
    assert code == 0
    got = [float(x.split("\t")[1]) for x in out.splitlines()]
    assert np.allclose(got, T.mean(1), atol=1e-4)


def test_cli_errors(files, capsys):
    d, _ = files
    (d / "bad.csv").write_text("subject,q1\ns,7\n")
    code, _, err = run(capsys, "irt", "fit", d / "bad.csv", "--out", d / "x.safetensors")
    assert code == 2 and "error:" in err and "bad.csv, line 2" in err
    code, _, err = run(capsys, "irt", "anchors", d / "missing.safetensors")
    assert code == 2 and "no such file" in err
    if not (d / "bank.safetensors").exists():
        run(capsys, "irt", "fit", d / "calib.csv", "--out", d / "bank.safetensors", "--dim", 2)
    (d / "unknown.jsonl").write_text(json.dumps({"subject": "s", "answers": {"q1": 1, "nope": 0}}) + "\n")
    code, _, err = run(capsys, "irt", "estimate", d / "bank.safetensors", d / "unknown.jsonl")
    assert code == 2 and "not in the item bank" in err and "nope" in err
    code, _, err = run(capsys, "irt", "estimate", d / "bank.safetensors", d / "test.jsonl", "-e", "mpirt")
    assert code == 2 and "--endpoints" in err
    code, _, err = run(capsys, "irt", "anchors", d / "bank.safetensors", "--method", "nope")
    assert code == 2 and "unknown method" in err
