"""Merge speed: evomerge vs mergekit disk to disk, and in-memory merges vs the bandwidth floor.

Builds random Llama-style checkpoints (a base and fine-tune-like variants = base + small noise,
float32 safetensors) at two sizes, cached under ``--cache`` (made once), then for each size:

- disk to disk: ``mergekit-yaml`` (when installed) and ``evomerge merge`` as subprocesses on the
  same task_arithmetic recipe (base + 3 fine-tunes, float32), alternating, median of
  ``--repeat`` wall-clock seconds, start-up included; the two outputs are compared tensor by
  tensor (``bits``: identical, or the largest absolute difference); ``sync`` runs, untimed, after
  each run (evomerge fsyncs its output, mergekit leaves it to the kernel's writeback);
- in memory: ``InMemoryMerger.apply`` into a live ``LlamaForCausalLM`` (inputs resident, task
  vectors computed once; the warm-up apply is not timed), median of ``--repeat`` applies that
  differ in their weights, for task_arithmetic, ties (``magnitude_cache=True``, as the search
  runs it) and dare_ties; and the ratio to the floor.

The floor is the bytes an apply must move (base + task vectors read, the model written) divided
by this machine's copy bandwidth (a 1 GiB tensor copy counted as read + write, best of 5). With
``--device cuda`` the sources and the model live on the GPU and the floor uses the GPU's copy
bandwidth (the disk-to-disk runs get ``--device cuda`` / ``--cuda``); with ``--device cpu
--compute cuda`` (a search's ``merge_compute: cuda``) the sources stay in host memory and the
floor counts them at the measured host-to-device bandwidth. Prints one table with ``uptime``'s
load (the machine may be shared: on an oversubscribed CPU, ``--threads 1`` gives steadier numbers).

    .venv/bin/python benchmarks/merge_speed.py [--sizes small,large] [--threads N] [--mergekit PATH]
                                               [--device cpu|cuda] [--compute cuda] [--no-disk]
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.checkpoint import CheckpointReader, write_checkpoint  # noqa: E402
from evomerge.merge.engine import InMemoryMerger  # noqa: E402
from evomerge.merge.recipe import MergeRecipe  # noqa: E402

SIZES = {  # name: (layers, hidden, intermediate, vocab)
    "small": (4, 512, 1536, 16000),  # ~29M parameters
    "large": (12, 768, 2048, 32000),  # ~134M parameters (the case)
}
N_FINETUNES = 3
WEIGHTS = (0.5, 0.3, 0.2)


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    heads = max(1, hidden // 64)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "hidden_act": "silu",
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
    }


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (h, h)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_models(folder: Path, size: str) -> list[Path]:
    """The base and ``N_FINETUNES`` variants of one size (float32), made once under ``folder``."""
    paths = [folder / "base"] + [folder / f"ft{i}" for i in range(N_FINETUNES)]
    if all((p / "config.json").exists() for p in paths):
        return paths
    cfg = llama_config(*SIZES[size])
    g = torch.Generator().manual_seed(0)
    base = {n: 0.02 * torch.randn(s, generator=g) for n, s in llama_shapes(cfg).items()}
    write_checkpoint(paths[0], base, cfg, overwrite=True)
    for p in paths[1:]:
        variant = {n: t + 0.002 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        write_checkpoint(p, variant, cfg, overwrite=True)
        del variant
    return paths


def recipe_dict(paths: list[Path], method: str, weights=WEIGHTS) -> dict:
    extra = {"density": 0.5} if method in ("ties", "dare_ties") else {}
    return {
        "merge_method": method, "base_model": str(paths[0]), "dtype": "float32",
        "models": [{"model": str(p), "parameters": {"weight": w, **extra}} for p, w in zip(paths[1:], weights)],
    }


def copy_bandwidth(device: str, mib: int = 1024, repeat: int = 5) -> float:
    """Bytes per second of a large float32 copy on ``device``, counted as read + write."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeat + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def host_to_device_bandwidth(device: str, mib: int = 1024, repeat: int = 5) -> float:
    """Bytes per second of a large float32 copy from (pageable) host memory to ``device``."""
    src = torch.randn(mib * 2**20 // 4)
    dst = torch.empty(src.shape, device=device)
    best = float("inf")
    for _ in range(repeat + 1):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return src.numel() * 4 / best


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def same_bits(a: Path, b: Path) -> str:
    """'identical', or the largest absolute difference between two checkpoints' tensors."""
    ra, rb = CheckpointReader(a), CheckpointReader(b)
    if sorted(ra.tensor_names()) != sorted(rb.tensor_names()):
        return "different tensor names"
    worst = 0.0
    for n in ra.tensor_names():
        x, y = ra.get(n), rb.get(n)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{n}: {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)}"
        if not torch.equal(x, y):
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return "identical" if worst == 0.0 else f"max |diff| {worst:.1e}"


