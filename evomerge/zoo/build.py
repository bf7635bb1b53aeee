"""Build the zoo: a tiny Llama base, one expert per task, the task files and a report.

Recipe (all on the CPU, one torch thread, deterministic from ``SEED``: two builds on the same
machine / torch build give bit-identical checkpoints):

1. Task items (600 search + 300 held-out per task, distinct prompts) are drawn first; no
   training example ever uses one of their prompts.
2. The base (``LlamaForCausalLM``, char-level tokenizer) is pretrained on a mixture of every
   task restricted to half of the alphabet (digits 0-4, letters a-m) plus generic synthetic
   text (counting, letter runs, nonce words), so it knows every format and half of every
   mapping.
3. One expert per task is fine-tuned from the base on its task over the whole alphabet (with
   20% replay of the base mixture), side by side with a merge-aware term (see
   ``_finetune_experts``): the loss of ``base + sum(expert - base)`` on the expert tasks,
   weighted by ``TRAIN["merge_aware"]``.
4. Extra endpoints (``STRONG``), written after the experts and derived from them: an
   "over-trained" expert ``base + f * (expert - base)``, i.e. a fine-tune trained f times as
   hard in the linear regime (``cipher_strong``: the cipher expert, f = 2). They are not
   training tasks and change no other checkpoint; they give the search something to find
   (``configs/demo_strengths.yaml``: the right weight for it is 1/f, which no default merge
   uses).
5. Held-out accuracy of the base, the experts, the extra endpoints and a few task-arithmetic
   merges (of the experts) is measured and written to ``zoo_report.md`` and ``zoo.json``.

Only ``data.TASKS`` (the generation tasks) enter training. The multiple-choice tasks
(``data.CHOICE_TASKS``) are built from their source task's items and only evaluated, so they
change no checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from pathlib import Path

from evomerge.zoo import data

SEED = 1234
N_SEARCH = 600
N_HELDOUT = 300

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARS = list("0123456789" + data.LETTERS + data.LETTERS.upper() + " +=.,:?-")

MODEL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)

TRAIN = dict(
    base_steps=450, base_lr=3e-3, base_batch=64, base_generic=0.12,
    expert_steps=100, expert_lr=1e-3, expert_batch=64, expert_replay=0.2,
    merge_aware=0.12,
)
# experiments only: JSON overrides of TRAIN / MODEL (recorded in zoo.json's "recipe", so a
# cached zoo built with other settings is rebuilt)
_ENV_TRAIN = os.environ.get("EVOMERGE_ZOO_TRAIN")
if _ENV_TRAIN:
    TRAIN.update({k: v for k, v in json.loads(_ENV_TRAIN).items() if k in TRAIN})
    MODEL.update({k: v for k, v in json.loads(_ENV_TRAIN).items() if k in MODEL})

# extra endpoints: name -> (expert task, factor f): base + f * (expert - base)
STRONG = {"cipher_strong": ("cipher", 2.0)}

# merges shown in the report: (label, kind, arg)
REPORT_MERGES = [
    ("linear avg(experts)", "ta", 1 / 3),
    ("TA l=0.5", "ta", 0.5),
    ("TA l=0.7", "ta", 0.7),
    ("TA l=1.0", "ta", 1.0),
    ("TA l=1.3", "ta", 1.3),
    ("TA l=2.5", "ta", 2.5),
]


def _log(verbose: bool, msg: str) -> None:
    if verbose:
        print(msg, flush=True)


# --------------------------------------------------------------------------- tokenizer
def build_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", padding_side="left", model_max_length=MODEL[
            "max_position_embeddings"], clean_up_tokenization_spaces=False)
    return fast, vocab


# --------------------------------------------------------------------------- training
class _Encoder:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab
        self.bos, self.eos, self.pad = vocab["<s>"], vocab["</s>"], vocab["<pad>"]

    def example(self, prompt: str, answer: str | None):
        """(ids, labels): task example (loss on answer + eos) or plain text (loss on all)."""
        v = self.vocab
        if answer is None:
            ids = [self.bos] + [v[c] for c in prompt] + [self.eos]
            return ids, ids[1:] + [-100]
        p = [v[c] for c in prompt]
        a = [v[c] for c in answer] + [self.eos]
        ids = [self.bos] + p + a
        labels = [-100] * (len(p)) + a + [-100]
        return ids, labels

    def batch(self, examples):
        import torch

        n = max(len(i) for i, _ in examples)
        ids = torch.full((len(examples), n), self.pad, dtype=torch.long)
        lab = torch.full((len(examples), n), -100, dtype=torch.long)
        for k, (i, lbl) in enumerate(examples):
            ids[k, :len(i)] = torch.tensor(i)
            lab[k, :len(lbl)] = torch.tensor(lbl)
        return ids, lab


def _train(model, draw, steps: int, lr: float, batch: int, seed: int, warmup: int = 20):
    """AdamW with warmup + cosine; labels are next-token targets already aligned."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.02)
        ids, lab = draw(batch)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                               ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _finetune_experts(model, draws: dict, merged_draw=None):
    """Fine-tune one expert per task from the base (the model's current weights).

    Each expert ``i`` is ``base + tau_i`` and minimises its own task's loss (full alphabet, with
    some replay of the base mixture). With ``TRAIN["merge_aware"] = beta > 0`` the experts are
    fine-tuned side by side and ``beta`` times the loss of their sum ``base + sum_j tau_j`` on
    a mixture of the expert tasks is added. Why: a tiny base is far from the flat, nearly
    linear regime in which real fine-tunes of a large pretrained model add up. Measured with
    independent fine-tunes (beta = 0; same tasks; Adam 1e-3 x 100 steps): each expert 1.0 on
    its task and base-level (~0.06) elsewhere (avg 0.37), but task arithmetic at l = 0.5 /
    0.7 / 1.0 only reached avg 0.11 / 0.15 / 0.05; SGD or Adam at 2e-4 did no better, and
    neither did length-generalisation tasks (addition, reversal). With beta = 0.12 each
    expert still knows only its own task (others stay at base level) and is about as good
    on it as the merge, while ``base + sum tau`` does all three; scaled merges (l = 1/3,
    0.5, 2.5) stay bad, and the compositional task is left to emerge (it does not).
    """
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    steps, lr, batch = TRAIN["expert_steps"], TRAIN["expert_lr"], TRAIN["expert_batch"]
    beta = float(TRAIN["merge_aware"])
    torch.manual_seed(SEED + 1)
    base = {k: v.detach() for k, v in model.named_parameters()}
    taus = {t: {k: torch.zeros_like(v, requires_grad=True) for k, v in base.items()}
            for t in draws}
    params = [p for tau in taus.values() for p in tau.values()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()

    def loss_of(weights, ids, lab):
        logits = functional_call(model, weights, (ids,)).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), lab.reshape(-1),
                               ignore_index=-100)

    last: dict[str, float] = {}
    warmup = 10
    for step in range(steps):
        f = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = lr * max(f, 0.02)
        opt.zero_grad(set_to_none=True)
        for t, tau in taus.items():
            ids, lab = draws[t](batch)
            loss = loss_of({k: base[k] + tau[k] for k in base}, ids, lab)
            loss.backward()
            last[t] = loss.item()
        if beta > 0 and merged_draw is not None:
            ids, lab = merged_draw(batch)
            merged = {k: base[k] + sum(tau[k] for tau in taus.values()) for k in base}
            loss = beta * loss_of(merged, ids, lab)
            loss.backward()
            last["merged"] = loss.item() / beta
        torch.nn.utils.clip_grad_norm_(params, 1.0 * len(taus))
        opt.step()
    model.eval()
    return {t: {k: v.detach().clone() for k, v in tau.items()} for t, tau in taus.items()}, last


