"""`evomerge search` end to end on the zoo: the loop, the run directory, resume after SIGKILL."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.report import write_report
from evomerge.search.loop import run_search
from evomerge.search.rundir import read_jsonl

REPO = Path(__file__).resolve().parents[1]


def small_config(run_dir, **over) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["run_dir"] = str(run_dir)
    cfg["calibration"]["samples"] = 4
    cfg["fitness"]["anchors"] = 10
    cfg["fitness"]["rounds"] = 1          # fixed anchors here; test_adaptive_anchors_search covers rounds > 1
    cfg["optimizer"]["generations"] = 3
    cfg["optimizer"]["population"] = 4
    cfg["final"]["top_k"] = 2
    cfg["final"]["baselines"] = False     # the default merges on held-out: reference_run covers them
    for task in cfg["tasks"]:
        task["search_limit"] = 200        # a smaller calibration: the test is about the loop
    for key, value in over.items():
        section, _, field = key.partition(".")
        if field:
            cfg[section][field] = value
        else:
            cfg[section] = value
    return cfg


def short_heldout_tasks(folder, names=("lang", "cipher", "upper"), heldout=100) -> list[dict]:
    """The zoo's tasks as task folders with only the first ``heldout`` held-out items (the held-out
    stage is most of a small run's work) and the same 200 search items, for tests whose point is
    not the held-out numbers."""
    import os
    import shutil

    tasks = []
    for name in names:
        dst = Path(folder) / name
        if not dst.exists():
            shutil.copytree(Path(os.environ["EVOMERGE_ZOO"]) / "tasks" / name, dst)  # set by conftest
            held = (dst / "heldout.jsonl").read_text().splitlines(keepends=True)
            (dst / "heldout.jsonl").write_text("".join(held[:heldout]))
        tasks.append({"path": str(dst), "name": name, "search_limit": 200})
    return tasks


def write_config(tmp_path, name="cfg.yaml", **over) -> Path:
    run_dir = tmp_path / "run"
    p = tmp_path / name
    p.write_text(yaml.safe_dump(small_config(run_dir, **over)))
    return p


@pytest.fixture(scope="module")
def reference_run(zoo, tmp_path_factory):
    """One uninterrupted small run, in process."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = parse_config(small_config(tmp / "run", **{"final.baselines": True}))
    lines = []
    rd = run_search(cfg, log=lines.append)
    write_report(rd)  # as `evomerge search` does after the run
    return rd, lines


def test_search_writes_a_complete_run(reference_run):
    rd, lines = reference_run
    evals = read_jsonl(rd.evaluations)
    assert len(evals) == 3 * 4
    assert [e["index"] for e in evals] == list(range(12))
    rec = evals[0]
    assert set(rec) >= {"genome", "recipe", "answers", "estimates", "fitness", "timings"}
    assert all(len(a) == 10 for a in rec["answers"].values())        # anchors only
    assert rd.state()["stage"] == "done"
    import irt

    for task in ("lang", "cipher", "upper"):
        # the expected error of the fitness estimates, cross-fitted on the 4 sampled calibration models
        check = irt.ItemBank.load(rd.bank_path(task)).meta["estimate_check"]
        assert check["n"] == 10 and check["folds"] == 4 and check["n_subjects"] == 4
        assert check["estimator"] == "mpirt" and 0 < check["mae"] < 0.5
    assert any(line.startswith("    expected error of the 10-item estimate:") for line in lines)
    best = json.loads((rd.best / "recipe.json").read_text())
    assert best["heldout_average"] > 0
    assert (rd.best / "recipe.mergekit.yaml").exists()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(rd.best / "model")          # loads with no custom code
    for png in ("fitness.png", "estimated_vs_true.png", "best_genes.png"):
        assert (rd.root / png).stat().st_size > 1000
    report = rd.report.read_text()
    assert "Held-out accuracy" in report and "## Item banks" in report
    assert f"| lang | {irt.ItemBank.load(rd.bank_path('lang')).dim} | 8 |" in report
    assert any(line.startswith("gen   3/3") for line in lines)


