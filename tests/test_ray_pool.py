"""The Ray executor: a pool of workers logs what one local evaluator logs (order aside); a worker
killed with SIGKILL mid-generation, a hung worker, or a driver killed with SIGKILL loses nothing
and logs nothing twice.

Ray is an extra; without it these tests are skipped, unless EVOMERGE_REQUIRE_RAY=1 (`make test`
installs it and sets that, so a broken Ray fails instead of skipping)."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from pathlib import Path

import pytest
import yaml

from evomerge.config import parse_config
from evomerge.search.rundir import read_jsonl
from test_racing import race_config

REPO = Path(__file__).resolve().parents[1]

try:
    import ray  # noqa: F401

    HAVE_RAY = True
except ImportError:
    HAVE_RAY = False

pytestmark = pytest.mark.skipif(not HAVE_RAY and os.environ.get("EVOMERGE_REQUIRE_RAY") != "1",
                                reason="Ray is not installed (pip install 'evomerge[ray]')")


def pool_config(run_dir, kind: str, **executor) -> dict:
    """A small adaptive run with racing and final sharpening: every kind of job is in it
    (calibration, evaluations with 2 rounds each, racing stages, finalists, held-out)."""
    cfg = race_config(run_dir, **{"fitness.racing": {"stages": 1, "margin": 0.05}, "optimizer.generations": 2,
                                  "optimizer.population": 6, "final.baselines": True})
    for task in cfg["tasks"]:
        task["search_limit"] = 80
    cfg["executor"] = {"kind": kind, **executor}
    return cfg


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray for the module (started once: ~10-20 s on 2 cores)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=256 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(zoo, tmp_path_factory):
    from evomerge.search.loop import run_search

    return run_search(parse_config(pool_config(tmp_path_factory.mktemp("local") / "run", "local")),
                      log=lambda *_: None)


def _by(lines: list[dict], key) -> dict:
    out = {}
    for x in lines:
        k = key(x)
        assert k not in out, f"logged twice: {k}"
        out[k] = x
    return out


def _drop_timings(x: dict) -> dict:
    return {k: v for k, v in x.items() if k not in ("timings", "seconds")}


def assert_same_logs(a, b) -> None:
    """Two run directories hold the same results: calibration, evaluations, racing, held-out
    (by name / index / stage; timings aside) and the same best."""
    for name, key in (("calibration", lambda x: x["name"]), ("evaluations", lambda x: x["index"]),
                      ("racing", lambda x: (x["index"], x["stage"], x["phase"])), ("heldout", lambda x: x["name"])):
        la, lb = (_by(read_jsonl(getattr(rd, name)), key) for rd in (a, b))
        assert set(la) == set(lb), f"{name}: {sorted(set(la) ^ set(lb))}"
        for k in la:
            assert _drop_timings(la[k]) == _drop_timings(lb[k]), f"{name} {k} differs"
    import json

    best_a, best_b = (json.loads((rd.best / "recipe.json").read_text()) for rd in (a, b))
    assert best_a["index"] == best_b["index"] and best_a["genome"] == best_b["genome"]


def test_two_ray_workers_log_what_one_local_evaluator_logs(ray_session, local_run, tmp_path):
    from evomerge.search.loop import run_search

    lines: list[str] = []
    rd = run_search(parse_config(pool_config(tmp_path / "run", "ray", workers=2)), log=lines.append)
    assert_same_logs(local_run, rd)
    assert any(line.startswith("executor: ray, 2 workers") for line in lines)
    gen_lines = [line for line in lines if line.startswith("gen ")]
    assert gen_lines and all("workers" in line and "busy" in line and "cand/min" in line for line in gen_lines)


def test_a_worker_killed_mid_generation_loses_nothing(ray_session, local_run, tmp_path):
    """SIGKILL one worker's process while generation 1 is being evaluated: its candidate is
    re-dispatched (to the replacement worker or the other one), and the logs equal the local run's."""
    from evomerge.search.loop import run_search

    run = tmp_path / "run"
    lines: list[str] = []
    killed: list[int] = []

    def killer():
        t0 = time.time()
        while time.time() - t0 < 600 and not killed:
            pids = [m for line in list(lines) for m in re.findall(r"pids ([\d, ]+)\)", line)]
            evals = run / "evaluations.jsonl"
            if pids and evals.exists() and len(evals.read_text().splitlines()) >= 1:
                pid = int(pids[0].split(",")[0])
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    th = threading.Thread(target=killer, daemon=True)
    th.start()
    rd = run_search(parse_config(pool_config(run, "ray", workers=2)), log=lines.append)
    th.join(timeout=5)
    assert killed, "the worker was not killed"
    lost = [line for line in lines if "lost" in line]
    assert lost and "started worker 2 in its place" in lost[0], lines
    evals = read_jsonl(rd.evaluations)
    assert sorted(e["index"] for e in evals) == list(range(12))  # nothing lost, nothing twice
    assert_same_logs(local_run, rd)


def test_all_workers_gone_stops_with_a_clear_message_and_resumes(ray_session, local_run, tmp_path,
                                                                  monkeypatch):
    """A job that hangs past executor.timeout_s kills its worker; with no restarts left and every
    worker gone the run stops, saying so; resumed (locally) it completes with the same logs."""
    from evomerge.errors import EvomergeError
    from evomerge.search.loop import run_search

    run = tmp_path / "run"
    cfg = pool_config(run, "ray", workers=1, timeout_s=15, max_restarts=0)
    monkeypatch.setenv("EVOMERGE_FAULT_HANG", "evaluate")  # the worker hangs on its first candidate
    lines: list[str] = []
    with pytest.raises(EvomergeError, match="all Ray workers are gone"):
        run_search(parse_config(cfg), log=lines.append)
    assert any("no result after 15s on job evaluate 0" in line for line in lines), lines
    assert len(read_jsonl(run / "calibration.jsonl")) == 8 and not read_jsonl(run / "evaluations.jsonl")
    monkeypatch.delenv("EVOMERGE_FAULT_HANG")
    resumed = run_search(parse_config(pool_config(run, "local")), resume=run, log=lambda *_: None)
    assert_same_logs(local_run, resumed)


def test_a_killed_driver_resumes_with_nothing_lost(ray_session, local_run, tmp_path):
    """kill -9 of the driver (`evomerge search`, executor: ray) mid-generation: its local Ray and
    workers go with it; `--resume` re-dispatches only the candidates not in the log and ends with
    the local run's logs."""
    import subprocess
    import sys

    from evomerge.search.loop import run_search

    run = tmp_path / "run"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(pool_config(run, "ray", workers=2)))
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "search", str(cfg_file)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    evals = run / "evaluations.jsonl"
    t0 = time.time()
    while not (evals.exists() and len(evals.read_text().splitlines()) >= 3):
        assert proc.poll() is None, "the driver ended before the kill point:\n" + proc.stdout.read()
        assert time.time() - t0 < 600, "kill point never reached"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept = read_jsonl(evals)
    assert 3 <= len(kept) < 12
    lines: list[str] = []
    rd = run_search(None, resume=run, log=lines.append)  # on this test's Ray, 2 fresh workers
    assert any(line.startswith("executor: ray, 2 workers") for line in lines)
    done = read_jsonl(rd.evaluations)
    assert sorted(e["index"] for e in done) == list(range(12)) and done[:len(kept)] == kept
    assert_same_logs(local_run, rd)
