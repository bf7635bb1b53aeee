"""evomerge.checkpoint: lazy reader, header checks, streaming atomic writer, layer names."""

import json

import pytest
import torch

from evomerge.checkpoint import (
    CheckpointReader,
    CheckpointWriter,
    check_compatible,
    layer_index,
    parse_size,
    set_layer_index,
    write_checkpoint,
)
from evomerge.errors import EvomergeError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(10, 8, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight": torch.randn(16, 8, generator=g).half(),
        "model.norm.weight": torch.ones(8),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(7),
        "empty": torch.zeros(0, 4),
    }


def test_layer_index_and_rename():
    assert layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert layer_index("transformer.h.11.attn.c_attn.weight") == 11
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_index("lm_head.weight") is None
    assert set_layer_index("model.layers.7.mlp.w", 12) == "model.layers.12.mlp.w"
    assert set_layer_index("lm_head.weight", 3) == "lm_head.weight"


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2MiB") == 2 * 2**20
    assert parse_size(123) == 123
    with pytest.raises(ValueError):
        parse_size("lots")


@pytest.mark.parametrize("shard", [10**9, 300])
def test_round_trip_single_and_sharded(tmp_path, shard):
    ts = _tensors()
    out = write_checkpoint(tmp_path / "m", ts, {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2},
                           max_shard_bytes=shard)
    files = sorted(p.name for p in out.iterdir())
    if shard > 10**6:
        assert files == ["config.json", "model.safetensors"]
    else:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.startswith("model-")]) > 1
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ts)
    r = CheckpointReader(out)
    assert r.num_layers == 2 and r.architectures == ["LlamaForCausalLM"]
    assert set(r.tensor_names()) == set(ts)
    for n, t in ts.items():
        assert r.shape(n) == tuple(t.shape) and r.dtype(n) == t.dtype
        assert torch.equal(r.get(n), t)
    # the files are standard safetensors
    from safetensors.torch import load_file

    loaded = {}
    for f in out.glob("*.safetensors"):
        loaded.update(load_file(str(f)))
    assert all(torch.equal(loaded[n], t) for n, t in ts.items())


def test_writer_replaces_atomically_and_aborts_cleanly(tmp_path):
    ts = _tensors()
    out = write_checkpoint(tmp_path / "m", ts, {"a": 1})
    specs = [(n, tuple(t.shape), t.dtype) for n, t in ts.items()]
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(tmp_path / "m", specs, {"a": 2}) as w:
            w.write("model.embed_tokens.weight", ts["model.embed_tokens.weight"])
            raise RuntimeError("boom")
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    write_checkpoint(tmp_path / "m", {"x": torch.ones(2)}, {"a": 3}, tokenizer_from=None)
    assert json.loads((out / "config.json").read_text()) == {"a": 3}
    assert CheckpointReader(out).tensor_names() == ["x"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_writer_refuses_to_replace_a_non_model_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("precious")
    with pytest.raises(EvomergeError, match="not empty and does not look like a model folder"):
        write_checkpoint(tmp_path / "docs", {"x": torch.ones(1)}, {})


def test_tokenizer_files_are_copied(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "tokenizer.json").write_text("{}")
    (src / "tokenizer_config.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    out = write_checkpoint(tmp_path / "m", {"x": torch.ones(1)}, {}, tokenizer_from=src)
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= {p.name for p in out.iterdir()}


def test_reader_errors(tmp_path):
    with pytest.raises(EvomergeError, match="not found"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "nocfg").mkdir()
    with pytest.raises(EvomergeError, match="config.json not found"):
        CheckpointReader(tmp_path / "nocfg")
    out = write_checkpoint(tmp_path / "m", _tensors(), {}, max_shard_bytes=300)
    r = CheckpointReader(out)
    with pytest.raises(EvomergeError, match="tensor 'nope' not found"):
        r.get("nope")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(EvomergeError, match=f"shard {shard.name} listed in .* is missing"):
        CheckpointReader(out)


def test_pickle_only_with_opt_in(tmp_path):
    p = tmp_path / "pk"
    p.mkdir()
    (p / "config.json").write_text("{}")
    torch.save({"w": torch.ones(3)}, p / "pytorch_model.bin")
    with pytest.raises(EvomergeError, match="allow-pickle"):
        CheckpointReader(p)
    r = CheckpointReader(p, allow_pickle=True)
    assert r.format == "pickle" and torch.equal(r.get("w"), torch.ones(3))


def test_check_compatible(tmp_path):
    a = CheckpointReader(write_checkpoint(tmp_path / "a", {"w": torch.ones(2, 3), "v": torch.ones(1)}, {"architectures": ["X"]}))
    b = CheckpointReader(write_checkpoint(tmp_path / "b", {"w": torch.ones(3, 2), "v": torch.ones(1)}, {"architectures": ["X"]}))
    c = CheckpointReader(write_checkpoint(tmp_path / "c", {"w": torch.ones(2, 3)}, {"architectures": ["X"]}))
    d = CheckpointReader(write_checkpoint(tmp_path / "d", {"w": torch.ones(2, 3), "v": torch.ones(1)}, {"architectures": ["Y"]}))
    check_compatible([a, a])
    with pytest.raises(EvomergeError, match=r"shape mismatch for tensor 'w': \[2, 3\] in .*a but \[3, 2\] in .*b"):
        check_compatible([a, b])
    with pytest.raises(EvomergeError, match="tensor 'v' is missing from model .*c"):
        check_compatible({"a": a, "c": c})
    with pytest.raises(EvomergeError, match=r"architecture mismatch: a is \['X'\] but d is \['Y'\]"):
        check_compatible({"a": a, "d": d})
