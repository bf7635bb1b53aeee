"""The merge engine on tiny real Llama checkpoints: properties, disk vs in-memory, slices, errors."""

import json
import subprocess
import sys
from pathlib import Path

import shutil

import pytest
import torch

from evomerge.checkpoint import CheckpointReader
from evomerge.errors import EvomergeError
from evomerge.merge.engine import InMemoryMerger, merge_to_disk
from evomerge.merge.recipe import MergeRecipe

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_llama import load_model, make_base, make_variant  # noqa: E402


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    base = make_base(root / "base")
    return {
        "root": root,
        "base": base,
        "a": make_variant(base, root / "a", seed=1),
        "b": make_variant(base, root / "b", seed=2),
        "c": make_variant(base, root / "c", seed=3),
    }


def recipe(d: dict) -> MergeRecipe:
    return MergeRecipe.from_dict(d)


def state(path):
    r = CheckpointReader(path)
    return {n: r.get(n) for n in r.tensor_names()}


def ta_recipe(fam, **over):
    d = {
        "merge_method": "task_arithmetic",
        "base_model": str(fam["base"]),
        "models": [{"model": str(fam["a"]), "parameters": {"weight": 0.5}},
                   {"model": str(fam["b"]), "parameters": {"weight": 0.3}}],
        "parameters": {"lambda": 1.0},
    }
    d.update(over)
    return recipe(d)


