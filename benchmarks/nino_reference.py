"""Check evomerge's ``nino`` merge method against the NiNo authors' own code (a development check).

Runs the public NiNo repository's ``merge_vit.merge_nino`` (the function its MetaMerge scripts call)
and evomerge's ``nino`` method on the same tiny Llama models (a base and two or three fine-tunes with
random weights) with the same NiNo MLP checkpoint, and prints the largest difference per setting.

Needs, besides evomerge: a checkout of github.com/SamsungSAILMontreal/nino (its graph/, optim/, utils/
and merge_vit.py) and torch_geometric (its model code imports it; pure Python:
``pip install --target DIR torch_geometric --no-deps``). torchvision is only used there for
``isinstance`` checks and is replaced by an empty stand-in (it does not load beside the CPU torch).

    python benchmarks/nino_reference.py --repo /path/to/nino --pyg DIR --checkpoint nino_mlp.pt

The reference's k loop overwrites its first model (the base) with each k's prediction before the
next k reads it (``set_model(models[0])`` then ``step`` writes into that model), so its average over
k = 1..5 is not the average of five predictions from one trajectory. The per-k rows compare single
steps; "mean k=1..5" compares the reference's loop with evomerge's default (five predictions from one
trajectory, averaged) and "chained" with ``chain_horizons: true``, which reproduces the loop.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import types
from pathlib import Path


def _stub_torchvision() -> None:
    tv = types.ModuleType("torchvision")
    tv.models = types.SimpleNamespace(VisionTransformer=type("VisionTransformer", (), {}))
    tv.transforms = types.SimpleNamespace()
    tv.datasets = types.SimpleNamespace()
    sys.modules["torchvision"] = tv


def _tiny_llama(seed: int, base_state=None, noise: float = 0.02):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=48,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    if base_state is not None:
        g = torch.Generator().manual_seed(seed)
        model.load_state_dict({k: v + noise * torch.randn(v.shape, generator=g) for k, v in base_state.items()})
    return model


def _reference(models, checkpoint: str, k_range, upd_scale: float):
    import copy

    from merge_vit import merge_nino  # the reference (its repository on sys.path)

    models = [copy.deepcopy(m) for m in models]
    with tempfile.TemporaryDirectory() as tmp:
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
            merged = merge_nino(models, tmp, k_range=k_range, ckpt=checkpoint, subgraph=True, upd_scale=upd_scale)
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def _ours(models, checkpoint_st: str, trajectory: str, horizon: float, average: bool, upd_scale: float,
          chain: bool = False):
    from evomerge.merge.registry import get_method

    spec = get_method("nino")
    base, *tuned = [dict(m.state_dict()) for m in models]
    out = {}
    for name, b in base.items():
        out[name] = spec([t[name].float() for t in tuned], b.float(), tensor_name=name, checkpoint=checkpoint_st,
                         trajectory=trajectory, horizon=horizon, average_horizons=average, update_scale=upd_scale,
                         predict_embeddings=True, chain_horizons=chain)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", required=True, help="a checkout of SamsungSAILMontreal/nino")
    ap.add_argument("--pyg", default=None, help="folder holding torch_geometric (if not installed)")
    ap.add_argument("--checkpoint", required=True, help="nino_mlp.pt (the published pickle)")
    args = ap.parse_args()

    sys.path[:0] = [p for p in (args.pyg, args.repo) if p]
    import torch
    import transformers  # noqa: F401 - before the stand-in (transformers probes for torchvision)

    _stub_torchvision()

    from evomerge.merge.methods.nino import convert_checkpoint

    torch.set_grad_enabled(False)
    st = str(Path(tempfile.mkdtemp()) / "nino.safetensors")
    convert_checkpoint(args.checkpoint, st, allow_pickle=True)
    base = _tiny_llama(0)
    rows = []
    for n_tuned, trajectory in ((2, "0,1,2,2,1"), (3, "0,1,2,2,3")):
        models = [base] + [_tiny_llama(10 + i, base.state_dict()) for i in range(n_tuned)]
        for k, scale in ((1, 0.3), (3, 1.0), (5, 2.5), (40, 0.3)):
            ref = _reference(models, args.checkpoint, [k], scale)
            ours = _ours(models, st, trajectory, float(k), False, scale)
            diff = max(float((ref[n] - ours[n]).abs().max()) for n in ref)
            change = max(float((ref[n] - models[0].state_dict()[n]).abs().max()) for n in ref)
            rows.append((n_tuned, trajectory, f"k={k}", scale, diff, change))
        ref = _reference(models, args.checkpoint, range(1, 6), 0.3)
        change = max(float((ref[n] - models[0].state_dict()[n]).abs().max()) for n in ref)
        for chain in (False, True):
            ours = _ours(models, st, trajectory, 5.0, True, 0.3, chain=chain)
            diff = max(float((ref[n] - ours[n]).abs().max()) for n in ref)
            rows.append((n_tuned, trajectory, "mean k=1..5" + (" chained" if chain else ""), 0.3, diff, change))
    print(f"{'fine-tunes':>10}  {'trajectory':<10}  {'horizon':<20} {'scale':>5}  {'max |ref - ours|':>16}  "
          f"{'max |ref - base|':>16}")
    for n, traj, k, s, d, c in rows:
        print(f"{n:>10}  {traj:<10}  {k:<20} {s:>5}  {d:>16.3g}  {c:>16.3g}")


if __name__ == "__main__":
    main()