def find_mergekit(given: str | None) -> str | None:
    if given:
        return given
    beside = Path(sys.executable).parent / "mergekit-yaml"
    return str(beside) if beside.exists() else shutil.which("mergekit-yaml")


def disk_rows(work: Path, paths: list[Path], repeat: int, mergekit: str | None, threads: int | None,
              device: str) -> list[tuple]:
    """Wall-clock seconds of ``mergekit-yaml`` and ``evomerge merge`` on the same recipe, alternating."""
    import yaml

    recipe_file = work / "task_arithmetic.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe_dict(paths, "task_arithmetic"), sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    outs = {"evomerge merge": work / "out-evomerge", "mergekit-yaml": work / "out-mergekit"}
    commands = {"evomerge merge": [sys.executable, "-m", "evomerge.cli", "merge", str(recipe_file),
                                   "--out", str(outs["evomerge merge"]), "-q", "--device", device]}
    if mergekit:
        commands["mergekit-yaml"] = [mergekit, str(recipe_file), str(outs["mergekit-yaml"])]
        if device.startswith("cuda"):
            commands["mergekit-yaml"].append("--cuda")
    times: dict[str, list[float]] = {k: [] for k in commands}
    for _ in range(repeat):
        for label, cmd in commands.items():
            shutil.rmtree(outs[label], ignore_errors=True)  # each writes a fresh folder (untimed)
            t = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            times[label].append(time.perf_counter() - t)
            if done.returncode != 0:
                raise SystemExit(f"{label} failed:\n{done.stderr[-2000:]}")
            # untimed: flush what the run left dirty in the page cache (evomerge fsyncs its output,
            # mergekit does not), so that no run pays for the previous one's writeback
            os.sync()
    rows = []
    evo = statistics.median(times["evomerge merge"])
    for label, ts in times.items():
        med = statistics.median(ts)
        note = f"runs {', '.join(f'{t:.2f}' for t in ts)}"
        if label == "mergekit-yaml":
            note += f"; evomerge {med / evo:.1f}x faster; bits vs evomerge: " + same_bits(
                work / "out-mergekit", work / "out-evomerge")
        rows.append(("task_arithmetic", f"disk: {label}", med, None, note))
    return rows


