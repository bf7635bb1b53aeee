"""Merging experts that do NOT share a base (issue 15, item 3): plain average vs alignment.

Trains, with the zoo's own recipe (same tokenizer, architecture, data stream and steps as
``evomerge zoo build``), one base per init seed — only the random initialisation differs —
and fine-tunes one expert per base (lang from base 0, cipher from base 1, upper from base 2;
independent fine-tunes, 100 Adam steps). Then measures held-out accuracy (the zoo's tasks,
300 items each) of each expert, of their plain average, and of the average after aligning all
three into expert 0's coordinates with Git Re-Basin (pairwise to expert 0), with C²M³ and with
activation matching (pairwise to expert 0, on 512 fresh sequences of the bases' training
mixture).
The same for the three bases themselves, and the midpoint of bases 0 and 1 (Git Re-Basin's
"linear mode connectivity" test). Besides accuracy, the next-token loss on fresh batches of
the bases' training mixture (a finer signal than accuracy: where every average scores 0).
Also: the shared-base reference rows (the zoo's experts, fine-tuned merge-aware: plain average
and task arithmetic), and each base alone. Task arithmetic does not apply across bases.

    .venv/bin/python benchmarks/different_init.py [--seeds 11 12 13] [--json OUT.json] [--cache DIR]

Needs the built zoo (``$EVOMERGE_ZOO`` or the default root). ~5 min on 2 CPU cores (training;
with ``--cache`` holding the trained models, ~1.5 min).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.align.activations import activation_matching, decoder_from_tensors, token_batches  # noqa: E402
from evomerge.align.c2m3 import c2m3  # noqa: E402
from evomerge.align.matching import squared_distance, weight_matching  # noqa: E402
from evomerge.align.symmetries import llama_layout, permute_model  # noqa: E402
from evomerge.zoo import build as zb  # noqa: E402
from evomerge.zoo import build_zoo, data  # noqa: E402

EXPERTS = ("lang", "cipher", "upper")


def train_base_and_expert(seed: int, task: str, enc, cfg, forbidden, task_names):
    """A base from init ``seed`` (the zoo's data stream and steps) and its ``task`` expert."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    draw = zb._make_drawer(enc, random.Random(f"{zb.SEED}-base"), zb.base_mixture(task_names), forbidden)
    zb._train(model, draw, zb.TRAIN["base_steps"], zb.TRAIN["base_lr"], zb.TRAIN["base_batch"], zb.SEED)
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    r = zb.TRAIN["expert_replay"]
    mix = [(1 - r, task, "full")] + [(r * w, t, k) for w, t, k in zb.base_mixture(task_names)]
    expert_draw = zb._make_drawer(enc, random.Random(f"{zb.SEED}-expert-{task}"), mix, forbidden)
    taus, _ = zb._finetune_experts(model, {task: expert_draw})
    expert = {k: base[k] + taus[task][k] if k in taus[task] else base[k] for k in base}
    return base, expert


def average(models):
    return {k: sum(m[k] for m in models) / len(models) for k in models[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs=3, default=[11, 12, 13], help="init seeds of the three bases")
    ap.add_argument("--json", type=Path, help="write the table as JSON here")
    ap.add_argument("--cache", type=Path, help="keep the trained bases and experts here (reused when present)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers import LlamaConfig

    from evomerge.backends.hf import HFEvaluator
    from evomerge.tasks import load_task_dir

    zoo = build_zoo(verbose=False)
    task_names = list(data.TASKS)
    forbidden = {t: {it["prompt"] for it in data.make_eval_items(t, zb.N_SEARCH + zb.N_HELDOUT, zb.SEED)}
                 for t in task_names}
    _, vocab = zb.build_tokenizer()
    enc = zb._Encoder(vocab)
    cfg = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"],
                      pad_token_id=vocab["<pad>"], tie_word_embeddings=False, rope_theta=10000.0, **zb.MODEL)
    t0 = time.time()
    bases, experts = [], []
    for seed, task in zip(args.seeds, EXPERTS):
        cached = args.cache / f"seed{seed}-{task}.safetensors" if args.cache else None
        if cached is not None and cached.is_file():
            both = torch_load_file(cached)
            b = {k[5:]: v for k, v in both.items() if k.startswith("base.")}
            e = {k[7:]: v for k, v in both.items() if k.startswith("expert.")}
        else:
            b, e = train_base_and_expert(seed, task, enc, cfg, forbidden, task_names)
            if cached is not None:
                from safetensors.torch import save_file

                cached.parent.mkdir(parents=True, exist_ok=True)
                save_file({**{f"base.{k}": v.contiguous() for k, v in b.items()},
                           **{f"expert.{k}": v.contiguous() for k, v in e.items()}}, str(cached))
        bases.append(b)
        experts.append(e)
        print(f"base (init seed {seed}) and its {task} expert ready ({time.time() - t0:.0f}s)", flush=True)
    layout = llama_layout(cfg.to_dict(), {k: v.shape for k, v in experts[0].items()})

    t1 = time.time()
    rebasin = align_rebasin(experts, layout)
    t_rebasin = time.time() - t1
    t1 = time.time()
    result = c2m3(experts, layout)
    cycle = [permute_model(e, layout, result.pairwise_map(i, 0)) for i, e in enumerate(experts)]
    t_c2m3 = time.time() - t1
    base_result = c2m3(bases, layout)
    bases_rebasin = align_rebasin(bases, layout)
    bases_cycle = [permute_model(b, layout, base_result.pairwise_map(i, 0)) for i, b in enumerate(bases)]
    align_draw = zb._make_drawer(enc, random.Random("different-init-align"), zb.base_mixture(task_names), forbidden)
    sequences = [row[row != enc.pad].tolist() for _ in range(2) for row in align_draw(256)[0]]
    config = cfg.to_dict()
    t1 = time.time()
    acts, act_reports = align_activations(experts, layout, config, sequences)
    t_acts = time.time() - t1
    bases_acts, _ = align_activations(bases, layout, config, sequences)
    distances = {
        "plain": [squared_distance(experts[0], e) for e in experts[1:]],
        "rebasin": [squared_distance(rebasin[0], e) for e in rebasin[1:]],
        "c2m3": [squared_distance(cycle[0], e) for e in cycle[1:]],
        "activations": [squared_distance(acts[0], e) for e in acts[1:]],
    }

    ev = HFEvaluator(zoo.base, batch_size=300)
    tasks = {t: load_task_dir(zoo.task_dir(t), "heldout") for t in task_names}

    loss_draw = zb._make_drawer(enc, random.Random("different-init-loss"), zb.base_mixture(task_names), forbidden)
    loss_batches = [loss_draw(256) for _ in range(4)]

    def accuracy(sd):
        ev.model.load_state_dict(sd)
        acc = {t: float(ev.answer(task).mean()) for t, task in tasks.items()}
        acc["avg"] = sum(acc.values()) / len(acc)
        acc["base-mix loss"] = mixture_loss(ev.model, loss_batches)
        return acc

    rows = [(f"{task} expert (base {i})", accuracy(e)) for i, (task, e) in enumerate(zip(EXPERTS, experts))]
    rows += [(f"base {i} alone", accuracy(b)) for i, b in enumerate(bases)]
    rows += [
        ("experts: plain average", accuracy(average(experts))),
        ("experts: Re-Basin to expert 0 + average", accuracy(average(rebasin))),
        ("experts: C²M³ + average", accuracy(average(cycle))),
        ("experts: activation matching to expert 0 + average", accuracy(average(acts))),
        ("bases: plain average", accuracy(average(bases))),
        ("bases: Re-Basin to base 0 + average", accuracy(average(bases_rebasin))),
        ("bases: C²M³ + average", accuracy(average(bases_cycle))),
        ("bases: activation matching to base 0 + average", accuracy(average(bases_acts))),
        ("bases 0, 1: plain midpoint", accuracy(average(bases[:2]))),
        ("bases 0, 1: Re-Basin midpoint", accuracy(average(bases_rebasin[:2]))),
        ("bases 0, 1: activation-matching midpoint", accuracy(average(bases_acts[:2]))),
    ]
    zoo_experts = [torch_load(zoo.experts[t]) for t in EXPERTS]
    zoo_base = torch_load(zoo.base)
    rows += [
        ("shared base (zoo): plain average", accuracy(average(zoo_experts))),
        ("shared base (zoo): task arithmetic l=1", accuracy(zb.task_arithmetic(zoo_base, zoo_experts, 1.0))),
    ]
    cols = list(task_names) + ["avg", "base-mix loss"]
    print(f"\nalignment: Re-Basin {t_rebasin:.1f}s, C²M³ {t_c2m3:.1f}s ({result.iterations} Frank-Wolfe "
          f"iterations), activation matching {t_acts:.1f}s ({len(sequences)} sequences); "
          f"squared distance of experts 1, 2 to expert 0: " + "; ".join(
              f"{k} " + ", ".join(f"{d:.1f}" for d in v) for k, v in distances.items()))
    print("activation matching, mean correlation of matched units (experts 1, 2 to expert 0), identity -> "
          "matched: " + "; ".join(f"{kind} " + ", ".join(f"{b:.2f} -> {a:.2f}" for b, a in pairs)
                                  for kind, pairs in matched_correlations(act_reports).items()))
    print("\n| model | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for label, acc in rows:
        print(f"| {label} | " + " | ".join(f"{acc[c]:.3f}" for c in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"seeds": args.seeds, "rows": rows, "distances": distances,
                                         "seconds": {"rebasin": t_rebasin, "c2m3": t_c2m3, "activations": t_acts}}, indent=2))


def torch_load(folder) -> dict:
    return torch_load_file(Path(folder) / "model.safetensors")


def torch_load_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def align_rebasin(models, layout):
    """Every model permuted into model 0's coordinates by Git Re-Basin."""
    return [models[0]] + [permute_model(m, layout, weight_matching(models[0], m, layout).perms) for m in models[1:]]


def align_activations(models, layout, config, sequences):
    """Every model permuted into model 0's coordinates by activation matching on ``sequences``,
    and per model the matched correlations (:func:`activation_matching`)."""
    decoders = [decoder_from_tensors(config, m) for m in models]
    perms, reports = activation_matching(decoders, 0, layout, token_batches(sequences, batch_size=64))
    return [permute_model(m, layout, p) for m, p in zip(models, perms)], reports


def matched_correlations(reports) -> dict[str, list[tuple[float, float]]]:
    """Per group kind (residual, mlp, attention), per aligned model: the mean correlation of
    matched units over the kind's groups, before (identity) and after matching."""
    out: dict[str, list[tuple[float, float]]] = {}
    for kind in ("residual", "mlp", "attention"):
        for report in reports[1:]:
            groups = [r for g, r in report.items() if g.split(".")[0] == kind]
            out.setdefault(kind, []).append((sum(r["before"] for r in groups) / len(groups),
                                             sum(r["after"] for r in groups) / len(groups)))
    return out


def mixture_loss(model, batches) -> float:
    """Mean next-token cross-entropy on fresh batches of the bases' training mixture."""
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, lab in batches:
            logits = model(input_ids=ids).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100,
                                   reduction="sum")
            total += float(loss)
            count += int((lab != -100).sum())
    return total / count


if __name__ == "__main__":
    main()