def _make_drawer(enc: _Encoder, rng: random.Random, mixture: list[tuple[float, str, str]],
                 forbidden: dict[str, set[str]]):
    """mixture: (weight, task or 'generic', 'easy' | 'full'). Draws batches of fresh
    examples (never an evaluation prompt)."""
    weights = [w for w, _, _ in mixture]

    def draw(n: int):
        exs = []
        while len(exs) < n:
            _, t, kind = rng.choices(mixture, weights)[0]
            if t == "generic":
                exs.append(enc.example(data.generic_text(rng), None))
                continue
            p, a, _ = data.sample(t, rng, kind)
            if p in forbidden[t]:
                continue
            exs.append(enc.example(p, a))
        return enc.batch(exs)

    return draw


def base_mixture(task_names) -> list[tuple[float, str, str]]:
    mix = [(1.0, t, "easy") for t in task_names]
    g = TRAIN["base_generic"]
    mix.append((g * len(task_names) / (1 - g), "generic", ""))
    return mix


# --------------------------------------------------------------------------- merges
def task_arithmetic(base_sd: dict, expert_sds: list[dict], lam: float) -> dict:
    out = {}
    for k, b in base_sd.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        delta = sum(e[k] - b for e in expert_sds)
        out[k] = b + lam * delta
    return out


def strengthen(base_sd: dict, expert_sd: dict, factor: float) -> dict:
    """``base + factor * (expert - base)`` (float tensors; others are the base's)."""
    return {k: (b + factor * (expert_sd[k] - b)) if b.is_floating_point() else b
            for k, b in base_sd.items()}