def test_default_merges_are_measured_next_to_the_candidates(zoo, reference_run):
    """The held-out stage also evaluates the default merges; each equals that merge done by hand."""
    from evomerge.backends.hf import HFEvaluator
    from evomerge.search.baselines import gain_over_baselines

    rd, lines = reference_run
    held = read_jsonl(rd.heldout)
    base_rows = {h["name"]: h for h in held if h["name"].startswith("baseline:")}
    assert sorted(base_rows) == ["baseline:dare_ties", "baseline:linear", "baseline:ta-1", "baseline:ta-1/3",
                                 "baseline:ties"]
    ev = HFEvaluator(zoo.base, num_threads=1, batch_size=128)
    want = {"merge_method": "task_arithmetic", "base_model": str(zoo.base), "dtype": "float32",
            "models": [{"model": str(zoo.experts[t]), "parameters": {"weight": 1.0}} for t in ("lang", "cipher", "upper")]}
    assert base_rows["baseline:ta-1"]["recipe"] == want
    from evomerge.merge.engine import InMemoryMerger
    from evomerge.merge.recipe import MergeRecipe

    InMemoryMerger([zoo.base, *zoo.experts.values()]).apply(MergeRecipe.from_dict(want), ev.model)
    task = zoo.load_task("upper", "heldout")
    assert base_rows["baseline:ta-1"]["accuracy"]["upper"] == float(ev.answer(task).mean())
    gain = gain_over_baselines(held)
    assert gain["baseline"] == max(base_rows.values(), key=lambda h: h["average"])["name"]
    assert any("\ngain of candidate-" in line for line in lines)
    assert "over the best default merge" in rd.report.read_text()


def test_report_command_redraws(reference_run):
    rd, _ = reference_run
    rd.report.unlink()
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "report", str(rd.root)],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert rd.report.exists()


def _launch(args, cwd):
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, predicate, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError("process ended before the kill point:\n" + proc.stdout.read())
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("kill point never reached")


def _lines(path):
    return len(read_jsonl(path)) if path.exists() else 0


def test_resume_after_sigkill_reaches_the_same_best(reference_run, tmp_path):
    """Kill -9 during calibration, mid-generation, mid-write and during the held-out stage;
    no evaluation lost or re-run."""
    ref_rd, _ = reference_run
    cfg = write_config(tmp_path)
    run = tmp_path / "run"
    # 1. during calibration
    p = _launch(["search", str(cfg)], REPO)
    _kill_when(p, lambda: _lines(run / "calibration.jsonl") >= 2)
    # 2. mid-generation
    p = _launch(["search", "--resume", str(run)], REPO)
    _kill_when(p, lambda: _lines(run / "evaluations.jsonl") >= 6)
    n_before = _lines(run / "evaluations.jsonl")
    kept = read_jsonl(run / "evaluations.jsonl")
    assert re.search(r"\| 2 \(in progress: [1-4] candidates? so far\) \|", write_report(run).read_text())
    # 3. "while writing": what a kill in the middle of an append leaves behind
    with open(run / "evaluations.jsonl", "a") as fh:
        fh.write('{"index": %d, "generation": 1, "genome": [0.1' % n_before)
    # 4. during the end of the run (held-out re-evaluation, before the best model is written)
    p = _launch(["search", "--resume", str(run)], REPO)
    _kill_when(p, lambda: _lines(run / "heldout.jsonl") >= 3)
    assert not (run / "best" / "model").exists() or (run / "best" / "model" / "config.json").exists()
    p = _launch(["search", "--resume", str(run)], REPO)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert [h["name"] for h in read_jsonl(run / "heldout.jsonl")] == \
        [h["name"] for h in read_jsonl(ref_rd.heldout)
         if not h["name"].startswith("baseline:")]                  # none re-evaluated
    evals = read_jsonl(run / "evaluations.jsonl")
    assert [e["index"] for e in evals] == list(range(12))             # nothing lost or re-run
    assert evals[:n_before] == kept
    ref = read_jsonl(ref_rd.evaluations)
    assert [e["genome"] for e in evals] == [e["genome"] for e in ref]
    assert [e["fitness"] for e in evals] == [e["fitness"] for e in ref]
    a = json.loads((run / "best" / "recipe.json").read_text())
    b = json.loads((ref_rd.best / "recipe.json").read_text())
    assert a["genome"] == b["genome"] and a["heldout"] == b["heldout"]