def test_linear_single_weight_one_returns_that_model(fam, tmp_path):
    out = merge_to_disk(recipe({"merge_method": "linear", "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0}}]}), tmp_path / "o")
    sa, so = state(fam["a"]), state(out)
    assert sa.keys() == so.keys() and all(torch.equal(sa[n], so[n]) for n in sa)
    assert (out / "tokenizer_config.json").exists() and (out / "config.json").exists()


def test_task_arithmetic_lambda_zero_returns_base(fam, tmp_path):
    out = merge_to_disk(ta_recipe(fam, parameters={"lambda": 0.0}), tmp_path / "o")
    sb, so = state(fam["base"]), state(out)
    assert all(torch.equal(sb[n], so[n]) for n in sb)


def test_ties_density_one_single_model_equals_task_arithmetic(fam):
    one = [{"model": str(fam["a"]), "parameters": {"weight": 0.6, "density": 1.0}}]
    m = InMemoryMerger([fam["base"], fam["a"]])
    ties = dict(m.merged_tensors(recipe({"merge_method": "ties", "base_model": str(fam["base"]), "models": one,
                                         "parameters": {"normalize": False}})))
    one[0]["parameters"].pop("density")
    ta = dict(m.merged_tensors(recipe({"merge_method": "task_arithmetic", "base_model": str(fam["base"]), "models": one})))
    for n in ta:
        torch.testing.assert_close(ties[n], ta[n], rtol=0, atol=1e-6)


def test_slerp_endpoints(fam, tmp_path):
    for t, want in [(0.0, "base"), (1.0, "a")]:
        r = recipe({"merge_method": "slerp", "base_model": str(fam["base"]),
                    "models": [{"model": str(fam["base"])}, {"model": str(fam["a"])}], "parameters": {"t": t}})
        so, sw = state(merge_to_disk(r, tmp_path / f"o{t}")), state(fam[want])
        assert all(torch.equal(sw[n], so[n]) for n in sw)


def test_dare_mean_over_seeds_approaches_delta(fam):
    m = InMemoryMerger([fam["base"], fam["a"]])
    name = "model.layers.1.mlp.up_proj.weight"
    base, a = state(fam["base"])[name], state(fam["a"])[name]
    acc = torch.zeros_like(base)
    n = 100
    for seed in range(n):
        r = recipe({"merge_method": "dare_linear", "base_model": str(fam["base"]), "seed": seed,
                    "models": [{"model": str(fam["a"]), "parameters": {"weight": 1.0, "density": 0.5}}]})
        acc += dict(m.merged_tensors(r))[name]
    delta = a - base
    err = ((acc / n - base) - delta).abs().mean() / delta.abs().mean()
    assert err < 0.15, err


DISK_VS_MEMORY = [
    ("linear", {"normalize": True}, {"weight": [0.2, 0.9]}),
    ("task_arithmetic", {"lambda": 0.9}, {"weight": [0.3, 1.0]}),
    ("ties", {"lambda": 1.1}, {"weight": 0.5, "density": [{"filter": "self_attn", "value": 0.3}, {"value": 0.7}]}),
    ("dare_ties", {}, {"weight": 0.6, "density": 0.5}),
    ("dare_linear", {}, {"weight": [0.1, 0.5, 0.8], "density": 0.6}),
]


@pytest.fixture(scope="module")
def fam16(fam, tmp_path_factory):
    """The same family saved in bfloat16 (what real checkpoints ship as)."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("tiny16")
    out = {}
    for k in ("base", "a", "b", "c"):
        src, dst = fam[k], root / k
        shutil.copytree(src, dst)
        sd = load_file(str(dst / "model.safetensors"))
        save_file({n: t.to(torch.bfloat16) for n, t in sd.items()}, str(dst / "model.safetensors"),
                  metadata={"format": "pt"})
        out[k] = dst
    return out


@pytest.mark.parametrize("resident", ["float32", "native"])
@pytest.mark.parametrize("method,globals_,mparams", DISK_VS_MEMORY, ids=[m[0] for m in DISK_VS_MEMORY])
def test_disk_and_in_memory_are_bit_identical(fam, fam16, tmp_path, method, globals_, mparams, resident):
    if resident == "native":
        fam = fam16  # bf16 sources kept resident as bf16
    models = [{"model": str(fam[k]), "parameters": dict(mparams)} for k in ("a", "b", "c")]
    r = recipe({"merge_method": method, "base_model": str(fam["base"]), "models": models,
                "parameters": globals_, "dtype": "bfloat16", "seed": 11})
    out = merge_to_disk(r, tmp_path / "o", max_shard_bytes=30_000)
    model = load_model(fam["base"], dtype=torch.bfloat16)
    merger = InMemoryMerger(r, magnitude_cache=(method == "ties"), resident=resident)
    # a first apply with other values (plan cache, resident task vectors) must not matter
    other_models = [{"model": str(fam[k]), "parameters": {**mparams, "weight": 0.9}} for k in ("a", "b", "c")]
    other = recipe({"merge_method": method, "base_model": str(fam["base"]), "models": other_models,
                    "parameters": {**globals_, **({"lambda": 0.1} if "lambda" in globals_ else {})}, "seed": 5})
    merger.apply(other, model)
    merger.apply(r, model)
    if resident == "native":  # sources stay bf16; no resident task vectors
        assert all(t.dtype == torch.bfloat16 for t in merger._cache.values() if t.is_floating_point())
        assert not any(k[0] == "d" for k in merger._cache)
    elif method == "ties":  # the sorted-magnitude cache was used
        from evomerge.merge.methods.sparsify import SORTED_ABS_ATTR

        deltas = [t for k, t in merger._cache.items() if k[0] == "d"]
        assert deltas and all(isinstance(getattr(t, SORTED_ABS_ATTR, None), torch.Tensor) for t in deltas)
    so, sd = state(out), model.state_dict()
    assert so.keys() <= sd.keys()
    for n in so:
        assert so[n].dtype == sd[n].dtype == torch.bfloat16
        assert torch.equal(so[n], sd[n]), n


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_streamed_merge_on_the_gpu_matches_the_disk_merge_there(fam16, tmp_path, method):
    """Sources resident in host memory, math on the GPU (``compute_device``): the bits
    of the disk merge computed on that GPU. Without a GPU: one clear error, nothing loaded."""
    models = [{"model": str(fam16[k]), "parameters": {"weight": 0.6, "density": 0.5}} for k in ("a", "b", "c")]
    r = recipe({"merge_method": method, "base_model": str(fam16["base"]), "models": models, "seed": 3,
                "dtype": "bfloat16"})
    if not torch.cuda.is_available():
        with pytest.raises(EvomergeError, match="compute_device: 'cuda', but torch .* sees no CUDA GPU"):
            InMemoryMerger(r, compute_device="cuda", resident="native")
        return
    out = state(merge_to_disk(r, tmp_path / "o", device="cuda"))
    model = load_model(fam16["base"], dtype=torch.bfloat16).to("cuda")
    for resident in ("native", "float32"):
        merger = InMemoryMerger(r, compute_device="cuda", resident=resident, magnitude_cache=True)
        merger.apply(r, model)
        assert merger._cache and all(t.device.type == "cpu" for t in merger._cache.values())
        sd = model.state_dict()
        for n in out:
            assert torch.equal(out[n], sd[n].cpu()), (resident, n)


def test_tsv_svd_cache_bit_identical_to_disk_and_uncached(fam, tmp_path, one_thread):
    """InMemoryMerger(svd_cache=True): TSV candidates (weights, lambda, a negative weight, another
    rank) give the same bits as the uncached merger and as merge_to_disk; the factors are cached."""
    from evomerge.merge.methods.spectral import SVD_CACHE_ATTR

    keys = ("a", "b", "c")

    def tsv(weights, lam, frac=None):
        params = {"lambda": lam, **({"rank_fraction": frac} if frac else {})}
        return recipe({"merge_method": "tsv", "base_model": str(fam["base"]), "parameters": params,
                       "models": [{"model": str(fam[k]), "parameters": {"weight": w}} for k, w in zip(keys, weights)]})

    paths = [fam["base"], *(fam[k] for k in keys)]
    cached, plain = InMemoryMerger(paths, svd_cache=True), InMemoryMerger(paths)
    before = None
    candidates = [tsv([1.0, 1.0, 1.0], 1.0), tsv([0.3, [0.2, 0.9], 1.4], 0.7), tsv([0.5, -0.8, 1.0], 1.2),
                  tsv([0.4, 0.6, 0.8], 1.0, 0.2), tsv([0.9, 0.1, 0.5], 0.8)]
    for i, r in enumerate(candidates):
        got, want = dict(cached.merged_tensors(r)), dict(plain.merged_tensors(r))
        for n in want:
            assert torch.equal(got[n], want[n]), (i, n)
        if i == 0:
            before = cached.resident_bytes
            assert before > plain.resident_bytes  # the factors are resident now
        if i in (1, 3):  # against the streaming disk path too
            disk = state(merge_to_disk(r, tmp_path / f"o{i}"))
            for n in disk:
                assert torch.equal(disk[n], got[n]), (i, n)
    deltas = [t for k, t in cached._cache.items() if k[0] == "d"]
    mats = [d for d in deltas if d.dim() == 2]
    assert mats and all(isinstance(getattr(d, SVD_CACHE_ATTR), dict) for d in mats)
    assert all(not hasattr(d, SVD_CACHE_ATTR) for d in deltas if d.dim() < 2)
    assert not any(hasattr(t, SVD_CACHE_ATTR) for k, t in plain._cache.items() if k[0] == "d")


@pytest.mark.parametrize("method,mparams", [
    ("ties", {"weight": 0.5, "density": 0.5}), ("breadcrumbs", {"weight": 0.5, "density": 0.5}),
    ("breadcrumbs_ties", {"weight": 0.5, "density": 0.5}), ("dare_ties", {"weight": 0.5, "density": 0.5}),
    ("della", {"weight": 0.5, "density": 0.5}), ("tsv", {}), ("iso_c", {}), ("task_arithmetic", {"weight": 0.5}),
])
def test_resident_caches_name_the_caches_a_method_reads(fam, method, mparams, one_thread):
    """resident_caches(method) turns a cache on exactly where the method uses it (what the search
    passes to its InMemoryMerger)."""
    from evomerge.merge.engine import resident_caches
    from evomerge.merge.methods.sparsify import SORTED_ABS_ATTR
    from evomerge.merge.methods.spectral import SVD_CACHE_ATTR

    m = InMemoryMerger([fam["base"], fam["a"], fam["b"]], magnitude_cache=True, svd_cache=True)
    dict(m.merged_tensors(recipe({"merge_method": method, "base_model": str(fam["base"]), "seed": 1,
                                  "models": [{"model": str(fam[k]), "parameters": mparams} for k in ("a", "b")]})))
    deltas = [t for k, t in m._cache.items() if k[0] == "d" and t.dim() == 2]
    used = {"magnitude_cache": all(isinstance(getattr(d, SORTED_ABS_ATTR), torch.Tensor) for d in deltas),
            "svd_cache": all(isinstance(getattr(d, SVD_CACHE_ATTR), dict) for d in deltas)}
    assert resident_caches(method) == used
    assert resident_caches(None) == {"magnitude_cache": False, "svd_cache": False}


def test_layer_gradient_and_filters(fam):
    m = InMemoryMerger([fam["a"], fam["b"]])
    r = recipe({"merge_method": "linear", "models": [
        {"model": str(fam["a"]), "parameters": {"weight": [1.0, 0.0]}},
        {"model": str(fam["b"]), "parameters": {"weight": [0.0, 1.0]}}]})
    out = dict(m.merged_tensors(r))
    sa, sb = state(fam["a"]), state(fam["b"])
    n0, n3 = "model.layers.0.mlp.up_proj.weight", "model.layers.3.mlp.up_proj.weight"
    assert torch.equal(out[n0], sa[n0]) and torch.equal(out[n3], sb[n3])
    n1 = "model.layers.1.mlp.up_proj.weight"  # t = 1/3
    torch.testing.assert_close(out[n1], (2 / 3) * sa[n1] + (1 / 3) * sb[n1])
    assert torch.equal(out["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])  # non-layer: first value
    r = recipe({"merge_method": "linear", "models": [
        {"model": str(fam["a"]), "parameters": {"weight": [{"filter": "self_attn", "value": 1.0}, {"value": 0.0}]}},
        {"model": str(fam["b"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]}}]})
    out = dict(m.merged_tensors(r))
    q, up = "model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.up_proj.weight"
    assert torch.equal(out[q], sa[q]) and torch.equal(out[up], sb[up])


def test_passthrough_slices_change_depth_and_load(fam, tmp_path):
    r = recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(fam["a"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fam["b"]), "layer_range": [1, 4]}]}]})
    out = merge_to_disk(r, tmp_path / "o")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 5
    so, sa, sb = state(out), state(fam["a"]), state(fam["b"])
    assert torch.equal(so["model.layers.1.mlp.up_proj.weight"], sa["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(so["model.layers.2.mlp.up_proj.weight"], sb["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(so["model.layers.4.mlp.up_proj.weight"], sb["model.layers.3.mlp.up_proj.weight"])
    assert torch.equal(so["model.embed_tokens.weight"], sa["model.embed_tokens.weight"])
    assert torch.equal(so["lm_head.weight"], sb["lm_head.weight"])
    model = load_model(out)
    assert model.config.num_hidden_layers == 5
    model(torch.tensor([[1, 2, 3]]))


def test_ties_over_full_slices_equals_models_form(fam):
    params = {"weight": 0.7, "density": 0.4}
    whole = recipe({"merge_method": "ties", "base_model": str(fam["base"]), "seed": 1,
                    "models": [{"model": str(fam[k]), "parameters": params} for k in ("base", "a", "b")]})
    sliced = recipe({"merge_method": "ties", "base_model": str(fam["base"]), "seed": 1, "slices": [
        {"sources": [{"model": str(fam[k]), "layer_range": rng, "parameters": params} for k in ("base", "a", "b")]}
        for rng in ([0, 1], [1, 4])]})
    m = InMemoryMerger([fam["base"], fam["a"], fam["b"]])
    a, b = dict(m.merged_tensors(whole)), dict(m.merged_tensors(sliced))
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_output_folder_must_not_be_an_input(fam):
    with pytest.raises(EvomergeError, match="is the input model"):
        merge_to_disk(ta_recipe(fam), fam["a"])


def test_sharded_output_round_trips_through_transformers(fam, tmp_path):
    out = merge_to_disk(ta_recipe(fam), tmp_path / "o", max_shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").exists()
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2
    so = state(out)
    model = load_model(out)
    sd = model.state_dict()
    assert all(torch.equal(so[n], sd[n]) for n in so)
    # and the sharded checkpoint is a valid input to another merge
    again = merge_to_disk(recipe({"merge_method": "linear", "models": [{"model": str(out), "parameters": {"weight": 1}}]}),
                          tmp_path / "o2")
    s2 = state(again)
    assert all(torch.equal(so[n], s2[n]) for n in so)


def test_output_replaced_atomically_and_no_temp_left_on_error(fam, tmp_path):
    out = merge_to_disk(ta_recipe(fam), tmp_path / "o")
    before = state(out)
    bad = ta_recipe(fam, parameters={"lambda": 3e38})
    bad.models[0].parameters["weight"] = 3e38
    with pytest.raises(EvomergeError, match=r"NaN/inf in tensor '.*'.*task_arithmetic"):
        merge_to_disk(bad, tmp_path / "o")
    after = state(out)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def broken(fam):
    root = fam["root"]
    from safetensors.torch import load_file, save_file

    sd = load_file(str(fam["a"] / "model.safetensors"))
    cfg = json.loads((fam["a"] / "config.json").read_text())
    out = {}
    p = root / "missing_tensor"
    p.mkdir()
    save_file({k: v for k, v in sd.items() if "layers.2.mlp.up_proj" not in k}, str(p / "model.safetensors"))
    (p / "config.json").write_text(json.dumps(cfg))
    out["missing_tensor"] = p
    p = root / "arch"
    p.mkdir()
    save_file(sd, str(p / "model.safetensors"))
    (p / "config.json").write_text(json.dumps({**cfg, "architectures": ["MistralForCausalLM"]}))
    out["arch"] = p
    out["shape"] = make_base(root / "wide", hidden=48)
    p = root / "pickled"
    p.mkdir()
    torch.save(sd, p / "pytorch_model.bin")
    (p / "config.json").write_text(json.dumps(cfg))
    out["pickled"] = p
    p = root / "noweights"
    p.mkdir()
    (p / "config.json").write_text(json.dumps(cfg))
    out["noweights"] = p
    return out


@pytest.mark.parametrize("which,pattern", [
    ("missing_tensor", r"tensor 'model.layers.2.mlp.up_proj.weight' is missing from model .*missing_tensor"),
    ("arch", r"architecture mismatch: .*LlamaForCausalLM.*MistralForCausalLM"),
    ("shape", r"shape mismatch for tensor '.*': \[.*\] in .*base but \[.*\] in .*wide"),
    ("pickled", r"only pickle weights .*--allow-pickle"),
    ("noweights", r"no weights found"),
    ("nofolder", r"model '.*nofolder': folder not found"),
])
def test_input_errors_name_the_model_and_tensor(fam, broken, tmp_path, which, pattern):
    path = broken.get(which, fam["root"] / "nofolder")
    r = recipe({"merge_method": "task_arithmetic", "base_model": str(fam["base"]),
                "models": [{"model": str(path), "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match=pattern):
        merge_to_disk(r, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_pickle_read_with_allow_pickle(fam, broken, tmp_path):
    r = recipe({"merge_method": "linear", "models": [{"model": str(broken["pickled"]), "parameters": {"weight": 1.0}}]})
    so, sa = state(merge_to_disk(r, tmp_path / "o", allow_pickle=True)), state(fam["a"])
    assert all(torch.equal(sa[n], so[n]) for n in sa)


def test_in_memory_apply_rejects_wrong_depth(fam):
    r = recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(fam["a"]), "layer_range": [0, 4]}]},
                                                          {"sources": [{"model": str(fam["a"]), "layer_range": [3, 4]}]}]})
    with pytest.raises(EvomergeError, match="yields 5 layers"):
        InMemoryMerger(r).apply(r, load_model(fam["base"]))


def _cli(args, cwd):
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_merge_and_errors(fam, tmp_path):
    good = tmp_path / "r.yaml"
    good.write_text(ta_recipe(fam).to_yaml())
    p = _cli(["merge", str(good), "--out", str(tmp_path / "o"), "--shard-size", "40KB", "-q"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o" / "model.safetensors.index.json").exists()
    cases = {
        "merge_method: tiez": "unknown merge_method 'tiez'",
        "parameters: {lambda: 1.0, lamda: 2}": "unknown parameter 'lamda'",
        "dtyp: float16": "unknown key 'dtyp'",
    }
    for line, msg in cases.items():
        bad = tmp_path / "bad.yaml"
        text = good.read_text()
        key = line.split(":")[0]
        lines = [x for x in text.splitlines() if not x.startswith(key + ":")] + [line]
        if key == "dtyp":
            lines = text.splitlines() + [line]
        bad.write_text("\n".join(lines) + "\n")
        p = _cli(["merge", str(bad), "--out", str(tmp_path / "o2")], tmp_path)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, (line, p.stderr)
    assert not (tmp_path / "o2").exists()


CHUNKED = [
    ("task_arithmetic", True, {"lambda": 0.7, "normalize": True}),
    ("linear", False, {}),
    ("passthrough", False, {}),
]


@pytest.mark.parametrize("method,with_base,globals_", CHUNKED, ids=[c[0] for c in CHUNKED])
def test_chunked_elementwise_merge_matches_whole_tensors(fam, fam16, tmp_path, monkeypatch, method, with_base,
                                                         globals_):
    """Elementwise methods run ``MERGE_CHUNK`` entries at a time on the CPU (task vectors computed
    per chunk on disk, written straight into the model in memory): the same bits as one call of
    the method on the whole float32 tensors, also for bf16 sources and an odd chunk size."""
    import evomerge.merge.per_tensor as eng  # where merge_one reads MERGE_CHUNK

    keys = ("a",) if method == "passthrough" else ("a", "b", "c")
    for family in (fam, fam16):
        models = [{"model": str(family[k]), "parameters": {"weight" if method != "passthrough" else "scale": w}}
                  for k, w in zip(keys, (0.5, -0.3, 0.9))]
        r = recipe({"merge_method": method, "models": models, "parameters": globals_, "dtype": "float32",
                    **({"base_model": str(family["base"])} if with_base else {})})
        monkeypatch.setattr(eng, "MERGE_CHUNK", 1 << 40)  # whole tensors: the reference
        whole = dict(InMemoryMerger(r).merged_tensors(r))
        monkeypatch.setattr(eng, "MERGE_CHUNK", 1000)
        assert max(t.numel() for t in whole.values()) > 3 * 1000  # several chunks, and a partial last one
        disk = state(merge_to_disk(r, tmp_path / f"o-{method}", overwrite=True))
        model = load_model(family["base"], dtype=torch.float32)
        InMemoryMerger(r).apply(r, model)
        memory = model.state_dict()
        for n, t in whole.items():
            assert torch.equal(disk[n], t), n
            assert torch.equal(memory[n], t), n