def memory_rows(paths: list[Path], repeat: int, device: str, compute: str) -> list[tuple]:
    """Median seconds of ``InMemoryMerger.apply`` into a live model, and the ratio to the floor.

    The floor: the base and each task vector read and the model written, at ``compute``'s copy
    bandwidth; when the sources stay on ``device`` (the host) and the math runs on ``compute`` (a
    GPU: ``merge_compute: cuda``), the sources cross at the host-to-device bandwidth instead."""
    from transformers import LlamaForCausalLM

    os.sync()  # no writeback of the disk runs during the timings
    model = LlamaForCausalLM.from_pretrained(str(paths[0]), dtype=torch.float32).to(compute)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    bandwidth = copy_bandwidth(compute)
    if device == compute:
        floor = (N_FINETUNES + 2) * model_bytes / bandwidth
        how = f"{bandwidth / 1e9:.1f} GB/s copy"
    else:
        h2d = host_to_device_bandwidth(compute)
        floor = (N_FINETUNES + 1) * model_bytes / h2d + model_bytes / bandwidth
        how = f"{h2d / 1e9:.1f} GB/s host to device, {bandwidth / 1e9:.0f} GB/s copy"
    rows = []
    for method in ("task_arithmetic", "ties", "dare_ties"):
        merger = InMemoryMerger(MergeRecipe.from_dict(recipe_dict(paths, method)), device=device,
                                compute_device=compute, magnitude_cache=(method == "ties"))
        merger.apply(MergeRecipe.from_dict(recipe_dict(paths, method)), model)  # warm-up (and TIES' sort)
        times = []
        for i in range(repeat):
            r = MergeRecipe.from_dict(recipe_dict(paths, method, [w + 0.01 * (i + 1) for w in WEIGHTS]))
            sync(compute)
            t = time.perf_counter()
            merger.apply(r, model)
            sync(compute)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        note = f"floor {floor:.3f}s ({how})" + ("; magnitude cache" if method == "ties" else "")
        place = "in memory" if device == compute else f"in memory, {device} -> {compute}"
        rows.append((method, place, med, med / floor, note))
        del merger
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="small,large", help=f"comma-separated, of {sorted(SIZES)}")
    ap.add_argument("--repeat", type=int, default=3, help="runs per measurement (the median is reported)")
    ap.add_argument("--device", default="cpu", help="where the in-memory sources live (cpu, cuda) and the "
                    "disk-to-disk merges compute")
    ap.add_argument("--compute", default=None, help="where the in-memory merge math runs (default: --device; "
                    "--device cpu --compute cuda is a search's merge_compute: cuda)")
    ap.add_argument("--mergekit", default=None, help="mergekit-yaml to compare with (default: beside this "
                    "python, else on PATH; skipped when absent)")
    ap.add_argument("--no-disk", action="store_true", help="only the in-memory merges")
    ap.add_argument("--cache", default=str(ROOT / ".cache" / "bench" / "merge_speed"),
                    help="folder for the generated models and outputs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in this process (in-memory "
                    "merges, copy bandwidth) and OMP_NUM_THREADS of the disk-to-disk subprocesses (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compute = args.compute or args.device
    if "cuda" in args.device + compute and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device} / --compute {compute}: torch sees no CUDA GPU here")
    mergekit = None if args.no_disk else find_mergekit(args.mergekit)
    rows = []
    for size in args.sizes.split(","):
        if size not in SIZES:
            raise SystemExit(f"--sizes: unknown size {size!r}; known: {sorted(SIZES)}")
        work = Path(args.cache) / size
        paths = make_models(work, size)
        ref = CheckpointReader(paths[0])
        n_params = sum(math.prod(ref.shape(n)) for n in ref.tensor_names())
        label = f"{size} ({n_params / 1e6:.0f}M)"
        if not args.no_disk:
            rows += [(label, *r) for r in disk_rows(work, paths, args.repeat, mergekit, args.threads, args.device)]
        rows += [(label, *r) for r in memory_rows(paths, args.repeat, args.device, compute)]
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    gpu = f" ({torch.cuda.get_device_name()})" if torch.cuda.is_available() else ""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; device {args.device}, "
          f"compute {compute}{gpu}; mergekit: {mergekit or 'absent'}")
    print(f"uptime: {load}")
    print()
    print(f"| model | method | path | median s | x floor | notes |")
    print("|---|---|---|---:|---:|---|")
    for size, method, path, s, ratio, note in rows:
        print(f"| {size} | {method} | {path} | {s:.3f} | {'' if ratio is None else f'{ratio:.1f}'} | {note} |")


if __name__ == "__main__":
    main()
