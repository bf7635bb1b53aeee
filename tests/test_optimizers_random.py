"""optimizer.name: random -- uniform genomes, deterministic, exact replay, a complete search."""

import numpy as np
import pytest

from evomerge.config import OptimizerConfig, parse_config
from evomerge.errors import EvomergeError
from evomerge.search.optimizers import RandomSearch, default_population, make_optimizer


def _run(opt, generations, fitness=lambda g: float(-np.sum((g - 0.3) ** 2))):
    asked = []
    for _ in range(generations):
        gs = opt.ask_generation()
        asked.append([g.copy() for g in gs])
        opt.tell_generation(gs, [fitness(g) for g in gs])
    return asked


def test_made_by_config_with_default_population():
    opt = make_optimizer(OptimizerConfig(name="random"), 7, seed=0)
    assert isinstance(opt, RandomSearch) and opt.name == "random"
    assert opt.population == default_population(7) and opt.n_objectives == 1
    opt = make_optimizer(OptimizerConfig(name="random", population=9), 7, seed=0)
    assert len(opt.ask_generation()) == 9


def test_deterministic_given_the_seed():
    a = _run(RandomSearch(5, seed=3), 4)
    b = _run(RandomSearch(5, seed=3), 4)
    c = _run(RandomSearch(5, seed=4), 4)
    assert all(np.array_equal(x, y) for ga, gb in zip(a, b) for x, y in zip(ga, gb))
    assert not np.array_equal(a[0][0], c[0][0])


def test_genomes_are_in_the_unit_box_and_spread():
    opt = RandomSearch(6, seed=0, population=50)
    gs = np.array([g for gen in _run(opt, 4) for g in gen])
    assert gs.shape == (200, 6) and gs.dtype == float
    assert gs.min() >= 0.0 and gs.max() < 1.0
    assert gs.min() < 0.05 and gs.max() > 0.95  # uniform over the box, not a narrow cloud
    assert abs(gs.mean() - 0.5) < 0.05


def test_replay_asks_the_logged_genomes():
    """Resume rebuilds the optimizer by replaying the log: same asks whatever was told."""
    logged = _run(RandomSearch(4, seed=11), 3)
    replay = RandomSearch(4, seed=11)
    for gen in logged:
        asked = replay.ask_generation()
        assert [[float(v) for v in g] for g in asked] == [[float(v) for v in g] for g in gen]
        replay.tell_generation(asked, [0.0] * len(asked))  # fitness does not steer it
    assert replay.told == sum(len(g) for g in logged)


def test_refuses_multi_objective():
    with pytest.raises(EvomergeError, match="optimizer.name: random is single-objective"):
        make_optimizer(OptimizerConfig(name="random"), 3, seed=0, n_objectives=3)


def test_config_refuses_per_task_with_random(tmp_path):
    from test_search import small_config

    cfg = small_config(tmp_path / "run", **{"optimizer.name": "random",
                                            "fitness.aggregate": "per_task"})
    with pytest.raises(Exception, match="optimizer.name"):
        parse_config(cfg)


@pytest.mark.usefixtures("one_thread")
def test_random_search_on_the_zoo(zoo, tmp_path):
    from test_search import short_heldout_tasks, small_config

    from evomerge.search.loop import run_search
    from evomerge.search.rundir import read_jsonl

    tasks = short_heldout_tasks(tmp_path / "tasks")
    cfg = parse_config(small_config(tmp_path / "run", **{"optimizer.name": "random",
                                                         "optimizer.generations": 2, "tasks": tasks}))
    lines = []
    rd = run_search(cfg, log=lines.append)
    evals = read_jsonl(rd.evaluations)
    assert len(evals) == 2 * 4
    assert any("search: random" in line for line in lines)
    # the logged genomes are the optimizer's asks for this seed
    opt = RandomSearch(len(evals[0]["genome"]), seed=cfg.seed, population=4)
    expected = [[float(v) for v in g] for _ in range(2) for g in opt.ask_generation()]
    assert [r["genome"] for r in evals] == expected
    assert rd.state().get("stage") == "done"
    # resume with one generation more: the loop replays the log (and checks the asks)
    cfg3 = parse_config(small_config(rd.root, **{"optimizer.name": "random",
                                                 "optimizer.generations": 3, "tasks": tasks}))
    rd3 = run_search(cfg3, resume=rd.root, log=lambda m: None)
    evals3 = read_jsonl(rd3.evaluations)
    assert len(evals3) == 3 * 4 and [r["genome"] for r in evals3[:8]] == expected