def test_sigterm_stops_like_ctrl_c_and_says_how_to_resume(zoo, tmp_path):
    """SIGTERM mid-calibration: exit 130, the command to resume printed; resume then notes a torn
    last line it cuts, and replayed generations say they are replayed."""
    cfg = write_config(tmp_path, **{"optimizer.generations": 2})
    run = tmp_path / "run"
    p = _launch(["search", str(cfg)], REPO)
    t0 = time.time()
    while _lines(run / "calibration.jsonl") < 1:
        assert p.poll() is None and time.time() - t0 < 240, "never reached calibration"
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert f"evomerge search --resume {run}" in out and "Traceback" not in out
    with open(run / "calibration.jsonl", "a") as fh:
        fh.write('{"name": "sample-0')  # what a kill mid-append leaves
    p = _launch(["search", "--resume", str(run), "--generations", "1"], REPO)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert "calibration.jsonl: dropped a partial last line" in out
    p = _launch(["search", "--resume", str(run), "--generations", "2"], REPO)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out
    assert re.search(r"gen +1/2 .*\(replayed from the log\)", out) and "cand/min" in out


def test_resume_refuses_a_changed_config(reference_run, tmp_path):
    rd, _ = reference_run
    changed = tmp_path / "changed.yaml"
    cfg = small_config(rd.root, **{"final.baselines": True})
    cfg["fitness"]["anchors"] = 15
    changed.write_text(yaml.safe_dump(cfg))
    out = subprocess.run([sys.executable, "-m", "evomerge.cli", "search", str(changed),
                          "--resume", str(rd.root)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2
    assert "fitness.anchors" in out.stderr and "Traceback" not in out.stderr


def test_new_run_refuses_an_existing_run_dir(reference_run):
    rd, _ = reference_run
    cfg = parse_config(small_config(rd.root, **{"final.baselines": True}))
    with pytest.raises(EvomergeError, match="--resume"):
        run_search(cfg)


@pytest.mark.parametrize("field,value,pattern", [
    ("merge_compute", "cuda:99", r"evaluator\.merge_compute: 'cuda:99', but .*(no CUDA GPU|GPU\(s\))"),
    ("merge_device", "gpu", r"evaluator\.merge_device: 'gpu' is not a device name"),
    ("device", "mps", r"evaluator\.device: 'mps': only cpu and cuda"),
])
def test_a_device_the_machine_lacks_is_refused_before_the_run_starts(zoo, tmp_path, field, value, pattern):
    cfg = small_config(tmp_path / "run")
    cfg["evaluator"][field] = value
    with pytest.raises(EvomergeError, match=pattern):
        run_search(parse_config(cfg), log=lambda *_: None)
    assert not (tmp_path / "run").exists()


def test_an_endpoint_with_an_added_token(zoo, reference_run, tmp_path):
    """A fine-tune that added a token (more embedding rows than the base): refused before the run
    starts unless models.tokenizer_source: base; with it the run completes, the endpoint answers
    exactly as the expert it was made from, and the best model keeps the base's vocabulary."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    ref_rd, _ = reference_run
    lang = tmp_path / "lang_plus_token"
    tok = AutoTokenizer.from_pretrained(zoo.experts["lang"])
    n_base = len(tok)
    tok.add_tokens(["<tool>"])
    m = LlamaForCausalLM.from_pretrained(zoo.experts["lang"])
    m.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        m.lm_head.weight[n_base:] = 10.0  # would win every argmax if it were kept
    m.save_pretrained(lang)
    tok.save_pretrained(lang)
    cfg = small_config(tmp_path / "run")
    cfg["models"]["endpoints"] = [str(lang), "zoo:cipher", "zoo:upper"]
    cfg["optimizer"]["generations"] = 1
    with pytest.raises(EvomergeError, match=r"vocabularies differ in size .*lang_plus_token: %d.*"
                                            r"set `models.tokenizer_source: base`" % (n_base + 1)):
        run_search(parse_config(cfg), log=lambda *_: None)
    assert not (tmp_path / "run").exists()
    cfg["models"]["tokenizer_source"] = "base"
    rd = run_search(parse_config(cfg), log=lambda *_: None)
    calib = {r["name"]: r["answers"] for r in read_jsonl(rd.calibration)}
    ref = {r["name"]: r["answers"] for r in read_jsonl(ref_rd.calibration)}
    assert calib[str(lang)] == ref["zoo:lang"]
    best = json.loads((rd.best / "recipe.json").read_text())
    assert best["recipe"]["tokenizer_source"] == "base"
    assert json.loads((rd.best / "model" / "config.json").read_text())["vocab_size"] == n_base
    assert len(AutoTokenizer.from_pretrained(rd.best / "model")) == n_base
    with pytest.raises(Exception, match="tokenizer_source: 'union' cannot be searched"):
        parse_config({**cfg, "models": {**cfg["models"], "tokenizer_source": "union"}})


def _cli(args, capsys) -> tuple[int, str, str]:
    """``evomerge ARGS`` run in this process (the CLI's own entry point, without a fresh interpreter's
    imports): exit status, stdout, stderr."""
    from evomerge.cli import main

    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_check_prints_the_plan_and_writes_nothing(zoo, reference_run, tmp_path, capsys):
    cfg_path = write_config(tmp_path, **{"final.baselines": True})
    code, out, err = _cli(["search", str(cfg_path), "--check"], capsys)
    assert code == 0, err
    assert "calibration: 8 models × 600 items = 4,800 answers" in out
    assert "population 4 × 3 generations = 12 candidates × 30 items = 360 answers" in out
    assert "held-out: (4 endpoints + 5 default merges + top 2 candidates) × 900 items = 9,900 answers" in out
    assert "trial: the base and 3 endpoints answer the first 8 search items of each task" in out
    assert "task upper: right of 8 — base 0, zoo:lang 0, zoo:cipher 0, zoo:upper 8" in out  # the experts know theirs
    assert "extracted  'QDQX'" not in out and "reference 'QDQX'" in out                   # the base's answer, shown
    assert "time (estimated from the trial): calibration ~" in out and "warning" not in out
    assert not (tmp_path / "run").exists()
    rd, _ = reference_run
    code, out, err = _cli(["search", "--resume", str(rd.root), "--check"], capsys)
    assert code != 0 and "--check is for a new run" in err


def test_check_warns_of_a_task_no_model_answers_and_of_overlapping_splits(zoo, tmp_path, capsys):
    """A task whose references no model can produce (a wrong extract mode, a wrong answer field...)
    and a held-out file that copies the search file: `--check` says so, before anything is written."""
    task = tmp_path / "mytask"
    task.mkdir()
    rows = (zoo.task_dir("upper") / "search.jsonl").read_text().splitlines()[:40]
    broken = "".join(line.replace('"answer": "', '"answer": "#') + "\n" for line in rows)  # '#QDQX': never produced
    (task / "search.jsonl").write_text(broken)
    (task / "heldout.jsonl").write_text(broken)
    cfg = write_config(tmp_path, tasks=[{"path": str(task), "name": "mytask"}])
    code, out, err = _cli(["search", str(cfg), "--check", "--trial-items", "4"], capsys)
    assert code == 0, err
    assert "task mytask: right of 4 — base 0, zoo:lang 0, zoo:cipher 0, zoo:upper 0" in out
    assert "reference '#" in out
    assert "warning: task 'mytask': no model answered any of its first 4 search items right" in out
    assert "warning: task 'mytask': 40 of 40 held-out items have the prompt of a search item (every one" in out
    assert not (tmp_path / "run").exists()


def test_the_irt_commands_read_a_run_directory(reference_run, tmp_path, capsys):
    """`irt export|check|fit RUN --task T`: the calibration answers of T as a response matrix
    (bit i = search item i), its subgroups and endpoints; the run's own banks keep the subgroups."""
    import irt
    from irt.io import read_responses

    rd, _ = reference_run
    code, out, err = _cli(["irt", "export", str(rd.root), "--task", "lang", "--out", str(tmp_path / "m.csv"),
                           "--items", str(tmp_path / "items.jsonl")], capsys)
    assert code == 0, err
    Y, ids, names = read_responses(tmp_path / "m.csv")
    calib = read_jsonl(rd.calibration)
    assert names == [r["name"] for r in calib] and Y.shape == (8, 200)
    assert "".join(str(int(v)) for v in Y[names.index("zoo:lang")]) == calib[names.index("zoo:lang")]["answers"]["lang"]
    assert ids[:2] == ["lang-0000", "lang-0001"]
    assert json.loads((tmp_path / "items.jsonl").read_text().splitlines()[0])["subgroup"]
    code, out, err = _cli(["irt", "check", str(rd.root), "--task", "cipher", "-n", "10", "-e", "mpirt", "--json"], capsys)
    assert code == 0, err
    check = json.loads(out)  # stdout is the JSON alone (the zoo's lines go to stderr)
    assert check["estimator"] == "mpirt" and check["n_subjects"] == 5  # the 3 endpoints stay in training
    code, out, err = _cli(["irt", "fit", str(rd.root), "--task", "upper", "--out", str(tmp_path / "b.safetensors")],
                          capsys)
    assert code == 0, err
    for bank in (irt.ItemBank.load(tmp_path / "b.safetensors"), irt.ItemBank.load(rd.bank_path("upper"))):
        assert bank.subgroups and len(set(bank.subgroups)) > 1
        assert len(irt.select_anchors(bank, n=6, stratify=True)) == 6
    code, out, err = _cli(["irt", "check", str(rd.root)], capsys)
    assert code == 2 and "has 3 tasks (lang, cipher, upper); name one with --task" in err
    code, out, err = _cli(["irt", "check", str(rd.root), "--task", "nope"], capsys)
    assert code == 2 and "--task 'nope'" in err and "lang, cipher, upper" in err
    code, out, err = _cli(["irt", "check", str(tmp_path / "m.csv"), "-e", "mpirt"], capsys)
    assert code == 2 and "--endpoints" in err


def test_more_generations_is_a_safe_resume_change(reference_run, tmp_path):
    import shutil

    rd, _ = reference_run
    copy = tmp_path / "more"
    shutil.copytree(rd.root, copy)
    cfg = parse_config(small_config(copy, **{"optimizer.generations": 4, "final.baselines": True}))
    rd2 = run_search(cfg, resume=copy, log=lambda m: None)
    evals = read_jsonl(rd2.evaluations)
    assert len(evals) == 16
    assert [e["genome"] for e in evals[:12]] == [e["genome"] for e in read_jsonl(rd.evaluations)]
    # the first finish's finalists stay in the running: more generations never lose the best it had
    before, after = (json.loads((r.best / "recipe.json").read_text()) for r in (rd, rd2))
    rows = [h for h in read_jsonl(rd2.heldout) if h["index"] is not None]
    assert {h["name"] for h in read_jsonl(rd.heldout) if h["index"] is not None} <= {h["name"] for h in rows}
    assert after["heldout_average"] == max(h["average"] for h in rows) >= before["heldout_average"]


def ps_dfs_config(tmp_path, generations: int, **dataflow):
    """A small PS+DFS run: ``generations`` in each stage, B = the lang expert."""
    over = {"search_space": {"kind": "ps+dfs", "method": "task_arithmetic",
                             "genes": [{"name": "weight", "bounds": [0.0, 1.2]}],
                             "dataflow": {"model_b": "zoo:lang", "generations": generations,
                                          "population": 4, **dataflow}},
            "optimizer.generations": generations}
    return parse_config(small_config(tmp_path / "run", **over))


@pytest.fixture(scope="module")
def ps_dfs_run(zoo, tmp_path_factory):
    """One small PS+DFS run (2 generations per stage), shared by the tests that read it."""
    tmp = tmp_path_factory.mktemp("psdfs")
    cfg = ps_dfs_config(tmp, generations=2, repeats=2, scale_mode="layer")
    rd = run_search(cfg, log=lambda m: None)
    write_report(rd)
    return cfg, rd


def test_ps_plus_dfs_two_stage_run(ps_dfs_run):
    """PS stage, then a data-flow stage whose model A is the PS best; plain checkpoints out."""
    _, rd = ps_dfs_run
    dfs = rd.root / "dfs"
    evals = read_jsonl(dfs / "evaluations.jsonl")
    assert len(evals) == 8 and all("steps" in e["recipe"] for e in evals)
    best = json.loads((dfs / "best" / "recipe.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dfs / "best" / "model")
    assert model.config.num_hidden_layers == len(best["recipe"]["steps"])
    held = {h["name"]: h for h in read_jsonl(dfs / "heldout.jsonl")}
    assert all(name.startswith("candidate-") for name in held)   # endpoints measured once, in PS
    report = rd.report.read_text()
    assert "Data-flow stage" in report and "Best data-flow path" in report
    # the DFS initial genome is model A itself: its first candidate cannot be far below PS best
    ps_best = json.loads((rd.best / "recipe.json").read_text())
    assert best["heldout_average"] >= 0.5 * ps_best["heldout_average"]


def test_banks_from_an_earlier_run_replace_calibration(reference_run, tmp_path):
    rd, _ = reference_run
    cfg = small_config(tmp_path / "run")
    cfg["calibration"]["banks"] = str(rd.banks)
    cfg["optimizer"]["generations"] = 1
    rd2 = run_search(parse_config(cfg), log=lambda m: None)
    assert not rd2.calibration.exists()                       # nothing re-calibrated
    first = read_jsonl(rd2.evaluations)[0]
    assert first["estimates"] == read_jsonl(rd.evaluations)[0]["estimates"]
    cfg["calibration"]["banks"] = str(tmp_path / "nowhere")
    cfg["run_dir"] = str(tmp_path / "run2")
    with pytest.raises(EvomergeError, match="not found"):
        run_search(parse_config(cfg), log=lambda m: None)
    assert not (tmp_path / "run2").exists()                   # bad input: nothing written


def test_adaptive_anchors_search(zoo, tmp_path):
    """fitness.rounds > 1: round 1 = the run's anchors, then items chosen per candidate; every
    record says which items it asked, the estimate is p-IRT on exactly those answers."""
    import irt

    over = {"fitness": {"estimator": "pirt", "anchors": 9, "rounds": 3, "anchor_method": "info",
                        "aggregate": "mean"},
            "optimizer": {"name": "cmaes", "population": 4, "generations": 2, "sigma0": 0.1667},
            "tasks": short_heldout_tasks(tmp_path / "tasks")}
    rd = run_search(parse_config(small_config(tmp_path / "run", **over)), log=lambda m: None)
    write_report(rd)
    evals = read_jsonl(rd.evaluations)
    # stopped after one generation and resumed: the same items asked, the same answers and estimates
    over["optimizer"]["generations"] = 1
    part = run_search(parse_config(small_config(tmp_path / "part", **over)), log=lambda m: None)
    resumed = run_search(parse_config(small_config(tmp_path / "part", **{**over, "optimizer.generations": 2})),
                         resume=part.root, log=lambda m: None)
    keys = ("genome", "asked", "answers", "estimates", "fitness")
    assert [{k: e[k] for k in keys} for e in read_jsonl(resumed.evaluations)] == [{k: e[k] for k in keys} for e in evals]
    assert len(evals) == 8 and all(e["items"] == 27 for e in evals)
    for task in ("lang", "cipher", "upper"):
        bank = irt.ItemBank.load(rd.bank_path(task))
        first = irt.Anchors.load(rd.banks / f"{task}.anchors.json", bank)
        assert len(first) == 3                                  # round 1 only
        asked = [e["asked"][task] for e in evals]
        assert all(len(set(a)) == 9 for a in asked)
        assert all(a[:3] == [int(i) for i in bank.index(first.item_ids)] for a in asked)  # bank order = task order
        assert len({tuple(a[3:]) for a in asked}) > 1           # later rounds depend on the answers
        e = evals[0]
        ans = np.array([int(c) for c in e["answers"][task]], dtype=float)
        est = irt.estimate_accuracy("pirt", bank, np.array(asked[0]), None, ans)
        assert est == pytest.approx(e["estimates"][task], abs=1e-12)
    assert "asked adaptively in 3 rounds" in rd.report.read_text()


def test_one_objective_per_task_gives_a_pareto_front(zoo, tmp_path):
    over = {"fitness": {"estimator": "pirt", "anchors": 10, "anchor_method": "irt",
                        "aggregate": "per_task"},
            "optimizer": {"name": "optuna", "sampler": "nsga2", "population": 4, "generations": 2},
            "evaluator": {"batch_size": 128, "resident": "native", "merge_device": "cpu"},
            "tasks": short_heldout_tasks(tmp_path / "tasks")}
    rd = run_search(parse_config(small_config(tmp_path / "run", **over)), log=lambda m: None)
    write_report(rd)
    evals = read_jsonl(rd.evaluations)
    assert all(isinstance(e["fitness"], list) and len(e["fitness"]) == 3 for e in evals)
    assert (rd.root / "pareto.png").exists() and "Pareto front" in rd.report.read_text()


def test_dataflow_space_with_exact_fitness(zoo, tmp_path):
    """kind: dataflow between two experts; estimator 'full' answers every item, no calibration."""
    over = {"search_space": {"kind": "dataflow",
                             "dataflow": {"model_a": "zoo:cipher", "model_b": "zoo:upper",
                                          "repeats": 1, "scale_mode": "none"}},
            "fitness": {"estimator": "full"},
            "optimizer": {"generations": 1, "population": 4}}
    cfg = small_config(tmp_path / "run", **over)
    for task in cfg["tasks"]:
        task["search_limit"] = 30
    rd = run_search(parse_config(cfg), log=lambda m: None)
    assert not rd.calibration.exists()
    evals = read_jsonl(rd.evaluations)
    assert all(e["items"] == 90 for e in evals)
    first = evals[0]                        # the initial genome is model A's own path
    assert [(s["model"], s["layer"]) for s in first["recipe"]["steps"]] == [("A", i) for i in range(4)]
    assert first["estimates"]["cipher"] > 0.8
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(rd.best / "model")


def test_ps_dfs_refuses_a_dfs_log_made_on_another_model_a(ps_dfs_run, tmp_path):
    import shutil

    from evomerge.search.rundir import RunDir

    cfg, rd = ps_dfs_run
    root = tmp_path / "run"                       # a copy of the finished PS+DFS run, at its configured place
    shutil.copytree(rd.root, root)
    cfg = cfg.model_copy(update={"run_dir": str(root)})
    dfs = RunDir(root / "dfs")
    dfs.set_state(model_a_index=10_000)           # as if the PS best had changed since
    with pytest.raises(EvomergeError, match="model A"):
        run_search(cfg, resume=root, log=lambda m: None)
