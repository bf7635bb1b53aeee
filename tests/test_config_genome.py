"""Config validation, genome decoding, optimizer determinism and run-directory crash safety."""


import numpy as np
import pytest

from evomerge.config import SAFE_ON_RESUME, GeneSpec, diff_configs, load_config, parse_config
from evomerge.errors import EvomergeError
from evomerge.genome import ParameterSpace
from evomerge.search.optimizers import CMAESOptimizer, OptunaOptimizer, default_population
from evomerge.search.rundir import append_jsonl, read_jsonl, repair_jsonl, RunDir

MINIMAL = {"models": {"base": "zoo:base", "endpoints": ["zoo:add"]}, "tasks": [{"zoo": "add"}]}


def test_demo_config_is_valid():
    from evomerge.config import demo_config_path

    cfg = load_config(demo_config_path())
    assert cfg.fitness.estimator == "mpirt" and cfg.models.endpoints


@pytest.mark.parametrize("patch, field", [
    ({"fitness": {"anchors": 0}}, "fitness.anchors"),
    ({"fitness": {"estimator": "magic"}}, "fitness.estimator"),
    ({"optimizer": {"genrations": 3}}, "optimizer.genrations"),
    ({"search_space": {"genes": [{"name": "weight", "bounds": [1, 0]}]}}, "search_space.genes.0"),
    ({"tasks": [{"zoo": "add", "path": "x"}]}, "tasks.0"),
    ({"tasks": [{"zoo": "add"}, {"zoo": "add"}]}, "tasks"),
    ({"fitness": {"aggregate": "per_task"}}, "per_task"),
    ({"fitness": {"rounds": 4, "estimator": "gpirt"}}, "fitness.rounds"),
    ({"fitness": {"rounds": 4, "estimator": "pirt", "anchors": 3}}, "fitness.rounds"),
    ({"fitness": {"rounds": 0}}, "fitness.rounds"),
])
def test_config_errors_name_the_field(patch, field):
    data = {**MINIMAL, **patch}
    with pytest.raises(EvomergeError) as e:
        parse_config(data, "my.yaml")
    assert "my.yaml" in str(e.value) and field in str(e.value)


def test_missing_and_non_yaml_files(tmp_path):
    with pytest.raises(EvomergeError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [unclosed\n")
    with pytest.raises(EvomergeError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(EvomergeError, match="mapping"):
        load_config(bad)


def test_diff_configs_and_safe_fields():
    a = parse_config(MINIMAL).to_dict()
    b = parse_config({**MINIMAL, "optimizer": {"generations": 50}, "seed": 3}).to_dict()
    assert diff_configs(a, b) == ["optimizer.generations", "seed"]
    assert "optimizer.generations" in SAFE_ON_RESUME and "seed" not in SAFE_ON_RESUME


def test_parameter_space_decodes_bounds_layers_and_filters():
    cfg = parse_config({**MINIMAL, "search_space": {"method": "ties", "genes": [
        {"name": "weight", "bounds": [0, 2], "layer_groups": 3},
        {"name": "density", "bounds": [0.2, 1.0], "filter": "mlp"},
        {"name": "density", "bounds": [0.5, 1.0]}]}})
    ss = cfg.search_space
    space = ParameterSpace(ss.method, "B", ["E1", "E2"], ss.genes, ss.fixed)
    assert space.dim == 2 * 3 + 2 + 2
    x = np.linspace(0, 1, space.dim)
    r = space.decode(x)
    w = r["models"][0]["parameters"]["weight"]
    assert w == pytest.approx([0.0, 2 * x[1], 2 * x[2]])
    dens = r["models"][1]["parameters"]["density"]
    assert dens[0]["filter"] == "mlp" and "filter" not in dens[1]   # filtered first, default last
    assert dens[0]["value"] == pytest.approx(0.2 + 0.8 * x[7])
    assert space.initial_genome().tolist() == [0.5] * space.dim


def test_parameter_space_rejects_unknown_parameters():
    # config validation names the field ...
    with pytest.raises(EvomergeError, match=r"search_space\.genes\.0\.name: 'densty'"):
        parse_config({**MINIMAL, "search_space": {"genes": [{"name": "densty"}]}})
    # ... and the space itself refuses it too
    genes = [GeneSpec(name="densty")]
    with pytest.raises(EvomergeError, match="densty"):
        ParameterSpace("task_arithmetic", "B", ["E"], genes)
    with pytest.raises(EvomergeError, match="fixed.bogus"):
        ParameterSpace("task_arithmetic", "B", ["E"], [GeneSpec(name="weight")], {"bogus": 1})


def _sphere(x):
    return -float(np.sum((np.asarray(x) - 0.3) ** 2))


@pytest.mark.parametrize("make", [
    lambda: CMAESOptimizer(4, seed=1),
    lambda: CMAESOptimizer(4, seed=1, separable=True),
    lambda: OptunaOptimizer(4, seed=1, sampler="cmaes"),
    lambda: OptunaOptimizer(4, seed=1, sampler="tpe", population=6),
])
def test_optimizers_improve_and_replay_identically(make):
    """Same seed + same told sequence -> same asks (what resume relies on)."""
    runs = []
    for _ in range(2):
        opt = make()
        asked, best = [], -np.inf
        for _ in range(8):
            g = opt.ask_generation()
            f = [_sphere(x) for x in g]
            best = max(best, max(f))
            opt.tell_generation(g, f)
            asked += [x.tolist() for x in g]
        runs.append((asked, best))
    assert runs[0][0] == runs[1][0]
    assert all(0.0 <= v <= 1.0 for x in runs[0][0] for v in x)
    first = _sphere(runs[0][0][0])
    assert runs[0][1] > first or runs[0][1] > -0.05


def test_nsga2_multi_objective():
    opt = OptunaOptimizer(3, seed=0, sampler="nsga2", population=6, n_objectives=2)
    for _ in range(3):
        g = opt.ask_generation()
        opt.tell_generation(g, [[x[0], 1 - x[0]] for x in g])
    assert default_population(3) == 7


def test_jsonl_survives_a_partial_last_line(tmp_path):
    log = tmp_path / "log.jsonl"
    append_jsonl(log, {"a": 1})
    append_jsonl(log, {"a": 2})
    with open(log, "a") as fh:
        fh.write('{"a": 3, "trunc')         # a kill in the middle of a write
    assert [r["a"] for r in read_jsonl(log)] == [1, 2]
    repair_jsonl(log)
    append_jsonl(log, {"a": 4})
    assert [r["a"] for r in read_jsonl(log)] == [1, 2, 4]
    log.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(EvomergeError, match="line 2"):
        read_jsonl(log)


def test_rundir_state_is_atomic(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    rd.set_state(stage="searching", generation=2)
    (rd.root / ".state.json.tmp-123").write_text("{partial")
    rd.repair()
    assert rd.state() == {"stage": "searching", "generation": 2}
    assert not list(rd.root.glob(".*tmp*"))


CONFIGS = sorted((__import__("pathlib").Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_is_valid(path):
    cfg = load_config(path)
    if cfg.search_space.kind != "dataflow":
        ParameterSpace(cfg.search_space.method, cfg.models.base, cfg.models.endpoints,
                       cfg.search_space.genes, cfg.search_space.fixed)
