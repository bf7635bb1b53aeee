"""Merge throughput: disk merge and in-memory merge vs this machine's memory bandwidth.

Makes a random ~100M-parameter Llama (base + fine-tune-like variants = base + small noise) in
a temporary folder, then times, for task_arithmetic, ties and dare_ties:

- disk:      ``merge_to_disk`` (read inputs tensor by tensor, merge, stream shards, rename);
- in-memory: ``InMemoryMerger.apply`` into a live ``LlamaForCausalLM`` (inputs resident, task
             vectors computed once; the first, warm-up apply is not timed), for ties also with
             ``magnitude_cache=True`` (sorted magnitudes kept: the TIES trim becomes a lookup).

GB/s is the size of the merged model (the output, at the output dtype) divided by the time;
"traffic GB/s" counts every tensor read and written once (N inputs + base + output). The
memory bandwidth line is a large tensor copy (read + write) measured in the same run.

    .venv/bin/python benchmarks/merge_speed.py [--layers 12 --hidden 768 --vocab 16000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.checkpoint import write_checkpoint  # noqa: E402
from evomerge.merge.engine import InMemoryMerger, merge_to_disk  # noqa: E402
from evomerge.merge.recipe import MergeRecipe  # noqa: E402


def make_models(root: Path, n_models: int, layers: int, hidden: int, vocab: int, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 64), tie_word_embeddings=False,
                      max_position_embeddings=2048)
    with torch.device("meta"):
        shapes = {n: (tuple(p.shape)) for n, p in LlamaForCausalLM(cfg).state_dict().items() if "rotary" not in n}
    config = cfg.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    g = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=g)).to(dtype) for n, s in shapes.items()}
    paths = [write_checkpoint(root / "base", base, config, max_shard_bytes=2 * 10**9)]
    for i in range(n_models):
        var = {n: (t.float() + 0.002 * torch.randn(t.shape, generator=g)).to(dtype) for n, t in base.items()}
        paths.append(write_checkpoint(root / f"ft{i}", var, config, max_shard_bytes=2 * 10**9))
        del var
    n_params = sum(t.numel() for t in base.values())
    del base
    return cfg, paths, n_params


def memory_bandwidth(mb: int = 512, repeat: int = 5) -> float:
    n = mb * 2**20 // 4
    src = torch.randn(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--models", type=int, default=2, help="number of fine-tunes merged")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=3, help="timed in-memory applies (best is reported)")
    ap.add_argument("--disk-repeat", type=int, default=2, help="timed disk merges (best is reported)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tmp", default=None, help="folder for the temporary models (default: system temp)")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    threads = torch.get_num_threads()
    root = Path(tempfile.mkdtemp(prefix="evomerge-bench-", dir=args.tmp))
    try:
        t = time.perf_counter()
        cfg, paths, n_params = make_models(root, args.models, args.layers, args.hidden, args.vocab, dtype)
        esz = torch.empty((), dtype=dtype).element_size()
        out_gb = n_params * esz / 1e9
        print(f"model: Llama {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}: {n_params / 1e6:.1f}M params, "
              f"{args.dtype} ({out_gb:.2f} GB per model); {args.models} fine-tunes + base; made in "
              f"{time.perf_counter() - t:.1f}s; torch {torch.__version__}, {threads} threads, device {args.device}")
        bw = memory_bandwidth()
        base, fts = str(paths[0]), [str(p) for p in paths[1:]]

        def recipe(method: str, w: float) -> MergeRecipe:
            extra = {"density": 0.5} if method in ("ties", "dare_ties") else {}
            return MergeRecipe.from_dict({
                "merge_method": method, "base_model": base, "dtype": args.dtype,
                "models": [{"model": p, "parameters": {"weight": w, **extra}} for p in fts],
            })

        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(base, dtype=dtype).to(args.device)
        rows = []
        cases = [("task_arithmetic", False), ("ties", False), ("ties", True), ("dare_ties", False)]
        for method, mcache in cases:
            if not mcache:
                disk_s = float("inf")
                for _ in range(args.disk_repeat):
                    out = root / f"out-{method}"
                    t = time.perf_counter()
                    merge_to_disk(recipe(method, 0.5), out, device=args.device)
                    disk_s = min(disk_s, time.perf_counter() - t)
                    shutil.rmtree(out)
            t = time.perf_counter()
            merger = InMemoryMerger(recipe(method, 0.5), device=args.device, magnitude_cache=mcache)
            merger.apply(recipe(method, 0.4), model)  # warm-up (and the one-time sort with magnitude_cache)
            load_s = time.perf_counter() - t
            best = float("inf")
            for i in range(args.repeat):
                r = recipe(method, 0.3 + 0.1 * i)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                merger.apply(r, model)
                if args.device != "cpu":
                    torch.cuda.synchronize()
                best = min(best, time.perf_counter() - t)
            traffic = (args.models + 2) * out_gb
            if not mcache:
                rows.append((method, "disk", disk_s, out_gb / disk_s, traffic / disk_s, ""))
            label = "in-memory" + ("+mcache" if mcache else "")
            rows.append((method, label, best, out_gb / best, traffic / best,
                         f"load+first apply {load_s:.1f}s, resident {merger.resident_bytes / 1e9:.2f} GB"))
            del merger
        print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print()
        print(f"{'method':<16}{'path':<18}{'seconds':>9}{'GB/s':>8}{'traffic GB/s':>14}  notes")
        for m, p, s, g, tr, note in rows:
            print(f"{m:<16}{p:<18}{s:>9.2f}{g:>8.2f}{tr:>14.2f}  {note}")
        print(f"{'memory copy':<16}{'':<18}{'':>9}{'':>8}{bw:>14.2f}  512 MiB float32 tensor copy (read + write)")
        print("GB/s = merged model bytes / time; traffic = (fine-tunes + base + output) bytes / time;")
        print("in-memory: best of --repeat applies into a live model; +mcache: InMemoryMerger(magnitude_cache=True).")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
