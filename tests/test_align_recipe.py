"""``align:`` in merge recipes and ``models.align`` in search configs (issue 15): the models are
aligned once into a content-addressed cache and the merge reads the aligned checkpoints; on
permuted copies of zoo models the merge equals the merge of the originals; a search aligns at
setup, records it in the run directory, and a resumed setup reuses it; bad input is refused
naming the field; mergekit export refuses ``align``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from _bad_input import run_cli
from evomerge.align.symmetries import llama_layout, permute_model, random_permutations
from evomerge.config import parse_config
from evomerge.errors import EvomergeError
from evomerge.merge.recipe import MergeRecipe

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def align_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("EVOMERGE_CACHE", str(cache))
    return cache / "aligned"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "model.safetensors"))


def _permuted_copy(src: Path, dst: Path, seed: int) -> Path:
    from evomerge.checkpoint import write_checkpoint

    tensors = _tensors(src)
    config = json.loads((src / "config.json").read_text())
    layout = llama_layout(config, {n: t.shape for n, t in tensors.items()})
    perms = random_permutations(layout, torch.Generator().manual_seed(seed))
    write_checkpoint(dst, permute_model(tensors, layout, perms), config, tokenizer_from=src)
    return dst


def _recipe(path: Path, base, models, align=None) -> Path:
    d = {"merge_method": "task_arithmetic", "base_model": str(base), "models": [{"model": str(m)} for m in models],
         "parameters": {"weight": 1.0}}
    if align is not None:
        d["align"] = align
    path.write_text(yaml.safe_dump(d))
    return path


def _same(a: Path, b: Path) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[n], tb[n]) for n in ta)


def test_a_recipe_with_align_on_permuted_copies_merges_like_the_originals(zoo, tmp_path, capsys, align_cache):
    lang = _permuted_copy(zoo.experts["lang"], tmp_path / "lang_p", seed=1)
    cipher = _permuted_copy(zoo.experts["cipher"], tmp_path / "cipher_p", seed=2)
    plain = _recipe(tmp_path / "plain.yaml", zoo.base, [zoo.experts["lang"], zoo.experts["cipher"]])
    aligned = _recipe(tmp_path / "aligned.yaml", zoo.base, ["lang_p", "cipher_p"],  # relative to the recipe
                      align={"method": "rebasin", "reference": str(zoo.base)})
    unaligned = _recipe(tmp_path / "unaligned.yaml", zoo.base, [lang, cipher])
    for recipe, out in ((plain, "m_plain"), (aligned, "m_aligned"), (unaligned, "m_unaligned")):
        code, text = run_cli(["merge", str(recipe), "--out", str(tmp_path / out)], capsys)
        assert code == 0, text
        assert ("aligning 3 models (rebasin)" in text) == (recipe == aligned), text
    assert _same(tmp_path / "m_aligned", tmp_path / "m_plain")
    assert not _same(tmp_path / "m_unaligned", tmp_path / "m_plain")
    folders = list(align_cache.iterdir())
    assert len(folders) == 1 and sorted(p.name for p in folders[0].iterdir()) == [
        "alignment.json", "base", "cipher_p", "lang_p"]
    stamp = (folders[0] / "alignment.json").stat().st_mtime_ns
    code, text = run_cli(["merge", str(aligned), "--out", str(tmp_path / "m_again")], capsys)
    assert code == 0 and "reusing the aligned models" in text, text
    assert (folders[0] / "alignment.json").stat().st_mtime_ns == stamp and len(list(align_cache.iterdir())) == 1
    assert _same(tmp_path / "m_again", tmp_path / "m_plain")


def test_activation_alignment_in_a_recipe(zoo, tmp_path, capsys, align_cache):
    """Permuted copies of one expert, aligned by activations on a small task folder: every aligned
    copy is the expert again, so their average is the expert."""
    task = tmp_path / "few"
    task.mkdir()
    search = (zoo.task_dir("lang") / "search.jsonl").read_text().splitlines(keepends=True)
    (task / "search.jsonl").write_text("".join(search[:40]))
    lang = zoo.experts["lang"]
    copies = [_permuted_copy(lang, tmp_path / f"copy{i}", seed=10 + i) for i in range(2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [str(lang), *map(str, copies)],
                                      "parameters": {"weight": 1.0}, "align": {"method": "activations",
                                                                               "data": "few"}}))
    code, text = run_cli(["merge", str(recipe), "--out", str(tmp_path / "m"), "-q"], capsys)
    assert code == 0, text
    (folder,) = align_cache.iterdir()
    record = json.loads((folder / "alignment.json").read_text())
    assert record["method"] == "activations" and record["data"] == [str(task)]
    assert all(_same(folder / c.name, lang) for c in copies)
    want, got = _tensors(lang), _tensors(tmp_path / "m")
    assert all(torch.allclose(got[n], want[n], atol=1e-6) for n in want)


def test_recipe_align_bad_input_names_the_field(zoo, tmp_path, capsys):
    base, lang, cipher = (str(p) for p in (zoo.base, zoo.experts["lang"], zoo.experts["cipher"]))
    d = {"merge_method": "task_arithmetic", "base_model": base, "models": [lang, cipher],
         "parameters": {"weight": 1.0}}
    cases = [
        ({"method": "zipit"}, "field 'align.method': unknown method 'zipit'"),
        ({"method": "activations"}, "method activations needs 'data'"),
        ({"method": "c2m3", "data": "zoo:lang"}, "'data' is read by method activations only"),
        ({"reference": "elsewhere/"}, "field 'align.reference': 'elsewhere/' is not one of the recipe's models"),
        ({"reference": 3}, "field 'align.reference': index 3 is out of range"),
        ({"seed": 0, "extra": 1}, "unknown key 'extra'"),
    ]
    for align, words in cases:
        with pytest.raises(EvomergeError) as err:
            MergeRecipe.from_dict({**d, "align": align})
        assert words in str(err.value), (align, str(err.value))
    assert MergeRecipe.from_dict({**d, "align": {"reference": 1}}).align_reference() == 1

    gpt = tmp_path / "gpt"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    recipe = _recipe(tmp_path / "r.yaml", base, [lang, gpt], align={"method": "rebasin"})
    code, text = run_cli(["merge", str(recipe), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "field 'align'" in text and "model_type 'gpt2'" in text, text
    assert not (tmp_path / "out").exists()
    recipe = _recipe(tmp_path / "r2.yaml", base, [lang], align={"method": "activations", "data": "zoo:nope"})
    code, text = run_cli(["merge", str(recipe), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "field 'align'" in text and "no task 'nope'" in text, text


def test_the_engine_refuses_a_recipe_whose_align_was_not_carried_out(zoo, tmp_path):
    from evomerge.align.recipe_step import resolve_alignment
    from evomerge.merge.engine import merge_to_disk

    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": [str(zoo.base), str(zoo.experts["lang"])],
                                    "parameters": {"weight": 1.0}, "align": {"method": "rebasin"}})
    with pytest.raises(EvomergeError, match="field 'align': the merge engine merges the models as given"):
        merge_to_disk(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    merge_to_disk(resolve_alignment(recipe), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_mergekit_export_refuses_align(zoo):
    from evomerge.merge.mergekit_io import to_mergekit_yaml

    recipe = MergeRecipe.from_dict({"merge_method": "linear", "models": [str(zoo.base), str(zoo.experts["lang"])],
                                    "parameters": {"weight": 1.0}, "align": {"method": "c2m3"}})
    assert recipe.to_dict()["align"] == {"method": "c2m3", "seed": 0}
    with pytest.raises(EvomergeError, match="'align' .* is not a mergekit step; run `evomerge align"):
        to_mergekit_yaml(recipe)


def _search_config(tmp_path, endpoints, align) -> dict:
    cfg = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    cfg["run_dir"] = str(tmp_path / "run")
    cfg["models"] = {"base": "zoo:base", "endpoints": [str(e) for e in endpoints], "align": align}
    cfg["tasks"] = cfg["tasks"][:1]
    cfg["tasks"][0]["search_limit"] = 20
    return cfg


def test_search_config_align_validates(tmp_path):
    ok = parse_config(_search_config(tmp_path, ["a", "b"], {"method": "activations", "data": ["zoo:lang"],
                                                            "reference": "b"}))
    assert ok.models.align.tasks == ["zoo:lang"]
    cases = [
        ({"method": "zipit"}, "models.align.method"),
        ({"method": "activations"}, "models.align.data: method activations needs data"),
        ({"data": "zoo:lang"}, "models.align.data: read by method activations only"),
        ({"reference": "c"}, "models.align.reference: 'c' is not 'base' or one of models.endpoints"),
    ]
    for align, words in cases:
        with pytest.raises(EvomergeError) as err:
            parse_config(_search_config(tmp_path, ["a", "b"], align), "cfg.yaml")
        assert words in str(err.value), (align, str(err.value))


def test_search_setup_aligns_once_records_it_and_resume_reuses_it(zoo, tmp_path, align_cache, one_thread):
    from evomerge.search.context import build_context, record_alignment
    from evomerge.search.rundir import new_run_dir

    lang = _permuted_copy(zoo.experts["lang"], tmp_path / "lang_p", seed=1)
    cipher = _permuted_copy(zoo.experts["cipher"], tmp_path / "cipher_p", seed=2)
    cfg = parse_config(_search_config(tmp_path, [lang, cipher], {"method": "rebasin"}))
    lines: list[str] = []
    ctx = build_context(cfg, None, log=lines.append)
    try:
        rd = ctx.rd = new_run_dir(cfg)
        record_alignment(rd, ctx.alignment)
    finally:
        ctx.evaluator.close()
    assert any(line.startswith("aligning 3 models (rebasin)") for line in lines), lines
    (folder,) = align_cache.iterdir()
    assert _same(ctx.endpoint_paths[str(lang)], zoo.experts["lang"])
    assert _same(ctx.endpoint_paths[str(cipher)], zoo.experts["cipher"])
    assert ctx.base_path == folder / "base" and _same(ctx.base_path, zoo.base)
    record = json.loads((rd.root / "alignment.json").read_text())
    assert record["folder"] == str(folder) and record["reference"] == "base"
    assert record["alignment"]["method"] == "rebasin"

    stamp = (folder / "alignment.json").stat().st_mtime_ns
    lines.clear()
    ctx = build_context(cfg, rd, log=lines.append)  # as a resume does
    ctx.evaluator.close()
    assert any(line.startswith("reusing the aligned models") for line in lines), lines
    assert (folder / "alignment.json").stat().st_mtime_ns == stamp

    (rd.root / "alignment.json").unlink()  # stopped before it was recorded: a resume records it
    build_context(cfg, rd, log=lines.append).evaluator.close()
    assert json.loads((rd.root / "alignment.json").read_text()) == record

    (rd.root / "alignment.json").write_text(json.dumps({**record, "folder": "/elsewhere"}))
    with pytest.raises(EvomergeError, match="models.align: this run's models were aligned into /elsewhere"):
        build_context(cfg, rd, log=lines.append)


def test_a_search_on_permuted_fine_tunes_with_models_align(zoo, tmp_path, align_cache, one_thread):
    """End to end: endpoints are permuted copies of the zoo's experts (as if trained from other
    inits); with models.align the search merges them as fine-tunes of the base again."""
    from test_search import short_heldout_tasks, small_config

    from evomerge.search.loop import run_search

    cfg = small_config(tmp_path / "run", **{"optimizer.generations": 1})
    cfg["tasks"] = short_heldout_tasks(tmp_path / "tasks", names=("lang", "cipher"), heldout=30)
    for task in cfg["tasks"]:
        task["search_limit"] = 60
    endpoints = [_permuted_copy(zoo.experts[t], tmp_path / f"{t}_p", seed=i) for i, t in enumerate(("lang", "cipher"))]
    cfg["models"] = {"base": "zoo:base", "endpoints": [str(e) for e in endpoints], "align": {"method": "rebasin"}}
    cfg["final"]["write_model"] = False
    lines: list[str] = []
    rd = run_search(parse_config(cfg), log=lines.append)
    (folder,) = align_cache.iterdir()
    assert sum(line.startswith("aligning 3 models") for line in lines) == 1
    assert json.loads((rd.root / "alignment.json").read_text())["folder"] == str(folder)
    best = json.loads((rd.best / "recipe.json").read_text())
    assert {Path(m["model"]).parent for m in best["recipe_resolved"]["models"]} == {folder}
    assert best["heldout_average"] > 0.8  # task arithmetic of the permuted copies themselves scores ~0
    lines.clear()
    run_search(None, resume=rd.root, log=lines.append)
    assert any(line.startswith("reusing the aligned models") for line in lines)
    assert not any(line.startswith("aligning") for line in lines)


def _gpt2_folder(tmp: Path) -> None:
    (tmp / "gpt").mkdir(parents=True)
    (tmp / "gpt" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))


def _align_cases():
    from tests._bad_input import Case
    from tests.test_bad_input_config import _cfg, _check, _merge, _recipe, _run

    def models(**align):
        return lambda d, t: d["models"].update(align=align)

    return [
        Case("recipe-align-method", **_merge(_recipe(extra="align: {method: zipit}\n"), ["align.method", "zipit"])),
        Case("recipe-align-no-data", **_merge(_recipe(extra="align: {method: activations}\n"),
                                              ["align", "needs 'data'"])),
        Case("recipe-align-reference", **_merge(_recipe(extra="align: {reference: other/}\n"),
                                                ["align.reference", "other/", "not one of the recipe's models"])),
        Case("cfg-align-reference", **_check(_cfg(models(reference="zoo:upper")),
                                             ["models.align.reference", "zoo:upper"])),
        Case("cfg-align-no-data", **_check(_cfg(models(method="activations")), ["models.align.data", "needs data"])),
        Case("run-align-unknown-task", **_run(_cfg(models(method="activations", data="zoo:nope")),
                                              ["models.align", "no task 'nope'"])),
        Case("run-align-not-llama", **_run(_cfg(lambda d, t: (_gpt2_folder(t), d["models"].update(
            endpoints=[str(t / "gpt")], align={"method": "rebasin"}))), ["models.align", "model_type 'gpt2'"])),
    ]


@pytest.mark.parametrize("case", _align_cases(), ids=lambda c: c.id)
def test_align_bad_input_cli(case, tmp_path, capsys, monkeypatch, zoo, align_cache):
    from tests._bad_input import check_case

    check_case(case, tmp_path / "case", capsys, monkeypatch, zoo.root)
    assert not align_cache.exists()  # nothing aligned, nothing half-written