# --------------------------------------------------------------------------- build
def build_into(tmp: Path, verbose: bool = True) -> dict:
    """Build a complete zoo into ``tmp`` (an empty folder). Returns the manifest."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.backends.hf import HFEvaluator
    from evomerge.tasks import load_task_dir, write_items

    t0 = time.time()
    torch.manual_seed(SEED)
    random.seed(SEED)
    tmp.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    # one thread: deterministic, and much faster than two when other work shares the cores
    torch.set_num_threads(int(os.environ.get("EVOMERGE_ZOO_THREADS", "1")))

    # ---- tasks (task_names: the training tasks; all_tasks adds the multiple-choice ones)
    task_names = list(data.TASKS)
    all_tasks = task_names + list(data.CHOICE_TASKS)
    forbidden: dict[str, set[str]] = {}
    eval_items: dict[str, list[dict]] = {}
    for t in task_names:
        items = data.make_eval_items(t, N_SEARCH + N_HELDOUT, SEED)
        d = tmp / "tasks" / t
        d.mkdir(parents=True)
        write_items(d / "search.jsonl", items[:N_SEARCH])
        write_items(d / "heldout.jsonl", items[N_SEARCH:])
        spec = data.TASKS[t]
        (d / "task.json").write_text(json.dumps({
            "name": t, "max_new_tokens": spec["max_new_tokens"], "extract": "exact",
            "template": "{prompt}",
            "description": (spec["gen"].__doc__ or "").strip() or data.__doc__.split(
                "\n\n")[1],
        }, indent=2) + "\n")
        forbidden[t] = {it["prompt"] for it in items}
        eval_items[t] = items
    for t, spec in data.CHOICE_TASKS.items():
        src = eval_items[spec["source"]]
        d = tmp / "tasks" / t
        d.mkdir(parents=True)
        write_items(d / "search.jsonl", data.make_choice_items(t, src[:N_SEARCH], SEED))
        write_items(d / "heldout.jsonl", data.make_choice_items(t, src[N_SEARCH:], SEED + 1))
        (d / "task.json").write_text(json.dumps({
            "name": t, "max_new_tokens": data.TASKS[spec["source"]]["max_new_tokens"],
            "extract": "exact", "template": "{prompt}", "metric": "acc",
            "choice_delimiter": "",
            "description": f"Multiple choice over the {spec['source']} task's prompts "
                           f"({spec['n_choices']} choices, scored by log-likelihood).",
        }, indent=2) + "\n")

    # ---- tokenizer + base
    tokenizer, vocab = build_tokenizer()
    enc = _Encoder(vocab)
    cfg = LlamaConfig(vocab_size=len(vocab), bos_token_id=vocab["<s>"],
                      eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                      tie_word_embeddings=False, rope_theta=10000.0, **MODEL)
    model = LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    _log(verbose, f"zoo: {n_params / 1e6:.2f}M-parameter Llama, {len(vocab)}-token vocab")
    draw = _make_drawer(enc, random.Random(f"{SEED}-base"), base_mixture(task_names),
                        forbidden)
    t1 = time.time()
    losses = _train(model, draw, TRAIN["base_steps"], TRAIN["base_lr"], TRAIN["base_batch"],
                    SEED)
    _log(verbose, f"zoo: base pretrained ({TRAIN['base_steps']} steps, loss "
                  f"{sum(losses[-20:]) / 20:.3f}) in {time.time() - t1:.1f}s")
    models_dir = tmp / "models"

    def save(m, name):
        out = models_dir / name
        m.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        return out

    save(model, "base")
    base_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # ---- experts
    expert_tasks = [t for t in task_names if data.TASKS[t]["expert"]]
    r = TRAIN["expert_replay"]
    draws = {}
    for t in expert_tasks:
        mix = [(1 - r, t, "full")] + [(r * w, tt, k) for w, tt, k in base_mixture(task_names)]
        draws[t] = _make_drawer(enc, random.Random(f"{SEED}-expert-{t}"), mix, forbidden)
    merged_draw = None
    if TRAIN["merge_aware"] > 0:
        mix = [(1.0, t, "full") for t in expert_tasks]
        merged_draw = _make_drawer(enc, random.Random(f"{SEED}-merged"), mix, forbidden)
    t1 = time.time()
    taus, losses = _finetune_experts(model, draws, merged_draw)
    _log(verbose, f"zoo: {len(taus)} experts fine-tuned (losses "
                  + ", ".join(f"{t} {v:.3f}" for t, v in losses.items())
                  + f") in {time.time() - t1:.1f}s")
    experts: dict[str, str] = {}
    expert_sds: dict[str, dict] = {}
    for t in expert_tasks:
        sd = {k: (base_sd[k] + taus[t][k]) if k in taus[t] else base_sd[k] for k in base_sd}
        model.load_state_dict(sd)
        name = f"{t}_expert"
        save(model, name)
        experts[t] = f"models/{name}"
        expert_sds[t] = sd
    extra_models: dict[str, str] = {}
    extra_sds: dict[str, dict] = {}
    for name, (t, factor) in STRONG.items():
        sd = strengthen(base_sd, expert_sds[t], factor)
        model.load_state_dict(sd)
        save(model, name)
        extra_models[name] = f"models/{name}"
        extra_sds[name] = sd
    model.load_state_dict(base_sd)

    # ---- report: held-out accuracy of base, experts, a few merges
    t1 = time.time()
    ev = HFEvaluator(models_dir / "base", batch_size=300)
    tasks = {t: load_task_dir(tmp / "tasks" / t, "heldout") for t in all_tasks}
    rows: list[tuple[str, dict[str, float]]] = []

    levels: dict[str, dict] = {}

    def evaluate(label, sd):
        ev.model.load_state_dict(sd)
        acc, lv = {}, {}
        for t, task in tasks.items():
            a = ev.answer(task)
            acc[t] = float(a.mean())
            for g in sorted({it.subgroup for it in task.items}):
                m = [it.subgroup == g for it in task.items]
                lv[f"{t}:{g}"] = round(float(a[m].mean()), 2)
        rows.append((label, acc))
        levels[label] = lv
        _log(verbose, f"zoo:   {label}: " + " ".join(f"{k}={v}" for k, v in lv.items()))

    evaluate("base", base_sd)
    for t, sd in expert_sds.items():
        evaluate(f"{t}_expert", sd)
    for name, sd in extra_sds.items():
        evaluate(name, sd)
    sds = list(expert_sds.values())
    for label, kind, arg in REPORT_MERGES:
        evaluate(label, task_arithmetic(base_sd, sds, arg))
    _log(verbose, f"zoo: evaluated {len(rows)} models in {time.time() - t1:.1f}s")
    torch.set_num_threads(threads_before)

    report = format_report(rows, all_tasks, [t for t in task_names if t in experts])
    manifest = {
        "version": ZOO_FORMAT, "recipe": recipe(), "seed": SEED, "base": "models/base", "experts": experts,
        "extra_models": extra_models, "task_names": all_tasks, "params": n_params,
        "build_seconds": round(time.time() - t0, 1),
        "heldout_accuracy": {label: acc for label, acc in rows},
        "heldout_accuracy_by_level": levels,
    }
    (tmp / "zoo_report.md").write_text(report)
    _log(verbose, report)
    _log(verbose, f"zoo: built in {time.time() - t0:.1f}s")
    return manifest


ZOO_FORMAT = "6"  # 6: extra endpoint cipher_strong; 5: multiple choice (cipher_choice)


def recipe() -> dict:
    """What determines the zoo besides the code: compared with zoo.json to reuse a cache."""
    return {"seed": SEED, "n_search": N_SEARCH, "n_heldout": N_HELDOUT,
            "train": dict(TRAIN), "model": dict(MODEL), "tasks": list(data.TASKS),
            "choice_tasks": {t: dict(s) for t, s in data.CHOICE_TASKS.items()},
            "strong": {n: list(v) for n, v in STRONG.items()}}


def format_report(rows, task_names, expert_tasks) -> str:
    avg_tasks = list(task_names)
    head = "| model | " + " | ".join(task_names) + " | avg |"
    sep = "|---" * (len(task_names) + 2) + "|"
    lines = ["# evomerge zoo: held-out accuracy", "",
             "TA = task arithmetic: base + l * sum(expert - base); linear avg(experts) is "
             "TA at l=1/3."]
    strong = [n for n, _ in rows if n in STRONG]
    if strong:
        lines += ["", "; ".join(f"{n} = base + {STRONG[n][1]:g} * ({STRONG[n][0]}_expert - base) "
                                f"(over-trained; not in the TA merges)" for n in strong) + "."]
    mc = [t for t in task_names if t in data.CHOICE_TASKS]
    if mc:
        lines += ["", ", ".join(mc) + ": multiple choice scored by log-likelihood (chance "
                  + ", ".join(f"{1 / data.CHOICE_TASKS[t]['n_choices']:.2f}" for t in mc)
                  + "); no expert of its own."]
    lines += ["", head, sep]
    for label, acc in rows:
        avg = sum(acc[t] for t in avg_tasks) / len(avg_tasks)
        lines.append(f"| {label} | " + " | ".join(f"{acc[t]:.3f}" for t in task_names)
                     + f" | {avg:.3f} |")
    return "\n".join(lines) + "\n"


def build(root: Path, force: bool, verbose: bool) -> None:
    """Build atomically into ``root`` (temp folder next to it, then rename)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        manifest = build_into(tmp, verbose=verbose)
        (tmp / "zoo.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if root.exists():
            if not force and (root / "zoo.json").is_file():
                shutil.rmtree(tmp)  # someone else finished first
                return
            old = root.parent / f".{root.name}.old-{os.getpid()}"
            os.rename(root, old)
            os.rename(tmp, root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, root)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
